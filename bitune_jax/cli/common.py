"""Flags shared by several subcommands."""
from __future__ import annotations

import argparse

# The implementations of bitune_jax.model.attention.IMPLEMENTATIONS, spelled out here so that
# `bitune-jax --help` does not import JAX (tests/test_cli.py checks the two lists agree).
ATTENTION_CHOICES = ("reference", "blocked", "xla", "cudnn", "splash", "auto")


def add_attention_flag(p) -> None:
    """``--attention``: the attention implementation of every layer (default ``auto``)."""
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention implementation: auto (splash on TPU, cuDNN on GPU, blocked on CPU), "
                        "reference (dense), blocked (online softmax, recomputed in the backward pass), xla, "
                        "cudnn (GPU only), splash (Pallas TPU kernel; TPU only)")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (batch sizes, item counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def item_range(text: str) -> tuple:
    """An argparse ``type``: ``START:STOP`` -> ``(start, stop)``, 0-based, STOP exclusive; either may be empty.

    ``1000:1400`` is items 1000..1399; ``:400`` the first 400; ``1000:`` item 1000 to the end (stop None).
    """
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        first = int(start) if start.strip() else 0
        end = int(stop) if stop.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 1000:1400, :400, 1000:), got {text!r}") from None
    if first < 0 or (end is not None and end <= first):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < STOP")
    return first, end


def task_source(text: str) -> tuple:
    """An argparse ``type``: ``TASK=PATH`` -> ``(task, path)``."""
    task, sep, path = text.partition("=")
    if not sep or not task.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=PATH (e.g. piqa=items.jsonl), got {text!r}")
    return task.strip(), path.strip()
