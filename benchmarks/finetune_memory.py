"""Which fine-tuning runs fit which accelerator: SFT, reward and DPO of 7B models, full / bf16 / LoRA / QLoRA, on
one 24 GB, 80 GB and 141 GB GPU and on a TPU v5e-8 (8 chips x 16 GB, fsdp=8). GB per device from
`jaxllm plan-memory`'s plan (parameters, frozen base, optimizer state, gradients, batch, activation estimate;
nothing is allocated). Prints a markdown table.

    python benchmarks/finetune_memory.py [--seq_len=1024 --batch=8 --accum=8]
"""
from __future__ import annotations

import argparse

from jaxllm import plan_memory
from jaxllm.cli import load_config

MODES = {
    "full fp32": [],
    "full bf16": ["--config.model.param_dtype=bfloat16", "--config.optim.mu_dtype=bfloat16"],
    "LoRA r16": ["--config.lora.rank=16"],
    "QLoRA r16 nf4": ["--config.lora.rank=16", "--config.lora.quantize_base=nf4"],
}
GPUS = (("24 GB", "l4"), ("80 GB", "h100"), ("141 GB", "h200"))


def row(model: str, objective: str, mode: str, args) -> str:
    common = [f"--config={objective}:model={model}", "--config.workdir=unused", "--config.init_from=x",
              f"--config.data.seq_len={args.seq_len}", f"--config.train.batch_size={args.batch}",
              f"--config.optim.grad_accum_steps={args.accum}", "--config.model.remat=full",
              "--config.model.vocab_size=0", *MODES[mode]]
    if objective == "dpo":
        common.append("--config.dpo.reference=online")
    one = plan_memory.plan(load_config(common), devices=1, chip="h100")
    pod = plan_memory.plan(load_config(common + ["--config.mesh.fsdp=8", "--config.mesh.data=1"]), devices=8,
                           chip="v5e")
    cells = [f"{one['total'] / 1e9:.1f}"]
    cells += ["yes" if one["total"] <= plan_memory.FIT_FRACTION * plan_memory.CHIPS[chip] * 1e9 else "no"
              for _, chip in GPUS]
    cells += [f"{pod['total'] / 1e9:.1f}", "yes" if plan_memory.fits(pod, "v5e") else "no"]
    return f"| {model} | {objective} | {mode} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--models", default="llama2-7b,qwen2.5-7b")
    args = parser.parse_args()
    print(f"seq_len {args.seq_len}, batch {args.batch} (micro-batch {args.batch // args.accum}), remat full, "
          f"compute bf16; DPO with its reference online (a second copy unless LoRA); 90% of a device usable\n")
    print("| model | objective | mode | 1 GPU: GB | fits " + " | fits ".join(g for g, _ in GPUS)
          + " | v5e-8: GB/chip | fits 16 GB |")
    print("|---" * 10 + "|")
    for model in args.models.split(","):
        for objective in ("sft", "reward", "dpo"):
            for mode in MODES:
                print(row(model, objective, mode, args))


if __name__ == "__main__":
    main()
