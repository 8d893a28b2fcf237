"""Pipelines of the post-training objectives: SFT rows and preference pairs.

Records are encoded once at start-up (instruction sets are small next to pretraining corpora), so every
skip is counted before training and logged: too long, no trainable token left. The streams are Grain
pipelines, seeded and checkpointable like the pretraining one.

SFT rows pack whole samples greedily (a sample is never split across rows; attention never crosses samples
through segment ids; positions restart per sample). Loss falls on assistant tokens only.
Preference batches hold (chosen, rejected) pairs side by side: arrays of shape (batch, 2, seq_len), plus any
per-pair arrays an objective attached to the encoded pairs (`pair["arrays"]`; DPO's cached reference
log-probabilities), which the pipeline carries without knowing what they are.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Sequence

import grain
import numpy as np

from jaxllm.config import Config, ConfigError
from jaxllm.data.formats import load_pairs
from jaxllm.data.sources import split_heldout
from jaxllm.data import templates
from jaxllm.data.templates import ChatTemplate, encode_chat, get_template, run_template


@dataclasses.dataclass
class Encoded:
    ids: list[int]
    train_mask: list[int]   # 1 where the token is a training target (an assistant token)


def _fit(ids: list[int], mask: list[int], seq_len: int, overlong: str, keep: int = 1):
    """Cuts the prompt from the left (keeping the first `keep` tokens, the bos) until it fits, or gives up.
    Returns (ids, mask) or None when the sample cannot be kept."""
    if len(ids) <= seq_len:
        return ids, mask
    if shortest_fit(ids, mask, overlong, keep) > seq_len:     # skipping, or the response alone does not fit
        return None
    excess = len(ids) - seq_len
    return ids[:keep] + ids[keep + excess:], mask[:keep] + mask[keep + excess:]


def shortest_fit(ids: list[int], mask: list[int], overlong: str, keep: int = 1) -> int:
    """The smallest seq_len at which `_fit` keeps this sample (its prompt cut to `keep` tokens at most)."""
    if overlong != "truncate_prompt":
        return len(ids)
    first_target = mask.index(1) if 1 in mask else len(mask)
    return len(ids) - max(first_target - keep, 0)


def seq_len_keeping(lengths: Sequence[int], share: float = 0.95) -> int:
    """The smallest seq_len that keeps `share` of the samples whose shortest fits are `lengths`."""
    ordered = sorted(lengths)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


TOO_LONG_WARNING = 0.10   # dropping more than this share as too long is a warning with a suggested seq_len


def too_long_summary(what: str, lengths: Sequence[int], too_long: int, *, seq_len: int, overlong: str) -> str:
    """"120 of 300 preference pairs (40.0%) are too long for data.seq_len=256 (overlong=...); data.seq_len=612
    would keep 95%", from the shortest fit of every sample; logged as a warning above TOO_LONG_WARNING."""
    if not lengths:
        return f"no {what} given"
    text = (f"{too_long} of {len(lengths)} {what} ({too_long / max(len(lengths), 1):.1%}) are too long for "
            f"data.seq_len={seq_len} (overlong={overlong}); data.seq_len={seq_len_keeping(lengths)} would keep 95%")
    if too_long > TOO_LONG_WARNING * len(lengths):
        logging.warning(text)
    return text


def _skip_counts(skipped: dict) -> str:
    return ", ".join(f"{v} skipped: {k}" for k, v in skipped.items())


def encode_sft(conversations: Sequence[list[dict]], tokenizer, *, template: "ChatTemplate | str", seq_len: int,
               overlong: str = "skip") -> list[Encoded]:
    """Conversations -> token ids and assistant masks (templates.encode_chat: every answer and its end marker);
    skips are counted and logged, and dropping more than TOO_LONG_WARNING of them as too long warns with the
    seq_len that would keep 95%."""
    template = get_template(template)
    out, skipped, lengths = [], {"too long": 0, "no trainable token": 0}, []
    for conv in conversations:
        ids, mask = encode_chat(conv, template, tokenizer)
        lengths.append(shortest_fit(ids, mask, overlong))
        fitted = _fit(ids, mask, seq_len, overlong)
        if fitted is None:
            skipped["too long"] += 1
            continue
        ids, mask = fitted
        if sum(mask[1:]) == 0:                 # the first token is never a target
            skipped["no trainable token"] += 1
            continue
        out.append(Encoded(ids, mask))
    summary = too_long_summary("SFT samples", lengths, skipped["too long"], seq_len=seq_len, overlong=overlong)
    logging.info("SFT samples: %d kept, %s (overlong=%s, seq_len=%d)", len(out), _skip_counts(skipped), overlong,
                 seq_len)
    if not out:
        hint = f": {summary}" if skipped["too long"] else ""
        raise ValueError(f"no SFT sample is left after encoding ({_skip_counts(skipped)}){hint}")
    return out


