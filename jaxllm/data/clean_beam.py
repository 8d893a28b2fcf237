"""`clean` on Apache Beam: the same per-document functions as the local path (clean.py), distributed.

    files ─read─▶ (id, text) ─check─▶ removed by a filter ───────────────────────────────┐
                                  └▶ passed ─GroupByKey(exact key)─▶ first of each group ─┤ exact_dup
                                        ─MinHash, band keys─GroupByKey─▶ candidate pairs  │
                                        ─join both shingle sets─▶ confirmed (a < b) ─────┤ near_dup (b)
                                        ─CoGroupByKey with the documents─▶ kept ──────────┴▶ report
      └▶ (tagged "files") what each file left out: unreadable files, skipped records ─────────▶ report
Kept documents are written as `clean-*.jsonl` shards by WriteToText; the report pieces are combined into
one JSON file, which `clean` turns into report.json.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from jaxllm.data import clean as clean_lib
from jaxllm.data import dedup

_REPORT_FILE = "_report_beam.json"


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise ModuleNotFoundError("--runner other than 'local' needs Apache Beam: "
                                  "pip install 'jaxllm[beam]'") from None
    return beam


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


def _read(item, opts):
    """One file's documents, then what reading it left out (tagged "files", for the report)."""
    import apache_beam as beam
    docs, info = clean_lib.read_file(item, opts)
    yield from docs
    yield beam.pvalue.TaggedOutput("files", info)


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
            yield beam.pvalue.TaggedOutput("removed", ("near_dup", (clean_lib.utf8_size(text), clean_lib.example(
                doc_id, text, f"jaccard {j:.3f}", a))))
        else:
            yield doc_id, text


def _exact(kv):
    """(key, [(id, text), ...]) → the first document, and a removal for each other one."""
    import apache_beam as beam
    group = sorted(kv[1])
    yield group[0]
    for doc_id, text in group[1:]:
        yield beam.pvalue.TaggedOutput("removed", ("exact_dup", (clean_lib.utf8_size(text), clean_lib.example(
            doc_id, text, "same normalised text", group[0][0]))))


def _summaries(kv):
    return kv[0], clean_lib.summarize(kv[1])


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
    from apache_beam.options.pipeline_options import PipelineOptions
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):   # shards of an earlier run would be mixed in
        if name.startswith("clean-") or name == _REPORT_FILE:
            os.remove(os.path.join(out, name))
    options = PipelineOptions(list(pipeline_args), runner=runner)
    with beam.Pipeline(options=options) as p:
        read = (p | "files" >> beam.Create(list(enumerate(files)))
                | "read" >> beam.FlatMap(_read, opts).with_outputs("files", main="docs"))
        docs = read.docs | "spread" >> beam.Reshuffle()
        checked = docs | "filter" >> beam.Map(clean_lib.apply_filters, opts)
        filtered = (checked | "failed" >> beam.Filter(lambda d: d[2] is not None)
                    | "filter examples" >> beam.Map(lambda d: (d[2][0], (clean_lib.utf8_size(d[1]),
                                                                         clean_lib.example(d[0], d[1], d[2][1])))))
        passed = checked | "passed" >> beam.Filter(lambda d: d[2] is None) | beam.Map(lambda d: (d[0], d[1]))
        exact = (passed | "exact key" >> beam.Map(lambda d: (dedup.exact_key(d[1]), d))
                 | "exact groups" >> beam.GroupByKey()
                 | "first of group" >> beam.FlatMap(_exact).with_outputs("removed", main="unique"))
        unique = exact.unique
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
        kept = split.kept
        (kept | "json" >> beam.Map(lambda d: json.dumps({"id": list(d[0]), "text": d[1]}, ensure_ascii=False))
         | "write" >> beam.io.WriteToText(os.path.join(out, "clean"), file_name_suffix=".jsonl"))
        removed = ((filtered, exact.removed, split.removed) | "all removed" >> beam.Flatten()
                   | "by reason" >> beam.GroupByKey() | "summaries" >> beam.Map(_summaries)
                   | "tag removed" >> beam.Map(lambda kv: ("removed", kv)))
        size_in = (docs | "bytes in" >> beam.Map(lambda d: (1, clean_lib.utf8_size(d[1])))
                   | "total in" >> beam.CombineGlobally(_add_pairs) | beam.Map(lambda x: ("in", x)))
        size_out = (kept | "bytes out" >> beam.Map(lambda d: (1, clean_lib.utf8_size(d[1])))
                    | "total out" >> beam.CombineGlobally(_add_pairs) | beam.Map(lambda x: ("out", x)))
        read_report = (read.files | "file infos" >> beam.combiners.ToList()
                       | "files report" >> beam.Map(lambda infos: ("files", clean_lib.summarize_files(infos))))
        ((removed, size_in, size_out, read_report) | "report pieces" >> beam.Flatten()
         | "gather" >> beam.combiners.ToList()
         | "assemble" >> beam.Map(_assemble)
         | "write report" >> beam.io.WriteToText(os.path.join(out, _REPORT_FILE), shard_name_template="",
                                                 num_shards=1))
    path = os.path.join(out, _REPORT_FILE)
    with open(path, encoding="utf-8") as f:
        report = json.loads(f.read())
    os.remove(path)
    return report
