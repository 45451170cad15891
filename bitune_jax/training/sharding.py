"""Device mesh and parameter shardings.

The mesh has three named axes:

* ``data``: pure data parallelism (batch split, parameters replicated);
* ``fsdp``: batch split *and* parameters split (ZeRO-3 style: each device
  holds a slice of every kernel, gathered for the matmul);
* ``tensor``: Megatron-style tensor parallelism inside a layer (attention
  heads and MLP hidden units).

Kernels ``[layers, in, out]`` of projections that widen (q, k, v, gate, up)
shard ``in`` over fsdp and ``out`` over tensor; those that narrow (o, down)
the other way round, so the pair needs one reduction per block. Adapters
follow the kernel they modify: LoRA ``A [layers, in, r]`` takes the kernel's
``in`` sharding, ``B [layers, r, out]`` its ``out`` sharding; per-feature
vectors (DoRA magnitude, IA3 scales, biases) follow their feature axis. An
axis whose size does not divide the dimension is left replicated for that
array, so any mesh works with any model (at some memory cost).

Example:

    >>> mesh = make_mesh(data=-1)  # every device on the data axis
    >>> mesh.axis_names
    ('data', 'fsdp', 'tensor')
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
_WIDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} "
                             f"({dict(zip(AXES, sizes))})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def _fit(mesh: Mesh, shape, spec):
    """Drops mesh axes that do not divide the dimension they shard."""
    out = []
    for dim, ax in zip(shape, spec):
        if ax is None:
            out.append(None)
            continue
        names = ax if isinstance(ax, tuple) else (ax,)
        size = int(np.prod([mesh.shape[n] for n in names]))
        out.append(ax if size > 1 and dim % size == 0 else None)
    return P(*out)


def _spec_for(path, shape):
    """Logical PartitionSpec of one parameter from its path in the tree."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    last = keys[-1]
    proj = next((k for k in keys if isinstance(k, str) and k.endswith("_proj")), None)
    if keys[0] == "embed":
        return (("tensor"), "fsdp")
    if keys[0] == "lm_head":
        return ("fsdp", "tensor") if last == "kernel" else ("tensor",)
    if proj is None:  # norms, mixing coefficients
        return (None,) * len(shape)
    inp, out = ("fsdp", "tensor") if proj in _WIDEN else ("tensor", "fsdp")
    if last == "kernel":
        return (None, inp, out)
    if last == "lora_a":
        return (None, inp, None)
    if last == "lora_b":
        return (None, None, out)
    if last in ("bias", "magnitude"):
        return (None, out)
    if last == "scale":  # IA3: input scaling for down_proj, output otherwise
        return (None, inp) if proj == "down_proj" else (None, out)
    return (None,) * len(shape)


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for a parameter, adapter or optimizer-state tree."""
    def one(path, x):
        shape = np.shape(x)
        if len(shape) == 0:
            return NamedSharding(mesh, P())
        spec = _spec_for(path, shape)
        if len(spec) != len(shape):
            spec = (None,) * len(shape)
        return NamedSharding(mesh, _fit(mesh, shape, spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, batch):
    """Every batch array is split on its first axis over (data, fsdp)."""
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, _fit(mesh, np.shape(x), (BATCH,) + (None,) * (np.ndim(x) - 1))), batch)


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())
