"""Attention kernels behind one signature, with document masking for packed rows.

All implementations compute softmax(q·kᵀ/√d + bias) v restricted to keys that are (1) not in the future
and (2) in the same document (equal, non-zero segment id). `xla` is the reference and runs anywhere;
the others are tested against it on their platforms.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.model.layers import alibi_bias

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # large but finite: a fully masked row stays NaN-free


def document_mask(q_segment_ids: jax.Array, k_segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(batch, 1, q_length, k_length) bool: same non-padding document and, if causal, not in the future.

    Queries are assumed to sit at the last q_length positions of the keys (true for training, and for a
    decode step against a KV cache)."""
    q_len, k_len = q_segment_ids.shape[1], k_segment_ids.shape[1]
    same_doc = (q_segment_ids[:, :, None] == k_segment_ids[:, None, :]) & (k_segment_ids[:, None, :] != 0)
    if causal:
        q_idx = jnp.arange(q_len)[:, None] + (k_len - q_len)
        same_doc &= q_idx >= jnp.arange(k_len)[None, :]
    return same_doc[:, None]


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def attention(q, k, v, *, q_segment_ids, k_segment_ids, q_positions, k_positions, impl: str = "xla",
              alibi: bool = False) -> jax.Array:
    """q: (batch, q_length, heads, head_dim); k, v: (batch, k_length, kv_heads, head_dim).
    segment ids and positions: (batch, length) int32. Returns (batch, q_length, heads, head_dim)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return xla_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi)
    if impl == "splash":
        if alibi:
            raise ValueError("attention_impl='splash' cannot apply ALiBi; use 'xla' or 'cudnn'")
        return splash_attention(q, k, v, q_segment_ids, k_segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}")


def xla_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # Grouped-query attention without repeating K/V: split query heads into (kv_heads, groups).
    qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)                 # (batch, q_length, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)                                      # (batch, kv_heads, groups, q_length, k_length)
    if alibi:
        bias = alibi_bias(q_positions, k_positions, heads)                    # (batch, heads, q_length, k_length)
        scores = scores + bias.reshape(batch, kv_heads, groups, q_len, -1)
    mask = document_mask(q_segment_ids, k_segment_ids)[:, :, None]           # (batch, 1, 1, q_length, k_length)
    scores = jnp.where(mask, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)                       # padding queries attend to nothing
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)                           # (batch, q_length, kv_heads, groups, head_dim)
    return out.reshape(batch, q_len, heads, head_dim)


def cudnn_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi):
    """cuDNN flash attention through `jax.nn.dot_product_attention` with the document mask (GPU only).
    GQA is native: K/V keep their kv_heads."""
    bias = None
    if alibi:
        bias = alibi_bias(q_positions, k_positions, q.shape[2]).astype(q.dtype)
    mask = document_mask(q_segment_ids, k_segment_ids)                        # (batch, 1, q_length, k_length)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, q_len: int, k_len: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = sm.MultiHeadMask([sm.CausalMask((q_len, k_len)) for _ in range(heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)


def splash_attention(q, k, v, q_segment_ids, k_segment_ids):
    """Pallas splash attention on TPU, causal with segment ids (TPU only).

    The kernel works per example on (heads, length, head_dim) and wants K/V with all query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    batch, q_len, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    kernel = _splash_kernel(heads, q_len, k.shape[1])
    qt = jnp.swapaxes(q * (head_dim ** -0.5), 1, 2)                            # (batch, heads, q_length, head_dim)
    kt = jnp.swapaxes(jnp.repeat(k, groups, axis=2), 1, 2)                     # (batch, heads, k_length, head_dim)
    vt = jnp.swapaxes(jnp.repeat(v, groups, axis=2), 1, 2)
    segments = sk.SegmentIds(q=q_segment_ids, kv=k_segment_ids)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=segments)                   # (batch, heads, q_length, head_dim)
    return jnp.swapaxes(out, 1, 2)
