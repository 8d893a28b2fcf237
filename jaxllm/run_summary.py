"""What a run tells its user before the first step and after the last: the model's size, the devices, the data,
and where every output went. Plain text from the config and the state's shapes; nothing here computes."""
from __future__ import annotations

import math
import jax

from jaxllm import storage
from jaxllm.config import Config, OptimConfig, init_checkpoint


def count_text(n: int) -> str:
    """1234567 -> '1.23M'; billions from 1e9 on (a small model in 'B' would print as 0.00B)."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def trainable_count(params, optim: OptimConfig) -> int:
    """Parameters the optimizer updates: all, or with optim.trainable='new_rows' the embedding rows and head
    columns from optim.new_rows_from on (optim.new_rows_only)."""
    if optim.trainable == "all":
        return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    n = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", None) for k in path]
        if names[:2] == ["embed", "embedding"]:                   # (vocab, embed)
            n += max(x.shape[0] - optim.new_rows_from, 0) * x.shape[1]
        elif names[:2] == ["lm_head", "kernel"]:                  # (embed, vocab)
            n += x.shape[0] * max(x.shape[1] - optim.new_rows_from, 0)
    return n


def _sources(cfg: Config) -> str:
    data = cfg.data
    if cfg.objective != "lm":
        held = ", ".join(data.eval) if data.eval else f"{data.eval_fraction:.0%} of the records"
        return f"{', '.join(data.train) or '(none)'}; held out: {held}"
    if data.weights:
        train = ", ".join(f"{s} (weight {w:g})" for s, w in zip(data.sources, data.weights))
    else:
        train = ", ".join(data.sources) + (" (natural proportions)" if len(data.sources) > 1 else "")
    if data.weight_schedule:
        train += f"; weight schedule from steps {', '.join(str(s) for s, _ in data.weight_schedule)}"
    held = ", ".join(data.eval_sources) if data.eval_sources else f"{data.eval_fraction:.0%} of the documents"
    return f"{train}; held out: {held}"


def start_summary(cfg: Config, params, mesh, start_step: int) -> str:
    """The lines logged before the first step. params: the (abstract) parameter tree of the train state."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    device = jax.devices()[0]
    mesh_text = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    per_step = cfg.train.batch_size * cfg.data.seq_len
    begin = (f"resuming at step {start_step}" if start_step
             else f"from {init_checkpoint(cfg)}" if init_checkpoint(cfg) else "from random weights")
    return "\n".join([
        f"run: objective {cfg.objective}, {begin}, {cfg.train.steps} steps",
        f"  parameters: {count_text(total)} ({count_text(trainable_count(params, cfg.optim))} trainable)",
        f"  devices: {jax.device_count()} x {device.device_kind} ({device.platform}) in {jax.process_count()} "
        f"process(es); mesh {mesh_text}",
        f"  tokens per step: {per_step:,} ({cfg.train.batch_size} rows x {cfg.data.seq_len}); "
        f"{per_step * cfg.train.steps:,} in all",
        f"  data: {_sources(cfg)}",
        f"  workdir: {storage.absolute(cfg.workdir)}",
    ])


def end_summary(workdir: str, steps: list[int], stopped_at: int) -> str:
    """The lines logged after the last step: where the checkpoints, metrics and plots are."""
    root = storage.absolute(workdir)
    lines = [f"run finished at step {stopped_at}; outputs in {root}:",
             f"  checkpoints: {root / 'checkpoints'} (steps {', '.join(map(str, steps)) or 'none'})",
             f"  metrics: {root / 'metrics.jsonl'}"]
    if (root / "tensorboard").exists():
        lines.append(f"  tensorboard: tensorboard --logdir {root / 'tensorboard'}")
    plots = sorted((root / "plots").glob("*.png")) if (root / "plots").exists() else []
    if plots:
        lines.append(f"  plots: {', '.join(str(p) for p in plots[:5])}" + (f" (+{len(plots) - 5} more)"
                                                                           if len(plots) > 5 else ""))
    if (root / "wandb").exists():
        lines.append(f"  wandb: {root / 'wandb'}")
    return "\n".join(lines)
