"""Autoregressive generation with a KV cache: one prefill pass over the prompts, then one jitted decode step
per token.

Layout (why left padding): the prompts of a batch are LEFT-padded to a common length P, so every row's last
prompt token sits in slot P-1 and every row writes its t-th new token into the same slot P+t. The decode
step then updates the cache with one `dynamic_update_slice` at a scalar index instead of a per-row scatter.
Padding slots carry segment id 0, which `attention()` masks; positions start at 0 on each row's first real
token, so a padded row computes exactly what it would alone (RoPE and ALiBi see the same positions).

The cache has a fixed size T (the prompt bucket plus the longest requested continuation, rounded up), so the
decode step compiles once per (batch, T) bucket and never per token. Slots not yet written also carry
segment id 0, so a one-token query can attend over the whole cache: `document_mask`'s causal part is
trivially true for the last query position, and the segment ids do the rest.

Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top-k tokens
and then to the smallest top-p nucleus. Each row draws with the key fold_in(fold_in(key(seed), row), t), so
a seeded request gives the same tokens whatever else shares its batch. Log-probabilities reported are
those of the model's own distribution (temperature 1, no truncation), as the OpenAI API reports them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.model.attention import attention
from jaxllm.model.layers import apply_rope, rms_norm, swiglu_mlp
from jaxllm.model.transformer import forward, logits_from_hidden

TOP_LOGPROBS = 5          # alternatives reported per token (the OpenAI completions API allows up to 5)
_PROMPT_BUCKET = 16       # prompt lengths are rounded up to a multiple of this (fewer compiles)
_CACHE_BUCKET = 64        # cache sizes likewise


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row is continued."""
    max_new_tokens: int = 64
    temperature: float = 0.0              # 0 = greedy
    top_k: int = 0                        # 0 = no top-k truncation
    top_p: float = 1.0                    # 1 = no nucleus truncation
    stop_ids: tuple[int, ...] = ()        # token ids that end the row (not included in the output)
    stop_strings: tuple[str, ...] = ()    # strings that end the row (text is cut before them)
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Completion:
    """One row's continuation; filled in token by token (on_token sees it growing)."""
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)           # of each chosen token
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""                        # decoded continuation (stop string and anything after it cut off)
    finish_reason: str | None = None      # "stop" (stop id or string) | "length"


# ----------------------------------------------------------------------------------------------------
# The cached decoder.

def _qkv(h, p, positions, cfg: ModelConfig):
    dtype = h.dtype
    q = jnp.einsum("bld,dhk->blhk", h, p["q"].astype(dtype))     # (batch, length, heads, head_dim)
    k = jnp.einsum("bld,dhk->blhk", h, p["k"].astype(dtype))     # (batch, length, kv_heads, head_dim)
    v = jnp.einsum("bld,dhk->blhk", h, p["v"].astype(dtype))     # (batch, length, kv_heads, head_dim)
    if cfg.position == "rope":
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
    return q, k, v


def _mlp_residual(x, layer, cfg: ModelConfig):
    h = rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
    m = layer["mlp"]
    return x + swiglu_mlp(h, m["gate"], m["up"], m["down"])


def _embed(params, tokens, cfg: ModelConfig):
    return jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(jnp.dtype(cfg.compute_dtype))


def _last_logits(params, x, cfg: ModelConfig):
    h = rms_norm(x[:, -1:], params["final_norm"]["scale"], cfg.norm_eps)      # (batch, 1, embed)
    return logits_from_hidden(params, h, cfg)[:, 0]                           # (batch, vocab) float32


def _prefill(params, tokens, segment_ids, positions, cfg: ModelConfig, cache_len: int):
    """Runs the (left-padded) prompts, returns the last position's logits and a cache of cache_len slots.

    tokens, segment_ids, positions: (batch, P). The prompt attends to itself only (the cache's empty slots
    would break document_mask's 'queries are the last keys' convention for a multi-token query)."""
    x = _embed(params, tokens, cfg)                                           # (batch, P, embed)

    def layer_fn(x, layer):
        h = rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
        q, k, v = _qkv(h, layer["attn"], positions, cfg)
        out = attention(q, k, v, q_segment_ids=segment_ids, k_segment_ids=segment_ids, q_positions=positions,
                        k_positions=positions, impl=cfg.attention_impl, alibi=cfg.position == "alibi")
        x = x + jnp.einsum("blhk,hkd->bld", out, layer["attn"]["o"].astype(x.dtype))
        # Zero the padding positions: a kernel may return NaN for a query with no visible key, and a NaN
        # value times a zero attention weight would still poison the real rows of the next layer.
        x = jnp.where(segment_ids[..., None] > 0, _mlp_residual(x, layer, cfg), 0)
        return x, (k, v)

    x, (ks, vs) = jax.lax.scan(layer_fn, x, params["layers"])   # ks: (layers, batch, P, kv_heads, head_dim)
    extra = cache_len - tokens.shape[1]
    pad5 = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    cache = {"k": jnp.pad(ks, pad5), "v": jnp.pad(vs, pad5),                  # (layers, batch, T, kv_heads, head_dim)
             "segment_ids": jnp.pad(segment_ids, ((0, 0), (0, extra))),       # (batch, T); 0 = empty or padding
             "positions": jnp.pad(positions, ((0, 0), (0, extra)))}           # (batch, T)
    return _last_logits(params, x, cfg), cache


