"""What each model family's checkpoints look like.

For every family this module knows two things, and nothing else about it is
written anywhere in the code:

* how to turn a Hugging Face ``config.json`` dict into a :class:`ModelConfig`
  (``config_from_hf``);
* where each of our parameters lives in a checkpoint (``weight_map``): a list
  of :class:`WeightSpec` naming our path, the checkpoint key in the HF and the
  GGUF naming schemes, and how to transform the stored array.

Importers (``bitune_jax.conversion``) stay generic: they walk ``weight_map`` and
read tensors. Adding a family means adding one entry to ``FAMILIES``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from bitune_jax.model.config import ModelConfig


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
    ``gguf_transform`` overrides ``transform`` for the GGUF scheme when the two
    formats store a tensor differently (llama.cpp stores Gemma norm weights
    as ``1 + w`` already: "plus_one" for HF, "none" for GGUF).
    """

    path: Tuple[str, ...]
    hf: str
    gguf: Optional[str]
    transform: str = "none"
    layer: bool = True
    optional: bool = False
    gguf_transform: Optional[str] = None

    def transform_for(self, scheme: str) -> str:
        """The transform to apply when reading this tensor from ``scheme`` ("hf" or "gguf")."""
        if scheme == "gguf" and self.gguf_transform is not None:
            return self.gguf_transform
        return self.transform


# --------------------------------------------------------------------------- config readers
def _rope_scaling(hf: dict):
    """Scaling tuple from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    rs = hf.get("rope_scaling")
    if not rs:
        rp = hf.get("rope_parameters")
        rs = rp if isinstance(rp, dict) and "rope_type" in rp else None
    return _rope_scaling_from(rs)


def _rope_scaling_from(rs: Optional[dict]):
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


_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh")


def _activation(name: str, family: str, legacy_gelu_is_tanh: bool = False) -> str:
    """Our ``ModelConfig.activation`` for an HF activation name."""
    if name in ("silu", "swish"):
        return "silu"
    if name in _TANH_GELUS or (name == "gelu" and legacy_gelu_is_tanh):
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise UnsupportedModelError(
        f"config.json activation {name!r} for {family}; allowed: silu, gelu, {', '.join(_TANH_GELUS)}")


def _gemma_config(hf: dict) -> ModelConfig:
    # transformers reads ``hidden_act`` and maps the legacy value "gelu" of the
    # official Gemma 1 configs to the tanh approximation; old configs may only
    # carry ``hidden_activation``.
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "gelu_pytorch_tanh"
    d = int(_require(hf, "hidden_size", "gemma"))
    bias = bool(hf.get("attention_bias", False))
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("config.json use_bidirectional_attention=true (an encoder) is not supported")
    return _llama_like({**hf, "hidden_act": "silu", "tie_word_embeddings": hf.get("tie_word_embeddings", True)},
                       "gemma", activation=_activation(act, "gemma", legacy_gelu_is_tanh=True),
                       embed_scale=float(d) ** 0.5, qkv_bias=bias, o_bias=bias)


# Defaults of transformers' Gemma3TextConfig: the ``text_config`` of multimodal
# Gemma 3 checkpoints often lists only the keys that differ from them.
_GEMMA3_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")


def _gemma3_rope(hf: dict):
    """(global theta, global scaling, local theta) from either config format."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        # transformers 5: one parameter set per layer type.
        full = rp.get("full_attention") or {}
        local = rp.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"config.json rope_parameters.sliding_attention.rope_type={local['rope_type']!r}; "
                "only 'default' is supported for sliding-window layers")
        return (float(full.get("rope_theta", 1_000_000.0)), _rope_scaling_from(full),
                float(local.get("rope_theta", 10_000.0)))
    # transformers 4: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones.
    return (_rope_theta(hf, 1_000_000.0), _rope_scaling_from(hf.get("rope_scaling")),
            float(hf.get("rope_local_base_freq", 10_000.0)))


