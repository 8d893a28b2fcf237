"""Flash-attention kernels (Pallas): what each needs, which one `auto` takes, and how each runs on a mesh.

Each kernel declares its constraints in one `KernelSpec` (platform, dtypes, head_dim, same-length self-attention,
ALiBi); `choose_kernel` checks them per call, so `auto` takes the fastest kernel that can run and an explicit
choice that cannot run fails with the reason. The kernels pad the length to their block multiple themselves
(padding gets segment id 0, the id of padding everywhere in jaxllm), so any length runs; `auto` avoids a kernel
when padding would add more than an eighth to the work (a 200-token row padded to 256), where XLA is as fast.

On a mesh (inside `sharding.use_rules`) a kernel runs under `shard_map`: XLA cannot partition a Pallas call, so
each device runs the kernel on its own rows (batch over data and fsdp) and heads (over tensor), with the partition
specs derived from logical axis names by `sharding.py`'s rules. Outside a mesh the kernel is called directly.

JAXLLM_PALLAS_INTERPRET=1 runs `pallas` and `splash` in Pallas interpret mode on any platform (CPU included): slow,
but it executes the real kernel code, for tests and for debugging a kernel without an accelerator.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from jaxllm.sharding import active_partition_specs

INTERPRET_ENV = "JAXLLM_PALLAS_INTERPRET"
MAX_PADDING = 1 / 8     # `auto` takes a padded kernel only if padding adds at most this share of the length


def interpret_mode() -> bool:
    """True when JAXLLM_PALLAS_INTERPRET=1: Pallas kernels run interpreted (any platform, slow)."""
    return os.environ.get(INTERPRET_ENV, "") not in ("", "0")


def padded_length(length: int, block: int) -> int:
    return -(-length // block) * block


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What a kernel needs to run. `pads` kernels take any length by padding to `block`."""
    name: str
    platform: str                   # "gpu" or "tpu"
    dtypes: tuple[str, ...]
    head_dim_multiple: int
    max_head_dim: int
    alibi: bool                     # can add the ALiBi bias
    same_length: bool               # self-attention only: q and k of one length with one set of segment ids
    pads: bool
    why_dtype: str = ""             # said when the dtype is refused

    def unmet(self, *, dtype, q_len: int, k_len: int, head_dim: int, alibi: bool, platform: str,
              interpret: bool = False) -> str | None:
        """Why this kernel cannot run this call, or None. Interpret mode runs anywhere and in any dtype."""
        dtype = jnp.dtype(dtype).name
        if not interpret:
            if platform != self.platform:
                return f"it needs a {self.platform.upper()} and this is {platform}"
            if dtype not in self.dtypes:
                return f"it needs {' or '.join(self.dtypes)} and this call is {dtype}{self.why_dtype}"
            if head_dim % self.head_dim_multiple or head_dim > self.max_head_dim:
                return (f"it needs head_dim a multiple of {self.head_dim_multiple} and at most {self.max_head_dim}, "
                        f"got {head_dim}")
        if alibi and not self.alibi:
            return "it takes no bias, so it cannot apply ALiBi"
        if self.same_length and q_len != k_len:
            return f"it attends within one row only (q length {q_len} != k length {k_len})"
        return None


KERNELS = {
    "cudnn": KernelSpec("cudnn", "gpu", ("bfloat16", "float16"), 8, 128, alibi=True, same_length=False, pads=False,
                        why_dtype=" (cuDNN has no float32 flash attention; use compute_dtype=bfloat16)"),
    "pallas": KernelSpec("pallas", "gpu", ("bfloat16", "float16", "float32"), 16, 256, alibi=False,
                         same_length=True, pads=True),
    "splash": KernelSpec("splash", "tpu", ("bfloat16", "float32"), 64, 256, alibi=False, same_length=True,
                         pads=True),
}
PREFERENCE = {"gpu": ("cudnn", "pallas"), "tpu": ("splash",)}   # fastest first


def choose_kernel(requested: str, *, dtype, q_len: int, k_len: int, head_dim: int, alibi: bool, platform: str,
                  block: int) -> tuple[str, str]:
    """(kernel name, why). `auto` takes the first kernel of the platform's preference whose constraints hold and
    whose padding stays within MAX_PADDING, else `xla`; an explicit kernel that cannot run raises ValueError."""
    call = dict(dtype=dtype, q_len=q_len, k_len=k_len, head_dim=head_dim, alibi=alibi, platform=platform)
    if requested == "xla":
        return "xla", "requested"
    if requested in KERNELS:
        reason = KERNELS[requested].unmet(**call, interpret=interpret_mode())
        if reason:
            raise ValueError(f"attention_impl={requested!r} cannot run this call: {reason}. "
                             f"Use attention_impl='auto' (falls back to 'xla') or 'xla'.")
        return requested, "requested"
    if requested != "auto":
        raise ValueError(f"unknown attention implementation {requested!r}; known: auto, xla, {', '.join(KERNELS)}")
    refused = []
    for name in PREFERENCE.get(platform, ()):
        spec = KERNELS[name]
        reason = spec.unmet(**call)
        if reason is None and spec.pads and padded_length(q_len, block) > q_len * (1 + MAX_PADDING):
            reason = f"length {q_len} would be padded to {padded_length(q_len, block)} (block {block})"
        if reason is None:
            return name, f"its constraints hold on {platform} ({jnp.dtype(dtype).name}, head_dim {head_dim})"
        refused.append(f"{name}: {reason}")
    return "xla", "; ".join(refused) or f"no flash kernel on {platform}"


