"""One device check: everything a lent GPU or TPU should confirm, in one call of under 10 minutes.

  python benchmarks/device_check.py --json=$OUT/device_check.json     # on a GPU or TPU
  python benchmarks/device_check.py --smoke                            # the same code paths on CPU, tiny (CI)

1. Attention kernels against `xla`: every flash kernel of the platform (GPU: cudnn, pallas; TPU: splash) on
   packed rows (3 documents per row, GQA), forward and gradients, as ‖kernel − ref‖ / ‖ref‖ where the reference
   is `xla` on float32 copies of the same bf16 inputs; then each kernel's forward and forward+backward time
   beside `xla`'s. With --smoke the Pallas kernels run in interpret mode (JAXLLM_PALLAS_INTERPRET=1) in float32.
2. The packed train step of `tinyllama-1.1b` at seq 2048 (bf16 compute, remat dots) beside transformers +
   torch.compile training the same shape in the same run: tokens/s, MFU, compile time, peak memory
   (benchmarks/train_step.py does the measuring).
3. Decode: jaxllm `generate` and the bare decode step beside Hugging Face `generate` (benchmarks/decode.py).

Prints a table per section and a RESULTS.md entry last; --json writes every number. A check that fails (error
above its bound, a kernel that raises) is reported in its row and makes the exit status 1; the sections after it
still run, so one call gives the whole picture.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:           # before jax is imported: kernels.interpret_mode() reads it per call anyway
    os.environ.setdefault("JAXLLM_PALLAS_INTERPRET", "1")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling benchmarks, run as scripts
import decode as decode_bench          # noqa: E402
import train_step as train_bench       # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.metrics import device_peak_tflops, mfu  # noqa: E402
from jaxllm.model.attention import attention  # noqa: E402
from jaxllm.model.kernels import PREFERENCE  # noqa: E402
from jaxllm.model.spec import count_params, flops_per_token, init_params  # noqa: E402

# Bounds of ‖kernel − ref‖ / ‖ref‖ (METHOD.md): bf16 operands land between 1e-3 and 1e-2; fp32 far under 1e-3.
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-3}

FULL = dict(batch=4, length=2048, heads=32, kv_heads=4, head_dim=64, dtype="bfloat16", repeats=20,
            preset="tinyllama-1.1b", seq_len=2048, train_batch=4, steps=10, warmup=2, peer_compile=True,
            prompt_len=512, new_tokens=256, decode_repeats=3)
SMOKE = dict(batch=2, length=200, heads=4, kv_heads=2, head_dim=64, dtype="float32", repeats=2,
             preset="tiny", seq_len=128, train_batch=2, steps=2, warmup=1, peer_compile=False,
             prompt_len=16, new_tokens=32, decode_repeats=1)


def packed_segments(batch: int, length: int, docs: int = 3) -> jax.Array:
    """(batch, length): `docs` documents per row, then 5% padding (segment id 0)."""
    bounds = np.linspace(0, int(length * 0.95), docs + 1).astype(int)
    seg = np.zeros(length, np.int32)
    for d in range(docs):
        seg[bounds[d]:bounds[d + 1]] = d + 1
    return jnp.asarray(np.tile(seg, (batch, 1)))


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))           # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def check_kernels(s: dict) -> list[dict]:
    """Each flash kernel of this platform against xla: error of the output and of dq, dk, dv; and timings."""
    platform = jax.default_backend()
    kernels = PREFERENCE.get(platform, ()) if platform != "cpu" else ("pallas", "splash")   # cpu: interpreted
    dtype = jnp.dtype(s["dtype"])
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (s["batch"], s["length"])
    q = jax.random.normal(keys[0], (*shape, s["heads"], s["head_dim"]), dtype)     # (batch, length, heads, head_dim)
    k = jax.random.normal(keys[1], (*shape, s["kv_heads"], s["head_dim"]), dtype)  # (batch, length, kv_heads, head_dim)
    v = jax.random.normal(keys[2], (*shape, s["kv_heads"], s["head_dim"]), dtype)
    seg = packed_segments(*shape)
    pos = jnp.broadcast_to(jnp.arange(s["length"], dtype=jnp.int32), shape)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)

    def run(impl, q, k, v):
        return attention(q, k, v, q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos,
                         impl=impl, block=128)

    def forward_and_grads(impl, q, k, v):
        out, vjp = jax.vjp(functools.partial(run, impl), q, k, v)
        return (out, *vjp(cotangent.astype(out.dtype)))

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = jax.jit(functools.partial(forward_and_grads, "xla"))(*f32)
    rows = []
    for impl in ("xla", *kernels):
        row = {"kernel": impl, "dtype": dtype.name}
        try:
            results = jax.jit(functools.partial(forward_and_grads, impl))(q, k, v)
            row.update({name: relative_error(r, ref) for name, r, ref in zip(("out", "dq", "dk", "dv"), results,
                                                                               reference)})
            row["ok"] = max(row[n] for n in ("out", "dq", "dk", "dv")) <= TOLERANCE[dtype.name]
            row["forward_ms"] = 1e3 * median_seconds(jax.jit(functools.partial(run, impl)), q, k, v,
                                                     repeats=s["repeats"])
            row["train_ms"] = 1e3 * median_seconds(jax.jit(functools.partial(forward_and_grads, impl)), q, k, v,
                                                   repeats=s["repeats"])
        except Exception as e:   # report and go on: the other sections still tell something
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
    return rows


def check_train_step(s: dict) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    base = ModelConfig.preset(s["preset"])
    cfg = ModelConfig.preset(s["preset"], max_seq_len=max(s["seq_len"], base.max_seq_len),
                             remat="none" if on_cpu else "dots", compute_dtype="float32" if on_cpu else "bfloat16")
    peak = device_peak_tflops()
    tokens = s["train_batch"] * s["seq_len"]
    rows = [{"trainer": "jaxllm", **train_bench.bench_jax(cfg, s["train_batch"], s["seq_len"], s["steps"],
                                                         s["warmup"], docs_per_row=4)}]
    peers = [("hf-torch eager", False)] + ([("hf-torch compile", True)] if s["peer_compile"] else [])
    for name, compiled in peers:
        try:
            rows.append({"trainer": name, **train_bench.bench_torch(cfg, s["train_batch"], s["seq_len"], s["steps"],
                                                                    s["warmup"], compiled)})
        except ImportError as e:
            rows.append({"trainer": name, "error": f"peer unavailable: {e}"})
    for r in rows:
        if "step_s" in r:
            r["tokens_per_s"] = tokens / r["step_s"]
            r["mfu"] = mfu(r["tokens_per_s"], flops_per_token(cfg, s["seq_len"]), 1, peak)
    return rows


def check_decode(s: dict) -> list[dict]:
    cfg = ModelConfig.preset(s["preset"], compute_dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")
    params = init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, s["prompt_len"]), dtype=np.int32)
    rows = [{"decoder": "jaxllm", **decode_bench.bench_jax(params, cfg, prompts, s["new_tokens"], s["decode_repeats"])}]
    try:
        same = count_params(cfg) < 200e6
        rows.append({"decoder": "hf generate", **decode_bench.bench_hf(params, cfg, prompts, s["new_tokens"],
                                                                       s["decode_repeats"], same)})
        if same:   # the same weights, greedy: the tokens must agree (bf16 may diverge after a near-tie)
            rows[1]["same_tokens"] = rows[0]["tokens"] == rows[1]["tokens"]
    except ImportError as e:
        rows.append({"decoder": "hf generate", "error": f"peer unavailable: {e}"})
    for r in rows:
        r.pop("tokens", None)
    return rows


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Pallas interpreted (the CI run)")
    p.add_argument("--json", default="", help="write every number here too")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    device = jax.devices()[0].device_kind
    t0 = time.perf_counter()
    result = {"date": datetime.date.today().isoformat(), "device": device, "backend": jax.default_backend(),
              "jax": jax.__version__, "smoke": args.smoke, "sizes": sizes}
    for name, check in (("kernels", check_kernels), ("train_step", check_train_step), ("decode", check_decode)):
        start = time.perf_counter()
        result[name] = check(sizes)
        print(f"\n## {name} ({time.perf_counter() - start:.0f} s)\n{table(result[name])}", flush=True)
    result["seconds"] = time.perf_counter() - t0
    failed = [r["kernel"] for r in result["kernels"] if not r.get("ok")]
    print(f"\n### {result['date']} · {device} · jax {jax.__version__} · `python benchmarks/device_check.py"
          f"{' --smoke' if args.smoke else ''}` ({result['seconds']:.0f} s)")
    print("kernels failing their bound: " + (", ".join(failed) if failed else "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
