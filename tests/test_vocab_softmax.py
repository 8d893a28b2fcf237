"""The chunked output head (model/vocab_softmax.py) against the full logits it avoids forming."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model.vocab_softmax import chunk_positions, log_z_and_target


def reference(h, w, targets, valid_vocab):
    """logsumexp and take_along_axis of the whole (batch, length, vocab) logits, as forward() computes them."""
    logits = jnp.einsum("bld,dv->blv", h, w)
    if valid_vocab:
        logits = jnp.where(jnp.arange(w.shape[1]) < valid_vocab, logits, -1e9)
    return jax.nn.logsumexp(logits, -1), jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("batch,length,vocab,valid_vocab,positions", [
    (3, 37, 50, 0, 8),     # length not a multiple of the chunk: padded, then dropped
    (2, 16, 64, 60, 0),    # a padded vocabulary (resize_vocab's rows past the tokenizer), automatic chunks
    (2, 5, 11, 0, 32),     # a chunk longer than the rows
])
def test_values_and_gradients_equal_the_full_logits(batch, length, vocab, valid_vocab, positions):
    k = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(k[0], (batch, length, 8))
    w = jax.random.normal(k[1], (8, vocab))
    targets = jax.random.randint(k[2], (batch, length), 0, valid_vocab or vocab)
    g_z, g_t = jax.random.normal(k[3], (batch, length)), jax.random.normal(k[4], (batch, length))
    chunked = lambda h, w: log_z_and_target(h, w, targets, valid_vocab=valid_vocab, positions=positions)  # noqa: E731
    full = lambda h, w: reference(h, w, targets, valid_vocab)                                             # noqa: E731
    for got, want in zip(chunked(h, w), full(h, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Both cotangents at once: z-loss and cross-entropy weigh log Z and the target's logit differently.
    weighted = lambda f: lambda h, w: jnp.sum(f(h, w)[0] * g_z + f(h, w)[1] * g_t)  # noqa: E731
    got = jax.grad(weighted(chunked), argnums=(0, 1))(h, w)
    want = jax.grad(weighted(full), argnums=(0, 1))(h, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_hidden_states_give_float32_results_close_to_float32():
    k = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k[0], (2, 24, 16))
    w = jax.random.normal(k[1], (16, 40)) * 0.3
    targets = jax.random.randint(k[2], (2, 24), 0, 40)
    log_z, target = log_z_and_target(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, positions=8)
    assert log_z.dtype == target.dtype == jnp.float32
    want = reference(h, w, targets, 0)
    np.testing.assert_allclose(log_z, want[0], rtol=2e-2, atol=5e-2)
    d_h = jax.grad(lambda h: jnp.sum(log_z_and_target(h, w.astype(jnp.bfloat16), targets, positions=8)[0]))(
        h.astype(jnp.bfloat16))
    assert d_h.dtype == jnp.bfloat16


def test_chunk_size_keeps_the_logits_of_a_chunk_near_the_budget():
    assert chunk_positions(16, 256, 8000) == 32          # 16 x 32 x 8000 floats: 16 MB
    assert chunk_positions(1, 2048, 1000) == 2048        # small: the whole row in one chunk
    assert chunk_positions(256, 2048, 152_000) == 32     # never fewer than 32 positions per chunk
