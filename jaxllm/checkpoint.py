"""Checkpoints: the train state and the data iterator's state in one Orbax step, and parameter-only
checkpoints (converted models) that carry their model config and tokenizer.

Layouts:
  run workdir:        <workdir>/config.json, <workdir>/tokenizer.model, <workdir>/checkpoints/<step>/{state,
                      data_per_process/process_<i>-of-<n>.json} (older checkpoints: data/, process 0's only)
  converted / export: <dir>/model_config.json, <dir>/tokenizer.model, <dir>/params/
`load_params(path)` accepts any of: a workdir (its newest step), one step's directory, a converted dir, or a
Hugging Face Llama directory (converted on the fly).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import inspect
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm import config as config_lib
from jaxllm import storage
from jaxllm.config import ModelConfig
from jaxllm.distributed import barrier
from jaxllm.model import lora as lora_lib
from jaxllm.model.spec import abstract_params
from jaxllm.tokenizer.tokenizer import find_tokenizer_file, load_tokenizer

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"   # a SentencePiece run's; Hugging Face tokenizers keep tokenizer.json


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not have the shapes the config expects."""


class DamagedCheckpointError(ValueError):
    """No checkpoint of a run reads back: each step's reason is in the message; nothing was moved."""


DAMAGED_DIR = "checkpoints_damaged"   # <workdir>/checkpoints_damaged/<step>-<UTC time>: set aside, never deleted


def checkpoint_steps(directory) -> list[int]:
    """The committed steps in a checkpoints/ directory, oldest first. Locally Orbax writes a step under a temporary
    name and renames it when complete, so a digit name is a committed step; on an object store (no rename) a step
    is committed when its commit_success.txt is there."""
    directory = storage.as_path(directory)
    if not directory.is_dir():
        return []
    remote = storage.is_remote(directory)
    return sorted(int(s.name) for s in directory.iterdir() if s.name.isdigit() and s.is_dir()
                  and (not remote or (s / storage.COMMIT_FILE).exists()))


def missing_files(step_dir: Path) -> str | None:
    """What a committed step lacks that a restore would need, in words; None when every expected file is there.
    Catches hand-deleted or half-synced files before Orbax fails on them with a long TensorStore error."""
    state = step_dir / "state"
    if not state.is_dir():
        return "state/ is missing"
    if not (state / "_METADATA").exists():
        return "state/_METADATA is missing"
    if (any(state.glob("ocdbt.process_*")) or (state / "d").is_dir()) and not (state / "manifest.ocdbt").exists():
        return "state/manifest.ocdbt is missing"
    data = step_dir / DATA_ITEM
    if data.is_dir():
        found = data_state_files(data)
        if not data_states_complete(found):
            names = sorted(f.name for f in found.values())
            return f"{DATA_ITEM}/ holds {names or 'no data state'}: the data iterator's state is incomplete"
    return None


class QuietAbandonedReads:
    """Orbax reads a step's arrays in concurrent coroutines; when one read fails, each abandoned one reports its
    own failure again through sys.unraisablehook whenever it is collected: a page of TensorStore spec per array.
    The first error is the one raised; while this filter is on, the echoes of abandoned coroutines are dropped
    and anything else passes on. On from the first read attempt until the checkpointer closes (a coroutine may
    be collected long after its read failed)."""

    def __init__(self):
        self.previous = None

    def on(self) -> None:
        if self.previous is None:
            previous = self.previous = sys.unraisablehook

            def hook(unraisable):
                if not inspect.iscoroutine(unraisable.object):
                    previous(unraisable)
            sys.unraisablehook = hook

    def off(self) -> None:
        if self.previous is not None:
            gc.collect()   # collect the abandoned coroutines while the filter is still on
            sys.unraisablehook, self.previous = self.previous, None


