"""Streaming text sources (jaxllm/data/indexed.py): the documents and pieces of the in-memory rules, batches
equal to an in-memory source's, the index cached and rebuilt when the file changes, peak memory flat as the
file grows, and the same documents and batches from an S3 bucket on loopback."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.data import indexed
from jaxllm.data.sources import cut_pieces, open_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch):
    """Each test its own index cache (users get ~/.cache/jaxllm/indexes)."""
    monkeypatch.setenv("JAXLLM_INDEX_DIR", str(tmp_path / "indexes"))
    return tmp_path / "indexes"


def _in_memory(data: bytes, split: str, piece_chars: int) -> list[str]:
    """The reading rules written out on the whole text: universal newlines, BOM dropped; lines stripped, or
    blank-line separated paragraphs / the whole file with leading blank lines and trailing space dropped; then
    cut_pieces."""
    text = data.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if split == "line":
        docs = [line.strip() for line in text.split("\n")]
    else:
        parts = [text] if split == "file" else re.split(r"\n(?:[^\S\n]*\n)+", text)
        docs = [re.sub(r"\A(?:[^\S\n]*\n)+", "", p).rstrip() for p in parts]
    return [piece for doc in docs if doc for piece in cut_pieces(doc, piece_chars)]


def _flags(docs) -> list[tuple[bool, bool]]:
    return [(getattr(d, "first", True), getattr(d, "last", True)) for d in docs]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_streamed_pieces_of_a_real_book_equal_the_whole_text_cut_in_memory(shared_data, tmp_path, newline):
    book = (shared_data / "text/en/botchan.txt").read_text(encoding="utf-8")
    data = ("\ufeff\n\n" + book.replace("\n", newline)).encode("utf-8")
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    for split, piece_chars in [("file", 4000), ("file", 0), ("paragraph", 300), ("line", 50)]:
        source = open_source(str(path), text_split=split, piece_chars=piece_chars)
        want = _in_memory(data, split, piece_chars)
        assert isinstance(source.records, indexed.IndexedDocuments)
        assert list(source.records) == want and _flags(source.records) == _flags(want), (split, piece_chars)
    assert len(want) > 4000 and sum(not last for _, last in _flags(want)) > 100   # long lines were cut
    copy = pickle.loads(pickle.dumps(source.records))                 # as Grain workers receive it
    assert copy[1234] == want[1234] and len(pickle.dumps(source.records)) < 2000   # paths, not documents


class ByteTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=False, add_eos=False):
        return [1] * add_bos + [3 + b for b in text.encode("utf-8")] + [2] * add_eos


def _batches(specs, n, state=None, **kw):
    from jaxllm.config import DataConfig
    from jaxllm.data.mixture import from_config
    from jaxllm.data.pipeline import lm_pipeline
    mixture, held = from_config(DataConfig(sources=tuple(specs), seq_len=64, piece_chars=200, **kw), seed=0)
    it = lm_pipeline(mixture, ByteTokenizer(), seq_len=64, batch_size=4, seed=3)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it.get_state(), held


def test_batches_from_a_streamed_source_equal_an_in_memory_one_and_resume_exactly(shared_data, tmp_path):
    records = [json.loads(line) for line in (shared_data / "text/en/c4_demo.jsonl").open(encoding="utf-8")][:120]
    (tmp_path / "c4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "c4.json").write_text(json.dumps(records), encoding="utf-8")   # a JSON array: read into a list
    streamed, _, held_s = _batches([str(tmp_path / "c4.jsonl")], 6)
    in_memory, _, held_m = _batches([str(tmp_path / "c4.json")], 6)
    assert list(held_s) == list(held_m) and len(held_m) > 0
    for a, b in zip(streamed, in_memory):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    _, state, _ = _batches([str(tmp_path / "c4.jsonl")], 3)
    resumed, _, _ = _batches([str(tmp_path / "c4.jsonl")], 3, state=json.loads(json.dumps(state)))
    for a, b in zip(resumed, streamed[3:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_index_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, index_dir):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert open_source(str(path), text_split="line").records == ["one", "two"]
    built = sorted(index_dir.iterdir())
    stamps = [p.stat().st_mtime_ns for p in built]
    assert open_source(str(path), text_split="line").records == ["one", "two"]
    assert sorted(index_dir.iterdir()) == built and [p.stat().st_mtime_ns for p in built] == stamps   # reused
    path.write_text("one\nsix\n", encoding="utf-8")                   # same size: the modification time tells
    os.utime(path, ns=(stamps[0] + 10**9, stamps[0] + 10**9))
    assert open_source(str(path), text_split="line").records == ["one", "six"]
    path.write_text("one\nsix\nseven\n", encoding="utf-8")
    assert open_source(str(path), text_split="line").records == ["one", "six", "seven"]


_READ_SOURCE = """
import sys
mode, path = sys.argv[1:]
if mode == "streamed":
    from jaxllm.data.sources import open_source
    docs = open_source(path, text_split="line").records
