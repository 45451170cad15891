"""The ``bitune-jax`` command: a thin layer over the library.

Every subcommand lives in its own module of this package (listed in
:data:`COMMANDS`), which defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args)``; ``run`` turns the arguments into plain values and calls one
library function, so everything a command does can be done from Python too.
Library code never sees ``argparse``.

The subcommand modules import only light modules at the top and the library
inside ``run``, so ``bitune-jax --help`` does not load JAX. A subcommand
module that cannot be imported makes every ``bitune-jax`` call fail with one
``error:`` line naming it (exit status 2), rather than the command quietly
missing from the list.

Expected failures (bad files, bad configs, unsupported models, missing
packages, unwritable outputs; :data:`bitune_jax.errors.USER_ERRORS`) and bad
command-line arguments print one ``error:`` line and exit with status 2;
``BITUNE_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> its module in bitune_jax.cli, in the order ``--help`` lists them
COMMANDS = {
    "train": "train",
    "export-adapters": "export_adapters",
    "score": "score",
    "eval": "evaluate",
    "generate": "generate",
    "demo": "demo",
    "bench": "bench",
    "lm-eval": "lm_eval",
}


class CommandImportError(RuntimeError):
    """A subcommand's module could not be imported."""


class UsageError(Exception):
    """A bad command line (unknown option, bad value); the message names the option."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised as :class:`UsageError` instead of printing the usage."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; raises :class:`CommandImportError` if a subcommand module fails to import."""
    parser = _Parser(prog="bitune-jax", description="Bitune (bidirectional instruction tuning) in JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module_path = f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(module_path)
        except ImportError as e:
            raise CommandImportError(f"subcommand '{name}' is unavailable: importing {module_path} failed: "
                                     f"{type(e).__name__}: {e}") from e
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)  # `run` may be an argument's name (export-adapters RUN)
    return parser


def main(argv=None) -> int:
    """Runs ``bitune-jax`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from bitune_jax.errors import USER_ERRORS

    _quiet_abandoned_async_reads()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args._run(args)
    except (CommandImportError, UsageError) + USER_ERRORS as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (YAML and JSON errors span several)."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


class _AbandonedTaskFilter(logging.Filter):
    def filter(self, record):
        return not str(record.msg).endswith("exception was never retrieved")


def _quiet_abandoned_async_reads() -> None:
    """Silences the echoes of a checkpoint that failed to restore, for this process.

    When one array of a checkpoint cannot be read, orbax raises at once and
    closes its event loop while tensorstore still reads the other arrays; their
    completions then print an "Event loop is closed" traceback each (through
    ``sys.unraisablehook``) and asyncio logs "exception was never retrieved"
    for the abandoned tasks. The failure itself is reported as one ``error:``
    line (``checkpoint.CheckpointError``); only these echoes are dropped.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedTaskFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_bitune_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._bitune_quiet = True
    sys.unraisablehook = hook
