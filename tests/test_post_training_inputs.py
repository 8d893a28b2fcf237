"""What a user sees when post-training input is wrong, through `jaxllm train`: records of the wrong type, no
init_from, preference pairs that are empty, identical or too long. Each test checks the exit status and the
message, and that what was skipped was counted."""
from __future__ import annotations

import json
import re

import jax
import pytest

from jaxllm.weights import save_params
from jaxllm.cli import main
from jaxllm.config import ModelConfig
from jaxllm.data.chat_pipeline import encode_pairs
from jaxllm.data.formats import load_pairs
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import train_tokenizer

WORDS = ["好", "不", "质量", "很", "推荐", "太差", "满意", "退货", "评论", "正面", "负面", "good", "bad", "fine"]
SMALL = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)   # fast to compile
FAST = ["--config.train.steps=2", "--config.train.batch_size=4", "--config.train.log_every=1",
        "--config.train.eval_batches=1", "--config.train.save_every=0", "--config.train.async_checkpointing=false",
        "--config.data.seq_len=64", "--config.data.eval_fraction=0.2"]


def sentence(i: int, n: int = 6) -> str:
    return "".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random decoder saved as a checkpoint carrying its tokenizer."""
    out = tmp_path_factory.mktemp("base")
    tok = train_tokenizer([sentence(i, 12) for i in range(300)], out_dir=str(out / "tok"), vocab_size=320,
                          character_coverage=1.0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, **SMALL)
    return save_params(str(out / "ckpt"), init_params(cfg, jax.random.key(0)), cfg, tok.path), tok


def train_cli(capsys, config: str, workdir, *overrides: str) -> tuple[int, str]:
    rc = main(["train", f"--config={config}", f"--config.workdir={workdir}", *FAST, *overrides])
    return rc, capsys.readouterr().err


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return str(path)


def test_sft_field_of_the_wrong_type_is_a_file_line_error_or_skipped_and_counted(tmp_path, capsys, base):
    ckpt, _ = base
    good = [{"instruction": sentence(i), "output": sentence(i + 1)} for i in range(12)]
    bad = [{"instruction": "q", "output": 12345},                    # line 13
           {"instruction": None, "output": "a"},                     # line 14
           {"instruction": "q", "input": ["a", "list"], "output": "a"},
           "[1, 2]"]                                                  # not an object
    records = write_jsonl(tmp_path / "sft.jsonl", good + bad)
    rc, err = train_cli(capsys, "sft", tmp_path / "raise", f"--config.init_from={ckpt}",
                        f"--config.data.train={records}")
    assert rc == 1 and "Traceback" not in err
    assert "sft.jsonl:13: field 'output' must be text, got int 12345" in err

    rc, err = train_cli(capsys, "sft", tmp_path / "skip", f"--config.init_from={ckpt}",
                        f"--config.data.train={records}", "--config.data.on_error=skip")
    assert rc == 0, err
    assert "12 kept" in err
    for reason, line in (("field 'output' is not text", 13), ("field 'instruction' is not text", 14),
                         ("field 'input' is not text", 15), ("not a JSON object", 16)):
        assert f"1 {reason} (first at {records}:{line})" in err
    assert (tmp_path / "skip" / "checkpoints").is_dir()


@pytest.mark.parametrize("config", ["sft", "reward", "dpo"])
def test_post_training_without_init_from_is_refused_with_how_to_start(tmp_path, capsys, config):
    records = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    rc, err = train_cli(capsys, config, tmp_path / "run", f"--config.data.train={records}")
    assert rc == 1 and "Traceback" not in err
    assert f"objective {config!r} fine-tunes a trained model: set --config.init_from=" in err
    assert "--config.init_from=scratch" in err
    assert not (tmp_path / "run").exists()                      # refused before anything was written


def test_init_from_scratch_trains_sft_from_random_weights_and_dpo_refuses_it(tmp_path, capsys, base):
    _, tok = base
    records = write_jsonl(tmp_path / "sft.jsonl",
                          [{"instruction": sentence(i), "output": sentence(i + 1)} for i in range(12)])
    rc, err = train_cli(capsys, "sft", tmp_path / "sft", "--config.init_from=scratch", f"--config.tokenizer={tok.path}",
                        f"--config.data.train={records}", *(f"--config.model.{k}={v}" for k, v in SMALL.items()))
    assert rc == 0, err
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["init_from"] == "scratch"   # said, and kept
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    rc, err = train_cli(capsys, "dpo", tmp_path / "dpo", "--config.init_from=scratch", f"--config.tokenizer={tok.path}",
                        f"--config.data.train={pairs}")
    assert rc == 1 and "DPO from random weights has no reference" in err and "Traceback" not in err


@pytest.mark.parametrize("config", ["dpo", "reward"])
def test_no_usable_pair_names_each_cause_with_its_count(tmp_path, capsys, base, config):
    ckpt, _ = base
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "  "},
        {"prompt": "p", "chosen": "", "rejected": ""},
        {"prompt": "p", "chosen": 7, "rejected": "b"}])
    rc, err = train_cli(capsys, config, tmp_path / "run", f"--config.init_from={ckpt}",
                        f"--config.data.train={pairs}", "--config.data.on_error=skip")
    assert rc == 1 and "Traceback" not in err
    assert f"no preference pair left in {pairs}" in err
    for cause in (f"2 chosen identical to rejected (first at {pairs}:1)", "1 empty chosen (first at",
                  "1 empty rejected (first at", "1 empty chosen and rejected", "1 field 'chosen' is not text"):
        assert cause in err
    assert "seq_len" not in err.split("error:")[-1]             # none was too long: no such hint


def test_dpo_warns_when_many_pairs_are_too_long_and_suggests_a_seq_len_keeping_95_percent(tmp_path, capsys, base):
    ckpt, tok = base
    records = [{"prompt": sentence(i), "chosen": sentence(i + 1, 3 + i % 5), "rejected": sentence(i + 2, 4)}
               for i in range(28)]
    rare = lambda i, n: "".join(chr(0x4E00 + (i * 37 + k * 11) % 3000) for k in range(n))   # noqa: E731
    records += [{"prompt": sentence(i), "chosen": rare(i, 20 + 2 * i), "rejected": sentence(i, 4)}
                for i in range(12)]   # 30% with answers longer than seq_len=64 (unseen characters: 3 bytes each)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    rc, err = train_cli(capsys, "dpo", tmp_path / "run", f"--config.init_from={ckpt}", f"--config.data.train={pairs}",
                        "--config.data.template=chat", "--config.data.eval_fraction=0.0",
                        f"--config.data.eval={pairs}")
    assert rc == 0, err
    found = re.search(r"WARNING (\d+) of 40 preference pairs \([\d.]+%\) are too long for data.seq_len=64 "
                      r"\(overlong=truncate_prompt\); data.seq_len=(\d+) would keep 95%", err)
    assert found, err
    too_long, suggested = int(found.group(1)), int(found.group(2))
    assert too_long >= 4
    # The suggestion is the smallest seq_len that keeps 95%, from the real encoded lengths.
    loaded = load_pairs(pairs)
    kept = lambda n: len(encode_pairs(loaded, tok, template="chat", seq_len=n))   # noqa: E731
    assert kept(suggested) >= 0.95 * 40 > kept(suggested - 1)
    assert re.search(r"DPO reference log-probabilities: \d+ pairs in [\d.]+s", err)   # progress of the long pass
