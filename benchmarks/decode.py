"""Decode throughput and time to first token (TTFT) of KV-cache generation for a named preset.

  python benchmarks/decode.py --preset=tiny --batch=1 --prompt_len=128 --new_tokens=128 --peer          # CPU
  python benchmarks/decode.py --preset=tinyllama-1.1b --batch=1 --prompt_len=512 --new_tokens=256 --peer  # GPU

jaxllm is measured twice: through `generate()` (what users and the server get: host loop, per-token
bookkeeping, stop checks) and as the bare jitted decode step in a loop with no host reads (the device's
ceiling). With --peer, Hugging Face transformers `generate` (greedy, KV cache, sdpa) runs the same shape in
the same process: random prompts of equal length, no early stop. For models under 200M parameters both run
the same weights (exported with `to_hf`), and the greedy tokens are compared as a correctness check.
Weights and compute are float32 on CPU and bfloat16 elsewhere, for both.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.model import generate as gen
from jaxllm.model.padding import bucket_length, pad_sequences, round_up
from jaxllm.model.spec import count_params, init_params


def bench_jax(params, cfg: ModelConfig, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict:
    sampling = gen.SamplingParams(max_new_tokens=new_tokens)       # greedy, no stop ids: always full length
    rows = prompts.tolist()
    t0 = time.perf_counter()
    out = gen.generate(params, cfg, rows, sampling)                # compiles prefill and decode
    compile_s = time.perf_counter() - t0
    ttfts, rates = [], []
    for _ in range(repeats):
        marks = {}

        def on_token(row, c):
            marks.setdefault("first", time.perf_counter())

        t0 = time.perf_counter()
        out = gen.generate(params, cfg, rows, sampling, on_token=on_token)
        end = time.perf_counter()
        ttfts.append(marks["first"] - t0)
        rates.append(len(rows) * (new_tokens - 1) / (end - marks["first"]))

    # The bare decode step: dispatch new_tokens - 1 steps back to back, read nothing until the end.
    batch, prompt_len = prompts.shape
    padded = bucket_length(prompt_len)
    cache_len = round_up(padded + new_tokens, gen.CACHE_BUCKET)
    tokens, seg, pos = pad_sequences(rows, padded, side="left")
    sampling_arrays = gen.row_sampling([sampling] * batch, seed_by_row=True)
    next_pos = np.full(batch, prompt_len, np.int32)
    (tok, *_), cache = gen.prefill_and_sample(params, tokens, seg, pos, sampling_arrays, cfg=cfg, cache_len=cache_len)
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for step in range(new_tokens - 1):
        (tok, *_), cache = gen.decode_and_sample(params, cache, tok, next_pos + step, padded + step, step + 1,
                                                 sampling_arrays, cfg=cfg)
    jax.block_until_ready(tok)
    device_rate = batch * (new_tokens - 1) / (time.perf_counter() - t0)
    return {"compile_s": compile_s, "ttft_ms": 1000 * float(np.median(ttfts)), "tokens_per_s": float(np.median(rates)),
            "device_tokens_per_s": device_rate, "tokens": out[0].tokens}


def bench_hf(params, cfg: ModelConfig, prompts: np.ndarray, new_tokens: int, repeats: int, same_weights: bool) -> dict:
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        # One intra-op thread: on a busy machine torch's spinning OpenMP workers stall each other, and a small
        # model gains nothing from splitting its matmuls.
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if same_weights:
            from jaxllm.model.convert import to_hf
            model = transformers.AutoModelForCausalLM.from_pretrained(to_hf(params, cfg, tmp), dtype=dtype)
        else:
            from jaxllm.model.convert import model_config_to_hf_config
            hf_cfg = transformers.LlamaConfig(**{k: v for k, v in model_config_to_hf_config(cfg).items()
                                                 if k not in ("architectures", "model_type")})
            model = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None                     # never stop early, like the jaxllm run
    model.generation_config.pad_token_id = 0
    ids = torch.as_tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        sync()
        return out

    run(4)                                                          # warm up kernels and allocator
    ttfts, rates, out = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run(new_tokens)
        total = time.perf_counter() - t0
        ttfts.append(ttft)
        rates.append(prompts.shape[0] * (new_tokens - 1) / max(total - ttft, 1e-9))
    return {"ttft_ms": 1000 * float(np.median(ttfts)), "tokens_per_s": float(np.median(rates)),
            "tokens": out[0, prompts.shape[1]:].tolist(), "version": f"transformers {transformers.__version__} + "
            f"torch {torch.__version__} eager, sdpa"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (jaxllm/config.py PRESETS)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--prompt_len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--peer", action="store_true", help="also run Hugging Face transformers generate")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    dtype = "float32" if on_cpu else "bfloat16"
    base = ModelConfig.preset(args.preset)
    cfg = ModelConfig.preset(args.preset, max_seq_len=max(base.max_seq_len, args.prompt_len + args.new_tokens),
                             param_dtype=dtype, compute_dtype=dtype)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    rows = {"jaxllm": bench_jax(params, cfg, prompts, args.new_tokens, args.repeats)}
    if args.peer:
        same = count_params(cfg) < 200e6
        rows["hf generate"] = bench_hf(params, cfg, prompts, args.new_tokens, args.repeats, same)
        if same:
            a, b = rows["jaxllm"]["tokens"], rows["hf generate"]["tokens"]
            match = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            rows["hf generate"]["greedy_tokens_matching"] = f"{match}/{len(a)}"
    device = jax.devices()[0].device_kind
    print(f"\n{args.preset} ({count_params(cfg) / 1e6:.1f}M params), batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {dtype}, on {device}")
    print(f"{'':<14} {'TTFT ms':>9} {'tokens/s':>10} {'device tokens/s':>16} {'compile s':>10}")
    nan = float("nan")
    for name, r in rows.items():
        print(f"{name:<14} {r['ttft_ms']:>9.1f} {r['tokens_per_s']:>10.1f} {r.get('device_tokens_per_s', nan):>16.1f}"
              f" {r.get('compile_s', nan):>10.1f}")
    if "hf generate" in rows:
        peer = rows["hf generate"]
        ratio = rows["jaxllm"]["tokens_per_s"] / peer["tokens_per_s"]
        match = peer.get("greedy_tokens_matching")
        print(f"peer: {peer['version']}; jaxllm / peer tokens/s {ratio:.2f}x"
              + (f"; greedy tokens matching: {match}" if match else ""))
    if args.json:
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": summary}, f, indent=2)


if __name__ == "__main__":
    jnp.zeros(())   # initialise the backend before timing anything
    main()
