"""Exact and near-duplicate detection.

Exact: documents whose normalised text (NFKC, case-folded, punctuation and symbols dropped, whitespace
collapsed) hashes the same; the first (smallest id) is kept.

Near: MinHash over shingles (k consecutive words for Latin scripts, k consecutive characters for CJK,
where words are not delimited), LSH banding to propose candidate pairs, and the exact Jaccard similarity of
the two shingle sets to decide. Banding alone either misses pairs near the threshold or admits many below
it; here it only proposes, so the bands are chosen for recall (>= 0.995 at the threshold) and the exact
check removes every false candidate. For each confirmed pair the later document (larger id) is removed.

All functions are pure and deterministic (no Python `hash`, whose seed changes per process), so the local
path and Beam workers compute identical signatures.
"""
from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from typing import Iterable

import numpy as np

from jaxllm.data.filters import detect_language, is_cjk

_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation/symbols → space, whitespace collapsed: what 'the same text' means."""
    return " ".join(_PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def exact_key(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).hexdigest()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of the rolling hash (uint64 arithmetic wraps, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(text: str, k: int = 5, lang: str | None = None) -> np.ndarray:
    """Sorted unique uint64 hashes of the k-shingles of the normalised text: characters for CJK text (spaces
    dropped), words otherwise. A text shorter than k is one shingle."""
    norm = normalize(text)
    lang = lang or detect_language(text)
    if is_cjk(lang):
        seq = np.frombuffer(norm.replace(" ", "").encode("utf-32-le"), "<u4").astype(np.uint64)
    else:
        seq = np.array([int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                        for w in norm.split()], np.uint64)
    if seq.size == 0:
        return np.zeros((0,), np.uint64)
    k = min(k, seq.size)
    with np.errstate(over="ignore"):
        h = np.zeros(seq.size - k + 1, np.uint64)
        for j in range(k):   # polynomial rolling hash over each window, base 1000003, mod 2**64
            h = h * np.uint64(1000003) + seq[j:seq.size - k + 1 + j]
        return np.unique(_mix(h))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class MinHasher:
    """num_perm hash functions h_i(x) = (a_i * x + b_i) mod 2**64 >> 32, a_i odd (multiply-shift)."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, 0xFFFFFFFF, np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, hashes.size, 4096):   # (num_perm, chunk) at a time bounds memory
                x = hashes[start:start + 4096][None, :]
                v = (self.a[:, None] * x + self.b[:, None]) >> np.uint64(32)
                sig = np.minimum(sig, v.min(axis=1))
        return sig.astype(np.uint32)


def choose_bands(num_perm: int, threshold: float, recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) whose probability of proposing a pair
    of Jaccard `threshold`, 1 - (1 - t**rows) ** bands, is still >= recall."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[str]:
    return [f"{b}:" + hashlib.blake2b(sig[b * rows:(b + 1) * rows].tobytes(), digest_size=8).hexdigest()
            for b in range(bands)]


def candidate_pairs(buckets: Iterable[list]) -> set[tuple]:
    """(smaller id, larger id) for every two ids sharing a bucket."""
    pairs = set()
    for ids in buckets:
        ids = sorted(set(ids))
        pairs.update((ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)))
    return pairs


def near_duplicates(docs: dict, *, threshold: float = 0.8, num_perm: int = 128, k: int = 5,
                    seed: int = 1) -> dict:
    """{id: text} → {removed id: (kept id it duplicates, jaccard)} for pairs with Jaccard >= threshold."""
    hasher = MinHasher(num_perm, seed)
    bands, rows = choose_bands(num_perm, threshold)
    sh = {i: shingles(t, k) for i, t in docs.items()}
    buckets = collections.defaultdict(list)
    for i, s in sh.items():
        for key in band_keys(hasher.signature(s), bands, rows):
            buckets[key].append(i)
    removed: dict = {}
    for a, b in sorted(candidate_pairs(buckets.values())):
        j = jaccard(sh[a], sh[b])
        if j >= threshold and (b not in removed or a < removed[b][0]):
            removed[b] = (a, j)
    return removed