def error_in_one_line(error: BaseException, limit: int = 300) -> str:
    """The innermost cause of an exception chain, first line only (TensorStore's own errors run to pages)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _path_str(path) -> str:
    """'opt_state/1/0/mu/layers/attn/q': one spelling for dict keys, tuple indices and NamedTuple fields,
    which Orbax's metadata tree writes as dicts and lists."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _shape_mismatches(saved_tree, abstract_tree) -> list[str]:
    saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
    wanted = {_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_tree)}
    problems = [f"{k}: checkpoint {saved[k]} vs config {wanted[k]}" for k in sorted(saved.keys() & wanted.keys())
                if saved[k] != wanted[k]]
    problems += [f"{k}: in the config but not in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
    problems += [f"{k}: in the checkpoint but not in the config" for k in sorted(saved.keys() - wanted.keys())]
    return problems


DATA_ITEM = "data_per_process"


def _process_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"   # Grain's own naming for per-process iterator states


def data_state_files(directory) -> dict[tuple[int, int], Path]:
    """{(process index, process count): file} of the per-process data states in a step's DATA_ITEM folder."""
    found = {}
    for f in storage.as_path(directory).glob("process_*-of-*.json"):
        m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = f
    return found


def data_states_complete(found: dict[tuple[int, int], Path]) -> bool:
    """One state from every process of one process count."""
    counts = {n for _, n in found}
    return len(counts) == 1 and len(found) == next(iter(counts))


class PerProcessJsonHandler(ocp.handlers.AsyncCheckpointHandler):
    """Every process writes its own JSON (its data iterator's state) into the item directory; Orbax commits the
    step only when all have. Restore gives this process's state when the process count is unchanged, and
    every process's when it changed (for the data pipeline to re-split)."""

    async def async_save(self, directory, args: "PerProcessSave"):
        text = json.dumps(args.item)   # serialised now: the iterator moves on while an async save runs
        path = directory / _process_file(jax.process_index(), jax.process_count())

        async def write():
            path.write_text(text)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="jaxllm_data_save")]

    def save(self, directory, args: "PerProcessSave"):
        for f in asyncio.run(self.async_save(directory, args)):
            f.result()

    def restore(self, directory, args: "PerProcessRestore | None" = None) -> dict:
        """{"process_count": n saved, "states": {process index: state}}."""
        found = data_state_files(directory)
        if not data_states_complete(found):
            raise DamagedCheckpointError(f"{directory}: expected one data state per process, found "
                                         f"{sorted(f.name for f in found.values())}")
        saved = next(n for _, n in found)
        own = (jax.process_index(), jax.process_count())
        wanted = [own] if own in found else sorted(found)
        return {"process_count": saved, "states": {i: json.loads(found[(i, n)].read_text()) for i, n in wanted}}

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessRestore(ocp.args.CheckpointArgs):
    pass


