"""Training objectives, one module each: lm, sft, reward, dpo, rl.

Each module holds its loss, its data builder, its eval report and extras, and exports
  train_step   the shared `steps.train_step` specialised with its loss (functools.partial),
  eval_step    the shared `steps.eval_step` specialised the same way,
  make_objective(cfg, tokenizer, *, batch_size, process_index, process_count) -> Objective.
The trainer looks an objective up by `cfg.objective` (`build_objective`) and runs exactly its train_step; it
never branches on the objective. A new objective is a new module here and a name in OBJECTIVES.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable

import jax

from jaxllm.config import Config

OBJECTIVES = ("lm", "sft", "reward", "dpo", "rl")   # module names in this package


@dataclasses.dataclass
class Objective:
    """What an objective brings to the shared trainer."""
    # The module's train_step / eval_step: (state, batch, frozen, *, tx, accum_steps, **loss_settings) and
    # (params, batch, frozen, **loss_settings) -> summed metrics incl. "count".
    train_step: Callable
    eval_step: Callable
    loss_settings: dict                    # keywords of the loss for this run: model_cfg and hyperparameters
    specs: dict                            # ParamSpec tree of the trained parameters (decoder + any heads)
    train_batches: Any                     # checkpointable iterator of per-process numpy batches
    eval_batches: Callable[[], Iterable]   # a fresh pass over the held-out batches
    report: Callable[[dict], dict]         # summed eval sums -> {"eval/...": value}
    # Parameters that exist only in this objective (a reward head) are added to loaded decoder weights.
    extend_params: Callable[[dict, jax.Array], dict] = lambda params, key: params
    frozen: dict = dataclasses.field(default_factory=dict)   # read by the loss, never trained or saved
    # (step, params, put_batch, workdir) -> extra metrics; put_batch makes a host batch a global array.
    eval_hook: Callable[..., dict] | None = None
    # () -> {"data/...": value}: per-source tokens and epochs so far, merged into the metrics at log steps.
    data_stats: Callable[[], dict] | None = None
    # An objective that trains on the policy's own samples (rl) makes each train batch from the current
    # parameters: (step, model params, frozen, host batch of train_batches) -> host batch for train_step.
    # batch_layout() is then a host batch of train_step's layout (zeros), which fixes the batch shardings.
    rollout: Callable[..., dict] | None = None
    batch_layout: Callable[[], dict] | None = None
    # Optimizer updates one train_step makes (rl: several passes over a batch of rollouts); the learning-rate
    # schedule runs over train.steps x updates_per_step updates.
    updates_per_step: int = 1
    # Forward and backward passes one train_step makes over its whole batch (rl: rl.epochs): the FLOPs it counts.
    passes_per_step: int = 1
    # () -> cumulative (model FLOPs, seconds) of work done outside train_step (rl: the rollouts), for MFU and for
    # tokens/s over the train step's own time.
    side_work: Callable[[], tuple[float, float]] | None = None


def objective_module(name: str):
    """The module of objective `name` (imported on first use: a module imports this one for `Objective`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is unknown; known: {list(OBJECTIVES)}")
    return importlib.import_module(f"{__name__}.{name}")


def build_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """The Objective of `cfg.objective` for this process: batch_size is its share of the global batch."""
    return objective_module(cfg.objective).make_objective(cfg, tokenizer, batch_size=batch_size,
                                                          process_index=process_index, process_count=process_count)
