"""The Llama-style decoder as pure functions, for training and for generation with a KV cache.

  forward(params, tokens, cfg) -> logits                              training, scoring, evaluation
  prefill(params, tokens, segment_ids, positions, cfg, cache_len) -> (last logits, cache)
  decode_step(params, cache, tokens, positions, index, cfg) -> (logits, cache)   one token per row

All three run the same `decoder_layer`: pre-norm blocks x += attn(rms_norm(x)); x += swiglu(rms_norm(x)).
Layers are stacked along a leading axis and run by `lax.scan` (one compiled block, fast compiles) or a Python
loop, under a configurable remat policy when training. Parameters are stored in `param_dtype` and cast to
`compute_dtype` at use.

The KV cache (what `prefill` returns and `decode_step` updates) is a dict of fixed size T:
  k, v:        (layers, batch, T, kv_heads, head_dim) in compute dtype
  segment_ids: (batch, T), 0 on padding and on slots not written yet, which attention masks
  positions:   (batch, T), each token's position in its sequence (RoPE and ALiBi read these)
Prompts are LEFT-padded to a common length P, so every row writes its t-th new token into the same slot P+t:
a decode step updates the cache with one `dynamic_update_slice` at a scalar index instead of a per-row scatter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.model.layers import apply_rope, rms_norm, rope_frequencies
from jaxllm.model.lora import project
from jaxllm.model.quantize import as_compute
from jaxllm.model.vocab_softmax import log_z_and_target
from jaxllm.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _weight(dtype):
    """Reads a base weight at compute dtype (dequantized when a LoRA run's base is quantized)."""
    return lambda w: as_compute(w, dtype)


def swiglu_mlp(x: jax.Array, p: dict) -> jax.Array:
    """down(silu(x·gate) * (x·up)). x: (batch, length, embed); gate/up: (embed, mlp); down: (mlp, embed); each
    with its LoRA adapter when p carries one."""
    g = project(x, p, "gate", "bld,df->blf", _weight(x.dtype))    # (batch, length, mlp)
    u = project(x, p, "up", "bld,df->blf", _weight(x.dtype))      # (batch, length, mlp)
    h = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    return project(h, p, "down", "blf,fd->bld", _weight(x.dtype))  # (batch, length, embed)


def attention_block(x, p, segment_ids, positions, cfg: ModelConfig, cache=None, write_at=None):
    """Self-attention: x (batch, length, embed) -> ((batch, length, embed), cache).

    Training (cache None): the tokens of x attend to each other.
    Generation: x's keys and values are written into `cache` at write_at = (layer, slot), whose segment ids and
    positions already include x's tokens. A prompt (several tokens, the first write into an empty cache)
    attends to itself with the configured kernel; one new token attends over the whole cache."""
    dtype = x.dtype
    q = project(x, p, "q", "bld,dhk->blhk", _weight(dtype))     # (batch, length, heads, head_dim)
    k = project(x, p, "k", "bld,dhk->blhk", _weight(dtype))     # (batch, length, kv_heads, head_dim)
    v = project(x, p, "v", "bld,dhk->blhk", _weight(dtype))     # (batch, length, kv_heads, head_dim)
    if cfg.qkv_bias:                                              # Qwen2: biases (heads, head_dim) on q, k, v
        q, k, v = (t + p[f"{n}_bias"].astype(dtype) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    if cfg.qk_norm:                                               # Qwen3: RMSNorm over each head's head_dim
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    if cfg.position == "rope":
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor,
                                    cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
    alibi = cfg.position == "alibi"
    if cache is not None:
        layer, slot = write_at
        # The whole cache rides in the layer scan's carry, so XLA updates it in place (a stacked scan output
        # would copy it every step).
        def write(stack, new):   # new (batch, length, kv_heads, head_dim) into (layers, batch, T, kv_heads, head_dim)
            return jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), (layer, 0, slot, 0, 0))

        cache = dict(cache, k=write(cache["k"], k), v=write(cache["v"], v))
    if cache is None or x.shape[1] > 1:
        out = attention(q, k, v, q_segment_ids=segment_ids, k_segment_ids=segment_ids, q_positions=positions,
                        k_positions=positions, impl=cfg.attention_impl, alibi=alibi, block=cfg.attention_block)
    else:
        # Slots not written yet carry segment id 0, so the one query can attend over all T slots (the causal
        # part of the mask is trivially true for a single query). Flash kernels (cudnn, splash) are built for
        # long query blocks; this matrix-vector product is memory-bound and the XLA reference does it as well.
        keys, values = cache["k"][layer], cache["v"][layer]                  # (batch, T, kv_heads, head_dim)
        out = attention(q, keys, values, q_segment_ids=segment_ids, k_segment_ids=cache["segment_ids"],
                        q_positions=positions, k_positions=cache["positions"], impl="xla", alibi=alibi)
    out = checkpoint_name(out, "attn_out")      # (batch, length, heads, head_dim)
    return project(out, p, "o", "blhk,hkd->bld", _weight(dtype)), cache


