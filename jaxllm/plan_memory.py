"""Bytes per device of a training run, before launching it (`jaxllm plan-memory`, plan_memory_cli.py).

Parameters, optimizer state and gradients come from `jax.eval_shape` of the train state and the shardings
the trainer would give it (`steps.state_shardings`), over an abstract mesh of the configured sizes, so a
64-device plan needs no 64 devices and nothing is allocated. Activations are an estimate (below). Where
the current backend has the mesh's devices, `--compile` also compiles the train step and reads XLA's
memory analysis of the executable: what the compiler will actually ask for.

Activation estimate, per device, for one micro-batch of n = batch / grad_accum_steps * seq_len /
(data * fsdp) tokens, c bytes per compute-dtype value, and heads / kv_heads / mlp / vocab divided by
`tensor` where they divide:
  kept per layer per token for the backward pass, by model.remat:
    none      c * (6D + 3*H*Dh + 3*K*Dh + 4F), plus (4 + c) * H * T for XLA attention's scores and probs
    dots      c * (3D + H*Dh + 2*K*Dh + 2F)     matmul outputs and the layer input
    attn_out  c * (D + H*Dh)                     attention output and the layer input
    full      c * D                              the layer input
  with remat, one layer's full set (the `none` row) is rebuilt at a time during the backward pass;
  the output head adds 3 * 4 * V bytes per token (fp32 logits, their softmax and its gradient).
D = d_model, H = heads, K = kv_heads, Dh = head_dim, F = mlp_dim, V = vocab, T = seq_len. The estimate
leaves out XLA's temporary buffers and fragmentation: keep a margin (the warning fires above 90%).

RL (objective "rl", `rollout_bytes`): the policy (PPO: plus its value head), the reference (a copy of the
parameters; with LoRA the frozen base is the reference and nothing is added), and two phases that never overlap,
so the total counts the larger:
  rollout   the KV cache of the batch's train.batch_size completions (G per prompt), bucketed as generate
            pads it: 2 * L * rows * S * K * Dh * c + 2 * 4 * rows * S (segment ids and positions), S the cache
            length (the longest prompt allowed, seq_len - rl.max_new_tokens, bucketed, plus max_new_tokens,
            rounded up to 64); then the log-probability passes over the rows: 2 * 4 * V * rows * T (fp32 logits
            and their log-softmax, the whole batch in one pass);
  update    the rollout batch (tokens, targets, segments, positions, mask and 3 per-token fp32 arrays: old and
            reference log-probs and advantages; PPO 2 more: old values and returns), held twice when the step
            makes several passes (the minibatch slices are a second layout of it), and the activations of one
            minibatch's micro-batch, the loss holding one more V-sized fp32 buffer per token (the entropy).
rows per device are divided by data * fsdp where they divide.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.configs.presets import PRESETS
from jaxllm.run_summary import count_text
from jaxllm.sharding import MESH_AXES

GB = 1e9
# HBM per device (one JAX device: a GPU, or a TPU chip; a v5p-64 slice is 32 chips), GB as in the vendors'
# datasheets (decimal, so on the safe side where a datasheet means GiB).
CHIPS = {"h100": 80, "h200": 141, "a100": 80, "a100-40gb": 40, "l4": 24, "v4": 32, "v5e": 16, "v5p": 95,
         "v6e": 32}
_TPUS = ("v4", "v5e", "v5p", "v6e")
FIT_FRACTION = 0.9   # above this share of a chip's memory the plan warns: XLA needs headroom


def mesh_sizes(mesh_cfg, devices: int | None = None) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes. One -1 takes the devices left over; without a device count it is 1."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices is not None and devices % known:
            raise ValueError(f"mesh: {devices} devices cannot be split as data={mesh_cfg.data}, "
                             f"fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor}")
        sizes[sizes.index(-1)] = devices // known if devices is not None else 1
    if devices is not None and math.prod(sizes) != devices:
        raise ValueError(f"mesh: data × fsdp × tensor = {math.prod(sizes)} but --devices={devices}")
    return dict(zip(MESH_AXES, sizes))


def _bytes_per_device(abstract_tree, sharding_tree) -> int:
    leaves = jax.tree.leaves(jax.tree.map(
        lambda a, s: math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize, abstract_tree, sharding_tree))
    return int(sum(leaves))


def _divided(n: int, by: int) -> float:
    return n / by if n % by == 0 else n   # an axis that does not divide stays replicated (sharding.py)


def activation_bytes(model, *, tokens_per_device: float, seq_len: int, tensor: int, attention: str,
                     head_buffers: int = 3) -> int:
    """The estimate in the module docstring, bytes per device."""
    c = jnp.dtype(model.compute_dtype).itemsize
    D, Dh, T = model.d_model, model.head_dim, seq_len
    H, K = _divided(model.num_heads, tensor), _divided(model.num_kv_heads, tensor)
    F, V = _divided(model.mlp_dim, tensor), _divided(model.vocab_size, tensor)
    every = c * (6 * D + 3 * H * Dh + 3 * K * Dh + 4 * F) + ((4 + c) * H * T if attention == "xla" else 0)
    kept = {"none": every, "dots": c * (3 * D + H * Dh + 2 * K * Dh + 2 * F), "attn_out": c * (D + H * Dh),
            "full": c * D}[model.remat]
    rebuilt = every if model.remat != "none" else 0
    return int(tokens_per_device * (model.num_layers * kept + rebuilt + head_buffers * 4 * V))


def preset_of(model) -> str | None:
    """The preset whose architecture `model` has (every field the preset sets but its vocabulary), else None."""
    return next((name for name, fields in PRESETS.items()
                 if all(getattr(model, k) == v for k, v in fields.items() if k != "vocab_size")), None)


def vocab_for_plan(cfg: Config) -> tuple[int, str]:
    """(vocabulary, where it comes from). vocab_size 0 means "the tokenizer's": the given tokenizer's size; without
    one, the larger of the preset's own vocabulary (llama2-7b: 32000) and the tokenizer train would build, so a
    preset plans as the model it names and the plan never counts fewer rows than the run will have."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    if cfg.tokenizer:
        from jaxllm.tokenizer import load_tokenizer
        return load_tokenizer(cfg.tokenizer).vocab_size, f"the tokenizer {cfg.tokenizer}"
    preset = preset_of(cfg.model)
    preset_vocab = PRESETS[preset]["vocab_size"] if preset else 0
    if preset_vocab > cfg.tokenizer_vocab_size:
        return preset_vocab, (f"the {preset} preset's; without --config.tokenizer, train builds "
                             f"{cfg.tokenizer_vocab_size}")
    return cfg.tokenizer_vocab_size, "the tokenizer train builds, tokenizer_vocab_size"


