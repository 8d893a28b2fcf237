"""`jaxllm data clean`: quality filters, exact and near-duplicate removal, and a report.

    documents ──filters (filters.py, first failing rule)──▶ passed ──exact dedup──▶ ──near dedup──▶ kept

Output: `out/clean-00000-of-0000N.jsonl` ({"id": [file, index], "text": ...} per line; training and
`prepare` read the `text` field) and `out/report.json`: documents and bytes in and out, and per filter and
per dedup stage the documents and bytes removed with examples (the three smallest ids, so every runner
picks the same ones); the input files that gave no text (empty, not UTF-8, not records: skipped, with the
error) and the malformed records skipped inside the others, by reason. `strict` aborts on either instead.

Two runners share every per-document function, so they give the same documents and the same report:
  * "local" (default): plain Python in this process, for what fits on one machine;
  * any Apache Beam runner ("DirectRunner" in process, "DataflowRunner", "FlinkRunner", "SparkRunner", ...)
    with its pipeline options passed through (`--project=...`, `--direct_num_workers=4`, ...). Beam is the
    engine TFDS and ArrayRecord already use; no scheduler of our own. Near-dup confirmation joins each
    candidate pair with both shingle sets; the removal rule (drop the larger id of each confirmed pair)
    needs no global clustering step.
Document ids are (input file index, position in that file), files in sorted order; the position is where the
document's text starts (a byte offset, or a Parquet row), which a Beam worker reading one byte range of a file
knows without counting the documents before it (`read_file`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Iterable, Sequence

from jaxllm.data import dedup, file_units
from jaxllm.data.filters import FilterConfig, first_failure
from jaxllm.data.formats import RecordError
from jaxllm.data.sources import no_documents, open_source, source_files
from jaxllm.progress import ProgressLog

log = logging.getLogger(__name__)
EXAMPLES = 3
SNIPPET = 200


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    lang: str = "any"               # keep only this script-detected language (zh, en, ja, ...); "any" = all
    threshold: float = 0.8          # near-duplicate: shingle Jaccard at or above this
    num_perm: int = 128             # MinHash permutations
    shingle: int = 5                # k: words (Latin scripts) or characters (CJK) per shingle
    filters: FilterConfig = FilterConfig()
    skip_filters: tuple = ()        # filter names not applied (e.g. ("terminal_punct",))
    jsonl_field: str = "text"
    text_split: str = "line"
    strict: bool = False            # an unreadable file or malformed record aborts; else skipped and counted
    read_bytes: int = 64 << 20      # Beam: bytes of a text / JSON Lines / Parquet file read by one task


def input_files(inputs: Sequence[str]) -> list[str]:
    """Every input spec expanded to files (or kept as one built-in / TFDS spec), in order."""
    files = []
    for spec in inputs:
        files += [spec] if spec.startswith(("builtin:", "tfds:")) else source_files(spec)
    return files


def read_file(item: tuple[int, str], opts: CleanOptions) -> tuple[list[tuple[tuple, str]], dict]:
    """One input file -> (its documents [(id, text)], what reading it left out: {"file", "skipped": {reason:
    records}} or, for a file that gives no text (empty, not UTF-8, not records), {"file", "unreadable": reason,
    "error"}). With opts.strict both raise instead, naming the file and line. A document's id is (file index,
    position): where its text starts in the file (`file_units.iter_documents`: a byte offset, or a Parquet row), or
    its index for files parsed whole (JSON arrays, ArrayRecord, built-ins), as every runner can compute it."""
    index, path = item
    on_error = "raise" if opts.strict else "skip"
    try:
        if not path.startswith(("builtin:", "tfds:")) and file_units.streams(path):
            skipped = collections.Counter()
            docs = [((index, pos), text) for pos, text in file_units.iter_documents(
                path, split=opts.text_split, field=opts.jsonl_field, on_error=on_error, skipped=skipped)]
            if not docs:
                raise no_documents(path, skipped)
        else:
            source = open_source(path, jsonl_field=opts.jsonl_field, text_split=opts.text_split, on_error=on_error)
            docs, skipped = [((index, i), source.records[i]) for i in range(len(source))], source.skipped
    except (RecordError, OSError) as e:
        if opts.strict:
            raise
        return [], unreadable_info(path, e)
    return docs, {"file": path, "skipped": dict(skipped)}


def unreadable_info(path: str, error: Exception) -> dict:
    reason = error.reason if isinstance(error, RecordError) else type(error).__name__
    return {"file": path, "unreadable": reason, "error": str(error)}


def summarize_files(infos: Iterable[dict]) -> dict:
    """What reading left out, for the report: the unreadable files (sorted, with the error) and the records
    skipped inside readable ones, by reason."""
    unreadable, records = [], collections.Counter()
    for info in infos:
        if "unreadable" in info:
            unreadable.append({"file": info["file"], "reason": info["unreadable"], "error": info["error"]})
        else:
            records.update({k: v for k, v in info["skipped"].items() if k != "empty"})
    return {"unreadable_files": sorted(unreadable, key=lambda u: u["file"]),
            "skipped_records": dict(sorted(records.items()))}


def apply_filters(doc: tuple[tuple, str], opts: CleanOptions):
    """(id, text, (filter, reason) of the first filter the text fails, or None when it passes them all)."""
    return doc[0], doc[1], first_failure(doc[1], opts.lang, opts.filters, opts.skip_filters)


def example(doc_id, text: str, why: str, duplicate_of=None) -> dict:
    ex = {"id": list(doc_id), "text": text[:SNIPPET], "why": why}
    if duplicate_of is not None:
        ex["duplicate_of"] = list(duplicate_of)
    return ex


def summarize(items: Iterable[tuple[int, dict]]) -> dict:
    """[(bytes, example)] of one removal reason → {"docs", "bytes", "examples"} (smallest ids)."""
    docs = nbytes = 0
    examples = []
    for b, ex in items:
        docs, nbytes = docs + 1, nbytes + b
        examples.append(ex)
    examples.sort(key=lambda e: e["id"])
    return {"docs": docs, "bytes": nbytes, "examples": examples[:EXAMPLES]}


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8: the size the report counts (documents in, out and removed)."""
    return len(text.encode("utf-8"))


