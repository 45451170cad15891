"""Checkpoint-format-independent assembly of a parameter tree."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bitune_jax.model.transformer import param_shapes


class ModelFileError(ValueError):
    """A model file or directory is missing, malformed or inconsistent."""


# Pickled PyTorch checkpoints: never loaded (unpickling can run code), only named in errors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _transform(arr: np.ndarray, how: str) -> np.ndarray:
    if how == "transpose":
        return arr.T
    if how == "plus_one":
        return arr.astype(np.float32) + 1.0
    return arr


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def assemble(cfg, specs, reader, *, scheme: str, source: str):
    """Builds the parameter tree of ``cfg`` from a checkpoint.

    ``reader`` has ``has(key)`` and ``get(key) -> np.ndarray``; ``scheme`` is
    "hf" or "gguf" and selects the key of each :class:`WeightSpec`. Every
    tensor is checked against the expected shape; errors name the tensor.
    """
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    shapes = param_shapes(cfg)
    params = {}
    for spec in specs:
        key = spec.hf if scheme == "hf" else spec.gguf
        expected = tuple(_get(shapes, spec.path))
        keys = [key.format(i=i) for i in range(cfg.num_layers)] if spec.layer else [key]
        if spec.optional and not reader.has(keys[0]):
            continue
        arrays = []
        for k in keys:
            if not reader.has(k):
                raise ModelFileError(f"{source}: tensor {k!r} is missing")
            a = _transform(np.asarray(reader.get(k)), spec.transform_for(scheme))
            want = expected[1:] if spec.layer else expected
            if tuple(a.shape) != tuple(want):
                raise ModelFileError(
                    f"{source}: tensor {k!r} has shape {tuple(a.shape)} after {spec.transform_for(scheme)!r}, "
                    f"expected {tuple(want)} for {'/'.join(spec.path)}")
            arrays.append(a.astype(np.float32) if a.dtype != np.float32 else a)
        value = np.stack(arrays) if spec.layer else arrays[0]
        _set(params, spec.path, jnp.asarray(value, dtype=dtype))
    missing = []

    def walk(shape_tree, param_tree, prefix):
        for k, v in shape_tree.items():
            if isinstance(v, dict):
                walk(v, param_tree.get(k, {}), prefix + (k,))
            elif k not in param_tree:
                missing.append("/".join(prefix + (k,)))

    walk(shapes, params, ())
    if missing:
        raise ModelFileError(f"{source}: no tensor provides {missing}")
    return params
