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
      checksum/ the state's checksums, JSON ({"leaves": {path: [s1, s2]}},
                :func:`state_checksums`), checked on restore

The frozen base model is never copied; it is referenced by its path and a
content hash (:func:`base_reference`), checked when a run resumes.

Orbax writes each step into a temporary folder and renames it when every
item is complete, so :meth:`Checkpoints.latest_step` only ever sees complete
checkpoints: a run killed in the middle of a save leaves the previous one as
the latest (and a ``*.orbax-checkpoint-tmp*`` folder, removed with a message
when the run starts again). Old checkpoints beyond ``keep`` are renamed into
``checkpoints/.deleted/`` and removed from there, so a run killed while
deleting leaves no half-deleted step folder; what is left in ``.deleted`` is
removed at the next start. A resuming run takes the newest checkpoint that
restores completely and matches its checksums
(:meth:`Checkpoints.restore_newest`); newer ones that do not (truncated or
flipped bytes, broken JSON) are moved to ``checkpoints/skipped/<step>``, never
deleted. Saves can be asynchronous (the arrays are copied to host memory
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
import logging
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from bitune_jax.fileio import cache_dir, sha256_file, write_json_atomic

# Config keys that may differ between a checkpoint and the run resuming it:
# they change where things are written, how often, the device layout or the
# evaluation split, never the training math. Prefixes end with ".".
RESUMABLE_CHANGES = ("model.source", "train.output_dir", "train.eval_every", "train.eval_batches",
                     "train.save_every", "train.keep_checkpoints", "train.log_every", "train.async_checkpoint",
                     "train.remat", "data.eval", "data.eval.", "mesh.")

DELETED_DIR = ".deleted"  # old steps go here on their way out (see Checkpoints)
SKIPPED_DIR = "skipped"  # checkpoints that did not restore (see Checkpoints.restore_newest)
TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a step folder orbax has not finished writing


class _DropNotice(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class ResumeError(ValueError):
    """A run cannot resume from the checkpoint in its output directory."""


class CheckpointError(ValueError):
    """A checkpoint's files cannot be read (corrupt, truncated, or written by something else)."""


def _unreadable(folder: str, e: Exception) -> CheckpointError:
    # orbax and tensorstore errors run to hundreds of lines; their first line says what broke.
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    cause = f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
    return CheckpointError(f"{folder}: checkpoint cannot be read, corrupt or incomplete ({cause})")


class Checkpoints:
    """An orbax ``CheckpointManager`` holding the items listed in the module docstring.

    Args:
      directory: folder of the step folders (created if missing).
      keep: most recent checkpoints kept on disk (older ones are deleted).
      async_save: write in the background; call :meth:`wait` before relying
        on the files (``close`` waits too).
      say: prints what the manager cleans up (folders of an interrupted save
        or deletion); default: the ``logging`` module.
      read_only: only read (exporting adapters of a run that may still be
        training): nothing is cleaned up, saved, moved or deleted.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 say: Optional[Callable[[str], None]] = None, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self._say = say or logging.getLogger(__name__).warning
        self._read_only = read_only
        self._main = jax.process_index() == 0 and not read_only  # the process that cleans up and moves
        if self._main and os.path.isdir(self.directory):
            partial = sorted(n for n in os.listdir(self.directory) if TMP_MARK in n)
            if partial:  # orbax removes them (cleanup_tmp_directories)
                self._say(f"removing {len(partial)} incomplete checkpoint folder(s) of an interrupted save in "
                          f"{self.directory}: {', '.join(partial)}")
            leftover = self._purge_deleted()
            if leftover:
                self._say(f"finished deleting old checkpoint(s) {', '.join(leftover)} of {self.directory} "
                          "(their deletion was interrupted)")
        # Old steps are renamed into DELETED_DIR (atomic) and removed from there, so a run killed while
        # deleting never leaves a half-deleted step folder that looks like a checkpoint.
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               save_interval_steps=0 if read_only else 1,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=not read_only, create=not read_only,
                                               todelete_subdir=None if read_only else DELETED_DIR,
                                               read_only=read_only)
        quiet = _DropNotice("Given directory is read only")  # orbax warns on every read-only manager
        logging.getLogger("absl").addFilter(quiet)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                               item_names=("state", "data", "config", "base", "checksum"))
        finally:
            logging.getLogger("absl").removeFilter(quiet)

    def latest_step(self) -> Optional[int]:
        """Step of the newest checkpoint folder, or None (see :meth:`restore_newest` for one that restores)."""
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, data_state: Mapping[str, Any], config: Mapping[str, Any],
             base: Mapping[str, Any]) -> None:
        """Starts saving (all processes call this); with ``async_save`` it returns before the files exist.

        The state's :func:`state_checksums` are saved with it and checked by
        :meth:`restore`.
        """
        self._mngr.wait_until_finished()  # the previous save is complete, and so its deletions
        if self._main:
            self._purge_deleted()
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)), base=ocp.args.JsonSave(dict(base)),
            checksum=ocp.args.JsonSave({"leaves": state_checksums(state)})), force=True)

    def restore(self, step: int, like) -> Tuple[Any, Dict, Dict, Dict]:
        """``(state, data_state, config, base)`` of checkpoint ``step``.

        ``like`` is a state tree (arrays or ``jax.ShapeDtypeStruct``) whose
        structure, dtypes and shardings the restored state takes. The restored
        state's checksums must equal the saved ones (checkpoints of releases
        that saved none are not checked); a checkpoint that cannot be read
        completely or does not match raises :class:`CheckpointError`.
        """
        folder = os.path.join(self.directory, str(step))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(), base=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on damaged files
            raise _unreadable(folder, e) from e
        if os.path.isdir(os.path.join(folder, "checksum")):
            saved = self.read_json(step, "checksum").get("leaves")
            now = state_checksums(out.state)
            if saved != now:
                bad = sorted(k for k in set(now) | set(saved or {}) if (saved or {}).get(k) != now.get(k))
                raise CheckpointError(f"{folder}: the restored state does not match the checksums saved with it "
                                      f"({len(bad)} of {len(now)} arrays differ: {', '.join(bad[:3])}"
                                      f"{', ...' if len(bad) > 3 else ''}); the files are corrupt")
        return out.state, out.data, out.config, out.base

    def restore_newest(self, like, accept: Callable[[int, Dict, Dict], None] = lambda step, config, base: None
                       ) -> Optional[Restored]:
        """The newest checkpoint that restores completely and matches its checksums, or None if there is none.

        Newer checkpoints that fail are skipped and moved, never deleted, to
        ``<directory>/skipped/<step>`` (numbered ``<step>-2``, ... if taken),
        so the run continues from the one restored (with ``read_only`` they
        stay where they are); :attr:`Restored.skipped` says which and why.
        ``accept(step, config, base)`` sees each candidate's config and base
        reference before its arrays are read and raises (e.g.
        :class:`ResumeError`) to stop the search. Raises
        :class:`CheckpointError` when checkpoints exist but none restores
        (then nothing is moved).
        """
        skipped = []
        for step in sorted(self.all_steps(), reverse=True):
            failure = None
            try:
                config, base = self.read_json(step, "config"), self.read_json(step, "base")
            except CheckpointError as e:
                failure = e
            if not any_process(failure is not None):
                accept(step, config, base)
                try:
                    state, data_state, config, base = self.restore(step, like)
                except CheckpointError as e:
                    failure = e
                if not any_process(failure is not None):
                    moved = [(s, why, self._set_aside(s)) for s, why in skipped]
                    return Restored(step, state, data_state, config, base, moved)
            skipped.append((step, str(failure) if failure else
                            f"{os.path.join(self.directory, str(step))}: cannot be read on another process"))
        if skipped:
            raise CheckpointError(
                f"none of the {len(skipped)} checkpoint(s) in {self.directory} restores: "
                + "; ".join(why for _, why in skipped)
                + ". They are left as they are; move them away (or use a new train.output_dir) to start afresh")
        return None

    def _set_aside(self, step: int) -> str:
        """Moves step folder ``step`` to ``skipped/`` (process 0) and tells orbax it is gone; returns the new path."""
        if self._read_only:
            return os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, SKIPPED_DIR, str(step))
        n = 1
        while os.path.lexists(target):
            n += 1
            target = os.path.join(self.directory, SKIPPED_DIR, f"{step}-{n}")
        if self._main:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"bitune_jax checkpoint set aside {step}")
        self._mngr.reload()
        return target

    def _purge_deleted(self):
        """Removes what orbax moved into DELETED_DIR; returns the names found there."""
        trash = os.path.join(self.directory, DELETED_DIR)
        names = sorted(os.listdir(trash)) if os.path.isdir(trash) else []
        for name in names:
            remove_tree(os.path.join(trash, name))
        return names

    def read_json(self, step: int, item: str) -> Dict:
        """One JSON item (``data``, ``config``, ``base`` or ``checksum``) of a checkpoint, without its arrays."""
        args = {item: ocp.args.JsonRestore()}
        try:
            value = self._mngr.restore(step, args=ocp.args.Composite(**args))[item]
        except Exception as e:  # noqa: BLE001 - as in restore
            raise _unreadable(os.path.join(self.directory, str(step), item), e) from e
        if not isinstance(value, dict):
            raise CheckpointError(f"{os.path.join(self.directory, str(step), item)}: checkpoint item is not a "
                                  f"JSON object (got {type(value).__name__})")
        return value

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves (and the deletions they cause) and releases the manager."""
        self._mngr.close()
        if self._main:
            self._purge_deleted()


class Restored(NamedTuple):
    """What :meth:`Checkpoints.restore_newest` found.

    ``skipped``: ``(step, why, moved_to)`` of each newer checkpoint that did not restore.
    """

    step: int
    state: Any
    data: Dict
    config: Dict
    base: Dict
    skipped: List[Tuple[int, str, str]]


def remove_tree(path: str) -> None:
    """Deletes a folder and what it holds (a failure leaves the rest for the next purge)."""
    shutil.rmtree(path, ignore_errors=True)


def _as_u32(x):
    """The bits of each element as uint32 (``[n]``); floats of 2 bytes are widened, bools become 0/1."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _bit_sums(leaves):
    sums = []
    for x in leaves:
        bits = _as_u32(x)  # [n]
        weights = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)]))
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)  # [leaves, 2]


def state_checksums(state) -> Dict[str, List[int]]:
    """``{leaf path: [sum of its elements' bits, position-weighted sum]}``, both modulo 2**32.

    Integer sums do not depend on the order of the additions, so the values
    are the same for any sharding or device count; one flipped bit changes
    the first, moved elements the second.

    >>> state_checksums({"a": jnp.array([1.0, 2.0], jnp.float32)})
    {"['a']": [2139095040, 4286578688]}
    """
    flat = jax.tree_util.tree_leaves_with_path(state)
    leaves = [x for _, x in flat]
    mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    sums = jax.jit(_bit_sums, out_shardings=NamedSharding(mesh, PartitionSpec()) if mesh else None)(list(leaves))
    sums = np.asarray(sums.addressable_data(0))
    return {jax.tree_util.keystr(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (so all of them take the same branch)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


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
                 base: Mapping[str, Any], *, allow_base_change: bool = False, allow_optim_change: bool = False,
                 where: str = "") -> Dict[str, Tuple[Any, Any]]:
    """Raises :class:`ResumeError` if a run may not continue from a checkpoint.

    Refused: any config change outside :data:`RESUMABLE_CHANGES` (they change
    the math: model dtype, method, data, optimizer, steps, seed), named with
    both values; and a base model whose content hash changed, unless
    ``allow_base_change``. ``allow_optim_change`` accepts changed ``optim.*``
    hyperparameters (e.g. a lower ``optim.lr`` after a non-finite loss),
    except turning ``optim.grad_clip`` on or off, which changes the optimizer
    state's structure.

    Returns the accepted ``optim.*`` changes, ``{key: (saved, current)}``.
    """
    changes = changed_fields(saved_config, config)
    optim = {k: v for k, v in changes.items() if k.startswith("optim.")}
    if allow_optim_change:
        toggled = optim.get("optim.grad_clip", (0, 0))
        if (toggled[0] is None) != (toggled[1] is None):
            raise ResumeError(f"cannot resume from {where}: optim.grad_clip: {toggled[0]!r} -> {toggled[1]!r} "
                              "turns clipping on or off, which changes the optimizer state; keep it "
                              f"{'off' if toggled[0] is None else 'on'} (any value)")
        changes = {k: v for k, v in changes.items() if k not in optim}
    math = {k: v for k, v in changes.items()
            if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)}
    if math:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in math.items())
        hint = (" To continue from this checkpoint with other optimizer hyperparameters, pass "
                "--allow-optim-change (train(..., allow_optim_change=True))." if set(math) <= set(optim) else "")
        raise ResumeError(
            f"cannot resume from {where}: the config differs in fields that change training: {lines}. "
            f"Use the same values, or a new train.output_dir to start a fresh run.{hint}")
    if saved_base.get("sha256") != base.get("sha256") and not allow_base_change:
        raise ResumeError(
            f"cannot resume from {where}: the base model changed (checkpoint: {saved_base.get('path')} "
            f"sha256 {str(saved_base.get('sha256'))[:12]}..., now: {base.get('path')} sha256 "
            f"{str(base.get('sha256'))[:12]}...). Point model.source at the original weights, or pass "
            "allow_base_change=True (--allow-base-change) to continue on the new ones.")
    return optim if allow_optim_change else {}
