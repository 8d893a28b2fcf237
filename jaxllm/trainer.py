"""The training loop: create or restore sharded state, run jitted steps, log, evaluate, save.

The loop is objective-agnostic: `cfg.objective` names an Objective (objectives.py) that brings its loss,
data, parameter specs and evaluation report; the step functions are shared.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import config as config_lib
from jaxllm import distributed, sharding
from jaxllm.checkpoint import RUN_CONFIG_FILE, TOKENIZER_FILE, RunCheckpointer, resolve
from jaxllm.config import Config
from jaxllm.metrics import MetricWriter, Progress, device_peak_tflops, mfu, plot_curves
from jaxllm.model.resize import fit_run_to_tokenizer, resize_init_params
from jaxllm.model.spec import flops_per_token, init_from_specs, logical_axes
from jaxllm.optim import lr_schedule, make_optimizer
from jaxllm import objectives
from jaxllm.objectives import lm_documents
from jaxllm.steps import eval_step, init_train_state, train_step
from jaxllm.tokenizer import Tokenizer, train_tokenizer

class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def resolve_model_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """model.vocab_size = 0 takes the tokenizer's size; a model smaller than its tokenizer is an error."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                                     f"({tokenizer.vocab_size}, {tokenizer.path})")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def state_shardings(specs, tx, mesh, rules):
    """(abstract state, shardings) from a ParamSpec tree; optimizer moments follow their parameters."""
    abstract = jax.eval_shape(lambda: init_train_state(init_from_specs(specs, jax.random.key(0)), tx))
    param_sh = sharding.tree_shardings(mesh, rules, logical_axes(specs), abstract["params"])
    # A frozen parameter (optim.trainable='new_rows': optax.multi_transform) has no moments, only a MaskedNode.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sh = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh), is_leaf=masked)
    return abstract, {"step": sharding.replicated(mesh), "params": param_sh, "opt_state": opt_sh}


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


def _prepare_workdir(cfg: Config, tokenizer: Tokenizer) -> None:
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / RUN_CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        if Path(tokenizer.path).resolve() != (workdir / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer.path, workdir / TOKENIZER_FILE)


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


# Fields of the run's model config that say how to compute, not what the weights are: these stay the run's
# own when the architecture comes from `init_from`.
_RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "attention_impl", "remat", "scan_layers")


def _architecture_from_init(cfg: Config) -> tuple[Config, str | None]:
    """With init_from, the architecture is the checkpoint's (its shapes must load); returns the config and
    the checkpoint's tokenizer, if it carries one."""
    if not cfg.init_from:
        return cfg, None
    info = resolve(cfg.init_from)
    runtime = {f: getattr(cfg.model, f) for f in _RUNTIME_FIELDS}
    model = dataclasses.replace(info["model_cfg"], **runtime,
                                max_seq_len=max(info["model_cfg"].max_seq_len, cfg.data.seq_len))
    return dataclasses.replace(cfg, model=model), info["tokenizer"]


def _tokenizer_for_run(cfg: Config, init_tokenizer: str | None = None) -> Tokenizer:
    """The configured tokenizer; else the init checkpoint's; else the one a previous run of this workdir
    trained; else train one on the training documents."""
    if cfg.tokenizer:
        return Tokenizer(cfg.tokenizer)
    if init_tokenizer:
        return Tokenizer(init_tokenizer)
    saved = Path(cfg.workdir) / TOKENIZER_FILE
    if not saved.exists() and jax.process_index() == 0:   # the others read it from the shared workdir
        logging.info("no tokenizer given: training a %d-piece SentencePiece BPE on the training documents",
                     cfg.tokenizer_vocab_size)
        train_docs, _ = lm_documents(cfg)
        train_tokenizer(train_docs, out_dir=cfg.workdir, vocab_size=cfg.tokenizer_vocab_size)
    distributed.barrier("jaxllm_tokenizer")
    return Tokenizer(str(saved))


