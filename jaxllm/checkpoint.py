"""A run's checkpoints: the train state and the data iterator's state in one Orbax step, saved, listed, restored
on resume and set aside when damaged. Reading a model's weights out of any checkpoint (a run's, a converted one, a
Hugging Face directory) is weights.py.

Layouts:
  run workdir:        <workdir>/config.json, <workdir>/tokenizer.model, <workdir>/checkpoints/<step>/{state,
                      data_per_process/process_<i>-of-<n>.json} (older checkpoints: data/, process 0's only)
  converted / export: <dir>/model_config.json, <dir>/tokenizer.model, <dir>/params/
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
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm import storage
from jaxllm.distributed import barrier

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


def shape_mismatches(saved_tree, abstract_tree) -> list[str]:
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
        problems = shape_mismatches(getattr(meta, "tree", meta), abstract_state)
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
