"""Concat-then-split packing of token streams into fixed-length rows, as a checkpointable Grain transformation.

Documents (token lists that already carry their bos/eos) are laid end to end and cut into rows of exactly
`seq_len` tokens. Nothing is ever truncated: a document that crosses a row boundary goes on in the next row
as a new segment. Within a row:

    tokens       the packed tokens
    segment_ids  1, 2, 3, ... for the pieces in the row, 0 on padding
    positions    0, 1, 2, ... restarting at every segment start (a continuation piece starts at 0 too,
                 so attention and positions never reach across a row boundary)
    targets      the next token when it is in the same segment, else 0
    loss_mask    1.0 where `targets` holds a real next token; 0.0 at each segment's last token and on padding

Example, seq_len 8, documents [1 5 6 2] [1 7 2] [1 8 9 3 4 2]:

    tokens       1 5 6 2 1 7 2 1 | 8 9 3 4 2 0 0 0      (second row padded: pad_final_row=True)
    segment_ids  1 1 1 1 2 2 2 3 | 1 1 1 1 1 0 0 0
    positions    0 1 2 3 0 1 2 0 | 0 1 2 3 4 0 0 0
    targets      5 6 2 0 7 2 0 0 | 9 3 4 2 0 0 0 0
    loss_mask    1 1 1 0 1 1 0 0 | 1 1 1 1 0 0 0 0

The token where a document is cut (8 above) gets no target in the first row: the pieces are independent
segments. Padding appears only in the final, partial row when the stream ends; that row is emitted
(padded) if `pad_final_row=True` (evaluation: every token is seen) and dropped otherwise (training on an
infinite stream never reaches it).

Grain's own `ConcatThenSplitIterDataset` is not used: it emits rows out of stream order (full-length
elements bypass the buffer), restores state by replaying from an earlier checkpoint, and builds no
targets or loss mask. This iterator's state is exact: the parent's state plus the unconsumed tokens of
the current document.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_KEYS = ("tokens", "segment_ids", "positions", "targets", "loss_mask")


class PackIterDataset(grain.IterDataset):
    """Packs a stream of 1-D token sequences into dicts of (seq_len,) arrays; see the module docstring."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_final_row: bool = False):
        super().__init__(parent)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self._seq_len = seq_len
        self._pad_final_row = pad_final_row

    def __iter__(self) -> "PackDatasetIterator":
        return PackDatasetIterator(self._parent.__iter__(), seq_len=self._seq_len,
                                   pad_final_row=self._pad_final_row)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, pad_final_row={self._pad_final_row})"


class PackDatasetIterator(grain.DatasetIterator):
    """Fills one row per `__next__` from the parent's documents, carrying a document's rest to the next row."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_final_row: bool):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_final_row = pad_final_row
        self._leftover = np.zeros((0,), np.int32)  # unconsumed tokens of the document being packed
        self._exhausted = False                     # the parent raised StopIteration

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        n = self._seq_len
        tokens = np.zeros((n,), np.int32)
        segment_ids = np.zeros((n,), np.int32)
        positions = np.zeros((n,), np.int32)
        fill, segment = 0, 0
        while fill < n:
            if self._leftover.size == 0:
                if self._exhausted or not self._pull():
                    break
                continue  # an empty document leaves `_leftover` empty, so this pulls again
            take = min(n - fill, self._leftover.size)
            segment += 1
            tokens[fill:fill + take] = self._leftover[:take]
            segment_ids[fill:fill + take] = segment
            positions[fill:fill + take] = np.arange(take, dtype=np.int32)  # restart at 0 for every piece
            self._leftover = self._leftover[take:]
            fill += take
        if fill == 0 or (fill < n and not self._pad_final_row):
            raise StopIteration  # stream ended; a partial final row is dropped unless pad_final_row
        # Next token in the same segment; the last token of a segment (and padding) has none.
        same = (segment_ids[:-1] == segment_ids[1:]) & (segment_ids[:-1] > 0)  # (n - 1,)
        loss_mask = np.zeros((n,), np.float32)
        loss_mask[:-1] = same
        targets = np.zeros((n,), np.int32)
        targets[:-1] = np.where(same, tokens[1:], 0)
        return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, targets=targets,
                    loss_mask=loss_mask)

    def _pull(self) -> bool:
        """Loads the parent's next document into `_leftover`; False when the parent is exhausted."""
        try:
            doc = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return False
        doc = np.asarray(doc, dtype=np.int32)
        if doc.ndim != 1:
            raise ValueError(f"packing expects 1-D token sequences, got shape {doc.shape}")
        self._leftover = doc
        return True

    def get_state(self) -> dict[str, Any]:
        # JSON-serializable: the parent's state is taken after the current document was read, so the
        # unconsumed tokens of that document must travel with it (as plain ints).
        return {"parent": self._parent.get_state(), "leftover": self._leftover.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._leftover = np.asarray(state["leftover"], dtype=np.int32).reshape(-1)
        self._exhausted = False

    def __str__(self) -> str:
        return f"PackDatasetIterator(seq_len={self._seq_len}, pad_final_row={self._pad_final_row})"


def documents_to_rows(token_lists, seq_len: int, *, pad_final_row: bool = True) -> list[dict[str, np.ndarray]]:
    """Packs a finite list of token lists and returns all rows (a convenience for tests and tools)."""
    ds = grain.MapDataset.source(list(token_lists)).to_iter_dataset()
    return list(PackIterDataset(ds, seq_len=seq_len, pad_final_row=pad_final_row))
