"""The Llama-style decoder as pure functions: `forward(params, tokens, cfg) -> logits`.

Pre-norm blocks: x += attn(rms_norm(x)); x += swiglu(rms_norm(x)). Layers are stacked along a leading axis
and run by `lax.scan` (one compiled block, fast compiles) or a Python loop, under a configurable remat
policy. Parameters are stored in `param_dtype` and cast to `compute_dtype` at use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.model.layers import apply_rope, rms_norm, swiglu_mlp
from jaxllm.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _attention_block(x, p, segment_ids, positions, cfg: ModelConfig):
    dtype = x.dtype
    q = jnp.einsum("bld,dhk->blhk", x, p["q"].astype(dtype))     # (batch, length, heads, head_dim)
    k = jnp.einsum("bld,dhk->blhk", x, p["k"].astype(dtype))     # (batch, length, kv_heads, head_dim)
    v = jnp.einsum("bld,dhk->blhk", x, p["v"].astype(dtype))     # (batch, length, kv_heads, head_dim)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    if cfg.position == "rope":
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
    out = attention(q, k, v, q_segment_ids=segment_ids, k_segment_ids=segment_ids, q_positions=positions,
                    k_positions=positions, impl=cfg.attention_impl, alibi=cfg.position == "alibi")
    out = checkpoint_name(out, "attn_out")      # (batch, length, heads, head_dim)
    return jnp.einsum("blhk,hkd->bld", out, p["o"].astype(dtype))


def decoder_layer(x, layer, segment_ids, positions, cfg: ModelConfig):
    """One pre-norm block. x: (batch, length, embed) in compute dtype."""
    h = rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
    x = x + _attention_block(h, layer["attn"], segment_ids, positions, cfg)
    h = rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
    mlp = layer["mlp"]
    x = x + swiglu_mlp(h, mlp["gate"], mlp["up"], mlp["down"])
    return constrain(x, ("batch", "length", "act_embed"))


def hidden_states(params, tokens, cfg: ModelConfig, segment_ids=None, positions=None) -> jax.Array:
    """Final-norm hidden states (batch, length, embed) in compute dtype; heads (LM, reward) read these.

    segment_ids: (batch, length), 1, 2, ... per packed document and 0 on padding; default one document.
    positions: (batch, length), restarting at 0 in each document; default 0..length-1."""
    batch, length = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    dtype = jnp.dtype(cfg.compute_dtype)
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(dtype)   # (batch, length, embed)
    x = constrain(x, ("batch", "length", "act_embed"))

    def layer_fn(x, layer):
        return decoder_layer(x, layer, segment_ids, positions, cfg)

    if cfg.remat != "none":
        layer_fn = jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        x, _ = jax.lax.scan(lambda carry, layer: (layer_fn(carry, layer), None), x, params["layers"])
    else:
        for i in range(cfg.num_layers):
            x = layer_fn(x, jax.tree.map(lambda a: a[i], params["layers"]))
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)


def lm_head_weight(params) -> jax.Array:
    """(embed, vocab): the output head, or the transposed input embedding when tied."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["embed"]["embedding"].T


# The logit of a padding row (ids >= cfg.valid_vocab_size): exp() of it is exactly 0 next to any real logit, so
# it carries no probability, loss or gradient; finite, so logsumexp, temperature and sorting never see inf/NaN.
PADDED_LOGIT = -1e9


def logits_from_hidden(params, h: jax.Array, cfg: ModelConfig | None = None) -> jax.Array:
    """(batch, length, embed) -> (batch, length, vocab) float32 logits. With `cfg`, the logits of padding rows
    (a vocabulary padded to a multiple by resize_vocab) are PADDED_LOGIT, so loss, perplexity and sampling all
    ignore them: this is the one place they are masked."""
    w = lm_head_weight(params).astype(h.dtype)
    logits = jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)   # (batch, length, vocab)
    if cfg is not None and 0 < cfg.valid_vocab_size < logits.shape[-1]:
        real = jnp.arange(logits.shape[-1]) < cfg.valid_vocab_size               # (vocab,)
        logits = jnp.where(real, logits, PADDED_LOGIT)
    return constrain(logits, ("batch", "length", "vocab"))


def forward(params, tokens, cfg: ModelConfig, segment_ids=None, positions=None) -> jax.Array:
    """tokens (batch, length) int32 -> logits (batch, length, vocab) float32."""
    return logits_from_hidden(params, hidden_states(params, tokens, cfg, segment_ids, positions), cfg)
