"""Rows to padded prompt/answer batches, with grain for order and resumption.

Three stages, each usable on its own:

1. **Read** (:func:`read_rows`): a JSONL / Parquet / Arrow file, a
   ``datasets.save_to_disk`` folder, or a hub dataset (only when named) becomes
   a list of :class:`RawRow` with a row number for error messages.
2. **Encode** (:func:`encode_examples`): each row becomes (prompt, answer)
   strings by ``data.format`` and ``data.template``, then token ids by the
   one tokenization rule (:func:`bitune_jax.data.text.encode_pair`, EOS appended),
   then the ``data.overlong`` rule. Bad rows are counted by category in
   :class:`DataStats` and skipped, or raise :class:`DataError` naming the file
   and row. Everything is encoded up front, so the epoch is known exactly
   and every process agrees on it.
3. **Batch** (:func:`batch_dataset`): a ``grain.MapDataset`` of batches:

   * ``MapDataset.range(N).shuffle(seed).repeat(num_epochs)``: grain's
     per-epoch reshuffle (epoch ``e`` uses seed ``seed + e``) gives the stream
     of example indices;
   * length grouping (:class:`_LengthGroupedBatches`): each epoch is cut into
     windows of ``sort_window * batch_size`` consecutive stream entries; a
     window is sorted by (prompt length, answer length), cut into global
     batches, and those batches are put in a seeded random order. Every
     example of an epoch lands in exactly one batch; the last
     ``N mod batch_size`` entries of each (reshuffled) epoch are dropped;
   * per-process slicing: process ``p`` of ``n`` takes rows
     ``[p * B/n, (p + 1) * B/n)`` of each global batch, padded to the global
     batch's bucketed lengths, so all processes build arrays of one shape.

   Batch ``i`` is a pure function of ``i``, the examples and the config, so
   ``iterator.get_state()`` (grain's ``{"next_index": i}``) restores the
   stream exactly with ``iterator.set_state(state)``.

The batch format the train step consumes (:func:`collate`)::

    prompt_ids  int32 [B, P]  right-padded with 0
    prompt_len  int32 [B]     >= 1
    answer_ids  int32 [B, A]  right-padded with 0
    answer_len  int32 [B]     >= 1

with ``P`` and ``A`` multiples of ``data.bucket``, or ``data.max_prompt_len`` /
``data.max_answer_len`` when rounding up would pass them. With
``data.packing`` a batch holds the same examples packed several to a row
(:mod:`bitune_jax.data.packing`, whose names this module re-exports): the
prefill spans in ``pre_ids/pre_pos/pre_seg [R, S]``, the answer-stream
tokens in ``ans_ids/ans_pos/ans_seg/targets [R, A]``, segment ids telling
the examples of a row apart.

Example:

    >>> ex = [([1, 5, 6], [7, 2]), ([1, 9], [8, 8, 2])]
    >>> b = collate(ex, bucket=4)
    >>> b["prompt_ids"].tolist(), b["answer_len"].tolist()
    ([[1, 5, 6, 0], [1, 9, 0, 0]], [2, 3])
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grain
import numpy as np

from bitune_jax.data import text
from bitune_jax.config import DataSection, DataSource
# Packing lives in its own module; its names stay importable from here too.
from bitune_jax.data.packing import (  # noqa: F401 (re-exported)
    concat_packed, pack, pack_capacity, pack_rows, plan_packing, real_tokens, round_up)

log = logging.getLogger(__name__)

Example = Tuple[np.ndarray, np.ndarray]  # (prompt_ids int32 [L], answer_ids int32 [M])

BAD_ROW_KINDS = ("missing_field", "empty_prompt", "empty_answer", "undecodable")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class DataError(ValueError):
    """Data that cannot be read or a bad row under ``bad_rows: error``."""


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row as read from a source.

    Attributes:
      where: ``"<file>, line 12"`` (JSONL) or ``"<file>, row 12"`` (1-based).
      number: the 1-based line or row number.
      fields: the row's columns, or None when the row could not be decoded.
      problem: why ``fields`` is None.
    """

    where: str
    number: int
    fields: Optional[Mapping[str, Any]]
    problem: str = ""


