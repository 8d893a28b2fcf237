"""Run by tests/test_attention_impls.py in a fresh process with 8 fake CPU devices (XLA_FLAGS must be set before
jax is imported) and JAXLLM_PALLAS_INTERPRET=1: on a data 2 x fsdp 2 x tensor 2 mesh, the `pallas` and `splash`
kernels run under shard_map on each device's rows and heads and give the `xla` outputs and gradients.
Prints `<kernel>:ok` per kernel; fails with an assertion otherwise."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAXLLM_PALLAS_INTERPRET"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import MeshConfig  # noqa: E402
from jaxllm.model.attention import attention  # noqa: E402
from jaxllm.sharding import make_mesh, named_sharding, use_rules  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_attention_impls import loss_and_grads, packed_inputs  # noqa: E402

assert jax.device_count() == 8, jax.devices()
mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
mesh = make_mesh(mesh_cfg)
# batch 4 over data x fsdp = 1 row per device; 4 query heads and 2 kv heads over tensor = 2 and 1 per device.
q, k, v, seg, pos = packed_inputs(length=200, heads=4, kv_heads=2, head_dim=32, batch=4)
axes = {"q": ("batch", "length", "heads", "head_dim"), "kv": ("batch", "length", "kv_heads", "head_dim"),
        "seg": ("batch", "length")}
put = lambda x, name: jax.device_put(x, named_sharding(mesh, mesh_cfg.rules, axes[name], x.shape))  # noqa: E731
q, k, v, seg, pos = put(q, "q"), put(k, "kv"), put(v, "kv"), put(seg, "seg"), put(pos, "seg")
want_out, want_grads = loss_and_grads("xla", q, k, v, seg, pos)
for impl in ("pallas", "splash"):
    with use_rules(mesh, mesh_cfg.rules):
        got_out, got_grads = loss_and_grads(impl, q, k, v, seg, pos)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(
            q, k, v, q_segment_ids=seg, k_segment_ids=seg, q_positions=pos, k_positions=pos, impl=impl))(q, k, v))
    # The kernel ran per device: under shard_map, on one padded row of 2 query heads (pallas: and the 2 copies
    # of the device's kv head; splash: the one kv head itself).
    assert "shard_map" in jaxpr, impl
    assert "f32[1,256,2,32]" in jaxpr, impl
    np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=1e-4, err_msg=impl)
    for name, got, want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{impl} d{name}")
    print(f"{impl}:ok", flush=True)
