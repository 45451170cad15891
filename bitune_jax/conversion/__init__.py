"""Model importers: HF safetensors directories and GGUF files.

:func:`load_model` takes an HF folder (as ``save_pretrained`` writes it) or a
``.gguf`` file (e.g. ``assets.smollm2_gguf_path()``) and returns the base
parameters, their :class:`ModelConfig` and the tokenizer. Here a tiny random
Llama written by ``transformers``:

    >>> import tempfile, transformers
    >>> folder = tempfile.mkdtemp()
    >>> transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    >>> model = load_model(folder)
    >>> model.cfg.family, model.cfg.num_layers, model.params["embed"].shape
    ('llama', 2, (64, 32))
    >>> model.tokenizer is None  # the folder has no tokenizer files; token ids still work
    True
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from bitune_jax.conversion.common import PICKLE_SUFFIXES, ModelFileError
from bitune_jax.model.config import ModelConfig
from bitune_jax.conversion.families import UnsupportedModelError

__all__ = ["LoadedModel", "load_model", "load_model_config", "load_tokenizer", "ModelFileError",
           "UnsupportedModelError"]


@dataclasses.dataclass
class LoadedModel:
    """Base parameters, their architecture and the tokenizer of a checkpoint."""

    params: Any
    cfg: ModelConfig
    tokenizer: Any
    source: str


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(src: str):
    """The tokenizer stored with a model (HF directory or GGUF file), loaded offline.

    Returns None for an HF directory without tokenizer files (token-id inputs still work).
    """
    from transformers import AutoTokenizer

    if os.path.isdir(src) and not any(os.path.isfile(os.path.join(src, f)) for f in _TOKENIZER_FILES):
        return None
    if src.endswith(".gguf"):
        from bitune_jax.conversion.gguf import gguf_tokenizer

        return gguf_tokenizer(src)  # converted once per file, then read from a cache
    return AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)


def load_model_config(src: str, dtype: str = "float32") -> ModelConfig:
    """The architecture of a model source, read without its weights.

    ``src`` is what :func:`load_model` takes. Of an HF folder only
    ``config.json`` is read, so a folder holding nothing else describes a
    model too (``configs/models/`` ships Gemma-2B and Llama-3-8B this way, for
    ``bitune-jax compile``); of a ``.gguf`` file only the metadata.

    >>> import json, os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "config.json"), "w") as f:
    ...     json.dump({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, f)
    >>> cfg = load_model_config(folder, dtype="bfloat16")
    >>> cfg.family, cfg.num_layers, cfg.head_dim, cfg.dtype
    ('llama', 2, 8, 'bfloat16')
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; allowed: float32, bfloat16")
    from bitune_jax.conversion.families import config_from_hf

    if src.endswith(".gguf"):
        from bitune_jax.conversion.gguf import _open, gguf_hf_config

        return config_from_hf(gguf_hf_config(_open(src), src), source=src).replace(dtype=dtype)
    if os.path.isdir(src):
        from bitune_jax.conversion.hf import read_hf_config

        return config_from_hf(read_hf_config(src), source=os.path.join(src, "config.json")).replace(dtype=dtype)
    raise ModelFileError(f"model source {src!r} is neither a directory with a config.json nor a .gguf file")


def load_model(src: str, dtype: str = "float32", with_tokenizer: bool = True) -> LoadedModel:
    """Loads a model from an HF safetensors directory or a ``.gguf`` file.

    Raises ``ModelFileError`` (missing/malformed files, shape mismatches, named)
    or ``UnsupportedModelError`` (unknown architecture).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; allowed: float32, bfloat16")
    if not os.path.exists(src):
        raise ModelFileError(f"model source {src!r} does not exist (expected an HF directory or a .gguf file)")
    if src.endswith(".gguf"):
        from bitune_jax.conversion.gguf import load_gguf

        params, cfg = load_gguf(src, dtype=dtype)
    elif os.path.isdir(src):
        from bitune_jax.conversion.hf import load_hf

        params, cfg = load_hf(src, dtype=dtype)
    elif src.endswith(PICKLE_SUFFIXES):
        raise ModelFileError(f"{src}: a pickled checkpoint; pickles are never loaded (they can run code). Convert "
                             "it to safetensors (save_pretrained(..., safe_serialization=True)) and pass the folder")
    else:
        raise ModelFileError(f"model source {src!r} is neither a directory nor a .gguf file")
    tok = load_tokenizer(src) if with_tokenizer else None
    return LoadedModel(params=params, cfg=cfg, tokenizer=tok, source=src)