@dataclasses.dataclass
class DataStats:
    """What encoding did to the rows of one source.

    ``kept_rows[i]`` is the row number of example ``i``; ``problems`` holds
    the first few bad-row messages for the log; ``longest_prompt``,
    ``longest_answer`` and ``longest_total`` (prompt + answer) are token
    counts before ``data.overlong`` applies.
    """

    source: str = ""
    rows: int = 0
    examples: int = 0
    missing_field: int = 0
    empty_prompt: int = 0
    empty_answer: int = 0
    undecodable: int = 0
    overlong_truncated: int = 0
    overlong_dropped: int = 0
    longest_prompt: int = 0
    longest_answer: int = 0
    longest_total: int = 0
    kept_rows: List[int] = dataclasses.field(default_factory=list)
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def bad_rows(self) -> int:
        return sum(getattr(self, k) for k in BAD_ROW_KINDS)

    def summary(self) -> str:
        """One line: rows read, examples kept, and each non-zero count."""
        counts = [f"{k}={getattr(self, k)}" for k in BAD_ROW_KINDS + ("overlong_truncated", "overlong_dropped")
                  if getattr(self, k)]
        return f"{self.source}: {self.rows} rows -> {self.examples} examples" + (
            f" ({', '.join(counts)})" if counts else "")

    def counts(self) -> Dict[str, Any]:
        """The counts as a JSON-ready dict (what ``summary.json`` records), without ``kept_rows``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kept_rows"}

    def why_empty(self, data_cfg: DataSection) -> str:
        """Why no row became an example, for an error message."""
        if not self.rows:
            return f"{self.source} has no rows"
        limits = [f"data.{name}={limit} (longest {what}: {longest} tokens)"
                  for name, limit, what, longest in (("max_prompt_len", data_cfg.max_prompt_len, "prompt",
                                                      self.longest_prompt),
                                                     ("max_answer_len", data_cfg.max_answer_len, "answer",
                                                      self.longest_answer),
                                                     ("max_len", data_cfg.max_len, "prompt + answer",
                                                      self.longest_total))
                  if limit is not None and longest > limit]
        overlong = (f"exceed {' or '.join(limits)} and data.overlong=drop drops them; raise the limit or set "
                    "data.overlong=truncate")
        bad = ", ".join(f"{k}={getattr(self, k)}" for k in BAD_ROW_KINDS if getattr(self, k))
        bad = f"are bad ({bad}), e.g. {self.problems[0]}" if self.problems else f"are bad ({bad})"
        if self.overlong_dropped == self.rows:
            return f"all {self.rows} rows of {self.source} {overlong}"
        if self.bad_rows == self.rows:
            return f"all {self.rows} rows of {self.source} {bad}"
        return f"no row of {self.source} is usable: {self.overlong_dropped} {overlong}; {self.bad_rows} {bad}"


class _BadRow(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_rows(source: Union[DataSource, str]) -> List[RawRow]:
    """Reads every row of a local file or folder, or of a named hub dataset.

    JSONL lines that are not valid UTF-8 or JSON, or not an object, become
    rows with ``fields=None`` (counted as ``undecodable`` when encoded);
    blank lines are skipped. A ``.json`` file holding one JSON array is read
    as that array.
    """
    if isinstance(source, str):
        source = DataSource(path=source)
    path = os.path.expanduser(source.path)
    if not path:
        raise DataError("no data path given")
    if os.path.isdir(path):
        return _rows_from_records(path, _load_from_disk(path, source.split))
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith((".jsonl", ".json")):
            return _read_jsonl(path)
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq
            return _rows_from_records(path, pq.read_table(path).to_pylist())
        if lower.endswith(".arrow"):
            return _rows_from_records(path, _read_arrow(path).to_pylist())
        raise DataError(f"{path}: unknown file type; expected one of {', '.join(_LOCAL_SUFFIXES)} "
                        "or a datasets.save_to_disk folder")
    if path.lower().endswith(_LOCAL_SUFFIXES) or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder")
    return _rows_from_records(f"hub:{path}", _load_hub(path, source.subset, source.split))


def _read_jsonl(path: str) -> List[RawRow]:
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid JSON array: {e}") from e
        return _rows_from_records(path, records)
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            rows.append(RawRow(where, number, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        except json.JSONDecodeError as e:
            rows.append(RawRow(where, number, None, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(value, dict):
            rows.append(RawRow(where, number, None, f"a JSON {type(value).__name__}, not an object"))
            continue
        rows.append(RawRow(where, number, value))
    return rows


def _rows_from_records(name: str, records) -> List[RawRow]:
    rows = []
    for i, record in enumerate(records):
        where = f"{name}, row {i + 1}"
        if isinstance(record, Mapping):
            rows.append(RawRow(where, i + 1, record))
        else:
            rows.append(RawRow(where, i + 1, None, f"a {type(record).__name__}, not a mapping"))
    return rows


def _read_arrow(path: str):
    import pyarrow as pa
    with pa.memory_map(path) as f:
        try:
            return pa.ipc.open_stream(f).read_all()  # what `datasets` writes
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all()


def _load_from_disk(path: str, split: Optional[str]):
    import datasets
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises several kinds here
        raise DataError(f"{path}: not a datasets.save_to_disk folder ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: split {split!r} not found; available: {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def _load_hub(name: str, subset: Optional[str], split: Optional[str]):
    import datasets
    try:
        ds = datasets.load_dataset(name, subset, split=split or "train")
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors differ by version
        raise DataError(
            f"{name!r} is not a local file or folder, and loading it as a hub dataset failed "
            f"(subset={subset!r}, split={split or 'train'!r}): {e}. "
            "If this machine is offline, download the data elsewhere and pass a local "
            "JSONL / Parquet / Arrow file or save_to_disk folder as the path.") from e
    return ds.to_list()


# ----------------------------------------------------------------------------
# Rows to (prompt, answer) strings to token ids
# ----------------------------------------------------------------------------


def _text_field(fields: Mapping, name: str, optional: bool = False) -> str:
    value = fields.get(name)
    if value is None:
        if optional:
            return ""
        raise _BadRow("missing_field", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise _BadRow("undecodable", f"field {name!r} has type {type(value).__name__}, not text")
    return value


def _split_messages(fields: Mapping, name: str) -> Tuple[List[Dict[str, str]], str]:
    """Prompt messages and answer text of a chat row (answer = last assistant turn)."""
    msgs = fields.get(name)
    if msgs is None:
        raise _BadRow("missing_field", f"field {name!r} is missing")
    if not isinstance(msgs, (list, tuple)) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise _BadRow("undecodable", f"field {name!r} is not a list of {{role, content}} text messages")
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _BadRow("missing_field", f"field {name!r} has no assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:last]], msgs[last]["content"]


def row_to_text(fields: Mapping[str, Any], data_cfg: DataSection, tokenizer=None) -> Tuple[str, str]:
    """The (prompt, answer) strings of one row under ``data.format`` and ``data.template``.

    Raises ``_BadRow`` (internal) for rows that cannot make an example.
    ``tokenizer`` is needed only by the ``chat`` template.
    """
    fmt = data_cfg.format
    if fmt.kind == "prompt_answer":
        instruction = _text_field(fields, fmt.prompt_field)
        response = _text_field(fields, fmt.answer_field)
        messages = [{"role": "user", "content": instruction}]
    elif fmt.kind == "instruction":
        instruction = _text_field(fields, fmt.instruction_field)
        extra = _text_field(fields, fmt.input_field, optional=True)
        response = _text_field(fields, fmt.output_field)
        if extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": instruction}]
    else:
        messages, response = _split_messages(fields, fmt.messages_field)
        instruction = "\n\n".join(m["content"] for m in messages)
    if not response.strip():
        raise _BadRow("empty_answer", "the answer is empty")
    if not instruction.strip():
        raise _BadRow("empty_prompt", "the prompt is empty")
    if data_cfg.template == "plain":
        return text.format_plain(instruction, response)
    if data_cfg.template == "chat":
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Templates that write the BOS text themselves would get a second BOS
        # from encode_pair's special tokens.
        bos = tokenizer.bos_token
        if bos and prompt.startswith(bos) and _adds_bos(tokenizer):
            prompt = prompt[len(bos):]
        return prompt, response
    return instruction, response


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _fit(prompt_ids: List[int], answer_ids: List[int], data_cfg: DataSection, bos_id: Optional[int]):
    """Applies ``data.overlong``; returns the ids, or None when the example is dropped.

    ``truncate``: the prompt keeps BOS and its last tokens, the answer its
    first tokens, to the separate caps; then, over ``data.max_len``, the
    answer loses its end (as the reference's truncation of the joined
    sequence), or, for a prompt of ``max_len`` tokens or more, the answer
    keeps one token and the prompt its BOS and last ``max_len - 1`` tokens.

    >>> cfg = DataSection(max_prompt_len=6, max_answer_len=4, max_len=7)
    >>> _fit([1, 5, 6, 7], [8, 9, 2], cfg, bos_id=1)  # 7 tokens: fits
    ([1, 5, 6, 7], [8, 9, 2], False)
    >>> _fit([1, 5, 6, 7, 3], [8, 9, 2], cfg, bos_id=1)  # 8: the answer's end goes
    ([1, 5, 6, 7, 3], [8, 9], True)
    >>> _fit([1, 3, 4, 5, 6, 7, 9, 9], [8, 2], cfg, bos_id=1)  # prompt cap, then the total
    ([1, 5, 6, 7, 9, 9], [8], True)
    >>> _fit([1, 5, 6, 7, 3], [8, 9, 2], dataclasses.replace(cfg, overlong="drop"), bos_id=1) is None
    True
    """
    P, A, T = data_cfg.max_prompt_len, data_cfg.max_answer_len, data_cfg.max_len
    if len(prompt_ids) <= P and len(answer_ids) <= A and (T is None or len(prompt_ids) + len(answer_ids) <= T):
        return prompt_ids, answer_ids, False
    if data_cfg.overlong == "drop":
        return None
    prompt_ids, answer_ids = _keep_prompt_end(prompt_ids, P, bos_id), answer_ids[:A]
    if T is not None and len(prompt_ids) + len(answer_ids) > T:
        if len(prompt_ids) < T:
            answer_ids = answer_ids[:T - len(prompt_ids)]
        else:
            prompt_ids, answer_ids = _keep_prompt_end(prompt_ids, T - 1, bos_id), answer_ids[:1]
    return prompt_ids, answer_ids, True


def _keep_prompt_end(prompt_ids: List[int], n: int, bos_id: Optional[int]) -> List[int]:
    """At most ``n`` prompt tokens: a leading BOS and the last ones."""
    if len(prompt_ids) <= n:
        return prompt_ids
    if bos_id is not None and prompt_ids[0] == bos_id and n > 1:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - (n - 1):]
    return prompt_ids[len(prompt_ids) - n:]


def encode_examples(tokenizer, rows: Sequence[Union[RawRow, Mapping[str, Any]]], data_cfg: DataSection, *,
                    source: str = "<rows>", stats: Optional[DataStats] = None) -> List[Example]:
    """Token ids ``(prompt_ids, answer_ids)`` (int32 arrays) of every usable row.

    Args:
      tokenizer: a Hugging Face tokenizer (with an EOS token; a chat template
        for ``template: chat``).
      rows: :class:`RawRow` from :func:`read_rows`, or plain dicts (numbered
        from 1 in messages).
      data_cfg: the ``data`` section (format, template, limits, switches).
      source: name used in messages for plain-dict rows.
      stats: counts are added here when given (see :class:`DataStats`).

    Bad rows are counted and skipped (``bad_rows: report``) or raise
    :class:`DataError` (``bad_rows: error``). The ``overlong`` rule is applied
    here; dropped overlong examples are not bad rows.
    """
    stats = stats if stats is not None else DataStats(source=source)
    if data_cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template=chat but the tokenizer has no chat template")
    bos_id = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    out: List[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, RawRow):
            row = RawRow(f"{source}, row {i + 1}", i + 1, row)
        stats.rows += 1
        try:
            if row.fields is None:
                raise _BadRow("undecodable", row.problem)
            prompt, answer = row_to_text(row.fields, data_cfg, tokenizer)
            prompt_ids, answer_ids = text.encode_pair(tokenizer, prompt, answer, add_eos=True)
            if not prompt_ids:
                raise _BadRow("empty_prompt", "the prompt has no tokens")
            stats.longest_prompt = max(stats.longest_prompt, len(prompt_ids))
            stats.longest_answer = max(stats.longest_answer, len(answer_ids))
            stats.longest_total = max(stats.longest_total, len(prompt_ids) + len(answer_ids))
        except _BadRow as bad:
            message = f"{row.where}: {bad.kind}: {bad}"
            if data_cfg.bad_rows == "error":
                raise DataError(message + " (set data.bad_rows=report to skip such rows)") from None
            setattr(stats, bad.kind, getattr(stats, bad.kind) + 1)
            if len(stats.problems) < 5:
                stats.problems.append(message)
            continue
        fitted = _fit(prompt_ids, answer_ids, data_cfg, bos_id)
        if fitted is None:
            stats.overlong_dropped += 1
            continue
        prompt_ids, answer_ids, truncated = fitted
        stats.overlong_truncated += int(truncated)
        out.append((np.asarray(prompt_ids, np.int32), np.asarray(answer_ids, np.int32)))
        stats.kept_rows.append(row.number)
    stats.examples += len(out)
    return out


def load_examples(tokenizer, source: Union[DataSource, str], data_cfg: DataSection) -> Tuple[List[Example], DataStats]:
    """Reads and encodes one source; logs the stats (a warning when rows were bad).

    Raises :class:`DataError` saying why when no row makes an example.
    """
    path = source if isinstance(source, str) else source.path
    stats = DataStats(source=path)
    examples = encode_examples(tokenizer, read_rows(source), data_cfg, source=path, stats=stats)
    if not examples:
        raise DataError(stats.why_empty(data_cfg))
    log.info("data %s", stats.summary())
    if stats.bad_rows:
        log.warning("skipped %d bad rows of %s, e.g. %s", stats.bad_rows, path, "; ".join(stats.problems))
    return examples, stats


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def collate(examples: Sequence[Sequence], bucket: int = 1,
            pad_to: Optional[Tuple[int, int]] = None) -> Dict[str, np.ndarray]:
    """Pads ``(prompt_ids, answer_ids, ...)`` examples into the batch format.

    Args:
      examples: sequences whose first two items are prompt and answer ids
        (non-empty).
      bucket: ``P`` and ``A`` are rounded up to a multiple of this.
      pad_to: explicit ``(P, A)``; used so every process pads its share of a
        global batch to the same shape.

    Returns:
      ``{"prompt_ids": int32 [B, P], "prompt_len": int32 [B],
      "answer_ids": int32 [B, A], "answer_len": int32 [B]}``, right-padded
      with 0.
    """
    prompt_len = np.asarray([len(e[0]) for e in examples], np.int32)
    answer_len = np.asarray([len(e[1]) for e in examples], np.int32)
    if len(examples) == 0 or prompt_len.min() < 1 or answer_len.min() < 1:
        raise ValueError("collate needs at least one example, each with >= 1 prompt and >= 1 answer token")
    if pad_to is None:
        pad_to = (round_up(int(prompt_len.max()), bucket), round_up(int(answer_len.max()), bucket))
    P, A = pad_to
    if P < prompt_len.max() or A < answer_len.max():
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example "
                         f"({prompt_len.max()}, {answer_len.max()})")
    prompt_ids = np.zeros((len(examples), P), np.int32)  # [B, P]
    answer_ids = np.zeros((len(examples), A), np.int32)  # [B, A]
    for i, e in enumerate(examples):
        prompt_ids[i, :prompt_len[i]] = e[0]
        answer_ids[i, :answer_len[i]] = e[1]
    return {"prompt_ids": prompt_ids, "prompt_len": prompt_len, "answer_ids": answer_ids, "answer_len": answer_len}


class _LengthGroupedBatches(grain.MapDataset):
    """Global batches (arrays of example indices) of a stream of example indices.

    Element ``i`` is batch ``i % batches_per_epoch`` of epoch
    ``i // batches_per_epoch``; see the module docstring for the grouping.
    """

    def __init__(self, stream: grain.MapDataset, epoch_len: int, lengths: np.ndarray, batch_size: int,
                 window: int, seed: Optional[int]):
        super().__init__(stream)
        self._epoch_len = epoch_len
        self._lengths = lengths  # [N, 2]: prompt, answer lengths
        self._batch_size = batch_size
        self._window = window
        self._seed = seed  # None: keep sorted order (evaluation)
        self._per_epoch = epoch_len // batch_size
        self._cache = None  # (epoch, window index, sorted indices); a pure memo

    def __len__(self) -> int:
        n = len(self._parent)
        return sys.maxsize if n >= sys.maxsize else (n // self._epoch_len) * self._per_epoch

    def __str__(self) -> str:
        return f"LengthGroupedBatches(batch_size={self._batch_size}, window={self._window})"

    def _window_indices(self, epoch: int, w: int) -> np.ndarray:
        cached = self._cache
        if cached is not None and cached[0] == epoch and cached[1] == w:
            return cached[2]
        B = self._batch_size
        first = w * self._window
        count = min(self._window, self._per_epoch - first) * B
        start = epoch * self._epoch_len + first * B
        idx = np.asarray([self._parent[start + t] for t in range(count)], np.int64)
        if self._window > 1:
            lengths = self._lengths[idx]
            idx = idx[np.lexsort((lengths[:, 1], lengths[:, 0]))]  # stable: ties keep shuffled order
        self._cache = (epoch, w, idx)
        return idx

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._per_epoch)
        w, b = divmod(j, self._window)
        idx = self._window_indices(epoch, w)
        if self._seed is not None:
            b = int(np.random.default_rng([self._seed, epoch, w]).permutation(len(idx) // self._batch_size)[b])
        return idx[b * self._batch_size:(b + 1) * self._batch_size]


class _LocalBatch:
    """Global batch of indices -> this process's padded share (a batch dict)."""

    def __init__(self, examples: Sequence[Example], lengths: np.ndarray, bucket: int, process_index: int,
                 process_count: int, include_ids: bool, max_lens: Optional[Tuple[int, int]] = None,
                 pack_capacity: Optional[Tuple[int, int]] = None, pack_rows: str = "exact"):
        self._examples = examples
        self._lengths = lengths
        self._bucket = bucket
        self._max_lens = max_lens
        self._p, self._n = process_index, process_count
        self._include_ids = include_ids
        self._pack_capacity = pack_capacity  # None: one padded row per example
        self._pack_rows = pack_rows

    def _packed(self, idx: np.ndarray) -> Dict[str, np.ndarray]:
        # Every process lays out every share, so all agree on the row count and widths.
        shares = np.array_split(idx, self._n)
        layouts, pad_to = plan_packing([self._lengths[share] for share in shares], self._pack_capacity, self._bucket,
                                       self._pack_rows)
        local = shares[self._p]
        return pack([self._examples[i] for i in local], self._bucket, rows=layouts[self._p], pad_to=pad_to)

    def __call__(self, idx: np.ndarray) -> Dict[str, np.ndarray]:
        if self._pack_capacity is not None:
            return self._packed(idx)
        longest = [int(m) for m in self._lengths[idx].max(axis=0)]
        pad_to = tuple(round_up(m, self._bucket) for m in longest)
        if self._max_lens is not None:
            # Rounding past the configured maximum would only add padding: no example is longer.
            pad_to = tuple(min(p, max(cap, m)) for p, cap, m in zip(pad_to, self._max_lens, longest))
        local = np.array_split(idx, self._n)[self._p]
        batch = collate([self._examples[i] for i in local], self._bucket, pad_to=pad_to)
        if self._include_ids:
            batch["example_id"] = local.astype(np.int32)
        return batch


