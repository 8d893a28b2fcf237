"""plan-memory's compute accounting: XLA's FLOPs of the compiled step beside the PaLM formula, and the attention
kernel it plans for, chosen by the kernels' own constraints."""
from __future__ import annotations

import dataclasses

import pytest

from jaxllm import plan_memory
from jaxllm.cli import load_config
from jaxllm.model.spec import flops_per_token, matmul_params


def _cfg(*overrides):
    return load_config(["--config=pretrain:model=tiny", "--config.workdir=unused", "--config.model.vocab_size=1024",
                        *overrides])


def test_layer_extrapolation_equals_compiling_every_layer_unrolled():
    cfg = _cfg("--config.model.num_layers=4")
    direct = plan_memory._xla_flops(cfg, dataclasses.replace(cfg.model, scan_layers=False))
    assert plan_memory.compiled_flops(cfg)["xla_flops"] == pytest.approx(direct, rel=1e-3)


def test_xla_flops_match_the_palm_formula_and_remat_shows_its_recompute():
    runs = {remat: plan_memory.compiled_flops(_cfg(f"--config.model.remat={remat}")) for remat in ("none", "dots", "full")}
    ratios = {remat: run["ratio"] for remat, run in runs.items()}
    # On a CPU the xla attention runs blocks of queries against only their prefix of keys (attention.py): of the
    # scores PaLM's formula counts it forms (n + 1) / 2n, n = seq_len / attention_block blocks (3/4 here).
    cfg = _cfg()
    model, seq_len = cfg.model, cfg.data.seq_len
    n = seq_len // model.attention_block
    assert n == 2
    attention = flops_per_token(model, seq_len) - 6 * matmul_params(model)          # PaLM's 12·L·H·Q·T, per token
    formed = 6 * matmul_params(model) + attention * (n + 1) / (2 * n)
    # Without remat the compiled step does those FLOPs (plus the loss, norms and optimizer: a few %).
    assert 0.98 < runs["none"]["xla_flops"] / (formed * runs["none"]["tokens"]) < 1.06, runs["none"]
    assert ratios["none"] < 1.0, ratios         # and fewer than the formula: the future blocks are never formed
    # Full remat re-runs each layer's forward (a third of a layer's training FLOPs); dots keeps the matmuls.
    assert ratios["none"] < ratios["dots"] < ratios["full"], ratios


@pytest.mark.parametrize("chip, dtype, head_dim, expected", [
    ("h100", "bfloat16", 64, "cudnn"),
    ("h100", "float32", 64, "pallas"),     # cuDNN has no fp32 flash attention
    ("v5p", "bfloat16", 128, "splash"),
    ("v5p", "bfloat16", 16, "xla"),         # splash needs head_dim a multiple of 64
])
def test_the_plan_counts_the_kernel_that_would_run(chip, dtype, head_dim, expected):
    model = dataclasses.replace(_cfg().model, compute_dtype=dtype, head_dim=head_dim)
    assert plan_memory.attention_kernel(model, 2048, chip) == expected


def test_lora_and_qlora_plans_count_adapters_and_the_frozen_base_by_hand():
    base = ["--config=sft:model=llama2-7b", "--config.workdir=unused", "--config.init_from=x",
            "--config.model.vocab_size=32000"]
    full = plan_memory.plan(load_config(base), devices=1)
    L, D, H, K, Dh, F, V = 32, 4096, 32, 32, 128, 11008, 32000
    r = 16
    # per layer, A (in, r) and B (r, out) of q, k, v, o, gate, up, down
    adapters = L * r * ((D + H * Dh) + 2 * (D + K * Dh) + (H * Dh + D) + 2 * (D + F) + (F + D))
    projections = L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F)
    others = full["parameters"] - projections            # embedding, head, norms: never quantized
    lora = plan_memory.plan(load_config(base + [f"--config.lora.rank={r}"]), devices=1)
    assert lora["params"] == 4 * adapters and lora["grads"] == 4 * adapters      # fp32 adapters
    assert lora["frozen"] == 2 * full["parameters"]                               # the base in bf16
    assert lora["opt_state"] == pytest.approx(2 * 4 * adapters, abs=64)            # Adam's two moments, fp32
    qlora = plan_memory.plan(load_config(base + [f"--config.lora.rank={r}", "--config.lora.quantize_base=nf4"]),
                             devices=1)
    # 4 bits per projection weight, one fp32 scale per 64 of them, the rest in bf16
    assert qlora["frozen"] == pytest.approx(projections / 2 + 4 * projections / 64 + 2 * others, rel=1e-6)
    assert full["frozen"] == 0 and full["params"] == 4 * full["parameters"]
    # DPO with an online reference and no LoRA holds a second copy; with LoRA the base is the reference
    dpo = load_config(["--config=dpo:model=llama2-7b", "--config.workdir=unused", "--config.init_from=x",
                       "--config.model.vocab_size=32000", "--config.dpo.reference=online"])
    assert plan_memory.plan(dpo, devices=1)["frozen"] == 4 * full["parameters"]