class RunCheckpointer:
    """Orbax CheckpointManager over <workdir>/checkpoints: async saves, keep-N, resume from the newest."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = storage.absolute(workdir) / "checkpoints"
        storage.prepare_checkpoint_path(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, atomicity_options=storage.checkpoint_atomicity(
                                                   self.directory))
        # Naming the handlers lets a fresh process read an existing step's metadata before restoring it.
        # "data" (process 0's iterator state only) is read from older checkpoints; new ones write DATA_ITEM.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    DATA_ITEM: PerProcessJsonHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.quiet_reads = QuietAbandonedReads()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest(self, abstract_state, resplit_data=None) -> tuple[int, dict, dict | None] | None:
        """(step, state, data state) of the newest checkpoint that reads back; None when there is none.

        A step that lacks files, or fails to read while an older step of the same run reads, is damaged: it is
        moved to <workdir>/checkpoints_damaged/ (one warning line) and the older one is used. When no step reads,
        nothing is moved and DamagedCheckpointError names each step's reason: a fault shared by every step
        (a config or code problem) must not look like damage. A shape mismatch with the config is raised as is."""
        failed: list[tuple[int, str]] = []
        for step in reversed(self.manager.all_steps()):
            reason = missing_files(self.directory / str(step))
            if reason is None:
                self.quiet_reads.on()
                try:
                    state, data_state = self.restore(step, abstract_state, resplit_data)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # noqa: BLE001 - any read error; whether it is damage is decided below
                    reason = error_in_one_line(e)
                else:
                    for bad, why in failed:
                        self.move_aside(bad, why, resumed_from=step)
                    if not failed:
                        self.quiet_reads.off()
                    return step, state, data_state
            failed.append((step, reason))
        if failed:
            raise DamagedCheckpointError(
                f"no checkpoint in {self.directory} reads back: " + "; ".join(f"step {s}: {why}" for s, why in failed)
                + f". Move the damaged ones out of {self.directory} to start over")
        return None

    def move_aside(self, step: int, reason: str, resumed_from: int) -> Path:
        """Moves a damaged step to <workdir>/checkpoints_damaged/<step>-<UTC time> (process 0; every process
        then re-reads the step list)."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = self.directory.parent / DAMAGED_DIR / f"{step}-{stamp}"
        if jax.process_index() == 0:
            storage.move_tree(self.directory / str(step), target)
        barrier("jaxllm_damaged_checkpoint")
        self.manager.reload()
        logging.warning("checkpoint %d is damaged (%s): moved to %s; resuming from step %d", step, reason, target,
                        resumed_from)
        return target

    def save(self, step: int, state, data_state: dict | None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:   # every process saves its own (its lanes of the global batch)
            items[DATA_ITEM] = PerProcessSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, resplit_data=None) -> tuple[dict, dict | None]:
        """abstract_state: ShapeDtypeStructs with shardings; arrays come back already sharded, resharded to
        this run's mesh. The data state is this process's own, an opaque JSON value; when the checkpoint was
        written by a different number of processes, `resplit_data({process index: saved state})` (the data
        pipeline's, e.g. data.resplit_data_state) makes this process's from all of theirs."""
        meta = self.manager.item_metadata(step)["state"]
        problems = _shape_mismatches(getattr(meta, "tree", meta), abstract_state)
        if problems:
            raise CheckpointMismatchError(f"{self.directory / str(step)} does not match the config:\n  "
                                          + "\n  ".join(problems))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if (self.directory / str(step) / DATA_ITEM).exists():
            items[DATA_ITEM] = PerProcessRestore()
        elif (self.directory / str(step) / "data").exists():
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if DATA_ITEM in items:
            saved = restored[DATA_ITEM]
            states, count = {int(k): v for k, v in saved["states"].items()}, saved["process_count"]
        elif "data" in items:
            states, count = {0: restored["data"]}, 1
        else:
            return restored["state"], None
        if count == jax.process_count() and jax.process_index() in states:
            return restored["state"], states[jax.process_index()]
        if resplit_data is None:
            raise CheckpointMismatchError(f"{self.directory / str(step)}: written by {count} process(es), "
                                          f"restored by {jax.process_count()}; pass resplit_data to re-split "
                                          f"the data state")
        logging.info("data state: re-split from %d process(es) to %d", count, jax.process_count())
        return restored["state"], resplit_data(states)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self.quiet_reads.off()


# ----------------------------------------------------------------------------------------------------
# Parameter-only checkpoints and resolving a --checkpoint argument.

def save_params(out_dir: str, params, model_cfg: ModelConfig, tokenizer_path: str | None = None) -> str:
    """Writes params (Orbax), the model config and the tokenizer, so the directory stands alone."""
    out = storage.absolute(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage.prepare_checkpoint_path(out)
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(model_cfg), indent=2))
    if tokenizer_path:
        load_tokenizer(tokenizer_path).save(out)   # tokenizer.model, or tokenizer.json with its config
    params_dir = out / "params"
    if params_dir.exists():
        params_dir.rmtree() if storage.is_remote(params_dir) else shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
    return str(out)


def _model_config_of_run(workdir: Path) -> ModelConfig:
    run_cfg = json.loads((workdir / RUN_CONFIG_FILE).read_text())
    return config_lib.model_config_from_dict(run_cfg["model"])


def lora_of_run(workdir: Path) -> tuple[config_lib.LoraConfig, str] | None:
    """(the run's LoRA config, its base = init_from) when the run trained adapters; None otherwise."""
    run_cfg = json.loads((workdir / RUN_CONFIG_FILE).read_text())
    lora = config_lib.dataclass_from_mapping(config_lib.LoraConfig, run_cfg.get("lora", {}), "lora")
    return (lora, run_cfg["init_from"]) if lora.rank else None


