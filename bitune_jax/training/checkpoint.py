"""Training checkpoints: only what training changes, written by orbax.

A checkpoint is one step folder of an orbax ``CheckpointManager`` under
``<output_dir>/checkpoints``::

    checkpoints/<step>/
      state/    TrainState: step, trainable (adapter sets, mixing theta) and
                optimizer state (StandardSave: sharded arrays, OCDBT)
      data/     the training iterator's state, JSON ({"next_index": i})
      config/   the resolved run config, JSON (config.config_to_dict)
      base/     the frozen base model reference, JSON:
                {"source", "path", "files": {name: sha256}, "sha256"}

The frozen base model is never copied; it is referenced by its path and a
content hash (:func:`base_reference`), checked when a run resumes.

Orbax writes each step into a temporary folder and renames it when every
item is complete, so :meth:`Checkpoints.latest_step` only ever sees complete
checkpoints: a run killed in the middle of a save leaves the previous one as
the latest. Saves can be asynchronous (the arrays are copied to host memory
before ``save`` returns, the files are written in the background); all
processes call ``save`` and ``restore`` together, each writing its shards.

Example (the state is any array tree; training saves its ``TrainState``):

    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> state = {"step": jnp.array(100), "theta_k": jnp.array([0.25, 0.5])}
    >>> ckpt = Checkpoints(tempfile.mkdtemp(), keep=3)
    >>> ckpt.save(100, state, {"next_index": 100}, {"train": {"steps": 1000}}, {"path": "/models/m"})
    >>> ckpt.wait()
    >>> ckpt.latest_step()
    100
    >>> restored, data_state, config, base = ckpt.restore(100, state)
    >>> int(restored["step"]), restored["theta_k"].tolist(), data_state
    (100, [0.25, 0.5], {'next_index': 100})
    >>> ckpt.close()
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from bitune_jax.fileio import cache_dir, sha256_file, write_json_atomic

# Config keys that may differ between a checkpoint and the run resuming it:
# they change where things are written, how often, the device layout or the
# evaluation split, never the training math. Prefixes end with ".".
RESUMABLE_CHANGES = ("model.source", "train.output_dir", "train.eval_every", "train.eval_batches",
                     "train.save_every", "train.keep_checkpoints", "train.log_every", "train.async_checkpoint",
                     "train.remat", "data.eval", "data.eval.", "mesh.")


class ResumeError(ValueError):
    """A run cannot resume from the checkpoint in its output directory."""


class Checkpoints:
    """An orbax ``CheckpointManager`` holding the items listed in the module docstring.

    Args:
      directory: folder of the step folders (created if missing).
      keep: most recent checkpoints kept on disk (older ones are deleted).
      async_save: write in the background; call :meth:`wait` before relying
        on the files (``close`` waits too).
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "config", "base"))

    def latest_step(self) -> Optional[int]:
        """Step of the newest complete checkpoint, or None."""
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: Mapping[str, Any], config: Mapping[str, Any],
             base: Mapping[str, Any]) -> None:
        """Starts saving (all processes call this); with ``async_save`` it returns before the files exist."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)), base=ocp.args.JsonSave(dict(base))), force=True)

    def restore(self, step: int, like) -> Tuple[Any, Dict, Dict, Dict]:
        """``(state, data_state, config, base)`` of checkpoint ``step``.

        ``like`` is a state tree (arrays or ``jax.ShapeDtypeStruct``) whose
        structure, dtypes and shardings the restored state takes.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), base=ocp.args.JsonRestore()))
        return out.state, out.data, out.config, out.base

    def read_json(self, step: int, item: str) -> Dict:
        """One JSON item (``data``, ``config`` or ``base``) of a checkpoint, without its arrays."""
        args = {item: ocp.args.JsonRestore()}
        return self._mngr.restore(step, args=ocp.args.Composite(**args))[item]

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._mngr.close()


# ----------------------------------------------------------------------------
# The base model reference
# ----------------------------------------------------------------------------


def _cache_path() -> str:
    return cache_dir("sha256.json")


def file_sha256(path: str) -> str:
    """sha256 of a file, cached by (path, size, mtime) in ``~/.cache/bitune_jax/sha256.json``.

    Hashing a multi-gigabyte checkpoint takes a while; the cache makes every
    later start of a run on the same unchanged file free.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _cache_path()
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    cache = {k: v for k, v in cache.items() if not k.startswith(path + "|")}
    cache[key] = sha256_file(path)
    try:  # a cache that cannot be written only costs time
        write_json_atomic(cache_file, cache)
    except OSError:
        pass
    return cache[key]


def _weight_files(path: str):
    if os.path.isfile(path):
        return [path]
    names = sorted(n for n in os.listdir(path)
                   if n.endswith((".safetensors", ".gguf")) or n in ("config.json", "model.safetensors.index.json"))
    return [os.path.join(path, n) for n in names]


def base_reference(source: str, path: str) -> Dict[str, Any]:
    """How a checkpoint names its frozen base model: path and content hash.

    Args:
      source: ``model.source`` as configured (e.g. ``smollm2``).
      path: the resolved file or folder (``assets.resolve_model_source``).

    Returns:
      ``{"source", "path", "files": {file name: sha256}, "sha256"}`` where the
      files are the weights (``.safetensors``/``.gguf``) and ``config.json``,
      and ``sha256`` hashes their sorted names and hashes together.
    """
    files = {os.path.basename(f): file_sha256(f) for f in _weight_files(path)}
    combined = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"source": source, "path": os.path.abspath(path), "files": files, "sha256": combined}


# ----------------------------------------------------------------------------
# Resume checks
# ----------------------------------------------------------------------------


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Dotted keys whose values differ: ``{key: (saved, current)}``.

    Lists and tuples compare equal when their items do (JSON turns tuples
    into lists).
    """
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(saved_config: Mapping[str, Any], config: Mapping[str, Any], saved_base: Mapping[str, Any],
                 base: Mapping[str, Any], *, allow_base_change: bool = False, where: str = "") -> None:
    """Raises :class:`ResumeError` if a run may not continue from a checkpoint.

    Refused: any config change outside :data:`RESUMABLE_CHANGES` (they change
    the math: model dtype, method, data, optimizer, steps, seed), named with
    both values; and a base model whose content hash changed, unless
    ``allow_base_change``.
    """
    math = {k: v for k, v in changed_fields(saved_config, config).items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)}
    if math:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in math.items())
        raise ResumeError(
            f"cannot resume from {where}: the config differs in fields that change training: {lines}. "
            "Use the same values, or a new train.output_dir to start a fresh run.")
    if saved_base.get("sha256") != base.get("sha256") and not allow_base_change:
        raise ResumeError(
            f"cannot resume from {where}: the base model changed (checkpoint: {saved_base.get('path')} "
            f"sha256 {str(saved_base.get('sha256'))[:12]}..., now: {base.get('path')} sha256 "
            f"{str(base.get('sha256'))[:12]}...). Point model.source at the original weights, or pass "
            "allow_base_change=True (--allow-base-change) to continue on the new ones.")
