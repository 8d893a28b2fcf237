"""The training loop: create or restore sharded state, run jitted steps, log, evaluate, save.

The loop is objective-agnostic; `train()` wires the LM objective (its loss, pipeline and step).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import config as config_lib
from jaxllm import sharding
from jaxllm.checkpoint import RUN_CONFIG_FILE, TOKENIZER_FILE, RunCheckpointer, load_params, resolve
from jaxllm.config import Config
from jaxllm.data import load_documents, lm_pipeline, split_heldout
from jaxllm.metrics import MetricWriter, Progress, device_peak_tflops, mfu, plot_curves
from jaxllm.model.spec import flops_per_token, init_params, logical_axes
from jaxllm.optim import lr_schedule, make_optimizer
from jaxllm.steps import eval_step_lm, init_train_state, train_step_lm
from jaxllm.tokenizer import Tokenizer, train_tokenizer

BATCH_AXES = ("batch", "length")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def resolve_model_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """model.vocab_size = 0 takes the tokenizer's size; a model smaller than its tokenizer is an error."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                                     f"({tokenizer.vocab_size}, {tokenizer.path})")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def state_shardings(model_cfg, tx, mesh, rules):
    """(abstract state, shardings) from the ParamSpec tree; optimizer moments follow their parameters."""
    abstract = jax.eval_shape(lambda: init_train_state(init_params(model_cfg, jax.random.key(0)), tx))
    param_sh = sharding.tree_shardings(mesh, rules, logical_axes(model_cfg), abstract["params"])
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    return abstract, {"step": sharding.replicated(mesh), "params": param_sh, "opt_state": opt_sh}


def global_batch(local: dict, batch_sharding) -> dict:
    """Per-process numpy rows -> one global jax.Array per key, laid out by the batch sharding."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in local.items()}


class _StopFlag:
    """Set by SIGTERM (pre-emption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
            pass

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True


def _prepare_workdir(cfg: Config, tokenizer: Tokenizer) -> None:
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / RUN_CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        if Path(tokenizer.path).resolve() != (workdir / TOKENIZER_FILE).resolve():
            shutil.copyfile(tokenizer.path, workdir / TOKENIZER_FILE)


def evaluate(params, eval_fn, batches, batch_sharding, max_batches: int) -> dict:
    """Adds up the eval step's sums over up to max_batches batches (0 = all)."""
    totals = None
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        sums = eval_fn(params, global_batch(batch, batch_sharding))
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


def _tokenizer_for_run(cfg: Config, train_docs, init_tokenizer: str | None = None) -> Tokenizer:
    """The configured tokenizer; else the init checkpoint's; else the one a previous run of this workdir
    trained; else train one on the training documents."""
    if cfg.tokenizer:
        return Tokenizer(cfg.tokenizer)
    if init_tokenizer:
        return Tokenizer(init_tokenizer)
    saved = Path(cfg.workdir) / TOKENIZER_FILE
    if not saved.exists():
        logging.info("no tokenizer given: training a %d-piece SentencePiece BPE on the training documents",
                     cfg.tokenizer_vocab_size)
        train_tokenizer(train_docs, out_dir=cfg.workdir, vocab_size=cfg.tokenizer_vocab_size)
    return Tokenizer(str(saved))


def train(cfg: Config) -> dict:
    """Trains a language model as configured; returns the last logged metrics (plus final eval)."""
    model_cfg, train_cfg, data_cfg = cfg.model, cfg.train, cfg.data
    nproc, pid = jax.process_count(), jax.process_index()
    if train_cfg.batch_size % nproc:
        raise config_lib.ConfigError(f"train.batch_size ({train_cfg.batch_size}) must divide across {nproc} processes")
    local_batch = train_cfg.batch_size // nproc

    # 1) Data: documents, held-out split, tokenizer, deterministic packed pipelines.
    docs = load_documents(data_cfg.sources, jsonl_field=data_cfg.jsonl_field, text_split=data_cfg.text_split)
    if data_cfg.eval_sources:
        eval_docs = load_documents(data_cfg.eval_sources, jsonl_field=data_cfg.jsonl_field,
                                   text_split=data_cfg.text_split)
    else:
        docs, eval_docs = split_heldout(docs, data_cfg.eval_fraction, train_cfg.seed)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    cfg, init_tokenizer = _architecture_from_init(cfg)
    tokenizer = _tokenizer_for_run(cfg, docs, init_tokenizer)
    cfg = resolve_model_vocab(dataclasses.replace(cfg, tokenizer=str(Path(tokenizer.path).absolute())), tokenizer)
    model_cfg = cfg.model
    _prepare_workdir(cfg, tokenizer)
    pipeline = functools.partial(lm_pipeline, tokenizer=tokenizer, seq_len=data_cfg.seq_len, batch_size=local_batch,
                                 add_bos=data_cfg.add_bos, add_eos=data_cfg.add_eos, process_index=pid,
                                 process_count=nproc)
    train_iter = pipeline(docs, seed=train_cfg.seed)
    eval_batches = lambda: pipeline(eval_docs, seed=0, shuffle=False, repeat=False)  # noqa: E731

    # 2) Mesh, optimizer, shardings, jitted steps.
    mesh = sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    tx = make_optimizer(cfg.optim, train_cfg.steps)
    abstract, state_sh = state_shardings(model_cfg, tx, mesh, rules)
    batch_sh = sharding.named_sharding(mesh, rules, BATCH_AXES, (train_cfg.batch_size, data_cfg.seq_len))
    step_fn = jax.jit(functools.partial(train_step_lm, model_cfg=model_cfg, tx=tx, z_loss=train_cfg.z_loss,
                                        accum_steps=cfg.optim.grad_accum_steps),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step_lm, model_cfg=model_cfg), in_shardings=(state_sh["params"], batch_sh))

    # 3) State: restore the newest checkpoint, or create it already sharded.
    ckpt = RunCheckpointer(cfg.workdir, keep=train_cfg.keep_checkpoints, async_save=train_cfg.async_checkpointing)
    start = ckpt.latest_step()
    with sharding.use_rules(mesh, rules):
        if start is not None:
            abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
            state, data_state = ckpt.restore(start, abstract_sh)
            if data_state is not None:
                train_iter.set_state(data_state)
            logging.info("resumed from %s at step %d", ckpt.directory, start)
        else:
            start = 0
            if cfg.init_from:
                params, _, _ = load_params(cfg.init_from, shardings=state_sh["params"])
                state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_sh)(params)
            else:
                key = jax.random.key(train_cfg.seed)
                state = jax.jit(lambda k: init_train_state(init_params(model_cfg, k), tx), out_shardings=state_sh)(key)
        return _loop(cfg, state, start, step_fn, eval_fn, train_iter, eval_batches, batch_sh, ckpt, mesh)


