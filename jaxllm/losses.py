"""Loss functions. Each returns sums over tokens (never means) so that gradient accumulation over
micro-batches and data-parallel reduction divide once by the true token count."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0) -> dict:
    """Masked next-token cross-entropy, computed in float32.

    logits: (batch, length, vocab); targets, mask: (batch, length). Returns sums over masked tokens:
    `loss` (cross-entropy + z_loss·log(Z)², what is differentiated), `nll` (cross-entropy alone),
    `z_loss` and `tokens`.
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                                    # (batch, length)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * mask
    z_term = z_loss * jnp.square(log_z) * mask
    return {"loss": jnp.sum(nll + z_term), "nll": jnp.sum(nll), "z_loss": jnp.sum(z_term),
            "tokens": jnp.sum(mask)}