def test_compiled_qlora_step_reads_the_quantized_base_as_an_argument():
    cfg = _cfg("--config.init_from=x", "--config.lora.rank=8", "--config.lora.quantize_base=int8",
               "--config.model.d_model=128", "--config.model.mlp_dim=256")
    p = plan_memory.plan(cfg, devices=1)
    compiled = plan_memory.compiled_memory(cfg)
    assert compiled["argument"] >= p["frozen"] + p["params"]


def test_rl_plans_count_the_reference_value_head_rollout_cache_and_multi_pass_batch_by_hand():
    flags = ["--config.workdir=unused", "--config.init_from=x", "--config.model.vocab_size=32000",
             "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.batch_size=64",
             "--config.data.seq_len=1024", "--config.rl.max_new_tokens=256"]
    grpo = plan_memory.plan(load_config(["--config=grpo:model=llama2-7b", *flags]), devices=8)
    L, D, K, Dh, V, T = 32, 4096, 32, 128, 32000, 1024
    c = 2                                                     # the preset computes in bfloat16
    assert grpo["frozen"] == grpo["params"] > 0               # the reference: a second copy, sharded alike
    # 64 completions (a power of two already) over 8 devices; the longest prompt 1024 - 256 = 768 tokens (a bucket
    # already) + 256 new = 1024 cache slots (a multiple of 64)
    rows, S = 64 // 8, 1024
    assert grpo["rollout_cache"] == rows * (2 * L * S * K * Dh * c + 2 * 4 * S)
    assert grpo["rollout_logprobs"] == rows * T * V * 4 * 2   # fp32 logits and log-softmax of every row at once
    assert grpo["batch"] == (5 + 3) * 4 * rows * T            # one pass: the batch is held once
    ppo_flags = ["--config=ppo:model=llama2-7b", *flags, "--config.rl.epochs=2", "--config.rl.minibatches=4"]
    ppo = plan_memory.plan(load_config(ppo_flags), devices=8)
    assert ppo["params"] - grpo["params"] == 4 * D // 8 + 4    # the value head: a kernel sharded over fsdp, a bias
    assert ppo["batch"] == 2 * (5 + 5) * 4 * rows * T          # old values and returns; held twice for the slices
    # an update runs over one minibatch (a quarter of the rows): its activations are a quarter of one pass over all
    one_minibatch = plan_memory.plan(load_config(ppo_flags + ["--config.rl.minibatches=1"]), devices=8)
    assert ppo["activations"] == pytest.approx(one_minibatch["activations"] / 4, rel=1e-9)
    update = grpo["grads"] + grpo["batch"] + grpo["activations"]
    assert grpo["total"] == grpo["params"] + grpo["frozen"] + grpo["opt_state"] + max(
        update, grpo["rollout_cache"], grpo["rollout_logprobs"])
    with_lora = plan_memory.plan(load_config(["--config=grpo:model=llama2-7b", *flags, "--config.lora.rank=8"]),
                                 devices=8)
    assert with_lora["frozen"] == grpo["frozen"] // 2        # the bf16 base is the reference: no second copy
