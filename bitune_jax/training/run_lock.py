"""One training run per output directory: the lock file ``<output_dir>/train.lock``.

Two runs writing one directory would interleave their checkpoints and
metrics, so :func:`hold` takes a lock before a run touches anything there.
The lock is a small JSON file naming its owner::

    {"host": "node-3", "pid": 4121, "pid_start": 918273, "started": 1700000000.0, "token": "9f2c..."}

and a background thread refreshes its modification time every
:data:`HEARTBEAT_S` seconds while the run lives. Whether an existing lock
stops a new run:

* same host, owner process alive: refused (:class:`RunLockedError`);
* same host, owner process gone (SIGKILL, crash, reboot; a reused PID is
  told apart by its start time): stale, taken over with a message;
* another host: refused while the lock is fresher than :data:`STALE_AFTER_S`
  (the owner's host cannot be asked whether it lives); older than that, the
  owner is presumed dead and the lock is taken over with a message;
* ``break_lock=True`` (``--break-lock``) takes over any lock, with a message.

The lock is created with ``os.link`` of a complete file, so a reader never
sees it half-written, and taken over by renaming the stale file away first,
so of two runs that find the same stale lock only one gets it. With several
processes (``jax.process_count() > 1``) only process 0 takes the lock; the
others learn whether it succeeded and stop with the same error if not.

Example:

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> with hold(run):
    ...     try:
    ...         with hold(run):
    ...             pass
    ...     except RunLockedError as e:
    ...         print("refused:", "is in use by" in str(e))
    refused: True
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a lock from another host not refreshed for this long is stale


class RunLockedError(ValueError):
    """Another run holds the output directory."""


def _pid_start(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, pid_start: Optional[int]) -> bool:
    """Whether the process ``pid`` of this host still runs (and is the one that started at ``pid_start``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _pid_start(pid)
    return pid_start is None or now is None or now == pid_start


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: judged by its age, like a lock of another host


def _describe(owner: dict, age: float) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}, "
            f"last refreshed {age:.0f} s ago")


class _Lock:
    """A lock file this process created; refreshed by a daemon thread until :meth:`release`."""

    def __init__(self, path: str, owner: dict):
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="train.lock heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        self._stop.set()
        self._thread.join()
        if (_read(self.path) or {}).get("token") == self.owner["token"]:  # not taken over meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def acquire(out_dir: str, *, break_lock: bool = False, say: Callable[[str], None] = print) -> _Lock:
    """Takes ``<out_dir>/train.lock`` (see the module docstring) or raises :class:`RunLockedError`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    host, pid = socket.gethostname(), os.getpid()
    owner = {"host": host, "pid": pid, "pid_start": _pid_start(pid), "started": time.time(),
             "token": uuid.uuid4().hex}
    tmp = f"{path}.{owner['token']}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(owner, f)
    try:
        for _ in range(10):  # each turn either takes the lock or finds one to judge
            try:
                os.link(tmp, path)
                return _Lock(path, owner)
            except FileExistsError:
                pass
            current = _read(path)
            if current is None:
                continue  # released meanwhile
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            who = _describe(current, age)
            if break_lock:
                why = "--break-lock"
            elif current.get("host") == host and isinstance(current.get("pid"), int):
                if _alive(current["pid"], current.get("pid_start")):
                    raise RunLockedError(
                        f"train.output_dir {out_dir} is in use by another run ({who}); "
                        "wait for it to finish, or use another train.output_dir")
                why = f"process {current['pid']} is no longer running"
            elif age > STALE_AFTER_S:
                why = f"not refreshed for {age:.0f} s (> {STALE_AFTER_S:.0f} s)"
            else:
                raise RunLockedError(
                    f"train.output_dir {out_dir} is in use by another run ({who}); if that run "
                    f"is gone, the lock becomes stale {STALE_AFTER_S:.0f} s after its last refresh, or pass "
                    "--break-lock (train(..., break_lock=True)) to take it over now")
            stale = f"{path}.stale-{owner['token']}"
            try:
                os.rename(path, stale)  # only one of several runs taking over wins this rename
            except FileNotFoundError:
                continue
            if (_read(stale) or {}).get("token") != current.get("token"):  # another run took it over meanwhile
                with contextlib.suppress(FileExistsError):
                    os.link(stale, path)
                os.remove(stale)
                continue
            os.remove(stale)
            say(f"taking over the lock of {path} ({who}): {why}")
        raise RunLockedError(f"could not take {path}: it keeps changing hands")
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def hold(out_dir: str, *, break_lock: bool = False, main: bool = True,
         say: Callable[[str], None] = print) -> Iterator[None]:
    """Holds the run lock of ``out_dir`` for the ``with`` block.

    ``main``: whether this is process 0, the one that takes the lock; with
    several processes all of them call ``hold`` and raise together if process
    0 could not take it.
    """
    import jax

    lock, error = None, None
    if main:
        try:
            lock = acquire(out_dir, break_lock=break_lock, say=say)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = bool(max(multihost_utils.process_allgather(int(error is not None))))
        if failed and error is None:
            error = RunLockedError(f"process 0 could not lock train.output_dir {out_dir} (see its message)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
