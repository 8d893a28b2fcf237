"""Growing a model's vocabulary after its tokenizer was expanded (jaxllm.tokenizer.expand).

The input embedding (vocab, embed) gains rows and the output head (embed, vocab) gains columns (a tied head
is the embedding itself). Old rows are copied, so they stay bit-identical and every old token's logit is
unchanged. New rows start as:
  mean          the mean of the old rows: a new token's logit starts at the mean of the old logits, so it
                neither dominates nor vanishes (Hewitt, "Initializing new word embeddings", 2021);
  mean_noise    the same plus small Gaussian noise (noise_scale x the old rows' per-dimension std), so new
                tokens are not all identical and get different gradients from the first step;
  subword_mean  the mean of the old rows of the pieces the *base* tokenizer splits the new piece into (待编 ->
                the byte pieces of 待 and 编): a piece starts where the model already understood its text.
The total is padded to a multiple of `pad_to_multiple` (128: matmul tiles and tensor-parallel splits divide
it). Padding rows are zeros and `ModelConfig.valid_vocab_size` marks them, so the model masks their logits
(transformer.logits_from_hidden) out of the loss, perplexity and sampling.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

METHODS = ("mean", "mean_noise", "subword_mean")


def token_rows(cfg: ModelConfig) -> int:
    """Rows of the embedding that are real tokens (the rest, if any, are padding)."""
    return cfg.valid_vocab_size or cfg.vocab_size


def resized_config(cfg: ModelConfig, new_vocab_size: int, pad_to_multiple: int = 128) -> ModelConfig:
    """The model config after `resize_vocab(params, cfg, new_vocab_size, ...)`, without touching any weights."""
    if new_vocab_size < token_rows(cfg):
        raise ValueError(f"cannot resize the vocabulary to {new_vocab_size} rows: the checkpoint has "
                         f"{token_rows(cfg)} token rows, and dropping rows would drop trained tokens")
    multiple = max(int(pad_to_multiple), 1)
    padded = -(-new_vocab_size // multiple) * multiple
    valid = new_vocab_size if padded > new_vocab_size else 0             # 0: no padding, nothing to mask
    return dataclasses.replace(cfg, vocab_size=padded, valid_vocab_size=valid)


def check_tokenizer_size(tokenizer_size: int, cfg: ModelConfig, where: str) -> None:
    """A tokenizer with more pieces than the checkpoint has token rows would index past the embedding."""
    if tokenizer_size > token_rows(cfg):
        raise ValueError(f"the tokenizer has {tokenizer_size} pieces but the checkpoint {where} has "
                         f"{token_rows(cfg)} vocabulary rows; resize the embeddings (resize_method=mean, "
                         f"jaxllm.resize_vocab) or use the checkpoint's own tokenizer")


def _subword_ids(base_tokenizer, new_tokenizer, first: int, last: int) -> list[list[int]]:
    """For each new id in [first, last): the base tokenizer's ids for that piece's text. The base model is
    reloaded without sentencepiece's dummy "▁" prefix, so 编码 maps to 编 码 rather than ▁ 编 码."""
    import sentencepiece as spm

    from jaxllm.tokenizer.proto import model_proto_class
    from jaxllm.tokenizer.tokenizer import HFTokenizer, load_tokenizer, resolve_model_file

    new = load_tokenizer(new_tokenizer)
    texts = [new.id_to_piece(i).replace("▁", " ") for i in range(first, last)]
    base_tokenizer = load_tokenizer(base_tokenizer)
    if isinstance(base_tokenizer, HFTokenizer):    # byte-level BPE adds no prefix: encode the text as it is
        return [base_tokenizer.encode(t) for t in texts]
    proto = model_proto_class()()
    proto.ParseFromString(resolve_model_file(getattr(base_tokenizer, "path", base_tokenizer)).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    base = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return base.encode(texts)


def _new_rows(old: np.ndarray, method: str, count: int, key, noise_scale: float, subwords) -> np.ndarray:
    """(count, embed) float32 rows for new tokens from old (rows, embed) float32 token rows."""
    mean = old.mean(axis=0)
    if method == "subword_mean":
        return np.stack([old[ids].mean(axis=0) if ids else mean for ids in subwords]).astype(np.float32)
    rows = np.broadcast_to(mean, (count, old.shape[1])).astype(np.float32)
    if method == "mean_noise":
        noise = np.asarray(jax.random.normal(key, rows.shape, jnp.float32))
        rows = rows + noise_scale * old.std(axis=0) * noise
    return rows


def _grow(old: jax.Array, rows: int, new_rows: np.ndarray, padded: int, axis: int) -> jax.Array:
    """old's first `rows` token rows (along axis) + new_rows + zero padding up to `padded`."""
    kept = jax.lax.slice_in_dim(old, 0, rows, axis=axis)            # bit-identical copy of the old tokens
    pad = np.zeros((padded - rows - new_rows.shape[0], new_rows.shape[1]), np.float32)
    extra = np.concatenate([new_rows, pad]).astype(old.dtype)       # (new + pad, embed)
    return jnp.concatenate([kept, jnp.asarray(extra if axis == 0 else extra.T)], axis=axis)


def resize_vocab(params: dict, cfg: ModelConfig, new_vocab_size: int, method: str = "mean", *,
                 key: jax.Array | None = None, noise_scale: float = 0.01, base_tokenizer=None, new_tokenizer=None,
                 pad_to_multiple: int = 128) -> tuple[dict, ModelConfig]:
    """Grows the embedding and output head to `new_vocab_size` tokens (padded); returns (params, cfg).

    Args:
      params: the model's parameters (addressable from this process); not modified.
      cfg: their model config. Rows at or beyond cfg.valid_vocab_size (earlier padding) are re-initialised.
      new_vocab_size: pieces of the new tokenizer; at least the checkpoint's token rows (else ValueError).
      method: "mean", "mean_noise" or "subword_mean" (see the module docstring).
      key: PRNG key of mean_noise's noise (default key 0: the same resize every time).
      noise_scale: mean_noise's noise std, as a multiple of the old rows' per-dimension std.
      base_tokenizer, new_tokenizer: subword_mean's tokenizers (paths or Tokenizers): the checkpoint's and the
        expanded one whose first ids are the base's.
      pad_to_multiple: the padded vocabulary is a multiple of this (1 = no padding).
    """
    if method not in METHODS:
        raise ValueError(f"resize method {method!r} is unknown; known: {METHODS}")
    new_cfg = resized_config(cfg, new_vocab_size, pad_to_multiple)
    rows, padded, count = token_rows(cfg), new_cfg.vocab_size, new_vocab_size - token_rows(cfg)
    subwords = None
    if method == "subword_mean":
        if base_tokenizer is None or new_tokenizer is None:
            raise ValueError("resize method 'subword_mean' needs base_tokenizer and new_tokenizer")
        subwords = _subword_ids(base_tokenizer, new_tokenizer, rows, new_vocab_size)
        if any(i >= rows for ids in subwords for i in ids):
            raise ValueError(f"the base tokenizer {base_tokenizer} produces ids beyond the checkpoint's {rows} rows")
    key = jax.random.key(0) if key is None else key
    emb_key, head_key = jax.random.split(key)

    out = jax.tree.map(lambda x: x, params)              # a new tree; leaves are shared, never mutated
    emb = params["embed"]["embedding"]                                        # (vocab, embed)
    old = np.asarray(jax.device_get(emb[:rows]), np.float32)
    out["embed"] = {**params["embed"], "embedding": _grow(emb, rows, _new_rows(old, method, count, emb_key,
                                                                                noise_scale, subwords), padded, 0)}
    if "lm_head" in params:                                                   # untied: (embed, vocab)
        head = params["lm_head"]["kernel"]
        old = np.asarray(jax.device_get(head[:, :rows]), np.float32).T        # (rows, embed)
        new = _new_rows(old, method, count, head_key, noise_scale, subwords)
        out["lm_head"] = {**params["lm_head"], "kernel": _grow(head, rows, new, padded, 1)}
    return out, new_cfg