def describe_checkpoint(path: str) -> dict:
    """What a --checkpoint path points at: {kind, model_cfg, tokenizer, params_dir|step_dir}."""
    p = storage.absolute(path)
    storage.prepare_checkpoint_path(p)
    if (p / MODEL_CONFIG_FILE).exists() and (p / "params").exists():
        model_cfg = config_lib.model_config_from_dict(json.loads((p / MODEL_CONFIG_FILE).read_text()))
        return {"kind": "params", "model_cfg": model_cfg, "params_dir": p / "params",
                "tokenizer": find_tokenizer_file(p)}
    if (p / RUN_CONFIG_FILE).exists() and (p / "checkpoints").exists():
        steps = checkpoint_steps(p / "checkpoints")
        if not steps:
            raise FileNotFoundError(f"{p / 'checkpoints'}: the run has no checkpoint yet")
        workdir, step_dir = p, p / "checkpoints" / str(steps[-1])
    elif (p / "state").exists() and p.name.isdigit() and (p.parent.parent / RUN_CONFIG_FILE).exists():
        workdir, step_dir = p.parent.parent, p
    elif (p / "config.json").exists() and any(p.glob("*.safetensors")):
        from jaxllm.model.convert import load_hf_config
        model_cfg = load_hf_config(p)
        return {"kind": "hf", "model_cfg": model_cfg, "hf_dir": p, "tokenizer": find_tokenizer_file(p)}
    else:
        raise FileNotFoundError(f"{p}: not a jaxllm checkpoint (expected a run workdir with config.json and "
                                f"checkpoints/, a step directory inside it, or a converted checkpoint with "
                                f"{MODEL_CONFIG_FILE} and params/, or a Hugging Face directory with config.json and "
                                f"*.safetensors)")
    return {"kind": "run", "model_cfg": _model_config_of_run(workdir), "step_dir": step_dir,
            "tokenizer": find_tokenizer_file(workdir), "lora": lora_of_run(workdir)}


def _restore_target(saved_meta, model_cfg: ModelConfig, where, shardings=None) -> dict:
    """Restore target built from what the checkpoint holds, checked against the model config's spec: the
    decoder must match it exactly; extra top-level entries (an objective's head) are kept."""
    saved_meta = getattr(saved_meta, "tree", saved_meta)
    wanted = abstract_params(model_cfg)
    problems = [p for p in _shape_mismatches(saved_meta, wanted)
                if not (p.endswith("in the checkpoint but not in the config") and p.split("/")[0] not in wanted)]
    if problems:
        raise CheckpointMismatchError(f"{where} does not match its model config:\n  " + "\n  ".join(problems))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved_meta)
    if shardings is not None:
        for key, sub in shardings.items():
            target[key] = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                       target[key], sub)
    return target


def load_params_on_mesh(path: str, mesh, rules) -> tuple[dict, ModelConfig, str | None]:
    """load_params with every decoder array sharded over `mesh` as `rules` lay out the checkpoint's own
    architecture: each process reads only what its devices hold, no device gets a full copy, and jitted code on
    the mesh accepts the arrays (a default-device array fails there on a mesh of more than one device)."""
    from jaxllm import sharding
    from jaxllm.model.spec import logical_axes
    model_cfg = describe_checkpoint(path)["model_cfg"]
    shardings = sharding.tree_shardings(mesh, rules, logical_axes(model_cfg), abstract_params(model_cfg))
    return load_params(path, shardings)