def sample_rows(samples: Sequence[Encoded], seq_len: int) -> list[dict]:
    """Greedy packing of whole samples into rows (a helper for tests and tools; the pipeline streams)."""
    ds = grain.MapDataset.source([dataclasses.asdict(s) for s in samples]).to_iter_dataset()
    return list(_SftPackDataset(ds, seq_len, flush=True))


def _row(samples: list[dict], seq_len: int) -> dict:
    tokens = np.zeros(seq_len, np.int32)
    targets = np.zeros(seq_len, np.int32)
    loss_mask = np.zeros(seq_len, np.float32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    at = 0
    for seg, s in enumerate(samples, 1):
        n = len(s["ids"])
        ids = np.asarray(s["ids"], np.int32)
        tokens[at:at + n] = ids
        targets[at:at + n - 1] = ids[1:]                                   # next token within the sample
        loss_mask[at:at + n - 1] = np.asarray(s["train_mask"][1:], np.float32)
        segment_ids[at:at + n] = seg
        positions[at:at + n] = np.arange(n)
        at += n
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions}


class _SftPackIterator(grain.DatasetIterator):
    """Packs whole samples into rows; a sample that does not fit starts the next row."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, flush: bool = False):
        super().__init__(parent)
        self._seq_len, self._flush = seq_len, flush
        self._pending: dict | None = None     # the sample that did not fit in the previous row

    def __next__(self) -> dict:
        row, used = [], 0
        while True:
            sample = self._pending
            self._pending = None
            if sample is None:
                try:
                    sample = next(self._parent)
                except StopIteration:
                    if row and self._flush:
                        return _row(row, self._seq_len)
                    raise
            if used + len(sample["ids"]) > self._seq_len:
                self._pending = sample
                return _row(row, self._seq_len)
            row.append(sample)
            used += len(sample["ids"])

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": self._pending}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = state["pending"]


class _SftPackDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int, flush: bool):
        super().__init__(parent)
        self._seq_len, self._flush = seq_len, flush

    def __iter__(self):
        return _SftPackIterator(self._parent.__iter__(), self._seq_len, self._flush)


def _source(items: list, *, seed: int, shuffle: bool, repeat: bool, process_index: int, process_count: int):
    ds = grain.MapDataset.source(items)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]     # each record read by exactly one process per epoch
    return ds.repeat() if repeat else ds


def sft_pipeline(samples: Sequence[Encoded], *, seq_len: int, batch_size: int, seed: int, pack: bool = True,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1):
    """Batches {tokens, targets, loss_mask, segment_ids, positions}, each (batch_size, seq_len)."""
    items = [dataclasses.asdict(s) for s in samples]
    ds = _source(items, seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
                 process_count=process_count)
    if pack:
        rows = _SftPackDataset(ds.to_iter_dataset(), seq_len, flush=not repeat)
    else:
        rows = ds.map(lambda s: _row([s], seq_len)).to_iter_dataset()
    return rows.batch(batch_size, drop_remainder=repeat).__iter__()


# ---------------------------------------------------------------------------------------------------------
# Preference pairs.

def encode_response(prompt: list[dict], response: str, tokenizer, template: "ChatTemplate | str", *, seq_len: int,
                    overlong: str) -> dict | None:
    """A prompt conversation + one response (its answer span carries the mask) -> {"ids", "train_mask"}, or
    None when it does not fit even with the prompt cut (overlong="truncate_prompt") or at all ("skip")."""
    fitted = _fit(*response_ids(prompt, response, tokenizer, template), seq_len, overlong)
    return None if fitted is None else {"ids": fitted[0], "train_mask": fitted[1]}


def response_ids(prompt: list[dict], response: str, tokenizer, template) -> tuple[list[int], list[int]]:
    """(ids, mask) of the prompt followed by the response as the template renders it, uncut: the mask covers
    the response and its end marker."""
    return encode_chat(list(prompt) + [{"role": "assistant", "content": response}], template, tokenizer, train="last")


def encode_prompt(prompt: list[dict], tokenizer, template) -> list[int]:
    """The ids of a conversation rendered up to the assistant's turn (the generation prompt)."""
    return templates.encode_prompt(prompt, template, tokenizer)


