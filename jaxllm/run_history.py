"""A workdir's config.json describes the checkpoints beside it; a rerun may change it only in ways resuming allows.

    existing config.json ──compare (dotted fields)──▶ changes (field: old → new)
      ──all allowed on resume, or --config.allow_config_change=true──▶ config.json = the new config,
                                                                       config_history/<UTC time>.json = the record
      ──otherwise──▶ ConfigError naming each change

Allowed on resume (they change how the run is watched, saved or laid out on devices, never what the saved
state or the data order means):
  train.steps (more only), train.log_every, train.eval_every, train.eval_batches, train.eval_at_start,
  train.save_every, train.keep_checkpoints, train.async_checkpointing, train.peak_tflops,
  mesh.* (a checkpoint restores into any mesh), model.attention_impl, model.attention_block, model.remat
  (how to compute, not what),
  reward.histogram_bins (a plot), log.* (where metrics go).
Never compared: workdir (a moved workdir still resumes) and allow_config_change itself. The tokenizer path is
compared by the file's content: the same tokenizer at another path is no change.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path

from jaxllm import config as config_lib
from jaxllm import storage
from jaxllm.config import Config, ConfigError

HISTORY_DIR = "config_history"
NEVER_COMPARED = ("workdir", "allow_config_change")
ALLOWED_ON_RESUME = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.eval_at_start", "train.save_every", "train.keep_checkpoints",
                     "train.async_checkpointing", "train.peak_tflops", "model.attention_impl",
                     "model.attention_block", "model.remat",
                     "reward.histogram_bins")
ALLOWED_SECTIONS = ("mesh.", "log.")


@dataclasses.dataclass(frozen=True)
class Change:
    field: str      # dotted name, e.g. "data.sources"
    old: object     # as config.json held it (JSON values); None when the old file lacks the field
    new: object

    def __str__(self) -> str:
        return f"{self.field}: {_short(self.old)} -> {_short(self.new)}"


def _short(value, limit: int = 200) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 4}} -> {"train.steps": 4}; lists stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def as_json(cfg: Config) -> dict:
    """The config as config.json holds it (tuples become lists)."""
    return json.loads(json.dumps(config_lib.to_dict(cfg)))


def config_changes(old: dict, new: dict) -> list[Change]:
    """Fields whose values differ between two config.json dicts. A field the old file lacks (written by an
    older jaxllm) counts only when the new value is not its default."""
    defaults = flatten(as_json(Config()))
    old_flat, new_flat = flatten(old), flatten(new)
    changes = []
    for field, value in new_flat.items():
        if field in NEVER_COMPARED:
            continue
        if field not in old_flat:
            if value != defaults.get(field, value):
                changes.append(Change(field, None, value))
        elif old_flat[field] != value:
            changes.append(Change(field, old_flat[field], value))
    return changes


def allowed_on_resume(change: Change) -> bool:
    if change.field == "train.steps":
        return isinstance(change.old, int) and change.new >= change.old   # fewer steps: below a saved step
    return change.field in ALLOWED_ON_RESUME or change.field.startswith(ALLOWED_SECTIONS)


def check_config_change(workdir: Path, old: dict, new: dict, newest_step: int | None, override: bool,
                        same_tokenizer: bool, same_template: bool = False) -> tuple[list[Change], str | None]:
    """(changes, why they are accepted) of a rerun in `workdir`; raises ConfigError naming the refused ones.

    newest_step: the newest checkpoint (None: the workdir has none, so nothing saved depends on the old config
    and every change is accepted, recorded). same_tokenizer: the run's tokenizer file has the content of the
    workdir's tokenizer.model. same_template: data.template names the same template text as before."""
    changes = [c for c in config_changes(old, new) if not (c.field == "tokenizer" and same_tokenizer)
               and not (c.field == "data.template" and same_template)]
    if not changes:
        return [], None
    if newest_step is None:
        return changes, "no checkpoint yet: the run starts over with the new config"
    refused = [c for c in changes if not allowed_on_resume(c)]
    if refused and not override:
        raise ConfigError(
            f"{workdir / 'config.json'} describes the checkpoints in {workdir} (newest: step {newest_step}), and "
            f"this run changes {'; '.join(map(str, refused))}. Resuming allows changes only to more "
            f"train.steps, eval/log/save cadence, keep_checkpoints, async_checkpointing, peak_tflops, the mesh, "
            f"attention_impl, attention_block, remat and log.*. Use a new --config.workdir, or pass "
            f"--config.allow_config_change=true to resume with these changes (recorded in "
            f"{workdir / HISTORY_DIR}/)")
    return changes, ("--config.allow_config_change=true" if refused else "allowed on resume")


def record_config_change(workdir: Path, old: dict, changes: list[Change], reason: str,
                         newest_step: int | None, old_tokenizer: Path | None = None) -> Path:
    """Writes config_history/<UTC time>.json: when, why, each change and the whole previous config; a replaced
    tokenizer file is kept beside it (<UTC time>.tokenizer.model), as the older checkpoints need it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    folder = workdir / HISTORY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime('%Y%m%dT%H%M%S.%fZ')
    path = folder / f"{stamp}.json"
    record = {"time": now.isoformat(), "newest_checkpoint": newest_step, "accepted_because": reason,
              "changes": {c.field: {"old": c.old, "new": c.new} for c in changes}, "previous": old}
    if old_tokenizer is not None and old_tokenizer.exists():
        kept = folder / f"{stamp}.tokenizer.model"
        storage.write_bytes(kept, old_tokenizer.read_bytes())
        record["previous_tokenizer"] = str(kept)
    storage.write_text(path, json.dumps(record, indent=2, ensure_ascii=False))
    logging.warning("config.json changed (%s; %s): the previous config and the changes are in %s",
                    "; ".join(map(str, changes)), reason, path)
    return path


def warn_on_schedule_change(changes: list[Change], cfg: Config) -> None:
    """More train.steps with optim.decay_steps=0 stretches the learning-rate schedule: say so."""
    steps = next((c for c in changes if c.field == "train.steps"), None)
    if steps is not None and cfg.optim.decay_steps == 0:
        logging.warning("train.steps %s -> %s with optim.decay_steps=0: the learning rate now decays over %s steps; "
                        "the steps already trained followed the %s-step schedule", steps.old, steps.new, steps.new,
                        steps.old)
