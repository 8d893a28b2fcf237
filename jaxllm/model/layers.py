"""Stateless layers of a Llama-style decoder: RMSNorm, rotary and ALiBi positions (the SwiGLU MLP, which reads
adapted projections, lives in transformer.py)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp



def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as Llama does), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> jax.Array:
    """RoPE's inverse frequencies (head_dim/2,) float32, with the scaling of transformers' rope_type:
      none    1 / theta^(2i/head_dim)
      linear  the same divided by `factor` (position interpolation)
      llama3  Llama 3.1's: wavelengths longer than original_max_len / low_freq_factor divided by `factor`,
              shorter than original_max_len / high_freq_factor kept, and a smooth blend in between."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))    # (head_dim/2,)
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = original_max_len / low_freq_factor
        high_freq_wavelen = original_max_len / high_freq_factor
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout of Hugging Face Llama: dimension i is paired with
    i + head_dim/2 (not with its neighbour), so q/k weights convert without a permutation.

    x: (batch, length, heads, head_dim); positions: (batch, length) int, restarting per document;
    inv_freq: (head_dim/2,) from rope_frequencies.
    """
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
