"""Data pipeline throughput: tokens/s delivered by `lm_pipeline` with on-the-fly tokenisation and from
prepared ArrayRecord shards (0 = in-process and N Grain workers), `prepare` tokens/s, and `clean` docs/s.

Run (figures go to benchmarks/RESULTS.md):
  python benchmarks/data_throughput.py --workers=2 --seq_len=2048 --batch=8 --batches=40

Text: the Chinese novels and English text of ../shared/data/text (one document per line), tokenised with
the LLaMA tokenizer (../shared/data/tokenizers/llama/tokenizer.model).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _texts() -> list[str]:
    return [str(SHARED / "text/zh/novels"), str(SHARED / "text/en/wiki_demo.txt"),
            str(SHARED / "text/en/c4_demo.jsonl"), str(SHARED / "text/en/tinyshakespeare.txt")]


def pipeline_rate(records, tokenizer, *, seq_len: int, batch: int, batches: int, workers: int) -> float:
    from jaxllm.data import Component, Mixture, lm_pipeline
    it = lm_pipeline(Mixture((Component("bench", records),)), tokenizer, seq_len=seq_len, batch_size=batch, seed=0,
                     workers=workers)
    next(it)   # start-up (worker processes, first reads) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch * seq_len / (time.perf_counter() - t0)
    if hasattr(it, "close"):
        it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="N for the N-worker figures")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (must be divisible by --workers)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per figure")
    args = parser.parse_args()
    from jaxllm.data import load_documents, open_source
    from jaxllm.data.clean import CleanOptions, clean_local
    from jaxllm.data.prepare import prepare
    from jaxllm.tokenizer import Tokenizer

    tok_path = str(SHARED / "tokenizers/llama/tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    docs = load_documents(_texts())
    print(f"corpus: {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f}M characters; cpus: {os.cpu_count()}")
    kw = dict(seq_len=args.seq_len, batch=args.batch, batches=args.batches)
    rows = []
    for w in (0, args.workers):
        rows.append((f"on-the-fly tokenisation, {w} workers", pipeline_rate(docs, tokenizer, workers=w, **kw)))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = prepare(_texts(), tok_path, os.path.join(tmp, "p"), workers=args.workers)
        seconds = time.perf_counter() - t0
        rows.append((f"prepare ({args.workers} processes, one-off)", manifest["tokens"] / seconds))
        records = open_source(os.path.join(tmp, "p"), tokenizer=tokenizer).records
        for w in (0, args.workers):
            rows.append((f"prepared shards, {w} workers", pipeline_rate(records, tokenizer, workers=w, **kw)))
    for name, rate in rows:
        print(f"{name:<40} {rate / 1e3:10.1f}k tokens/s")
    sample = [((0, i), d) for i, d in enumerate(docs[::20])]
    t0 = time.perf_counter()
    kept, report = clean_local(sample, CleanOptions())
    seconds = time.perf_counter() - t0
    print(f"{'clean (filters + exact + near dedup)':<40} {len(sample) / seconds:10.1f} docs/s "
          f"({sum(map(len, (d for _, d in sample))) / seconds / 1e6:.2f}M chars/s; {len(sample)} docs, "
          f"{report['docs_out']} kept)")


if __name__ == "__main__":
    main()