# ---- running a kernel: padding, heads layout, shard_map ----

def pad_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad axis 1 (length) up to `length`; for segment ids the zeros mean padding."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def on_mesh(kernel_fn, q, k, v, segment_ids):
    """kernel_fn(q, k, v, segment_ids) per device under shard_map when a mesh is active, else directly.

    Rows split over the batch axes and heads over the head axes; length and head_dim stay whole (a kernel needs
    whole rows). Query and key heads split only together, so each device holds the kv heads of its query heads."""
    layout = active_partition_specs([(("batch", None, "heads", None), q.shape),
                                     (("batch", None, "kv_heads", None), k.shape),
                                     (("batch", None), segment_ids.shape)])
    if layout is None:
        return kernel_fn(q, k, v, segment_ids)
    mesh, (q_spec, kv_spec, seg_spec) = layout
    if q_spec[2] != kv_spec[2]:     # e.g. 2 kv heads on tensor=4: keep every head on every device
        q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
        kv_spec = jax.sharding.PartitionSpec(kv_spec[0], None, None, None)
    return jax.shard_map(kernel_fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


def flash_attention(kernel_fn, q, k, v, segment_ids, block: int) -> jax.Array:
    """Pad to the block multiple, run on the mesh, cut the padding and zero padding queries (as `xla` does)."""
    length = q.shape[1]
    target = padded_length(length, block)
    padded = [pad_length(x, target) for x in (q, k, v, segment_ids)]
    out = on_mesh(kernel_fn, *padded)[:, :length]                          # (batch, length, heads, head_dim)
    return jnp.where(segment_ids[:, :, None, None] > 0, out, 0).astype(q.dtype)


def pallas_gpu_attention(q, k, v, segment_ids, block: int = 128) -> jax.Array:
    """Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha), causal with segment ids.
    q: (batch, length, heads, head_dim); k, v: (batch, length, kv_heads, head_dim); segment_ids: (batch, length)."""
    return flash_attention(functools.partial(_pallas_gpu_shard, block=block, interpret=interpret_mode()),
                           q, k, v, segment_ids, block)


def _pallas_gpu_shard(q, k, v, segment_ids, *, block: int, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    groups = q.shape[2] // k.shape[2]
    # This kernel reads K/V at the query head's index, so grouped-query K/V are repeated here (in this device's
    # memory only); the repeat's transpose sums the key/value gradients of each group.
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    backward = min(block, 32)       # the backward kernel's tiles: the kernel's default, within the block
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=backward, block_kv_dkv=backward,
                                     block_q_dq=backward, block_kv_dq=backward)
    return gpu_attention.mha(q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=sizes,
                             interpret=interpret)


def splash_attention(q, k, v, segment_ids, block: int = 128) -> jax.Array:
    """TPU splash attention, causal with segment ids, grouped-query K/V read in place (no repeat).
    q: (batch, length, heads, head_dim); k, v: (batch, length, kv_heads, head_dim); segment_ids: (batch, length)."""
    return flash_attention(functools.partial(_splash_shard, block=block, interpret=interpret_mode()),
                           q, k, v, segment_ids, block)


@functools.lru_cache(maxsize=32)
def splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for one device's heads: its causal block mask is computed once (numpy) per shape."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The mask info becomes concrete arrays even when first built inside a trace, so the cache holds no tracer.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_shard(q, k, v, segment_ids, *, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    kernel = splash_kernel(q.shape[2], q.shape[1], block, interpret)
    # The kernel works per row on (heads, length, head_dim); with fewer K/V heads it maps query head h to
    # kv head h // (heads / kv_heads), i.e. grouped-query attention without copies. It takes no scale.
    qt = jnp.swapaxes(q * (q.shape[-1] ** -0.5), 1, 2)                      # (batch, heads, length, head_dim)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                   # (batch, kv_heads, length, head_dim)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
        qt, kt, vt, segment_ids)                                             # (batch, heads, length, head_dim)
    return jnp.swapaxes(out, 1, 2)
