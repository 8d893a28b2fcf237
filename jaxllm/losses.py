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


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array, weight: jax.Array,
                  center: float = 0.0) -> dict:
    """Pairwise reward-model loss −log σ(r_c − r_r − margin), summed over pairs with weight 1 (0 = padding).

    center > 0 adds center·(r_c + r_r)², which pins the rewards' mean near zero (the loss is invariant to a
    shift, so otherwise it drifts). Also sums of accuracy and of the gap and its square, for its variance."""
    gap = r_chosen - r_rejected
    per_pair = -jax.nn.log_sigmoid(gap - margin) + center * jnp.square(r_chosen + r_rejected)
    return {"loss": jnp.sum(per_pair * weight), "accuracy": jnp.sum((gap > 0) * weight),
            "gap": jnp.sum(gap * weight), "gap_sq": jnp.sum(jnp.square(gap) * weight), "count": jnp.sum(weight)}


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
