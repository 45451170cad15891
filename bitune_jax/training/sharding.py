"""Device mesh and shardings from logical axis names.

The mesh has three named axes:

* ``data``: pure data parallelism (batch split, parameters replicated);
* ``fsdp``: batch split *and* parameters split (ZeRO-3 style: each device
  holds a slice of every kernel, gathered for the matmul);
* ``tensor``: Megatron-style tensor parallelism inside a layer (attention
  heads and MLP hidden units).

Nothing here looks at parameter names. Every array dimension carries a
*logical* axis name saying what it is: the model declares its parameters'
names (:func:`bitune_jax.model.transformer.param_axes`: ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``vocab``, ``layers``, ``norm``, ``head_dim``),
adapters take the names of the kernel dimensions they touch plus
``lora_rank`` (:func:`bitune_jax.model.peft.adapter_axes`), and batches are
``batch`` x ``length``. One table of rules (:data:`DEFAULT_RULES`, overridable
as ``mesh.rules`` in a run config) maps each logical name to mesh axes, as
MaxText's ``logical_axis_rules`` do. The defaults shard widening kernels
(q, k, v, gate, up: ``embed -> mlp/heads``) ``in`` over fsdp and ``out`` over
tensor and narrowing ones (o, down) the other way round, so a block needs one
reduction per pair. A mesh axis whose size does not divide the dimension is
dropped for that array, so any mesh works with any model (at some memory
cost). Optimizer state takes the sharding of the parameter it mirrors (found
by tree structure: the state leaf whose key path ends with the parameter's).

Example:

    >>> mesh = make_mesh(data=-1)  # every device on the data axis
    >>> mesh.axis_names
    ('data', 'fsdp', 'tensor')
    >>> tuple(mesh_axes(("layers", "embed", "heads"), DEFAULT_RULES))
    (None, 'fsdp', 'tensor')
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, Tuple[str, ...]]

# logical axis -> mesh axes. Every logical name the library uses appears here.
DEFAULT_RULES: Tuple[Tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("lora_rank", None),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def check_rules(rules: Sequence[Tuple[str, MeshAxes]]) -> Tuple[Tuple[str, MeshAxes], ...]:
    """Validates a rules table; returns it as a tuple of ``(logical, mesh axes)`` pairs.

    Raises ``ValueError`` naming an unknown logical axis, an unknown mesh axis,
    a logical axis listed twice or one that is missing.
    """
    out, seen = [], set()
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"rule {entry!r}: expected [logical_axis, mesh_axes]")
        name, target = entry
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; allowed: {', '.join(LOGICAL_AXES)}")
        if name in seen:
            raise ValueError(f"logical axis {name!r} has two rules")
        seen.add(name)
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [t for t in targets if t not in AXES]
        if bad:
            raise ValueError(f"logical axis {name!r} maps to unknown mesh axes {bad}; allowed: {', '.join(AXES)}")
        out.append((name, None if not targets else targets[0] if len(targets) == 1 else targets))
    missing = [n for n in LOGICAL_AXES if n not in seen]
    if missing:
        raise ValueError(f"no rule for logical axes {missing}")
    return tuple(out)


def mesh_axes(logical: Sequence[Optional[str]], rules=DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` of logical axis names under ``rules`` (no divisibility check)."""
    table = dict(rules)
    unknown = [a for a in logical if a is not None and a not in table]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; allowed: {', '.join(table)}")
    return P(*(None if a is None else table[a] for a in logical))


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


def fit(spec: P, shape, mesh_shape) -> P:
    """Drops mesh axes that do not divide the dimension they shard (``mesh_shape``: axis -> size)."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if ax is None:
            out.append(None)
            continue
        names = ax if isinstance(ax, tuple) else (ax,)
        size = int(np.prod([mesh_shape[n] for n in names]))
        out.append(ax if size > 1 and dim % size == 0 else None)
    return P(*out)


def named(mesh: Mesh, logical, shape, rules=DEFAULT_RULES) -> NamedSharding:
    """The ``NamedSharding`` of one array of ``shape`` whose dimensions are named ``logical``."""
    if len(shape) == 0:
        return NamedSharding(mesh, P())
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match an array of shape {tuple(shape)}")
    return NamedSharding(mesh, fit(mesh_axes(logical, rules), shape, dict(mesh.shape)))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh: Mesh, tree, axes_tree, rules=DEFAULT_RULES):
    """NamedShardings for ``tree`` whose leaves' logical axes are the matching leaves of ``axes_tree``."""
    return jax.tree_util.tree_map(lambda axes, x: named(mesh, axes, np.shape(x), rules), axes_tree, tree,
                                  is_leaf=_is_axes)


def base_shardings(mesh: Mesh, base, cfg, rules=DEFAULT_RULES):
    """Shardings of the frozen base parameters of model ``cfg``."""
    from bitune_jax.model.transformer import param_axes

    return tree_shardings(mesh, base, param_axes(cfg), rules)


def trainable_axes(trainable, cfg):
    """Logical axes of a trainable tree ``{"causal": adapters, "bidir"?: adapters, "mix"?: {...}}``."""
    from bitune_jax.model.peft import adapter_axes
    from bitune_jax.model.transformer import param_axes

    kernels = param_axes(cfg)["layers"]
    out = {}
    for group, tree in trainable.items():
        if group == "mix":  # one mixing coefficient per layer
            out[group] = jax.tree_util.tree_map(lambda _: ("layers",), tree)
        else:
            out[group] = adapter_axes(tree, kernels)
    return out


def opt_state_shardings(mesh: Mesh, opt_state, trainable, trainable_sh):
    """Optimizer state leaves take the sharding of the parameter they mirror, found by key path.

    A state leaf mirrors a parameter when its key path ends with that
    parameter's key path in the trainable tree and the shapes agree (Adam's
    ``mu``/``nu``); everything else (step counts) is replicated.
    """
    by_path = {}
    for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                             jax.tree_util.tree_leaves(trainable_sh)):
        by_path[tuple(path)] = (np.shape(x), sh)
    depth = max((len(p) for p in by_path), default=0)

    def one(path, x):
        for n in range(min(len(path), depth), 0, -1):
            hit = by_path.get(tuple(path[-n:]))
            if hit is not None and hit[0] == np.shape(x):
                return hit[1]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, opt_state)


def batch_sharding(mesh: Mesh, batch, rules=DEFAULT_RULES):
    """Every batch array is ``[batch, length?, ...]``: split on its first axis by the ``batch`` rule."""
    return jax.tree_util.tree_map(
        lambda x: named(mesh, ("batch",) + ("length",) * min(np.ndim(x) - 1, 1) + (None,) * max(np.ndim(x) - 2, 0),
                        np.shape(x), rules), batch)


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())
