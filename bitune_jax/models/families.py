"""What each model family's checkpoints look like.

For every family this module knows two things, and nothing else about it is
written anywhere in the code:

* how to turn a Hugging Face ``config.json`` dict into a :class:`ModelConfig`
  (``config_from_hf``);
* where each of our parameters lives in a checkpoint (``weight_map``): a list
  of :class:`WeightSpec` naming our path, the checkpoint key in the HF and the
  GGUF naming schemes, and how to transform the stored array.

Importers (``bitune_jax.convert``) stay generic: they walk ``weight_map`` and
read tensors. Adding a family means adding one entry to ``FAMILIES``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from bitune_jax.models.config import ModelConfig


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this library implements."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One parameter: our path, its checkpoint names and its transform.

    ``layer`` is True when the key contains ``{i}`` and the arrays of all
    layers are stacked on a new leading axis.
    ``transform`` is one of: "none", "transpose" (HF ``[out, in]`` Linear
    weight to our ``[in, out]`` kernel), "plus_one" (norm weights stored as
    ``w`` but applied as ``1 + w``).
    ``optional`` parameters may be absent (e.g. tied ``lm_head``).
    """

    path: Tuple[str, ...]
    hf: str
    gguf: Optional[str]
    transform: str = "none"
    layer: bool = True
    optional: bool = False


# --------------------------------------------------------------------------- config readers
def _rope_scaling(hf: dict):
    rs = hf.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(rs["factor"]))
    if kind == "llama3":
        return ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                float(rs["original_max_position_embeddings"]))
    raise UnsupportedModelError(f"config.json rope_scaling type {kind!r} is not supported; allowed: linear, llama3")


def _rope_theta(hf: dict, default=10000.0):
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    rp = hf.get("rope_parameters") or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return default


def _require(hf: dict, key: str, family: str):
    if key not in hf:
        raise ValueError(f"config.json for a {family} model lacks the key {key!r}")
    return hf[key]


def _llama_like(hf: dict, family: str, **extra) -> ModelConfig:
    heads = int(_require(hf, "num_attention_heads", family))
    d = int(_require(hf, "hidden_size", family))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json hidden_act={act!r} for {family}; allowed: 'silu'")
    return ModelConfig(
        family=family,
        vocab_size=int(_require(hf, "vocab_size", family)),
        hidden_size=d,
        intermediate_size=int(_require(hf, "intermediate_size", family)),
        num_layers=int(_require(hf, "num_hidden_layers", family)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d // heads),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        **extra,
    )


def _llama_config(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return _llama_like(hf, "llama", qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _qwen2_config(hf: dict) -> ModelConfig:
    return _llama_like(hf, "qwen2", qkv_bias=True)


# --------------------------------------------------------------------------- weight maps
def _llama_weights(cfg: ModelConfig) -> List[WeightSpec]:
    p = "model.layers.{i}."
    g = "blk.{i}."
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", "token_embd.weight", layer=False),
        WeightSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", g + "attn_norm.weight"),
        WeightSpec(("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", g + "ffn_norm.weight"),
        WeightSpec(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", layer=False),
    ]
    hf_names = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for name in cfg.projections:
        specs.append(WeightSpec(("layers", name, "kernel"), p + hf_names[name] + ".weight",
                                g + gguf_names[name] + ".weight", "transpose"))
        bias = (name in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias) or (name == "o_proj" and cfg.o_bias) or \
               (name in ("gate_proj", "up_proj", "down_proj") and cfg.mlp_bias)
        if bias:
            specs.append(WeightSpec(("layers", name, "bias"), p + hf_names[name] + ".bias",
                                    g + gguf_names[name] + ".bias"))
    if not cfg.tie_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", "transpose", layer=False))
    return specs


@dataclasses.dataclass(frozen=True)
class Family:
    """How to read one family: its config reader, weight map and HF module paths."""

    config_from_hf: Callable[[dict], ModelConfig]
    weight_map: Callable[[ModelConfig], List[WeightSpec]]
    # Canonical projection name -> HF module path inside a layer (for PEFT export).
    hf_modules: Dict[str, str]
    hf_layer_prefix: str = "model.layers.{i}."


_LLAMA_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                  "down_proj": "mlp.down_proj"}

# HF ``model_type`` -> Family.
FAMILIES: Dict[str, Family] = {
    "llama": Family(_llama_config, _llama_weights, _LLAMA_MODULES),
    "mistral": Family(_llama_config, _llama_weights, _LLAMA_MODULES),
    "qwen2": Family(_qwen2_config, _llama_weights, _LLAMA_MODULES),
}

# Our ModelConfig.family -> HF model_type used when exporting.
FAMILY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def family_for(model_type: str, source: str = "config.json") -> Family:
    """The :class:`Family` for an HF ``model_type``, or a clear error."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_of_config(cfg: ModelConfig) -> Family:
    return family_for(FAMILY_MODEL_TYPE.get(cfg.family, cfg.family), source="ModelConfig.family")


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise UnsupportedModelError(f"{source} has no 'model_type'; cannot tell the architecture")
    return family_for(model_type, source).config_from_hf(hf)
