"""Weighted mixtures of sources, packed in lanes so that every global batch is the same for any number of
processes or workers.

Lanes. Row b of every global batch comes from lane b (lanes = the global batch size). Lane b reads, from
each source, the documents at positions b, b + lanes, b + 2*lanes, ... of that source's stream (shuffled,
and for `repeat` sources endlessly reshuffled epoch after epoch), mixes them and packs them into rows on its
own. A process owns a contiguous block of lanes (its block of every global batch) and a Grain worker a
slice of those, so neither the process count nor the worker count changes a single row, and each document
of an epoch is read by exactly one lane, hence one process.

Weights count tokens, in both mixing modes:
  * mix="documents" (before packing): the lane takes whole documents from the source whose token count
    (bos/eos included) lags furthest behind its weight, then packs them; a row may hold several sources.
    Shares track the weights to within one document per lane, so a source of very long documents arrives in
    long runs.
  * mix="rows" (after packing): every source is packed into rows on its own and the lane takes the next row
    from the source that lags furthest behind; each row holds one source (so per-source losses can be read
    off rows), a long document goes on in that source's next row, and shares track the weights to within
    one row per lane.
Selection is deterministic ("most behind first", ties broken by lane), not random: shares converge at once
instead of by the law of large numbers, and the order is still a pure function of (seed, lane, step).
A weight schedule switches weights at a step; the lag is counted from the switch, so a source that was off
does not make up for the past.

Exhaustion per source: "repeat" starts a new, reshuffled epoch (epochs are counted); "stop" reads the
source once, after which the remaining sources share its weight; when every weighted source has stopped,
the stream ends. The state of every lane (positions, token counts, packing leftovers) is the iterator's
JSON state, so a restart continues mid-epoch with exactly the next row; `resplit_data_state` hands the saved
lanes to a different number of processes.
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import os
import re
from typing import Any, Sequence

import grain
import numpy as np

from jaxllm.data.packing import PackDatasetIterator

MIX_MODES = ("documents", "rows")
EXHAUSTION = ("repeat", "stop")


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of a mixture: random-access records (str documents or int32 token arrays)."""
    name: str
    records: Sequence
    weight: float = 1.0
    exhaustion: str = "repeat"


@dataclasses.dataclass(frozen=True)
class Mixture:
    components: tuple[Component, ...]
    mix: str = "documents"
    schedule: tuple = ()   # ((step, (weight, ...)), ...), increasing steps: weights from that step on

    def __post_init__(self):
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        for c in self.components:
            if c.exhaustion not in EXHAUSTION:
                raise ValueError(f"source {c.name!r}: exhaustion must be one of {EXHAUSTION}, got {c.exhaustion!r}")
        from jaxllm.config import validate_mixture
        validate_mixture([c.name for c in self.components], tuple(c.weight for c in self.components),
                         schedule=self.schedule, where="mixture")

    @classmethod
    def single(cls, records: Sequence, name: str = "documents") -> "Mixture":
        return cls((Component(name, records),))

    @property
    def phases(self) -> list[tuple[int, tuple[float, ...]]]:
        """[(first step, weights), ...] covering every step from 0."""
        base = [(0, tuple(float(c.weight) for c in self.components))]
        sched = [(int(s), tuple(float(w) for w in ws)) for s, ws in self.schedule]
        return (base if not sched or sched[0][0] > 0 else []) + sched

    def phase_at(self, step: int) -> int:
        return bisect.bisect_right([s for s, _ in self.phases], step) - 1


def component_name(spec: str, taken: Sequence[str] = ()) -> str:
    """A short metric-friendly name for a source spec: `builtin:pydoc` → pydoc, `/d/wiki.jsonl` → wiki."""
    base = spec.split(":", 1)[1] if spec.startswith(("builtin:", "tfds:")) else os.path.basename(spec.rstrip("/*"))
    base = re.sub(r"\.(txt|jsonl|parquet|array_record)$", "", base) or "source"
    base = re.sub(r"[^\w.-]+", "_", base)
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


