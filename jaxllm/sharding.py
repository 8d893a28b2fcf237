"""The device mesh and the mapping from logical axis names to mesh axes.

Model code names logical axes only (`batch`, `embed`, `heads`, ...). This module is the one place that
knows the mesh axes `data`, `fsdp` and `tensor`. We translate rules ourselves (a dozen lines) instead of
through flax.linen's global rule context so that (a) two logical axes of one array mapped to the same mesh
axis is an error, not a silent surprise, and (b) nothing depends on a process-global mesh context whose API
moved between jax releases.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

_active: contextvars.ContextVar = contextvars.ContextVar("jaxllm_sharding", default=None)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (= the devices left over)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices cannot be split as data={mesh_cfg.data}, "
                             f"fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = {math.prod(sizes)} "
                         f"but there are {len(devices)} devices; make the sizes multiply to the device count "
                         f"(or set one of them to -1)")
    return Mesh(device_grid(sizes, devices), MESH_AXES)


def device_grid(sizes: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged as a (data, fsdp, tensor) array along the physical interconnect.

    mesh_utils puts the last (most communicating) axis, tensor, on the closest chips of a TPU torus and orders
    GPUs by their global id; on CPU it keeps device order. Across TPU slices (multi-slice), the slow data-center
    network carries only the data axis (one gradient all-reduce per step); fsdp and tensor stay inside a slice."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "tpu" and len(slices) > 1:
        if sizes[0] % len(slices):
            raise ValueError(f"mesh: data={sizes[0]} must be a multiple of the {len(slices)} TPU slices (only the "
                             f"data axis crosses slices); set mesh.data to a multiple of {len(slices)}")
        inside = [sizes[0] // len(slices), sizes[1], sizes[2]]
        return mesh_utils.create_hybrid_device_mesh(inside, [len(slices), 1, 1], devices,
                                                    allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)


def logical_to_spec(axes: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical names.

    A dimension whose size is not divisible by its mesh axes stays replicated (a 2-kv-head tiny model on a
    tensor=4 mesh, a batch of 1 in generation), rather than failing deep inside XLA."""
    table = dict(rules)
    used: dict[str, str] = {}
    out = []
    for dim, name in enumerate(axes):
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        for m in mesh_axes:
            if m in used:
                raise ValueError(f"sharding rules map logical axes {used[m]!r} and {name!r} of one array to the "
                                 f"same mesh axis {m!r}")
            used[m] = name
        if mesh is not None and shape is not None:
            size = math.prod(mesh.shape[m] for m in mesh_axes)
            if shape[dim] % size:
                logging.debug("dimension %s (%d) not divisible by %s (%d): replicated", name, shape[dim],
                              mesh_axes, size)
                out.append(None)
                continue
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, rules, axes, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))


def tree_shardings(mesh: Mesh, rules, logical_tree, abstract_tree):
    """NamedShardings for a tree of arrays, from a matching tree of logical axis tuples."""
    return jax.tree.map(lambda axes, a: named_sharding(mesh, rules, axes, a.shape), logical_tree, abstract_tree,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def put_batch(mesh: Mesh, rules, x) -> jax.Array:
    """A host array that every process holds whole (the same values everywhere) -> one global array split along
    its leading (batch) axis; each process places only its own devices' slices."""
    x = np.asarray(x)
    s = named_sharding(mesh, rules, ("batch",) + (None,) * (x.ndim - 1), x.shape)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])


def process_rows(mesh: Mesh, rules, rows: int) -> np.ndarray:
    """The indices of the global batch's rows that this process's devices hold when a batch of `rows` is split
    as `put_batch` splits it: the rows its local data must be (jax.make_array_from_process_local_data)."""
    s = named_sharding(mesh, rules, ("batch",), (rows,))
    every = np.arange(rows)
    return np.unique(np.concatenate([every[index[0]] for index in s.addressable_devices_indices_map((rows,)).values()]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Within this context, `constrain` pins activations to the mesh; outside it, `constrain` is a no-op, so
    the same model code runs unsharded in tests and notebooks."""
    token = _active.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _active.reset(token)


def active_partition_specs(arrays: Sequence[tuple[Sequence[str | None], Sequence[int]]]):
    """(mesh, PartitionSpecs) for arrays given as (logical axes, shape), under the active `use_rules`; None
    outside it. For code that must run per device under shard_map (Pallas kernels), without naming mesh axes."""
    active = _active.get()
    if active is None:
        return None
    mesh, rules = active
    return mesh, tuple(logical_to_spec(axes, rules, shape, mesh) for axes, shape in arrays)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names."""
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, axes, x.shape))
