"""Direct Preference Optimization: the policy starts from init_from, which is also the frozen reference.

The reference's sequence log-probabilities are either computed once before training and carried in every
batch as the per-pair array REFERENCE_LOGPROBS (dpo.reference="cached": one forward pass per pair in all),
or computed on the fly from the reference parameters held in `frozen` ("online": no start-up pass, but
twice the forward work per step and a second copy of the weights in memory).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding, steps
from jaxllm.weights import load_params_on_mesh
from jaxllm.config import Config, ConfigError, ModelConfig, init_checkpoint
from jaxllm.data.chat_pipeline import encoded_pairs_of_run, pair_batch, preference_pipelines
from jaxllm.progress import ProgressLog
from jaxllm.model.heads import pair_logprobs
from jaxllm.model.quantize import frozen_base
from jaxllm.model.spec import param_specs
from jaxllm.objectives import Objective

REFERENCE_LOGPROBS = "reference_logprobs"   # the per-pair array of the cached reference: (chosen, rejected)


def dpo(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
        weight: jax.Array, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0) -> dict:
    """Direct Preference Optimization on sequence log-probabilities (Rafailov et al., 2023), summed over pairs.

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
      sigmoid: −(1−ε)·log σ(βh) − ε·log σ(−βh)     (ε = label_smoothing, the "conservative" cDPO; ε=0: DPO)
      ipo:     (h − 1/(2β))²                         (Azar et al., 2023)
    Implicit rewards β·(log π − log π_ref) of chosen and rejected are reported with their accuracy and margin.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        per_pair = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif kind == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"unknown DPO loss {kind!r} (sigmoid or ipo)")
    margin = chosen_reward - rejected_reward
    return {"loss": jnp.sum(per_pair * weight), "reward_chosen": jnp.sum(chosen_reward * weight),
            "reward_rejected": jnp.sum(rejected_reward * weight), "reward_margin": jnp.sum(margin * weight),
            "accuracy": jnp.sum((margin > 0) * weight), "count": jnp.sum(weight)}


def dpo_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, beta: float, kind: str = "sigmoid",
             label_smoothing: float = 0.0):
    """DPO on (chosen, rejected) pairs, batch arrays (batch, 2, length). The reference log-probabilities are
    the batch's cached REFERENCE_LOGPROBS when it carries them, else computed from frozen["reference"]."""
    policy = pair_logprobs(params, batch, model_cfg)                          # (batch, 2)
    if REFERENCE_LOGPROBS in batch:                                           # the batch's structure, not data
        reference = batch[REFERENCE_LOGPROBS]                                 # (batch, 2)
    else:
        reference = jax.lax.stop_gradient(pair_logprobs(steps.reference_params(frozen), batch, model_cfg))
    sums = dpo(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], batch["weight"], beta, kind,
               label_smoothing)
    return sums["loss"], sums


train_step = functools.partial(steps.train_step, loss_fn=dpo_loss)
eval_step = functools.partial(steps.eval_step, loss_fn=dpo_loss)


def dpo_report(sums: dict) -> dict:
    n = sums["count"]
    return {f"eval/{k}": sums[k] / n for k in ("loss", "accuracy", "reward_margin", "reward_chosen",
                                                "reward_rejected")}


def attach_reference_logprobs(pairs: list[dict], reference, model_cfg: ModelConfig, seq_len: int,
                              batch_size: int, mesh, rules) -> None:
    """Computes the reference model's (chosen, rejected) log-probabilities once, into each encoded pair's
    per-pair arrays (REFERENCE_LOGPROBS), which the preference pipeline carries into every batch.

    Every process holds the same pair list; each global batch of batch_size x processes pairs is split along
    the mesh's batch axes, so every pair is computed once on one device group (not once per process or per
    data-parallel replica), and the values come back replicated to every process. A long pass: a progress
    line per interval (pairs done, rate, time left)."""
    nproc, index = jax.process_count(), jax.process_index()
    step = batch_size * nproc
    logprobs = jax.jit(functools.partial(pair_logprobs, cfg=model_cfg), out_shardings=sharding.replicated(mesh))
    progress = ProgressLog("DPO reference log-probabilities", len(pairs), "pairs")
    for start in range(0, len(pairs), step):
        chunk = pairs[start:start + step]
        padded = chunk + [chunk[-1]] * (step - len(chunk))    # one compiled shape; the copies are discarded
        batch = pair_batch(padded[index * batch_size:(index + 1) * batch_size], seq_len)   # this process's rows
        batch = {k: jax.make_array_from_process_local_data(
                     sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (v.ndim - 1), (step, *v.shape[1:])),
                     v) for k, v in batch.items()}
        values = np.asarray(jax.device_get(logprobs(reference, batch)))[:len(chunk)]     # (chunk, 2)
        for pair, value in zip(chunk, values):
            pair.setdefault("arrays", {})[REFERENCE_LOGPROBS] = value.tolist()
        progress.update(start + len(chunk))
    progress.finish()


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """DPO from init_from (the SFT model), which is also the frozen reference."""
    if not init_checkpoint(cfg):
        raise ConfigError(f"objective 'dpo' needs init_from (the SFT model, which is also the frozen reference), "
                          f"got {cfg.init_from!r}: DPO from random weights has no reference to stay near")
    train_pairs, eval_pairs = encoded_pairs_of_run(cfg, tokenizer)
    mesh = sharding.make_mesh(cfg.mesh)     # the run's mesh (the same devices in the same order as the trainer's)
    if cfg.lora.rank and cfg.dpo.reference == "online":
        reference = None                    # the trainer's frozen base is the reference (dpo_loss)
    else:
        reference, _, _ = load_params_on_mesh(cfg.init_from, mesh, cfg.mesh.rules)   # sharded like the policy
        reference = {k: v for k, v in reference.items() if k != "reward_head"}
    if reference is not None and cfg.lora.rank:   # the base exactly as the LoRA run holds it (bf16, quantized)
        reference = frozen_base(reference, cfg.lora.base_dtype, cfg.lora.quantize_base)
    if reference is None:
        frozen = {}
    elif cfg.dpo.reference == "cached":
        for pairs in (train_pairs, eval_pairs):
            attach_reference_logprobs(pairs, reference, cfg.model, cfg.data.seq_len, batch_size, mesh,
                                      cfg.mesh.rules)
        frozen = {}
    else:
        frozen = {"reference": reference}
    train_batches, eval_batches = preference_pipelines(cfg, train_pairs, eval_pairs, batch_size=batch_size,
                                                       process_index=process_index, process_count=process_count)
    d = cfg.dpo
    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, beta=d.beta, kind=d.loss, label_smoothing=d.label_smoothing),
        specs=param_specs(cfg.model), train_batches=train_batches, eval_batches=eval_batches, report=dpo_report,
        frozen=frozen)
