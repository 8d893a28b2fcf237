"""`jaxllm data clean | prepare`, `jaxllm train` and `jaxllm tokenizer train` on awkward inputs, as a user runs
them: unreadable files are skipped and counted (or abort with --strict), `.json` arrays of records (the
chinese-poetry layout) are sources everywhere, and the long phases log progress."""
from __future__ import annotations

import json
import os

import pytest

from jaxllm.cli import main
from jaxllm.data import load_documents

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
POEMS = [{"author": "李白", "title": "静夜思", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
         {"author": "王之涣", "title": "登鹳雀楼", "paragraphs": ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]},
         {"author": "孟浩然", "title": "春晓", "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]}]
PROSE = ("春天来了，河边的柳树发出了新芽，孩子们在草地上放风筝，老人们坐在树下聊天。"
         "Spring came to the valley, and the farmers walked out to their fields early in the morning.")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def messy_dir(tmp_path):
    """Good text beside an empty file, a Latin-1 file, a pretty-printed report and a JSONL file with a bad line."""
    d = tmp_path / "raw"
    d.mkdir()
    (d / "a_good.txt").write_text(PROSE + "\n" + PROSE.replace("春天", "秋天") + "\n", encoding="utf-8")
    (d / "b_empty.txt").write_text("")
    (d / "c_latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (d / "d_records.jsonl").write_text("\n".join([json.dumps({"text": PROSE[::-1]}, ensure_ascii=False), "not json",
                                                  json.dumps({"paragraphs": [PROSE, PROSE[:20]]}, ensure_ascii=False)]),
                                       encoding="utf-8")
    (d / "poems.json").write_text(json.dumps(POEMS, ensure_ascii=False, indent=2), encoding="utf-8")
    return d


def test_clean_skips_and_counts_unreadable_files_and_strict_aborts(tmp_path, capsys, messy_dir):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "data", "clean", f"--input={messy_dir}", f"--out={out}", "--jsonl_field=paragraphs",
                          "--min_units=5")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [(os.path.basename(u["file"]), u["reason"]) for u in report["unreadable_files"]] == [
        ("b_empty.txt", "no_documents"), ("c_latin1.txt", "not_utf8")]
    assert "c_latin1.txt:1: not valid UTF-8" in report["unreadable_files"][1]["error"]
    # One record of d_records.jsonl has no "paragraphs" and one line is no JSON: both counted.
    assert report["skipped_records"] == {"bad_json": 1, "missing_field": 1}
    assert report["docs_in"] == 2 + 1 + 3       # two lines of a_good.txt, one record, three poems
    assert "unreadable files skipped: 2 (1 no_documents, 1 not_utf8; --strict aborts instead)" in stdout
    assert "clean: read and filter: 5 files in" in err           # the progress summary of the long phase

    rc, _, err = run(capsys, "data", "clean", f"--input={messy_dir}", f"--out={tmp_path / 'strict'}", "--strict")
    assert rc == 1 and "Traceback" not in err
    assert "b_empty.txt' yielded no documents" in err


def test_clean_with_beam_reports_the_same_unreadable_files(tmp_path, messy_dir):
    pytest.importorskip("apache_beam")
    from jaxllm.data.clean import CleanOptions, clean, read_output
    opts = CleanOptions(jsonl_field="paragraphs")
    local = clean([str(messy_dir)], str(tmp_path / "local"), opts)
    beam = clean([str(messy_dir)], str(tmp_path / "beam"), opts, runner="DirectRunner",
                 pipeline_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    assert read_output(str(tmp_path / "beam")) == read_output(str(tmp_path / "local"))
    for key in ("unreadable_files", "skipped_records", "docs_in", "docs_out"):
        assert beam[key] == local[key]


def test_json_array_of_poems_is_a_source_for_clean_prepare_and_train(tmp_path, capsys):
    poems = tmp_path / "poems.json"
    poems.write_text(json.dumps(POEMS, ensure_ascii=False, indent=2), encoding="utf-8")
    joined = ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"]
    assert load_documents([str(poems)], jsonl_field="paragraphs")[:1] == joined   # lines joined with newlines

    rc, _, err = run(capsys, "data", "clean", f"--input={poems}", f"--out={tmp_path / 'clean'}",
                     "--jsonl_field=paragraphs", "--min_units=5", "--skip_filters=terminal_punct")
    assert rc == 0, err
    kept = [json.loads(line)["text"] for line in (tmp_path / "clean" / "clean-00000-of-00001.jsonl").open()]
    assert joined[0] in kept

    rc, _, err = run(capsys, "tokenizer", "train", f"--input={poems}", "--jsonl_field=paragraphs",
                     f"--out={tmp_path / 'tok'}", "--vocab_size=330")
    assert rc == 0, err
    assert "tokenizer: reading text:" in err and "tokenizer: trained in" in err   # progress of the long phase
    tok = str(tmp_path / "tok" / "tokenizer.model")

    rc, stdout, err = run(capsys, "data", "prepare", f"--input={poems}", "--jsonl_field=paragraphs",
                          f"--tokenizer={tok}", f"--out={tmp_path / 'prep'}", "--workers=1")
    assert rc == 0, err
    assert "3 documents" in stdout and "shards in" in err

    workdir = tmp_path / "run"
    common = ["train", "--config=pretrain:model=tiny", f"--config.workdir={workdir}", f"--config.tokenizer={tok}",
              f"--config.data.sources={poems}", "--config.data.seq_len=32", "--config.model.num_layers=1",
              "--config.train.steps=1", "--config.train.batch_size=2", "--config.train.save_every=0",
              "--config.train.async_checkpointing=false", "--config.data.eval_fraction=0.34"]
    rc, _, err = run(capsys, *common)                            # the default field "text" is not there
    assert rc == 1 and "Traceback" not in err
    assert f"{poems}:2: field 'text' missing (fields: author, title, paragraphs; choose one with data.jsonl_field" in err
    rc, _, err = run(capsys, *common, "--config.data.jsonl_field=paragraphs")
    assert rc == 0, err


def test_a_json_report_beside_the_data_is_left_out_of_a_directory_source(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (d / "report.json").write_text(json.dumps({"docs_in": 2}, indent=1))
    assert load_documents([str(d)]) == ["one", "two"]
    with pytest.raises(ValueError, match="report.json: holds one JSON object, not records"):
        load_documents([str(d / "report.json")])                 # named on its own, it is an error


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "text", "zh", "chinese-poetry")),
                    reason="needs ../shared/data (chinese-poetry)")
def test_shared_chinese_poetry_loads_as_documents():
    tang = load_documents([os.path.join(SHARED, "text", "zh", "chinese-poetry", "quantangshi")],
                          jsonl_field="paragraphs")
    assert len(tang) == 3002 and all("\n" in d or len(d) < 40 for d in tang[:50])
