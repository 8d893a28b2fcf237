"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections, and the frozen base they adapt.

A projection W (in..., out...) gets two small matrices beside it in the same parameter tree:
    layers/attn/q_lora_a (layers, embed, rank)      layers/attn/q_lora_b (layers, rank, heads, head_dim)
and the decoder computes x·W + (alpha / rank)·(x·A)·B (`project`), so the base weight is only read, never
differentiated: LoRA saves the weight-gradient matmuls and the base's optimizer state. B starts at zero, so an
adapted model starts exactly at its base.

The run keeps two trees that together are the model: the trained parameters (adapters, plus any head an
objective adds) and `frozen["base"]` (init_from's weights in bf16, or quantized by model/quantize.py). `combine`
joins them for the loss; `merge` folds trained adapters into the weights for export and inference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import LoraConfig
from jaxllm.model.spec import ParamSpec, is_spec, normal

# projection -> (its block, the logical axes of its input dims, of its output dims); the weight's shape is
# (layers, *in, *out) in model/spec.py.
PROJECTIONS = {
    "q": ("attn", ("embed",), ("heads", "head_dim")),
    "k": ("attn", ("embed",), ("kv_heads", "head_dim")),
    "v": ("attn", ("embed",), ("kv_heads", "head_dim")),
    "o": ("attn", ("heads", "head_dim"), ("embed",)),
    "gate": ("mlp", ("embed",), ("mlp",)),
    "up": ("mlp", ("embed",), ("mlp",)),
    "down": ("mlp", ("mlp",), ("embed",)),
}
# The decoder's own top-level entries; anything else in a trained tree (a reward head) belongs to an objective.
DECODER_ENTRIES = ("embed", "layers", "final_norm", "lm_head")


def lora_specs(model_specs: dict, lora: LoraConfig) -> dict:
    """ParamSpecs of the adapters of `lora.targets`, in the decoder's tree layout (only the adapter leaves).

    A is drawn like PEFT's default (variance 1/fan_in), B is zero; both in the decoder's param dtype (fp32)."""
    layers = model_specs["layers"]
    out: dict = {}
    for name in lora.targets:
        block, in_axes, out_axes = PROJECTIONS[name]
        w = layers[block][name]
        n_in = len(in_axes)
        in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
        fan_in = int(jnp.prod(jnp.array(in_shape)))
        num_layers = w.shape[0]
        a = ParamSpec((num_layers, *in_shape, lora.rank), w.dtype, ("layers", *in_axes, "lora_rank"),
                      normal(fan_in ** -0.5))
        b = ParamSpec((num_layers, lora.rank, *out_shape), w.dtype, ("layers", "lora_rank", *out_axes),
                      lambda key, shape, dtype: jnp.zeros(shape, dtype))
        out.setdefault("layers", {}).setdefault(block, {}).update({f"{name}_lora_a": a, f"{name}_lora_b": b})
    return out


def trained_entries(lora: LoraConfig) -> tuple[str, ...]:
    """Decoder entries a LoRA run trains whole beside its adapters."""
    return ("embed", "lm_head") if lora.train_embeddings else ()


def trained_specs(objective_specs: dict, model_specs: dict, lora: LoraConfig) -> dict:
    """What a LoRA run trains: the adapters, the objective's own entries (a reward head) and, with
    lora.train_embeddings, the embedding and output head."""
    whole = {k: v for k, v in objective_specs.items()
             if k not in DECODER_ENTRIES or k in trained_entries(lora)}
    return {**lora_specs(model_specs, lora), **whole}


def scale(lora: LoraConfig) -> float:
    return lora.alpha / lora.rank


def project(x, p: dict, name: str, equation: str, weight) -> jax.Array:
    """x·W for projection `name` of block params p, plus (x·A)·B when p carries its adapter (B already scaled
    by alpha/rank: `combine` does it).

    equation: the base einsum, e.g. "bld,dhk->blhk"; the adapter runs it as two einsums through the rank axis.
    weight(w): the base weight at compute dtype (dequantized when the base is quantized)."""
    y = jnp.einsum(equation, x, weight(p[name]))
    if f"{name}_lora_a" not in p:
        return y
    inputs, output = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    in_axes = "".join(c for c in w_axes if c in x_axes)           # contracted with x, e.g. "d" or "hk"
    out_axes = "".join(c for c in w_axes if c not in x_axes)      # e.g. "hk" or "d"
    batch_axes = "".join(c for c in x_axes if c not in w_axes)    # e.g. "bl"
    a, b = p[f"{name}_lora_a"].astype(x.dtype), p[f"{name}_lora_b"].astype(x.dtype)
    xa = jnp.einsum(f"{x_axes},{in_axes}r->{batch_axes}r", x, a)              # (batch, length, rank)
    return y + jnp.einsum(f"{batch_axes}r,r{out_axes}->{output}", xa, b)     # like y


def combine(trained: dict, base: dict | None, adapter_scale: float = 1.0) -> dict:
    """The whole model: base entries overlaid by trained ones (adapters beside the weights they adapt), each B
    multiplied by alpha/rank here, inside the differentiated function, so its gradient carries the scale as
    PEFT's does."""
    if base is None:
        return trained
    out = dict(base)
    for key, value in trained.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = combine(value, base[key], adapter_scale)
        else:
            out[key] = value * adapter_scale if key.endswith("_lora_b") else value
    return out


def split(params: dict, entries: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(adapters, objective entries and the decoder `entries` trained whole; the frozen decoder weights) of a
    combined tree: the inverse of `combine`."""
    def go(tree, top: bool):
        trained, base = {}, {}
        for key, value in tree.items():
            if top and (key not in DECODER_ENTRIES or key in entries):
                trained[key] = value
            elif "_lora_" in key:
                trained[key] = value
            elif isinstance(value, dict):
                t, b = go(value, False)
                if t:
                    trained[key] = t
                base[key] = b
            else:
                base[key] = value
        return trained, base
    return go(params, True)


def merge(base: dict, trained: dict, adapter_scale: float) -> dict:
    """The adapters of `trained` folded into the weights of `base`, W + adapter_scale·A·B in W's dtype (a
    quantized base is dequantized): a plain decoder tree (with trained's other entries, e.g. a reward head), for
    export and inference."""
    from jaxllm.model.quantize import dequantize_tree
    out = jax.tree.map(lambda x: x, combine(trained, dequantize_tree(base)))   # B unscaled; a copy of the dicts
    for block_name in ("attn", "mlp"):
        block = out.get("layers", {}).get(block_name, {})
        for name in [k[:-len("_lora_a")] for k in list(block) if k.endswith("_lora_a")]:
            a, b = block.pop(f"{name}_lora_a"), block.pop(f"{name}_lora_b")
            w = block[name]
            # (layers, *in, rank) x (layers, rank, *out) -> (layers, *in, *out), through 2-D views per layer
            flat = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32),
                              b.reshape(b.shape[0], b.shape[1], -1).astype(jnp.float32))
            block[name] = (w.astype(jnp.float32) + adapter_scale * flat.reshape(w.shape)).astype(w.dtype)
    return out


def count(specs: dict) -> int:
    return sum(int(jnp.prod(jnp.array(s.shape))) for s in jax.tree.leaves(specs, is_leaf=is_spec))