def _decode(params, cache, tokens, positions, index, cfg: ModelConfig):
    """One token per row: tokens, positions (batch,) go into cache slot `index` (a traced scalar), then the
    query attends over the whole cache. Returns (logits (batch, vocab), updated cache)."""
    batch = tokens.shape[0]
    seg_new = jnp.ones((batch, 1), jnp.int32)
    pos_new = positions[:, None]                                              # (batch, 1)
    seg = jax.lax.dynamic_update_slice(cache["segment_ids"], seg_new, (0, index))
    pos = jax.lax.dynamic_update_slice(cache["positions"], pos_new, (0, index))
    x = _embed(params, tokens[:, None], cfg)                                  # (batch, 1, embed)
    # Flash kernels (cudnn, splash) are built for long query blocks; a one-row query against the cache is
    # a memory-bound matrix-vector product that the XLA reference handles as well, on every platform.
    impl = "xla"

    def layer_fn(carry, layer_and_index):
        x, ck, cv = carry                                        # ck: (layers, batch, T, kv_heads, head_dim)
        layer, i = layer_and_index
        h = rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
        q, k, v = _qkv(h, layer["attn"], pos_new, cfg)                        # k: (batch, 1, kv_heads, head_dim)
        # The full cache rides in the carry so XLA updates it in place (a stacked scan output would copy it).
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, index, 0, 0))
        keys, values = ck[i], cv[i]                                           # (batch, T, kv_heads, head_dim)
        out = attention(q, keys, values, q_segment_ids=seg_new, k_segment_ids=seg, q_positions=pos_new,
                        k_positions=pos, impl=impl, alibi=cfg.position == "alibi")
        x = x + jnp.einsum("blhk,hkd->bld", out, layer["attn"]["o"].astype(x.dtype))
        return (_mlp_residual(x, layer, cfg), ck, cv), None

    layer_ids = jnp.arange(cfg.num_layers)
    (x, ck, cv), _ = jax.lax.scan(layer_fn, (x, cache["k"], cache["v"]), (params["layers"], layer_ids))
    new_cache = {"k": ck, "v": cv, "segment_ids": seg, "positions": pos}
    return _last_logits(params, x, cfg), new_cache


# ----------------------------------------------------------------------------------------------------
# Sampling.

def sample_tokens(logits, seeds, rows, step, temperature, top_k, top_p):
    """logits (batch, vocab) float32; seeds, rows (batch,) uint32; step scalar; temperature, top_p (batch,)
    float32; top_k (batch,) int32 (0 = off). Returns (tokens, chosen logprobs, top ids, top logprobs)."""
    vocab = logits.shape[-1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)                            # (batch, vocab)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The vocabulary sort below is skipped (lax.cond) when every row is greedy.
    tokens = jax.lax.cond(jnp.any(temperature > 0),
                          lambda: _truncated_sample(logits, seeds, rows, step, temperature, top_k, top_p, greedy),
                          lambda: greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, vocab))      # (batch, TOP_LOGPROBS)
    return tokens, chosen, top_ids, top_lp


def _truncated_sample(logits, seeds, rows, step, temperature, top_k, top_p, greedy):
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)                                     # (batch, vocab), descending
    # top-k: keep logits >= the k-th largest.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)            # (batch, 1)
    ranks = jnp.arange(vocab)[None, :]
    ordered = jnp.where(ranks < k[:, None], ordered, -jnp.inf)
    # top-p: the smallest prefix of the (top-k) distribution whose mass reaches p; a token is kept when
    # the mass before it is still below p, so the most likely token is always kept.
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)       # (batch, 1)
    masked = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)

    def draw(seed, row, row_logits):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), step)
        return jax.random.categorical(key, row_logits)

    sampled = jax.vmap(draw)(seeds, rows, masked)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill_and_sample(params, tokens, segment_ids, positions, knobs, cfg, cache_len):
    logits, cache = _prefill(params, tokens, segment_ids, positions, cfg, cache_len)
    return sample_tokens(logits, knobs["seeds"], knobs["rows"], 0, knobs["temperature"], knobs["top_k"],
                         knobs["top_p"]), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_and_sample(params, cache, tokens, positions, index, step, knobs, cfg):
    logits, cache = _decode(params, cache, tokens, positions, index, cfg)
    return sample_tokens(logits, knobs["seeds"], knobs["rows"], step, knobs["temperature"], knobs["top_k"],
                         knobs["top_p"]), cache