def _gemma3_config(hf: dict) -> ModelConfig:
    if hf.get("model_type") == "gemma3":  # multimodal checkpoint: the text model's config
        if not isinstance(hf.get("text_config"), dict):
            raise ValueError("config.json for a gemma3 (multimodal) model lacks a 'text_config' object")
        hf = hf["text_config"]
    hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k in (
        "sliding_window", "final_logit_softcapping")}}
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("config.json use_bidirectional_attention=true (an encoder) is not supported")
    n_layers = int(hf["num_hidden_layers"])
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
        if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json layer_types={types!r}: expected {n_layers} entries of "
                             "'sliding_attention' / 'full_attention'")
        sliding = tuple(t == "sliding_attention" for t in types)
    else:  # older configs: every ``sliding_window_pattern``-th layer is global
        pattern = int(hf.get("sliding_window_pattern") or 6)
        sliding = tuple(bool((i + 1) % pattern) for i in range(n_layers))
    window = hf.get("sliding_window")
    if window is None:
        sliding = tuple(False for _ in sliding)
    theta, scaling, local_theta = _gemma3_rope(hf)
    d = int(hf["hidden_size"])
    bias = bool(hf.get("attention_bias", False))
    softcap = hf.get("final_logit_softcapping")
    # ``attn_logit_softcapping`` is deliberately not read: transformers' Gemma 3
    # never applies it (Gemma 3 replaced attention softcapping by q/k norms).
    return ModelConfig(
        family="gemma3",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf["num_key_value_heads"]),
        head_dim=int(hf["head_dim"]),
        norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        qkv_bias=bias,
        o_bias=bias,
        activation=_activation(hf.get("hidden_activation") or "gelu_pytorch_tanh", "gemma3"),
        embed_scale=float(d) ** 0.5,
        qk_norm=True,
        sandwich_norm=True,
        sliding_window=int(window) if window is not None and any(sliding) else None,
        sliding_layers=sliding if window is not None and any(sliding) else None,
        final_logit_softcap=float(softcap) if softcap is not None else None,
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
        max_position_embeddings=int(hf["max_position_embeddings"]),
    )


def _phi_config(hf: dict) -> ModelConfig:
    heads = int(_require(hf, "num_attention_heads", "phi"))
    d = int(_require(hf, "hidden_size", "phi"))
    if hf.get("qk_layernorm"):
        raise UnsupportedModelError("config.json qk_layernorm=true for phi is not supported")
    if hf.get("tie_word_embeddings"):
        raise UnsupportedModelError("config.json tie_word_embeddings=true for phi is not supported "
                                    "(Phi's lm_head has its own bias)")
    rp = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    partial = hf.get("partial_rotary_factor", rp.get("partial_rotary_factor", 0.5))
    return ModelConfig(
        family="phi",
        vocab_size=int(_require(hf, "vocab_size", "phi")),
        hidden_size=d,
        intermediate_size=int(_require(hf, "intermediate_size", "phi")),
        num_layers=int(_require(hf, "num_hidden_layers", "phi")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=d // heads,
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        norm_type="layer",
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        partial_rotary_factor=float(partial),
        tie_embeddings=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        mlp_type="plain",
        activation=_activation(hf.get("hidden_act", "gelu_new"), "phi"),
        parallel_block=True,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
    )


# --------------------------------------------------------------------------- weight maps
# Canonical projection name -> HF module path inside a layer.
_LLAMA_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                  "down_proj": "mlp.down_proj"}
_PHI_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.dense", "up_proj": "mlp.fc1", "down_proj": "mlp.fc2"}

_GGUF_PROJ = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _projection_specs(cfg: ModelConfig, hf_modules: Dict[str, str], gguf_names: Dict[str, Optional[str]],
                      p: str = "model.layers.{i}.", g: str = "blk.{i}.") -> List[WeightSpec]:
    specs = []
    for name in cfg.projections:
        gg = gguf_names.get(name)
        specs.append(WeightSpec(("layers", name, "kernel"), p + hf_modules[name] + ".weight",
                                g + gg + ".weight" if gg else None, "transpose"))
        bias = (name in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias) or (name == "o_proj" and cfg.o_bias) or \
               (name in ("gate_proj", "up_proj", "down_proj") and cfg.mlp_bias)
        if bias:
            specs.append(WeightSpec(("layers", name, "bias"), p + hf_modules[name] + ".bias",
                                    g + gg + ".bias" if gg else None))
    return specs


