"""Model importers: HF safetensors directories and GGUF files.

    >>> from bitune_jax.conversion import load_model          # doctest: +SKIP
    >>> model = load_model("path/to/SmolLM2.gguf")         # doctest: +SKIP
    >>> model.params, model.cfg, model.tokenizer           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from bitune_jax.conversion.common import ModelFileError
from bitune_jax.model.config import ModelConfig
from bitune_jax.conversion.families import UnsupportedModelError

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "ModelFileError", "UnsupportedModelError"]


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
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(src)), gguf_file=os.path.basename(src),
                                             local_files_only=True, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)


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
    else:
        raise ModelFileError(f"model source {src!r} is neither a directory nor a .gguf file")
    tok = load_tokenizer(src) if with_tokenizer else None
    return LoadedModel(params=params, cfg=cfg, tokenizer=tok, source=src)