def clean_local(docs: Iterable[tuple[tuple, str]], opts: CleanOptions) -> tuple[list, dict]:
    """(kept [(id, text)] sorted by id, report)."""
    removed: dict[str, list] = {}
    passed, docs_in, bytes_in = [], 0, 0
    for doc in docs:
        docs_in, bytes_in = docs_in + 1, bytes_in + utf8_size(doc[1])
        doc_id, text, failure = apply_filters(doc, opts)
        if failure:
            removed.setdefault(failure[0], []).append((utf8_size(text), example(doc_id, text, failure[1])))
        else:
            passed.append((doc_id, text))
    groups: dict[str, list] = {}
    for doc in sorted(passed):
        groups.setdefault(dedup.exact_key(doc[1]), []).append(doc)
    unique = []
    for group in groups.values():
        unique.append(group[0])
        for doc_id, text in group[1:]:
            removed.setdefault("exact_dup", []).append((utf8_size(text), example(doc_id, text, "same normalised text",
                                                                              group[0][0])))
    log.info("clean: %d documents passed the filters, %d after exact dedup; near-duplicate search", len(passed),
             len(unique))
    near = dedup.near_duplicates(dict(unique), threshold=opts.threshold, num_perm=opts.num_perm, k=opts.shingle)
    kept = []
    for doc_id, text in sorted(unique):
        if doc_id in near:
            kept_id, j = near[doc_id]
            removed.setdefault("near_dup", []).append((utf8_size(text), example(doc_id, text, f"jaccard {j:.3f}",
                                                                             kept_id)))
        else:
            kept.append((doc_id, text))
    return kept, make_report(docs_in, bytes_in, kept, {k: summarize(v) for k, v in removed.items()})


