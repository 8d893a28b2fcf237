"""A model's weights from any checkpoint a command accepts, and parameter-only checkpoints.

`load_params(path)` accepts any of: a run workdir (its newest step; a LoRA run's adapters folded into its base),
one step's directory, a converted directory (model_config.json, tokenizer, params/), or a Hugging Face directory
(converted on the fly). `save_params` writes the converted form; `import_hf` / `export_hf` convert both ways.
The run's own train-state checkpoints (resume, damaged steps) are checkpoint.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm import config as config_lib
from jaxllm import storage
from jaxllm.checkpoint import (MODEL_CONFIG_FILE, RUN_CONFIG_FILE, CheckpointMismatchError, checkpoint_steps,
                               shape_mismatches)
from jaxllm.config import ModelConfig
from jaxllm.model import lora as lora_lib
from jaxllm.model.spec import abstract_params
from jaxllm.tokenizer.tokenizer import find_tokenizer_file, load_tokenizer

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
    problems = [p for p in shape_mismatches(saved_meta, wanted)
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
