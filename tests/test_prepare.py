"""prepare: token shards equal on-the-fly tokenisation, parallel and resumable (finished shards kept,
damaged ones rebuilt), tokenizer identity enforced, training reads them shuffled; plan reads their counts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxllm.cli import main as jaxllm_main
from jaxllm.data import Component, Mixture, lm_pipeline, load_documents, open_source
from jaxllm.data.prepare import prepare
from jaxllm.data.records import open_prepared
from jaxllm.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"   # as in conftest.py


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data_dir):
    """A Chinese novel excerpt (CRLF, real), an English novel, and Python's documentation (a built-in)."""
    tmp = tmp_path_factory.mktemp("raw")
    novel = (shared_data_dir / "text/zh/novels/hongloumeng.txt").read_bytes().split(b"\r\n")[:300]
    (tmp / "hlm.txt").write_bytes(b"\r\n".join(novel))
    return [str(tmp / "hlm.txt"), str(shared_data_dir / "text/en/botchan.txt"), "builtin:pydoc"]


@pytest.fixture(scope="module")
def shared_data_dir():
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def prepared(inputs, tokenizer_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "p")
    manifest = prepare(inputs, tokenizer_path, out, workers=2, docs_per_shard=1000)
    return out, manifest


def _shard_mtimes(out):
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith("array_record")}


def test_shards_hold_the_tokens_of_every_document_in_order(prepared, inputs, tokenizer_path):
    out, manifest = prepared
    docs = load_documents(inputs, text_split="line")   # prepare's default (the library's is now "file")
    tok = Tokenizer(tokenizer_path)
    records, _ = open_prepared(out, tok)
    assert manifest["documents"] == len(records) == len(docs)
    assert [s["input"] for s in manifest["shards"]] == inputs[:2] + ["builtin:pydoc"] * 3   # 2608 docs / 1000
    for i in range(0, len(docs), 97):
        np.testing.assert_array_equal(records[i], tok.encode(docs[i]))
    assert manifest["tokens"] == sum(len(records[i]) for i in range(len(records)))
    assert manifest["tokenizer"]["sha256"] and os.path.exists(os.path.join(out, "job.json"))


def test_rerun_keeps_finished_shards_and_rebuilds_damaged_ones(prepared, inputs, tokenizer_path):
    out, manifest = prepared
    before = _shard_mtimes(out)
    assert prepare(inputs, tokenizer_path, out, workers=1, docs_per_shard=1000) == manifest   # nothing to do
    assert _shard_mtimes(out) == before
    # A crash between a shard and its index, and a shard truncated after the fact.
    os.remove(os.path.join(out, "shard-00001.json"))
    damaged = os.path.join(out, "shard-00003.tokens.array_record")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    with pytest.raises(ValueError, match=r"shard-00003\.tokens\.array_record is damaged.*bytes on disk"):
        open_prepared(out)   # training refuses it
    again = prepare(inputs, tokenizer_path, out, workers=2, docs_per_shard=1000)
    after = _shard_mtimes(out)
    rebuilt = {n for n in before if after[n] != before[n]}
    assert rebuilt == {"shard-00001.tokens.array_record", "shard-00003.tokens.array_record"}
    assert again == manifest
    open_prepared(out)


def test_another_tokenizer_is_an_error_naming_both(prepared, inputs, shared_data_dir, tokenizer_path):
    out, _ = prepared
    other = str(shared_data_dir / "tokenizers/sentencepiece_test/test_model.model")
    with pytest.raises(ValueError, match=r"prepared with tokenizer .*tokenizer\.model.*this run uses .*test_model"):
        open_prepared(out, Tokenizer(other))
    with pytest.raises(ValueError, match=r"written by tokenizer .*tokenizer\.model.*not .*test_model"):
        prepare(inputs, other, out, workers=1, docs_per_shard=1000)


def test_unfinished_directory_is_rejected_for_training(tmp_path, prepared):
    out, _ = prepared
    half = tmp_path / "half"
    half.mkdir()
    os.link(os.path.join(out, "shard-00000.tokens.array_record"), half / "shard-00000.tokens.array_record")
    with pytest.raises(ValueError, match="prepared token shard.*no prepared.json"):
        open_source(str(half))


def test_training_reads_prepared_shards_globally_shuffled(prepared, tokenizer_path):
    out, manifest = prepared
    tok = Tokenizer(tokenizer_path)
    source = open_source(out, tokenizer=tok)
    assert source.kind == "tokens" and source.tokens == manifest["tokens"]
    records = source.records
    shard_of = {}
    start = 0
    for k, shard in enumerate(manifest["shards"]):
        for i in range(start, start + shard["records"]):
            shard_of.setdefault(tuple(records[i].tolist()), k)
        start += shard["records"]
    m = Mixture((Component("prepared", records),))
    it = lm_pipeline(m, tok, seq_len=128, batch_size=4, seed=0)
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in [next(it) for _ in range(20)]])
    starts = np.flatnonzero(stream == tok.bos_id)
    docs = [tuple(stream[s + 1:e - 1].tolist()) for s, e in zip(starts, starts[1:])]   # between bos and eos
    shards = {shard_of[d] for d in docs if d in shard_of}
    assert len(shards) >= 3   # documents from all over the data, not the first shard in order


def test_plan_counts_prepared_and_samples_text(prepared, tokenizer_path, shared_data_dir, capsys):
    out, manifest = prepared
    botchan = str(shared_data_dir / "text/en/botchan.txt")
    code = jaxllm_main(["data", "plan", "--config=configs/pretrain.py", f"--config.data.sources=('{out}','{botchan}')",
                        "--config.data.weights=(0.5,0.5)", "--config.train.steps=1000", "--config.train.batch_size=8",
                        "--config.data.seq_len=256", f"--tokenizer={tokenizer_path}", "--sample=200"])
    assert code == 0
    text = capsys.readouterr().out
    lines = {l.split()[0]: l for l in text.splitlines() if l.split() and l.split()[0] in ("p", "botchan")}
    run_tokens = 1000 * 8 * 256
    expected = (manifest["tokens"] + 2 * manifest["documents"]) * 0.99   # bos/eos added, eval share held out
    epochs = float(lines["p"].split()[-1])
    assert epochs == pytest.approx(run_tokens * 0.5 / expected, rel=0.01)   # counted, not estimated
    assert "~" in lines["botchan"] and "~" not in lines["p"]
    assert "WARNING: botchan" in text and "repeated" in text


def test_prepare_and_clean_commands(tmp_path, tokenizer_path, shared_data_dir, capsys):
    src = str(shared_data_dir / "text/en/c4_demo.jsonl")
    assert jaxllm_main(["data", "clean", f"--input={src}", f"--out={tmp_path / 'clean'}", "--lang=en"]) == 0
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report["docs_in"] == 300 and 0 < report["docs_out"] < 300
    assert jaxllm_main(["data", "prepare", f"--input={tmp_path / 'clean'}", f"--tokenizer={tokenizer_path}",
                        f"--out={tmp_path / 'prep'}", "--workers=1"]) == 0
    assert f"{report['docs_out']:,} documents" in capsys.readouterr().out
    assert jaxllm_main(["data", "prepare", "--input=/nonexistent/dir", f"--tokenizer={tokenizer_path}",
                        f"--out={tmp_path / 'x'}"]) == 1   # a clear error, no traceback
    assert "no such file or directory" in capsys.readouterr().err
