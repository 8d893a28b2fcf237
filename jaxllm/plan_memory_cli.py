"""`jaxllm plan-memory`: flag parsing only; the plan is plan_memory.py."""
from __future__ import annotations

import argparse
import sys

from jaxllm.cli import DefaultsHelpFormatter


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxllm plan-memory", description="bytes per device (params, optimizer state, gradients, "
        "activations) of a training config on its mesh, without allocating; --config.* overrides as in train",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=None,
                        help="devices in the mesh (fills a -1 mesh size); default: the mesh's explicit sizes")
    parser.add_argument("--chip", default=None,
                        help="warn if the plan does not fit this accelerator (h100, h200, a100, v5p, ...)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the train step here and print XLA's memory analysis (needs the "
                             "mesh's devices on this backend)")
    parser.add_argument("--flops", action="store_true",
                        help="also compile the train step here from abstract shapes (unrolled, 1 and 2 layers) and "
                             "compare XLA's FLOPs with the PaLM formula's model FLOPs")
    config_args = [a for a in argv if a.startswith("--config")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config")])
    import jax

    from jaxllm import plan_memory
    from jaxllm.cli import load_config
    if not any(a.startswith("--config.workdir") for a in config_args):
        config_args.append("--config.workdir=unused-by-plan-memory")   # required by train, never written here
    cfg = load_config(config_args)
    devices = jax.device_count() if args.compile and args.devices is None else args.devices
    p = plan_memory.plan(cfg, devices, args.chip)
    compiled = None
    if args.compile:
        if p["devices"] != jax.device_count():
            raise ValueError(f"--compile needs the mesh's {p['devices']} devices; this backend has "
                             f"{jax.device_count()} ({jax.default_backend()})")
        compiled = plan_memory.compiled_memory(cfg)
    flops = plan_memory.compiled_flops(cfg) if args.flops else None
    print(plan_memory.format_plan(p, args.chip, compiled, flops))
    if args.chip and not plan_memory.fits(p, args.chip, compiled):
        print(f"WARNING: this run does not fit a {args.chip} ({plan_memory.CHIPS[args.chip]} GB per device, "
              f"{plan_memory.FIT_FRACTION:.0%} usable): shard further (mesh.fsdp), remat more (model.remat=full), "
              f"or lower train.batch_size / raise optim.grad_accum_steps", file=sys.stderr)
    return 0
