"""Streaming sources and the Beam cleaning job: peak memory of reading a large text source streamed (indexed)
vs in memory, and clean throughput (docs/s) and peak memory, local runner vs Beam's DirectRunner with 1 and 2
worker processes. Inputs are generated on the fly under a temporary directory and deleted after.

Run (figures go to benchmarks/RESULTS.md):
  python benchmarks/streaming_clean.py --source_mb=1024 --clean_mb=8

Each figure is measured in a fresh process. Peak memory is that process's VmHWM (Linux); for the Beam runs in
multi-process mode also the largest worker's (ru_maxrss of the children, which Linux floors at the parent's size
when the worker was forked: an upper bound).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, path, out = sys.argv[2:5]
t0 = time.perf_counter()
result = {}
if mode == "source-streamed":
    from jaxllm.data.sources import open_source
    docs = open_source(path, text_split="line").records
    result["docs"] = sum(1 for _ in docs)
elif mode == "source-in-memory":   # what every process did before: all lines as str
    with open(path, encoding="utf-8") as f:
        docs = [line.strip() for line in f.read().split("\n") if line.strip()]
    result["docs"] = len(docs)
else:
    from jaxllm.data.clean import CleanOptions, clean
    args = {"clean-local": ("local", []),
            "clean-beam-1": ("DirectRunner", ["--direct_num_workers=1", "--direct_running_mode=in_memory"]),
            "clean-beam-2": ("DirectRunner", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])}
    runner, pipeline_args = args[mode]
    report = clean([path], out, CleanOptions(read_bytes=1 << 20), runner=runner, pipeline_args=pipeline_args)
    result.update(docs=report["docs_in"], kept=report["docs_out"])
result["seconds"] = time.perf_counter() - t0
status = open("/proc/self/status").read()
result["peak_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
result["children_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(result))
"""


def _sentences() -> list[str]:
    """Real English sentences: C4's demo records and the WikiText demo."""
    text = " ".join(json.loads(line)["text"] for line in open(SHARED / "text/en/c4_demo.jsonl", encoding="utf-8"))
    text += " " + (SHARED / "text/en/wiki_demo.txt").read_text(encoding="utf-8")
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 <= len(s) <= 400]


def generate(path: Path, megabytes: int, *, jsonl: bool, seed: int = 0) -> int:
    """Documents of 6-14 random real sentences (distinct), 4% exact copies and 4% near copies (one sentence
    changed) of earlier ones; one a line. Returns the number of documents."""
    rng, pool = random.Random(seed), _sentences()
    docs, size, target = [], 0, megabytes << 20
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while size < target:
            r = rng.random()
            if docs and r < 0.04:
                doc = rng.choice(docs).upper()
            elif docs and r < 0.08:
                sentences = rng.choice(docs).split(". ")
                sentences[rng.randrange(len(sentences))] = rng.choice(pool)
                doc = ". ".join(sentences)
            else:
                doc = " ".join(rng.choice(pool) for _ in range(rng.randint(6, 14)))
            if len(docs) < 5000:
                docs.append(doc)
            elif rng.random() < 0.01:
                docs[rng.randrange(len(docs))] = doc
            line = (json.dumps({"text": doc}) if jsonl else doc) + "\n"
            f.write(line)
            size, n = size + len(line.encode("utf-8")), n + 1
    return n


def measure(mode: str, path: Path, out: Path) -> dict:
    env = {**os.environ, "JAXLLM_INDEX_DIR": str(out.parent / "indexes")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), mode, str(path), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source_mb", type=int, default=1024, help="size of the text source read streamed / "
                        "in memory")
    parser.add_argument("--clean_mb", type=int, default=8, help="size of the JSON Lines input cleaned")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jaxllm_bench_"))
    try:
        src = tmp / "source.txt"
        t0 = time.perf_counter()
        n = generate(src, args.source_mb, jsonl=False)
        print(f"source: {src.stat().st_size / 2**20:.0f} MiB, {n:,} lines, generated in "
              f"{time.perf_counter() - t0:.0f}s; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        for mode in ("source-streamed", "source-streamed", "source-in-memory"):   # 2nd streamed: index cached
            r = measure(mode, src, tmp / "unused")
            print(f"  {mode:<18} {r['docs']:>10,} docs  {r['seconds']:7.1f}s  peak {r['peak_mib']:8.1f} MiB")
        src.unlink()
        data = tmp / "clean_input.jsonl"
        n = generate(data, args.clean_mb, jsonl=True, seed=1)
        print(f"clean input: {data.stat().st_size / 2**20:.0f} MiB, {n:,} documents")
        kept = {}
        for mode in ("clean-local", "clean-beam-1", "clean-beam-2"):
            r = measure(mode, data, tmp / mode)
            kept[mode] = sorted(Path(tmp / mode).glob("clean-*.jsonl"))
            print(f"  {mode:<13} {r['docs'] / r['seconds']:8.1f} docs/s  ({r['docs']:,} in, {r['kept']:,} kept, "
                  f"{r['seconds']:.1f}s)  peak {r['peak_mib']:.0f} MiB, workers <= {r['children_peak_mib']:.0f} MiB")
        same = {m: sorted(x for p in kept[m] for x in open(p, encoding="utf-8")) for m in kept}
        print("  outputs equal:", same["clean-local"] == same["clean-beam-1"] == same["clean-beam-2"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