def _llama_weights(cfg: ModelConfig, norm_transform: str = "none") -> List[WeightSpec]:
    """Llama layout; Gemma 1 is the same with ``1 + w`` norms (``norm_transform="plus_one"``)."""
    p = "model.layers.{i}."
    g = "blk.{i}."
    nt = dict(transform=norm_transform, gguf_transform="none")
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", "token_embd.weight", layer=False),
        WeightSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", g + "attn_norm.weight", **nt),
        WeightSpec(("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", g + "ffn_norm.weight",
                   **nt),
        WeightSpec(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", layer=False, **nt),
    ]
    specs += _projection_specs(cfg, _LLAMA_MODULES, _GGUF_PROJ)
    if not cfg.tie_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", "transpose", layer=False))
    return specs


def _gemma_weights(cfg: ModelConfig) -> List[WeightSpec]:
    return _llama_weights(cfg, norm_transform="plus_one")


def _gemma3_weights(cfg: ModelConfig) -> List[WeightSpec]:
    p = "model.layers.{i}."
    g = "blk.{i}."
    # HF stores w and applies 1 + w; llama.cpp's converter stores 1 + w.
    nt = dict(transform="plus_one", gguf_transform="none")
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", "token_embd.weight", layer=False),
        WeightSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", g + "attn_norm.weight", **nt),
        WeightSpec(("layers", "post_attn_norm", "scale"), p + "post_attention_layernorm.weight",
                   g + "post_attention_norm.weight", **nt),
        WeightSpec(("layers", "mlp_norm", "scale"), p + "pre_feedforward_layernorm.weight", g + "ffn_norm.weight",
                   **nt),
        WeightSpec(("layers", "post_mlp_norm", "scale"), p + "post_feedforward_layernorm.weight",
                   g + "post_ffw_norm.weight", **nt),
        WeightSpec(("layers", "q_norm", "scale"), p + "self_attn.q_norm.weight", g + "attn_q_norm.weight", **nt),
        WeightSpec(("layers", "k_norm", "scale"), p + "self_attn.k_norm.weight", g + "attn_k_norm.weight", **nt),
        WeightSpec(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", layer=False, **nt),
    ]
    specs += _projection_specs(cfg, _LLAMA_MODULES, _GGUF_PROJ)
    if not cfg.tie_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", "transpose", layer=False))
    return specs


def _phi_weights(cfg: ModelConfig) -> List[WeightSpec]:
    p = "model.layers.{i}."
    g = "blk.{i}."
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", "token_embd.weight", layer=False),
        WeightSpec(("layers", "attn_norm", "scale"), p + "input_layernorm.weight", g + "attn_norm.weight"),
        WeightSpec(("layers", "attn_norm", "bias"), p + "input_layernorm.bias", g + "attn_norm.bias"),
        WeightSpec(("final_norm", "scale"), "model.final_layernorm.weight", "output_norm.weight", layer=False),
        WeightSpec(("final_norm", "bias"), "model.final_layernorm.bias", "output_norm.bias", layer=False),
        WeightSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", "transpose", layer=False),
        WeightSpec(("lm_head", "bias"), "lm_head.bias", "output.bias", layer=False),
    ]
    # llama.cpp's phi2 files fuse q/k/v into one ``attn_qkv`` tensor: no per-projection GGUF key.
    gguf = {"o_proj": "attn_output", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    specs += _projection_specs(cfg, _PHI_MODULES, gguf)
    return specs


@dataclasses.dataclass(frozen=True)
class Family:
    """How to read one family: its config reader, weight map and HF module paths."""

    config_from_hf: Callable[[dict], ModelConfig]
    weight_map: Callable[[ModelConfig], List[WeightSpec]]
    # Canonical projection name -> HF module path inside a layer (for PEFT export).
    hf_modules: Dict[str, str]
    hf_layer_prefix: str = "model.layers.{i}."
    # Alternative HF key layouts, tried in order when the weight map's own keys
    # are absent: each is a tuple of (prefix, replacement) rewrites.
    hf_key_layouts: Tuple[Tuple[Tuple[str, str], ...], ...] = ()


# Multimodal Gemma 3 checkpoints nest the text model: "language_model.model.*"
# (hub files, transformers 4) or "model.language_model.*" (transformers 5).
_GEMMA3_NESTED = ((("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
                  (("model.", "model.language_model."),))

# HF ``model_type`` -> Family.
FAMILIES: Dict[str, Family] = {
    "llama": Family(_llama_config, _llama_weights, _LLAMA_MODULES),
    "mistral": Family(_llama_config, _llama_weights, _LLAMA_MODULES),
    "qwen2": Family(_qwen2_config, _llama_weights, _LLAMA_MODULES),
    "gemma": Family(_gemma_config, _gemma_weights, _LLAMA_MODULES),
    "gemma3_text": Family(_gemma3_config, _gemma3_weights, _LLAMA_MODULES, hf_key_layouts=_GEMMA3_NESTED),
    "gemma3": Family(_gemma3_config, _gemma3_weights, _LLAMA_MODULES, hf_key_layouts=_GEMMA3_NESTED),
    "phi": Family(_phi_config, _phi_weights, _PHI_MODULES),
}

# Our ModelConfig.family -> HF model_type used when exporting.
FAMILY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma3": "gemma3_text", "phi": "phi"}


def resolve_hf_layout(fam: Family, specs: List[WeightSpec], has: Callable[[str], bool]) -> List[WeightSpec]:
    """``specs`` with HF keys rewritten to the first layout whose embedding key exists.

    Checkpoints in the family's own layout are returned unchanged; the others
    (e.g. a multimodal Gemma 3 file holding its text model under
    ``language_model.``) get their HF keys rewritten per ``fam.hf_key_layouts``.
    """
    probe = next((s.hf for s in specs if s.path == ("embed",)), None)
    if probe is None or has(probe):
        return specs
    for layout in fam.hf_key_layouts:
        def rewrite(key, layout=layout):
            for old, new in layout:
                if key.startswith(old):
                    return new + key[len(old):]
            return key
        if has(rewrite(probe)):
            return [dataclasses.replace(s, hf=rewrite(s.hf)) for s in specs]
    return specs


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
    family = family_for(model_type, source)
    try:
        return family.config_from_hf(hf)
    except UnsupportedModelError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a missing key or a value of the wrong type
        raise ValueError(f"{source}: not a usable {model_type} config ({type(e).__name__}: {e})") from None
