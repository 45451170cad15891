"""Which modules a PEFT ``adapter_config.json`` adapts, with which rank and scaling.

``peft`` decides for every module name of the PyTorch model (such as
``model.layers.3.mlp.down_proj``) whether an adapter sits on it. This module
re-implements those rules on the plain config dict, following peft 0.21
(``tuners_utils.check_target_module_exists``, ``_maybe_include_all_linear_layers``,
``utils.other.get_pattern_key``, ``LoraModel._create_and_replace``,
``IA3Model._check_target_module_feedforward``), so that
:mod:`bitune_jax.conversion.adapters` reads any folder PEFT writes without
importing torch:

* ``target_modules``: a list of names, each matching a module whose full name
  equals it or ends with ``"." + name`` (short names such as ``q_proj``,
  suffixes such as ``self_attn.q_proj``, full paths such as
  ``model.layers.1.self_attn.o_proj``); a string is a regex that must match
  the whole module name; ``"all-linear"`` is every linear layer except the
  output head; null is PEFT's default for the model type;
* ``layers_to_transform`` (with ``layers_pattern``) keeps suffix matches
  whose layer index is listed; like PEFT it does not filter exact full-name
  matches, and goes only with a list of targets;
* ``exclude_modules`` (list or regex) removes modules;
* ``rank_pattern`` / ``alpha_pattern``: per-module rank and alpha, the first
  key matching the end of the module name (``(.*\\.)?(key)$``) wins;
  ``use_rslora`` scales by ``alpha / sqrt(r)`` instead of ``alpha / r``;
* IA3 ``feedforward_modules`` (list: a plain suffix match; string: a regex)
  says whether a module's input or its output is scaled.

Example (a config as PEFT saves it for ``target_modules="all-linear"``
narrowed by hand, with a per-module rank):

    >>> names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    >>> cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
    ...        "target_modules": ["q_proj", "model.layers.1.self_attn.o_proj"],
    ...        "rank_pattern": {"layers.0.self_attn.q_proj": 4}}
    >>> for name, m in adapted_modules(cfg, names, [], "llama").items():
    ...     print(name, m.rank, m.scaling)
    model.layers.0.self_attn.q_proj 4 4.0
    model.layers.1.self_attn.q_proj 8 2.0
    model.layers.1.self_attn.o_proj 8 2.0
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Optional, Sequence

ALL_LINEAR = "all-linear"

# peft's defaults for ``target_modules: null`` by HF model_type
# (TRANSFORMERS_MODELS_TO_{LORA,IA3}_TARGET_MODULES_MAPPING, IA3_FEEDFORWARD_MODULES_MAPPING).
DEFAULT_TARGETS = {
    "LORA": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
             "gemma": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
             "phi": ["q_proj", "v_proj", "fc1", "fc2"]},
    "IA3": {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
            "qwen2": ["q_proj", "v_proj", "down_proj"], "gemma": ["q_proj", "v_proj", "down_proj"],
            "gemma3_text": ["q_proj", "v_proj", "down_proj"], "phi": ["q_proj", "v_proj", "fc2"]},
}
DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                       "gemma": ["down_proj"], "gemma3_text": ["down_proj"], "phi": ["fc2"]}


_IA3_KEYS = ("peft_type", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
             "modules_to_save", "init_ia3_weights")


class PeftConfigError(ValueError):
    """A config that PEFT would apply differently from anything this library can represent."""


@dataclasses.dataclass(frozen=True)
class Adapted:
    """How one module is adapted.

    ``rank`` and ``alpha`` (LoRA/DoRA) are such that the update ``B A x`` is
    scaled by ``alpha / rank``: with rsLoRA ``alpha`` is the config's alpha
    times ``sqrt(rank)``. ``feedforward`` (IA3): the module's input is scaled,
    not its output.
    """

    rank: int = 0
    alpha: float = 0.0
    feedforward: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _excluded(cfg: dict, name: str) -> bool:
    ex = cfg.get("exclude_modules")
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return name in ex or any(name.endswith("." + e) for e in ex)


def _layer_index(name: str, layers_pattern) -> Optional[int]:
    # Lazy ``.*?``: the first numbered segment is the layer index.
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return None if m is None else int(m.group("idx"))


def is_target(cfg: dict, targets, name: str) -> bool:
    """peft's ``check_target_module_exists``: does ``targets`` (resolved ``target_modules``) adapt ``name``?"""
    if _excluded(cfg, name):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(name, cfg.get("layers_pattern"))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(patterns: Optional[dict], name: str, default):
    """peft's ``get_pattern_key``: the value of the first key that matches the end of ``name``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _resolve_targets(cfg: dict, projections: Sequence[str], model_type: str):
    targets = cfg.get("target_modules")
    if targets is None:
        default = DEFAULT_TARGETS.get(cfg.get("peft_type"), {}).get(model_type)
        if default is None:
            raise PeftConfigError(f"'target_modules' is missing and peft has no default for model type "
                                  f"{model_type!r}")
        return list(default)
    if isinstance(targets, str):
        # Every Linear except the output embedding: in these models, exactly the layers' projections.
        return list(projections) if targets.lower() == ALL_LINEAR else targets
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise PeftConfigError(f"'target_modules' must be a list of names or a regex string, got {targets!r}")
    return list(targets)


def adapted_modules(cfg: dict, projections: Sequence[str], others: Sequence[str],
                    model_type: str) -> Dict[str, Adapted]:
    """The modules among ``projections`` that ``cfg`` adapts, in their order, and how.

    Args:
      cfg: the ``adapter_config.json`` dict (``peft_type`` LORA or IA3).
      projections: full names of the modules this library can adapt.
      others: full names of modules PEFT could adapt but this library cannot
        (embeddings, output head); adapting any of them is an error.
      model_type: the HF model type, for PEFT's default targets.

    Raises:
      PeftConfigError: a list entry matches no module, the config adapts one
        of ``others``, or it adapts nothing; IA3 without feedforward modules
        and without a default for ``model_type``.
    """
    if cfg.get("peft_type") == "IA3":  # peft ignores the keys IA3Config lacks (layers_to_transform, ...)
        cfg = {k: v for k, v in cfg.items() if k in _IA3_KEYS}
    # What LoraConfig.__post_init__ refuses.
    if isinstance(cfg.get("target_modules"), str) and (cfg.get("layers_to_transform") is not None
                                                       or cfg.get("layers_pattern") is not None):
        raise PeftConfigError("layers_to_transform / layers_pattern cannot be used when target_modules is a "
                              "string (peft refuses this config too)")
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        raise PeftConfigError("layers_pattern needs layers_to_transform (peft refuses this config too)")
    targets = _resolve_targets(cfg, projections, model_type)
    if not isinstance(targets, str):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in list(projections) + list(others)):
                raise PeftConfigError(f"target module {t!r} is not a projection of this {model_type} model")
    for n in others:
        if is_target(cfg, targets, n):
            raise PeftConfigError(f"PEFT adapts module {n!r}, which this library cannot adapt "
                                  "(only the layers' linear projections)")
    hits = [n for n in projections if is_target(cfg, targets, n)]
    if not hits:
        raise PeftConfigError(f"target_modules {cfg.get('target_modules')!r} adapt no projection of this "
                              f"{model_type} model (layers_to_transform={cfg.get('layers_to_transform')!r}, "
                              f"exclude_modules={cfg.get('exclude_modules')!r})")
    if cfg.get("peft_type") == "IA3":
        ff = cfg.get("feedforward_modules")
        if ff is None:
            ff = DEFAULT_FEEDFORWARD.get(model_type)
            if ff is None:
                raise PeftConfigError(f"'feedforward_modules' is missing and peft has no default for model type "
                                      f"{model_type!r}")
        if isinstance(ff, str):
            return {n: Adapted(feedforward=re.fullmatch(ff, n) is not None) for n in hits}
        return {n: Adapted(feedforward=any(n.endswith(t) for t in ff)) for n in hits}
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    out = {}
    for n in hits:
        rank = _pattern_value(cfg.get("rank_pattern"), n, r)
        a = _pattern_value(cfg.get("alpha_pattern"), n, alpha)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 \
                or isinstance(a, bool) or not isinstance(a, (int, float)):
            raise PeftConfigError(f"module {n!r}: rank {rank!r} and alpha {a!r} must be a positive integer "
                                  "and a number")
        out[n] = Adapted(rank=rank, alpha=float(a) * math.sqrt(rank) if cfg.get("use_rslora") else float(a))
    return out