def decoder_layer(x, layer, segment_ids, positions, cfg: ModelConfig, cache=None, write_at=None):
    """One pre-norm block: x (batch, length, embed) in compute dtype -> (x, cache); see attention_block."""
    h = rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
    attn, cache = attention_block(h, layer["attn"], segment_ids, positions, cfg, cache, write_at)
    x = x + attn
    h = rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
    x = x + swiglu_mlp(h, layer["mlp"])
    if cache is not None:
        # Zero the padding positions of a prompt: a kernel may return NaN for a query with no visible key, and
        # a NaN value times a zero attention weight would still poison the real rows of the next layer.
        x = jnp.where(segment_ids[..., None] > 0, x, 0)
    return constrain(x, ("batch", "length", "act_embed")), cache


def _embed(params, tokens, cfg: ModelConfig) -> jax.Array:
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(jnp.dtype(cfg.compute_dtype))
    return constrain(x, ("batch", "length", "act_embed"))     # (batch, length, embed)


def _run_layers(params, x, segment_ids, positions, cfg: ModelConfig, cache=None, slot=None):
    """x through every layer -> (x before the final norm, cache); with a cache, each layer writes at `slot`."""
    def layer_fn(carry, layer_and_index):
        x, cache = carry
        layer, i = layer_and_index
        return decoder_layer(x, layer, segment_ids, positions, cfg, cache, (i, slot)), None

    if cfg.remat != "none" and cache is None:
        layer_fn = jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    layers = (params["layers"], jnp.arange(cfg.num_layers))
    if cfg.scan_layers:
        (x, cache), _ = jax.lax.scan(layer_fn, (x, cache), layers)
    else:
        for i in range(cfg.num_layers):
            (x, cache), _ = layer_fn((x, cache), jax.tree.map(lambda a: a[i], layers))
    return x, cache


def hidden_states(params, tokens, cfg: ModelConfig, segment_ids=None, positions=None) -> jax.Array:
    """Final-norm hidden states (batch, length, embed) in compute dtype; heads (LM, reward) read these.

    segment_ids: (batch, length), 1, 2, ... per packed document and 0 on padding; default one document.
    positions: (batch, length), restarting at 0 in each document; default 0..length-1."""
    batch, length = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x, _ = _run_layers(params, _embed(params, tokens, cfg), segment_ids, positions, cfg)
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


def target_log_z(params, h: jax.Array, targets: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(log Z, the target's logit), each (batch, length) float32, from final-norm hidden states h (batch, length,
    embed): what every token loss reads, without forming the (batch, length, vocab) logits (vocab_softmax.py).
    Equal to logsumexp and take_along_axis of logits_from_hidden(params, h, cfg)."""
    return log_z_and_target(h, lm_head_weight(params).astype(h.dtype), targets, valid_vocab=cfg.valid_vocab_size,
                            padded_logit=PADDED_LOGIT)


def forward(params, tokens, cfg: ModelConfig, segment_ids=None, positions=None) -> jax.Array:
    """tokens (batch, length) int32 -> logits (batch, length, vocab) float32."""
    return logits_from_hidden(params, hidden_states(params, tokens, cfg, segment_ids, positions), cfg)


def _last_logits(params, x, cfg: ModelConfig) -> jax.Array:
    h = rms_norm(x[:, -1:], params["final_norm"]["scale"], cfg.norm_eps)      # (batch, 1, embed)
    return logits_from_hidden(params, h, cfg)[:, 0]                           # (batch, vocab) float32


def prefill(params, tokens, segment_ids, positions, cfg: ModelConfig, cache_len: int):
    """Runs left-padded prompts; returns the last slot's logits (batch, vocab) and a cache of cache_len slots
    holding the prompts' keys and values in its first P.

    tokens, segment_ids, positions: (batch, P), as padding.pad_sequences(..., side="left") makes them."""
    batch, length = tokens.shape
    kv_shape = (cfg.num_layers, batch, cache_len, cfg.num_kv_heads, cfg.head_dim)
    empty = ((0, 0), (0, cache_len - length))
    cache = {"k": jnp.zeros(kv_shape, cfg.compute_dtype), "v": jnp.zeros(kv_shape, cfg.compute_dtype),
             "segment_ids": jnp.pad(segment_ids, empty), "positions": jnp.pad(positions, empty)}
    x, cache = _run_layers(params, _embed(params, tokens, cfg), segment_ids, positions, cfg, cache, 0)
    return _last_logits(params, x, cfg), cache


def decode_step(params, cache, tokens, positions, index, cfg: ModelConfig):
    """One token per row: tokens, positions (batch,) int32 go into cache slot `index` (a traced scalar, so one
    compiled step serves every slot); each attends over the cache. Returns (logits (batch, vocab), cache)."""
    segment_ids = jnp.ones((tokens.shape[0], 1), jnp.int32)                   # (batch, 1)
    positions = positions[:, None]                                            # (batch, 1)
    cache = dict(cache, segment_ids=jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index)),
                 positions=jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index)))
    x, cache = _run_layers(params, _embed(params, tokens[:, None], cfg), segment_ids, positions, cfg, cache, index)
    return _last_logits(params, x, cfg), cache
