"""A file's documents, read record by record: the lines of a text file, the records of JSON Lines, the rows
of Parquet, each cut into `cut_pieces` pieces. One sequential pass, a line (or a Parquet row group) at a time.

A *unit* is one document or piece with where it lies in the file (its byte range, record line or row), so a
reader can fetch it again by a positioned read: indexed.py records units in its on-disk index, and Beam's
splittable reads (clean_beam.py) use the per-line functions (`line_unit`, `json_unit`) directly, so both cleaning
runners and training read the same documents with the same ids. A document's *position* is where its text
starts: a byte offset in text and JSON Lines files, the row number in Parquet.

Local files and gs:// / s3:// URLs both (etils.epath, fsspec underneath).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from typing import Iterable, Iterator

import numpy as np

BOM = b"\xef\xbb\xbf"
FIRST, LAST = 1, 2                      # flags of an entry: opens / closes its document


def is_remote(path: str) -> bool:
    return "://" in str(path)


def open_binary(path: str):
    """A binary file object for a local path or a gs:// / s3:// URL (etils.epath, fsspec underneath)."""
    if not is_remote(path):
        return open(path, "rb")
    from etils import epath
    return epath.Path(path).open("rb")


# ------------------------------------------------------------------------------------------ lines


@dataclasses.dataclass
class Line:
    start: int          # byte offset of the line's first byte (after a BOM)
    content: bytes      # without its line end
    next: int           # byte offset of the next line
    has_nl: bool        # ended by \n, \r\n or \r (the last line of a file may not be)
    lineno: int         # 1-based, counting \n, \r\n and lone \r as line ends (as str.splitlines does)


def raw_lines(f, start: int = 0, lineno: int = 1) -> Iterator[Line]:
    """The lines of a binary file from byte `start` (a line start), one at a time. Line ends are \\n, \\r\\n and a
    lone \\r, as universal newlines read them; a UTF-8 BOM at byte 0 is not part of the first line."""
    f.seek(start)
    pos = start
    for chunk in iter(f.readline, b""):
        if pos == 0 and chunk.startswith(BOM):
            chunk, pos = chunk[3:], 3
            if not chunk:   # a file holding only a BOM
                return
        body, nl = (chunk[:-2], 2) if chunk.endswith(b"\r\n") else (chunk[:-1], 1) if chunk.endswith(b"\n") \
            else (chunk, 0)
        parts = body.split(b"\r")
        if nl == 0 and len(parts) > 1 and parts[-1] == b"":   # a file ending in a lone \r
            parts.pop()
            nl = 1
        for i, part in enumerate(parts):
            end = nl if i == len(parts) - 1 else 1
            yield Line(pos, part, pos + len(part) + end, end > 0, lineno)
            pos += len(part) + end
            lineno += 1 if end else 0


def decode_line(line: Line, path: str) -> str:
    from jaxllm.data.formats import RecordError
    try:
        return line.content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(utf8_error(path, line.lineno, line.content[e.start], e.start + 1), "not_utf8") from None


def utf8_error(path: str, lineno: int, byte: int, column: int) -> str:
    return (f"{path}:{lineno}: not valid UTF-8 (byte 0x{byte:02x} at byte column {column}); re-encode the file "
            f"as UTF-8")


def decode_region(data: bytes) -> str:
    """Raw bytes of a document or piece → its text: UTF-8, `\\n` line ends."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------- documents of one file
# A unit is one document or piece: (a, b, cs, ce, flags, text). For text, [a, b) is its byte range and cs = ce
# = 0; for JSON Lines [a, b) is its record's line and [cs, ce) its characters in the record's text (ce = -1:
# to the end); for Parquet a is the row and b the row group. Skipped records are ("skip", reason).


def _pieces(text: str, max_chars: int) -> list[tuple[int, int, int]]:
    """cut_pieces' (start, end, flags) character ranges of `text`."""
    from jaxllm.data.sources import cut_pieces
    bounds, start = [], 0
    for piece in cut_pieces(text, max_chars):
        bounds.append((start, start + len(piece)))
        start += len(piece)
    return [(a, b, (FIRST if i == 0 else 0) | (LAST if i == len(bounds) - 1 else 0))
            for i, (a, b) in enumerate(bounds)]


def line_unit(line: Line, path: str, max_chars: int) -> Iterator[tuple]:
    """The document of one line (stripped), as pieces: text split "line"."""
    content = decode_line(line, path)
    text = content.strip()
    if not text:
        yield "skip", "empty"
        return
    lead = len(content) - len(content.lstrip())
    start = line.start + len(content[:lead].encode("utf-8"))
    for a, b, flags in _pieces(text, max_chars):
        yield (start + len(text[:a].encode("utf-8")), start + len(text[:b].encode("utf-8")), 0, 0, flags,
               text[a:b])


