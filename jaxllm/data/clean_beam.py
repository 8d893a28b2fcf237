"""`clean` on Apache Beam: the same per-document functions as the local path (clean.py), distributed.

    files ─ReadAllFiles: byte ranges of each file (DocumentSource)─▶ documents, skipped records, unreadable files
      documents of unreadable files dropped (side input: only those few files) ─▶ (id, text)
      ─check─▶ removed by a filter ──────────────────────────────────────────────────────────┐
           └▶ passed ─CombinePerKey(exact key)─▶ smallest id of each group ─────────────────────┤ exact_dup
                  ─MinHash, band keys─GroupByKey─▶ candidate pairs                             │
                  ─join both shingle sets─▶ confirmed (a < b) ──────────────────────────────────┤ near_dup (b)
                  ─CoGroupByKey with the documents─▶ kept ──WriteToText: clean-*.jsonl shards   │
                                                        └──────────────────────────────────────┴▶ report

Everything goes through Beam's IO and `FileSystems`, so inputs and outputs may be gs://, s3://, hdfs:// ... on
any runner that has the filesystem. A text file read by lines and a JSON Lines file are read by byte ranges
(`read_bytes` a task, 64 MiB by default): each task starts at the first line that begins in its range, so a
large file is split across workers and no worker holds a whole file. Parquet is split by row group. Paragraphs, whole files
and JSON arrays cannot be cut at a byte offset and are read whole by one task (streamed for text). Document ids
are (file index, position), as `clean.read_file` computes them, so the output equals the local runner's.

The removal rule is the local one: each confirmed near-duplicate pair removes its larger id, no clustering
step. Counts are Beam counters (namespace "jaxllm.clean": docs_in, docs_out, removed_<reason>,
skipped_<reason>, unreadable_files), visible in the runner's UI; the report pieces are also combined into one
JSON file, which `clean` turns into report.json.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
from typing import Sequence

from jaxllm.data import clean as clean_lib
from jaxllm.data import dedup, file_units
from jaxllm.data.formats import RecordError

log = logging.getLogger(__name__)
_REPORT_FILE = "_report_beam.json"
NAMESPACE = "jaxllm.clean"


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise ModuleNotFoundError("--runner other than 'local' needs Apache Beam: "
                                  "pip install 'jaxllm[beam]'") from None
    return beam


def _count(name: str, n: int = 1) -> None:
    from apache_beam.metrics import Metrics
    Metrics.counter(NAMESPACE, name).inc(n)


def _document_source(opts):
    from apache_beam.io.filebasedsource import FileBasedSource

    class DocumentSource(FileBasedSource):
        """One input file through FileSystems → ("doc", position, text), ("skip", reason, n) and, for a file
        that gives no text, ("unreadable", reason, error)."""

        def __init__(self, path: str):
            super().__init__(path, splittable=True, validate=False)

        def read_records(self, file_name, tracker):
            with self.open_file(file_name) as f:
                kind = file_units.format_of(file_name)
                array = kind == "jsonl" and file_units.starts_json_array(f.read(4096))
                if kind == "parquet":
                    records = _parquet_records(f, file_name, tracker, opts)
                elif (kind == "jsonl" and not array) or (kind == "txt" and opts.text_split == "line"):
                    records = _line_records(f, file_name, tracker, opts, self.open_file)
                elif tracker.start_position() == 0:
                    records = _whole_file_records(f, file_name, opts, array, self.open_file)
                else:
                    return
                try:
                    yield from records
                except RecordError as e:
                    if opts.strict:
                        raise
                    yield "unreadable", e.reason, str(e), tracker.start_position()

    return DocumentSource


def _line_start(f, start: int) -> int:
    """The first line start at or after byte `start`: a range's first line is the one that begins in it."""
    if start == 0:
        return 0
    f.seek(start - 1)
    before = f.read(2)
    if before[:1] == b"\n" or (before[:1] == b"\r" and before[1:2] != b"\n"):
        return start
    line = next(file_units.raw_lines(f, start, 0), None)
    return line.next if line is not None else start


