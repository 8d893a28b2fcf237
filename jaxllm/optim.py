"""The optimizer: linear warmup then cosine / linear / constant decay to a floor, AdamW with a weight-decay
mask, and global-norm clipping. Gradient accumulation happens inside the train step (steps.py), so one
optimizer update is one train step and the schedule counts updates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """1) linear warmup from 0 to lr over warmup_steps; 2) decay to lr·min_lr_ratio over decay_steps
    (default: the rest of the run); 3) hold the floor."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = cfg.warmup_steps
    decay_steps = cfg.decay_steps or max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)   # fraction of the decay done
        if cfg.decay == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif cfg.decay == "linear":
            decayed = peak + (floor - peak) * t
        else:
            decayed = jnp.full_like(t, peak)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def weight_decay_mask(params, decay_embeddings: bool):
    """True where weight decay applies: matrices, but never norm scales or biases; the embedding and the
    output head only when asked (decaying rare tokens' rows towards zero hurts them most)."""
    def decide(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] in ("scale", "bias"):
            return False
        if names[0] in ("embed", "lm_head"):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda p: weight_decay_mask(p, cfg.decay_embeddings))
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
