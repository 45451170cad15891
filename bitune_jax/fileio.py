"""Atomic file writes: nothing is ever half-written.

Every output file of the library (results, JSONL rows, configs, plots,
summaries) is written to a temporary file in the target folder and moved
into place with ``os.replace``, which is atomic on POSIX file systems: a
reader sees the old file or the complete new one, and a crash or an error
leaves no partial file behind (the temporary file is removed). A write the
file system refuses (read-only, full, a file where a folder should be) raises
:class:`OutputError` naming the target; commands call :func:`check_writable`
before their work, so they fail in seconds rather than after it.

Example:

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_text_atomic(os.path.join(d, "out.json"), '{"acc": 0.5}')
    >>> with atomic_path(os.path.join(d, "plot.png")) as tmp:
    ...     open(tmp, "wb").write(b"...")  # e.g. fig.savefig(tmp, format="png")
    3
    >>> try:  # out.json is a file, so nothing can be written under it
    ...     check_writable(os.path.join(d, "out.json", "results.json"))
    ... except OutputError as e:
    ...     print(str(e).replace(d, "D"))
    D/out.json/results.json: cannot write here: D/out.json is a file, not a folder
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Iterable, Iterator


class OutputError(ValueError, OSError):
    """An output file or folder cannot be written (read-only or full file system, not a folder, ...).

    An ``OSError`` too, so code that tolerates failed writes (``except OSError``) still does.
    """


def _cannot_write(path: str, e: OSError) -> OutputError:
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:  # os.makedirs met a file
        return OutputError(f"{path}: cannot write: a file stands where a folder should be ({e.strerror}: "
                           f"{e.filename})")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def check_writable(path: str, folder: bool = False) -> None:
    """Raises :class:`OutputError` unless ``path`` (a file; with ``folder``, a folder) can be written.

    The nearest existing folder on the way must be a folder that takes a new
    file: one is created and removed there. Nothing is left behind, and
    missing folders are not created.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        raise OutputError(f"{path}: cannot write here: it is a folder, not a file")
    if os.path.lexists(path) and not os.path.isdir(path) and folder:
        raise OutputError(f"{path}: cannot write here: it is a file, not a folder")
    existing = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{path}: cannot write here: {existing} is a file, not a folder")
    probe = os.path.join(existing, f".tmp-{uuid.uuid4().hex}-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{path}: cannot write in {existing}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on a clean exit it becomes ``path``.

    The file is created with mode 0o666 filtered by the umask, so it gets the
    permissions a plain ``open(path, "w")`` would give it (``mkstemp`` would
    make it readable by its owner only). On an exception the temporary file is
    removed and ``path`` is untouched; an ``OSError`` (a full or read-only
    file system) becomes an :class:`OutputError` naming ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as e:
        raise _cannot_write(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_temp_dir(parent: str, prefix: str) -> str:
    """Creates and returns a new empty folder ``<parent>/<prefix><random hex>``.

    Its mode is 0o777 filtered by the umask, as ``os.mkdir`` gives (the
    folder usually becomes an output by a rename); ``tempfile.mkdtemp``
    would make it 0o700.
    """
    path = os.path.join(parent, f"{prefix}{uuid.uuid4().hex}")
    os.mkdir(path)
    return path


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
