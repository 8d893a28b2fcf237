"""Attention kernels against the `xla` reference on packed rows (3 documents and a padding tail per row).

The Pallas kernels (`pallas`: Triton flash attention, `splash`: TPU) run here in interpret mode, through the
user-facing switch JAXLLM_PALLAS_INTERPRET=1, so the real kernel code (padding, GQA, segment ids, backward
kernels) is checked on the CPU; cuDNN runs only on a GPU and native splash only on a TPU. `auto`'s choice is
checked on forced platforms through `attention(..., platform=...)`."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model.attention import attention, log_choice_once
from jaxllm.model.kernels import INTERPRET_ENV, choose_kernel

PLATFORM = jax.default_backend()


def packed_inputs(length=200, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32, batch=2):
    """Row 0: three documents then padding (segment id 0); row 1: one document."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    bounds = [0, length * 3 // 10, length * 6 // 10, length * 9 // 10]
    seg = np.zeros(length, np.int32)
    pos = np.arange(length)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        seg[a:b], pos[a:b] = i + 1, np.arange(b - a)
    seg = jnp.asarray(np.stack([seg] + [np.ones(length)] * (batch - 1)), jnp.int32)
    pos = jnp.asarray(np.stack([pos] + [np.arange(length)] * (batch - 1)), jnp.int32)
    return q, k, v, seg, pos


def loss_and_grads(impl, q, k, v, seg, pos, **kw):
    """A loss that weights every output element differently, so the gradients check each position."""
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

    def loss(q, k, v):
        out = attention(q, k, v, q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos,
                        impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * weights), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("impl", ["pallas", "splash"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_interpreted_kernel_matches_xla_forward_and_gradients(impl, kv_heads, monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")
    q, k, v, seg, pos = packed_inputs(length=200, kv_heads=kv_heads)   # 200: padded to 256 inside the kernel
    want_out, want_grads = loss_and_grads("xla", q, k, v, seg, pos)
    got_out, got_grads = loss_and_grads(impl, q, k, v, seg, pos)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=1e-4)
    for name, got, want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_auto_chooses_per_platform_dtype_and_length():
    def chosen(platform, dtype=jnp.bfloat16, length=1024, head_dim=64, alibi=False):
        return choose_kernel("auto", dtype=dtype, q_len=length, k_len=length, head_dim=head_dim, alibi=alibi,
                             platform=platform, block=128)[0]
    assert chosen("gpu") == "cudnn"
    assert chosen("gpu", jnp.float32) == "pallas"           # cuDNN has no fp32 flash attention
    assert chosen("gpu", jnp.float32, length=200) == "xla"  # 200 -> 256 would add 28% of padding
    assert chosen("gpu", jnp.float32, length=1000) == "pallas"
    assert chosen("gpu", alibi=True) == "cudnn"
    assert chosen("gpu", jnp.float32, alibi=True) == "xla"
    assert chosen("tpu") == "splash"
    assert chosen("tpu", length=200) == "xla"
    assert chosen("tpu", head_dim=16) == "xla"
    assert chosen("cpu") == "xla"


def test_auto_falls_back_to_xla_with_one_log_line(caplog):
    log_choice_once.cache_clear()
    q, k, v, seg, pos = packed_inputs(length=200, head_dim=32)
    kw = dict(q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos)
    want = attention(q, k, v, impl="xla", platform="gpu", **kw)   # the fallback as it runs there (whole, not in blocks)
    with caplog.at_level(logging.INFO, logger="jaxllm.model.attention"):
        for _ in range(3):
            got = attention(q, k, v, impl="auto", platform="gpu", **kw)
    np.testing.assert_array_equal(got, want)
    lines = [r.getMessage() for r in caplog.records if "attention_impl='auto'" in r.getMessage()]
    assert lines == ["attention_impl='auto' uses 'xla': cudnn: it needs bfloat16 or float16 and this call is float32 "
                     "(cuDNN has no float32 flash attention; use compute_dtype=bfloat16); pallas: length 200 would "
                     "be padded to 256 (block 128)"]


def test_explicit_kernel_that_cannot_run_says_why():
    q, k, v, seg, pos = packed_inputs(length=16, head_dim=32)
    kw = dict(q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos)
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run this call: it needs bfloat16 or float16 "
                                         "and this call is float32 \\(cuDNN has no float32"):
        attention(q, k, v, impl="cudnn", platform="gpu", **kw)
    with pytest.raises(ValueError, match="attention_impl='splash' cannot run this call: it needs a TPU and this "
                                         "is cpu"):
        attention(q, k, v, impl="splash", platform="cpu", **kw)


def test_splash_and_pallas_under_shard_map_on_8_devices_equal_xla():
    """A data 2 x fsdp 2 x tensor 2 mesh of fake CPU devices: the kernels run per device under shard_map (the
    worker checks the per-device shapes the kernel saw) and give the xla outputs and gradients."""
    worker = os.path.join(os.path.dirname(__file__), "kernel_mesh_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               **{INTERPRET_ENV: "1"})
    out = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["pallas:ok", "splash:ok"], out.stdout


@pytest.mark.parametrize("impl,platform,alibi", [("cudnn", "gpu", False), ("cudnn", "gpu", True),
                                                 ("pallas", "gpu", False), ("splash", "tpu", False)])
def test_native_kernel_matches_xla_on_packed_rows(impl, platform, alibi, monkeypatch):
    if PLATFORM != platform:
        pytest.skip(f"attention_impl={impl!r} natively needs a {platform.upper()}; this run is on {PLATFORM}")
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    q, k, v, seg, pos = packed_inputs(length=256, dtype=jnp.bfloat16)
    kw = dict(q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos, alibi=alibi)
    want = attention(q, k, v, impl="xla", **kw).astype(jnp.float32)
    got = attention(q, k, v, impl=impl, **kw).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)
