"""Language modelling: next-token prediction on packed rows of a (weighted) mixture of sources.

Losses return sums over tokens (never means), so that gradient accumulation over micro-batches and
data-parallel reduction divide once by the true token count (steps.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxllm import steps
from jaxllm.config import Config, ModelConfig
from jaxllm.data import load_documents, lm_pipeline, mixture_stats, split_heldout, total_lanes
from jaxllm.data.mixture import from_config as mixture_from_config
from jaxllm.model.spec import param_specs
from jaxllm.model.transformer import hidden_states, lm_head_weight, target_log_z
from jaxllm.objectives import Objective


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0) -> dict:
    """Masked next-token cross-entropy from logits (batch, length, vocab); targets, mask: (batch, length).
    See cross_entropy_sums; training reads log Z and the target's logit without forming the logits."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                                    # (batch, length)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return cross_entropy_sums(log_z, target_logit, mask, z_loss)


def cross_entropy_sums(log_z: jax.Array, target_logit: jax.Array, mask: jax.Array, z_loss: float = 0.0,
                       label_smoothing: float = 0.0, mean_logit: jax.Array | None = None) -> dict:
    """Sums over masked tokens, in float32, from log Z and the target's logit, each (batch, length): `loss`
    (what is differentiated: the cross-entropy against the smoothed targets + z_loss·log(Z)²), `nll` (the plain
    cross-entropy), `z_loss`, `tokens`. Label smoothing ε needs `mean_logit` (batch, length), Σ_v prior_v·logit_v:
    -Σ_v q_v log p_v with q = (1-ε)·one-hot + ε·prior is log Z - (1-ε)·target logit - ε·mean_logit."""
    mask = mask.astype(jnp.float32)
    nll = (log_z - target_logit) * mask
    smoothed = nll if not label_smoothing else (
        log_z - (1.0 - label_smoothing) * target_logit - label_smoothing * mean_logit) * mask
    z_term = z_loss * jnp.square(log_z) * mask
    return {"loss": jnp.sum(smoothed + z_term), "nll": jnp.sum(nll), "z_loss": jnp.sum(z_term),
            "tokens": jnp.sum(mask)}


def lm_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, z_loss: float = 0.0,
            label_smoothing: float = 0.0, smoothing_prior: str = "uniform"):
    """Next-token loss on packed rows: batch has tokens, targets, loss_mask, segment_ids, positions,
    each (batch, length)."""
    h = hidden_states(params, batch["tokens"], model_cfg, segment_ids=batch["segment_ids"],
                      positions=batch["positions"])                      # (batch, length, embed)
    log_z, target_logit = target_log_z(params, h, batch["targets"], model_cfg)   # each (batch, length)
    mean_logit = (prior_mean_logit(params, h, model_cfg, smoothing_prior, batch["targets"], batch["loss_mask"])
                  if label_smoothing else None)
    sums = cross_entropy_sums(log_z, target_logit, batch["loss_mask"], z_loss, label_smoothing, mean_logit)
    total = sums.pop("loss")                       # what is differentiated: smoothed cross-entropy + z-loss
    return total, {"loss": sums["nll"], "z_loss": sums["z_loss"], "count": sums["tokens"]}


def prior_mean_logit(params, h: jax.Array, cfg: ModelConfig, prior: str, targets: jax.Array,
                     mask: jax.Array) -> jax.Array:
    """(batch, length): Σ_v prior_v·logit_v. Logits are linear in the head, so this is h against the head's
    prior-weighted mean column, without forming the (batch, length, vocab) logits. "uniform": the real vocabulary
    rows alike; "unigram": the batch's own (masked) target frequencies, an unbiased estimate of the corpus
    unigram that needs no counting pass over the data (the term is linear in the prior)."""
    w = lm_head_weight(params).astype(jnp.float32)                       # (embed, vocab)
    if prior == "uniform":
        weights = (jnp.arange(w.shape[1]) < (cfg.valid_vocab_size or w.shape[1])).astype(jnp.float32)
    else:
        weights = jnp.zeros(w.shape[1], jnp.float32).at[targets].add(mask.astype(jnp.float32))  # a histogram
    w_mean = jnp.einsum("dv,v->d", w, weights) / jnp.maximum(jnp.sum(weights), 1.0)   # (embed,)
    return jnp.einsum("bld,d->bl", h.astype(jnp.float32), w_mean)


train_step = functools.partial(steps.train_step, loss_fn=lm_loss)
eval_step = functools.partial(steps.eval_step, loss_fn=lm_loss)


def lm_documents(cfg: Config) -> tuple[list[str], list[str]]:
    """Training and held-out documents of an LM run."""
    data = cfg.data
    read = functools.partial(load_documents, jsonl_field=data.jsonl_field, text_split=data.text_split,
                             piece_chars=data.document_piece_chars)
    docs = read(data.sources)
    if data.eval_sources:
        return docs, read(data.eval_sources)
    return split_heldout(docs, data.eval_fraction, cfg.train.seed)


def lm_report(sums: dict) -> dict:
    """Held-out loss per token, its perplexity and the token count (also SFT's report: sft.py)."""
    loss = sums["loss"] / sums["count"]
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums["count"]}


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """Next-token prediction on packed rows of a (weighted) mixture of sources."""
    mixture, eval_records = mixture_from_config(cfg.data, cfg.train.seed, tokenizer)
    pipeline = functools.partial(lm_pipeline, tokenizer=tokenizer, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                 add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos, process_index=process_index,
                                 process_count=process_count, max_doc_chars=cfg.data.max_doc_chars)
    train_batches = pipeline(mixture, seed=cfg.train.seed, workers=cfg.data.workers)
    lanes = total_lanes(batch_size, process_count)
    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, z_loss=cfg.train.z_loss,
                           label_smoothing=cfg.train.label_smoothing, smoothing_prior=cfg.train.smoothing_prior),
        specs=param_specs(cfg.model),
        train_batches=train_batches,
        eval_batches=lambda: pipeline(eval_records, seed=0, shuffle=False, repeat=False),
        report=lm_report,
        data_stats=lambda: mixture_stats(mixture, train_batches.get_state(), lanes),
    )