def _line_records(f, path: str, tracker, opts, reopen):
    """The documents of the lines that begin in this task's byte range (text split "line", or JSON Lines)."""
    on_error = "raise" if opts.strict else "skip"
    start = _line_start(f, tracker.start_position())
    current = []

    def claimed():
        for line in file_units.raw_lines(f, start, 1 if start == 0 else 0):   # line numbers known from byte 0 only
            if not tracker.try_claim(line.start):
                return
            current[:] = [line]
            yield line

    def units(lines, seen_record):
        if file_units.format_of(path) == "jsonl":
            return file_units.json_units(f, path, opts.jsonl_field, on_error, 0, lines=lines, seen_record=seen_record)
        return (u for line in lines for u in file_units.line_unit(line, path, 0))

    try:
        for unit in units(claimed(), start > 0):
            yield ("skip", unit[1], 1) if unit[0] == "skip" else ("doc", unit[0], unit[5])
    except RecordError:
        if start == 0:
            raise
        line = current[0]     # the error again, now with the line's number counted from the file's start
        with reopen(path) as g:
            line.lineno = 1 + sum(1 for _ in itertools.takewhile(lambda ln: ln.start < line.start,
                                                                 file_units.raw_lines(g)))
        list(units([line], True))
        raise


def _whole_file_records(f, path: str, opts, array: bool, reopen):
    """Paragraphs or the whole text of a .txt file (streamed), or a JSON array (parsed whole)."""
    from jaxllm.data import sources
    on_error = "raise" if opts.strict else "skip"
    f.seek(0)
    if array:
        docs, skipped = sources.json_array_documents(path, sources.decode_text(f.read(), path), opts.jsonl_field,
                                                     on_error)
        yield from (("skip", reason, n) for reason, n in skipped.items())
        yield from (("doc", i, text) for i, text in enumerate(docs))
        return
    skipped = collections.Counter()
    with reopen(path) as g:
        yield from (("doc", pos, text) for pos, text in file_units.documents(f, g, path, split=opts.text_split,
                                                                            skipped=skipped))
    yield from (("skip", reason, n) for reason, n in skipped.items())


def _parquet_records(f, path: str, tracker, opts):
    """The rows of the row groups whose first page begins in this task's byte range."""
    import pyarrow.parquet as pq
    meta = pq.ParquetFile(f).metadata
    mine = []
    for group in range(meta.num_row_groups):
        column = meta.row_group(group).column(0)
        offset = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        if offset < tracker.start_position():
            continue
        if not tracker.try_claim(offset):
            break
        mine.append(group)
    for unit in file_units.parquet_units(f, path, opts.jsonl_field, 0, groups=mine):
        yield ("skip", unit[1], 1) if unit[0] == "skip" else ("doc", unit[0], unit[5])


def _route(record, index_of: dict):
    """(path, record) → tagged: documents ((file, position), text), skips ((file, reason), n), unreadable."""
    import apache_beam as beam
    path, (kind, *rest) = record
    index = index_of[path]
    if kind == "doc":
        yield (index, rest[0]), rest[1]
    elif kind == "skip":
        _count(f"skipped_{rest[0]}", rest[1])
        yield beam.pvalue.TaggedOutput("skip", ((index, rest[0]), rest[1]))
    else:
        _count("unreadable_files")
        yield beam.pvalue.TaggedOutput("unreadable", (index, (rest[2], rest[0], rest[1])))   # the earliest wins


def _read_whole(item, opts):
    """Built-in corpora, TFDS datasets and ArrayRecord files: read by `clean.read_file` in one task, tagged as
    `_route` tags the documents of files."""
    import apache_beam as beam
    docs, info = clean_lib.read_file(item, opts)
    yield from docs
    if "unreadable" in info:
        yield beam.pvalue.TaggedOutput("unreadable", (item[0], (0, info["unreadable"], info["error"])))
    for reason, n in info.get("skipped", {}).items():
        yield beam.pvalue.TaggedOutput("skip", ((item[0], reason), n))


def _ranged(path: str) -> bool:
    """Read by Beam's file IO in byte ranges or row groups (else whole, by `_read_whole`)."""
    return not path.startswith(("builtin:", "tfds:")) and path.endswith((".txt", ".jsonl", ".json", ".parquet"))


def input_files(inputs: Sequence[str], pipeline_args: Sequence[str] = ()) -> list[str]:
    """`clean.input_files`, with URLs (gs://, s3://, hdfs://, ...) listed through Beam's FileSystems, so any
    filesystem the runner has works: a file, a glob, or a directory (everything under it). The pipeline options
    configure the filesystems (--s3_endpoint_url, --hdfs_host, ...)."""
    import glob
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from jaxllm.data.sources import SUFFIXES, is_one_object_line
    FileSystems.set_options(PipelineOptions(list(pipeline_args)))
    files = []
    for spec in inputs:
        if "://" not in spec:
            files += clean_lib.input_files([spec])
            continue
        if glob.has_magic(spec):
            found = _matched(spec)
        else:   # a file, else a directory
            found = [p for p in _matched(spec) if p == spec] or _matched(spec.rstrip("/") + "/**")
        found = sorted(p for p in found if p.endswith(SUFFIXES))
        metadata = []
        for path in found:
            if path.endswith(".json"):
                with FileSystems.open(path) as f:
                    if is_one_object_line(f.readline()):
                        metadata.append(path)
        found = [p for p in found if p not in metadata]
        if not found:
            raise FileNotFoundError(f"data source {spec!r}: no {' or '.join(SUFFIXES)} files found")
        files += found
    return files


