"""Export and import adapters in the PEFT layout, so the PyTorch world can load them.

An exported Bitune adapter directory looks like::

    DIR/bitune.json                       variant, theta_init, format version, base model
    DIR/causal/adapter_config.json        PEFT config (LORA, LORA + use_dora, or IA3)
    DIR/causal/adapter_model.safetensors  PEFT tensor names, HF module paths
    DIR/bidirectional/...                 the second set, when the variant has one
    DIR/mixing.safetensors                theta_k [layers], theta_v [layers], theta_init [1]
                                          (float32), when the variant mixes

Each set folder is an ordinary PEFT adapter: ``peft.PeftModel.from_pretrained(
model, "DIR/causal")`` loads it. Tensor names are PEFT's, built from the model
family's HF module paths (``families.family_of_config(cfg).hf_modules`` and
``hf_layer_prefix``):

* LoRA: ``base_model.model.<layer prefix><module>.lora_A.weight`` ``[r, in]``
  (our ``lora_a[l].T``) and ``...lora_B.weight`` ``[out, r]`` (``lora_b[l].T``);
* DoRA: the same plus ``...lora_magnitude_vector`` ``[out]``;
* IA3: ``...ia3_l``, ``[out, 1]`` for attention projections and ``[1, in]``
  for feed-forward output projections (``down_proj``).

Every write goes into a temporary directory next to the target that is
renamed into place at the end, so a failed export leaves nothing behind.
:func:`export_run_adapters` exports the adapters of a training run's checkpoint.

:func:`import_adapters` reads the layout back (bitwise), and also accepts a
plain PEFT LoRA/DoRA/IA3 folder (``adapter_config.json`` at top level) as a
``lora``-variant adapter. Every set folder, plain or inside a Bitune
directory, may be in any form PEFT writes, matched with PEFT's own rules
(:mod:`bitune_jax.conversion.peft_rules`):

* ``target_modules``: short names (``q_proj``), suffixes or full module paths
  (``model.layers.1.self_attn.o_proj``), a regex string (full match),
  ``"all-linear"`` or null (PEFT's default for the model type);
  ``layers_to_transform``/``layers_pattern`` and ``exclude_modules``;
* ``rank_pattern``/``alpha_pattern``, ``use_rslora``, ``use_dora``,
  ``lora_dropout``, ``fan_in_fan_out`` (PEFT resets it on ``nn.Linear``; the
  tensors keep ``nn.Linear``'s layout); IA3 with ``feedforward_modules``.

Our sets are stacked over layers, so what a folder adapts in some layers or
projections only is completed with updates that change nothing: zero LoRA A
and B, IA3 scales of one, DoRA magnitudes equal to the base kernels' column
norms (hence DoRA needs ``base_params`` then; ``load_with_adapters`` passes
them). The sets of one directory share one ``PeftConfig`` (the union of their
targets); when ranks or scalings differ between modules, A and B are
zero-padded to the largest rank and each module's scaling is multiplied into
its B under a runtime scaling of one. Anything PEFT would apply that this
library cannot (``modules_to_save``, adapters on embeddings or ``lm_head``,
a target matching no projection, tensors of modules the config does not
adapt, IA3 input scaling of other than ``down_proj``, base-rewriting
initialisations such as PiSSA) is an :class:`AdapterFileError` naming the file
and the module.

Example:

    >>> import jax, tempfile, os
    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax import bitune
    >>> cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16,
    ...                   intermediate_size=32, num_layers=2, num_heads=2,
    ...                   num_kv_heads=1, head_dim=8)
    >>> method = bitune.MethodConfig(variant="bitune")
    >>> tr = bitune.init_trainable(jax.random.PRNGKey(0), cfg, method)
    >>> d = os.path.join(tempfile.mkdtemp(), "adapters")
    >>> _ = export_adapters(d, tr, cfg, method, "my-base-model")
    >>> sorted(os.listdir(d))
    ['bidirectional', 'bitune.json', 'causal', 'mixing.safetensors']
    >>> tr2, method2 = import_adapters(d, cfg)
    >>> method2 == method
    True
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from bitune_jax import bitune
from bitune_jax.model import peft as peft_lib
from bitune_jax.conversion import families, peft_rules
from bitune_jax.fileio import make_temp_dir
from bitune_jax.model.config import ModelConfig

FORMAT = "bitune-jax-adapters"
FORMAT_VERSION = 1
BITUNE_JSON = "bitune.json"
MIXING_FILE = "mixing.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Our set name -> folder name.
SET_DIRS = {"causal": "causal", "bidir": "bidirectional"}
_PEFT_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, malformed or does not fit the model."""


