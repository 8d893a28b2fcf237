"""The parameter spec: every weight declared once with its shape, dtype, logical axes and initializer.

Initialisation, abstract shapes, shardings, checkpoint restore targets and Hugging Face conversion are all
derived from `param_specs(cfg)`; no other module writes a parameter shape.

Layer weights are stacked along a leading `layers` axis so the decoder can `lax.scan` over them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: jnp.dtype
    logical_axes: tuple[str, ...]   # one name per dimension, e.g. ("layers", "embed", "heads", "head_dim")
    init: Initializer

    def __post_init__(self):
        assert len(self.shape) == len(self.logical_axes), (self.shape, self.logical_axes)


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def param_specs(cfg: ModelConfig) -> dict:
    """The nested dict of ParamSpecs for a Llama-style decoder."""
    dtype = jnp.dtype(cfg.param_dtype)
    L, D, H, K, Dh, F, V = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.mlp_dim, cfg.vocab_size)
    std = cfg.init_std
    # Output projections get the GPT-2 / Megatron depth scaling so the residual stream's variance does not
    # grow with the number of layers.
    out_std = std / np.sqrt(2 * L)

    def spec(shape, axes, init=normal(std)):
        return ParamSpec(tuple(shape), dtype, tuple(axes), init)

    specs = {
        "embed": {"embedding": spec((V, D), ("vocab", "embed"))},
        "layers": {
            "attn_norm": {"scale": spec((L, D), ("layers", "embed"), ones)},
            "attn": {
                "q": spec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
                "k": spec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
                "v": spec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
                "o": spec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), normal(out_std)),
            },
            "mlp_norm": {"scale": spec((L, D), ("layers", "embed"), ones)},
            "mlp": {
                "gate": spec((L, D, F), ("layers", "embed", "mlp")),
                "up": spec((L, D, F), ("layers", "embed", "mlp")),
                "down": spec((L, F, D), ("layers", "mlp", "embed"), normal(out_std)),
            },
        },
        "final_norm": {"scale": spec((D,), ("embed",), ones)},
    }
    attn = specs["layers"]["attn"]
    if cfg.qkv_bias:     # Qwen2 / Qwen2.5
        zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)
        attn["q_bias"] = spec((L, H, Dh), ("layers", "heads", "head_dim"), zeros)
        attn["k_bias"] = spec((L, K, Dh), ("layers", "kv_heads", "head_dim"), zeros)
        attn["v_bias"] = spec((L, K, Dh), ("layers", "kv_heads", "head_dim"), zeros)
    if cfg.qk_norm:      # Qwen3: one RMSNorm scale over head_dim, shared by the heads
        attn["q_norm"] = spec((L, Dh), ("layers", "head_dim"), ones)
        attn["k_norm"] = spec((L, Dh), ("layers", "head_dim"), ones)
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": spec((D, V), ("embed", "vocab"))}
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters of the decoder."""
    return init_from_specs(param_specs(cfg), key)


def init_from_specs(specs: dict, key: jax.Array) -> dict:
    """Random parameters for any spec tree (the decoder, or the decoder plus an objective's heads). Each leaf
    gets a key folded from its position in the flattened tree."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, [s.init(k, s.shape, s.dtype) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig | dict) -> dict:
    """ShapeDtypeStructs of the parameters (of a model config or a spec tree), without allocating them."""
    specs = param_specs(cfg) if isinstance(cfg, ModelConfig) else cfg
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)


def logical_axes(cfg: ModelConfig | dict) -> dict:
    """The logical axis names of every parameter, as a tree matching the params."""
    specs = param_specs(cfg) if isinstance(cfg, ModelConfig) else cfg
    return jax.tree.map(lambda s: s.logical_axes, specs, is_leaf=is_spec)


def count_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding lookup (a gather),
    unless it doubles as the output head. This is the N in PaLM's 6N FLOPs-per-token estimate."""
    n = count_params(cfg)
    return n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM appendix B: 6N + 12·L·H·Q·T training FLOPs per token (forward + backward: 3 forwards)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """2N + 4·L·H·Q·context: one token's forward pass attending over `context` positions (PaLM's accounting)."""
    return 2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def generation_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of sampling `new_tokens` after a prompt with a KV cache: every token but the last sampled one
    goes through the model once, the one at position i (from 0) attending over i + 1 cached positions."""
    fed = prompt_len + new_tokens - 1
    return fed * 2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * fed * (fed + 1) / 2
