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
packages; :data:`bitune_jax.errors.USER_ERRORS`) print one ``error:`` line
and exit with status 2; ``BITUNE_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
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
}


class CommandImportError(RuntimeError):
    """A subcommand's module could not be imported."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; raises :class:`CommandImportError` if a subcommand module fails to import."""
    parser = argparse.ArgumentParser(prog="bitune-jax", description="Bitune (bidirectional instruction tuning) in JAX")
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

    try:
        parser = build_parser()
    except CommandImportError as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        args._run(args)
    except USER_ERRORS as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
