"""The decoder against independent references: a numpy attention, hand-computed ALiBi slopes, and
invariances that packing and causality require."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.model.attention import xla_attention
from jaxllm.model.layers import alibi_slopes
from jaxllm.model.spec import count_params, flops_per_token, init_params, param_specs
from jaxllm.model.transformer import forward


def tiny(**kw) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=97, **kw)


def numpy_attention(q, k, v, seg, pos, slopes=None):
    """Plain-loop reference: per query, softmax over same-document, non-future keys."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                if seg[bi, i] == 0:
                    continue
                keys = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // groups] / np.sqrt(d) for j in keys])
                if slopes is not None:
                    s = s - slopes[hi] * np.array([pos[bi, i] - pos[bi, j] for j in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = sum(pj * v[bi, j, hi // groups] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("query_block", [None, 2, 3])   # blocks of queries against their prefix of keys; 3 leaves a
def test_xla_attention_matches_numpy_reference(kv_heads, alibi, query_block):   # short last block
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 0, 0], list(range(7))], np.int32)
    got = xla_attention(q, k, v, seg, seg, pos, pos, alibi, query_block=query_block)
    want = numpy_attention(q, k, v, seg, pos, np.asarray(alibi_slopes(4)) if alibi else None)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_query_blocks_give_the_unsplit_attention_and_gradients():
    """Training differentiates through the blocks: their gradients must be the unsplit attention's."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 12, 4, 8)).astype(np.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]                                              # GQA: 2 kv heads
    seg = np.array([[1] * 5 + [2] * 6 + [0], [1] * 12], np.int32)
    pos = np.array([list(range(5)) + list(range(6)) + [0], list(range(12))], np.int32)
    weights = rng.normal(size=(2, 12, 4, 8)).astype(np.float32)

    def grads(block):
        loss = lambda q, k, v: jnp.sum(xla_attention(q, k, v, seg, seg, pos, pos, False, query_block=block) * weights)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for split, whole in zip(grads(4), grads(None)):
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), atol=1e-5)


def test_alibi_slopes_hand_computed():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    # 12 heads: the 8-head series, then every other slope of the 16-head series (2^-0.5, 2^-1.5, ...).
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    np.testing.assert_allclose(alibi_slopes(12), want, rtol=1e-6)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_changing_one_packed_document_changes_no_other(position):
    cfg = tiny(position=position)
    params = init_params(cfg, jax.random.key(0))
    seg = jnp.array([[1] * 5 + [2] * 6 + [3] * 5])
    pos = jnp.array([list(range(5)) + list(range(6)) + list(range(5))])
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, cfg.vocab_size)
    changed = tokens.at[0, 5:11].set((tokens[0, 5:11] + 7) % cfg.vocab_size)   # rewrite document 2 only
    a = forward(params, tokens, cfg, segment_ids=seg, positions=pos)
    b = forward(params, changed, cfg, segment_ids=seg, positions=pos)
    others = np.r_[0:5, 11:16]
    np.testing.assert_array_equal(np.asarray(a)[0, others], np.asarray(b)[0, others])
    assert not np.allclose(np.asarray(a)[0, 5:11], np.asarray(b)[0, 5:11])
    # And a packed document sees exactly what it sees alone (positions restart, nothing leaks in).
    alone = forward(params, tokens[:, 11:16], cfg)
    np.testing.assert_allclose(np.asarray(a)[0, 11:16], np.asarray(alone)[0], atol=1e-5)


def test_future_tokens_do_not_change_past_logits():
    cfg = tiny()
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    a = forward(params, tokens, cfg)
    b = forward(params, tokens.at[:, 8:].set(3), cfg)
    np.testing.assert_array_equal(np.asarray(a)[:, :8], np.asarray(b)[:, :8])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(num_heads=4, num_kv_heads=2)
    mha = tiny(num_heads=4, num_kv_heads=4)
    p = init_params(gqa, jax.random.key(0))
    p_mha = jax.tree.map(lambda x: x, p)
    for name in ("k", "v"):   # (layers, embed, kv_heads, head_dim) -> each kv head serves 2 query heads
        p_mha["layers"]["attn"][name] = jnp.repeat(p["layers"]["attn"][name], 2, axis=2)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, gqa.vocab_size)
    np.testing.assert_allclose(forward(p, tokens, gqa), forward(p_mha, tokens, mha), atol=1e-5)


def test_scan_unrolled_and_remat_policies_agree():
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    base = tiny()
    params = init_params(base, jax.random.key(0))
    loss = lambda p, c: jnp.mean(forward(p, tokens, c) ** 2)  # noqa: E731
    ref_loss, ref_grad = jax.value_and_grad(loss)(params, base)
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots"), dict(remat="attn_out", scan_layers=False)):
        val, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, tiny(**kw))
        np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)


def test_tied_embeddings_have_no_head_and_bf16_compute_runs():
    cfg = tiny(tie_embeddings=True, compute_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert "lm_head" not in params and params["embed"]["embedding"].dtype == jnp.float32
    logits = forward(params, jnp.zeros((1, 4), jnp.int32), cfg)
    assert logits.shape == (1, 4, 97) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_tinyllama_preset_size_and_flops_match_published_figures():
    cfg = ModelConfig.preset("tinyllama-1.1b")
    assert count_params(cfg) == 1_100_048_384            # TinyLlama-1.1B's parameter count
    # PaLM: 6N + 12·L·H·Q·T with N excluding the input embedding gather.
    n = 1_100_048_384 - 32000 * 2048
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 22 * 32 * 64 * 2048
    assert param_specs(cfg)["layers"]["attn"]["k"].shape == (22, 2048, 4, 64)


def test_bad_model_configs_are_named():
    with pytest.raises(ConfigError, match="num_heads .* divisible by model.num_kv_heads"):
        ModelConfig.preset("tiny", num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="did you mean 'tinyllama-1.1b'"):
        ModelConfig.preset("tinyllama")
    with pytest.raises(ConfigError, match="unknown config field 'model.num_head'.*num_heads"):
        ModelConfig.preset("tiny", num_head=4)
