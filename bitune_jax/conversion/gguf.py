"""Import GGUF files (llama.cpp format) without PyTorch.

Every tensor is dequantized to float32 numpy with ``gguf.quants.dequantize``
(F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants, ...), an HF-style config dict
is rebuilt from the GGUF metadata, and the parameter tree is assembled by the
same generic code as the safetensors importer, walking the family's weight map
(``bitune_jax.conversion.families``) with the ``gguf`` key of each ``WeightSpec``.
``load_gguf(path)`` returns ``(params, cfg)``; ``bitune_jax.conversion.load_model``
adds the tokenizer.

What differs between GGUF architectures lives in one table, ``GGUF_ARCHS``
(GGUF ``general.architecture`` -> :class:`GgufArch`); adding a family that the
model code supports means adding one entry there (and, if its metadata or
tensors need it, a config hook or a tensor fix-up in that entry).

The tokenizer stored in the file (:func:`gguf_tokenizer`) is converted by
``transformers`` once per file and then read from a cache keyed by the file's
sha256.

Layout notes:

* A GGUF tensor's dims are listed fastest-first (``[in, out]`` for a matrix);
  the reader's data and ``dequantize`` give the numpy (row-major) shape, which
  is the HF ``[out, in]`` layout. We reshape to ``reversed(tensor.shape)`` so
  this holds for every quantization type.
* llama.cpp's converter permutes the rows of the Q and K projections (weights
  and biases) of ``llama`` models for its interleaved RoPE; they are
  un-permuted here, per head, back to HF's rotate-half layout. ``qwen2`` GGUF
  files are not permuted. For 2 heads of 4 rows, llama.cpp stores each head's
  two rotation halves interleaved:

    >>> w = np.arange(8.0)[:, None]  # [out=8, in=1]: rows as llama.cpp wrote them
    >>> unpermute_rows(w, n_head=2)[:, 0].tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]

* Gemma GGUF files store norm weights as ``1 + w`` (the multiplier we keep);
  the weight map's ``gguf_transform`` reads them as they are. Gemma 3 files
  lack what llama.cpp hard-codes (every 6th layer global, local RoPE base
  10000, query scale 1/sqrt(head_dim)); ``_gemma3_hook`` fills it in unless
  the metadata says otherwise.
* llama-3 RoPE scaling is stored as a ``rope_freqs.weight`` tensor of
  per-frequency divisors; we recover the ``("llama3", ...)`` parameters that
  reproduce it exactly or refuse the file.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional

import numpy as np

from bitune_jax.conversion.common import assemble, ModelFileError
from bitune_jax.fileio import cache_dir, sha256_file
from bitune_jax.conversion import families
from bitune_jax.conversion.families import UnsupportedModelError

__all__ = ["load_gguf", "gguf_chat_template", "gguf_tokenizer", "gguf_hf_config", "GgufArch", "GGUF_ARCHS",
           "GgufTensorReader"]


# --------------------------------------------------------------------------- per-architecture table
@dataclasses.dataclass(frozen=True)
class GgufArch:
    """What is specific to one GGUF ``general.architecture``.

    ``model_type``: the HF ``model_type`` handed to ``families.config_from_hf``.
    ``permute_qk``: Q/K rows were permuted by llama.cpp's converter (llama).
    ``config_hook``: optional ``(meta, hf_dict) -> None`` adding family-specific
    keys to the HF-style config (``meta`` is a :class:`_Meta`).
    ``fix_tensor``: optional ``(key, array, hf_dict) -> array`` applied to every
    tensor read (e.g. undoing a storage convention).
    """

    model_type: str
    permute_qk: bool = False
    config_hook: Optional[Callable] = None
    fix_tensor: Optional[Callable] = None


def _gemma_hook(meta, hf: dict) -> None:
    """Gemma 1: GeGLU with the tanh GELU (norm weights are stored as ``1 + w``: see the weight map)."""
    hf["hidden_act"] = "gelu_pytorch_tanh"


def _gemma3_hook(meta, hf: dict) -> None:
    """Gemma 3: what llama.cpp hard-codes for the architecture unless the file says otherwise."""
    a = "gemma3."
    hf.pop("hidden_act", None)
    hf["hidden_activation"] = "gelu_pytorch_tanh"
    window = meta.get(a + "attention.sliding_window")
    hf["sliding_window"] = int(window) if window is not None else None
    pattern = meta.get(a + "attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per-layer flags, True on sliding-window layers
        hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # llama.cpp: every 6th layer is global
        hf["sliding_window_pattern"] = int(pattern) if pattern is not None else 6
    hf["rope_local_base_freq"] = _f32(meta.get(a + "rope.freq_base_swa", 10000.0))
    # Query scale: llama.cpp uses 1/sqrt(head_dim), except for Gemma-3-27B (62 layers),
    # 1/sqrt(hidden/heads) -- the query_pre_attn_scalar of the HF configs.
    scale = meta.get(a + "attention.scale")
    if scale:
        hf["query_pre_attn_scalar"] = 1.0 / float(scale) ** 2
    elif hf["num_hidden_layers"] == 62:
        hf["query_pre_attn_scalar"] = hf["hidden_size"] // hf["num_attention_heads"]
    else:
        hf["query_pre_attn_scalar"] = hf["head_dim"]
    softcap = meta.get(a + "final_logit_softcapping")
    if softcap:
        hf["final_logit_softcapping"] = _f32(softcap)


GGUF_ARCHS: Dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True),
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "gemma": GgufArch("gemma", permute_qk=False, config_hook=_gemma_hook),
    "gemma3": GgufArch("gemma3_text", permute_qk=False, config_hook=_gemma3_hook),
}


# --------------------------------------------------------------------------- metadata
class _Meta:
    """Typed access to GGUF key/value metadata."""

    def __init__(self, reader, source: str):
        self.fields = reader.fields
        self.source = source

    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def require(self, key: str):
        if key not in self.fields:
            raise ModelFileError(f"{self.source}: GGUF metadata key {key!r} is missing")
        return self.fields[key].contents()

    def array_len(self, key: str) -> Optional[int]:
        f = self.fields.get(key)
        return None if f is None else len(f.data)


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise ModelFileError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # bad magic, truncated file, ...
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')") from None
        # gguf's own message for a file cut short is a numpy reshape/view error.
        raise ModelFileError(f"{path}: truncated or corrupt GGUF file ({os.path.getsize(path)} bytes; its header "
                             f"or tensor data cannot be read: {type(e).__name__}: {e})") from None


def _arch_of(meta: _Meta) -> tuple:
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelFileError(f"{meta.source}: GGUF metadata has no 'general.architecture'")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{meta.source}: GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCHS)}")
    return arch, GGUF_ARCHS[arch]


def _llama3_from_rope_freqs(factors: np.ndarray, theta: float, head_dim: int, source: str):
    """Finds llama-3 scaling parameters that reproduce llama.cpp's ``rope_freqs`` divisors."""
    from bitune_jax.model.config import ModelConfig
    from bitune_jax.model.transformer import rope_inv_freq

    factors = np.asarray(factors, np.float32).reshape(-1)
    base = ModelConfig(family="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    if factors.shape != (head_dim // 2,):
        raise ModelFileError(f"{source}: rope_freqs.weight has shape {factors.shape}, expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return None
    plain = rope_inv_freq(base, theta)
    factor = float(factors.max())
    for old in (8192.0, 4096.0, 2048.0, 16384.0, 32768.0, 131072.0):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0):
                if high <= low:
                    continue
                sc = ("llama3", factor, low, high, old)
                got = plain / rope_inv_freq(base.replace(rope_scaling=sc), theta)
                if np.allclose(got, factors, rtol=1e-4, atol=1e-5):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": old}
    raise UnsupportedModelError(f"{source}: rope_freqs.weight holds per-frequency RoPE factors that match no "
                                f"llama-3 scaling with standard parameters; not supported")


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def gguf_hf_config(reader, source: str) -> dict:
    """An HF ``config.json``-style dict rebuilt from a GGUF file's metadata.

    ``reader`` is an open ``gguf.GGUFReader``.
    """
    meta = _Meta(reader, source)
    arch, spec = _arch_of(meta)
    a = arch + "."
    tensors = {t.name: t for t in reader.tensors}
    d = int(meta.require(a + "embedding_length"))
    heads = int(meta.require(a + "attention.head_count"))
    kv_heads = meta.get(a + "attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some files
        if len(set(kv_heads)) != 1:
            raise UnsupportedModelError(f"{source}: per-layer KV head counts {sorted(set(kv_heads))} are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(meta.get(a + "attention.key_length", d // heads))
    v_dim = int(meta.get(a + "attention.value_length", head_dim))
    if v_dim != head_dim:
        raise UnsupportedModelError(f"{source}: key length {head_dim} != value length {v_dim}; not supported")
    rope_dim = meta.get(a + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UnsupportedModelError(
            f"{source}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported for {arch}")
    # Vocabulary: the embedding's rows are authoritative (the token list may be shorter if padded).
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    else:
        vocab = meta.get(a + "vocab_size") or meta.array_len("tokenizer.ggml.tokens")
        if vocab is None:
            raise ModelFileError(f"{source}: cannot tell the vocabulary size (no token_embd.weight, no token list)")
    theta = _f32(meta.get(a + "rope.freq_base", 10000.0))
    hf = {
        "model_type": spec.model_type,
        "vocab_size": int(vocab),
        "hidden_size": d,
        "intermediate_size": int(meta.require(a + "feed_forward_length")),
        "num_hidden_layers": int(meta.require(a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rope_theta": theta,
        "rms_norm_eps": _f32(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta.get(a + "context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if any(n.startswith("blk.0.attn_output.bias") for n in tensors):
        hf["attention_bias"] = True
    if any(n.startswith("blk.0.ffn_down.bias") for n in tensors):
        hf["mlp_bias"] = True
    # RoPE scaling: metadata (linear, yarn, ...) or a llama-3 rope_freqs tensor.
    kind = meta.get(a + "rope.scaling.type")
    if kind not in (None, "none"):
        if kind == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": _f32(meta.require(a + "rope.scaling.factor"))}
        else:
            raise UnsupportedModelError(f"{source}: RoPE scaling type {kind!r} is not supported; allowed: linear, "
                                        f"llama3 (rope_freqs tensor)")
    if "rope_freqs.weight" in tensors:
        if "rope_scaling" in hf:
            raise UnsupportedModelError(f"{source}: both rope.scaling.type and rope_freqs.weight; not supported")
        rs = _llama3_from_rope_freqs(_dequantize(tensors["rope_freqs.weight"]), theta, head_dim, source)
        if rs is not None:
            hf["rope_scaling"] = rs
    if spec.config_hook is not None:
        spec.config_hook(meta, hf)
    return hf


# --------------------------------------------------------------------------- tensors
def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's per-head Q/K row permutation (on ``[out, in]`` weights or ``[out]`` biases)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufTensorReader:
    """``has(key)`` / ``get(key) -> float32 ndarray`` (HF ``[out, in]`` layout) over a GGUF file."""

    def __init__(self, reader, arch: GgufArch, hf: dict):
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = arch
        self.hf = hf

    def has(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> np.ndarray:
        w = _dequantize(self.tensors[key])
        if self.arch.permute_qk:
            if ".attn_q." in key:
                w = unpermute_rows(w, self.hf["num_attention_heads"])
            elif ".attn_k." in key:
                w = unpermute_rows(w, self.hf["num_key_value_heads"])
        if self.arch.fix_tensor is not None:
            w = self.arch.fix_tensor(key, w, self.hf)
        return w


# --------------------------------------------------------------------------- entry points
def load_gguf(path: str, dtype: str = "float32"):
    """Loads a ``.gguf`` file.

    Returns ``(params, cfg)``; every tensor is dequantized to float32 and the
    parameters are then cast to ``dtype`` ("float32" or "bfloat16");
    ``cfg.dtype`` is set accordingly. Raises ``ModelFileError`` (missing or
    malformed file, missing tensor or metadata, shape mismatch; named) or
    ``UnsupportedModelError`` (architecture or feature not implemented).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; allowed: float32, bfloat16")
    reader = _open(path)
    hf = gguf_hf_config(reader, path)
    _, arch = _arch_of(_Meta(reader, path))
    cfg = families.config_from_hf(hf, source=path).replace(dtype=dtype)
    fam = families.family_of_config(cfg)
    params = assemble(cfg, fam.weight_map(cfg), GgufTensorReader(reader, arch, hf), scheme="gguf", source=path)
    return params, cfg


def gguf_chat_template(path: str) -> Optional[str]:
    """The ``tokenizer.chat_template`` stored in a GGUF file, or None."""
    meta = _Meta(_open(path), path)
    tpl = meta.get("tokenizer.chat_template")
    return tpl if isinstance(tpl, str) and tpl else None


# --------------------------------------------------------------------------- tokenizer
def _convert_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                         local_files_only=True, trust_remote_code=False)


def _load_saved_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def tokenizer_cache_folder(path: str) -> str:
    """Where :func:`gguf_tokenizer` keeps the converted tokenizer of ``path``.

    The name is the sha256 of the file's bytes and the ``transformers`` and
    ``tokenizers`` versions (which do the conversion), so a changed file or a
    new library version never meets an old conversion. Hashing reads the whole
    file (about 0.1 s per 100 MB), far less than the conversion it saves.
    """
    import tokenizers
    import transformers

    key = f"{sha256_file(path)}-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}"
    return cache_dir("gguf_tokenizers", key)


def gguf_tokenizer(path: str, cache: bool = True):
    """The tokenizer stored in a GGUF file, as a ``transformers`` fast tokenizer.

    ``transformers`` rebuilds a GGUF tokenizer from the file's token list and
    merges on every load, which takes seconds (SmolLM2's 49k tokens) to
    minutes (Gemma 3's 262k). With ``cache`` (the default) the conversion is
    saved (``save_pretrained``) in :func:`tokenizer_cache_folder` under
    ``$XDG_CACHE_HOME/bitune_jax`` (default ``~/.cache/bitune_jax``) and later
    calls load the saved folder; the first call returns that saved form too,
    so every call gives the same tokenizer. The folder is written under a
    temporary name and renamed into place, so concurrent loaders see no folder
    or a complete one; a cache that cannot be written or read only costs the
    conversion.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"GGUF file {path!r} does not exist")
    if not cache:
        return _convert_tokenizer(path)
    folder = tokenizer_cache_folder(path)
    if os.path.isdir(folder):
        try:
            return _load_saved_tokenizer(folder)
        except Exception:  # a damaged cache entry: convert again and replace it
            shutil.rmtree(folder, ignore_errors=True)
    tok = _convert_tokenizer(path)
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
        try:
            tok.save_pretrained(tmp)
            os.rename(tmp, folder)  # fails if another process got there first: its copy is as good
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _load_saved_tokenizer(folder)
    except OSError:
        return tok