def json_unit(line: Line, path: str, field: str, on_error: str, max_chars: int) -> Iterator[tuple]:
    """The document of one JSON Lines record (`record_text`, stripped), as pieces; a blank line is nothing."""
    from jaxllm.data.formats import RecordError
    from jaxllm.data.sources import record_text
    content = decode_line(line, path)
    if not content.strip():
        return
    try:
        record = json.loads(content)
    except json.JSONDecodeError as e:
        if on_error == "raise":
            raise RecordError(f"{path}:{line.lineno}: invalid JSON ({e.msg} at column {e.colno})",
                              "invalid JSON") from None
        yield "skip", "bad_json"
        return
    try:
        text = record_text(record, field, f"{path}:{line.lineno}").strip()
    except RecordError as e:
        if on_error == "raise":
            raise
        yield "skip", e.reason
        return
    if not text:
        yield "skip", "empty"
        return
    for a, b, flags in _pieces(text, max_chars):
        yield line.start, line.next, a, b if b < len(text) else -1, flags, text[a:b]


def one_object_error(f, path: str):
    """The error for a JSON Lines file whose first line is no JSON because the file holds one pretty-printed
    object (read whole: this is only asked when the first record fails)."""
    from jaxllm.data.formats import NOT_RECORDS, RecordError
    here = f.tell()
    f.seek(0)
    try:
        value = json.loads(f.read().decode("utf-8-sig"))
    except ValueError:
        return None
    finally:
        f.seek(here)
    if isinstance(value, dict):
        return RecordError(f"{path}: holds one JSON object, not records (a JSON array of objects or JSON Lines)",
                           NOT_RECORDS)
    return None


def json_units(f, path: str, field: str, on_error: str, max_chars: int, lines: Iterable[Line] | None = None,
               seen_record: bool = False) -> Iterator[tuple]:
    """The documents of a JSON Lines file, or of the given `lines` of it (Beam reads a byte range at a time;
    `seen_record`: the range starts after the first record, so a bad line cannot mean a one-object file)."""
    for line in raw_lines(f) if lines is None else lines:
        units = json_unit(line, path, field, "raise", max_chars)
        try:
            for unit in units:
                seen_record = True
                yield unit
        except ValueError as e:
            reason = getattr(e, "reason", "")
            if not seen_record and reason == "invalid JSON" and (error := one_object_error(f, path)) is not None:
                raise error from None
            seen_record = True
            if on_error == "raise" or reason == "not_utf8":
                raise
            yield "skip", "bad_json" if reason == "invalid JSON" else reason


def _blank(line: Line, path: str) -> bool:
    return not decode_line(line, path).strip()


