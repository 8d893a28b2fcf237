"""Train-step throughput: tokens/s, step time, MFU, compile time and peak memory for a named preset.

  python benchmarks/train_step.py --preset=tiny --seq_len=256 --batch=8                       # CPU
  python benchmarks/train_step.py --preset=tinyllama-1.1b --seq_len=2048 --batch=4 --peer     # one GPU

With --peer, Hugging Face transformers + PyTorch (eager, then torch.compile; sdpa attention, bf16 weights,
AdamW) trains the same shape in the same run, and the ratio is printed. Synthetic rows: random tokens, with
--docs_per_row documents packed per row (segment ids and restarting positions) so the document mask is paid.
Results go to stdout as a table and, with --json, to a file. Keep benchmarks/RESULTS.md current.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import LoraConfig, ModelConfig, OptimConfig
from jaxllm.metrics import device_peak_tflops, mfu
from jaxllm.model import lora, quantize
from jaxllm.model.spec import count_params, flops_per_token, init_from_specs, init_params, param_specs
from jaxllm.optim import make_optimizer
from jaxllm.objectives.lm import train_step as lm_train_step
from jaxllm.steps import init_train_state


def synthetic_batch(batch: int, seq_len: int, vocab: int, docs_per_row: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq_len), dtype=np.int32)
    bounds = np.linspace(0, seq_len, docs_per_row + 1).astype(int)
    seg = np.zeros((seq_len,), np.int32)
    pos = np.zeros((seq_len,), np.int32)
    for d in range(docs_per_row):
        seg[bounds[d]:bounds[d + 1]] = d + 1
        pos[bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
    targets = np.roll(tokens, -1, axis=1)
    mask = np.concatenate([seg[1:] == seg[:-1], [False]]).astype(np.float32)
    return {"tokens": tokens, "targets": targets, "segment_ids": np.tile(seg, (batch, 1)),
            "positions": np.tile(pos, (batch, 1)), "loss_mask": np.tile(mask, (batch, 1))}


def peak_memory_gb() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # CPU: the process's max RSS (KiB -> GB)


def bench_jax(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, docs_per_row: int,
              lora_cfg: LoraConfig | None = None) -> dict:
    """The jitted LM train step; with lora_cfg, adapters trained on a frozen base (the trainer's LoRA path)."""
    tx = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=10), 1000)
    params = init_params(cfg, jax.random.key(0))
    frozen, scale = {}, 1.0
    if lora_cfg is not None:
        frozen = {"base": quantize.frozen_base(params, lora_cfg.base_dtype, lora_cfg.quantize_base)}
        params = init_from_specs(lora.lora_specs(param_specs(cfg), lora_cfg), jax.random.key(1))
        scale = lora.scale(lora_cfg)
    state = jax.jit(lambda p: init_train_state(p, tx))(params)
    data = {k: jnp.asarray(v) for k, v in synthetic_batch(batch, seq_len, cfg.vocab_size, docs_per_row).items()}
    step = jax.jit(functools.partial(lm_train_step, model_cfg=cfg, tx=tx, adapter_scale=scale), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, data, frozen).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, data, frozen)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, data, frozen)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    return {"compile_s": compile_s, "step_s": step_s, "loss": float(m["loss"]), "peak_gb": peak_memory_gb()}


def bench_torch(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, compile_model: bool) -> dict:
    """The peer: transformers LlamaForCausalLM, sdpa attention, bf16 weights on GPU, AdamW, plain causal rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=max(seq_len, cfg.max_seq_len), tie_word_embeddings=cfg.tie_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    run = torch.compile(model) if compile_model else model
    tokens = torch.randint(3, cfg.vocab_size, (batch, seq_len), device=device)

    def one_step():
        loss = run(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        loss = one_step()
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    sync()
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
    return {"compile_s": compile_s, "step_s": (time.perf_counter() - t0) / steps, "loss": float(loss), "peak_gb": peak}


def model_overrides(spec: str) -> dict:
    """'d_model=128,scan_layers=false' -> {'d_model': 128, 'scan_layers': False}, typed as ModelConfig's fields."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--model: {key!r} is not a ModelConfig field")
        default = getattr(ModelConfig(), key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (jaxllm/config.py PRESETS)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--docs_per_row", type=int, default=4, help="packed documents per row (1 = causal only)")
    p.add_argument("--model", default="", help="ModelConfig fields over the preset, e.g. "
                   "d_model=128,num_layers=4,vocab_size=8000,scan_layers=false (the quickstart's shape to 2026-12-04)")
    p.add_argument("--attention", default="auto", help="attention_impl: auto, xla, cudnn, splash")
    p.add_argument("--remat", default=None, help="remat policy (default: none on CPU, dots elsewhere)")
    p.add_argument("--compute_dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--peer", action="store_true", help="also run transformers + PyTorch (eager and compiled)")
    p.add_argument("--lora_rank", type=int, default=0, help="also time LoRA and QLoRA (nf4) of this rank")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak; 0 = from the device kind")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    cfg = ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, ModelConfig.preset(args.preset).max_seq_len),
                             **model_overrides(args.model), attention_impl=args.attention,
                             remat=args.remat or ("none" if on_cpu else "dots"),
                             compute_dtype=args.compute_dtype or ("float32" if on_cpu else "bfloat16"))
    peak = args.peak_tflops or device_peak_tflops()
    fpt = flops_per_token(cfg, args.seq_len)
    tokens = args.batch * args.seq_len
    rows = {"jaxllm": bench_jax(cfg, args.batch, args.seq_len, args.steps, args.warmup, args.docs_per_row)}
    if args.lora_rank:   # the same model fine-tuned with adapters, in the same run
        for name, quant in (("LoRA", "none"), ("QLoRA nf4", "nf4")):
            rows[f"jaxllm {name} r{args.lora_rank}"] = bench_jax(
                cfg, args.batch, args.seq_len, args.steps, args.warmup, args.docs_per_row,
                LoraConfig(rank=args.lora_rank, quantize_base=quant))
    if args.peer:
        rows["hf-torch eager"] = bench_torch(cfg, args.batch, args.seq_len, args.steps, args.warmup, False)
        rows["hf-torch compile"] = bench_torch(cfg, args.batch, args.seq_len, args.steps, args.warmup, True)
    device = jax.devices()[0].device_kind
    print(f"\n{args.preset} ({count_params(cfg) / 1e6:.1f}M params), seq {args.seq_len}, batch {args.batch}, "
          f"{args.docs_per_row} docs/row, {cfg.compute_dtype}, remat={cfg.remat}, attention={cfg.attention_impl}, "
          f"on {device} (peak {peak or 'unknown'} TFLOP/s)")
    print(f"{'trainer':<22} {'tokens/s':>10} {'step ms':>9} {'MFU':>7} {'compile s':>10} {'peak GB':>8} {'loss':>8}")
    for name, r in rows.items():
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = mfu(r["tokens_per_s"], fpt, 1, peak)
        print(f"{name:<22} {r['tokens_per_s']:>10.0f} {1e3 * r['step_s']:>9.1f} {100 * r['mfu']:>6.1f}% "
              f"{r['compile_s']:>10.1f} {r['peak_gb']:>8.2f} {r['loss']:>8.3f}")
    for peer in ("hf-torch eager", "hf-torch compile"):
        if peer in rows:
            print(f"jaxllm / {peer}: {rows['jaxllm']['tokens_per_s'] / rows[peer]['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "model": dataclasses.asdict(cfg), "results": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