class ToTokens:
    """A record → int32 ids with bos/eos; None for a text longer than `max_doc_chars` (skipped, counted).
    A class, not a lambda, so that pipelines pickle into Grain worker processes."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool, max_doc_chars: int = 0):
        self.tokenizer, self.add_bos, self.add_eos, self.max_doc_chars = tokenizer, add_bos, add_eos, max_doc_chars

    def __call__(self, record) -> np.ndarray | None:
        if isinstance(record, str):
            if self.max_doc_chars and len(record) > self.max_doc_chars:
                return None
            # A piece of a longer document (sources.TextPiece) opens or closes it only at its ends.
            bos, eos = self.add_bos and getattr(record, "first", True), self.add_eos and getattr(record, "last", True)
            return np.asarray(self.tokenizer.encode(record, add_bos=bos, add_eos=eos), np.int32)
        ids = [np.asarray(record, np.int32).reshape(-1)]   # prepared ids carry no bos/eos
        if self.add_bos:
            ids.insert(0, np.asarray([self.tokenizer.bos_id], np.int32))
        if self.add_eos:
            ids.append(np.asarray([self.tokenizer.eos_id], np.int32))
        return np.concatenate(ids)


class _DocStream(grain.DatasetIterator):
    """One lane's documents of one source, read by index from a MapDataset; state = the next index."""

    def __init__(self, ds: grain.MapDataset):
        super().__init__()
        self._ds, self._len = ds, len(ds)
        self.next, self.skipped = 0, 0   # positions consumed (epoch accounting), over-long documents skipped

    def __next__(self) -> np.ndarray:
        while self.next < self._len:
            doc = self._ds[self.next]
            self.next += 1
            if doc is not None:
                return doc
            self.skipped += 1
        raise StopIteration

    def get_state(self) -> dict:
        return {"next": self.next, "skipped": self.skipped}

    def set_state(self, state: dict) -> None:
        self.next, self.skipped = int(state["next"]), int(state["skipped"])


class _Mixer(grain.DatasetIterator):
    """Takes the next item (a document or a row) from the source furthest behind its weight, in tokens."""

    def __init__(self, streams: list, mixture: Mixture, lane: int, seq_len: int, unit: str):
        super().__init__(streams)
        self._streams, self._mixture, self._lane, self._seq_len, self._unit = streams, mixture, lane, seq_len, unit
        n = len(streams)
        self.tokens = [0] * n            # tokens taken per source since the start
        self._phase_tokens = [0] * n     # ... since the current weights took effect
        self._phase, self._items, self._done = 0, 0, [False] * n

    def _step(self) -> int:
        # The row (= step) that the next item starts in: rows are full in training, so in documents mode
        # the token offset says it.
        return self._items if self._unit == "row" else sum(self.tokens) // self._seq_len

    def __next__(self):
        n = len(self._streams)
        while True:
            phase = self._mixture.phase_at(self._step())
            if phase != self._phase:
                self._phase, self._phase_tokens = phase, [0] * n
            weights = self._mixture.phases[phase][1]
            live = [i for i in range(n) if weights[i] > 0 and not self._done[i]]
            if not live:
                raise StopIteration
            i = min(live, key=lambda i: (self._phase_tokens[i] / weights[i], (i - self._lane) % n))
            try:
                item = next(self._streams[i])
            except StopIteration:
                self._done[i] = True
                continue
            k = len(item) if self._unit == "document" else int(np.count_nonzero(item["segment_ids"]))
            self.tokens[i] += k
            self._phase_tokens[i] += k
            self._items += 1
            return item

    def get_state(self) -> dict:
        return {"streams": [s.get_state() for s in self._streams], "tokens": list(self.tokens),
                "phase_tokens": list(self._phase_tokens), "phase": self._phase, "items": self._items,
                "done": list(self._done)}

    def set_state(self, state: dict) -> None:
        for s, st in zip(self._streams, state["streams"]):
            s.set_state(st)
        self.tokens, self._phase_tokens = list(state["tokens"]), list(state["phase_tokens"])
        self._phase, self._items, self._done = state["phase"], state["items"], list(state["done"])


@dataclasses.dataclass
class _Lane:
    rows: grain.DatasetIterator   # the lane's packed rows
    mixer: _Mixer
    streams: list[_DocStream]


def _source_seed(seed: int, index: int) -> int:
    return (seed + 0x9E3779B1 * index) % 2**32   # a distinct, reproducible shuffle per source


def _build_lane(mixture: Mixture, to_tokens: ToTokens, lane: int, lanes: int, *, seed: int, shuffle: bool,
                repeat: bool, seq_len: int, pad_final_row: bool) -> _Lane:
    streams = []
    for i, c in enumerate(mixture.components):
        ds = grain.MapDataset.source(c.records)
        if shuffle:
            ds = ds.shuffle(seed=_source_seed(seed, i))
        if repeat and c.exhaustion == "repeat":
            # repeat before slicing: grain's shuffle folds the epoch (index // len) into its seed, so each
            # epoch is a new permutation, and the lanes split the endless stream without overlap.
            ds = ds.repeat()
        streams.append(_DocStream(ds[lane::lanes].map(to_tokens)))
    if mixture.mix == "documents":
        mixer = _Mixer(streams, mixture, lane, seq_len, "document")
        return _Lane(PackDatasetIterator(mixer, seq_len=seq_len, pad_final_row=pad_final_row), mixer, streams)
    packed = [PackDatasetIterator(s, seq_len=seq_len, pad_final_row=pad_final_row) for s in streams]
    mixer = _Mixer(packed, mixture, lane, seq_len, "row")
    return _Lane(mixer, mixer, streams)


