"""`jaxllm data plan`: the GPT-3-style mixture table of a config, before any compute is spent.

For each source: documents, size in tokens, weight, tokens it contributes over the run and the epochs that
makes (tokens in the run / tokens available). Sizes are counted exactly for prepared directories (their
manifest) and for text sources of at most `sample` documents; larger text sources are estimated from a
random sample of `sample` documents (marked `~`); without a tokenizer, text is estimated by a rule of thumb
(marked `≈`: one token per CJK character, four characters per token otherwise). bos/eos are counted as the
pipeline adds them, and the held-out share (`eval_fraction`) is taken off each source's size.
The run's budget is train.steps × train.batch_size × data.seq_len tokens; with a weight schedule, each
phase contributes its own steps. A "stop" source never gives more than one epoch: the excess goes to the
other sources in proportion to their weights, as the pipeline does.
"""
from __future__ import annotations

import dataclasses
import random
import re

from jaxllm.data.mixture import component_name
from jaxllm.data.sources import open_source

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclasses.dataclass
class PlanRow:
    name: str
    spec: str
    documents: int
    tokens: float         # available for training (held-out share removed), bos/eos included
    how: str              # "counted" | "sampled" | "heuristic"
    weight: float         # share of the run's tokens (normalised, averaged over the schedule)
    run_tokens: float     # tokens this source contributes over the run
    epochs: float
    note: str = ""


def _estimate(source, tokenizer, extra: int, sample: int, seed: int) -> tuple[float, str]:
    n = len(source)
    if source.tokens is not None:
        return float(source.tokens + n * extra), "counted"
    idx = range(n) if n <= sample else random.Random(seed).sample(range(n), sample)
    texts = [source.records[i] for i in idx]
    if tokenizer is None:
        counted = sum(len(_CJK.findall(t)) + len(_CJK.sub("", t)) / 4 for t in texts)
        how = "heuristic"
    else:
        encode = getattr(tokenizer, "encode_batch", None)
        lengths = encode(texts) if encode else [tokenizer.encode(t) for t in texts]
        counted = sum(len(x) for x in lengths)
        how = "counted" if n <= sample else "sampled"
    return (counted + len(texts) * extra) * n / max(len(texts), 1), how


def _shares(weights, available, run_tokens, stops) -> list[float]:
    """Tokens per source for `run_tokens` at `weights`, capping "stop" sources at what they hold."""
    got = [0.0] * len(weights)
    live = [i for i, w in enumerate(weights) if w > 0]
    left = run_tokens
    while live and left > 1e-9:
        total_w = sum(weights[i] for i in live)
        give = {i: left * weights[i] / total_w for i in live}
        capped = [i for i in live if stops[i] and got[i] + give[i] > available[i]]
        if not capped:
            for i in live:
                got[i] += give[i]
            break
        for i in capped:
            left -= available[i] - got[i]
            got[i] = available[i]
            live.remove(i)
    return got


def plan(cfg, tokenizer=None, *, sample: int = 1000, budget_tokens: float | None = None,
         warn_epochs: float = 4.0) -> tuple[list[PlanRow], list[str], float]:
    """(rows, warnings, run tokens) for a Config."""
    data, train = cfg.data, cfg.train
    extra = int(data.add_bos) + int(data.add_eos)
    keep = 1.0 if data.eval_sources else 1.0 - data.eval_fraction
    run_tokens = float(budget_tokens or train.steps * train.batch_size * data.seq_len)
    rows, names = [], []
    for spec in data.sources:
        src = open_source(spec, jsonl_field=data.jsonl_field, text_split=data.text_split,
                          on_error=getattr(data, "on_error", "raise"), piece_chars=data.document_piece_chars)
        tokens, how = _estimate(src, tokenizer, extra, sample, train.seed)
        names.append(component_name(spec, names))
        rows.append(PlanRow(names[-1], spec, len(src), tokens * keep, how, 0.0, 0.0, 0.0))
    available = [r.tokens for r in rows]
    stops = [e == "stop" for e in (data.exhaustion or ("repeat",) * len(rows))]
    if data.weights or data.weight_schedule:
        phases = ([(0, data.weights)] if data.weights and (not data.weight_schedule or data.weight_schedule[0][0] > 0)
                  else []) + [tuple(p) for p in data.weight_schedule]
    else:
        phases = [(0, tuple(available))]   # natural proportion
    steps_total = run_tokens / (train.batch_size * data.seq_len)
    got = [0.0] * len(rows)
    for k, (start, weights) in enumerate(phases):
        end = phases[k + 1][0] if k + 1 < len(phases) else steps_total
        phase_tokens = max(0.0, min(end, steps_total) - start) * train.batch_size * data.seq_len
        room = [a - g for a, g in zip(available, got)]
        for i, t in enumerate(_shares([float(w) for w in weights], room, phase_tokens, stops)):
            got[i] += t
    warnings = []
    for row, g in zip(rows, got):
        row.run_tokens, row.weight = g, g / run_tokens
        row.epochs = g / row.tokens if row.tokens else 0.0
        if row.epochs > warn_epochs:
            warnings.append(f"WARNING: {row.name} ({row.spec}) would be repeated {row.epochs:.1f} times "
                            f"(> {warn_epochs:g} epochs): add data, lower its weight, or accept the repetition")
        if stops[rows.index(row)] and row.epochs >= 0.999:
            row.note = "stops after 1 epoch; the others take its share"
    if sum(got) < run_tokens * 0.999:
        warnings.append(f"WARNING: the sources run out after {sum(got):.3g} of {run_tokens:.3g} tokens "
                        f"(every weighted source is 'stop'): training would end early")
    return rows, warnings, run_tokens


def human(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_table(rows: list[PlanRow], warnings: list[str], run_tokens: float, sample: int) -> str:
    mark = {"counted": " ", "sampled": "~", "heuristic": "≈"}
    header = ("source", "documents", "tokens", "weight", "tokens in run", "epochs", "")
    body = [(r.name, f"{r.documents:,}", mark[r.how] + human(r.tokens), f"{100 * r.weight:.1f}%",
             human(r.run_tokens), f"{r.epochs:.2f}", r.note) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 or i == len(cells) - 1 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [f"run: {human(run_tokens)} tokens", line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    hows = {r.how for r in rows}
    if "sampled" in hows:
        out.append(f"~ estimated from a random sample of {sample} documents")
    if "heuristic" in hows:
        out.append("≈ no tokenizer: 1 token per CJK character, 4 characters per token otherwise (pass --tokenizer)")
    return "\n".join(out + warnings)
