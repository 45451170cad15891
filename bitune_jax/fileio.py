"""Atomic file writes: nothing is ever half-written.

Every output file of the library (results, JSONL rows, configs, plots,
summaries) is written to a temporary file in the target folder and moved
into place with ``os.replace``, which is atomic on POSIX file systems: a
reader sees the old file or the complete new one, and a crash or an error
leaves no partial file behind (the temporary file is removed).

Example:

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_text_atomic(os.path.join(d, "out.json"), '{"acc": 0.5}')
    >>> with atomic_path(os.path.join(d, "plot.png")) as tmp:
    ...     open(tmp, "wb").write(b"...")  # e.g. fig.savefig(tmp, format="png")
    3
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on a clean exit it becomes ``path``.

    The file is created with mode 0o666 filtered by the umask, so it gets the
    permissions a plain ``open(path, "w")`` would give it (``mkstemp`` would
    make it readable by its owner only). On an exception the temporary file is
    removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def cache_dir(*parts: str) -> str:
    """A folder under this library's cache root, ``$XDG_CACHE_HOME/bitune_jax`` (default ``~/.cache/bitune_jax``).

    Only derived data that can be rebuilt goes there (file hashes, converted
    tokenizers). The folder is not created.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "bitune_jax", *parts)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