class _LanesIterator(grain.DatasetIterator):
    """Rows lane after lane: row k of local lane j is element k * len(lanes) + j (lane-major), so
    `.batch(len(lanes))` gives each lane one row of every batch."""

    def __init__(self, lane_ids: list[int], lanes: list[_Lane]):
        super().__init__([lane.rows for lane in lanes])
        self._ids, self._lanes, self._next = lane_ids, lanes, 0

    def __next__(self) -> dict[str, np.ndarray]:
        row = next(self._lanes[self._next].rows)
        self._next = (self._next + 1) % len(self._lanes)
        return row

    def get_state(self) -> dict[str, Any]:
        n = len(self._lanes[0].streams)
        stats = {"docs": [sum(l.streams[i].next for l in self._lanes) for i in range(n)],
                 "skipped": [sum(l.streams[i].skipped for l in self._lanes) for i in range(n)],
                 "tokens": [sum(l.mixer.tokens[i] for l in self._lanes) for i in range(n)]}
        # "stats" is derived (set_state ignores it); it lets `mixture_stats` read a state that Grain's
        # worker processes produced without reaching into them.
        return {"jaxllm_lanes": list(self._ids), "next": self._next, "stats": stats,
                "lanes": [lane.rows.get_state() for lane in self._lanes]}

    def set_state(self, state: dict[str, Any]) -> None:
        if list(state["jaxllm_lanes"]) != list(self._ids):
            raise ValueError(f"data state is for lanes {state['jaxllm_lanes']}, this iterator has {self._ids}: "
                             f"the global batch size or process count changed since the checkpoint")
        for lane, st in zip(self._lanes, state["lanes"]):
            lane.rows.set_state(st)
        self._next = int(state["next"])


class LanesIterDataset(grain.IterDataset):
    """Packed rows of `mixture` for the lanes `lane_ids` out of `total_lanes` (see the module docstring).
    Supports Grain's in-place slicing, so `mp_prefetch` gives each worker a slice of the lanes."""

    def __init__(self, mixture: Mixture, to_tokens: ToTokens, lane_ids: Sequence[int], total_lanes: int, *,
                 seed: int, shuffle: bool, repeat: bool, seq_len: int, pad_final_row: bool):
        super().__init__()
        self._mixture, self._to_tokens, self._lane_ids, self._total = mixture, to_tokens, list(lane_ids), total_lanes
        self._kw = dict(seed=seed, shuffle=shuffle, repeat=repeat, seq_len=seq_len, pad_final_row=pad_final_row)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self._lane_ids = self._lane_ids[sl]

    def __iter__(self) -> _LanesIterator:
        if not self._lane_ids:
            raise ValueError("this worker has no lanes: use at most as many workers as rows per process")
        lanes = [_build_lane(self._mixture, self._to_tokens, l, self._total, **self._kw) for l in self._lane_ids]
        return _LanesIterator(self._lane_ids, lanes)

    def __str__(self) -> str:
        return f"LanesIterDataset(lanes={self._lane_ids} of {self._total}, mix={self._mixture.mix})"


def _lane_states(state) -> list[dict]:
    """The states of lane iterators (`_LanesIterator.get_state`) inside an iterator state, in order: Grain's
    wrappers (batching, worker prefetch) nest them."""
    if isinstance(state, dict):
        if "jaxllm_lanes" in state:
            return [state]
        return [block for v in state.values() for block in _lane_states(v)]
    if isinstance(state, (list, tuple)):
        return [block for v in state for block in _lane_states(v)]
    return []