def train(cfg: Config) -> dict:
    """Trains a model for cfg.objective as configured; returns the last logged metrics (plus final eval)."""
    train_cfg = cfg.train
    nproc, pid = jax.process_count(), jax.process_index()
    if train_cfg.batch_size % nproc:
        raise config_lib.ConfigError(f"train.batch_size ({train_cfg.batch_size}) must divide across {nproc} processes")

    # 1) Tokenizer, model config, the objective's data and loss.
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    cfg, init_tokenizer = _architecture_from_init(cfg)
    tokenizer = _tokenizer_for_run(cfg, init_tokenizer)
    cfg = fit_run_to_tokenizer(cfg, tokenizer.vocab_size, init_tokenizer)   # init_from + a larger tokenizer
    cfg = resolve_model_vocab(dataclasses.replace(cfg, tokenizer=str(Path(tokenizer.path).absolute())), tokenizer)
    _prepare_workdir(cfg, tokenizer)
    objective = objectives.build(cfg, tokenizer, batch_size=train_cfg.batch_size // nproc, process_index=pid,
                                 process_count=nproc)

    # 2) Mesh, optimizer, shardings, jitted steps.
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    tx = make_optimizer(cfg.optim, train_cfg.steps)
    abstract, state_sh = state_shardings(objective.specs, tx, mesh, rules)
    batch_sh = batch_shardings(mesh, rules, _peek(objective.train_batches), nproc)
    frozen = objective.frozen
    step_fn = jax.jit(functools.partial(train_step, loss_fn=objective.loss_fn, tx=tx,
                                        accum_steps=cfg.optim.grad_accum_steps),
                      in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, loss_fn=objective.loss_fn),
                      in_shardings=(state_sh["params"], batch_sh, None))

    # 3) State: restore the newest checkpoint, or create it already sharded.
    ckpt = RunCheckpointer(cfg.workdir, keep=train_cfg.keep_checkpoints, async_save=train_cfg.async_checkpointing)
    start = ckpt.latest_step()
    with sharding.use_rules(mesh, rules):
        if start is not None:
            abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
            state, data_state = ckpt.restore(start, abstract_sh, data_template=objective.train_batches.get_state())
            if data_state is not None:
                objective.train_batches.set_state(data_state)
            logging.info("resumed from %s at step %d", ckpt.directory, start)
        else:
            start = 0
            key = jax.random.key(train_cfg.seed)
            if cfg.init_from:
                params = resize_init_params(cfg, tokenizer, init_tokenizer)   # grown to cfg.model's vocab
                make = lambda p, k: init_train_state(objective.extend_params(p, k), tx)  # noqa: E731
                state = jax.jit(make, out_shardings=state_sh)(params, key)
            else:
                make = lambda k: init_train_state(init_from_specs(objective.specs, k), tx)  # noqa: E731
                state = jax.jit(make, out_shardings=state_sh)(key)
        run = _Run(cfg, objective, step_fn, eval_fn, batch_sh, frozen, ckpt)
        return run.loop(state, start)


class _Run:
    """The loop of one run: steps, logging, evaluation, checkpoints. Objective-agnostic."""

    def __init__(self, cfg: Config, objective, step_fn, eval_fn, batch_sh, frozen, ckpt: RunCheckpointer):
        self.cfg, self.objective, self.step_fn, self.eval_fn = cfg, objective, step_fn, eval_fn
        self.batch_sh, self.frozen, self.ckpt = batch_sh, frozen, ckpt
        self.writer = MetricWriter(cfg.workdir, enabled=jax.process_index() == 0)
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
            out.update(self.objective.eval_hook(step, state["params"], put, self.cfg.workdir))
        if out:
            logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in out.items()))
            self.writer.write(step, out)
        return out

    def loop(self, state, start: int) -> dict:
        cfg, train_cfg, batches = self.cfg, self.cfg.train, self.objective.train_batches
        progress = Progress(train_cfg.steps, start)
        schedule = lr_schedule(cfg.optim, train_cfg.steps)
        peak = train_cfg.peak_tflops or device_peak_tflops()
        stop = distributed.StopSignal()   # SIGTERM: every process saves at the same step and stops
        last: dict = {}
        t_last, step_last, step = time.time(), start, start
        if train_cfg.eval_every and train_cfg.eval_at_start and start == 0:
            last.update(self.eval_metrics(state, 0))
        tokens_shape, input_wait = (), 0.0
        try:
            while step < train_cfg.steps:
                t_wait = time.time()
                batch = global_batch(next(batches), self.batch_sh)
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
                    tokens_per_s = (step - step_last) * math.prod(tokens_shape) / max(elapsed, 1e-9)
                    step_last = step
                    last = {f"train/{k}": float(v) for k, v in m.items() if k not in ("count", "grad_norm")}
                    last.update(grad_norm=float(m["grad_norm"]), lr=float(schedule(step - 1)),
                                tokens_per_s=tokens_per_s,
                                mfu=mfu(tokens_per_s, flops_per_token(cfg.model, tokens_shape[-1]), jax.device_count(),
                                        peak),
                                input_wait_frac=input_wait / max(elapsed, 1e-9))
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
                    self.ckpt.save(step, state, batches.get_state())
                if stopping:
                    break
            self.drain()
            if self.ckpt.latest_step() != step:
                self.ckpt.save(step, state, batches.get_state())
            if not (train_cfg.eval_every and step % train_cfg.eval_every == 0) and not stop.requested:
                last.update(self.eval_metrics(state, step))
        finally:
            self.ckpt.close()
            self.writer.close()
        if jax.process_index() == 0:
            plot_curves(str(self.writer.path), str(Path(cfg.workdir) / "plots" / "loss.png"))
        return {**last, "step": step, "state": state}
