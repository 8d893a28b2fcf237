"""Hugging Face Llama checkpoints <-> jaxllm params, with every name and shape derived from the spec tree.

One table maps each of our leaf paths to its Hugging Face tensor name and layout; shapes come from
`param_specs(cfg)`. Conversion walks the spec tree, so a tensor the checkpoint lacks (or has in excess, or
with the wrong shape) is reported by name. Reads and writes safetensors without torch: bfloat16 tensors
are read through the `flax` framework of safetensors, since numpy has no bfloat16 of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxllm.config import LoraConfig, ModelConfig, model_config_from_dict
from jaxllm.model.spec import is_spec, param_specs
from jaxllm.tokenizer.hf_files import write_hf_tokenizer_files
from jaxllm.tokenizer.tokenizer import load_tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# config.json's `model_type` -> its architecture, for files written without `architectures` (older or hand-made).
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# The fields of a rope_scaling / rope_parameters dict each supported rope_type reads (beside rope_type, theta).
ROPE_FIELDS = {"default": set(), "linear": {"factor"},
               "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}

# Our leaf path -> (HF tensor name, in_dims). HF Linear weights are (out, in); ours put the input axes
# first. in_dims = how many leading axes of our per-layer shape make up HF's `in` dimension, so that
# ours = hf.T.reshape(ours_shape) and hf = ours.reshape(prod(in), prod(out)).T. None = same layout;
# 0 = a bias: HF's flat (out,) vector is ours reshaped.
_HF_NAMES = {
    ("embed", "embedding"): ("model.embed_tokens.weight", None),                  # (V, D)
    ("layers", "attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", None),
    ("layers", "attn", "q"): ("model.layers.{i}.self_attn.q_proj.weight", 1),     # (H*Dh, D) -> (D, H, Dh)
    ("layers", "attn", "k"): ("model.layers.{i}.self_attn.k_proj.weight", 1),     # (K*Dh, D) -> (D, K, Dh)
    ("layers", "attn", "v"): ("model.layers.{i}.self_attn.v_proj.weight", 1),     # (K*Dh, D) -> (D, K, Dh)
    ("layers", "attn", "o"): ("model.layers.{i}.self_attn.o_proj.weight", 2),     # (D, H*Dh) -> (H, Dh, D)
    ("layers", "attn", "q_bias"): ("model.layers.{i}.self_attn.q_proj.bias", 0),  # (H*Dh,) -> (H, Dh)
    ("layers", "attn", "k_bias"): ("model.layers.{i}.self_attn.k_proj.bias", 0),  # (K*Dh,) -> (K, Dh)
    ("layers", "attn", "v_bias"): ("model.layers.{i}.self_attn.v_proj.bias", 0),  # (K*Dh,) -> (K, Dh)
    ("layers", "attn", "q_norm"): ("model.layers.{i}.self_attn.q_norm.weight", None),   # (Dh,)
    ("layers", "attn", "k_norm"): ("model.layers.{i}.self_attn.k_norm.weight", None),   # (Dh,)
    ("layers", "mlp_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", None),
    ("layers", "mlp", "gate"): ("model.layers.{i}.mlp.gate_proj.weight", 1),      # (F, D) -> (D, F)
    ("layers", "mlp", "up"): ("model.layers.{i}.mlp.up_proj.weight", 1),          # (F, D) -> (D, F)
    ("layers", "mlp", "down"): ("model.layers.{i}.mlp.down_proj.weight", 1),      # (D, F) -> (F, D)
    ("final_norm", "scale"): ("model.norm.weight", None),                         # (D,)
    ("lm_head", "kernel"): ("lm_head.weight", 1),                                 # (V, D) -> (D, V)
}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]          # e.g. ("layers", "attn", "q")
    names: tuple[str, ...]         # HF tensor names, one per layer for stacked leaves
    shape: tuple[int, ...]         # our per-layer shape
    hf_shape: tuple[int, ...]
    in_dims: int | None
    stacked: bool                  # has a leading layers axis

    @property
    def full_shape(self):          # the spec's shape: ([L,] *shape)
        return (len(self.names),) * self.stacked + self.shape

    def to_ours(self, hf):         # hf_shape -> shape
        return hf if self.in_dims is None else hf.T.reshape(self.shape)

    def to_hf(self, ours):         # shape -> hf_shape
        if self.in_dims == 0:
            return ours.reshape(self.hf_shape)
        return ours if self.in_dims is None else ours.reshape(self.hf_shape[::-1]).T


def _leaves(cfg: ModelConfig) -> list[_Leaf]:
    """Every leaf of the spec tree with its HF names and shapes, in tree order."""
    leaves = []
    for keypath, spec in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)[0]:
        path = tuple(k.key for k in keypath)
        if path not in _HF_NAMES:
            raise ValueError(f"parameter {'/'.join(path)} has no Hugging Face name; add it to convert._HF_NAMES")
        template, in_dims = _HF_NAMES[path]
        stacked = spec.logical_axes[0] == "layers"
        shape = spec.shape[1:] if stacked else spec.shape
        names = tuple(template.format(i=i) for i in range(spec.shape[0])) if stacked else (template,)
        hf_shape = (shape if in_dims is None else (math.prod(shape),) if in_dims == 0
                    else (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])))
        leaves.append(_Leaf(path, names, tuple(shape), tuple(hf_shape), in_dims, stacked))
    return leaves


def hf_config_to_model_config(hf_config: dict, path: str | Path = "config.json") -> ModelConfig:
    """A Hugging Face Llama / Mistral / Qwen2 / Qwen3 config.json dict -> ModelConfig.

    Anything this decoder cannot express raises ValueError naming `path`, the field and its value."""
    def unsupported(field, value, why):
        raise ValueError(f"{path}: {field} = {value!r} is not supported ({why})")

    arch = _architecture(hf_config, path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf_config["hidden_act"], "the MLP is SwiGLU: silu only")
    for field in ("attention_bias", "mlp_bias"):   # Qwen2's q/k/v biases are implied by its architecture
        if hf_config.get(field, False):
            unsupported(field, hf_config[field], "biases exist on q/k/v of Qwen2 only, never on o or the MLP")
    _check_sliding_window(hf_config, arch, unsupported)
    rope = _rope_settings(hf_config, unsupported)
    try:
        heads = hf_config["num_attention_heads"]
        cfg = dict(
            vocab_size=hf_config["vocab_size"], d_model=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            mlp_dim=hf_config["intermediate_size"], max_seq_len=hf_config.get("max_position_embeddings", 2048),
            position="rope", norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM", **rope)
        return model_config_from_dict(cfg)
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e.args[0]}") from None
    except (TypeError, ValueError) as e:   # a field of the wrong type, or an architecture the config rejects
        raise ValueError(f"{path}: {e}") from None


def _check_sliding_window(hf_config: dict, arch: str, unsupported) -> None:
    """Attention here is full causal: a window that is on and shorter than the context is refused. Qwen configs
    carry `sliding_window` with `use_sliding_window` false; Mistral v0.2+ sets it null; a window at least as long
    as max_position_embeddings never cuts anything."""
    window = hf_config.get("sliding_window")
    in_use = hf_config.get("use_sliding_window", arch == "MistralForCausalLM")
    if window is not None and in_use and window < hf_config.get("max_position_embeddings", window + 1):
        unsupported("sliding_window", window, "attention is full causal; sliding-window attention is not "
                    "implemented")


def _rope_settings(hf_config: dict, unsupported) -> dict:
    """theta and scaling as ModelConfig fields. transformers 5 keeps them in `rope_parameters`; transformers 4 keeps
    theta at the top level and scaling in `rope_scaling` (null for plain RoPE)."""
    out = {"rope_theta": float(hf_config.get("rope_theta", 10000.0))}
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            unsupported(field, rope, "expected a dict with rope_type")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_FIELDS:
            unsupported(f"{field}.rope_type", kind, f"supported: {', '.join(ROPE_FIELDS)}")
        extra = set(rope) - ROPE_FIELDS[kind] - {"rope_type", "type", "rope_theta"}
        if extra:
            unsupported(f"{field}.{sorted(extra)[0]}", rope[sorted(extra)[0]], f"rope_type {kind!r} reads only "
                        f"{sorted(ROPE_FIELDS[kind]) or 'rope_theta'}")
        for needed in sorted(ROPE_FIELDS[kind] - set(rope)):
            unsupported(f"{field}.{needed}", None, f"rope_type {kind!r} needs it")
        if "rope_theta" in rope:
            out["rope_theta"] = float(rope["rope_theta"])
        if kind != "default":
            out.update(rope_scaling=kind, rope_scaling_factor=float(rope["factor"]))
        if kind == "llama3":
            out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_len=int(rope["original_max_position_embeddings"]))
    return out


def _architecture(hf_config: dict, path) -> str:
    """`architectures[0]`, else the architecture of `model_type` (config.json files may carry either)."""
    architectures = hf_config.get("architectures")
    if architectures:
        return architectures[0]
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURE_OF_MODEL_TYPE:
        raise ValueError(f"{path}: no `architectures`, and model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURE_OF_MODEL_TYPE)})")
    return ARCHITECTURE_OF_MODEL_TYPE[model_type]


def load_hf_config(hf_dir) -> ModelConfig:
    """`hf_dir/config.json` -> ModelConfig; ValueError naming the file when it is unreadable JSON or unsupported."""
    path = Path(hf_dir) / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(hf_config).__name__}")
    return hf_config_to_model_config(hf_config, path)


def hf_architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) that holds `cfg`: Qwen3 with q/k norms, Qwen2 with q/k/v biases, else Llama."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("model.qkv_bias and model.qk_norm together match no Hugging Face architecture")
    if cfg.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM", "qwen2"
    return "LlamaForCausalLM", "llama"


def _rope_dict(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    return rope


def model_config_to_hf_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json dict of its architecture (float32 weights, SentencePiece bos=1/eos=2)."""
    if cfg.position != "rope":
        raise ValueError(f"model.position = {cfg.position!r} cannot be exported: Llama and Qwen use RoPE")
    architecture, model_type = hf_architecture(cfg)
    rope = _rope_dict(cfg)
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        # transformers 4 reads the top-level rope_theta and rope_scaling, transformers 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "use_cache": True,
        "torch_dtype": "float32", "dtype": "float32",   # transformers 4 / 5 spelling
    }


