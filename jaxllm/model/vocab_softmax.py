"""log Z and the target's logit over the vocabulary, straight from hidden states, a chunk of positions at a time.

Every token loss (pretraining and SFT cross-entropy, DPO log-probabilities) reads two numbers per position:
log Z = logsumexp(logits) and the logit of the target token. Computing them as forward() does — the whole
(batch, length, vocab) logits array, then logsumexp and take_along_axis — costs three ways:
  memory   the logits and their gradient are each batch·length·vocab floats (Qwen's 152k vocabulary: 2.5 GB
           per 4096 tokens), the largest activation of a training step;
  speed    logsumexp and the softmax gradient stream that array through memory several times, and on
           XLA:CPU the target's gradient (a scatter) and the transposed copy it forces cost more than the
           output-head matmul itself (issue 18: the tiny model's step spent a third of its time there);
  tiles    the whole array never fits in a cache.
Here the head matmul and the softmax run over chunks of positions in a scan (MaxText's vocabulary tiling,
Levanter's blockwise cross-entropy): the largest live array is one chunk's logits, and the backward pass
recomputes each chunk's logits (one extra head matmul) instead of keeping them, forming the gradient as
softmax·g_z + onehot(target)·g_t in one elementwise pass with the one-hot an iota comparison.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.sharding import constrain

# Logits (float32) per chunk, counted over the global batch: 2^22 elements = 16 MB. Measured on the 2-core CPU
# (tiny model, 16 x 256 tokens, vocabulary 8000): 4-8 chunks of this size run the head's forward 2.3x and its
# backward 1.5x faster than the unchunked arrays. On a mesh each device holds its share of a chunk.
CHUNK_LOGITS = 1 << 22
MIN_CHUNK_POSITIONS = 32     # fewer positions per chunk and the scan's per-step overhead dominates


def chunk_positions(batch: int, length: int, vocab: int) -> int:
    """Positions per chunk: a power of two whose logits stay near CHUNK_LOGITS, at least MIN_CHUNK_POSITIONS,
    at most the (padded) length."""
    per_chunk = max(CHUNK_LOGITS // max(batch * vocab, 1), MIN_CHUNK_POSITIONS)
    positions = 1 << (per_chunk.bit_length() - 1)                 # largest power of two <= per_chunk
    return min(positions, length)


def _chunk_logits(h, w, valid_vocab: int, padded_logit: float):
    """h (batch, positions, embed) · w (embed, vocab) -> (batch, positions, vocab) float32 logits; rows of a
    padded vocabulary (ids >= valid_vocab) get `padded_logit`."""
    logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)   # (batch, positions, vocab)
    if 0 < valid_vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, padded_logit)
    return constrain(logits, ("batch", "length", "vocab"))


def _to_chunks(x, positions: int):
    """(batch, length, ...) -> (chunks, batch, positions, ...), length padded with zeros to a multiple."""
    batch, length = x.shape[:2]
    pad = -length % positions
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    chunks = x.reshape(batch, -1, positions, *x.shape[2:])                  # (batch, chunks, positions, ...)
    return jnp.moveaxis(chunks, 1, 0)                                       # (chunks, batch, positions, ...)


def _from_chunks(x, length: int):
    """(chunks, batch, positions, ...) -> (batch, length, ...), the padding dropped."""
    x = jnp.moveaxis(x, 0, 1)                                               # (batch, chunks, positions, ...)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _log_z_and_target(h, w, targets, valid_vocab, padded_logit, positions):
    return _forward(h, w, targets, valid_vocab, padded_logit, positions)


def _forward(h, w, targets, valid_vocab, padded_logit, positions):
    def chunk(_, xs):
        h_c, t_c = xs                                                       # (batch, positions, embed), (batch, positions)
        logits = _chunk_logits(h_c, w, valid_vocab, padded_logit)
        log_z = jax.nn.logsumexp(logits, axis=-1)                           # (batch, positions)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return None, (log_z, target)

    _, (log_z, target) = jax.lax.scan(chunk, None, (_to_chunks(h, positions), _to_chunks(targets, positions)))
    length = h.shape[1]
    return _from_chunks(log_z, length), _from_chunks(target, length)


def _fwd(h, w, targets, valid_vocab, padded_logit, positions):
    log_z, target = _forward(h, w, targets, valid_vocab, padded_logit, positions)
    return (log_z, target), (h, w, targets, log_z)


def _bwd(valid_vocab, padded_logit, positions, residuals, cotangents):
    h, w, targets, log_z = residuals
    g_z, g_target = cotangents                                              # each (batch, length)
    vocab_ids = jnp.arange(w.shape[-1], dtype=targets.dtype)

    def chunk(d_w, xs):
        h_c, t_c, z_c, gz_c, gt_c = xs                                      # (batch, positions[, embed])
        logits = _chunk_logits(h_c, w, valid_vocab, padded_logit)           # recomputed, never stored
        softmax = jnp.exp(logits - z_c[..., None])                          # (batch, positions, vocab)
        d_logits = softmax * gz_c[..., None] + jnp.where(t_c[..., None] == vocab_ids, gt_c[..., None], 0.0)
        d_logits = d_logits.astype(h.dtype)
        d_h = jnp.einsum("blv,dv->bld", d_logits, w, preferred_element_type=jnp.float32)   # (batch, positions, embed)
        d_w = d_w + jnp.einsum("bld,blv->dv", h_c, d_logits, preferred_element_type=jnp.float32)
        return d_w, d_h.astype(h.dtype)

    xs = tuple(_to_chunks(x, positions) for x in (h, targets, log_z, g_z, g_target))
    d_w, d_h = jax.lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), xs)
    return _from_chunks(d_h, h.shape[1]), d_w.astype(w.dtype), None        # targets: integers, no gradient


_log_z_and_target.defvjp(_fwd, _bwd)


def log_z_and_target(h: jax.Array, w: jax.Array, targets: jax.Array, *, valid_vocab: int = 0,
                     padded_logit: float = -1e9, positions: int = 0) -> tuple[jax.Array, jax.Array]:
    """h (batch, length, embed) final-norm hidden states; w (embed, vocab) the output head in h's dtype;
    targets (batch, length) int. Returns (log Z, the target's logit), each (batch, length) float32, equal to
    logsumexp and take_along_axis of the full logits (the padded vocabulary rows masked as logits_from_hidden
    masks them). positions: per chunk (0: chunk_positions' choice)."""
    batch, length = targets.shape
    positions = positions or chunk_positions(batch, length, w.shape[-1])
    return _log_z_and_target(h, w, targets, valid_vocab, padded_logit, positions)