def decode_compilations() -> int:
    """How many decode-step programs have been compiled in this process (tests: no recompiles per token)."""
    return _decode_and_sample._cache_size()


# ----------------------------------------------------------------------------------------------------
# The host loop.

def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucket_length(n: int) -> int:
    """n rounded up to a multiple of 16 below 64, then to a quarter of its power of two (64, 80, 96, 112, 128,
    160, ...): at most 25% padding, and a handful of compiled prefill programs per octave of prompt length."""
    if n <= 4 * _PROMPT_BUCKET:
        return _round_up(n, _PROMPT_BUCKET)
    return _round_up(n, 1 << (n.bit_length() - 3))


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions), each (batch, length) int32, prompts right-aligned."""
    batch = len(prompts)
    tokens = np.zeros((batch, length), np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        if n:
            tokens[i, length - n:] = p
            seg[i, length - n:] = 1
            pos[i, length - n:] = np.arange(n)
    return tokens, seg, pos


class _TextTracker:
    """The decoded continuation of one row, with stop strings cut and unsafe tails held back.

    Text is decoded with a few prompt tokens as left context, so SentencePiece's leading-space rule gives
    ' sat' after 'The cat', not 'sat'."""

    def __init__(self, tokenizer, prompt: Sequence[int], stop_strings: Sequence[str]):
        self.tok, self.stops = tokenizer, [s for s in stop_strings if s]
        self.context = [int(t) for t in prompt[-8:]]
        self.context_text = tokenizer.decode(self.context) if self.context else ""

    def update(self, tokens: list[int], final: bool = False) -> tuple[str, bool]:
        """(text, stopped). Unless final, the text never ends in a partial stop string or a partial UTF-8
        character, since either may still change with the next token."""
        full = self.tok.decode(self.context + tokens)
        text = full[len(self.context_text):] if full.startswith(self.context_text) else full
        for s in self.stops:
            cut = text.find(s)
            if cut >= 0:
                return text[:cut], True
        if final:
            return text, False
        hold = 0
        for s in self.stops:
            hold = max([hold] + [n for n in range(1, len(s)) if text.endswith(s[:n])])
        return text[:len(text) - hold].rstrip("\ufffd"), False


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *, tokenizer=None,
             on_token: Callable[[int, Completion], None] | None = None) -> list[Completion]:
    """Continues each prompt (a list of token ids). `sampling` is one SamplingParams for all rows (row i
    then draws with seed (seed, i)) or one per row. With a tokenizer, `Completion.text` is filled and stop
    strings apply. `on_token(row, completion)` runs after each accepted token (for streaming)."""
    batch = len(prompts)
    if batch == 0:
        return []
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * batch
    if len(per_row) != batch:
        raise ValueError(f"{len(per_row)} sampling params for {batch} prompts")
    for i, sp in enumerate(per_row):
        sp.validate()
        if not prompts[i]:
            raise ValueError(f"prompt {i} is empty (put at least a bos token in it)")
        if len(prompts[i]) >= cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompts[i])} tokens; the model's context is {cfg.max_seq_len}")
    # Never run past the context the model was built for.
    budgets = [min(sp.max_new_tokens, cfg.max_seq_len - len(p)) for sp, p in zip(per_row, prompts)]
    results = [Completion(prompt=[int(t) for t in p]) for p in prompts]
    max_new = max(budgets)
    if max_new == 0:
        for r in results:
            r.finish_reason = "length"
        return results

    # Bucket the shapes (batch to a power of two, lengths to multiples) so servers reuse compiled programs.
    padded_batch = 1 << (batch - 1).bit_length()
    prompt_len = bucket_length(max(len(p) for p in prompts))
    cache_len = _round_up(prompt_len + max_new, _CACHE_BUCKET)
    rows = list(prompts) + [[int(prompts[0][0])]] * (padded_batch - batch)    # dummy rows, discarded
    knob_rows = per_row + [per_row[0]] * (padded_batch - batch)
    single = not isinstance(sampling, (list, tuple))
    knobs = {"seeds": np.array([sp.seed for sp in knob_rows], np.uint32),
             "rows": np.array([i if single else 0 for i in range(padded_batch)], np.uint32),
             "temperature": np.array([sp.temperature for sp in knob_rows], np.float32),
             "top_k": np.array([sp.top_k for sp in knob_rows], np.int32),
             "top_p": np.array([sp.top_p for sp in knob_rows], np.float32)}
    tokens, seg, pos = left_pad(rows, prompt_len)
    next_pos = np.array([len(p) for p in rows], np.int32)                     # position of the token being fed
    trackers = [_TextTracker(tokenizer, p, sp.stop_strings) if tokenizer is not None else None
                for p, sp in zip(prompts, per_row)]
    done = [False] * batch

    out, cache = _prefill_and_sample(params, tokens, seg, pos, knobs, cfg=cfg, cache_len=cache_len)
    for step in range(max_new):
        # Dispatch the next step before reading this one's tokens: the host bookkeeping below overlaps the
        # device's work (JAX dispatch is asynchronous). The last step's extra work is discarded.
        pending = None
        if step + 1 < max_new and not all(done):
            pending = _decode_and_sample(params, cache, out[0], next_pos + step, prompt_len + step, step + 1,
                                         knobs, cfg=cfg)
        new_tok, chosen, top_ids, top_lp = (np.asarray(a) for a in out)
        for i in range(batch):
            if done[i]:
                continue
            _accept(results[i], per_row[i], trackers[i], budgets[i], int(new_tok[i]), float(chosen[i]),
                    top_ids[i], top_lp[i])
            done[i] = results[i].finish_reason is not None
            if on_token is not None and (results[i].tokens or done[i]):
                on_token(i, results[i])
        if pending is None:
            break
        out, cache = pending
    return results


def _accept(result: Completion, sp: SamplingParams, tracker, budget: int, token: int, logprob: float,
            top_ids, top_lp) -> None:
    """Appends one sampled token to a row, or ends the row (stop id, stop string, length budget)."""
    if token in sp.stop_ids:
        result.finish_reason = "stop"
    else:
        result.tokens.append(token)
        result.logprobs.append(logprob)
        result.top_logprobs.append([(int(t), float(l)) for t, l in zip(top_ids, top_lp)])
        if len(result.tokens) >= budget:
            result.finish_reason = "length"
    if tracker is not None:
        result.text, stopped = tracker.update(result.tokens, final=result.finish_reason is not None)
        if stopped:
            result.finish_reason = "stop"


# ----------------------------------------------------------------------------------------------------
# Scoring (echo / logprobs of given text).

@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(params, tokens, segment_ids, positions, cfg):
    logits = forward(params, tokens, cfg, segment_ids=segment_ids, positions=positions)   # (batch, L, vocab)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # (batch, L-1)
    top_lp, top_ids = jax.lax.top_k(logprobs[:, :-1], min(TOP_LOGPROBS, logits.shape[-1]))
    return chosen, top_ids, top_lp


def score_tokens(params, cfg: ModelConfig, sequences: Sequence[Sequence[int]]) -> list[dict]:
    """Log-probability of every token given the ones before it (the first token has none).

    Returns per sequence {"logprobs": [None, lp1, ...], "top_logprobs": [None, [(id, lp), ...], ...]}."""
    length = _round_up(max(len(s) for s in sequences), _PROMPT_BUCKET)
    if length > cfg.max_seq_len:
        raise ValueError(f"a sequence of {max(len(s) for s in sequences)} tokens exceeds the model's context "
                         f"{cfg.max_seq_len}")
    # Right padding here: one full forward pass, no cache; segment id 0 masks the padding.
    batch = 1 << (len(sequences) - 1).bit_length()
    tokens = np.zeros((batch, length), np.int32)
    seg = np.zeros((batch, length), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)], seg[i, :len(s)] = s, 1
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    chosen, top_ids, top_lp = (np.asarray(a) for a in _score(params, tokens, seg, pos, cfg=cfg))
    out = []
    for i, s in enumerate(sequences):
        n = len(s)
        out.append({"logprobs": [None] + [float(x) for x in chosen[i, :n - 1]],
                    "top_logprobs": [None] + [[(int(t), float(l)) for t, l in zip(top_ids[i, j], top_lp[i, j])]
                                              for j in range(n - 1)]})
    return out


def generate_text(params, cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                  sampling: SamplingParams = SamplingParams(), add_bos: bool = True) -> list[str]:
    """Plain-text convenience: encodes prompts (with bos), stops at the tokenizer's eos, returns the texts."""
    stop = tuple(sampling.stop_ids) or ((tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ())
    sampling = dataclasses.replace(sampling, stop_ids=stop)
    ids = [tokenizer.encode(p, add_bos=add_bos and tokenizer.bos_id >= 0) for p in prompts]
    return [c.text for c in generate(params, cfg, ids, sampling, tokenizer=tokenizer)]