def mixture_stats(mixture: Mixture, state: dict, total_lanes: int) -> dict[str, float]:
    """Per source, from an iterator state: `data/<name>/tokens` taken so far, `data/<name>/epochs` (documents
    read / source size) and `data/<name>/skipped` (over-long documents).

    Exact for one process. A process sees only its own lanes; its figures are scaled by
    total_lanes / its lanes (all lanes advance at the same row rate, so this is within a document or a row
    per lane of the global figure).
    """
    found = {tuple(block["jaxllm_lanes"]): block["stats"] for block in _lane_states(state)}
    local = sum(len(k) for k in found)
    if not local:
        return {}
    scale = total_lanes / local
    out = {}
    for i, c in enumerate(mixture.components):
        docs = sum(s["docs"][i] for s in found.values())
        out[f"data/{c.name}/tokens"] = sum(s["tokens"][i] for s in found.values()) * scale
        out[f"data/{c.name}/epochs"] = docs * scale / max(len(c.records), 1)
        out[f"data/{c.name}/skipped"] = sum(s["skipped"][i] for s in found.values()) * scale
    return out


class DataStateMismatchError(ValueError):
    """A saved data-iterator state cannot continue in this run's pipeline."""


def resplit_data_state(saved: dict[int, dict], template: dict, process_count: int) -> dict:
    """This process's data state from the states saved by a different number of processes.

    Sound for lane pipelines: row b of every global batch comes from lane b whatever the process count, each
    lane's state is self-contained, and checkpoints are taken between batches. So the lanes this process now
    owns take the saved states of the same lanes, wherever they were. `template` is this process's fresh
    iterator state (its lane ids and the wrapping of e.g. Grain workers)."""
    lanes = {}
    for index, state in sorted(saved.items()):
        for block in _lane_states(state):
            if int(block["next"]) != 0:
                raise DataStateMismatchError(f"the data state of process {index} was saved in the middle of a "
                                             f"batch; it cannot be re-split across processes")
            lanes.update(zip(map(int, block["jaxllm_lanes"]), block["lanes"]))
    blocks = _lane_states(template)
    if not lanes or not blocks:
        raise DataStateMismatchError(
            f"the checkpoint's data state was written by {len(saved)} process(es) and this run has "
            f"{process_count}; this objective's data pipeline cannot re-split its position across a different "
            f"number of processes (only the lane pipeline of `lm` can). Resume with {len(saved)} process(es), "
            f"or start the data order afresh from init_from")
    mine = sum(len(b["jaxllm_lanes"]) for b in blocks)
    if mine * process_count != len(lanes) or set(lanes) != set(range(len(lanes))):
        raise DataStateMismatchError(
            f"the checkpoint's data state has {len(lanes)} lanes (its global batch size) but this run has "
            f"{mine * process_count} ({mine} per process x {process_count}): the data order depends on the "
            f"global batch size, so keep train.batch_size as it was")
    out = copy.deepcopy(template)
    for block in _lane_states(out):
        block["lanes"] = [lanes[int(i)] for i in block["jaxllm_lanes"]]
        block["next"] = 0
    return out


def from_config(data, seed: int, tokenizer=None) -> tuple[Mixture, Sequence]:
    """(training mixture, held-out records) for a DataConfig.

    Without weights, all sources form one component in their natural proportion (documents shuffled
    together, held-out documents drawn from the whole). With weights, each source is a component and
    `eval_fraction` of each is held out.
    """
    from jaxllm.data.records import Concat
    from jaxllm.data.sources import open_source, split_records

    def open_all(specs):
        return [open_source(s, jsonl_field=data.jsonl_field, text_split=data.text_split,
                            on_error=getattr(data, "on_error", "raise"), tokenizer=tokenizer,
                            piece_chars=data.document_piece_chars) for s in specs]

    def join(parts):
        return [d for p in parts for d in p] if all(isinstance(p, list) for p in parts) else Concat(parts)

    if not data.sources:
        raise ValueError("no data sources given (data.sources)")
    sources = open_all(data.sources)
    held = [s.records for s in open_all(data.eval_sources)] if data.eval_sources else None
    names: list[str] = []
    for s in sources:
        names.append(component_name(s.spec, names))
    if not (data.weights or data.weight_schedule):
        records = join([s.records for s in sources])
        if held is None:
            records, heldout = split_records(records, data.eval_fraction, seed)
            held = [heldout]
        name = names[0] if len(names) == 1 else "all"
        return Mixture((Component(name, records),), mix=data.mix), join(held)
    weights = data.weights or data.weight_schedule[0][1]
    exhaustion = data.exhaustion or ("repeat",) * len(sources)
    components, held_parts = [], []
    for s, name, w, e in zip(sources, names, weights, exhaustion):
        records = s.records
        if held is None:
            records, heldout = split_records(records, data.eval_fraction, seed)
            held_parts.append(heldout)
        components.append(Component(name, records, float(w), e))
    return Mixture(tuple(components), mix=data.mix, schedule=tuple(data.weight_schedule)), join(held or held_parts)