def _model_for_plan(cfg: Config):
    return dataclasses.replace(cfg.model, vocab_size=vocab_for_plan(cfg)[0])


def attention_kernel(model, seq_len: int, chip: str | None) -> str:
    """The kernel the training step would run on `chip` (or on this backend), by the kernels' own constraints
    (model/kernels.py), so the plan counts the attention memory of the kernel that will really run."""
    from jaxllm.model.kernels import choose_kernel

    platform = ("tpu" if chip in _TPUS else "gpu") if chip else jax.default_backend()
    return choose_kernel(model.attention_impl, dtype=model.compute_dtype, q_len=seq_len, k_len=seq_len,
                         head_dim=model.head_dim, alibi=model.position == "alibi", platform=platform,
                         block=model.attention_block)[0]


def trained_specs(cfg: Config, model) -> dict:
    """What the step differentiates: the whole decoder (PPO: and its value head), or with LoRA its adapters
    (and the value head)."""
    from jaxllm.model import lora
    from jaxllm.model.heads import reward_model_specs
    from jaxllm.model.spec import param_specs
    specs = param_specs(model)
    if cfg.objective == "rl" and cfg.rl.algorithm == "ppo":
        specs = {**specs, "value_head": reward_model_specs(model)["reward_head"]}
    return lora.trained_specs(specs, param_specs(model), cfg.lora) if cfg.lora.rank else specs


def abstract_frozen(cfg: Config, model) -> dict:
    """Abstract shapes of what the step reads but never trains: a LoRA run's base (cast, quantized), DPO's online
    reference or RL's reference without LoRA (a copy of the parameters), or nothing."""
    from jaxllm.model.quantize import frozen_base
    from jaxllm.model.spec import abstract_params
    if cfg.lora.rank:
        from jaxllm.model.lora import split, trained_entries
        base = split(abstract_params(model), trained_entries(cfg.lora))[1]
        return {"base": jax.eval_shape(lambda p: frozen_base(p, cfg.lora.base_dtype, cfg.lora.quantize_base), base)}
    if (cfg.objective == "dpo" and cfg.dpo.reference == "online") or cfg.objective == "rl":
        return {"reference": abstract_params(model)}
    return {}