else:   # the in-memory reader the streamed one replaces: every line a str
    docs = open(path, encoding="utf-8").read().split("\\n")
chars = sum(len(d) for d in docs)
"""
# Peak RSS: VmHWM, not getrusage's ru_maxrss, which Linux carries over from the forking parent (pytest, far
# larger) across exec.
_PRINT_PEAK = """
print(int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024)
"""


def peak_rss(script: str, *args, env) -> int:
    """Peak resident memory, in bytes, of a fresh Python process running `script` with `args`."""
    out = subprocess.run([sys.executable, "-c", script + _PRINT_PEAK, *map(str, args)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-1])


def generated_text(path, megabytes: int) -> None:
    """Lines of about 1000 characters of real words (Python's documentation), numbered so none repeats."""
    from pydoc_data.topics import topics
    words = " ".join(topics.values()).split()
    rng = np.random.default_rng(0)
    block = [" ".join(words[i:i + 160]) for i in rng.integers(0, len(words) - 160, 200)]
    with open(path, "w", encoding="utf-8") as f:
        for k in range(megabytes * 1024 * 1024 // (sum(map(len, block)) + 2000) + 1):
            f.write("".join(f"{k}.{j} {line}\n" for j, line in enumerate(block)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from Linux's /proc")
def test_streamed_source_peak_memory_stays_flat_as_the_file_grows_tenfold(tmp_path, index_dir):
    env = {**os.environ, "PYTHONPATH": REPO, "JAXLLM_INDEX_DIR": str(index_dir)}
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    generated_text(small, 3)
    generated_text(large, 30)
    grown = large.stat().st_size - small.stat().st_size
    streamed = peak_rss(_READ_SOURCE, "streamed", large, env=env) - peak_rss(_READ_SOURCE, "streamed", small, env=env)
    in_memory = (peak_rss(_READ_SOURCE, "in_memory", large, env=env)
                 - peak_rss(_READ_SOURCE, "in_memory", small, env=env))
    print(f"peak RSS growth for {grown / 2**20:.0f} MiB more text: streamed {streamed / 2**20:.1f} MiB, "
          f"in memory {in_memory / 2**20:.1f} MiB")
    assert in_memory > grown                  # the measurement sees a corpus held in memory ...
    assert streamed < 4 * 2**20               # ... and the streamed reader holds none (its index: ~25 B a line)


def test_a_source_in_an_s3_bucket_gives_the_local_documents_and_batches(shared_data, tmp_path, s3_bucket):
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    local = tmp_path / "corpus"
    local.mkdir()
    lines = (shared_data / "text/en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    (local / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (local / "b.txt").write_text((shared_data / "text/en/botchan.txt").read_text(encoding="utf-8")[:20000],
                                 encoding="utf-8")
    pq.write_table(pa.table({"text": [json.loads(x)["text"] for x in lines[:30]]}), local / "c.parquet",
                   row_group_size=7)
    s3 = boto3.client("s3")
    for f in sorted(local.iterdir()):
        s3.upload_file(str(f), s3_bucket[len("s3://"):], f"corpus/{f.name}")
    remote = open_source(f"{s3_bucket}/corpus", text_split="paragraph", piece_chars=300)
    here = open_source(str(local), text_split="paragraph", piece_chars=300)
    assert len(remote) == len(here) > 100
    assert list(remote.records) == list(here.records) and remote.skipped == here.skipped
    for a, b in zip(_batches([f"{s3_bucket}/corpus"], 2)[0], _batches([str(local)], 2)[0]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
