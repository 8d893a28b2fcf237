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
                        mask=lambda p: weight_decay_mask(p, cfg.decay_embeddings), mu_dtype=jnp.dtype(cfg.mu_dtype))
    adamw = in_float32(adamw)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
    if cfg.trainable == "new_rows":
        return new_rows_only(tx, cfg.new_rows_from)
    return tx


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """tx computed in float32 whatever the parameters' dtype: with bfloat16 parameters its state (Adam's second
    moment; the first follows optim.mu_dtype) stays float32 and the update is rounded to bfloat16 only when
    applied (optax.apply_updates casts to the parameter's dtype). A no-op for float32 parameters."""
    def up(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return tx.init(up(params))

    def update(updates, state, params=None):
        return tx.update(up(updates), state, None if params is None else up(params))

    return optax.GradientTransformation(init, update)


def _zero_old_rows(first_row: int) -> optax.GradientTransformation:
    """Zeroes the embedding rows / head columns of ids < first_row; other leaves pass through."""
    def zero(path, u):
        names = [getattr(k, "key", None) for k in path]
        if names[:2] == ["embed", "embedding"]:                   # (vocab, embed)
            return jnp.where(jnp.arange(u.shape[0])[:, None] >= first_row, u, 0)
        if names[:2] == ["lm_head", "kernel"]:                    # (embed, vocab)
            return jnp.where(jnp.arange(u.shape[1])[None, :] >= first_row, u, 0)
        return u

    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(zero, updates))


def new_rows_only(tx: optax.GradientTransformation, first_row: int) -> optax.GradientTransformation:
    """Stage one of continued pretraining after a vocabulary expansion: only the new tokens' embedding rows and
    head columns (ids >= first_row) learn; every other parameter stays bit-identical.

    optax.multi_transform gives the frozen leaves set_to_zero, and no optimizer state (a 7B model's frozen Adam
    moments would be 2x its size for nothing). Inside the trained leaves the old rows are masked twice: in the
    gradient, so clipping's global norm and Adam's moments see only new rows, and in the update, because
    weight decay would otherwise move old rows with a zero gradient."""
    if first_row <= 0:
        raise ValueError(f"optim.trainable='new_rows' needs the first new row (optim.new_rows_from), got {first_row}")
    rows = _zero_old_rows(first_row)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if getattr(path[0], "key", None) in ("embed", "lm_head") else "frozen", params)

    return optax.multi_transform({"train": optax.chain(rows, tx, rows), "frozen": optax.set_to_zero()}, labels)
