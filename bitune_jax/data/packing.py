"""Sequence packing: several examples laid out in one row of a batch.

Unpacked, every example of a batch gets a row of its own, right-padded to
the longest prompt and answer of the batch
(:func:`bitune_jax.data.pipeline.collate`), so a batch of mixed lengths is
mostly padding. With ``data.packing`` (:class:`bitune_jax.config.DataSection`)
the same examples share rows instead (:func:`pack`)::

    pre_ids, pre_pos, pre_seg                 int32 [R, S]  prefill spans
    ans_ids, ans_pos, ans_seg, targets        int32 [R, A]  answer streams

Example ``i`` with prompt ``x[0..L)`` and answer ``y[0..M)`` puts its
prefill span ``x[0..L-1)`` in the ``pre_*`` arrays and its answer-stream
tokens ``[x[L-1], y[0..M-1)]`` (predicting ``targets = y``) in the
``ans_*`` arrays of its row, after the row's earlier examples. Each token
carries its example's **segment id** (1, 2, ... within a row; 0 on
padding), which keeps attention within an example, and its **position**
within its own example (``0..L-2`` in the prefill span, ``L-1..L+M-2`` in
the answer stream): positions restart with every example of a row.
:func:`bitune_jax.bitune.loss_fn` therefore gives a packed batch exactly
the loss (and gradients) of the same examples unpacked.

Which examples share a row is a pure function of their lengths:
:func:`pack_rows` fills rows first-fit, longest prefill span first;
:func:`plan_packing` picks the prefill width (a multiple of ``data.bucket``)
that needs the fewest array cells, for the shares of every process at once,
so all processes build arrays of one shape; :func:`pack_capacity` is the
most a row may hold under a config. :func:`concat_packed` joins the packed
micro-batches of an accumulated step and :func:`real_tokens` counts the
tokens that are not padding. The grain pipeline
(:func:`bitune_jax.data.pipeline.batch_dataset`) calls these when
``data.packing`` is set; :mod:`bitune_jax.data.pipeline` re-exports them.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from bitune_jax import bitune
from bitune_jax.config import DataSection


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``, and at least ``multiple``: the bucketed pad length.

    Padding every batch dimension to such a length keeps the number of distinct
    shapes (and so of compilations) small. Used by the data pipeline, scoring
    and generation alike (here because packing needs it and must not import
    :mod:`bitune_jax.data.pipeline`, which re-exports it).

    >>> round_up(5, 4), round_up(8, 4), round_up(0, 4)
    (8, 8, 4)
    """
    return max(multiple, -(-n // multiple) * multiple)


def pack_capacity(data_cfg: DataSection) -> Tuple[int, int]:
    """(prefill-span, answer-stream) tokens one packed row may hold under ``data_cfg``.

    What the longest example allowed needs: ``max_prompt_len - 1`` prefill
    and ``max_answer_len`` answer tokens (each at most ``max_len - 1`` when
    ``max_len`` is set).

    >>> pack_capacity(DataSection(max_prompt_len=448, max_answer_len=64, bucket=32))
    (447, 64)
    """
    P, A = data_cfg.max_prompt_len, data_cfg.max_answer_len
    if data_cfg.max_len is not None:
        P, A = min(P, data_cfg.max_len - 1), min(A, data_cfg.max_len - 1)
    return P - 1, A


def pack_rows(lengths: Sequence[Sequence[int]], capacity: Tuple[int, int]) -> List[List[int]]:
    """Which examples share a row: a list of rows, each the indices of its examples in order.

    ``lengths`` are ``(prompt_len, answer_len)`` pairs; example ``i`` needs
    ``prompt_len - 1`` prefill-span and ``answer_len`` answer-stream tokens.
    First fit, longest prefill span first (ties: longer answer, then lower
    index): each example goes into the first row where both still fit, else
    into a new row. A row's examples keep the order of ``lengths``, rows are
    ordered by their first example, and the capacity grows to the longest
    example if needed. A pure function of its arguments.

    >>> pack_rows([(3, 2), (5, 1), (2, 2), (4, 3)], capacity=(6, 5))
    [[0, 1], [2, 3]]
    """
    need = [(int(p) - 1, int(a)) for p, a in lengths]
    cap_s = max([capacity[0]] + [s for s, _ in need])
    cap_a = max([capacity[1]] + [a for _, a in need])
    rows: List[List[int]] = []
    fill: List[List[int]] = []
    for i in sorted(range(len(need)), key=lambda i: (-need[i][0], -need[i][1], i)):
        s, a = need[i]
        for r, (fs, fa) in enumerate(fill):
            if fs + s <= cap_s and fa + a <= cap_a:
                rows[r].append(i)
                fill[r] = [fs + s, fa + a]
                break
        else:
            rows.append([i])
            fill.append([s, a])
    return sorted(sorted(r) for r in rows)


def _row_widths(lengths: np.ndarray, rows: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """Longest (prefill span, answer stream) of the rows."""
    return (max(int(sum(lengths[i, 0] - 1 for i in r)) for r in rows),
            max(int(sum(lengths[i, 1] for i in r)) for r in rows))


def _width(fill: int, cap: int, bucket: int) -> int:
    """A row width for ``fill`` tokens: rounded up to ``bucket`` but not past the capacity (as the padded batches)."""
    return max(1, min(round_up(fill, bucket), max(cap, fill)))


ROW_POLICIES = ("exact", "pow2")


def _rows(needed: int, most: int, policy: str) -> int:
    """Rows of a packed batch that needs ``needed`` of at most ``most``: as is, or the next power of two."""
    if policy == "exact":
        return needed
    if policy == "pow2":
        return min(1 << (needed - 1).bit_length(), max(most, needed))
    raise ValueError(f"data.pack_rows={policy!r}; allowed: {', '.join(ROW_POLICIES)}")


def plan_packing(shares: Sequence[np.ndarray], capacity: Tuple[int, int], bucket: int, row_policy: str = "exact"
                 ) -> Tuple[List[List[List[int]]], Tuple[int, int, int]]:
    """Row layouts of every process's share of a global batch and their common shape ``(R, S, A)``.

    ``shares[p]`` holds the ``(prompt_len, answer_len)`` pairs of process
    ``p``'s examples. The prefill width a row may fill is chosen among the
    multiples of ``bucket`` from the longest example's prefill span up to
    ``capacity[0]`` (answers up to ``capacity[1]``): the one whose layouts
    (:func:`pack_rows`) need the fewest cells ``R * (S + A)``, the narrowest
    among equals (attention costs grow with the square of the width). So a
    batch of similar lengths stays about one example per row, as unpacked,
    and a batch of mixed lengths fills rows with its short examples. Widths
    are rounded up to ``bucket`` but not past the capacity. ``row_policy``
    (``data.pack_rows``): ``exact`` keeps the rows the layouts need;
    ``pow2`` rounds them up to a power of two (but never past one row per
    example), so batches take fewer distinct shapes (compilations) for some
    padding rows. A pure function of its arguments.

    >>> layouts, shape = plan_packing([np.array([[9, 2], [3, 2], [3, 2], [2, 1]])], (12, 8), bucket=4)
    >>> layouts, shape
    ([[[0], [1, 2, 3]]], (2, 8, 8))
    >>> lengths = [np.array([[9, 2], [9, 2], [3, 2], [2, 1]])]
    >>> plan_packing(lengths, (8, 4), 4), plan_packing(lengths, (8, 4), 4, "pow2")
    (([[[0], [1], [2, 3]]], (3, 8, 4)), ([[[0], [1], [2, 3]]], (4, 8, 4)))
    """
    shares = [np.asarray(s, np.int64).reshape(-1, 2) for s in shares]
    longest = max(int(s[:, 0].max()) - 1 for s in shares)
    most = max(int((s[:, 0] - 1).sum()) for s in shares)  # all of a share's spans in one row
    cap_s, cap_a = max(capacity[0], longest), capacity[1]
    best = None
    width = _width(longest, cap_s, bucket)
    while True:
        layouts = [pack_rows(s, (width, cap_a)) for s in shares]
        widths = [_row_widths(s, rows) for s, rows in zip(shares, layouts)]
        shape = (_rows(max(len(rows) for rows in layouts), max(len(s) for s in shares), row_policy),
                 _width(max(w[0] for w in widths), cap_s, bucket), _width(max(w[1] for w in widths), cap_a, bucket))
        cost = shape[0] * (shape[1] + shape[2])
        if best is None or cost < best[0]:
            best = (cost, layouts, shape)
        if width >= cap_s or width >= most:
            return best[1], best[2]
        width = _width(width + bucket, cap_s, bucket)


def pack(examples: Sequence[Sequence], bucket: int = 1, capacity: Optional[Tuple[int, int]] = None,
         rows: Optional[Sequence[Sequence[int]]] = None,
         pad_to: Optional[Tuple[int, int, int]] = None) -> Dict[str, np.ndarray]:
    """Lays ``(prompt_ids, answer_ids, ...)`` examples out several to a row: the packed batch format.

    Example ``i`` with prompt ``x[0..L)`` and answer ``y[0..M)`` contributes
    its prefill span ``x[0..L-1)`` (empty for a 1-token prompt) to its row of
    the ``pre_*`` arrays and ``[x[L-1], y[0..M-1)]`` to the same row of the
    ``ans_*`` arrays, both after the row's earlier examples, with positions
    ``0..L-2`` and ``L-1..L+M-2`` and the segment id ``s`` (1 for a row's
    first example, 2 for its second, ...; 0 on padding). :func:`bitune_jax.
    bitune.loss_fn` gives such a batch the loss of the examples unpacked.

    Args:
      examples: sequences whose first two items are prompt and answer ids
        (non-empty).
      bucket: row widths are rounded up to a multiple of this.
      capacity: (prefill, answer) tokens a row may hold; default: the
        longest example's, rounded up to ``bucket``.
      rows: the row layout (:func:`pack_rows`); default ``pack_rows(lengths,
        capacity)``.
      pad_to: explicit ``(rows, S, A)``, so every process's share of a global
        batch (and every part of an accumulated step) has one shape.

    Returns:
      ``{"pre_ids", "pre_pos", "pre_seg": int32 [R, S], "ans_ids",
      "ans_pos", "ans_seg", "targets": int32 [R, A]}`` (``targets`` are the
      answer tokens ``y`` each answer-stream token predicts), zero-padded.

    >>> b = pack([([1, 5, 6], [7, 2]), ([1], [8, 2]), ([1, 9], [3])], bucket=4, capacity=(4, 8))
    >>> b["pre_ids"].tolist(), b["pre_seg"].tolist(), b["pre_pos"].tolist()
    ([[1, 5, 1, 0]], [[1, 1, 3, 0]], [[0, 1, 0, 0]])
    >>> b["ans_ids"].tolist(), b["ans_seg"].tolist(), b["ans_pos"].tolist(), b["targets"].tolist()
    ([[6, 7, 1, 8, 9, 0, 0, 0]], [[1, 1, 2, 2, 3, 0, 0, 0]], [[2, 3, 0, 1, 1, 0, 0, 0]], [[7, 2, 8, 2, 3, 0, 0, 0]])
    """
    lengths = np.asarray([(len(e[0]), len(e[1])) for e in examples], np.int64).reshape(-1, 2)
    if len(examples) == 0 or lengths.min() < 1:
        raise ValueError("pack needs at least one example, each with >= 1 prompt and >= 1 answer token")
    if capacity is None:
        capacity = (round_up(int(lengths[:, 0].max()) - 1, bucket), round_up(int(lengths[:, 1].max()), bucket))
    if rows is None:
        rows = pack_rows(lengths, capacity)
    if sorted(i for r in rows for i in r) != list(range(len(examples))):
        raise ValueError("pack: rows must hold every example exactly once")
    s_need, a_need = _row_widths(lengths, rows)
    if pad_to is None:
        pad_to = (len(rows), round_up(s_need, bucket), round_up(a_need, bucket))
    R, S, A = pad_to
    if R < len(rows) or S < s_need or A < a_need:
        raise ValueError(f"pad_to={tuple(pad_to)} is smaller than the packed rows ({len(rows)}, {s_need}, {a_need})")
    out = {k: np.zeros((R, S), np.int32) for k in ("pre_ids", "pre_pos", "pre_seg")}
    out.update({k: np.zeros((R, A), np.int32) for k in ("ans_ids", "ans_pos", "ans_seg", "targets")})
    for r, members in enumerate(rows):
        s_off = a_off = 0
        for seg, i in enumerate(members, start=1):
            x, y = np.asarray(examples[i][0]), np.asarray(examples[i][1])
            L, M = len(x), len(y)
            span = slice(s_off, s_off + L - 1)
            out["pre_ids"][r, span] = x[:L - 1]
            out["pre_pos"][r, span] = np.arange(L - 1)
            out["pre_seg"][r, span] = seg
            span = slice(a_off, a_off + M)
            out["ans_ids"][r, span] = np.concatenate([x[L - 1:], y[:M - 1]])
            out["ans_pos"][r, span] = np.arange(L - 1, L - 1 + M)
            out["ans_seg"][r, span] = seg
            out["targets"][r, span] = y
            s_off, a_off = s_off + L - 1, a_off + M
    return out


def concat_packed(parts: Sequence[Mapping[str, np.ndarray]], row_multiple: int = 1) -> Dict[str, np.ndarray]:
    """Packed batches padded to one shape (rows a multiple of ``row_multiple``) and concatenated.

    Row ``k * R`` onwards is part ``k``, so splitting the result into
    ``len(parts)`` equal row blocks gives the parts back (gradient
    accumulation); added rows are all padding and count for nothing.
    """
    R = round_up(max(p["ans_seg"].shape[0] for p in parts), row_multiple)
    S = max(p["pre_seg"].shape[1] for p in parts)
    A = max(p["ans_seg"].shape[1] for p in parts)

    def grow(x, width):
        return np.pad(x, ((0, R - x.shape[0]), (0, width - x.shape[1])))

    return {k: np.concatenate([grow(p[k], S if k.startswith("pre_") else A) for p in parts])
            for k in bitune.PACKED_KEYS}


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Prompt plus answer tokens of the examples of a batch (padded or packed format)."""
    if bitune.is_packed(batch):
        seg = np.asarray(batch["ans_seg"])
        # A prompt of L tokens shows L - 1 in the prefill span and its last one in the answer stream.
        return int((np.asarray(batch["pre_seg"]) > 0).sum() + (seg > 0).sum() + seg.max(axis=1).sum())
    return int(np.sum(batch["prompt_len"]) + np.sum(batch["answer_len"]))
