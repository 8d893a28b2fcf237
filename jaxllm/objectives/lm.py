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
from jaxllm.model.transformer import hidden_states, target_log_z
from jaxllm.objectives import Objective


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0) -> dict:
    """Masked next-token cross-entropy from logits (batch, length, vocab); targets, mask: (batch, length).
    See cross_entropy_sums; training reads log Z and the target's logit without forming the logits."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                                    # (batch, length)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return cross_entropy_sums(log_z, target_logit, mask, z_loss)


def cross_entropy_sums(log_z: jax.Array, target_logit: jax.Array, mask: jax.Array, z_loss: float = 0.0) -> dict:
    """Sums over masked tokens, in float32, from log Z and the target's logit, each (batch, length): `loss`
    (cross-entropy + z_loss·log(Z)², what is differentiated), `nll` (cross-entropy alone), `z_loss`, `tokens`."""
    mask = mask.astype(jnp.float32)
    nll = (log_z - target_logit) * mask
    z_term = z_loss * jnp.square(log_z) * mask
    return {"loss": jnp.sum(nll + z_term), "nll": jnp.sum(nll), "z_loss": jnp.sum(z_term),
            "tokens": jnp.sum(mask)}


def lm_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, z_loss: float = 0.0):
    """Next-token loss on packed rows: batch has tokens, targets, loss_mask, segment_ids, positions,
    each (batch, length)."""
    h = hidden_states(params, batch["tokens"], model_cfg, segment_ids=batch["segment_ids"],
                      positions=batch["positions"])                      # (batch, length, embed)
    log_z, target_logit = target_log_z(params, h, batch["targets"], model_cfg)   # each (batch, length)
    sums = cross_entropy_sums(log_z, target_logit, batch["loss_mask"], z_loss)
    total = sums.pop("loss")                       # what is differentiated: cross-entropy + z-loss
    return total, {"loss": sums["nll"], "z_loss": sums["z_loss"], "count": sums["tokens"]}


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
        loss_settings=dict(model_cfg=cfg.model, z_loss=cfg.train.z_loss),
        specs=param_specs(cfg.model),
        train_batches=train_batches,
        eval_batches=lambda: pipeline(eval_records, seed=0, shuffle=False, repeat=False),
        report=lm_report,
        data_stats=lambda: mixture_stats(mixture, train_batches.get_state(), lanes),
    )