def _processes(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return process_index, process_count


def batch_dataset(examples: Sequence[Example], data_cfg: DataSection, *, train: bool = True,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  include_ids: bool = False, source: str = "<examples>") -> grain.MapDataset:
    """This process's batches of ``examples`` as a random-access grain dataset.

    Args:
      examples: from :func:`encode_examples` / :func:`load_examples`.
      data_cfg: ``batch_size`` (global), ``bucket``, ``sort_window``,
        ``shuffle_seed``, ``num_epochs`` and ``packing`` are used.
      train: True shuffles (reshuffled every epoch) and repeats for
        ``num_epochs``; False keeps the source order (still length-grouped),
        one epoch, no shuffling, for evaluation.
      process_index, process_count: this process's shard; default
        ``jax.process_index()`` / ``jax.process_count()``.
      include_ids: add ``example_id`` int32 [B_local] (index into ``examples``);
        not with ``data.packing``.
      source: where the examples came from, for error messages.

    Returns:
      A ``grain.MapDataset`` whose element ``i`` is batch ``i``; its length is
      ``epochs * (N // batch_size)`` (``sys.maxsize`` when repeating forever).
      Each process yields ``batch_size / process_count`` rows per batch, or
      with ``data.packing`` the same examples packed
      (:func:`~bitune_jax.data.packing.pack`) into the row count and widths
      of the process whose share needs the most.
    """
    p, n = _processes(process_index, process_count)
    B = data_cfg.batch_size
    if B % n:
        raise DataError(f"data.batch_size={B} is not divisible by the {n} processes")
    if len(examples) < B:
        raise DataError(f"{source}: {len(examples)} examples are fewer than one batch (data.batch_size={B})")
    if data_cfg.packing and include_ids:
        raise DataError("data.packing=true gives packed rows without per-example ids; per-example "
                        "evaluation and scoring need data.packing=false")
    lengths = np.asarray([(len(e[0]), len(e[1])) for e in examples], np.int64)  # [N, 2]
    stream = grain.MapDataset.range(len(examples))
    if train:
        stream = stream.shuffle(seed=data_cfg.shuffle_seed).repeat(data_cfg.num_epochs)
    batches = _LengthGroupedBatches(stream, len(examples), lengths, B, data_cfg.sort_window,
                                    data_cfg.shuffle_seed if train else None)
    max_lens = (data_cfg.max_prompt_len, data_cfg.max_answer_len)
    if data_cfg.max_len is not None:  # every example has >= 1 token of each part
        max_lens = tuple(min(m, data_cfg.max_len - 1) for m in max_lens)
    capacity = pack_capacity(data_cfg) if data_cfg.packing else None
    return batches.map(_LocalBatch(examples, lengths, data_cfg.bucket, p, n, include_ids, max_lens, capacity,
                                   data_cfg.pack_rows))


def make_iterator(dataset: grain.MapDataset, num_threads: int = 2, prefetch: int = 8) -> grain.DatasetIterator:
    """A prefetching iterator over ``dataset`` with resumable state.

    ``it.get_state()`` is a small JSON-ready dict; ``it.set_state(state)`` on
    a fresh iterator of the same dataset continues exactly where it was.
    """
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read))


