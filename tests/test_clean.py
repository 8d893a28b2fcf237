"""Cleaning: each filter on crafted good and bad documents in English and Chinese, script-based language
detection, dedup recall/precision on a benchmark built from real novels and English text, and Beam's
in-process runner giving the same output as the local path."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxllm.data import dedup
from jaxllm.data.clean import CleanOptions, clean, clean_local, read_output
from jaxllm.data.filters import FILTERS, FilterConfig, detect_language, first_failure, units

EN_GOOD = (
    "The library opened a new reading room in the spring. Visitors can borrow books for three weeks, and the staff "
    "will help anyone who wants to find an old newspaper or a map of the town. On Saturdays there is a short talk "
    "about local history, followed by tea in the garden. Last month a retired teacher spoke about the river and the "
    "mills that once stood along its banks. Many families came with their children, and the room was full.")
ZH_GOOD = (
    "春天的时候，图书馆新开了一间阅览室。读者可以借书三个星期，工作人员也会帮助想查找旧报纸或者本地地图的人。"
    "每个星期六都有一场关于地方历史的小讲座，之后大家在花园里喝茶。上个月，一位退休的老师讲了这条河和河边曾经的磨坊。"
    "很多家庭带着孩子来听，阅览室里坐得满满的。")
CFG = FilterConfig()

BAD = {  # filter -> (English, Chinese) documents that break it
    "length": ("Too short to be a document.", "太短了，不是文章。"),
    "word_length": (" ".join(["Incomprehensibilities"] * 60) + ".",
                    "图书馆新开了阅览室读者可以借书三个星期工作人员会帮助想查找旧报纸或者本地地图的人" * 4 + "。"),
    "symbols": (EN_GOOD + " #news" * 20, ZH_GOOD + "#热点#" * 30),
    "bullets_ellipsis": ("\n".join(["• " + s for s in EN_GOOD.split(". ")]),
                         "\n".join(["这一段话还没有说完……"] * 8 + [ZH_GOOD])),
    "alpha": (EN_GOOD[:200] + " " + " ".join(str(i * 7919) for i in range(80)) + ".",
              ZH_GOOD[:60] + " ".join(str(i * 7919) for i in range(200)) + "。"),
    "stop_words": (" ".join(["Apples, pears, plums, grapes, melons, lemons, cherries, peaches."] * 2 +
                            ["Cars, trains, buses, boats, planes, bikes, vans, trucks, ships."] * 2 +
                            ["Red, blue, green, yellow, purple, orange, pink, brown, grey."] * 2),
                   "苹果香蕉葡萄西瓜桃子，梨子樱桃草莓柠檬芒果。汽车火车公交轮船飞机，自行车卡车货船。红色蓝色绿色黄色紫色，"
                   "橙色粉色棕色灰色黑色。春夏秋冬，东南西北，山川河流湖泊海洋。"),
    "repetition": ("\n".join(["Buy cheap watches online today, best prices guaranteed for the whole family."] * 12),
                   "\n".join(["今天在线购买便宜的手表，全家都能享受最优惠的价格，欢迎大家来看。"] * 12)),
    "terminal_punct": ("\n".join(s.rstrip(".") for s in EN_GOOD.split(". ")),
                       "\n".join(s for s in ZH_GOOD.split("。") if s)),
    "boilerplate": (EN_GOOD + "\nPrivacy Policy\nTerms of Use\nLog in\nSubscribe to our newsletter\nCookie settings",
                    ZH_GOOD + "\n版权所有\n免责声明\n登录\n注册\n上一篇\n下一篇"),
}

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"   # as in conftest.py


@pytest.mark.parametrize("lang, text", [("en", EN_GOOD), ("zh", ZH_GOOD)])
def test_good_documents_pass_every_filter(lang, text):
    assert detect_language(text) == lang
    assert first_failure(text, lang) is None


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_each_filter_removes_its_bad_document(name, lang):
    text = BAD[name][0 if lang == "en" else 1]
    assert detect_language(text) == lang
    reason = FILTERS[name](text, lang, units(text, lang), CFG)
    assert reason is not None, f"{name} kept a bad {lang} document"
    good = EN_GOOD if lang == "en" else ZH_GOOD
    assert FILTERS[name](good, lang, units(good, lang), CFG) is None


def test_language_detection_by_script_and_the_language_filter():
    assert detect_language("吾輩は猫である。名前はまだ無い。") == "ja"
    assert detect_language("Привет, как дела?") == "ru"
    assert detect_language("12345 !!!") == "unknown"
    assert first_failure(ZH_GOOD, "en") == ("language", "detected zh")
    assert first_failure(EN_GOOD, "zh") == ("language", "detected en")


def test_chinese_units_are_characters():
    assert units("我们在2024年去了Beijing。", "zh") == ["我", "们", "在", "2024", "年", "去", "了", "Beijing"]


# ------------------------------------------------------------------------------------ dedup benchmark

def _passages(shared_data, per_source: int) -> list[str]:
    """Distinct real passages: ~300 characters of each Chinese novel, ~120 words of English text."""
    from jaxllm.data.sources import load_documents
    out = []
    for novel in ("hongloumeng", "xiyouji", "sanguoyanyi"):
        lines = load_documents([str(shared_data / f"text/zh/novels/{novel}.txt")], text_split="line")
        chunks, cur = [], ""
        for line in lines[50:]:
            cur += line
            if len(cur) >= 300:
                chunks.append(cur)
                cur = ""
        out += chunks[::max(1, len(chunks) // per_source)][:per_source]
    for name in ("wiki_demo.txt", "botchan.txt", "tinyshakespeare.txt"):
        words = " ".join(load_documents([str(shared_data / f"text/en/{name}")])).split()
        chunks = [" ".join(words[i:i + 120]) for i in range(0, len(words) - 120, 120)]
        out += chunks[::max(1, len(chunks) // per_source)][:per_source]
    return out


def _edited_copy(text: str, rng, target: float = 0.8) -> tuple[str, float]:
    """A copy with ~1-2% of its characters (Chinese) or words (English) replaced, deleted or inserted,
    whose shingle Jaccard to the original is >= target."""
    cjk = detect_language(text) == "zh"
    for rate in (0.02, 0.015, 0.01, 0.005):
        pieces = list(text) if cjk else text.split()
        for _ in range(max(1, round(rate * len(pieces)))):
            i = int(rng.integers(len(pieces)))
            op = rng.integers(3)
            donor = pieces[int(rng.integers(len(pieces)))]
            if op == 0:
                pieces[i] = donor
            elif op == 1 and len(pieces) > 2:
                del pieces[i]
            else:
                pieces.insert(i, donor)
        copy = "".join(pieces) if cjk else " ".join(pieces)
        j = dedup.jaccard(dedup.shingles(text), dedup.shingles(copy))
        if j >= target and copy != text:
            return copy, j
    raise AssertionError("could not make an edited copy")


@pytest.fixture(scope="module")
def dedup_benchmark(request):
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    rng = np.random.default_rng(0)
    originals = _passages(SHARED_DATA, 60)                      # 360 distinct passages, zh and en
    near = [(i, *_edited_copy(originals[i], rng)) for i in range(0, len(originals), 3)]
    exact = [(i, "  " + originals[i].upper().replace("，", ",") + " ") for i in range(1, len(originals), 12)]
    return originals, near, exact


def test_dedup_finds_edited_copies_keeps_distinct_and_removes_exact(dedup_benchmark):
    originals, near, exact = dedup_benchmark
    assert len(originals) == 360 and min(j for _, _, j in near) >= 0.8
    docs = [((0, i), t) for i, t in enumerate(originals)]
    docs += [((1, k), copy) for k, (_, copy, _) in enumerate(near)]
    docs += [((2, k), copy) for k, (_, copy) in enumerate(exact)]
    opts = CleanOptions(skip_filters=tuple(FILTERS))           # dedup only
    kept, report = clean_local(docs, opts)
    kept_ids = {doc_id for doc_id, _ in kept}
    recall = np.mean([(1, k) not in kept_ids for k in range(len(near))])
    distinct_kept = np.mean([(0, i) in kept_ids for i in range(len(originals))])
    assert recall >= 0.95, recall
    assert distinct_kept >= 0.99, distinct_kept
    assert all((2, k) not in kept_ids for k in range(len(exact)))  # exact copies: always
    assert report["removed"]["exact_dup"]["docs"] == len(exact)
    ex = report["removed"]["near_dup"]["examples"][0]
    assert ex["id"][0] == 1 and ex["duplicate_of"][0] == 0 and ex["why"].startswith("jaccard")
    print(f"dedup benchmark: recall {recall:.3f}, distinct kept {distinct_kept:.3f}, "
          f"{len(near)} edited copies (Jaccard {min(j for _, _, j in near):.2f}-{max(j for _, _, j in near):.2f})")


def test_band_choice_meets_recall_at_the_threshold():
    bands, rows = dedup.choose_bands(128, 0.8)
    assert 1 - (1 - 0.8 ** rows) ** bands >= 0.995 and bands * rows <= 128
    a = dedup.shingles("the quick brown fox jumps over the lazy dog again and again", k=3)
    assert dedup.jaccard(a, a) == 1.0 and dedup.jaccard(a, dedup.shingles("unrelated words here", k=3)) == 0.0


# --------------------------------------------------------------------------------------- the command

def _raw_inputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "en.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [
        EN_GOOD, BAD["repetition"][0], EN_GOOD.replace("spring", "summer"), BAD["length"][0],
        EN_GOOD.upper(), BAD["boilerplate"][0]]) + "\n", encoding="utf-8")
    zh_docs = [ZH_GOOD, BAD["terminal_punct"][1], ZH_GOOD.replace("春天", "夏天"), ZH_GOOD, BAD["symbols"][1]]
    (raw / "zh.txt").write_text("\n\n".join(zh_docs) + "\n", encoding="utf-8")
    return raw


def test_clean_local_report_counts_every_document(tmp_path):
    raw = _raw_inputs(tmp_path)
    report = clean([str(raw)], str(tmp_path / "out"), CleanOptions(text_split="paragraph"))
    kept = read_output(str(tmp_path / "out"))
    assert report["docs_in"] == 11 and report["docs_out"] == len(kept) == 2   # one English, one Chinese
    removed = report["removed"]
    assert report["docs_in"] == report["docs_out"] + sum(r["docs"] for r in removed.values())
    assert removed["exact_dup"]["docs"] == 2 and removed["near_dup"]["docs"] == 2
    assert {"repetition", "length", "terminal_punct", "symbols"} <= set(removed)   # first rule broken
    assert json.loads((tmp_path / "out" / "report.json").read_text())["docs_out"] == 2
    zh_only = clean([str(raw)], str(tmp_path / "zh"), CleanOptions(text_split="paragraph", lang="zh"))
    assert zh_only["removed"]["language"]["docs"] == 6


def test_beam_direct_runner_gives_the_local_output(tmp_path):
    pytest.importorskip("apache_beam")
    raw = _raw_inputs(tmp_path)
    opts = CleanOptions(text_split="paragraph")
    local = clean([str(raw)], str(tmp_path / "local"), opts)
    beam = clean([str(raw)], str(tmp_path / "beam"), opts, runner="DirectRunner",
                 pipeline_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    assert read_output(str(tmp_path / "beam")) == read_output(str(tmp_path / "local"))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("runner", "seconds")}   # noqa: E731
    assert strip(beam) == strip(local)


def test_beam_multiprocess_runner_splits_files_and_gives_the_local_output(shared_data, tmp_path):
    """Two worker processes, files read in 64 KiB ranges (so lines, JSON records and Parquet row groups are split
    across tasks), copies across files, and a file with a bad byte deep inside: the local output and report."""
    pytest.importorskip("apache_beam")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    raw = tmp_path / "raw"
    raw.mkdir()
    c4 = shared_data / "text/en/c4_demo.jsonl"
    records = [json.loads(line) for line in c4.open(encoding="utf-8")]
    with open(raw / "copies.jsonl", "w", encoding="utf-8") as f:
        for r in records[:40]:                                      # an exact and a near copy of each
            words = r["text"].split()
            words[len(words) // 2] = "zebra"
            f.write(json.dumps({"text": r["text"].upper()}) + "\n" + json.dumps({"text": " ".join(words)}) + "\n")
    pq.write_table(pa.table({"text": [r["text"] for r in records[100:300]]}), raw / "rows.parquet",
                   row_group_size=25)
    book = (shared_data / "text/en/botchan.txt").read_bytes()
    (raw / "latin1.txt").write_bytes(book[:200_000] + "café\n".encode("latin-1") + book)   # CRLF line ends
    inputs = [str(c4), str(shared_data / "text/en/botchan.txt"), str(raw)]
    opts = CleanOptions(read_bytes=64 << 10)
    local = clean(inputs, str(tmp_path / "local"), opts)
    beam = clean(inputs, str(tmp_path / "beam"), opts, runner="DirectRunner",
                 pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    kept = read_output(str(tmp_path / "local"))
    assert read_output(str(tmp_path / "beam")) == kept and len(kept) > 200
    strip = lambda r: {k: v for k, v in r.items() if k not in ("runner", "seconds")}   # noqa: E731
    assert strip(beam) == strip(local)
    assert local["removed"]["exact_dup"]["docs"] >= 40 and local["removed"]["near_dup"]["docs"] >= 30
    [bad] = local["unreadable_files"]
    line = book[:200_000].count(b"\n") + 1                      # found by the task reading that range, counted
    assert bad["reason"] == "not_utf8" and f"latin1.txt:{line}: not valid UTF-8" in bad["error"]


def test_beam_reads_and_writes_an_s3_bucket_through_its_filesystems(shared_data, tmp_path, s3_bucket):
    """Input listed and read, shards and report written, all through Beam's FileSystems on a real S3 server on
    loopback: the documents and report of the local runner on the same files."""
    pytest.importorskip("apache_beam")
    import boto3
    from jaxllm.data.clean import read_output
    bucket, s3 = s3_bucket[len("s3://"):], boto3.client("s3")
    raw = tmp_path / "raw"
    raw.mkdir()
    c4 = (shared_data / "text/en/c4_demo.jsonl").open(encoding="utf-8").readlines()
    (raw / "a.jsonl").write_text("".join(c4[:60]), encoding="utf-8")
    (raw / "b.txt").write_bytes((shared_data / "text/en/botchan.txt").read_bytes()[:60_000])
    for f in sorted(raw.iterdir()):
        s3.upload_file(str(f), bucket, f"raw/{f.name}")
    opts = CleanOptions()                     # one read task a file: ranges are the multi-process test's (S3 is slow)
    local = clean([str(raw)], str(tmp_path / "local"), opts)
    remote = clean([f"{s3_bucket}/raw"], f"{s3_bucket}/out", opts, runner="DirectRunner",
                   pipeline_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("runner", "seconds", "inputs")}   # noqa: E731
    assert strip(remote) == strip(local) and local["docs_out"] > 50
    names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert "out/report.json" in names and json.loads(s3.get_object(Bucket=bucket, Key="out/report.json")["Body"]
                                                     .read())["docs_out"] == local["docs_out"]
    kept = sorted((tuple(r["id"]), r["text"]) for name in names if name.startswith("out/clean-")
                  for r in map(json.loads, s3.get_object(Bucket=bucket, Key=name)["Body"].read().splitlines()))
    assert kept == read_output(str(tmp_path / "local"))


_READ_FILE = """
import os, sys
mode, path = sys.argv[1:]
from jaxllm.data.clean import CleanOptions, read_file
if mode == "beam":   # one Beam read task over the whole file, as a worker runs it
    from apache_beam.io.range_trackers import OffsetRangeTracker
    from jaxllm.data.clean_beam import _document_source
    source = _document_source(CleanOptions())(path)
    n = sum(1 for _ in source.read_records(path, OffsetRangeTracker(0, os.path.getsize(path))))
else:                # the local runner, which holds a file's documents
    n = len(read_file((0, path), CleanOptions())[0])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from Linux's /proc")
def test_beam_read_task_memory_stays_flat_as_a_file_grows_tenfold(tmp_path):
    pytest.importorskip("apache_beam")
    from tests.test_indexed import REPO, generated_text, peak_rss
    env = {**os.environ, "PYTHONPATH": REPO}
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    generated_text(small, 3)
    generated_text(large, 30)
    grown = large.stat().st_size - small.stat().st_size
    task = peak_rss(_READ_FILE, "beam", large, env=env) - peak_rss(_READ_FILE, "beam", small, env=env)
    whole = peak_rss(_READ_FILE, "local", large, env=env) - peak_rss(_READ_FILE, "local", small, env=env)
    print(f"peak RSS growth for {grown / 2**20:.0f} MiB more text: Beam read task {task / 2**20:.1f} MiB, "
          f"whole file {whole / 2**20:.1f} MiB")
    assert whole > grown and task < 4 * 2**20