def load_params(path: str, shardings=None) -> tuple[dict, ModelConfig, str | None]:
    """(params, model_cfg, tokenizer_path) from any checkpoint a command accepts. `shardings`, a tree
    matching the decoder params, places them directly; by default they land on the default device.
    Heads saved with the params (a reward model's) come back too."""
    info = describe_checkpoint(path)
    model_cfg = info["model_cfg"]
    if info["kind"] == "hf":
        from jaxllm.model.convert import from_hf
        params, model_cfg = from_hf(info["hf_dir"], shardings=shardings)
    elif info["kind"] == "params":
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(info["params_dir"])
            target = _restore_target(getattr(meta, "item_metadata", meta), model_cfg, info["params_dir"], shardings)
            params = ckptr.restore(info["params_dir"], target)
    elif info["lora"] is not None:
        params = _load_lora_run(info, shardings)
    else:
        # Restore only the params subtree of the train state: the optimizer state is not needed.
        state_dir = info["step_dir"] / "state"
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(state_dir)
            meta = getattr(meta, "item_metadata", meta)
            meta = getattr(meta, "tree", meta)
            target = _restore_target(meta["params"], model_cfg, state_dir, shardings)
            restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                                       dtype=a.dtype)
                                        if getattr(a, "sharding", None) is not None
                                        else ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
            params = restored["params"]
        params = jax.tree.map(jax.numpy.asarray, params)
    logging.info("loaded %s checkpoint %s", info["kind"], path)
    return params, model_cfg, info["tokenizer"]


def load_adapters(step_dir: Path) -> dict:
    """The trained entries of a LoRA run's step (adapters, an objective's head) as host arrays: small."""
    state_dir = step_dir / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta["params"])
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]


def _load_lora_run(info: dict, shardings=None) -> dict:
    """A LoRA run's model: its base (init_from, loaded as that checkpoint loads) with the adapters of the step
    folded in (W + alpha/rank·A·B) at the base's own precision, so every command reads it as a plain model."""
    lora, base_path = info["lora"]
    base, _, _ = load_params(base_path, shardings)
    trained = load_adapters(info["step_dir"])
    heads = {k: jax.tree.map(jax.numpy.asarray, v) for k, v in trained.items() if k != "layers"}   # a reward head
    adapters = {"layers": trained["layers"]} if "layers" in trained else {}
    decoder = {k: v for k, v in base.items() if k not in heads}
    merged = jax.jit(lambda b, a: lora_lib.merge(b, a, lora_lib.scale(lora)))(decoder, adapters)
    return {**merged, **heads}


def import_hf(hf_dir: str, out_dir: str) -> str:
    """Hugging Face Llama directory -> standalone jaxllm checkpoint (params, model config, tokenizer)."""
    from jaxllm.model.convert import from_hf
    from jaxllm.data.templates import model_template, save_template
    from jaxllm.hub import resolve_model_path
    hf_dir = resolve_model_path(hf_dir)
    params, model_cfg = from_hf(hf_dir)
    out = save_params(out_dir, params, model_cfg, find_tokenizer_file(hf_dir))
    own = model_template(hf_dir)          # the model's chat template comes along, the default of SFT and serving
    if own is not None:
        save_template(out, own)
    return out


def export_hf(checkpoint: str, out_dir: str, adapter_only: bool = False) -> str:
    """Any jaxllm checkpoint -> Hugging Face directory that transformers loads (a LoRA run's adapters merged
    into its base); adapter_only: a LoRA run's adapters alone as a PEFT adapter folder."""
    from jaxllm.model.convert import to_hf, to_peft
    from jaxllm.data.templates import model_template
    if adapter_only:
        info = describe_checkpoint(checkpoint)
        if info.get("lora") is None:
            raise ValueError(f"{checkpoint}: --adapter_only needs a run trained with lora.rank > 0; this checkpoint "
                             f"holds a whole model (export it without --adapter_only)")
        lora, base = info["lora"]
        trained = load_adapters(info["step_dir"])
        if set(trained) - {"layers"}:
            raise ValueError(f"{checkpoint}: trains {sorted(set(trained) - {'layers'})} beside the adapters, which a "
                             f"PEFT causal-LM adapter cannot carry; export the merged model (without --adapter_only)")
        return str(to_peft(trained, info["model_cfg"], lora, out_dir, base_model=base))
    params, model_cfg, tokenizer = load_params(checkpoint)
    own = model_template(checkpoint)      # the template it was trained with: apply_chat_template reproduces it
    return to_hf(params, model_cfg, out_dir, tokenizer_path=tokenizer, chat_template=own.source if own else None)
