"""The training loop: create or restore sharded state, run jitted steps, log, evaluate, save.

The loop is objective-agnostic: `cfg.objective` names an objective module (jaxllm/objectives/) whose
train_step and eval_step it jits and runs; run_setup.py has already resolved the config, the tokenizer, the
initial parameters and the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import distributed, sharding, storage
from jaxllm import config as config_lib
from jaxllm.checkpoint import RunCheckpointer, checkpoint_steps
from jaxllm.config import Config
from jaxllm.data.mixture import resplit_data_state
from jaxllm.metrics import (MetricWriter, Progress, device_peak_tflops, drop_rows_after, interval_throughput,
                            open_wandb_run, plot_curves, wandb_module)
from jaxllm.model import lora, quantize
from jaxllm.model.spec import flops_per_token, init_from_specs, param_specs
from jaxllm.objectives import Objective, build_objective
from jaxllm.optim import lr_schedule, make_optimizer
from jaxllm.run_setup import load_init_params, setup_run
from jaxllm.run_summary import end_summary, start_summary
from jaxllm.steps import init_train_state, model_params, state_shardings


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after it saved a checkpoint: still a KeyboardInterrupt (a script stops), and the
    message says where to resume from."""


def batch_shardings(mesh, rules, local_batch: dict, process_count: int) -> dict:
    """Every batch array is split along its leading (batch) axis; other axes are replicated."""
    def one(x):
        shape = (x.shape[0] * process_count, *x.shape[1:])
        return sharding.named_sharding(mesh, rules, ("batch",) + (None,) * (x.ndim - 1), shape)
    return {k: one(np.asarray(v)) for k, v in local_batch.items()}


def global_batch(local: dict, shardings: dict) -> dict:
    """Per-process numpy rows -> one global jax.Array per key, laid out by the batch shardings."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def _peek(batches) -> dict:
    """The next batch, leaving the iterator where it was (its state is restored)."""
    saved = batches.get_state()
    batch = next(batches)
    batches.set_state(saved)
    return batch


def evaluate(params, frozen, eval_fn, batches, shardings, max_batches: int) -> dict:
    """Adds up the eval step's sums over up to max_batches batches (0 = all)."""
    totals = None
    batches = itertools.islice(batches, max_batches or None)
    if jax.process_count() > 1:   # processes hold different shares of the held-out data: run equally many steps
        batches = distributed.same_count(list(batches))
    for batch in batches:
        sums = eval_fn(params, global_batch(batch, shardings), frozen)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {k: float(v) for k, v in jax.device_get(totals).items()} if totals else {}


def restore_state(ckpt: RunCheckpointer, abstract, state_sh, batches) -> tuple[int, dict] | None:
    """(step, train state) of the newest intact checkpoint, restored straight into its shardings (a damaged newer
    one is moved aside); the data iterator continues where that step left it (re-split by the pipeline when the
    process count changed). None when the run has no checkpoint."""
    abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    resplit = functools.partial(resplit_data_state, template=batches.get_state(), process_count=jax.process_count())
    restored = ckpt.restore_newest(abstract_sh, resplit_data=resplit)
    if restored is None:
        return None
    step, state, data_state = restored
    if data_state is not None:
        batches.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, step)
    return step, state


def trained_specs(cfg: Config, objective: Objective) -> dict:
    """The ParamSpecs of what the run trains: the objective's whole model, or with LoRA its adapters and the
    objective's own entries (a reward head)."""
    if not cfg.lora.rank:
        return objective.specs
    return lora.trained_specs(objective.specs, param_specs(cfg.model), cfg.lora)


def split_base(cfg: Config, objective: Objective, init_params: dict, seed: int) -> tuple[dict, dict]:
    """LoRA: (the trained entries init_from brings or the objective adds: a reward head, with
    lora.train_embeddings the embedding and head; the frozen base, cast or quantized as lora.* says)."""
    heads, base = lora.split(objective.extend_params(init_params, jax.random.key(seed)), lora.trained_entries(cfg.lora))
    return heads, quantize.frozen_base(base, cfg.lora.base_dtype, cfg.lora.quantize_base)


def create_state(objective: Objective, tx, state_sh, init_params: dict | None, seed: int, specs=None) -> dict:
    """A fresh train state, created already sharded: from init_from's parameters (which the objective may
    extend, e.g. by a reward head) or from the objective's specs. With LoRA, init_params are the trained entries
    init_from brings (a head) and the adapters come from `specs` (B = 0: the model starts at its base)."""
    key = jax.random.key(seed)
    if specs is not None:
        make = lambda p, k: init_train_state({**init_from_specs(specs, k), **p}, tx)  # noqa: E731
        return jax.jit(make, out_shardings=state_sh)(init_params, key)
    if init_params is not None:
        # init_from's weights in the run's model.param_dtype (bfloat16 parameters: half the memory of float32)
        cast = lambda p: jax.tree.map(lambda x, s: x.astype(s.dtype), p, objective.specs)  # noqa: E731
        make = lambda p, k: init_train_state(cast(objective.extend_params(p, k)), tx)  # noqa: E731
        return jax.jit(make, out_shardings=state_sh)(init_params, key)
    make = lambda k: init_train_state(init_from_specs(objective.specs, k), tx)  # noqa: E731
    return jax.jit(make, out_shardings=state_sh)(key)


