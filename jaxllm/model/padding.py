"""Token sequences of different lengths -> the (tokens, segment_ids, positions) arrays the decoder reads.

The one padding helper of inference (generate, score, multiple choice, perplexity, serving). Padding carries
segment id 0, which attention masks; positions start at 0 on each sequence's first real token, so a padded
row computes exactly what it would alone. Lengths and batch sizes are bucketed so that a stream of requests
reuses a few compiled programs instead of compiling one per shape.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PROMPT_BUCKET = 16        # lengths below 64 are rounded up to a multiple of this


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`, at least one multiple."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket_length(n: int) -> int:
    """n rounded up to a multiple of 16 below 64, then to a quarter of its power of two (64, 80, 96, 112, 128,
    160, ...): at most 25% padding, and a handful of compiled programs per octave of length."""
    if n <= 4 * PROMPT_BUCKET:
        return round_up(n, PROMPT_BUCKET)
    return round_up(n, 1 << (n.bit_length() - 3))


def bucket_batch(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(n - 1, 0).bit_length()


def pad_sequences(sequences: Sequence[Sequence[int]], length: int, *, side: str = "right",
                  batch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions), each (batch, length) int32.

    side="right": sequences start at column 0 (one forward pass over whole texts: scoring, perplexity).
    side="left": sequences end at column length-1 (generation: every row's next token goes to the same slot).
    batch: rows in the output (>= len(sequences)); extra rows are all padding. A sequence longer than
    `length` is an error, never cut silently."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows = len(sequences) if batch is None else batch
    if rows < len(sequences):
        raise ValueError(f"batch {rows} is smaller than the {len(sequences)} sequences given")
    tokens = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(sequences):
        n = len(seq)
        if n > length:
            raise ValueError(f"sequence {i} has {n} tokens, more than the padded length {length}")
        if n == 0:
            continue
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        tokens[i, cols] = np.asarray(seq, np.int32)
        segment_ids[i, cols] = 1
        positions[i, cols] = np.arange(n, dtype=np.int32)
    return tokens, segment_ids, positions
