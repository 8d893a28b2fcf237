"""Perplexity, bits per token, bits per character and bits per byte over long texts, with a sliding window.

Windowing (the scheme of Hugging Face's perplexity guide): windows of `window` tokens end every `stride`
tokens; each window scores only the targets no earlier window scored, so no token is scored twice, and
every token after the first window sees at least window - stride tokens of context. stride = window - 1
(the default) is the cheapest: consecutive windows share one token, the least context; smaller strides
buy context with compute. A bos token is prepended so the first text token is scored too; no eos is
appended.

Bits per character and per byte divide the same total NLL by the text's characters / UTF-8 bytes instead of
its tokens, so they compare models whose tokenizers differ; perplexity and bits per token do not.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.progress import ProgressLog
from jaxllm.objectives.lm import cross_entropy_sums
from jaxllm.model.padding import pad_sequences
from jaxllm.model.transformer import hidden_states, target_log_z

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll: float            # total negative log-likelihood, nats
    tokens: int           # tokens scored
    chars: int            # characters of the text scored
    bytes: int            # UTF-8 bytes of the text scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_token(self) -> float:
        return self.nll / max(self.tokens, 1) / math.log(2)

    @property
    def bits_per_char(self) -> float:
        return self.nll / max(self.chars, 1) / math.log(2)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / max(self.bytes, 1) / math.log(2)

    def __add__(self, other: "PerplexityResult") -> "PerplexityResult":
        return PerplexityResult(self.nll + other.nll, self.tokens + other.tokens, self.chars + other.chars,
                                self.bytes + other.bytes)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_token": self.bits_per_token,
                "bits_per_char": self.bits_per_char, "bits_per_byte": self.bits_per_byte, "nll": self.nll,
                "tokens": self.tokens, "chars": self.chars, "bytes": self.bytes}


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window over a stream of num_tokens: the window feeds tokens
    [begin, end) and scores targets first_target..end-1 (global indices; index 0 is never a target).

    The first window scores its window - 1 targets; each later one ends `stride` tokens further and
    starts `window` tokens before its end (the last one too, so it keeps a full window of context)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        # A window of W tokens makes W - 1 predictions; a bigger stride would leave targets unscored.
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    end = min(window, num_tokens)
    spans = [(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        spans.append((max(0, new_end - window), new_end, end))
        end = new_end
    return spans


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_nll(params, tokens, segment_ids, positions, targets, mask, cfg):
    """tokens, segment_ids, positions, targets, mask: (batch, window). Returns the summed NLL over masked
    targets."""
    h = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions)  # (batch, window, embed)
    return cross_entropy_sums(*target_log_z(params, h, targets, cfg), mask)["nll"]


def token_nll(params, cfg: ModelConfig, ids: Sequence[int], *, window: int | None = None,
              stride: int | None = None, batch_size: int = 8, what: str = "perplexity") -> tuple[float, int]:
    """(total NLL in nats, targets scored) of ids[1:] given the tokens before them, by sliding window.

    window defaults to the model's max_seq_len, stride to window - 1 (windows overlap by one token).
    Progress is logged under `what` (a long text takes minutes)."""
    window = window or cfg.max_seq_len
    stride = stride or window - 1
    if window > cfg.max_seq_len:
        raise ValueError(f"window {window} exceeds the model's context {cfg.max_seq_len}")
    if len(ids) < 2:
        # One token predicts nothing: a perplexity of exp(0 / 0) = 1 would be a made-up score.
        raise ValueError(f"{len(ids)} token(s): nothing to score (at least a context token and a target)")
    ids = np.asarray(ids, np.int32)
    spans = sliding_windows(len(ids), window, stride)
    rows = len(spans) + (-len(spans)) % batch_size        # pad to whole batches: one compiled shape
    tokens, seg, pos = pad_sequences([ids[begin:end] for begin, end, _ in spans], window, batch=rows)
    # Position j predicts token j + 1.
    targets, _, _ = pad_sequences([ids[begin + 1:end] for begin, end, _ in spans], window, batch=rows)
    mask = np.zeros((rows, window), np.float32)
    for r, (begin, end, first) in enumerate(spans):
        mask[r, first - begin - 1:end - begin - 1] = 1.0   # only the targets no earlier window scored
    total = 0.0
    progress = ProgressLog(what, len(spans), "windows", logger=log)
    for b in range(0, rows, batch_size):
        sl = slice(b, b + batch_size)
        total += float(_batch_nll(params, tokens[sl], seg[sl], pos[sl], targets[sl], mask[sl], cfg=cfg))
        progress.update(min(b + batch_size, len(spans)))
    progress.finish()
    scored = int(mask.sum())
    assert scored == len(ids) - 1, (scored, len(ids))       # every target exactly once
    return total, scored


def text_perplexity(params, cfg: ModelConfig, tokenizer, text: str, *, window: int | None = None,
                    stride: int | None = None, batch_size: int = 8, name: str = "text") -> PerplexityResult:
    """Scores every token of `text` (after a prepended bos) and normalises per token, character and byte.

    An empty (or blank) text is an error naming `name`: it has no tokens, and its "perplexity" would be 1."""
    if not text.strip():
        raise ValueError(f"{name}: empty text, nothing to score")
    ids = tokenizer.encode(text)
    if tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    else:   # without a bos the first token has no context and cannot be scored
        log.warning("tokenizer has no bos: the first token of each text is not scored")
    try:
        nll, n = token_nll(params, cfg, ids, window=window, stride=stride, batch_size=batch_size,
                           what=f"perplexity {name}")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return PerplexityResult(nll, n, len(text), len(text.encode("utf-8")))


def read_text(path: str | Path, jsonl_field: str = "text", max_chars: int | None = None) -> str:
    """A .txt file as is, or the `jsonl_field` of each line of a .jsonl file joined by blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        parts, skipped = [], Counter()
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    skipped["blank lines"] += 1
                    continue
                try:
                    value = json.loads(line)[jsonl_field]
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                except (KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno}: no field {jsonl_field!r}") from None
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{lineno}: field {jsonl_field!r} is {type(value).__name__}, not str")
                if not value.strip():
                    skipped[f"empty {jsonl_field!r} fields"] += 1
                    continue
                parts.append(value)
        if skipped:
            log.info("%s: skipped %s", path, ", ".join(f"{n} {what}" for what, n in skipped.items()))
        text = "\n\n".join(parts)
    else:
        text = path.read_text(encoding="utf-8-sig")      # -sig: a BOM is not text (botchan.txt has one)
    if not text.strip():
        raise ValueError(f"{path}: empty" + (f" (no non-blank {jsonl_field!r} field)" if path.suffix == ".jsonl"
                                             else "") + ": nothing to score")
    if max_chars is not None and len(text) > max_chars:
        log.info("%s: scoring the first %d of %d characters", path, max_chars, len(text))
        text = text[:max_chars]
    return text


