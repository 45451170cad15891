"""Import Hugging Face safetensors checkpoints without PyTorch.

Reads ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``, then assembles our parameter tree by walking
the family's weight map (``bitune_jax.conversion.families``). Pickled ``.bin``
checkpoints are refused: they can execute code when loaded.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import numpy as np
from safetensors import SafetensorError, safe_open

from bitune_jax.conversion.common import PICKLE_SUFFIXES, assemble, ModelFileError
from bitune_jax.conversion import families


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelFileError(f"{model_dir}: missing config.json (expected an HF model directory)")
    return _read_json(path)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _safe_open(path: str):
    """``safe_open`` whose errors (a truncated file, a file that is not safetensors) name the file."""
    try:
        return safe_open(path, framework="np")
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _weight_files(model_dir: str) -> Dict[str, str]:
    """Checkpoint key -> safetensors file holding it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no 'weight_map' object")
        out = {}
        for key, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise ModelFileError(f"{index}: shard {fname!r} (holding {key!r}) is missing from {model_dir}")
            out[key] = path
        return out
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return {k: single for k in f.keys()}
    pickled = [n for n in os.listdir(model_dir) if n.endswith(PICKLE_SUFFIXES)]
    hint = f" (found pickled {pickled}; convert them to safetensors, pickles are never loaded)" if pickled else ""
    raise ModelFileError(f"{model_dir}: missing model.safetensors or model.safetensors.index.json{hint}")


class _SafetensorsReader:
    def __init__(self, files: Dict[str, str]):
        self.files = files
        self._handles = {}

    def has(self, key):
        return key in self.files

    def get(self, key) -> np.ndarray:
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = _safe_open(path)
        try:
            return self._handles[path].get_tensor(key)
        except TypeError:  # bfloat16 is not a numpy dtype: go through flax/jax arrays
            with safe_open(path, framework="flax") as f:
                return np.asarray(f.get_tensor(key))
        except SafetensorError as e:
            raise ModelFileError(f"{path}: tensor {key!r} cannot be read, the file is corrupt ({e})") from None


def load_hf(model_dir: str, dtype: str = "float32"):
    """Loads an HF safetensors model directory.

    Returns ``(params, cfg)``; parameters are cast to ``dtype``
    ("float32" or "bfloat16") and ``cfg.dtype`` is set accordingly.
    """
    hf = read_hf_config(model_dir)
    cfg = families.config_from_hf(hf, source=os.path.join(model_dir, "config.json")).replace(dtype=dtype)
    fam = families.family_of_config(cfg)
    reader = _SafetensorsReader(_weight_files(model_dir))
    specs = families.resolve_hf_layout(fam, fam.weight_map(cfg), reader.has)
    params = assemble(cfg, specs, reader, scheme="hf", source=model_dir)
    return params, cfg
