"""Accelerator kernels against the `xla` reference, on packed rows. Each runs only where its platform is
present (cuDNN on a GPU, splash on a TPU); on the CPU they are skipped with the reason."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model.attention import attention, resolve_impl

PLATFORM = jax.default_backend()


def packed_inputs(length=256, heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (2, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (2, length, kv_heads, head_dim), dtype)
    bounds = [0, 70, 150, 200, length]
    seg = np.concatenate([np.full(b - a, i + 1) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    pos = np.concatenate([np.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    seg = jnp.asarray(np.stack([seg, np.ones(length)]), jnp.int32)
    pos = jnp.asarray(np.stack([pos, np.arange(length)]), jnp.int32)
    return q, k, v, seg, pos


@pytest.mark.parametrize("impl,platform,alibi", [("cudnn", "gpu", False), ("cudnn", "gpu", True),
                                                 ("splash", "tpu", False)])
def test_kernel_matches_xla_on_packed_rows(impl, platform, alibi):
    if PLATFORM != platform:
        pytest.skip(f"attention_impl={impl!r} needs a {platform.upper()}; this run is on {PLATFORM}")
    q, k, v, seg, pos = packed_inputs()
    kw = dict(q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos, alibi=alibi)
    want = attention(q, k, v, impl="xla", **kw).astype(jnp.float32)
    got = attention(q, k, v, impl=impl, **kw).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_auto_picks_the_platform_kernel():
    assert resolve_impl("auto") == {"gpu": "cudnn", "tpu": "splash"}.get(PLATFORM, "xla")
    assert resolve_impl("xla") == "xla"