def _cut_stream(lines: Iterable[Line], path: str, max_chars: int) -> Iterator[tuple]:
    """`cut_pieces` over the text the lines make (their \\n line ends included, trailing whitespace dropped),
    holding only one window of text at a time: units (a, b, 0, 0, flags, text) with [a, b) the piece's bytes."""
    buf, base, total, text_end, text_end_byte = "", 0, 0, 0, 0
    anchors: collections.deque = collections.deque()   # (document char offset, line, its text) in the window
    it, eof = iter(lines), False

    def pull():
        nonlocal buf, total, text_end, text_end_byte, eof
        line = next(it, None)
        if line is None:
            eof = True
            return
        content = decode_line(line, path)
        text = content + ("\n" if line.has_nl else "")
        if max_chars > 0:
            anchors.append((total, line, content))
            buf += text
        if content.rstrip():
            text_end = total + len(content.rstrip())
            text_end_byte = line.start + len(content.rstrip().encode("utf-8"))
        total += len(text)

    def byte_at(c: int) -> int:
        for offset, line, content in anchors:
            if c - offset <= len(content):
                return line.start + len(content[:c - offset].encode("utf-8"))
            if c - offset == len(content) + 1:
                return line.next
        raise AssertionError(c)

    first_line = next(it, None)
    if first_line is None:
        return
    it = itertools.chain([first_line], it)
    if max_chars <= 0:
        while not eof:
            pull()
        if text_end:
            yield first_line.start, text_end_byte, 0, 0, FIRST | LAST, None
        return
    start, flags = 0, FIRST
    while True:
        while not eof and text_end <= start + max_chars:   # is there text beyond this window?
            pull()
        if eof and text_end - start <= max_chars:
            if text_end > start:
                yield byte_at(start), text_end_byte, 0, 0, flags | LAST, buf[start - base:text_end - base]
            return
        end = start + max_chars
        newline = buf.rfind("\n", start + max_chars // 2 - base, end - base)
        end = base + newline + 1 if newline >= 0 else end
        yield byte_at(start), byte_at(end), 0, 0, flags, buf[start - base:end - base]
        start, flags = end, 0
        while len(anchors) > 1 and anchors[1][0] <= start:
            anchors.popleft()
        buf, base = buf[anchors[0][0] - base:], anchors[0][0]


def text_units(f, path: str, split: str, max_chars: int) -> Iterator[tuple]:
    """The documents of a .txt file by `split` ("line", "paragraph" or "file"), as pieces. For "file" and
    "paragraph" text is None when max_chars is 0 (the index does not need it; `reader[i]` reads it)."""
    lines = raw_lines(f)
    if split == "line":
        for line in lines:
            yield from line_unit(line, path, max_chars)
        return
    if split == "file":
        found = False
        for unit in _cut_stream(itertools.dropwhile(lambda ln: _blank(ln, path), lines), path, max_chars):
            found = True
            yield unit
        if not found:
            yield "skip", "empty"
        return
    # Paragraphs are runs of non-blank lines. The in-memory reader split the text at every newline followed by
    # blank lines (r"\n(?:[^\S\n]*\n)+") and counted the pieces that were empty; the same count here: a run of
    # blank lines separates when it holds a line end after the previous line's (two at the start of a file).
    separators = paragraphs = 0
    for blank, group in itertools.groupby(lines, key=lambda ln: _blank(ln, path)):
        if blank:
            ended = sum(ln.has_nl for ln in group)
            separators += ended >= (2 if separators + paragraphs == 0 else 1)
        else:
            paragraphs += 1
            yield from _cut_stream(group, path, max_chars)
    for _ in range(separators + 1 - paragraphs):
        yield "skip", "empty"


def parquet_units(f, path: str, field: str, max_chars: int, groups: Iterable[int] | None = None
                  ) -> Iterator[tuple]:
    """The documents of a Parquet string column (stripped, nulls and empties skipped), a row group at a time;
    all row groups, or the given ones (a Beam worker's share)."""
    import pyarrow.parquet as pq
    reader = pq.ParquetFile(f)
    if field not in reader.schema_arrow.names:
        raise ValueError(f"{path}: column {field!r} missing (columns: {reader.schema_arrow.names}); "
                         f"set data.jsonl_field")
    first_rows = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
    for group in range(reader.num_row_groups) if groups is None else groups:
        row = int(first_rows[group])
        for value in reader.read_row_group(group, columns=[field]).column(0).to_pylist():
            if value is None:
                yield "skip", "null"
            elif not isinstance(value, str):
                raise ValueError(f"{path}: row {row}: column {field!r} must hold strings, got {type(value).__name__}")
            elif not value.strip():
                yield "skip", "empty"
            else:
                text = value.strip()
                for a, b, flags in _pieces(text, max_chars):
                    yield row, group, a, b if b < len(text) else -1, flags, text[a:b]
            row += 1


def format_of(path: str) -> str:
    """"parquet", "jsonl" or "txt": how a file is indexed (.json files holding JSON Lines are "jsonl")."""
    if path.endswith(".parquet"):
        return "parquet"
    return "jsonl" if path.endswith((".jsonl", ".json")) else "txt"


def streams(path: str) -> bool:
    """Whether a file is read document by document (else: parsed whole, as a JSON array is)."""
    if path.endswith((".jsonl", ".json")):
        return not is_json_array(path)
    return path.endswith((".txt", ".parquet"))


def is_json_array(path: str) -> bool:
    """A .json / .jsonl file that is one JSON array (parsed whole: an array cannot be read record by record)."""
    with open_binary(path) as f:
        return starts_json_array(f.read(4096))


def starts_json_array(head: bytes) -> bool:
    return head.removeprefix(BOM).lstrip().startswith(b"[")


def units(f, path: str, *, split: str, field: str, on_error: str, max_chars: int) -> Iterator[tuple]:
    kind = format_of(path)
    if kind == "parquet":
        return parquet_units(f, path, field, max_chars)
    if kind == "jsonl":
        return json_units(f, path, field, on_error, max_chars)
    return text_units(f, path, split, max_chars)


def iter_documents(path: str, *, split: str, field: str, on_error: str, skipped: collections.Counter
                   ) -> Iterator[tuple[int, str]]:
    """(position, text) of every document of one file in a single pass, without an index (cleaning reads each
    document once); records skipped are counted in `skipped`."""
    with open_binary(path) as f, open_binary(path) as g:
        yield from documents(f, g, path, split=split, field=field, on_error=on_error, skipped=skipped)


def documents(f, g, path: str, *, split: str, field: str = "text", on_error: str = "raise",
              skipped: collections.Counter) -> Iterator[tuple[int, str]]:
    """`iter_documents` on open files (Beam opens them through its FileSystems): `f` is read in order, `g`
    serves the byte ranges of whole paragraphs and files, whose text the pass does not keep."""
    for unit in units(f, path, split=split, field=field, on_error=on_error, max_chars=0):
        if unit[0] == "skip":
            skipped[unit[1]] += 1
        elif unit[5] is None:
            g.seek(unit[0])
            yield unit[0], decode_region(g.read(unit[1] - unit[0]))
        else:
            yield unit[0], unit[5]