def encode_pairs(pairs: Sequence[dict], tokenizer, *, template: "ChatTemplate | str", seq_len: int,
                 overlong: str = "truncate_prompt") -> list[dict]:
    """Each pair -> {"chosen": {ids, train_mask}, "rejected": {...}, "margin"}; the prompt is shared, the
    responses carry the mask. Over-long pairs lose prompt tokens from the left, or are skipped (counted; more
    than TOO_LONG_WARNING of them warns with the seq_len that would keep 95%)."""
    out, too_long, lengths = [], 0, []
    template = get_template(template)
    for pair in pairs:
        full = {side: response_ids(pair["prompt"], pair[side], tokenizer, template) for side in ("chosen", "rejected")}
        lengths.append(max(shortest_fit(ids, mask, overlong) for ids, mask in full.values()))
        fitted = {side: _fit(ids, mask, seq_len, overlong) for side, (ids, mask) in full.items()}
        if None in fitted.values():
            too_long += 1
            continue
        encoded = {side: {"ids": ids, "train_mask": mask} for side, (ids, mask) in fitted.items()}
        out.append({**encoded, "margin": float(pair.get("margin", 0.0))})
    summary = too_long_summary("preference pairs", lengths, too_long, seq_len=seq_len, overlong=overlong)
    logging.info("preference pairs: %d kept, %d skipped: too long (overlong=%s, seq_len=%d)", len(out), too_long,
                 overlong, seq_len)
    if not out:
        raise ValueError(f"no preference pair is left after encoding: {summary}")
    return out


def pair_arrays(pair: dict, seq_len: int) -> dict:
    """One pair -> arrays of shape (2, seq_len) (chosen first), its margin, and its extra per-pair arrays
    (`pair["arrays"]`: name -> values, float32; an objective names them, e.g. DPO's cached reference)."""
    rows = [_row([pair[side]], seq_len) for side in ("chosen", "rejected")]
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out["margin"] = np.float32(pair["margin"])
    for key, value in pair.get("arrays", {}).items():
        out[key] = np.asarray(value, np.float32)
    return out


def pair_batch(pairs: Sequence[dict], seq_len: int) -> dict:
    """Encoded pairs -> one batch of `pair_arrays`, each (len(pairs), ...)."""
    arrays = [pair_arrays(p, seq_len) for p in pairs]
    return {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}


def preference_pipeline(pairs: Sequence[dict], *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                        repeat: bool = True, process_index: int = 0, process_count: int = 1):
    """Batches {tokens, targets, loss_mask, segment_ids, positions: (batch, 2, seq_len), margin: (batch,)}.
    Without repeat the last batch is padded with all-zero pairs (loss_mask 0, weight 0)."""
    ds = _source(list(pairs), seed=seed, shuffle=shuffle, repeat=repeat, process_index=process_index,
                 process_count=process_count)
    ds = ds.map(lambda p: {**pair_arrays(p, seq_len), "weight": np.float32(1.0)})
    if not repeat:
        n = len(ds)
        pad = (-n) % batch_size
        if pad:
            blank = {k: np.zeros_like(v) for k, v in ds[0].items()}
            ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([blank] * pad)])
    return ds.to_iter_dataset().batch(batch_size, drop_remainder=repeat).__iter__()


# ---------------------------------------------------------------------------------------------------------
# A post-training run's records: data.train, and data.eval or a held-out share of data.train.

def train_and_eval_records(cfg: Config, load) -> tuple[list, list]:
    """(training, held-out) records read by `load(paths)`."""
    if not cfg.data.train:
        raise ConfigError(f"objective {cfg.objective!r} needs record files: --config.data.train=<file>[,...]")
    records = load(cfg.data.train)
    if cfg.data.eval:
        return records, load(cfg.data.eval)
    return split_heldout(records, cfg.data.eval_fraction, cfg.train.seed)


def encoded_pairs_of_run(cfg: Config, tokenizer) -> tuple[list[dict], list[dict]]:
    """(training, held-out) preference pairs of a run, encoded."""
    train, held = train_and_eval_records(cfg, functools.partial(load_pairs, on_error=cfg.data.on_error))
    encode = functools.partial(encode_pairs, tokenizer=tokenizer, seq_len=cfg.data.seq_len,
                               template=run_template(cfg.data.template, cfg.init_from), overlong=cfg.data.overlong)
    return encode(train), encode(held)


def preference_pipelines(cfg: Config, train_pairs, eval_pairs, *, batch_size: int, process_index: int,
                         process_count: int):
    """(training batches, a function giving a fresh pass over the held-out batches)."""
    pipeline = functools.partial(preference_pipeline, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)
    return (pipeline(train_pairs, seed=cfg.train.seed),
            lambda: pipeline(eval_pairs, seed=0, shuffle=False, repeat=False))