def train(cfg: Config) -> dict:
    """Trains a model for cfg.objective as configured; returns the last logged metrics (plus final eval).
    Ctrl-C saves and raises TrainingInterrupted; SIGTERM saves and returns."""
    wandb = wandb_module(cfg.log)   # asked for but not installed: fail now, not after compiling
    # 1) The resolved config, tokenizer and mesh; the objective's data, loss and steps.
    setup = setup_run(cfg)
    cfg, mesh, rules = setup.cfg, setup.mesh, setup.cfg.mesh.rules
    nproc = jax.process_count()
    objective = build_objective(cfg, setup.tokenizer, batch_size=cfg.train.batch_size // nproc,
                                process_index=jax.process_index(), process_count=nproc)

    # 2) Optimizer, shardings, the objective's jitted steps.
    tx = make_optimizer(cfg.optim, cfg.train.steps * objective.updates_per_step)
    specs = trained_specs(cfg, objective)
    abstract, state_sh = state_shardings(specs, tx, mesh, rules)
    layout = objective.batch_layout() if objective.batch_layout else _peek(objective.train_batches)
    batch_sh = batch_shardings(mesh, rules, layout, nproc)
    settings = dict(objective.loss_settings, adapter_scale=lora.scale(cfg.lora) if cfg.lora.rank else 1.0)
    step_fn = jax.jit(functools.partial(objective.train_step, tx=tx, accum_steps=cfg.optim.grad_accum_steps,
                                        **settings),
                      in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(objective.eval_step, **settings),
                      in_shardings=(state_sh["params"], batch_sh, None))

    # 3) State: restore the newest intact checkpoint, or create it already sharded.
    ckpt = RunCheckpointer(cfg.workdir, keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpointing)
    with sharding.use_rules(mesh, rules):
        try:
            restored = restore_state(ckpt, abstract, state_sh, objective.train_batches)
        except BaseException:
            ckpt.close()
            raise
        if cfg.lora.rank:
            # The base is init_from's, on resume too: checkpoints hold only what trains.
            heads, base = split_base(cfg, objective, load_init_params(setup), cfg.train.seed)
            objective = dataclasses.replace(objective, frozen={**objective.frozen, "base": base})
            logging.info("LoRA rank %d on %s: %s trained parameters; frozen base %.2f GB (%s%s)", cfg.lora.rank,
                         ",".join(cfg.lora.targets), f"{lora.count(specs):,}", quantize.nbytes(base) / 1e9,
                         cfg.lora.base_dtype, "" if cfg.lora.quantize_base == "none" else
                         f", projections {cfg.lora.quantize_base}")
        if restored is not None:
            start, state = restored
        elif cfg.lora.rank:
            start = 0
            state = create_state(objective, tx, state_sh, heads, cfg.train.seed, lora.lora_specs(
                param_specs(cfg.model), cfg.lora))
        else:
            start = 0
            state = create_state(objective, tx, state_sh, load_init_params(setup), cfg.train.seed)
        logging.info("%s", start_summary(cfg, abstract["params"], mesh, start))
        return TrainLoop(cfg, objective, step_fn, eval_fn, batch_sh, ckpt, wandb,
                         adapter_scale=settings["adapter_scale"]).run(state, start)


