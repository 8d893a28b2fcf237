"""Autoregressive generation: sampling and the host loop around the decoder's KV cache (`transformer.prefill`,
then one `transformer.decode_step` per token; the cache layout is described there).

The prompts of a batch are LEFT-padded to a common length P (`padding.pad_sequences`), so every row writes
its t-th new token into the same cache slot P+t. Positions start at 0 on each row's first real token, so a
padded row computes exactly what it would alone. The cache has a fixed size T (the prompt bucket plus the
longest requested continuation, rounded up), so the decode step compiles once per (batch, T) bucket and never
per token.

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
from jaxllm.distributed import to_host
from jaxllm.model.padding import bucket_batch, bucket_length, pad_sequences, round_up
from jaxllm.model.transformer import decode_step, forward, prefill

TOP_LOGPROBS = 5          # alternatives reported per token (the OpenAI completions API allows up to 5)
CACHE_BUCKET = 64         # cache sizes are rounded up to a multiple of this (fewer compiles)


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
    stop_id: int | None = None            # the stop id that ended the row (not in tokens), if one did
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""                        # decoded continuation (stop string and anything after it cut off)
    finish_reason: str | None = None      # "stop" (stop id or string) | "length"


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


def row_sampling(per_row: Sequence[SamplingParams], seed_by_row: bool) -> dict[str, np.ndarray]:
    """The per-row sampling arrays that `sample_tokens` reads (seeds, rows, temperature, top_k, top_p), each
    (batch,). seed_by_row: the rows are one request sharing a seed, so row i draws with (seed, i); otherwise each
    row is its own request and draws with (seed, 0), whatever its place in the batch."""
    return {"seeds": np.array([sp.seed for sp in per_row], np.uint32),
            "rows": np.arange(len(per_row), dtype=np.uint32) if seed_by_row else np.zeros(len(per_row), np.uint32),
            "temperature": np.array([sp.temperature for sp in per_row], np.float32),
            "top_k": np.array([sp.top_k for sp in per_row], np.int32),
            "top_p": np.array([sp.top_p for sp in per_row], np.float32)}


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill_and_sample(params, tokens, segment_ids, positions, sampling_arrays, cfg, cache_len):
    """The prompts' first new tokens (sample_tokens' four arrays) and the cache; sampling_arrays: row_sampling's."""
    logits, cache = prefill(params, tokens, segment_ids, positions, cfg, cache_len)
    return sample_tokens(logits, step=0, **sampling_arrays), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_and_sample(params, cache, tokens, positions, index, step, sampling_arrays, cfg):
    """Feeds tokens (batch,) at cache slot `index`, samples the next ones (draw number `step`)."""
    logits, cache = decode_step(params, cache, tokens, positions, index, cfg)
    return sample_tokens(logits, step=step, **sampling_arrays), cache


def decode_compilations() -> int:
    """How many decode-step programs have been compiled in this process (tests: no recompiles per token)."""
    return decode_and_sample._cache_size()


# ----------------------------------------------------------------------------------------------------
# The host loop.

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
             on_token: Callable[[int, Completion], None] | None = None,
             place: Callable[[np.ndarray], jax.Array] | None = None) -> list[Completion]:
    """Continues each prompt (a list of token ids). `sampling` is one SamplingParams for all rows (row i
    then draws with seed (seed, i)) or one per row. With a tokenizer, `Completion.text` is filled and stop
    strings apply. `on_token(row, completion)` runs after each accepted token (for streaming).

    place: params sharded over a mesh, possibly across processes (RL's rollouts on the training mesh). Every
    process then passes the same prompts (the whole batch); `place` puts each host array of the batch on the
    mesh split along its leading axis (sharding.put_batch), so each device group computes its rows, and the
    sampled tokens are gathered to every process, which all run the same loop and stop at the same step."""
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
    padded_batch = bucket_batch(batch)
    prompt_len = bucket_length(max(len(p) for p in prompts))
    cache_len = round_up(prompt_len + max_new, CACHE_BUCKET)
    # Rows beyond `batch` are all padding; their samples are discarded.
    tokens, seg, pos = pad_sequences(prompts, prompt_len, side="left", batch=padded_batch)
    sampling_arrays = row_sampling(per_row + [per_row[0]] * (padded_batch - batch),
                                   seed_by_row=not isinstance(sampling, (list, tuple)))
    next_pos = seg.sum(axis=1, dtype=np.int32)                               # position of the token being fed
    trackers = [_TextTracker(tokenizer, p, sp.stop_strings) if tokenizer is not None else None
                for p, sp in zip(prompts, per_row)]
    done = [False] * batch

    if place is not None:
        tokens, seg, pos, next_pos = place(tokens), place(seg), place(pos), place(next_pos)
        sampling_arrays = {k: place(v) for k, v in sampling_arrays.items()}
    out, cache = prefill_and_sample(params, tokens, seg, pos, sampling_arrays, cfg=cfg, cache_len=cache_len)
    for step in range(max_new):
        # Dispatch the next step before reading this one's tokens: the host bookkeeping below overlaps the
        # device's work (JAX dispatch is asynchronous). The last step's extra work is discarded.
        pending = None
        if step + 1 < max_new and not all(done):
            pending = decode_and_sample(params, cache, out[0], next_pos + step, prompt_len + step, step + 1,
                                        sampling_arrays, cfg=cfg)
        new_tok, chosen, top_ids, top_lp = (to_host(a) for a in out)
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
        result.stop_id = token
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
    longest = max(len(s) for s in sequences)
    if longest > cfg.max_seq_len:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's context {cfg.max_seq_len}")
    # Right padding here: one full forward pass, no cache; segment id 0 masks the padding.
    tokens, seg, pos = pad_sequences(sequences, bucket_length(longest), side="right",
                                     batch=bucket_batch(len(sequences)))
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