# --------------------------------------------------------------------------- naming
def _module_path(model_cfg: ModelConfig, name: str, layer: int) -> str:
    """Full HF module path of projection ``name`` in ``layer`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
    fam = families.family_of_config(model_cfg)
    return fam.hf_layer_prefix.format(i=layer) + fam.hf_modules[name]


def _leaf_suffixes(method: str) -> Dict[str, str]:
    """Our leaf name -> PEFT tensor-name suffix after the module path."""
    if method == "ia3":
        return {"scale": ".ia3_l"}
    out = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}
    if method == "dora":
        out["magnitude"] = ".lora_magnitude_vector"
    return out


def _expected_shapes(model_cfg: ModelConfig, peft_cfg: peft_lib.PeftConfig) -> Dict[str, Dict[str, tuple]]:
    """Shapes of one adapter set in our layout: ``{proj: {leaf: (layers, ...)}}``."""
    L = model_cfg.num_layers
    out = {}
    for name in peft_cfg.target_names(model_cfg):
        fi, fo = model_cfg.projection_shape(name)
        if peft_cfg.method == "ia3":
            out[name] = {"scale": (L, fi if name in peft_lib.IA3_FEEDFORWARD else fo)}
            continue
        out[name] = {"lora_a": (L, fi, peft_cfg.rank), "lora_b": (L, peft_cfg.rank, fo)}
        if peft_cfg.method == "dora":
            out[name]["magnitude"] = (L, fo)
    return out


def _to_peft(leaf: str, name: str, arr: np.ndarray) -> np.ndarray:
    """One layer's array in our layout -> PEFT's tensor."""
    if leaf in ("lora_a", "lora_b"):
        return np.ascontiguousarray(arr.T)
    if leaf == "scale":
        return arr.reshape(1, -1) if name in peft_lib.IA3_FEEDFORWARD else arr.reshape(-1, 1)
    return np.ascontiguousarray(arr)


def _target_module_names(model_cfg: ModelConfig, targets) -> List[str]:
    """``target_modules`` for adapter_config.json: the last path component when unambiguous."""
    fam = families.family_of_config(model_cfg)
    short = [fam.hf_modules[t].split(".")[-1] for t in targets]
    all_short = [fam.hf_modules[p].split(".")[-1] for p in model_cfg.projections]
    if len(set(all_short)) == len(all_short):
        return short
    return [fam.hf_modules[t] for t in targets]


# --------------------------------------------------------------------------- atomic writes
def _fsync_tree(root: str):
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _replaceable(path: str) -> bool:
    """An existing ``path`` we may replace: an empty directory or an earlier export."""
    if not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return not entries or BITUNE_JSON in entries


def _check_out_dir(out_dir: str) -> None:
    """Raises unless ``out_dir`` can become an export: absent, empty or an earlier export, in a writable place."""
    from bitune_jax.fileio import check_writable

    if os.path.lexists(out_dir) and not _replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not an adapter export (no {BITUNE_JSON}); "
                              "refusing to replace it")
    check_writable(out_dir, folder=True)


@contextlib.contextmanager
def _atomic_dir(out_dir: str):
    """Yields a temporary directory that replaces ``out_dir`` when the block succeeds."""
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, f".{os.path.basename(out_dir)}.tmp-")  # the umask's mode, not mkdtemp's 0o700
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_file(tensors, filename: str, metadata=None) -> None:
    """``safetensors.numpy.save_file``, but the file gets the umask's permissions like every other output.

    (safetensors creates it readable by its owner only, 0o600.)
    """
    with open(filename, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- export
def _check_set(adapters, model_cfg: ModelConfig, peft_cfg, where: str):
    if not isinstance(adapters, dict):
        raise ValueError(f"{where}: expected a dict of projections, got {type(adapters).__name__}")
    expected = _expected_shapes(model_cfg, peft_cfg)
    if set(adapters) != set(expected):
        raise ValueError(f"{where}: projections {sorted(adapters)} do not match the adapter config's "
                         f"targets {sorted(expected)}")
    for name, leaves in expected.items():
        got = adapters[name]
        if not isinstance(got, dict) or set(got) != set(leaves):
            raise ValueError(f"{where}/{name}: leaves {sorted(got) if isinstance(got, dict) else got!r}, "
                             f"expected {sorted(leaves)} for {peft_cfg.method}")
        for leaf, shape in leaves.items():
            if tuple(got[leaf].shape) != shape:
                raise ValueError(f"{where}/{name}/{leaf}: shape {tuple(got[leaf].shape)}, expected {shape}")


def _adapter_config(model_cfg: ModelConfig, peft_cfg: peft_lib.PeftConfig, base_model_name_or_path: str) -> dict:
    targets = peft_cfg.target_names(model_cfg)
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "revision": None,
        "target_modules": _target_module_names(model_cfg, targets),
    }
    if peft_cfg.method == "ia3":
        ff = [t for t in targets if t in peft_lib.IA3_FEEDFORWARD]
        return {**common, "peft_type": "IA3", "feedforward_modules": _target_module_names(model_cfg, ff),
                "init_ia3_weights": True}
    alpha = peft_cfg.alpha
    return {**common, "peft_type": "LORA", "r": peft_cfg.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": peft_cfg.dropout, "bias": "none", "use_dora": peft_cfg.method == "dora",
            "use_rslora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


def _write_set(folder: str, adapters, model_cfg: ModelConfig, peft_cfg, base_model_name_or_path: str):
    os.makedirs(folder)
    tensors = {}
    for name, leaves in adapters.items():
        for leaf, suffix in _leaf_suffixes(peft_cfg.method).items():
            arr = np.asarray(leaves[leaf])
            for l in range(model_cfg.num_layers):
                tensors[_PEFT_PREFIX + _module_path(model_cfg, name, l) + suffix] = _to_peft(leaf, name, arr[l])
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    _write_json(os.path.join(folder, ADAPTER_CONFIG), _adapter_config(model_cfg, peft_cfg, base_model_name_or_path))


def export_adapters(out_dir: str, trainable, model_cfg: ModelConfig, method_cfg: bitune.MethodConfig,
                    base_model_name_or_path: str) -> str:
    """Writes ``trainable`` (see :mod:`bitune_jax.bitune`) to ``out_dir`` in the PEFT layout.

    Only the sets the variant has are written (``causal/``, ``bidirectional/``),
    plus ``mixing.safetensors`` when it mixes and ``bitune.json``. The write is
    atomic; an existing ``out_dir`` is replaced only if it is empty or an
    earlier export. Returns the absolute path.
    """
    method_cfg.peft.target_names(model_cfg)  # validates the family before touching the disk
    families.family_of_config(model_cfg)
    expected_keys = set(method_cfg.adapter_sets) | ({"mix"} if method_cfg.mixed else set())
    if set(trainable) != expected_keys:
        raise ValueError(f"trainable has {sorted(trainable)}; variant {method_cfg.variant!r} "
                         f"needs exactly {sorted(expected_keys)}")
    for name in method_cfg.adapter_sets:
        _check_set(trainable[name], model_cfg, method_cfg.peft, f"trainable[{name!r}]")
    if method_cfg.mixed:
        mix = trainable["mix"]
        if set(mix) != {"theta_k", "theta_v"}:
            raise ValueError(f"trainable['mix'] has {sorted(mix)}; expected ['theta_k', 'theta_v']")
        for k in ("theta_k", "theta_v"):
            if tuple(mix[k].shape) != (model_cfg.num_layers,):
                raise ValueError(f"trainable['mix'][{k!r}] has shape {tuple(mix[k].shape)}, "
                                 f"expected ({model_cfg.num_layers},)")
    out_dir = os.path.abspath(out_dir)
    with _atomic_dir(out_dir) as tmp:
        for name in method_cfg.adapter_sets:
            _write_set(os.path.join(tmp, SET_DIRS[name]), trainable[name], model_cfg, method_cfg.peft,
                       base_model_name_or_path)
        if method_cfg.mixed:
            save_file({"theta_k": np.asarray(trainable["mix"]["theta_k"], np.float32),
                       "theta_v": np.asarray(trainable["mix"]["theta_v"], np.float32),
                       "theta_init": np.asarray([method_cfg.theta_init], np.float32)},
                      os.path.join(tmp, MIXING_FILE), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, BITUNE_JSON), {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "variant": method_cfg.variant,
            "theta_init": method_cfg.theta_init,
            "peft_method": method_cfg.peft.method,
            "adapter_sets": {name: SET_DIRS[name] for name in method_cfg.adapter_sets},
            "mixing": MIXING_FILE if method_cfg.mixed else None,
            "base_model_name_or_path": base_model_name_or_path,
            "model_family": model_cfg.family,
            "num_layers": model_cfg.num_layers,
        })
    return out_dir


def export_run_adapters(run_dir: str, out_dir: str, step: Optional[int] = None, model=None) -> int:
    """Writes the adapters of a training run's checkpoint (default: the latest) in PEFT layout; returns the step.

    ``run_dir`` is the run's ``train.output_dir``. The config saved with the
    checkpoint says which model, variant and optimizer built the state, so
    the checkpoint restores into exactly that structure. ``model``: that
    config's base model, already loaded (else it is loaded here).
    """
    # The checkpoint machinery (orbax) is only needed here, not to read or write adapter folders.
    from bitune_jax.config import Config
    from bitune_jax.conversion import assets, load_model
    from bitune_jax.training import checkpoint
    from bitune_jax.training import step as ts

    _check_out_dir(os.path.abspath(out_dir))  # before the checkpoint is restored
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ folder (is this a train.output_dir?)")
    # Read only: the run may still be training (its in-flight save must not be touched), and a
    # damaged newest checkpoint is skipped (with a warning), never moved, as resume would skip it.
    ckpt = checkpoint.Checkpoints(ckpt_dir, async_save=False, read_only=True)
    try:
        steps = sorted(ckpt.all_steps())
        if not steps or (step is not None and step not in steps):
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint at step {step} (available: {steps})")
        newest = steps[-1] if step is None else step
        cfg = Config.from_dict(ckpt.read_json(newest, "config"), source=os.path.join(ckpt_dir, str(newest), "config"))
        if model is None:
            model = load_model(assets.resolve_model_source(cfg.model.source), dtype=cfg.model.dtype,
                               with_tokenizer=False)
        optimizer = ts.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
        like = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(0), model.cfg, cfg.method, model.params),
                             optimizer)
        if step is None:
            restored = ckpt.restore_newest(like)
            step, state = restored.step, restored.state
            for skipped, why, _ in restored.skipped:
                print(f"warning: skipped checkpoint {skipped}: {why}", file=sys.stderr)
        else:
            state = ckpt.restore(step, like)[0]
    finally:
        ckpt.close()
    export_adapters(out_dir, jax.device_get(state.trainable), model.cfg, cfg.method, cfg.model.source)
    return step


# --------------------------------------------------------------------------- import
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: file is missing")
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return obj


# Modules PEFT can adapt that this library cannot (the models here have no other linear layers).
_OTHER_MODULES = ("model.embed_tokens", "lm_head")
# Config keys that change what the adapters compute in ways this library does not implement.
_MUST_BE_EMPTY = ("layer_replication", "trainable_token_indices", "target_parameters", "use_qalora", "lora_bias",
                  "use_bdlora", "alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config",
                  "arrow_config")
# init_lora_weights values whose adapters are relative to base weights PEFT rewrites when it loads them.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _method_of(cfg: dict, where: str) -> str:
    """``lora``, ``dora`` or ``ia3`` for a PEFT config; errors for what this library cannot apply."""
    ptype = cfg.get("peft_type")
    if ptype not in ("LORA", "IA3"):
        raise AdapterFileError(f"{where}: peft_type {ptype!r} is not supported; allowed: 'LORA', 'IA3'")
    if cfg.get("modules_to_save"):
        raise AdapterFileError(f"{where}: modules_to_save={cfg['modules_to_save']!r}: PEFT saves whole trained "
                               "copies of these modules; this library adapts only the layers' projections")
    if ptype == "IA3":
        return "ia3"
    for key in _MUST_BE_EMPTY:
        if cfg.get(key):
            raise AdapterFileError(f"{where}: {key}={cfg[key]!r} is not supported")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterFileError(f"{where}: bias={bias!r} is not supported; allowed: 'none'")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterFileError(f"{where}: init_lora_weights={init!r}: these adapters apply to base weights that "
                               "PEFT rewrites at load time; convert them to plain LoRA first (peft's "
                               "path_initial_model_for_weight_conversion)")
    return "dora" if cfg.get("use_dora") else "lora"


@dataclasses.dataclass
class _PeftSet:
    """One PEFT folder as stored: how each adapted (projection, layer) is adapted and its tensors (our layout)."""

    where: str  # its adapter_config.json
    method: str
    dropout: float
    modules: Dict[Tuple[str, int], peft_rules.Adapted]
    # lora_a [in, r], lora_b [r, out], magnitude [out], scale [in or out]
    tensors: Dict[Tuple[str, int], Dict[str, np.ndarray]]
    dtype: np.dtype


def _layer_shape(leaf: str, name: str, rank: int, feedforward: bool, model_cfg: ModelConfig) -> tuple:
    """Shape of one layer's PEFT tensor ``leaf`` for projection ``name``."""
    fi, fo = model_cfg.projection_shape(name)
    return {"lora_a": (rank, fi), "lora_b": (fo, rank), "magnitude": (fo,),
            "scale": (1, fi) if feedforward else (fo, 1)}[leaf]


