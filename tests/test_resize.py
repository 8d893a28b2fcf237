"""Vocabulary resize: old tokens keep their rows and logits exactly; padding rows never win and carry no loss."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.objectives.lm import token_cross_entropy
from jaxllm.model.resize import resize_vocab, resized_config
from jaxllm.model.spec import init_params
from jaxllm.model.transformer import PADDED_LOGIT
from jaxllm.model.transformer import forward as _forward

forward = jax.jit(_forward, static_argnums=2)      # one compile per config instead of op-by-op dispatch

OLD, NEW = 300, 333          # 333 tokens pad to 384 = 3 x 128


def tiny(vocab: int, tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                       mlp_dim=64, max_seq_len=64, tie_embeddings=tie)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", ["mean", "mean_noise"])
def test_old_rows_are_bit_identical_and_old_tokens_keep_their_logits(tie, method):
    cfg = tiny(OLD, tie)
    params = init_params(cfg, jax.random.key(0))
    new_params, new_cfg = resize_vocab(params, cfg, NEW, method=method)
    assert (new_cfg.vocab_size, new_cfg.valid_vocab_size) == (384, NEW)
    assert new_params["embed"]["embedding"].shape == (384, 32)
    np.testing.assert_array_equal(new_params["embed"]["embedding"][:OLD], params["embed"]["embedding"])
    if not tie:
        assert new_params["lm_head"]["kernel"].shape == (32, 384)
        np.testing.assert_array_equal(new_params["lm_head"]["kernel"][:, :OLD], params["lm_head"]["kernel"])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, OLD)
    old_logits = forward(params, tokens, cfg)
    new_logits = forward(new_params, tokens, new_cfg)                       # (2, 16, 384)
    # Old tokens keep their logits. Their weights are bit-identical (above); XLA may tile a 384-column matmul
    # differently from a 300-column one, so the sums agree to float32 rounding rather than bit for bit.
    np.testing.assert_allclose(new_logits[..., :OLD], old_logits, rtol=1e-6, atol=1e-6)
    assert bool(jnp.all(new_logits[..., NEW:] == PADDED_LOGIT))


def test_new_rows_start_at_the_mean_of_old_rows_plus_noise_when_asked():
    cfg = tiny(OLD, False)
    params = init_params(cfg, jax.random.key(0))
    emb = np.asarray(params["embed"]["embedding"])
    mean_params, _ = resize_vocab(params, cfg, NEW, method="mean")
    new = np.asarray(mean_params["embed"]["embedding"][OLD:NEW])
    np.testing.assert_allclose(new, np.broadcast_to(emb.mean(0), new.shape), rtol=1e-6, atol=1e-7)
    head_new = np.asarray(mean_params["lm_head"]["kernel"][:, OLD:NEW])
    np.testing.assert_allclose(head_new.T[0], np.asarray(params["lm_head"]["kernel"]).mean(1), rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(mean_params["embed"]["embedding"][NEW:]))            # padding rows are zero
    noisy, _ = resize_vocab(params, cfg, NEW, method="mean_noise", noise_scale=0.01)
    noisy = np.asarray(noisy["embed"]["embedding"][OLD:NEW])
    assert not np.allclose(noisy[0], noisy[1])                                         # tokens differ
    np.testing.assert_allclose(noisy, new, atol=0.01 * emb.std(0).max() * 6)          # ... but only slightly


def test_padded_logits_never_win_and_carry_no_loss_or_gradient():
    cfg = tiny(OLD, False)
    params, cfg = resize_vocab(init_params(cfg, jax.random.key(0)), cfg, NEW)
    # Make every padding column enormous: unmasked, they would win every argmax.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, NEW:].set(100.0)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, NEW)
    logits = forward(params, tokens, cfg)
    assert int(jnp.max(jnp.argmax(logits, -1))) < NEW
    probs = jax.nn.softmax(logits, -1)
    assert float(jnp.max(probs[..., NEW:])) == 0.0
    # The loss equals a softmax over the real tokens only, and sends no gradient to the padding columns.
    targets, mask = jnp.roll(tokens, -1, 1), jnp.ones(tokens.shape)
    loss = token_cross_entropy(logits, targets, mask)["nll"]
    reference = token_cross_entropy(logits[..., :NEW], targets, mask)["nll"]
    np.testing.assert_allclose(loss, reference, rtol=1e-6)

    def loss_fn(p):
        return token_cross_entropy(forward(p, tokens, cfg), targets, mask)["loss"]

    grads = jax.jit(jax.grad(loss_fn))(params)
    assert not np.any(np.asarray(grads["lm_head"]["kernel"][:, NEW:]))
    assert np.any(np.asarray(grads["lm_head"]["kernel"][:, :NEW]))


def test_resizing_a_padded_checkpoint_reinitialises_its_padding_rows_and_pads_to_the_multiple():
    cfg = tiny(OLD, True)
    params, cfg1 = resize_vocab(init_params(cfg, jax.random.key(0)), cfg, NEW)
    params2, cfg2 = resize_vocab(params, cfg1, 400, method="mean", pad_to_multiple=128)
    assert (cfg2.vocab_size, cfg2.valid_vocab_size) == (512, 400)
    np.testing.assert_array_equal(params2["embed"]["embedding"][:NEW], params["embed"]["embedding"][:NEW])
    mean = np.asarray(params["embed"]["embedding"][:NEW]).mean(0)
    np.testing.assert_allclose(params2["embed"]["embedding"][NEW:400], np.broadcast_to(mean, (400 - NEW, 32)),
                               rtol=1e-6, atol=1e-7)
    exact = resized_config(cfg, 384, pad_to_multiple=128)
    assert (exact.vocab_size, exact.valid_vocab_size) == (384, 0)              # no padding: nothing masked


def test_shrinking_is_an_error_and_unknown_methods_are_named():
    cfg = tiny(OLD, False)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=f"{OLD - 1} rows.*{OLD} token rows"):
        resize_vocab(params, cfg, OLD - 1)
    with pytest.raises(ValueError, match="'median' is unknown"):
        resize_vocab(params, cfg, NEW, method="median")
    with pytest.raises(ValueError, match="needs base_tokenizer"):
        resize_vocab(params, cfg, NEW, method="subword_mean")
    with pytest.raises(ValueError, match="valid_vocab_size"):
        dataclasses.replace(cfg, valid_vocab_size=OLD + 1).validate()


def test_subword_mean_averages_the_base_rows_of_the_pieces_a_new_piece_splits_into(shared_data, tmp_path):
    from jaxllm.tokenizer import Tokenizer
    from jaxllm.tokenizer.expand import expand_tokenizer
    llama = shared_data / "tokenizers" / "llama" / "tokenizer.model"
    merged = expand_tokenizer(llama, tmp_path, add=[shared_data / "tokenizers/chinese_llama_sp/chinese_sp.model"])
    cfg = dataclasses.replace(tiny(32000, False), d_model=8, num_heads=1, num_kv_heads=1, head_dim=8)
    params = init_params(cfg, jax.random.key(0))
    new_params, new_cfg = resize_vocab(params, cfg, merged.vocab_size, method="subword_mean", base_tokenizer=llama,
                                       new_tokenizer=merged.path)
    assert (new_cfg.vocab_size, new_cfg.valid_vocab_size) == (50048, 49953)
    tok = Tokenizer(merged.path)
    new_id = tok.piece_to_id("待")
    assert new_id >= 32000
    # LLaMA spells 待 as three byte pieces (no "▁" prefix: the piece has none).
    byte_ids = [Tokenizer(llama).piece_to_id(p) for p in ("<0xE5>", "<0xBE>", "<0x85>")]
    want = np.asarray(params["embed"]["embedding"])[byte_ids].mean(0)
    np.testing.assert_allclose(new_params["embed"]["embedding"][new_id], want, rtol=1e-6)
    want_head = np.asarray(params["lm_head"]["kernel"])[:, byte_ids].mean(1)
    np.testing.assert_allclose(new_params["lm_head"]["kernel"][:, new_id], want_head, rtol=1e-6)
