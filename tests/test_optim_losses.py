"""The schedule against hand-computed values, the weight-decay mask, and the loss against numpy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import ModelConfig, OptimConfig
from jaxllm.model.spec import init_params
from jaxllm.model.transformer import forward
from jaxllm.objectives.lm import lm_loss, token_cross_entropy
from jaxllm.optim import lr_schedule, make_optimizer, weight_decay_mask
from jaxllm.steps import init_train_state, train_step


def test_cosine_schedule_hand_computed():
    s = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    # warmup: step/10; decay over 100 steps: 0.1 + 0.9 * 0.5 * (1 + cos(pi * t)); then the floor.
    for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55), (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
                       (110, 0.1), (500, 0.1)]:
        assert float(s(step)) == pytest.approx(want, abs=1e-6), step


def test_linear_and_constant_schedules_hand_computed():
    lin = lr_schedule(OptimConfig(lr=2.0, warmup_steps=4, decay="linear", min_lr_ratio=0.0, decay_steps=8), 100)
    assert [round(float(lin(i)), 6) for i in (2, 4, 8, 12, 50)] == [1.0, 2.0, 1.0, 0.0, 0.0]
    const = lr_schedule(OptimConfig(lr=3.0, warmup_steps=0, decay="constant"), 100)
    assert [float(const(i)) for i in (0, 99)] == [3.0, 3.0]


def test_weight_decay_mask_skips_norms_and_embeddings():
    params = init_params(ModelConfig.preset("tiny"), jax.random.key(0))
    mask = weight_decay_mask(params, decay_embeddings=False)
    assert mask["layers"]["attn"]["q"] and mask["layers"]["mlp"]["down"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not mask["embed"]["embedding"] and not mask["lm_head"]["kernel"]
    assert weight_decay_mask(params, decay_embeddings=True)["embed"]["embedding"]


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    mask = np.array([[1, 1, 0], [1, 0, 1]])
    out = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=0.01)
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert float(out["nll"]) == pytest.approx((nll * mask).sum(), rel=1e-5)
    assert float(out["z_loss"]) == pytest.approx((0.01 * log_z ** 2 * mask).sum(), rel=1e-5)
    assert float(out["tokens"]) == 4


def test_gradient_accumulation_equals_one_big_batch():
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, decay="constant")
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    x = jax.random.normal(jax.random.key(0), (8, 3))
    mask = jnp.array([1, 1, 0, 1, 1, 1, 1, 0], jnp.float32)   # uneven counts per micro-batch

    def loss_fn(p, batch, frozen=None):
        per = jnp.sum((batch["x"] @ p["w"]) ** 2, -1) * batch["mask"]
        return per.sum(), {"loss": per.sum(), "count": batch["mask"].sum()}

    one, m1 = train_step(init_train_state(params, tx), {"x": x, "mask": mask}, loss_fn=loss_fn, tx=tx)
    four, m4 = train_step(init_train_state(params, tx), {"x": x, "mask": mask}, loss_fn=loss_fn, tx=tx, accum_steps=4)
    np.testing.assert_allclose(one["params"]["w"], four["params"]["w"], rtol=1e-6)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    assert int(four["step"]) == 1 and isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("prior", ["uniform", "unigram"])
def test_label_smoothing_matches_optax_on_explicit_targets(prior):
    """lm_loss with label smoothing against optax's cross-entropy on the smoothed target distribution written
    out in full: (1-ε)·one-hot + ε·prior, the prior uniform over the vocabulary or the frequencies of the
    batch's masked targets. The reported loss stays the plain cross-entropy."""
    cfg = ModelConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      mlp_dim=32, max_seq_len=8)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
    targets = rng.integers(0, 11, (2, 6)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], np.float32)
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask,
             "segment_ids": np.ones((2, 6), np.int32), "positions": np.tile(np.arange(6, dtype=np.int32), (2, 1))}
    eps = 0.3
    total, metrics = lm_loss(params, batch, model_cfg=cfg, label_smoothing=eps, smoothing_prior=prior)

    logits = forward(params, tokens, cfg, batch["segment_ids"], batch["positions"])       # (2, 6, 11)
    if prior == "uniform":
        u = np.full(11, 1 / 11)
    else:
        u = np.bincount(targets[mask > 0], minlength=11) / mask.sum()
    q = (1 - eps) * np.eye(11)[targets] + eps * u                                           # (2, 6, 11)
    expected = (optax.softmax_cross_entropy(logits, q) * mask).sum()
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    plain = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask).sum()
    assert float(metrics["loss"]) == pytest.approx(float(plain), rel=1e-5)