class TrainLoop:
    """The loop of one run: steps, logging, evaluation, checkpoints. Objective-agnostic."""

    def __init__(self, cfg: Config, objective: Objective, step_fn, eval_fn, batch_sh, ckpt: RunCheckpointer,
                 wandb=None, adapter_scale: float = 1.0):
        self.cfg, self.objective, self.step_fn, self.eval_fn = cfg, objective, step_fn, eval_fn
        self.adapter_scale = adapter_scale
        self.batch_sh, self.frozen, self.ckpt = batch_sh, objective.frozen, ckpt
        main = jax.process_index() == 0
        run = open_wandb_run(wandb, cfg.log, cfg.workdir, config_lib.to_dict(cfg)) if wandb and main else None
        self.writer = MetricWriter(cfg.workdir, enabled=main, wandb_run=run)
        self.pending: list[tuple[int, dict]] = []   # metrics still on device: fetched at log/save time only

    def drain(self) -> dict:
        """Fetches pending metrics; a non-finite loss stops the run naming its step."""
        fetched, self.pending = jax.device_get(self.pending), []
        for s, m in fetched:
            if not math.isfinite(float(m["loss"])):
                raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {s}; stopping. The newest checkpoint "
                                         f"({self.ckpt.latest_step()}) was saved before it and is intact.")
        return fetched[-1][1] if fetched else {}

    def eval_metrics(self, state, step: int) -> dict:
        sums = evaluate(state["params"], self.frozen, self.eval_fn, self.objective.eval_batches(), self.batch_sh,
                        self.cfg.train.eval_batches)
        out = self.objective.report(sums) if sums and sums["count"] > 0 else {}
        if self.objective.eval_hook is not None:
            put = functools.partial(global_batch, shardings=self.batch_sh)
            params = model_params(state["params"], self.frozen, self.adapter_scale)   # LoRA: base + adapters
            out.update(self.objective.eval_hook(step, params, put, self.cfg.workdir))
        if out:
            logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in out.items()))
            self.writer.write(step, out)
        return out

    def run(self, state, start: int) -> dict:
        cfg, train_cfg = self.cfg, self.cfg.train
        if jax.process_index() == 0:
            dropped = drop_rows_after(self.writer.path, start)
            if dropped:
                logging.warning("%s: dropped %d rows logged after step %d (after the checkpoint the run resumes "
                                "from; those steps run again now)", self.writer.path, dropped, start)
        # SIGTERM and Ctrl-C: every process saves at the same step and stops; the handlers that were installed
        # before come back when the run ends, however it ends.
        with distributed.StopSignal() as stop:
            try:
                step, last, state = self.loop(state, start, stop)
            finally:
                self.ckpt.close()
                self.writer.close()
        if jax.process_index() == 0:
            plot_curves(self.writer.path, storage.as_path(cfg.workdir) / "plots" / "loss.png")
            logging.info("%s", end_summary(cfg.workdir, checkpoint_steps(self.ckpt.directory), step))
        if stop.interrupted:
            raise TrainingInterrupted(f"stopped by Ctrl-C at step {step} of {train_cfg.steps}; checkpoint saved in "
                                      f"{self.ckpt.directory / str(step)}: run the same command again to resume")
        return {**last, "step": step, "state": state}

    def loop(self, state, start: int, stop: distributed.StopSignal) -> tuple[int, dict, dict]:
        """Steps from `start` until train.steps or a stop signal; saves the last step. Returns (step, the last
        metrics, state)."""
        cfg, train_cfg, batches = self.cfg, self.cfg.train, self.objective.train_batches
        progress = Progress(train_cfg.steps, start)
        updates = self.objective.updates_per_step   # optimizer updates per step: the schedule counts these
        schedule = lr_schedule(cfg.optim, train_cfg.steps * updates)
        peak = train_cfg.peak_tflops or device_peak_tflops()
        last: dict = {}
        t_last, step_last, step = time.time(), start, start
        if train_cfg.eval_every and train_cfg.eval_at_start and start == 0:
            last.update(self.eval_metrics(state, 0))
        tokens_shape, input_wait = (), 0.0
        side_work = self.objective.side_work or (lambda: (0.0, 0.0))
        side_last = side_work()
        while step < train_cfg.steps:
            t_wait = time.time()
            host = next(batches)
            if self.objective.rollout is not None:   # the batch is the policy's own samples (rl)
                params = model_params(state["params"], self.frozen, self.adapter_scale)
                host = self.objective.rollout(step, params, self.frozen, host)
            batch = global_batch(host, self.batch_sh)
            # Host time spent waiting for input; steps are dispatched asynchronously, so on an accelerator
            # this is time the device may sit idle only if it exceeds the step time.
            input_wait += time.time() - t_wait
            tokens_shape = batch["tokens"].shape
            state, metrics = self.step_fn(state, batch, self.frozen)
            step += 1
            self.pending.append((step, metrics))
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                m = self.drain()
                elapsed, t_last = time.time() - t_last, time.time()
                side = side_work()
                throughput = interval_throughput(
                    steps=step - step_last, batch_tokens=math.prod(tokens_shape),
                    passes=self.objective.passes_per_step, flops_per_token=flops_per_token(cfg.model, tokens_shape[-1]),
                    side_flops=side[0] - side_last[0], side_seconds=side[1] - side_last[1], elapsed=elapsed,
                    num_devices=jax.device_count(), peak_tflops=peak)
                steps_done, step_last, side_last = step - step_last, step, side
                last = {f"train/{k}": float(v) for k, v in m.items() if k not in ("count", "grad_norm")}
                last.update(grad_norm=float(m["grad_norm"]), lr=float(schedule(step * updates - 1)), **throughput,
                            step_seconds=elapsed / steps_done, input_wait_frac=input_wait / max(elapsed, 1e-9))
                input_wait = 0.0
                if self.objective.data_stats is not None:   # per-source tokens/epochs (data/...)
                    last.update(self.objective.data_stats())
                self.writer.write(step, last)
                logging.info(progress.line(step, {k: last[k] for k in ("train/loss", "lr", "grad_norm",
                                                                       "tokens_per_s")}))
            if train_cfg.eval_every and step % train_cfg.eval_every == 0:
                last.update(self.eval_metrics(state, step))
            stopping = stop.reached(step)   # called at every step by every process
            if (train_cfg.save_every and step % train_cfg.save_every == 0) or stopping:
                self.drain()
                self.writer.flush()   # an object-store workdir: the rows up to this step land before the step
                self.ckpt.save(step, state, batches.get_state())
            if stopping:
                break
        self.drain()
        if self.ckpt.latest_step() != step:
            self.ckpt.save(step, state, batches.get_state())
        if not (train_cfg.eval_every and step % train_cfg.eval_every == 0) and not stop.requested:
            last.update(self.eval_metrics(state, step))
        return step, last, state
