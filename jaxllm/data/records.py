"""Random-access record readers for sources too large to hold as Python lists, and the helpers that
compose them.

Every reader is a sequence (`len`, `[i]`) that reads lazily, so a Grain `MapDataset` over it can shuffle
globally and each process fetches only the records of its own slice:

  * `TextRecords`: ArrayRecord files whose records are UTF-8 text (one document each);
  * `TokenRecords`: the shards written by `jaxllm data prepare` (int32 token ids, one document each),
    opened through `open_prepared`, which checks each shard against the manifest and the tokenizer;
  * `TfdsRecords`: a TFDS dataset through `tfds.data_source` (ArrayRecord underneath, no TensorFlow).
Text, JSON Lines and Parquet files are indexed and read lazily by indexed.py.

Readers hold only paths and open files lazily, so they pickle into Grain worker processes.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from jaxllm import storage

PREPARED_MANIFEST = "prepared.json"   # written last by `prepare`: its presence means every shard is complete
SHARD_SUFFIX = ".tokens.array_record"


class Concat:
    """Several random-access sequences seen as one, in order."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = [p for p in parts if len(p)]
        self._ends = list(np.cumsum([len(p) for p in self.parts]))

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._ends, i)
        return self.parts[k][i - (self._ends[k - 1] if k else 0)]


class Subset:
    """The records of `base` at `indices` (held-out splits of lazy sources without copying them)."""

    def __init__(self, base: Sequence, indices):
        self.base, self.indices = base, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]


def _array_record_source(paths: Sequence[str]):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    return ArrayRecordDataSource(list(paths))


class TextRecords:
    """ArrayRecord files of UTF-8 documents. A record that is not UTF-8 is an error naming file and record."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._src = _array_record_source(self.paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> str:
        data = self._src[i]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.paths}: record {i} is not UTF-8 text (token-id shards are opened as a "
                             f"prepared directory, not as single files)") from None


class TokenRecords:
    """Prepared shards: each record is one document's int32 token ids (little-endian, no bos/eos)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._src = _array_record_source(self.paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._src[i], dtype="<i4")


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers the same: the SHA-256 of the serialized SentencePiece model, plus the
    path and size for the error messages."""
    state = tokenizer.__getstate__() if hasattr(tokenizer, "__getstate__") else None
    proto = state.get("model_proto") if isinstance(state, dict) else None
    if proto is None and getattr(tokenizer, "path", None):
        with open(tokenizer.path, "rb") as f:
            proto = f.read()
    if proto is None:
        raise ValueError(f"cannot identify tokenizer {tokenizer!r}: it exposes neither its model bytes nor a path")
    return {"sha256": hashlib.sha256(proto).hexdigest(), "path": str(getattr(tokenizer, "path", "")),
            "vocab_size": int(getattr(tokenizer, "vocab_size", 0))}


def check_shard(path: str, records: int, nbytes: int) -> str | None:
    """Why the shard at `path` is not the complete file its manifest describes, or None when it is."""
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if size != nbytes:
        return f"{size} bytes on disk, {nbytes} when written (truncated or overwritten)"
    from array_record.python import array_record_module
    try:
        reader = array_record_module.ArrayRecordReader(path)
        found = reader.num_records()
        reader.close()
    except Exception as e:  # noqa: BLE001 - a corrupt file raises from C++ with assorted types
        return f"unreadable ({e})"
    if found != records:
        return f"{found} records readable, {records} written"
    return None


def fetch_prepared(url: str) -> str:
    """A local copy of a `prepare` output in an object store (ArrayRecord's reader opens local files only): its
    shards and manifest in a per-machine cache (storage.local_cache_dir), fetched once; returns the local folder."""
    manifest = json.loads((storage.as_path(url) / PREPARED_MANIFEST).read_text(encoding="utf-8"))
    local = storage.local_cache_dir(url, "prepared")
    sizes = {s["file"]: s["bytes"] for s in manifest["shards"]}
    storage.fetch_files(url, sorted(sizes), local, sizes)
    storage.fetch_files(url, [PREPARED_MANIFEST], local)   # last: its presence says the copy is whole
    return str(local)


def open_prepared(directory: str, tokenizer=None) -> tuple[TokenRecords, dict]:
    """(records, manifest) of a `prepare` output directory, after checking every shard's size and record
    count and, when `tokenizer` is given, that the shards were written by that same tokenizer. A directory in an
    object store (gs://, s3://) is read from a local copy (`fetch_prepared`)."""
    if storage.is_remote(directory):
        directory = fetch_prepared(directory)
    path = os.path.join(directory, PREPARED_MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {PREPARED_MANIFEST}; `jaxllm data prepare` did not finish "
                                f"there (run it again: finished shards are kept)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if tokenizer is not None:
        mine, theirs = tokenizer_identity(tokenizer), manifest["tokenizer"]
        if mine["sha256"] != theirs["sha256"]:
            raise ValueError(f"{directory} was prepared with tokenizer {theirs['path']} (sha256 "
                             f"{theirs['sha256'][:12]}, {theirs['vocab_size']} pieces), but this run uses "
                             f"{mine['path']} (sha256 {mine['sha256'][:12]}, {mine['vocab_size']} pieces); "
                             f"prepare the data again with the run's tokenizer")
    paths = []
    for shard in manifest["shards"]:
        shard_path = os.path.join(directory, shard["file"])
        problem = check_shard(shard_path, shard["records"], shard["bytes"])
        if problem:
            raise ValueError(f"prepared shard {shard_path} is damaged: {problem}; run `jaxllm data prepare` "
                             f"again to rebuild it")
        if shard["records"]:
            paths.append(shard_path)
    if not paths:
        raise ValueError(f"{directory}: the prepared data holds no documents")
    return TokenRecords(paths), manifest


def is_prepared(path: str) -> bool:
    if storage.is_remote(path):
        return (storage.as_path(path) / PREPARED_MANIFEST).exists()
    return os.path.isdir(path) and os.path.exists(os.path.join(path, PREPARED_MANIFEST))


class TfdsRecords:
    """`tfds:NAME[/CONFIG][:VERSION]:SPLIT` through `tfds.data_source` (ArrayRecord; TensorFlow not needed).
    The data directory is TFDS's own default (`TFDS_DATA_DIR` or ~/tensorflow_datasets)."""

    def __init__(self, name: str, split: str, field: str, data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ModuleNotFoundError("tfds: sources need tensorflow-datasets (pip install 'jaxllm[data]'); "
                                      "TensorFlow itself is not needed") from None
        self.name, self.split, self.field = name, split, field
        self._src = tfds.data_source(name, split=split, data_dir=data_dir)
        features = getattr(getattr(self._src, "dataset_info", None), "features", None)
        if features is not None and field not in features:
            raise ValueError(f"tfds:{name}:{split} has no feature {field!r} (features: {sorted(features)}); "
                             f"set data.jsonl_field to the text feature")

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> str:
        value = self._src[i][self.field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
