"""Heads read from the decoder's hidden states: a scalar reward head, and sequence log-probabilities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.model.spec import ParamSpec, normal, param_specs
from jaxllm.model.transformer import hidden_states, target_log_z


def reward_model_specs(cfg: ModelConfig) -> dict:
    """The decoder plus a linear scalar head. The head starts small so initial rewards are near zero."""
    head = {"kernel": ParamSpec((cfg.d_model,), np.dtype(cfg.param_dtype), ("embed",), normal(1.0 / cfg.d_model)),
            "bias": ParamSpec((), np.dtype(cfg.param_dtype), (), lambda k, s, d: jnp.zeros(s, d))}
    return {**param_specs(cfg), "reward_head": head}


def _flatten_pairs(batch: dict) -> tuple:
    """(batch, 2, length) arrays -> (2·batch, length), chosen and rejected of a pair side by side."""
    return tuple(batch[k].reshape(-1, batch[k].shape[-1]) for k in ("tokens", "segment_ids", "positions"))


def last_token_rewards(params, tokens, segment_ids, positions, cfg: ModelConfig) -> jax.Array:
    """Scalar reward read at the last real (non-padding) token of each sequence: (batch,) float32."""
    h = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions)   # (batch, length, embed)
    last = jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0)                         # (batch,)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # (batch, embed)
    head = params["reward_head"]
    return h_last @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def pair_rewards(params, batch: dict, cfg: ModelConfig) -> jax.Array:
    """Rewards of (chosen, rejected): (batch, 2)."""
    return last_token_rewards(params, *_flatten_pairs(batch), cfg).reshape(-1, 2)


def pair_logprobs(params, batch: dict, cfg: ModelConfig) -> jax.Array:
    """Summed log-probabilities of the response tokens of (chosen, rejected): (batch, 2) float32."""
    tokens, segment_ids, positions = _flatten_pairs(batch)
    h = hidden_states(params, tokens, cfg, segment_ids, positions)                       # (2·batch, length, embed)
    targets = batch["targets"].reshape(tokens.shape)
    mask = batch["loss_mask"].reshape(tokens.shape)
    log_z, target_logit = target_log_z(params, h, targets, cfg)                           # each (2·batch, length)
    token_logp = target_logit - log_z
    return jnp.sum(token_logp * mask, axis=-1).reshape(-1, 2)