def _loop(cfg, state, start, step_fn, eval_fn, train_iter, eval_batches, batch_sh, ckpt, mesh) -> dict:
    train_cfg, seq_len = cfg.train, cfg.data.seq_len
    writer = MetricWriter(cfg.workdir, enabled=jax.process_index() == 0)
    progress = Progress(train_cfg.steps, start)
    schedule = lr_schedule(cfg.optim, train_cfg.steps)
    peak = train_cfg.peak_tflops or device_peak_tflops()
    fpt = flops_per_token(cfg.model, seq_len)
    stop = _StopFlag()
    pending: list[tuple[int, dict]] = []  # metrics still on device: fetched at log/save time, not every step
    last: dict = {}
    t_last, step_last = time.time(), start

    def drain() -> dict:
        """Fetches pending metrics; a non-finite loss stops the run naming its step."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        for s, m in fetched:
            if not math.isfinite(float(m["loss"])):
                raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {s}; stopping. The newest checkpoint "
                                         f"({ckpt.latest_step()}) was saved before it and is intact.")
        return fetched[-1][1] if fetched else {}

    step = start
    try:
        while step < train_cfg.steps:
            batch = global_batch(next(train_iter), batch_sh)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                m = drain()
                elapsed = time.time() - t_last
                tokens_per_s = (step - step_last) * train_cfg.batch_size * seq_len / max(elapsed, 1e-9)
                t_last, step_last = time.time(), step
                last = {"train/loss": float(m["nll"]), "train/z_loss": float(m["z_loss"]), "grad_norm": float(m["grad_norm"]),
                        "lr": float(schedule(step - 1)), "tokens_per_s": tokens_per_s,
                        "mfu": mfu(tokens_per_s, fpt, jax.device_count(), peak)}
                writer.write(step, last)
                logging.info(progress.line(step, {k: last[k] for k in ("train/loss", "lr", "grad_norm", "tokens_per_s")}))
            if train_cfg.eval_every and step % train_cfg.eval_every == 0:
                last.update(_eval_metrics(state, eval_fn, eval_batches, batch_sh, train_cfg.eval_batches))
                writer.write(step, {k: v for k, v in last.items() if k.startswith("eval/")})
            if (train_cfg.save_every and step % train_cfg.save_every == 0) or stop.requested:
                drain()
                ckpt.save(step, state, train_iter.get_state())
            if stop.requested:
                break
        drain()
        if ckpt.latest_step() != step:
            ckpt.save(step, state, train_iter.get_state())
        if not (train_cfg.eval_every and step % train_cfg.eval_every == 0) and not stop.requested:
            last.update(_eval_metrics(state, eval_fn, eval_batches, batch_sh, train_cfg.eval_batches))
            writer.write(step, {k: v for k, v in last.items() if k.startswith("eval/")})
    finally:
        ckpt.close()
        writer.close()
    if jax.process_index() == 0:
        plot_curves(str(writer.path), str(Path(cfg.workdir) / "plots" / "loss.png"))
    last["step"] = step
    last["state"] = state
    return last


def _eval_metrics(state, eval_fn, eval_batches, batch_sh, max_batches) -> dict:
    sums = evaluate(state["params"], eval_fn, eval_batches(), batch_sh, max_batches)
    if not sums or sums["count"] == 0:
        return {}
    loss = sums["nll"] / sums["count"]
    out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums["count"]}
    logging.info("eval: loss=%.4f perplexity=%.2f over %d tokens", loss, out["eval/perplexity"], sums["count"])
    return out