def make_report(docs_in: int, bytes_in: int, kept: Sequence, removed: dict) -> dict:
    return {"docs_in": docs_in, "bytes_in": bytes_in, "docs_out": len(kept),
            "bytes_out": sum(utf8_size(t) for _, t in kept), "removed": dict(sorted(removed.items()))}


def write_output(kept: Sequence, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "clean-00000-of-00001.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in kept:
            f.write(json.dumps({"id": list(doc_id), "text": text}, ensure_ascii=False) + "\n")
    return path


def read_output(out: str) -> list[tuple[tuple, str]]:
    """Every kept document of a clean run (any runner), sorted by id."""
    docs = []
    for name in sorted(os.listdir(out)):
        if name.startswith("clean-") and name.endswith(".jsonl"):
            with open(os.path.join(out, name), encoding="utf-8") as f:
                docs += [(tuple(r["id"]), r["text"]) for r in map(json.loads, f)]
    return sorted(docs)


def clean(inputs: Sequence[str], out: str, opts: CleanOptions = CleanOptions(), *, runner: str = "local",
          pipeline_args: Sequence[str] = ()) -> dict:
    """Cleans `inputs` into `out` with the local path or a Beam runner; returns (and writes) the report."""
    if runner == "local":
        files = input_files(inputs)
    else:
        from jaxllm.data import clean_beam
        files = clean_beam.input_files(inputs, pipeline_args)
    t0 = time.time()
    if runner == "local":
        infos = []
        kept, report = clean_local(_read_all(files, opts, infos), opts)
        report.update(summarize_files(infos))
        write_output(kept, out)
    else:
        from jaxllm.data.clean_beam import clean_beam
        report = clean_beam(files, out, opts, runner, pipeline_args)
    report = {"inputs": list(inputs), "runner": runner, "options": _jsonable(opts), **report}
    report["seconds"] = round(time.time() - t0, 3)
    text = json.dumps(report, ensure_ascii=False, indent=1)
    if runner == "local":
        with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
            f.write(text)
    else:
        from jaxllm.data.clean_beam import write_text
        write_text(out.rstrip("/") + "/report.json", text)
    return report


def _read_all(files: Sequence[str], opts: CleanOptions, infos: list) -> Iterable[tuple[tuple, str]]:
    """The documents of every file, in order; what each file left out goes to `infos`. A progress line per
    interval (files read), since reading and filtering a large corpus takes minutes."""
    progress = ProgressLog("clean: read and filter", len(files), "files", logger=log)
    for item in enumerate(files):
        docs, info = read_file(item, opts)
        infos.append(info)
        yield from docs
        progress.update(item[0] + 1)
    progress.finish()


def _jsonable(opts: CleanOptions) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(opts)))


def format_report(report: dict) -> str:
    lines = [f"in:  {report['docs_in']:,} documents, {report['bytes_in']:,} bytes",
             f"out: {report['docs_out']:,} documents, {report['bytes_out']:,} bytes"]
    for name, r in report["removed"].items():
        lines.append(f"  removed by {name:<17} {r['docs']:>8,} documents {r['bytes']:>12,} bytes")
        for ex in r["examples"][:1]:
            lines.append(f"      e.g. {ex['id']} ({ex['why']}): {ex['text'][:80]!r}")
    unreadable = report.get("unreadable_files", [])
    if unreadable:
        reasons = collections.Counter(u["reason"] for u in unreadable)
        lines.append(f"unreadable files skipped: {len(unreadable)} ({', '.join(f'{n} {r}' for r, n in reasons.items())}"
                     f"; --strict aborts instead)")
        lines += [f"      {u['error']}" for u in unreadable[:3]]
    for reason, n in report.get("skipped_records", {}).items():
        lines.append(f"  records skipped: {n:,} {reason}")
    return "\n".join(lines)