def _matched(pattern: str) -> list[str]:
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems
    try:
        return [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except BeamIOError:
        return []


def _file_infos(counts, skips, unreadable, files) -> dict:
    """Per file: documents read, records skipped, errors → `clean.summarize_files` (what the local path reports:
    a file with an error, or with no documents, is unreadable)."""
    from jaxllm.data.sources import no_documents
    docs = collections.Counter(dict(counts))
    skipped = collections.defaultdict(dict)
    for (index, reason), n in skips:
        skipped[index][reason] = n
    errors = dict(unreadable)
    infos = []
    for index, path in enumerate(files):
        if index in errors:
            infos.append({"file": path, "unreadable": errors[index][1], "error": errors[index][2]})
        elif not docs[index]:
            infos.append(clean_lib.unreadable_info(path, no_documents(path, skipped[index])))
        else:
            infos.append({"file": path, "skipped": skipped[index]})
    return clean_lib.summarize_files(infos)


class _Signer:
    """(id, text) → (id, shingles, band keys); one MinHasher per worker, built lazily."""

    def __init__(self, opts):
        self.opts, self._hasher = opts, None

    def __call__(self, doc):
        if self._hasher is None:
            self._hasher = dedup.MinHasher(self.opts.num_perm)
        sh = dedup.shingles(doc[1], self.opts.shingle)
        bands, rows = dedup.choose_bands(self.opts.num_perm, self.opts.threshold)
        return doc[0], sh, dedup.band_keys(self._hasher.signature(sh), bands, rows)


def _pairs(kv):
    return dedup.candidate_pairs([list(kv[1])])


def _attach_first(kv):
    """(a, {"pair": [b, ...], "sh": [shingles of a]}) → (b, (a, shingles of a)) per pair."""
    a, grouped = kv
    for sh in grouped["sh"]:
        for b in grouped["pair"]:
            yield b, (a, sh)


def _confirm(kv, threshold):
    """(b, {"pair": [(a, shingles of a)], "sh": [shingles of b]}) → (b, (a, jaccard)) when similar."""
    b, grouped = kv
    for sh_b in grouped["sh"]:
        for a, sh_a in grouped["pair"]:
            j = dedup.jaccard(sh_a, sh_b)
            if j >= threshold:
                yield b, (a, j)


def _split_near(kv):
    """(id, {"doc": [text], "near": [(kept id, jaccard)]}) → tagged outputs: kept docs or removals."""
    import apache_beam as beam
    doc_id, grouped = kv
    for text in grouped["doc"]:
        if grouped["near"]:
            a, j = min(grouped["near"])
            yield beam.pvalue.TaggedOutput("removed", _removal("near_dup", text, clean_lib.example(
                doc_id, text, f"jaccard {j:.3f}", a)))
        else:
            yield doc_id, text


def _exact_groups():
    """Per exact-duplicate key: (documents, bytes, the four smallest (id, bytes, snippet)), as a CombineFn: a group
    of a million copies of one boilerplate page is combined, never gathered. The smallest id is kept (as the
    local path keeps the first); the next three are the removal examples."""
    import apache_beam as beam

    class Smallest(beam.CombineFn):
        def create_accumulator(self):
            return 0, 0, []

        def add_input(self, acc, doc):
            size = clean_lib.utf8_size(doc[1])
            return self.merge_accumulators([acc, (1, size, [(doc[0], size, doc[1][:clean_lib.SNIPPET])])])

        def merge_accumulators(self, accs):
            n, nbytes, smallest = 0, 0, []
            for a, b, c in accs:
                n, nbytes, smallest = n + a, nbytes + b, smallest + c
            return n, nbytes, sorted(smallest)[:1 + clean_lib.EXAMPLES]

        def extract_output(self, acc):
            return acc

    return Smallest()


def _exact_removals(kv):
    """(key, (documents, bytes, smallest)) → ("exact_dup", (documents, bytes, examples)) of those removed."""
    n, nbytes, smallest = kv[1]
    if n > 1:
        (first, first_bytes, _), rest = smallest[0], smallest[1:]
        yield "exact_dup", (n - 1, nbytes - first_bytes, [clean_lib.example(doc_id, snippet, "same normalised text",
                                                                             first) for doc_id, _, snippet in rest])


def _removal(reason: str, text: str, example: dict):
    """One removed document as a partial summary: (reason, (documents, bytes, examples))."""
    return reason, (1, clean_lib.utf8_size(text), [example])


def _summaries():
    """Per removal reason: documents, bytes and the examples with the smallest ids (`clean.summarize`) from
    partial summaries (documents, bytes, examples), as a CombineFn: no worker gathers a reason's documents."""
    import apache_beam as beam

    class Summaries(beam.CombineFn):
        def create_accumulator(self):
            return 0, 0, []

        def add_input(self, acc, partial):
            return self.merge_accumulators([acc, partial])

        def merge_accumulators(self, accs):
            docs, nbytes, examples = 0, 0, []
            for d, b, ex in accs:
                docs, nbytes, examples = docs + d, nbytes + b, examples + ex
            return docs, nbytes, sorted(examples, key=lambda e: e["id"])[:clean_lib.EXAMPLES]

        def extract_output(self, acc):
            return {"docs": acc[0], "bytes": acc[1], "examples": acc[2]}

    return Summaries()


def _assemble(pieces) -> str:
    report = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0, "removed": {}}
    for kind, value in pieces:
        if kind == "removed":
            report["removed"][value[0]] = value[1]
        elif kind == "files":
            report.update(value)
        else:
            report[f"docs_{kind}"], report[f"bytes_{kind}"] = value
    report["removed"] = dict(sorted(report["removed"].items()))
    return json.dumps(report, ensure_ascii=False)