def frozen_shardings(cfg: Config, model, mesh, frozen: dict) -> dict:
    """Shardings of abstract_frozen: laid out like the parameters; a quantized weight's values like the weight,
    its scales replicated (they are 1/64 of it or less)."""
    import qwix

    from jaxllm import sharding
    from jaxllm.model.spec import abstract_params, logical_axes
    params_sh = sharding.tree_shardings(mesh, cfg.mesh.rules, logical_axes(model), abstract_params(model))
    params_sh = {k: v for k, v in params_sh.items() if k in frozen.get("base", params_sh)}   # LoRA: base entries

    def one(leaf, sh):
        if isinstance(leaf, qwix.QArray):
            return dataclasses.replace(leaf, qvalue=sh, scale=sharding.replicated(mesh))
        return sh
    is_q = lambda x: isinstance(x, qwix.QArray)  # noqa: E731
    return {k: jax.tree.map(one, tree, params_sh, is_leaf=is_q) for k, tree in frozen.items()}


def frozen_bytes(cfg: Config, model, mesh) -> int:
    frozen = abstract_frozen(cfg, model)
    shardings = frozen_shardings(cfg, model, mesh, frozen)
    total = 0
    for a, sh in zip(jax.tree.leaves(frozen), jax.tree.leaves(shardings)):
        bits = 4 if a.dtype == jnp.uint4 else 8 * jnp.dtype(a.dtype).itemsize
        total += math.prod(sh.shard_shape(a.shape)) * bits // 8
    return int(total)


def rollout_bytes(cfg: Config, model, sizes: dict) -> dict:
    """RL's rollout phase per device (the module docstring): the KV cache of generation and the log-probability
    passes over the rollout rows."""
    from jaxllm.model.generate import CACHE_BUCKET
    from jaxllm.model.padding import bucket_batch, bucket_length, round_up
    rows, seq_len, new = cfg.train.batch_size, cfg.data.seq_len, cfg.rl.max_new_tokens
    shards = sizes["data"] * sizes["fsdp"]
    padded = bucket_batch(rows)                      # generate pads the batch to a power of two
    cache_len = round_up(bucket_length(seq_len - new) + new, CACHE_BUCKET)
    c = jnp.dtype(model.compute_dtype).itemsize
    kv = _divided(model.num_kv_heads, sizes["tensor"])
    per_row_cache = 2 * model.num_layers * cache_len * kv * model.head_dim * c + 2 * 4 * cache_len
    return {"rollout_cache": int(per_row_cache * (padded / shards if padded % shards == 0 else padded)),
            "rollout_logprobs": int(2 * 4 * _divided(model.vocab_size, sizes["tensor"]) * seq_len
                                    * (rows / shards if rows % shards == 0 else rows))}


def plan(cfg: Config, devices: int | None = None, chip: str | None = None) -> dict:
    """Bytes per device of params, optimizer state, gradients, the batch and activations (estimate), for the
    LM train step of `cfg` on a mesh of cfg.mesh's sizes; nothing is allocated. chip: a name of CHIPS."""
    from jax.sharding import AbstractMesh

    from jaxllm.model.spec import count_params
    from jaxllm.optim import make_optimizer
    from jaxllm.steps import state_shardings

    if chip is not None and chip not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; known: {', '.join(sorted(CHIPS))}")
    vocab, vocab_source = vocab_for_plan(cfg)
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    sizes = mesh_sizes(cfg.mesh, devices)
    mesh = AbstractMesh(tuple(sizes.values()), MESH_AXES)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    abstract, shardings = state_shardings(trained_specs(cfg, model), tx, mesh, cfg.mesh.rules)
    params = _bytes_per_device(abstract["params"], shardings["params"])
    accum = cfg.optim.grad_accum_steps
    batch, seq_len = cfg.train.batch_size, cfg.data.seq_len
    batch_shards = sizes["data"] * sizes["fsdp"] if batch % (sizes["data"] * sizes["fsdp"]) == 0 else 1
    # reward and DPO rows are (chosen, rejected) pairs: two sequences each
    sequences = 2 if cfg.objective in ("reward", "dpo") else 1
    rl = cfg.objective == "rl"
    minibatches = cfg.rl.minibatches if rl else 1   # an RL update runs over one minibatch of the rollout rows
    tokens_per_device = batch // minibatches // accum * sequences * seq_len / batch_shards
    attention = attention_kernel(model, seq_len, chip)
    # the batch's int32 / fp32 arrays per token: tokens, targets, segments, positions, mask (+ RL's per-token
    # old and reference log-probs and advantages, PPO's old values and returns)
    arrays = 5 + ((5 if cfg.rl.algorithm == "ppo" else 3) if rl else 0)
    copies = 2 if rl and cfg.rl.epochs * cfg.rl.minibatches > 1 else 1   # the minibatch slices of the batch
    out = {
        "model": model, "vocab_source": vocab_source, "parameters": count_params(model), "mesh": sizes,
        "devices": math.prod(sizes.values()), "objective": cfg.objective, "lora": cfg.lora,
        "tokens_per_device": tokens_per_device, "attention": attention,
        "params": params,
        # what the step reads but never trains: a LoRA run's base, or DPO's online reference (a second copy)
        "frozen": frozen_bytes(cfg, model, mesh),
        # the optimizer's moments and counters, and the train state's step counter
        "opt_state": (_bytes_per_device(abstract["opt_state"], shardings["opt_state"])
                      + _bytes_per_device(abstract["step"], shardings["step"])),
        # the step's gradients are shaped and sharded like the parameters; with accumulation a running sum too
        "grads": params * (2 if accum > 1 else 1),
        "batch": int(copies * arrays * 4 * batch * sequences * seq_len / batch_shards),
        "activations": activation_bytes(model, tokens_per_device=tokens_per_device, seq_len=seq_len,
                                         tensor=sizes["tensor"], attention=attention, head_buffers=4 if rl else 3),
        "rollout_cache": 0, "rollout_logprobs": 0,
    }
    if rl:
        out.update(rollout_bytes(cfg, model, sizes))
    # the update and (RL) the rollout never hold their buffers at the same time: the larger of them counts
    update = out["grads"] + out["batch"] + out["activations"]
    out["total"] = (out["params"] + out["frozen"] + out["opt_state"]
                    + max(update, out["rollout_cache"], out["rollout_logprobs"]))
    return out


