"""Attention kernels behind one signature, with document masking for packed rows.

All implementations compute softmax(q·kᵀ/√d + bias) v restricted to keys that are (1) not in the future
and (2) in the same document (equal, non-zero segment id); a padding query (segment id 0) gets zeros. `xla` is
the reference and runs anywhere; `cudnn` (GPU), `pallas` (Triton flash attention, GPU) and `splash` (TPU) are
tested against it. Which kernel runs, with what constraints and how on a mesh: `kernels.py`.

Debugging a kernel without its accelerator: JAXLLM_PALLAS_INTERPRET=1 runs `pallas` and `splash` in Pallas
interpret mode on any platform (the real kernel code, slowly), e.g.
    JAXLLM_PALLAS_INTERPRET=1 jaxllm train --config=pretrain:model=tiny --config.model.attention_impl=splash ...
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from jaxllm.model.kernels import choose_kernel, pallas_gpu_attention, splash_attention
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


def attention(q, k, v, *, q_segment_ids, k_segment_ids, q_positions, k_positions, impl: str = "xla",
              alibi: bool = False, block: int = 128, platform: str | None = None) -> jax.Array:
    """q: (batch, q_length, heads, head_dim); k, v: (batch, k_length, kv_heads, head_dim).
    segment ids and positions: (batch, length) int32. Returns (batch, q_length, heads, head_dim).

    impl: "xla", "cudnn", "pallas", "splash" or "auto" (see `kernels.choose_kernel`, which logs auto's choice
    once); block: the flash kernels' tile, lengths are padded to a multiple (on a CPU, the xla attention's blocks
    of queries); platform: the platform to choose for (default: jax's default backend)."""
    platform = platform or jax.default_backend()
    name, why = choose_kernel(impl, dtype=q.dtype, q_len=q.shape[1], k_len=k.shape[1], head_dim=q.shape[-1],
                              alibi=alibi, platform=platform, block=block)
    if impl == "auto":
        log_choice_once(f"attention_impl='auto' uses {name!r}: {why}")
    if name == "xla":
        # On a CPU, blocks of `block` queries run the tiny model's train step 2.0x / 2.6x faster at 1024 / 2048-token
        # rows (1.05x at 256; benchmarks/RESULTS.md, 2026-12-04); on an accelerator the fallback stays one
        # computation rather than length / block small matmuls (not measured there: its fast path is a flash kernel).
        return xla_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi,
                             query_block=block if platform == "cpu" else None)
    if name == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi)
    # The flash kernels attend within one row (same length): q and k share segment ids.
    kernel = pallas_gpu_attention if name == "pallas" else splash_attention
    return kernel(q, k, v, q_segment_ids, block=block)


@functools.cache
def log_choice_once(message: str) -> None:
    """Each distinct choice is logged once per process, not at every layer, shape or retrace."""
    logging.getLogger(__name__).info(message)


def xla_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi, query_block=None):
    """The reference. With `query_block`, a row attending to itself (q_length == k_length) is split into blocks of
    queries, each against only the keys up to its last query: the scores above the causal diagonal are never
    formed, which halves the (length, length) work and the memory the backward pass saves at long rows, and each
    block's scores stay small enough for the cache. Each block's softmax sees all of its keys, so the result is
    the unsplit one, not an approximation."""
    q_len, k_len = q.shape[1], k.shape[1]
    if not query_block or q_len != k_len or q_len <= query_block:
        return _attend(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi)
    outs = []
    for start in range(0, q_len, query_block):
        end = min(start + query_block, q_len)
        # Queries start..end against keys 0..end: the queries are the keys' last positions, as document_mask assumes.
        outs.append(_attend(q[:, start:end], k[:, :end], v[:, :end], q_segment_ids[:, start:end],
                            k_segment_ids[:, :end], q_positions[:, start:end], k_positions[:, :end], alibi))
    return jnp.concatenate(outs, axis=1)                                      # (batch, q_length, heads, head_dim)


def _attend(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi):
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
    # The mask as an additive bias rather than a select: its gradient is the identity, so the backward pass
    # neither saves the mask nor runs a select over every score (on XLA:CPU a large share of the step).
    mask = document_mask(q_segment_ids, k_segment_ids)[:, :, None]           # (batch, 1, 1, q_length, k_length)
    scores = scores + jnp.where(mask, 0.0, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)                           # (batch, q_length, kv_heads, groups, head_dim)
    # A padding query (segment id 0) sees no key: its softmax is uniform over masked scores; it attends to nothing.
    out = out * (q_segment_ids != 0)[:, :, None, None, None].astype(out.dtype)
    return out.reshape(batch, q_len, heads, head_dim)


def cudnn_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions, k_positions, alibi):
    """cuDNN flash attention through `jax.nn.dot_product_attention` with the document mask (GPU only).
    GQA is native: K/V keep their kv_heads."""
    bias = None
    if alibi:
        bias = alibi_bias(q_positions, k_positions, q.shape[2]).astype(q.dtype)
    mask = document_mask(q_segment_ids, k_segment_ids)                        # (batch, 1, q_length, k_length)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
