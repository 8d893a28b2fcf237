"""The frozen base of a LoRA run, stored small: bf16, or its projections quantized to int8 or 4-bit NormalFloat
(QLoRA) with qwix, Google's JAX quantization library (its QArray is a pytree, so a quantized base scans over
layers, shards and jits like the plain one).

  int8: symmetric absmax, one scale per output channel of each layer (scale (layers, 1, out...)).
  nf4:  QLoRA's 16 NormalFloat levels, one absmax scale per block of 64 input rows of each output channel,
        the same number of scales as bitsandbytes' blocks of 64.

Only the seven projections are quantized; embeddings, norms and the output head stay in base_dtype, as
bitsandbytes leaves them. The decoder reads every weight through `as_compute`, which dequantizes at use, one
layer at a time inside the layer scan, so no full-precision copy of the base ever exists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

from jaxllm.model.lora import PROJECTIONS

NF4_BLOCK = 64


def as_compute(w, dtype) -> jax.Array:
    """A weight at compute dtype: a quantized one dequantized, a plain one cast."""
    if isinstance(w, qwix.QArray):
        return qwix.dequantize(w).astype(dtype)
    return w.astype(dtype)


def quantize_weight(w: jax.Array, kind: str, n_in: int) -> qwix.QArray:
    """w (layers, *in (n_in dims), *out) -> QArray; scales per layer and output channel (int8), per 64 input
    rows too (nf4, on the last input dimension)."""
    out_axes = tuple(range(1 + n_in, w.ndim))
    if kind == "int8":
        return qwix.quantize(w, jnp.int8, channelwise_axes=(0, *range(1, n_in), *out_axes), scale_dtype=jnp.float32)
    last_in = n_in       # the input dimension that is tiled into blocks
    # A dimension that 64 does not divide (only tiny test models have one) is one block.
    block = NF4_BLOCK if w.shape[last_in] % NF4_BLOCK == 0 else w.shape[last_in]
    return qwix.quantize(w, "nf4", channelwise_axes=(0, *range(1, n_in), *out_axes),
                         tiled_axes={last_in: block}, scale_dtype=jnp.float32)


def frozen_base(params: dict, base_dtype: str, quantize: str) -> dict:
    """The decoder weights of `params` as a LoRA run keeps them: cast to base_dtype, the projections quantized
    when asked. One jitted call per weight, so only one weight is ever held twice."""
    dtype = jnp.dtype(base_dtype)
    cast = jax.jit(lambda w: w.astype(dtype))
    out = jax.tree.map(cast, params)
    if quantize == "none":
        return out
    for name, (block, in_axes, _) in PROJECTIONS.items():
        w = out["layers"][block][name]
        out["layers"][block][name] = jax.jit(quantize_weight, static_argnums=(1, 2))(w, quantize, len(in_axes))
    return out


def dequantize_tree(params: dict) -> dict:
    """Every QArray leaf of params back to a plain array in its scale's dtype."""
    return jax.tree.map(lambda w: qwix.dequantize(w) if isinstance(w, qwix.QArray) else w, params,
                        is_leaf=lambda x: isinstance(x, qwix.QArray))


def nbytes(params: dict) -> int:
    """Bytes the tree holds on device (a 4-bit value counts half a byte)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        bits = jnp.dtype(leaf.dtype).itemsize * 8 if leaf.dtype != jnp.uint4 else 4
        total += leaf.size * bits // 8
    return total
