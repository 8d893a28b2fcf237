"""`jaxllm data prepare`: tokenise once, offline, into ArrayRecord shards of token ids.

    out/job.json                       inputs, options and the tokenizer's identity (SHA-256 of its model)
    out/shard-00007.tokens.array_record   one record per document: int32 ids (little-endian), no bos/eos
    out/shard-00007.json               that shard's index: input, document range, records, tokens, bytes
    out/prepared.json                  written last: every shard with its counts, and the totals

A shard is one input file, or a range of `docs_per_shard` documents of a random-access source (built-in
corpora, TFDS, ArrayRecord text). Shards are built by a pool of worker processes. Each is written under a
temporary name, checked, renamed, and only then gets its `.json`; so after a crash a rerun keeps every shard
whose `.json` matches the file on disk (size and record count) and rebuilds the rest, including a shard
truncated after the fact. Training refuses a damaged shard (records.open_prepared) and a directory written
by another tokenizer, naming both.

bos/eos are not stored: the pipeline adds them per `data.add_bos` / `data.add_eos`, so one preparation
serves both settings (`plan` adds them to the counts).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from typing import Sequence

import numpy as np

from jaxllm import storage
from jaxllm.data import records as records_lib
from jaxllm.data.sources import open_source, source_files
from jaxllm.progress import ProgressLog

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
LAZY_PREFIXES = ("builtin:", "tfds:")


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}{records_lib.SHARD_SUFFIX}"


def plan_shards(inputs: Sequence[str], *, docs_per_shard: int, **read_kw) -> list[dict]:
    """The shards to write, in order: {input, start, stop} (stop None = the whole file)."""
    shards = []
    for spec in inputs:
        if spec.startswith(LAZY_PREFIXES):
            n = len(open_source(spec, **read_kw))
            shards += [{"input": spec, "start": a, "stop": min(a + docs_per_shard, n)}
                       for a in range(0, n, docs_per_shard)]
        else:
            for path in source_files(spec):
                if path.endswith(".array_record"):   # random access: split like a lazy source
                    n = len(open_source(path, **read_kw))
                    shards += [{"input": path, "start": a, "stop": min(a + docs_per_shard, n)}
                               for a in range(0, n, docs_per_shard)]
                else:
                    shards.append({"input": path, "start": 0, "stop": None})
    return shards


def _write_shard(task: dict) -> dict:
    """Worker: tokenises one shard's documents and writes the shard, then its index."""
    from array_record.python import array_record_module
    from jaxllm.tokenizer import load_tokenizer
    out, k, opts = task["out"], task["index"], task["options"]
    tokenizer = load_tokenizer(task["tokenizer"])
    source = open_source(task["input"], jsonl_field=opts["jsonl_field"], text_split=opts["text_split"],
                         on_error=opts["on_error"])
    stop = len(source) if task["stop"] is None else task["stop"]
    path = os.path.join(out, _shard_name(k))
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")   # Grain reads group size 1 fastest
    n_docs = n_tokens = too_long = 0
    # Seen when the shard is built in the main process (one shard left: often one large file).
    progress = ProgressLog(f"prepare {_shard_name(k)}", stop - task["start"], "documents", logger=log)
    for a in range(task["start"], stop, 1000):   # batches for sentencepiece's threaded encoder
        texts = [source.records[i] for i in range(a, min(a + 1000, stop))]
        limit = opts["max_doc_chars"]
        kept = [t for t in texts if not (limit and len(t) > limit)]
        too_long += len(texts) - len(kept)
        for ids in tokenizer.encode_batch(kept):
            writer.write(np.asarray(ids, "<i4").tobytes())
            n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
        progress.update(a + len(texts) - task["start"])
    writer.close()
    os.replace(tmp, path)
    info = {"file": _shard_name(k), "input": task["input"], "start": task["start"], "stop": stop,
            "records": n_docs, "tokens": n_tokens, "bytes": os.path.getsize(path), "skipped_long": too_long}
    problem = records_lib.check_shard(path, n_docs, info["bytes"])
    if problem:
        raise RuntimeError(f"{path}: written but not readable back: {problem}")
    with open(os.path.join(out, f"shard-{k:05d}.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    return info


def _build(task: dict) -> tuple[int, dict]:
    return task["index"], _write_shard(task)


def _done_shard(out: str, k: int, shard: dict) -> dict | None:
    """The shard's index if its file is complete and was built from the same input range, else None."""
    index = os.path.join(out, f"shard-{k:05d}.json")
    if not os.path.exists(index):
        return None
    with open(index, encoding="utf-8") as f:
        info = json.load(f)
    if info["input"] != shard["input"] or info["start"] != shard["start"]:
        return None
    problem = records_lib.check_shard(os.path.join(out, info["file"]), info["records"], info["bytes"])
    if problem:
        log.warning("rebuilding %s: %s", info["file"], problem)
        return None
    return info


def _check_job(out: str, job: dict) -> None:
    """A rerun must use the same tokenizer and options as the shards already there."""
    path = os.path.join(out, JOB_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        mine, theirs = job["tokenizer"], old["tokenizer"]
        if mine["sha256"] != theirs["sha256"]:
            raise ValueError(f"{out} holds shards written by tokenizer {theirs['path']} (sha256 "
                             f"{theirs['sha256'][:12]}), not {mine['path']} (sha256 {mine['sha256'][:12]}): use "
                             f"another --out, or delete it")
        changed = [k for k in ("inputs", "options") if old[k] != job[k]]
        if changed:
            raise ValueError(f"{out} was prepared with other {' and '.join(changed)} ({old[changed[0]]}); "
                             f"use another --out, or delete it")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(job, f, indent=1)


def prepare(inputs: Sequence[str], tokenizer_path: str, out: str, *, workers: int = 0, docs_per_shard: int = 50_000,
            jsonl_field: str = "text", text_split: str = "line", on_error: str = "raise",
            max_doc_chars: int = 0) -> dict:
    """Tokenises `inputs` (source specs) into shards under `out`; returns the manifest (prepared.json).

    workers: processes (0 = os.cpu_count()). Finished shards of an earlier, interrupted run are kept.
    `out` in an object store (gs://, s3://): see `prepare_to_store`.
    """
    from jaxllm.tokenizer import load_tokenizer
    if storage.is_remote(out):
        return prepare_to_store(inputs, tokenizer_path, out, workers=workers, docs_per_shard=docs_per_shard,
                                jsonl_field=jsonl_field, text_split=text_split, on_error=on_error,
                                max_doc_chars=max_doc_chars)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare: no inputs given")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    tokenizer = load_tokenizer(tokenizer_path)
    os.makedirs(out, exist_ok=True)
    options = dict(jsonl_field=jsonl_field, text_split=text_split, on_error=on_error, max_doc_chars=max_doc_chars,
                   docs_per_shard=docs_per_shard)
    _check_job(out, {"inputs": list(inputs), "options": options,
                     "tokenizer": records_lib.tokenizer_identity(tokenizer)})
    manifest_path = os.path.join(out, records_lib.PREPARED_MANIFEST)
    shards = plan_shards(inputs, docs_per_shard=docs_per_shard, jsonl_field=jsonl_field, text_split=text_split,
                         on_error=on_error)
    done = {k: _done_shard(out, k, s) for k, s in enumerate(shards)}
    todo = [dict(s, index=k, out=out, tokenizer=tokenizer.path, options=options)
            for k, s in enumerate(shards) if done[k] is None]
    log.info("prepare %s: %d shards, %d already done, %d to build with %d workers", out, len(shards),
             len(shards) - len(todo), len(todo), min(workers or os.cpu_count(), max(len(todo), 1)))
    if todo and os.path.exists(manifest_path):
        os.remove(manifest_path)   # the directory is incomplete until every shard is rebuilt
    t0 = time.time()
    n_workers = min(workers or os.cpu_count() or 1, len(todo))
    progress = ProgressLog(f"prepare {out}", len(todo), "shards", logger=log)
    if n_workers > 1:
        # spawn, not fork: the parent may hold threads (Grain, JAX) that a forked child would inherit locked.
        with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
            for n, (k, info) in enumerate(pool.imap_unordered(_build, todo), 1):
                done[k] = info
                progress.update(n)
    else:
        for n, task in enumerate(todo, 1):
            done[task["index"]] = _write_shard(task)
            progress.update(n)
    progress.finish()
    ordered = [done[k] for k in range(len(shards))]
    manifest = {"tokenizer": records_lib.tokenizer_identity(tokenizer), "inputs": list(inputs), "options": options,
                "documents": sum(s["records"] for s in ordered), "tokens": sum(s["tokens"] for s in ordered),
                "skipped_long": sum(s["skipped_long"] for s in ordered), "shards": ordered}
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    log.info("prepared %d documents, %d tokens in %d shards (%.1fs)", manifest["documents"], manifest["tokens"],
             len(ordered), time.time() - t0)
    return manifest


def prepare_to_store(inputs: Sequence[str], tokenizer_path: str, out: str, **options) -> dict:
    """`prepare` into an object store: ArrayRecord's writer is C++ that writes local files only, so the shards are
    built in a local staging folder (storage.local_cache_dir: a rerun on this machine resumes there) and uploaded
    whole, prepared.json last, so a reader that finds it finds every shard. A file already in the store with the
    same size is not uploaded again."""
    staging = storage.local_cache_dir(out, "prepare-staging")
    manifest = prepare(inputs, tokenizer_path, str(staging), **options)
    remote = storage.as_path(out)
    names = sorted(p.name for p in staging.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    names.remove(records_lib.PREPARED_MANIFEST)
    sent = 0
    for name in names + [records_lib.PREPARED_MANIFEST]:
        local, target = staging / name, remote / name
        if name != records_lib.PREPARED_MANIFEST and target.exists() and target.stat().length == local.stat().st_size:
            continue
        storage.upload_file(local, target)
        sent += local.stat().st_size
    log.info("uploaded %.1f MB of %s to %s", sent / 1e6, staging, out)
    return manifest
