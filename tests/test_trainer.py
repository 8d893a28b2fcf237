"""End-to-end training on real text: resume is exact, the loss falls, failures are loud and named."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import CheckpointMismatchError
from jaxllm.weights import load_params
from jaxllm.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.metrics import read_metrics
from jaxllm.trainer import NonFiniteLossError, train


def run_config(workdir, corpus, tokenizer, **train_kw) -> Config:
    train_cfg = dict(steps=20, batch_size=4, log_every=1, eval_every=0, eval_batches=2, save_every=10,
                     async_checkpointing=False)
    train_cfg.update(train_kw)
    return Config(model=ModelConfig.preset("tiny", vocab_size=0, max_seq_len=64),
                  data=DataConfig(sources=(str(corpus),), seq_len=64, eval_fraction=0.05),
                  optim=OptimConfig(lr=3e-3, warmup_steps=5, decay_steps=50),  # horizon independent of train.steps
                  train=TrainConfig(**train_cfg), workdir=str(workdir), tokenizer=tokenizer).validate()


def losses(workdir) -> dict:
    return {r["step"]: r["train/loss"] for r in read_metrics(str(workdir / "metrics.jsonl")) if "train/loss" in r}


def test_resume_gives_identical_losses_and_parameters(tmp_path, english_corpus, tokenizer_path):
    straight = train(run_config(tmp_path / "a", english_corpus, tokenizer_path, steps=20))
    first = train(run_config(tmp_path / "b", english_corpus, tokenizer_path, steps=10))
    assert first["step"] == 10
    resumed = train(run_config(tmp_path / "b", english_corpus, tokenizer_path, steps=20))   # same workdir
    assert resumed["step"] == 20
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]          # bit-identical
    jax.tree.map(np.testing.assert_array_equal, straight["state"]["params"], resumed["state"]["params"])
    # The workdir is a complete checkpoint for later commands: params, model config and tokenizer.
    params, model_cfg, tok = load_params(str(tmp_path / "b"))
    assert model_cfg.vocab_size == 512 and tok.endswith("tokenizer.model")
    jax.tree.map(np.testing.assert_array_equal, params, resumed["state"]["params"])
    assert (tmp_path / "b" / "plots" / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["vocab_size"] == 512


def test_loss_falls_on_real_text_and_is_logged(tmp_path, english_corpus, tokenizer_path):
    result = train(run_config(tmp_path, english_corpus, tokenizer_path, steps=60, log_every=1, eval_every=30,
                              save_every=0))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[0] > 6.0                                 # about ln(512) at the start
    assert train_losses[-1] < train_losses[0] - 1.0                # measured: 6.25 -> 5.04
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "input_wait_frac"} <= set(rows[0])
    assert all(0.0 <= r["input_wait_frac"] < 1.0 for r in rows if "input_wait_frac" in r)
    assert result["eval/loss"] == evals[-1]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, english_corpus, tokenizer_path):
    cfg = run_config(tmp_path, english_corpus, tokenizer_path, steps=10, save_every=5)
    train(cfg)
    # Continue the same run with a learning rate so large that the loss overflows (a changed config: said so).
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e30, warmup_steps=0),
                              train=dataclasses.replace(cfg.train, steps=40, save_every=100), allow_config_change=True)
    with pytest.raises(NonFiniteLossError, match=r"at step (1[1-9]|[23]\d|40)"):
        train(bad)
    params, _, _ = load_params(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == 10


def test_checkpoint_with_other_shapes_lists_the_mismatches(tmp_path, english_corpus, tokenizer_path):
    cfg = run_config(tmp_path, english_corpus, tokenizer_path, steps=2)
    train(cfg)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_dim=256),
                                train=dataclasses.replace(cfg.train, steps=4))
    with pytest.raises(ConfigError, match=r"model.mlp_dim: 192 -> 256"):   # the workdir's config says 192
        train(wider)
    with pytest.raises(CheckpointMismatchError, match=r"mlp/gate.*\(2, 64, 192\).*\(2, 64, 256\)"):
        train(dataclasses.replace(wider, allow_config_change=True))      # forced: the shapes still cannot load
