"""Streaming text sources: `.txt`, JSON Lines and `.parquet` files indexed once, then read document by document.

Opening a file makes one sequential pass that records where every document (or piece of one) lies: a byte
range for text and JSON Lines, a row for Parquet. The pass reads a line (or a Parquet row group) at a time;
the documents themselves are read only when asked for (`reader[i]`), by a positioned read, so no process holds
a corpus in memory and a Grain `MapDataset` can still shuffle globally. The documents and pieces are exactly
those the in-memory reader gave (same stripping, same `cut_pieces` boundaries, same skip counts), so batches
and resumption do not change.

    file ──one pass (units)──▶ index (start, end, piece chars, first/last) ──cached──▶ reader[i]: read, decode

The index is cached in a per-machine directory (`$JAXLLM_INDEX_DIR`, else `$XDG_CACHE_HOME/jaxllm/indexes`,
else `~/.cache/jaxllm/indexes`), keyed by the file's path, size and modification time and the reading options:
a changed file gets a new index. Not beside the data, which may be read-only, an object store or a directory
that is itself listed as a source; not beside one run, since every run on the machine reuses it. The index is
memory-mapped, so Grain worker processes share its pages.

Local files and gs:// / s3:// URLs both: the pass reads through etils.epath; a document of a remote file is one
ranged GET through fsspec (the library epath itself uses), since epath's file objects read ahead.

The pass itself, a file's units (documents or pieces with where they lie), is file_units.py; this module is the
index that records them and the reader that fetches them back.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading

import numpy as np

from jaxllm.data.file_units import FIRST, LAST, decode_region, format_of, is_remote, open_binary, units

log = logging.getLogger(__name__)

ENTRY = np.dtype([("a", "<i8"), ("b", "<i8"), ("cs", "<i4"), ("ce", "<i4"), ("flags", "u1")])
_VERSION = 1                            # bump when the index layout or the reading rules change


def cache_dir() -> str:
    if os.environ.get("JAXLLM_INDEX_DIR"):
        return os.environ["JAXLLM_INDEX_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxllm", "indexes")


def file_identity(path: str) -> dict:
    """What makes a file the same file: its path, size and modification time (an object store's version tag,
    which epath's stat leaves out, through fsspec)."""
    if not is_remote(path):
        st = os.stat(path)
        return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    import fsspec
    fs, _ = fsspec.core.url_to_fs(path)
    info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash", "LastModified", "updated",
                                           "mtime") if info.get(k) is not None), "")
    return {"path": path, "size": int(info["size"]), "version": version}


def open_indexed(path: str, *, split: str = "file", field: str = "text", on_error: str = "raise",
                 max_chars: int = 0) -> tuple["IndexedDocuments", dict]:
    """(a lazy reader of the file's documents or pieces, {reason: records skipped}); builds the index on first
    use (one pass over the file) and reuses it while the file is unchanged."""
    kind = format_of(path)
    options = {"v": _VERSION, "format": kind, "split": split if kind == "txt" else "", "field": field,
               "on_error": on_error, "max_chars": max_chars, **file_identity(path)}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:32]
    index_path = os.path.join(cache_dir(), key + ".index")   # raw ENTRY records
    meta_path = os.path.join(cache_dir(), key + ".json")
    if not os.path.exists(meta_path):       # the .json is written last: its presence means the index is whole
        _build(path, options, index_path, meta_path)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return IndexedDocuments(path, index_path, meta["documents"], options), meta["skipped"]


