"""Grain pipelines, one function per objective. `lm_pipeline`: documents → packed next-token batches.

    MapDataset.source(documents)             random access to the document list
      .shuffle(seed)                         a permutation per epoch (grain folds the epoch into the seed)
      [process_index::process_count]         each document read by exactly one process per epoch
      .repeat()                              training only: endless epochs, each reshuffled
      .map(tokenize)                         text → int32 token ids with bos/eos
      .to_iter_dataset()                     threaded, prefetching reads
      PackIterDataset(seq_len)               concat-then-split rows (see packing.py)
      .batch(batch_size)                     (batch_size, seq_len) per key

Every batch is a pure function of (documents, seed, process_index, process_count, position in the
stream): the shuffle is index-based, and the iterator's state (`get_state()`, a JSON-serializable dict) is
saved with the train state so that a restart continues with exactly the next batch.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxllm.data.packing import ROW_KEYS, PackIterDataset


class _Tokenize:
    """Text → (n,) int32 ids. A class rather than a lambda so that the pipeline stays picklable
    (grain's multiprocess prefetch sends it to worker processes)."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos), np.int32)


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


def lm_pipeline(documents: Sequence[str], tokenizer, *, seq_len: int, batch_size: int, seed: int,
                shuffle: bool = True, repeat: bool = True, add_bos: bool = True, add_eos: bool = True,
                process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches of packed next-token-prediction rows for this process.

    Args:
      documents: the texts; each becomes one token stream `[bos] ids [eos]`.
      tokenizer: has `encode(text, add_bos=..., add_eos=...) -> list[int]` (see jaxllm.tokenizer).
      seq_len: tokens per row.
      batch_size: rows per batch on THIS process (the global batch divided by process_count).
      seed: document order; in [0, 2**32).
      shuffle: reshuffle the documents every epoch.
      repeat: True (training): endless epochs; partial final rows/batches never occur.
        False (evaluation): one pass over this process's documents; the final partial row is padded and
        the final partial batch is filled with all-zero rows (loss_mask 0), so every held-out token is
        scored exactly once and every batch has the same shape. Processes may then yield different
        numbers of batches: a multi-process eval loop must agree on a step count.
      process_index, process_count: this process's slice of every epoch's documents.

    Returns:
      A grain iterator of dicts, each value (batch_size, seq_len): `tokens`, `targets`, `segment_ids`,
      `positions` (int32) and `loss_mask` (float32). Supports `get_state()` / `set_state()`.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(documents) < process_count:
        raise ValueError(f"{len(documents)} documents cannot be split across {process_count} processes")
    ds = grain.MapDataset.source(list(documents))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # Slice before repeat: grain's slice and shuffle map index i of epoch e into epoch e of the parent,
    # so every epoch is a new permutation that the processes split without overlap.
    ds = ds[process_index::process_count]
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_Tokenize(tokenizer, add_bos, add_eos))
    rows = PackIterDataset(ds.to_iter_dataset(), seq_len=seq_len, pad_final_row=not repeat)
    batches = rows.batch(batch_size, drop_remainder=repeat, batch_fn=_StackAndPad(batch_size))
    return iter(batches)
