"""plan-memory's compute accounting: XLA's FLOPs of the compiled step beside the PaLM formula, and the attention
kernel it plans for, chosen by the kernels' own constraints."""
from __future__ import annotations

import dataclasses

import pytest

from jaxllm import plan_memory
from jaxllm.cli import load_config


def _cfg(*overrides):
    return load_config(["--config=pretrain:model=tiny", "--config.workdir=unused", "--config.model.vocab_size=1024",
                        *overrides])


def test_layer_extrapolation_equals_compiling_every_layer_unrolled():
    cfg = _cfg("--config.model.num_layers=4")
    direct = plan_memory._xla_flops(cfg, dataclasses.replace(cfg.model, scan_layers=False))
    assert plan_memory.compiled_flops(cfg)["xla_flops"] == pytest.approx(direct, rel=1e-3)


def test_xla_flops_match_the_palm_formula_and_remat_shows_its_recompute():
    ratios = {remat: plan_memory.compiled_flops(_cfg(f"--config.model.remat={remat}"))["ratio"]
              for remat in ("none", "dots", "full")}
    # Without remat the compiled step does the model's FLOPs (plus the loss, norms and optimizer: a few %).
    assert 0.98 < ratios["none"] < 1.06, ratios
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