def evaluate_perplexity(params, cfg: ModelConfig, tokenizer, sources: Mapping[str, str], *,
                        window: int | None = None, stride: int | None = None, batch_size: int = 8) -> dict:
    """Per-source and overall metrics. sources: name -> text. The overall figures pool the NLL, tokens,
    characters and bytes of all sources (a token-weighted mean, not a mean of per-source perplexities)."""
    per_source = {name: text_perplexity(params, cfg, tokenizer, text, window=window, stride=stride,
                                        batch_size=batch_size, name=name) for name, text in sources.items()}
    overall = sum(per_source.values(), PerplexityResult(0.0, 0, 0, 0))
    return {"overall": overall.to_dict(), "sources": {k: v.to_dict() for k, v in per_source.items()},
            "window": window or cfg.max_seq_len, "stride": stride or (window or cfg.max_seq_len) - 1}


def format_table(report: dict) -> str:
    header = f"{'source':<32} {'tokens':>9} {'ppl':>10} {'bits/tok':>9} {'bits/char':>9} {'bits/byte':>9}"
    lines = [header, "-" * len(header)]
    for name, m in list(report["sources"].items()) + [("overall", report["overall"])]:
        lines.append(f"{name[-32:]:<32} {m['tokens']:>9} {m['perplexity']:>10.3f} {m['bits_per_token']:>9.4f} "
                     f"{m['bits_per_char']:>9.4f} {m['bits_per_byte']:>9.4f}")
    return "\n".join(lines)
