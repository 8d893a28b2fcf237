"""Stateless layers of a Llama-style decoder: RMSNorm, rotary and ALiBi positions, the SwiGLU MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.sharding import constrain


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as Llama does), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half layout of Hugging Face Llama: dimension i is paired with
    i + head_dim/2 (not with its neighbour), so q/k weights convert without a permutation.

    x: (batch, length, heads, head_dim); positions: (batch, length) int, restarting per document.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # (head_dim/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                           # (batch, length, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]                     # (batch, length, 1, head_dim)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
    """Per-head slopes of Press et al. (2022), including their rule for head counts that are not a power
    of two (the geometric series for the nearest lower power, then every other slope of the next one)."""
    def power_of_two_slopes(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(q_positions: jax.Array, k_positions: jax.Array, num_heads: int) -> jax.Array:
    """ALiBi's additive bias -slope·(q_pos - k_pos): (batch, heads, q_length, k_length), float32.

    Distances come from positions, which restart per document, so a packed document sees the same
    biases as it would alone (cross-document pairs are masked anyway)."""
    distance = q_positions[:, :, None] - k_positions[:, None, :]          # (batch, q_length, k_length)
    return -alibi_slopes(num_heads)[None, :, None, None] * distance[:, None].astype(jnp.float32)


def swiglu_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(x·gate) * (x·up)). x: (batch, length, embed); gate/up: (embed, mlp); down: (mlp, embed)."""
    dtype = x.dtype
    g = jnp.einsum("bld,df->blf", x, gate.astype(dtype))     # (batch, length, mlp)
    u = jnp.einsum("bld,df->blf", x, up.astype(dtype))       # (batch, length, mlp)
    h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    return jnp.einsum("blf,fd->bld", h, down.astype(dtype))  # (batch, length, embed)