def _lowered_step(cfg: Config, model):
    """The train step of `cfg` with `model`, lowered for this backend's devices from abstract shapes: the LM
    step over batch x sequences rows (a pair objective's rows, unpaired), with a LoRA run's adapters and frozen
    base or DPO's online reference as they would be passed."""
    from jaxllm import sharding
    from jaxllm.model.lora import scale
    from jaxllm.objectives import lm
    from jaxllm.optim import make_optimizer
    from jaxllm.steps import state_shardings

    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    abstract, state_sh = state_shardings(trained_specs(cfg, model), tx, mesh, cfg.mesh.rules)
    sequences = 2 if cfg.objective in ("reward", "dpo") else 1
    shape = (cfg.train.batch_size * sequences, cfg.data.seq_len)
    batch_sh = sharding.named_sharding(mesh, cfg.mesh.rules, ("batch", None), shape)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sh)
             for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    frozen = abstract_frozen(cfg, model)
    frozen_sh = frozen_shardings(cfg, model, mesh, frozen)
    frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen, frozen_sh)
    if "reference" in frozen:   # the LM loss does not read it; pass it so that it is counted as an argument
        frozen = {"unused_reference": frozen.pop("reference")}
    step = jax.jit(functools.partial(lm.train_step, tx=tx, accum_steps=cfg.optim.grad_accum_steps, model_cfg=model,
                                     z_loss=cfg.train.z_loss, adapter_scale=scale(cfg.lora) if cfg.lora.rank else 1.0),
                   in_shardings=(state_sh, {k: batch_sh for k in batch}, frozen_sh if "base" in frozen else None),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    with sharding.use_rules(mesh, cfg.mesh.rules):
        return step.lower(state, batch, frozen)


def compiled_memory(cfg: Config) -> dict:
    """XLA's memory analysis of the compiled LM train step on this backend's devices (per device, bytes):
    arguments, outputs, temporaries, aliased (donated) bytes and the peak they imply."""
    analysis = _lowered_step(cfg, _model_for_plan(cfg)).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    out = {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _xla_flops(cfg: Config, model) -> float:
    """FLOPs of one compiled train step, from XLA's cost analysis (summed over devices)."""
    cost = _lowered_step(cfg, model).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # older jax: one dict per device program
    if not cost or "flops" not in cost:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no cost analysis")
    return float(cost["flops"]) * jax.device_count() if cost.get("flops") else 0.0


def compiled_flops(cfg: Config) -> dict:
    """The train step's FLOPs as XLA compiles it, beside the model FLOPs of the PaLM formula (spec.flops_per_token).

    XLA's cost analysis counts the body of a loop once, not once per trip, so a scanned stack of L layers (and a
    scanned gradient accumulation) would be undercounted L-fold. The step is therefore compiled unrolled, with
    one micro-batch, at 1 and at 2 layers: the difference is one layer's FLOPs, the rest is the embedding, head,
    loss and optimizer, and the L-layer step is their linear extrapolation (exact: layers are identical). Nothing
    is allocated; a 7B model costs two small compiles. A ratio near 1 means no wasted compute; remat recompute,
    repeated K/V or masked-out attention blocks all raise it. Compiled for a CPU, the xla attention never forms
    the scores above each query block's diagonal (attention.py), as causal flash kernels skip them, so a step
    without remat comes in under the formula, which counts every score (0.89 for tinyllama-1.1b at 2048 tokens)."""
    from jaxllm.model.spec import flops_per_token

    model = _model_for_plan(cfg)
    accum = cfg.optim.grad_accum_steps
    micro = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size // accum),
                                optim=dataclasses.replace(cfg.optim, grad_accum_steps=1))
    one, two = (_xla_flops(micro, dataclasses.replace(model, num_layers=n, scan_layers=False)) for n in (1, 2))
    per_layer = two - one
    xla = accum * (one + (model.num_layers - 1) * per_layer)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    palm = flops_per_token(model, cfg.data.seq_len) * tokens
    return {"xla_flops": xla, "model_flops": palm, "ratio": xla / palm, "per_layer_flops": accum * per_layer,
            "tokens": tokens, "backend": jax.default_backend()}


def fits(p: dict, chip: str, compiled: dict | None = None) -> bool:
    """Whether the plan (or the compiled step's peak, when larger) leaves the chip FIT_FRACTION headroom."""
    return _needed(p, compiled) <= FIT_FRACTION * CHIPS[chip] * GB


def _needed(p: dict, compiled: dict | None) -> int:
    return max(p["total"], compiled["peak"] if compiled else 0)


def _size(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:8.2f} {unit}"
    return f"{n:8.0f} B"


def _frozen_note(p: dict) -> str:
    if p["lora"].rank:
        q = p["lora"].quantize_base
        return f" (base in {p['lora'].base_dtype}" + (f", projections {q})" if q != "none" else ")")
    if not p["frozen"]:
        return ""
    return " (RL's reference)" if p["objective"] == "rl" else " (DPO's online reference)"


def format_plan(p: dict, chip: str | None = None, compiled: dict | None = None, flops: dict | None = None) -> str:
    m, sizes = p["model"], p["mesh"]
    lines = [
        f"model: {count_text(p['parameters'])} parameters (d_model {m.d_model}, {m.num_layers} layers, vocab "
        f"{m.vocab_size}: {p['vocab_source']}), params {m.param_dtype}, compute {m.compute_dtype}, remat "
        f"{m.remat}, attention {p['attention']}",
        f"mesh: data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} ({p['devices']} devices); "
        f"{p['tokens_per_device']:.0f} tokens per device per micro-batch",
        "per device:",
        f"  parameters        {_size(p['params'])}" + (" (trained: LoRA adapters)" if p["lora"].rank else ""),
        f"  frozen            {_size(p['frozen'])}" + _frozen_note(p),
        f"  optimizer state   {_size(p['opt_state'])}",
        f"  gradients         {_size(p['grads'])}",
        f"  batch             {_size(p['batch'])}",
        f"  activations (est) {_size(p['activations'])}",
    ]
    if p["objective"] == "rl":
        lines += [f"  rollout KV cache  {_size(p['rollout_cache'])}",
                  f"  rollout log-probs {_size(p['rollout_logprobs'])} (the rollout and the update alternate: "
                  f"the larger phase counts)"]
    lines += [
        f"  total             {_size(p['total'])}",
    ]
    if compiled:
        lines.append(f"compiled train step (XLA memory analysis, {jax.default_backend()}): arguments "
                     f"{_size(compiled['argument']).strip()}, temporaries {_size(compiled['temp']).strip()}, peak "
                     f"{_size(compiled['peak']).strip()}")
    if flops:
        lines.append(f"compiled train step (XLA cost analysis, {flops['backend']}): {flops['xla_flops']:.4g} FLOPs "
                     f"for {flops['tokens']} tokens; PaLM model FLOPs {flops['model_flops']:.4g}; ratio "
                     f"{flops['ratio']:.3f} (1 = the formula's count; remat recompute raises it; on a CPU the "
                     f"attention never forms each query block's future keys, which lowers it)")
    if chip:
        verdict = "fits" if fits(p, chip, compiled) else "DOES NOT FIT"
        lines.append(f"{chip}: {CHIPS[chip]} GB per device -> {verdict} "
                     f"({100 * _needed(p, compiled) / (CHIPS[chip] * GB):.0f}% used)")
    return "\n".join(lines)