def _read_peft_set(folder: str, model_cfg: ModelConfig) -> _PeftSet:
    """Reads one PEFT adapter folder in any form PEFT writes (see the module docstring)."""
    cfg_path = os.path.join(folder, ADAPTER_CONFIG)
    cfg = _read_json(cfg_path)
    method = _method_of(cfg, cfg_path)
    names = {_module_path(model_cfg, p, l): (p, l) for l in range(model_cfg.num_layers) for p in model_cfg.projections}
    try:
        adapted = peft_rules.adapted_modules(cfg, list(names), _OTHER_MODULES,
                                             families.FAMILY_MODEL_TYPE[model_cfg.family])
    except peft_rules.PeftConfigError as e:
        raise AdapterFileError(f"{cfg_path}: {e}") from None
    for name, how in adapted.items():
        proj = names[name][0]
        if method == "ia3" and how.feedforward != (proj in peft_lib.IA3_FEEDFORWARD):
            raise AdapterFileError(
                f"{cfg_path}: feedforward_modules make IA3 scale the {'input' if how.feedforward else 'output'} of "
                f"{name!r}; this library scales the input of {list(peft_lib.IA3_FEEDFORWARD)} and the output of "
                "the other projections")
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        bins = [n for n in ("adapter_model.bin",) if os.path.isfile(os.path.join(folder, n))]
        hint = f" (found {bins}: pickled weights are never loaded; re-save with safetensors)" if bins else ""
        raise AdapterFileError(f"{weights}: file is missing{hint}")
    suffixes = _leaf_suffixes(method)
    modules, tensors, dtype = {}, {}, None
    try:
        handle = safe_open(weights, framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError for truncated or foreign files
        raise AdapterFileError(f"{weights}: not a readable safetensors file (truncated or corrupt?): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    with handle as f:
        stored = set(f.keys())
        used = set()
        for name, how in adapted.items():
            proj, layer = names[name]
            modules[(proj, layer)] = how
            tensors[(proj, layer)] = {}
            for leaf, suffix in suffixes.items():
                key = _PEFT_PREFIX + name + suffix
                if key not in stored and key + ".weight" in stored:  # older peft: lora_magnitude_vector.weight
                    key += ".weight"
                if key not in stored:
                    raise AdapterFileError(f"{weights}: tensor {key!r} is missing")
                arr = f.get_tensor(key)
                want = _layer_shape(leaf, proj, how.rank, how.feedforward, model_cfg)
                if tuple(arr.shape) != want:
                    raise AdapterFileError(f"{weights}: tensor {key!r} has shape {tuple(arr.shape)}, expected "
                                           f"{want} for {proj}/{leaf} of this model and adapter config")
                used.add(key)
                dtype = arr.dtype if dtype is None else dtype
                tensors[(proj, layer)][leaf] = arr.T if leaf in ("lora_a", "lora_b") else arr.reshape(-1)
    unknown = sorted(stored - used)
    if unknown:
        module = unknown[0][len(_PEFT_PREFIX):] if unknown[0].startswith(_PEFT_PREFIX) else unknown[0]
        module = module.rsplit(".", 2 if module.endswith(".weight") else 1)[0]
        why = ("is not adapted by adapter_config.json (see its target_modules, layers_to_transform, "
               "exclude_modules)" if module in names else "is not a projection this library adapts")
        raise AdapterFileError(f"{weights}: unknown tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                               f"module {module!r} {why}")
    return _PeftSet(cfg_path, method, float(cfg.get("lora_dropout") or 0.0), modules, tensors,
                    np.dtype(np.float32) if dtype is None else dtype)


def _stack_sets(sets: List[_PeftSet], model_cfg: ModelConfig, base_params=None) -> Tuple[List[dict],
                                                                                          peft_lib.PeftConfig]:
    """Adapter sets in our layout (stacked over layers) sharing one PeftConfig.

    Every set gets every projection any set adapts, in every layer: what a
    set leaves alone gets an update that changes nothing (zero LoRA A and B,
    IA3 scale one, DoRA magnitude equal to the base kernel's column norms,
    taken from ``base_params``). When ranks or scalings differ between
    modules, A and B are zero-padded to the largest rank and each module's
    scaling is multiplied into its B, under a runtime scaling of one.
    """
    method = sets[0].method
    for s in sets[1:]:
        if s.method != method:
            raise AdapterFileError(f"{s.where}: method {s.method}, but {sets[0].where} is {method}; the sets of "
                                   "one directory must use one PEFT method")
    adapted = {p for s in sets for p, _ in s.modules}
    targets = tuple(p for p in model_cfg.projections if p in adapted)
    L = model_cfg.num_layers
    if method == "ia3":
        default = tuple(p for p in model_cfg.projections if p in peft_lib.IA3_DEFAULT_TARGETS)
        peft_cfg = peft_lib.PeftConfig(method="ia3", targets=None if targets == default else targets)

        def layer(s, p, l):
            t = s.tensors.get((p, l))
            n = model_cfg.projection_shape(p)[0 if p in peft_lib.IA3_FEEDFORWARD else 1]
            return {"scale": t["scale"] if t else np.ones((n,), s.dtype)}
    else:
        shapes = {(m.rank, m.alpha) for s in sets for m in s.modules.values()}
        rank, alpha = next(iter(shapes))
        fold = len(shapes) > 1 or alpha <= 0
        if fold:
            rank = max(r for r, _ in shapes)
            alpha = float(rank)  # runtime scaling 1: each module's own scaling lives in its B
        peft_cfg = peft_lib.PeftConfig(method=method, rank=rank, alpha=alpha, dropout=sets[0].dropout,
                                       targets=None if targets == tuple(model_cfg.projections) else targets)
        norms = {}

        def magnitude(s, p, l):
            # A layer DoRA leaves alone: W * |W| / |W| (the runtime's own norm of W + 0 * B A).
            if base_params is None:
                missing = [l2 for l2 in range(L) if (p, l2) not in s.modules]
                raise AdapterFileError(
                    f"{s.where}: DoRA leaves {p} unadapted in layers {missing}; their magnitudes are the base "
                    "weights' column norms: pass base_params (load_with_adapters does)")
            if p not in norms:
                kernel = jnp.asarray(base_params["layers"][p]["kernel"]).astype(jnp.float32)  # [L, in, out]
                norms[p] = np.asarray(jnp.linalg.norm(kernel, axis=1))
            return norms[p][l].astype(s.dtype)

        def layer(s, p, l):
            t, m = s.tensors.get((p, l)), s.modules.get((p, l))
            fi, fo = model_cfg.projection_shape(p)
            if t is None:
                out = {"lora_a": np.zeros((fi, rank), s.dtype), "lora_b": np.zeros((rank, fo), s.dtype)}
                if method == "dora":
                    out["magnitude"] = magnitude(s, p, l)
                return out
            a, b = t["lora_a"], t["lora_b"]
            if fold:
                b = (b.astype(np.float64) * m.scaling).astype(b.dtype)
            if m.rank < rank:
                a = np.concatenate([a, np.zeros((fi, rank - m.rank), a.dtype)], axis=1)
                b = np.concatenate([b, np.zeros((rank - m.rank, fo), b.dtype)], axis=0)
            return dict(t, lora_a=a, lora_b=b)

    out = []
    for s in sets:
        per_layer = {p: [layer(s, p, l) for l in range(L)] for p in targets}
        out.append({p: {leaf: jnp.asarray(np.stack([d[leaf] for d in ds])) for leaf in ds[0]}
                    for p, ds in per_layer.items()})
    return out, peft_cfg


def _read_mixing(path: str, model_cfg: ModelConfig) -> Tuple[dict, Optional[float]]:
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: file is missing (the variant mixes keys/values)")
    with safe_open(path, framework="np") as f:
        keys = set(f.keys())
        unknown = sorted(keys - {"theta_k", "theta_v", "theta_init"})
        if unknown:
            raise AdapterFileError(f"{path}: unknown tensors {unknown}; allowed: theta_k, theta_v, theta_init")
        mix = {}
        for k in ("theta_k", "theta_v"):
            if k not in keys:
                raise AdapterFileError(f"{path}: tensor {k!r} is missing")
            a = f.get_tensor(k)
            if tuple(a.shape) != (model_cfg.num_layers,):
                raise AdapterFileError(f"{path}: tensor {k!r} has shape {tuple(a.shape)}, "
                                       f"expected ({model_cfg.num_layers},)")
            mix[k] = jnp.asarray(a)
        theta_init = float(f.get_tensor("theta_init").reshape(-1)[0]) if "theta_init" in keys else None
    return mix, theta_init


def import_adapters(path: str, model_cfg: ModelConfig, base_params=None) -> Tuple[dict, bitune.MethodConfig]:
    """Reads an exported directory (or a plain PEFT folder) -> ``(trainable, method_cfg)``.

    A plain PEFT folder (``adapter_config.json`` at its top) becomes
    ``{"causal": set}`` with variant ``lora``. A Bitune directory without
    ``bitune.json`` is read as ``bitune`` when it has both sets and the mixing
    file, and as ``lora`` when it has only ``causal/``. Each set folder may
    use any form PEFT writes (module docstring); ``base_params`` (the base
    model's parameters) is needed only by DoRA sets that leave some
    projection of some layer unadapted.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise AdapterFileError(f"{path}: adapter directory is missing")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, BITUNE_JSON)):
        (adapters,), peft_cfg = _stack_sets([_read_peft_set(path, model_cfg)], model_cfg, base_params)
        return {"causal": adapters}, bitune.MethodConfig(variant="lora", peft=peft_cfg)

    present = {name for name, d in SET_DIRS.items() if os.path.isdir(os.path.join(path, d))}
    has_mixing = os.path.isfile(os.path.join(path, MIXING_FILE))
    meta_path = os.path.join(path, BITUNE_JSON)
    theta_init = None
    if os.path.isfile(meta_path):
        meta = _read_json(meta_path)
        if meta.get("format", FORMAT) != FORMAT:
            raise AdapterFileError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if int(meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise AdapterFileError(f"{meta_path}: format_version {meta['format_version']} is newer than this "
                                   f"library's {FORMAT_VERSION}")
        variant = meta.get("variant")
        if variant not in bitune.VARIANTS:
            raise AdapterFileError(f"{meta_path}: variant {variant!r}; allowed: {bitune.VARIANTS}")
        if meta.get("num_layers") not in (None, model_cfg.num_layers):
            raise AdapterFileError(f"{meta_path}: exported for {meta['num_layers']} layers, the model has "
                                   f"{model_cfg.num_layers}")
        theta_init = meta.get("theta_init")
    elif present == {"causal", "bidir"} and has_mixing:
        variant = "bitune"
    elif present == {"causal"} and not has_mixing:
        variant = "lora"
    else:
        found = sorted(SET_DIRS[n] for n in present) + ([MIXING_FILE] if has_mixing else [])
        raise AdapterFileError(f"{path}: neither {BITUNE_JSON} nor {ADAPTER_CONFIG} is present "
                               f"(found {found}); not an adapter directory")

    probe = bitune.MethodConfig(variant=variant)
    for name in probe.adapter_sets:
        if name not in present:
            raise AdapterFileError(f"{os.path.join(path, SET_DIRS[name])}: folder is missing "
                                   f"(variant {variant!r} has adapter sets {list(probe.adapter_sets)})")
    extra = present - set(probe.adapter_sets)
    if extra:
        raise AdapterFileError(f"{path}: folders {sorted(SET_DIRS[n] for n in extra)} are not used by variant "
                               f"{variant!r}")
    if has_mixing and not probe.mixed:
        raise AdapterFileError(f"{os.path.join(path, MIXING_FILE)}: variant {variant!r} does not mix")

    sets, peft_cfg = _stack_sets([_read_peft_set(os.path.join(path, SET_DIRS[name]), model_cfg)
                                  for name in probe.adapter_sets], model_cfg, base_params)
    trainable = dict(zip(probe.adapter_sets, sets))
    if probe.mixed:
        trainable["mix"], file_theta_init = _read_mixing(os.path.join(path, MIXING_FILE), model_cfg)
        if theta_init is None:
            theta_init = file_theta_init
    kw = {} if theta_init is None else {"theta_init": float(theta_init)}
    return trainable, bitune.MethodConfig(variant=variant, peft=peft_cfg, **kw)


def load_adapters_for_scoring(path: str, model_cfg: ModelConfig, variant: Optional[str] = None, base_params=None):
    """Adapters to score or generate with: ``(trainable, method_cfg)``.

    With ``variant=None`` the variant is what the directory was exported as
    (``bitune.json``); without ``bitune.json`` it is ``bitune`` when both
    sets and the mixing coefficients are present, else ``lora`` (a plain PEFT
    folder). An explicit ``variant`` keeps only the sets it uses and fails
    clearly when one it needs is absent. ``base_params``: see :func:`import_adapters`.
    """
    trainable, method = import_adapters(path, model_cfg, base_params)
    if variant is None or variant == method.variant:
        return trainable, method
    new = dataclasses.replace(method, variant=variant)
    needed = list(new.adapter_sets) + (["mix"] if new.mixed else [])
    missing = [n for n in needed if n not in trainable]
    if missing:
        raise AdapterFileError(f"{path}: variant {variant!r} needs {needed}, but the adapters "
                               f"(exported as {method.variant!r}) lack {missing}")
    return {n: trainable[n] for n in needed}, new


def load_with_adapters(model_src: str, adapters: Optional[str] = None, variant: Optional[str] = None,
                       dtype: str = "float32"):
    """``(LoadedModel, trainable, method)`` for scoring, evaluation and generation.

    ``model_src`` is an HF directory, a ``.gguf`` file or a packaged model name
    (``smollm2``); without ``adapters`` the base model is used (``trainable``
    and ``method`` are None) and only ``variant`` None or "lora" is allowed.
    """
    from bitune_jax.conversion import assets
    from bitune_jax.conversion import load_model

    # Arguments are checked before the (slow) model load.
    if variant is not None and variant not in bitune.VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; allowed: {', '.join(bitune.VARIANTS)}")
    if adapters is None and variant not in (None, "lora"):
        raise ValueError(f"variant={variant!r} needs adapters (--adapters DIR)")
    if adapters is not None and not os.path.isdir(adapters):
        raise AdapterFileError(f"{adapters}: adapter directory is missing")
    model = load_model(assets.resolve_model_source(model_src), dtype=dtype)
    if adapters is None:
        return model, None, None
    trainable, method = load_adapters_for_scoring(adapters, model.cfg, variant=variant, base_params=model.params)
    return model, trainable, method