def _add_pairs(pairs):
    """(documents, bytes) pairs → their sums; associative, so Beam may combine partial sums."""
    pairs = list(pairs)
    return sum(a for a, _ in pairs), sum(b for _, b in pairs)


def clean_beam(files: Sequence[str], out: str, opts, runner: str, pipeline_args: Sequence[str] = ()) -> dict:
    beam = _import_beam()
    from apache_beam.io.filebasedsource import ReadAllFiles
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    options = PipelineOptions(list(pipeline_args), runner=runner)
    FileSystems.set_options(options)   # the driver's own reads and writes (earlier shards, the report)
    _remove_earlier_output(out)
    # FileSystems names a local file by its absolute path; the report keeps the names as given.
    paths = [f if "://" in f else os.path.abspath(f) for f in files]
    index_of = {path: i for i, path in enumerate(paths)}
    p = beam.Pipeline(options=options)
    ranged = (p | "files" >> beam.Create([path for path in paths if _ranged(path)])
              | "read" >> ReadAllFiles(True, CompressionTypes.AUTO, opts.read_bytes, 0, _document_source(opts),
                                       with_filename=True)
              | "route" >> beam.FlatMap(_route, index_of).with_outputs("skip", "unreadable", main="docs"))
    whole = (p | "other inputs" >> beam.Create([(i, path) for i, path in enumerate(paths) if not _ranged(path)])
             | "read whole" >> beam.FlatMap(_read_whole, opts).with_outputs("skip", "unreadable", main="docs"))
    skips = (ranged.skip, whole.skip) | "all skips" >> beam.Flatten() | "skips per file" >> beam.CombinePerKey(sum)
    bad = ((ranged.unreadable, whole.unreadable) | "all unreadable" >> beam.Flatten()
           | "first error per file" >> beam.CombinePerKey(min))
    docs = ((ranged.docs, whole.docs) | "all docs" >> beam.Flatten()
            | "drop unreadable files" >> beam.Filter(lambda d, bad: d[0][0] not in bad, bad=beam.pvalue.AsDict(bad))
            | "count in" >> beam.Map(_counted, "docs_in"))
    per_file = (docs | "docs per file" >> beam.Map(lambda d: (d[0][0], 1))
                | "count per file" >> beam.CombinePerKey(sum))
    checked = docs | "filter" >> beam.Map(clean_lib.apply_filters, opts)
    filtered = (checked | "failed" >> beam.Filter(lambda d: d[2] is not None)
                | "filter examples" >> beam.Map(lambda d: _removal(d[2][0], d[1], clean_lib.example(d[0], d[1],
                                                                                                     d[2][1]))))
    passed = checked | "passed" >> beam.Filter(lambda d: d[2] is None) | beam.Map(lambda d: (d[0], d[1]))
    keyed = passed | "exact key" >> beam.Map(lambda d: (dedup.exact_key(d[1]), d))
    unique = keyed | "first of group" >> beam.CombinePerKey(min) | "unique" >> beam.Values()
    exact_removed = (keyed | "exact groups" >> beam.CombinePerKey(_exact_groups())
                     | "exact removals" >> beam.FlatMap(_exact_removals))
    signed = unique | "sign" >> beam.Map(_Signer(opts))
    shingles = signed | "shingles" >> beam.Map(lambda s: (s[0], s[1]))
    pairs = (signed | "band keys" >> beam.FlatMap(lambda s: [(k, s[0]) for k in s[2]])
             | "buckets" >> beam.GroupByKey() | "pairs" >> beam.FlatMap(_pairs) | "distinct" >> beam.Distinct())
    with_a = ({"pair": pairs, "sh": shingles} | "join a" >> beam.CoGroupByKey()
              | "attach a" >> beam.FlatMap(_attach_first))
    confirmed = ({"pair": with_a, "sh": shingles} | "join b" >> beam.CoGroupByKey()
                 | "confirm" >> beam.FlatMap(_confirm, opts.threshold))
    split = ({"doc": unique, "near": confirmed} | "join docs" >> beam.CoGroupByKey()
             | "split" >> beam.FlatMap(_split_near).with_outputs("removed", main="kept"))
    kept = split.kept | "count out" >> beam.Map(_counted, "docs_out")
    (kept | "json" >> beam.Map(lambda d: json.dumps({"id": list(d[0]), "text": d[1]}, ensure_ascii=False))
     | "write" >> beam.io.WriteToText(FileSystems.join(out, "clean"), file_name_suffix=".jsonl"))
    removed = ((filtered, exact_removed, split.removed) | "all removed" >> beam.Flatten()
               | "count removed" >> beam.Map(lambda kv: _counted(kv, f"removed_{kv[0]}", kv[1][0]))
               | "by reason" >> beam.CombinePerKey(_summaries())
               | "tag removed" >> beam.Map(lambda kv: ("removed", kv)))
    size_in = (docs | "bytes in" >> beam.Map(lambda d: (1, clean_lib.utf8_size(d[1])))
               | "total in" >> beam.CombineGlobally(_add_pairs) | beam.Map(lambda x: ("in", x)))
    size_out = (kept | "bytes out" >> beam.Map(lambda d: (1, clean_lib.utf8_size(d[1])))
                | "total out" >> beam.CombineGlobally(_add_pairs) | beam.Map(lambda x: ("out", x)))
    read_report = (p | "one" >> beam.Create([None])
                   | "files report" >> beam.Map(
                       lambda _, counts, skips, bad: ("files", _file_infos(counts, skips, bad, files)),
                       counts=beam.pvalue.AsList(per_file), skips=beam.pvalue.AsList(skips),
                       bad=beam.pvalue.AsList(bad)))
    ((removed, size_in, size_out, read_report) | "report pieces" >> beam.Flatten()
     | "gather" >> beam.combiners.ToList()
     | "assemble" >> beam.Map(_assemble)
     | "write report" >> beam.io.WriteToText(FileSystems.join(out, _REPORT_FILE), shard_name_template="",
                                             num_shards=1))
    result = p.run()
    result.wait_until_finish()
    _log_counters(result)
    path = FileSystems.join(out, _REPORT_FILE)
    with FileSystems.open(path) as f:
        report = json.loads(f.read().decode("utf-8"))
    FileSystems.delete([path])
    return report


def _counted(item, name: str, n: int = 1):
    _count(name, n)
    return item


def _log_counters(result) -> None:
    from apache_beam.metrics.metric import MetricsFilter
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, KeyError):   # a runner without metrics
        return
    log.info("clean counters: %s", ", ".join(f"{c.key.metric.name} {c.committed}"
                                               for c in sorted(counters, key=lambda c: c.key.metric.name)))


def _remove_earlier_output(out: str) -> None:
    """Shards of an earlier run in `out` would be mixed in: delete them (through FileSystems)."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems
    patterns = [FileSystems.join(out, "clean-*"), FileSystems.join(out, _REPORT_FILE + "*")]
    try:
        old = [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
    except BeamIOError:   # no such directory yet
        return
    if old:
        FileSystems.delete(old)


def write_text(path: str, text: str) -> None:
    """A whole file through FileSystems (report.json beside the shards, wherever they are)."""
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))