def _build(path: str, options: dict, index_path: str, meta_path: str) -> None:
    """One pass over the file, its entries appended to the index file a chunk at a time (memory stays bounded
    whatever the file's size). Several processes of one machine may build it at once: same bytes, atomic."""
    os.makedirs(cache_dir(), exist_ok=True)
    chunk, count, skipped = [], 0, collections.Counter()
    tmp = f"{index_path}.{os.getpid()}.tmp"
    try:
        with open_binary(path) as f, open(tmp, "wb") as out:
            for unit in units(f, path, split=options["split"], field=options["field"], on_error=options["on_error"],
                              max_chars=options["max_chars"]):
                if unit[0] == "skip":
                    skipped[unit[1]] += 1
                    continue
                chunk.append(unit[:5])
                if len(chunk) == 4096:
                    out.write(np.array(chunk, ENTRY).tobytes())
                    count, chunk = count + len(chunk), []
            out.write(np.array(chunk, ENTRY).tobytes())
            count += len(chunk)
    except BaseException:   # a malformed record (on_error="raise"), an unreadable file: no partial index left
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, index_path)
    with open(f"{meta_path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
        json.dump({"documents": count, "skipped": dict(+skipped), "options": options}, f)
    os.replace(f"{meta_path}.{os.getpid()}.tmp", meta_path)
    log.info("indexed %s: %d documents (%s) -> %s", path, count, options["format"], index_path)


class IndexedDocuments:
    """A random-access sequence of the documents (or pieces: `TextPiece`s) of one indexed file. Holds the path,
    the memory-mapped index and an open file; pickles as paths (into Grain workers) and reopens lazily."""

    def __init__(self, path: str, index_path: str, length: int, options: dict):
        self.path, self.index_path, self.length, self.options = path, index_path, length, options
        self.format = options["format"]
        self._index = self._file = self._lock = self._fd = self._fs = None
        self._groups: collections.OrderedDict = collections.OrderedDict()   # Parquet row groups, most recent last

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k in ("path", "index_path", "length", "options", "format")}

    def __setstate__(self, state):
        self.__init__(state["path"], state["index_path"], state["length"], state["options"])

    def __len__(self) -> int:
        return self.length

    def __eq__(self, other):   # a sequence: equal to any sequence of the same documents
        if isinstance(other, (list, tuple, IndexedDocuments)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def entry(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self._index is None:
            self._index = np.memmap(self.index_path, dtype=ENTRY, mode="r", shape=(self.length,))
        return self._index[i]

    def position(self, i: int) -> int:
        """Where document i's text starts: its byte offset (text, JSON Lines) or row (Parquet)."""
        return int(self.entry(i)["a"])

    def __getitem__(self, i: int) -> str:
        from jaxllm.data.sources import TextPiece, record_text
        e = self.entry(int(i))
        a, b, cs, ce, flags = (int(e[k]) for k in ("a", "b", "cs", "ce", "flags"))
        if self.format == "txt":
            text = decode_region(self._read(a, b))
        else:
            if self.format == "jsonl":
                value = record_text(json.loads(self._read(a, b).decode("utf-8")), self.options["field"], self.path)
            else:
                value = self._row_group(b)[a - self._first_rows()[b]]
            text = value.strip()[cs:None if ce < 0 else ce]
        return text if flags == FIRST | LAST else TextPiece(text, first=bool(flags & FIRST), last=bool(flags & LAST))

    def _read(self, a: int, b: int) -> bytes:
        if not is_remote(self.path):   # pread: no shared file position, so Grain's reader threads cannot race
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return os.pread(self._fd, b - a, a)
        # An object store: one ranged GET. (An epath file object would read ahead: 50 MiB a seek with s3fs.)
        if self._fs is None:
            import fsspec
            self._fs = fsspec.core.url_to_fs(self.path)[0]
        return self._fs.cat_file(self.path, start=a, end=b)

    def _first_rows(self) -> list[int]:
        if not hasattr(self, "_starts"):
            meta = self._parquet().metadata
            self._starts = [0]
            for g in range(meta.num_row_groups):
                self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        return self._starts

    def _parquet(self):
        import pyarrow.parquet as pq
        if self._file is None:
            self._file, self._lock = pq.ParquetFile(open_binary(self.path)), threading.Lock()
        return self._file

    def _row_group(self, group: int) -> list:
        """One row group's column, decoded; the last few are kept, since Parquet reads a row group at a time
        (random access within a large row group costs a row-group read: prefer `jaxllm data prepare`)."""
        pf = self._parquet()
        with self._lock:
            if group not in self._groups:
                self._groups[group] = pf.read_row_group(group, columns=[self.options["field"]]).column(0).to_pylist()
                while len(self._groups) > 2:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(group)
            return self._groups[group]

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)