def _weight_map(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a `weight_map` ({e!r})") from None
        return {name: hf_dir / f for name, f in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.exists():
        raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                         f"(only safetensors checkpoints are read)")
    with open_safetensors(single, framework="np") as f:
        return {name: single for name in f.keys()}


def open_safetensors(path: Path, framework: str):
    """safe_open, with a truncated or corrupt file (whose header does not match its size) reported as a ValueError
    naming the file instead of safetensors' bare "incomplete metadata"."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: listed in model.safetensors.index.json but absent")
    try:
        return safe_open(path, framework=framework)
    except SafetensorError as e:
        raise ValueError(f"{path}: damaged safetensors file ({e}; {path.stat().st_size} bytes: truncated "
                         f"download or copy?)") from None


def _on_host():
    """Tensors are read as jax arrays (the flax framework handles bfloat16): keep them off the accelerator."""
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:   # JAX_PLATFORMS without cpu
        return contextlib.nullcontext()


def from_hf(hf_dir, dtype=None, shardings=None) -> tuple[dict, ModelConfig]:
    """Reads a Hugging Face Llama directory -> (params in cfg.param_dtype, cfg).

    dtype overrides param_dtype (default float32). shardings (a tree like the params) places each weight as it
    is read: a process puts on its devices only the slices they hold, and host memory holds one weight at a
    time instead of the whole model. All problems (missing, unexpected, wrongly shaped tensors) are collected
    and raised together as one ValueError."""
    hf_dir = Path(hf_dir)
    cfg = load_hf_config(hf_dir)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
    leaves, files = _leaves(cfg), _weight_map(hf_dir)
    expected = {name for leaf in leaves for name in leaf.names}
    # Old exports keep RoPE's inv_freq buffer; some write lm_head even when tied. Neither is a parameter.
    ignored = {n for n in files if n.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and n == "lm_head.weight")}
    problems = [f"missing tensor {n}" for n in sorted(expected - files.keys())]
    problems += [f"unexpected tensor {n}" for n in sorted(files.keys() - expected - ignored)]
    target = jnp.dtype(cfg.param_dtype)   # a numpy dtype (ml_dtypes for bfloat16)
    params: dict = {}
    with contextlib.ExitStack() as stack, _on_host():
        handles = {f: stack.enter_context(open_safetensors(f, framework="flax")) for f in sorted(set(files.values()))}
        for leaf in leaves:
            found = [(n, tuple(handles[files[n]].get_slice(n).get_shape())) for n in leaf.names if n in files]
            problems += [f"{n}: expected shape {leaf.hf_shape}, found {s}" for n, s in found if s != leaf.hf_shape]
            if problems:
                continue   # keep checking shapes, load nothing
            # Fill a preallocated array layer by layer: peak host memory is one leaf plus one layer.
            out = np.empty(leaf.full_shape, target)
            for i, name in enumerate(leaf.names):
                hf = np.asarray(handles[files[name]].get_tensor(name))      # hf_shape, file dtype
                out[i if leaf.stacked else ...] = leaf.to_ours(hf).astype(target)
            node, where = params, shardings
            for key in leaf.path[:-1]:
                node = node.setdefault(key, {})
                where = where[key] if where is not None else None
            if where is not None:     # only this process's slices go to its devices; the host copy is dropped
                sharding = where[leaf.path[-1]]
                out = jax.make_array_from_callback(out.shape, sharding, lambda index, out=out: out[index])
            node[leaf.path[-1]] = out
    if problems:
        raise ValueError(f"{hf_dir}: checkpoint does not match the config:\n  " + "\n  ".join(problems))
    return (params if shardings is not None else jax.tree.map(jnp.asarray, params)), cfg


def to_hf(params, cfg: ModelConfig, out_dir, tokenizer_path=None, max_shard_bytes: int = 2 * 1024**3,
          chat_template: str | None = None) -> Path:
    """Writes params as a float32 Hugging Face LlamaForCausalLM directory that `from_pretrained` loads.

    Writes config.json and model.safetensors, or model-0000k-of-0000n.safetensors shards plus
    model.safetensors.index.json when the weights exceed max_shard_bytes. With `tokenizer_path` (a
    SentencePiece .model) also tokenizer.model, tokenizer_config.json and special_tokens_map.json.
    Params must be addressable from this process (single host). Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = model_config_to_hf_config(cfg)
    if tokenizer_path is not None:
        hf_config.update(_write_tokenizer(Path(tokenizer_path), out, cfg, chat_template))
    leaves = _leaves(cfg)
    ours = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    ours = {tuple(k.key for k in path): v for path, v in ours.items()}
    problems = [f"missing parameter {'/'.join(l.path)}" for l in leaves if l.path not in ours]
    problems += [f"unexpected parameter {'/'.join(p)}" for p in ours.keys() - {l.path for l in leaves}]
    problems += [f"{'/'.join(l.path)}: expected shape {l.full_shape}, found {ours[l.path].shape}"
                 for l in leaves if l.path in ours and ours[l.path].shape != l.full_shape]
    if problems:
        raise ValueError("params do not match the config:\n  " + "\n  ".join(problems))

    # Plan shards from the spec's shapes first, then materialise one shard at a time (bounded host memory).
    plan = [(name, leaf, i) for leaf in leaves for i, name in enumerate(leaf.names)]
    shards, size = [[]], 0
    for entry in plan:
        nbytes = 4 * math.prod(entry[1].hf_shape)   # float32
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)   # transformers would prefer a stale single file over new shards
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, leaf, i in shard:
            value = np.asarray(jax.device_get(ours[leaf.path][i] if leaf.stacked else ours[leaf.path]), np.float32)
            tensors[name] = np.ascontiguousarray(leaf.to_hf(value))          # hf_shape
            weight_map[name] = fname
        save_file(tensors, out / fname, metadata={"format": "pt"})       # transformers checks the format
    if len(shards) > 1:
        total = sum(4 * math.prod(leaf.hf_shape) for _, leaf, _ in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


def to_peft(adapters: dict, cfg: ModelConfig, lora: LoraConfig, out_dir, base_model: str = "") -> Path:
    """Writes a LoRA run's adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(<the HF base>, out_dir)` loads: per layer and target,
    lora_A (rank, in) and lora_B (out, rank) of the module that to_hf names, in float32."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = adapters.get("layers", {})
    tensors, modules = {}, []
    for name in lora.targets:
        block = "attn" if name in ("q", "k", "v", "o") else "mlp"
        a = np.asarray(jax.device_get(layers[block][f"{name}_lora_a"]), np.float32)   # (L, *in, rank)
        b = np.asarray(jax.device_get(layers[block][f"{name}_lora_b"]), np.float32)   # (L, rank, *out)
        template = _HF_NAMES[("layers", block, name)][0].removesuffix(".weight")
        modules.append(template.rsplit(".", 1)[-1])
        for i in range(a.shape[0]):
            module = "base_model.model." + template.format(i=i)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)    # (rank, in)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)    # (out, rank)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": 0.0, "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "inference_mode": True, "base_model_name_or_path": base_model,
              "revision": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _write_tokenizer(tokenizer_path: Path, out: Path, cfg: ModelConfig, chat_template: str | None) -> dict:
    """The tokenizer beside the weights, in the files transformers reads (tokenizer/hf_files.py: tokenizer.json
    always, tokenizer.model too for SentencePiece); returns the config.json special-token ids."""
    tokenizer = load_tokenizer(tokenizer_path)      # a file that is no tokenizer is named here
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens exceed model.vocab_size ({cfg.vocab_size})")
    return write_hf_tokenizer_files(tokenizer, out, cfg.max_seq_len, chat_template)
