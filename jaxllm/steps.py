"""The shared step machinery: the train state, its shardings, gradient accumulation, one train step and one
eval step. Objectives (jaxllm/objectives/) specialise `train_step` and `eval_step` with their loss.

A loss is `loss_fn(params, batch, frozen, **settings) -> (loss_sum, sums)` where `sums` holds sums over its
examples and `sums["count"]` is how many there are (tokens for LM, pairs for preferences); `frozen` holds
arrays the loss reads but never trains (DPO's online reference model; {} otherwise) and `settings` its
static hyperparameters (the model config, z_loss, beta, ...). A LoRA run trains adapters on a frozen base:
frozen["base"] holds the base and the loss sees both as one tree (`model_params`). `train_step` never branches
on the objective: it accumulates gradients of the sum over micro-batches, divides once by the total count,
clips and applies the optimizer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxllm import sharding
from jaxllm.model import lora
from jaxllm.model.spec import init_from_specs, logical_axes


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def state_shardings(specs, tx: optax.GradientTransformation, mesh, rules) -> tuple[dict, dict]:
    """(abstract state, shardings) from a ParamSpec tree; optimizer moments follow their parameters."""
    abstract = jax.eval_shape(lambda: init_train_state(init_from_specs(specs, jax.random.key(0)), tx))
    param_sh = sharding.tree_shardings(mesh, rules, logical_axes(specs), abstract["params"])
    # A frozen parameter (optim.trainable='new_rows': optax.multi_transform) has no moments, only a MaskedNode.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)
    return abstract, {"step": sharding.replicated(mesh), "params": param_sh, "opt_state": opt_sh}


def model_params(params, frozen, adapter_scale: float = 1.0):
    """The parameters a loss reads: the trained ones, overlaid on frozen["base"] when the run trains adapters
    on a frozen base (LoRA: model/lora.py); the trained ones alone otherwise."""
    base = (frozen or {}).get("base")
    return params if base is None else lora.combine(params, base, adapter_scale)


def reference_params(frozen):
    """The frozen reference a loss compares the policy with (DPO, RL): frozen["reference"], the init_from
    model; with LoRA the frozen base itself, without adapters, so the weights are never held twice."""
    return frozen["reference"] if "reference" in frozen else frozen["base"]


def accumulate_gradients(loss_fn, params, batch, frozen, accum_steps: int, adapter_scale: float = 1.0):
    """(gradients of the loss sum, the loss's sums) over the batch, `accum_steps` micro-batches at a time.
    Gradients are taken with respect to `params` only: a frozen base is read, never differentiated."""
    grad_fn = jax.value_and_grad(lambda p, b, f: loss_fn(model_params(p, f, adapter_scale), b, f), has_aux=True)
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
               accum_steps: int = 1, adapter_scale: float = 1.0, **loss_settings):
    """One optimizer update. Returns the new state and per-example means of the loss function's sums.

    loss_settings are passed to loss_fn as keywords (its model config and hyperparameters); adapter_scale is
    LoRA's alpha/rank when frozen holds a base."""
    loss_fn = functools.partial(loss_fn, **loss_settings)
    grads, sums = accumulate_gradients(loss_fn, state["params"], batch, frozen, accum_steps, adapter_scale)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {k: v / count for k, v in sums.items() if k != "count"}
    metrics.update(count=sums["count"], grad_norm=optax.tree.norm(grads))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, frozen=None, *, loss_fn, adapter_scale: float = 1.0, **loss_settings) -> dict:
    """Sums (not means) over the batch, so an evaluation over many batches adds them up exactly."""
    _, sums = loss_fn(model_params(params, frozen, adapter_scale), batch, frozen, **loss_settings)
    return sums