def train_iterator(tokenizer, data_cfg: DataSection, *, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, batches: Optional[int] = None,
                   ) -> Tuple[grain.DatasetIterator, DataStats]:
    """Reads ``data.train`` and returns (resumable batch iterator, stats).

    ``batches``: how many batches the caller will draw (``train.steps *
    optim.grad_accum``); with ``data.num_epochs`` set, more than the epochs
    hold raises :class:`DataError` here, before any training.
    """
    if data_cfg.train is None:
        raise DataError("data.train is not set")
    examples, stats = load_examples(tokenizer, data_cfg.train, data_cfg)
    ds = batch_dataset(examples, data_cfg, train=True, process_index=process_index, process_count=process_count,
                       source=stats.summary())
    if batches is not None and data_cfg.num_epochs is not None and batches > len(ds):
        raise DataError(
            f"data.num_epochs={data_cfg.num_epochs}: {stats.source} gives {len(examples)} examples, "
            f"{len(examples) // data_cfg.batch_size} batches of data.batch_size={data_cfg.batch_size} per epoch, "
            f"{len(ds)} in all, but the run needs {batches} (train.steps x optim.grad_accum); raise "
            "data.num_epochs, lower train.steps, or set data.num_epochs=null to repeat the data")
    return make_iterator(ds), stats


def eval_dataset(tokenizer, data_cfg: DataSection, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Tuple[grain.MapDataset, DataStats]:
    """Reads ``data.eval``; returns its batches (unshuffled, one epoch) and stats.

    Index it directly (``ds[i]`` for ``i < min(len(ds), train.eval_batches)``)
    so every evaluation sees the same batches.
    """
    if data_cfg.eval is None:
        raise DataError("data.eval is not set")
    examples, stats = load_examples(tokenizer, data_cfg.eval, data_cfg)
    ds = batch_dataset(examples, data_cfg, train=False, process_index=process_index, process_count=process_count,
                       source=stats.summary())
    return ds, stats
