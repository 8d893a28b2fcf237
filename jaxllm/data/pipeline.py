"""Grain pipelines, one function per objective. `lm_pipeline`: documents → packed next-token batches.

    per source: MapDataset.source(records)   random access (lists, ArrayRecord, TFDS, prepared shards)
      .shuffle(seed)                         a permutation per epoch (grain folds the epoch into the seed)
      .repeat()                              training, "repeat" sources: endless epochs, each reshuffled
      [lane::lanes]                          lane b reads every lanes-th document: each document is read by
                                             exactly one lane, hence one process, per epoch
      .map(tokenize)                         text → int32 ids with bos/eos (prepared ids: bos/eos added)
    per lane: mix (weights in tokens) + pack  mixture.py: documents then packing, or packing then rows
    LanesIterDataset                         rows lane after lane; this process owns lanes
                                             [process_index * batch, (process_index + 1) * batch)
      .mp_prefetch(workers)                  optional: each worker builds a slice of the lanes
      .batch(batch_size)                     (batch_size, seq_len) per key: row b from lane b

Every batch is a pure function of (sources, seed, global batch size, step): not of the process count nor
of the worker count. The iterator's state (`get_state()`, a JSON-serializable dict) is saved with the train
state so that a restart continues with exactly the next batch.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxllm.data.mixture import LanesIterDataset, Mixture, ToTokens
from jaxllm.data.packing import ROW_KEYS


class _StackAndPad:
    """Stacks rows into a batch and pads a short (final) batch with all-zero rows, so every batch has the
    same shape (one compiled eval step). Zero rows have loss_mask 0: they add nothing to any metric."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {}
        for key in ROW_KEYS:
            stacked = np.stack([row[key] for row in rows])  # (rows, seq_len)
            pad = np.zeros((self.batch_size - len(rows), stacked.shape[1]), stacked.dtype)
            batch[key] = np.concatenate([stacked, pad])     # (batch_size, seq_len)
        return batch


def lm_pipeline(documents: Sequence | Mixture, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                shuffle: bool = True, repeat: bool = True, add_bos: bool = True, add_eos: bool = True,
                process_index: int = 0, process_count: int = 1, max_doc_chars: int = 0,
                workers: int = 0) -> grain.DatasetIterator:
    """Batches of packed next-token-prediction rows for this process.

    Args:
      documents: the texts (each becomes one token stream `[bos] ids [eos]`), any random-access sequence
        of texts or token-id arrays, or a `Mixture` of weighted sources (data/mixture.py).
      tokenizer: has `encode(text, add_bos=..., add_eos=...) -> list[int]`, `bos_id`, `eos_id`.
      seq_len: tokens per row.
      batch_size: rows per batch on THIS process (the global batch divided by process_count).
      seed: document order; in [0, 2**32).
      shuffle: reshuffle the documents every epoch.
      repeat: True (training): endless epochs (per source, as its exhaustion policy says); row b of the
        global batch comes from lane b, so the global batches do not depend on process_count or workers.
        False (evaluation): one pass over this process's documents in one lane; the final partial row is
        padded and the final partial batch is filled with all-zero rows (loss_mask 0), so every held-out
        token is scored exactly once and every batch has the same shape. Processes may then yield different
        numbers of batches: a multi-process eval loop must agree on a step count.
      process_index, process_count: this process's lanes (training) or slice of the documents (evaluation).
      max_doc_chars: texts longer than this are skipped and counted (0 = no limit).
      workers: Grain worker processes building rows (training; must divide batch_size); 0 = this process.

    Returns:
      A grain iterator of dicts, each value (batch_size, seq_len): `tokens`, `targets`, `segment_ids`,
      `positions` (int32) and `loss_mask` (float32). Supports `get_state()` / `set_state()`;
      `mixture.mixture_stats(mixture, it.get_state(), total_lanes)` reads per-source tokens and epochs.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mixture = documents if isinstance(documents, Mixture) else Mixture.single(documents)
    if repeat:
        lane_ids, total = [process_index * batch_size + j for j in range(batch_size)], batch_size * process_count
    else:
        # Evaluation: every token once, in order, so one lane per process over its slice of the documents.
        size = sum(len(c.records) for c in mixture.components)
        if size < process_count:
            raise ValueError(f"{size} documents cannot be split across {process_count} processes")
        lane_ids, total, workers = [process_index], process_count, 0
    if workers and len(lane_ids) % workers:
        raise ValueError(f"workers ({workers}) must divide the rows per process ({len(lane_ids)}): each worker "
                         f"builds whole lanes, which keeps batches independent of the worker count")
    rows = LanesIterDataset(mixture, ToTokens(tokenizer, add_bos, add_eos, max_doc_chars), lane_ids, total,
                            seed=seed, shuffle=shuffle, repeat=repeat, seq_len=seq_len, pad_final_row=not repeat)
    if workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():   # Grain's workers read absl flags; a library caller never parsed them
            flags.FLAGS.mark_as_parsed()
        # Grain's round-robin over workers, each holding lanes w, w + workers, ..., gives back the lane-major
        # row order of a single process exactly.
        rows = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    batches = rows.batch(batch_size, drop_remainder=repeat, batch_fn=_StackAndPad(batch_size))
    return iter(batches)


def total_lanes(batch_size: int, process_count: int, repeat: bool = True) -> int:
    """How many lanes `lm_pipeline` splits the data into (for `mixture_stats`)."""
    return batch_size * process_count if repeat else process_count
