"""Train and eval steps, one per objective.

An objective supplies a loss function `loss_fn(params, batch, frozen) -> (loss_sum, sums)` where `sums`
holds sums over its examples and `sums["count"]` is how many there are (tokens for LM, pairs for
preferences); `frozen` holds arrays the loss reads but never trains (DPO's reference model; {} otherwise).
`train_step` is shared and never branches on the objective: it accumulates gradients of the sum over
micro-batches, divides once by the total count, clips and applies the optimizer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import ModelConfig
from jaxllm.losses import bradley_terry, dpo, token_cross_entropy
from jaxllm.model.heads import pair_logprobs, pair_rewards
from jaxllm.model.transformer import forward


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def lm_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, z_loss: float = 0.0):
    """Next-token loss on packed rows: batch has tokens, targets, loss_mask, segment_ids, positions,
    each (batch, length)."""
    logits = forward(params, batch["tokens"], model_cfg, segment_ids=batch["segment_ids"],
                     positions=batch["positions"])                        # (batch, length, vocab)
    sums = token_cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
    total = sums.pop("loss")                       # what is differentiated: cross-entropy + z-loss
    return total, {"loss": sums["nll"], "z_loss": sums["z_loss"], "count": sums["tokens"]}


def reward_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, center: float = 0.0, use_margin: bool = True):
    """Bradley-Terry on (chosen, rejected) pairs; batch arrays are (batch, 2, length), margin (batch,)."""
    rewards = pair_rewards(params, batch, model_cfg)                          # (batch, 2)
    margin = batch["margin"] if use_margin else jnp.zeros_like(batch["margin"])
    sums = bradley_terry(rewards[:, 0], rewards[:, 1], margin, batch["weight"], center)
    return sums["loss"], sums


def dpo_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0):
    """DPO with the reference log-probabilities computed on the fly from frozen["reference"]."""
    policy = pair_logprobs(params, batch, model_cfg)                          # (batch, 2)
    reference = jax.lax.stop_gradient(pair_logprobs(frozen["reference"], batch, model_cfg))
    sums = dpo(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], batch["weight"], beta, kind,
               label_smoothing)
    return sums["loss"], sums


def dpo_loss_cached(params, batch, frozen=None, *, model_cfg: ModelConfig, beta: float, kind: str = "sigmoid",
                    label_smoothing: float = 0.0):
    """DPO with reference log-probabilities computed once before training and carried in the batch."""
    policy = pair_logprobs(params, batch, model_cfg)
    reference = batch["ref_logp"]                                             # (batch, 2)
    sums = dpo(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], batch["weight"], beta, kind,
               label_smoothing)
    return sums["loss"], sums


def _accumulate_gradients(loss_fn, params, batch, frozen, accum_steps: int):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, sums), grads = grad_fn(params, batch, frozen)
        return grads, sums
    # (batch, ...) -> (accum_steps, batch / accum_steps, ...): scan over micro-batches so only one
    # micro-batch's activations are alive at a time.
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

    def body(carry, micro_batch):
        grads_acc, sums_acc = carry
        (_, sums), grads = grad_fn(params, micro_batch, frozen)
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

    first = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: grad_fn(params, first, frozen)[0][1])
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums


def train_step(state: dict, batch: dict, frozen=None, *, loss_fn, tx: optax.GradientTransformation,
               accum_steps: int = 1):
    """One optimizer update. Returns the new state and per-example means of the loss function's sums."""
    grads, sums = _accumulate_gradients(loss_fn, state["params"], batch, frozen, accum_steps)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {k: v / count for k, v in sums.items() if k != "count"}
    metrics.update(count=sums["count"], grad_norm=optax.tree.norm(grads))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, frozen=None, *, loss_fn) -> dict:
    """Sums (not means) over the batch, so an evaluation over many batches adds them up exactly."""
    _, sums = loss_fn(params, batch, frozen)
    return sums


def train_step_lm(state, batch, frozen=None, *, model_cfg: ModelConfig, tx, z_loss: float = 0.0,
                  accum_steps: int = 1):
    return train_step(state, batch, frozen, loss_fn=functools.partial(lm_loss, model_cfg=model_cfg, z_loss=z_loss),
                      tx=tx, accum_steps=accum_steps)


def eval_step_lm(params, batch, frozen=None, *, model_cfg: ModelConfig) -> dict:
    return eval_step(params, batch, frozen, loss_fn=functools.partial(lm_loss, model_cfg=model_cfg))


def train_step_sft(state, batch, frozen=None, *, model_cfg: ModelConfig, tx, accum_steps: int = 1):
    """SFT is next-token loss on rows whose loss mask covers the answers only (data/chat_pipeline.py)."""
    return train_step(state, batch, frozen, loss_fn=functools.partial(lm_loss, model_cfg=model_cfg), tx=tx,
                      accum_steps=accum_steps)


def train_step_reward(state, batch, frozen=None, *, model_cfg: ModelConfig, tx, center: float = 0.0,
                      accum_steps: int = 1):
    return train_step(state, batch, frozen, loss_fn=functools.partial(reward_loss, model_cfg=model_cfg,
                                                                      center=center), tx=tx, accum_steps=accum_steps)


def train_step_dpo(state, batch, frozen, *, model_cfg: ModelConfig, tx, beta: float, kind: str = "sigmoid",
                   label_smoothing: float = 0.0, accum_steps: int = 1):
    return train_step(state, batch, frozen, loss_fn=functools.partial(dpo_loss, model_cfg=model_cfg, beta=beta,
                                                                      kind=kind, label_smoothing=label_smoothing),
                      tx=tx, accum_steps=accum_steps)
