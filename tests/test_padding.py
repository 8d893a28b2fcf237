"""pad_sequences and the length/batch buckets: the one padding helper of inference."""
from __future__ import annotations

import numpy as np
import pytest

from jaxllm.model.padding import bucket_batch, bucket_length, pad_sequences, round_up


def test_left_padding_right_aligns_rows_and_restarts_positions():
    tokens, seg, pos = pad_sequences([[5, 6, 7], [8]], 4, side="left")
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0]])
    assert tokens.dtype == seg.dtype == pos.dtype == np.int32


def test_right_padding_with_extra_batch_rows_that_are_all_padding():
    tokens, seg, pos = pad_sequences([[5, 6], [7, 8, 9]], 4, side="right", batch=4)
    np.testing.assert_array_equal(tokens, [[5, 6, 0, 0], [7, 8, 9, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(seg, [[1, 1, 0, 0], [1, 1, 1, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(pos, [[0, 1, 0, 0], [0, 1, 2, 0], [0] * 4, [0] * 4])


def test_over_long_sequence_small_batch_and_bad_side_are_errors():
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens, more than the padded length 4"):
        pad_sequences([[1], [1, 2, 3, 4, 5]], 4)
    with pytest.raises(ValueError, match="batch 1 is smaller than the 2 sequences"):
        pad_sequences([[1], [2]], 4, batch=1)
    with pytest.raises(ValueError, match="side must be"):
        pad_sequences([[1]], 4, side="middle")


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 64, 65, 100, 129)] == [16, 16, 32, 64, 80, 112, 160]
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert round_up(0, 64) == 64 and round_up(65, 64) == 128
