"""Architecture description shared by every model family.

One frozen dataclass describes Llama, Qwen2, Gemma, Gemma 3 and Phi-2 models.
Each family differs only in a handful of switches (norm type, MLP type, rope
variant, biases, extra norms), so the layer code reads those switches instead of
checking family names. ``ModelConfig`` is hashable and is passed to jitted
functions as a static argument.

Example:

    >>> cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64,
    ...                   intermediate_size=128, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2, head_dim=16)
    >>> cfg.q_per_kv
    2
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

FAMILIES = ("llama", "qwen2", "gemma", "gemma3", "phi")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer.

    Projections inside a layer always carry the canonical names ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj`` (``gate_proj`` absent for plain MLPs); importers map each
    family's checkpoint names onto them.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    norm_type: str = "rms"  # "rms" | "layer"
    rope_theta: float = 10000.0
    # Llama-3 style scaling as a hashable tuple:
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
    # or ("linear", factor); None for plain RoPE.
    rope_scaling: Optional[Tuple] = None
    # Gemma 3: RoPE base of the sliding-window layers, which use plain (unscaled)
    # RoPE; rope_theta and rope_scaling then apply to the global layers only.
    rope_local_theta: Optional[float] = None
    partial_rotary_factor: float = 1.0
    tie_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    mlp_type: str = "gated"  # "gated" (SwiGLU/GeGLU) | "plain" (fc1 -> act -> fc2)
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    embed_scale: float = 1.0
    qk_norm: bool = False
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 3)
    parallel_block: bool = False  # attention and MLP read the same input (Phi)
    sliding_window: Optional[int] = None
    # Per layer: True where the layer uses sliding-window (local) attention.
    sliding_layers: Optional[Tuple[bool, ...]] = None
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    query_scale: Optional[float] = None  # default 1/sqrt(head_dim)
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # parameter and compute dtype: float32 | bfloat16

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}; allowed: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.norm_type not in ("rms", "layer"):
            raise ValueError(f"norm_type={self.norm_type!r}; allowed: 'rms', 'layer'")
        if self.mlp_type not in ("gated", "plain"):
            raise ValueError(f"mlp_type={self.mlp_type!r}; allowed: 'gated', 'plain'")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"activation={self.activation!r}; allowed: silu, gelu_tanh, gelu")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; allowed: float32, bfloat16")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    @property
    def has_local_layers(self) -> bool:
        return self.sliding_window is not None and bool(self.sliding_layers) and any(self.sliding_layers)

    @property
    def projections(self) -> Tuple[str, ...]:
        """Names of the linear projections of one layer (canonical names)."""
        mlp = ("gate_proj", "up_proj", "down_proj") if self.mlp_type == "gated" else ("up_proj", "down_proj")
        return ("q_proj", "k_proj", "v_proj", "o_proj") + mlp

    def projection_shape(self, name: str) -> Tuple[int, int]:
        """(in_features, out_features) of a projection."""
        d, hd = self.hidden_size, self.head_dim
        return {
            "q_proj": (d, self.num_heads * hd),
            "k_proj": (d, self.num_kv_heads * hd),
            "v_proj": (d, self.num_kv_heads * hd),
            "o_proj": (self.num_heads * hd, d),
            "gate_proj": (d, self.intermediate_size),
            "up_proj": (d, self.intermediate_size),
            "down_proj": (self.intermediate_size, d),
        }[name]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
