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
``BITUNE_DEBUG=1`` shows the traceback instead. A ``run`` may return its own
exit status (``compile``: 3 when the train step does not fit in HBM).
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
    "compile": "compile",
    "lm-eval": "lm_eval",
    "paper": "paper",
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
    _cpu_only_host_skips_tpu_probe()
    try:
        parser = build_parser()
        args = _parse(parser, argv)
        status = args._run(args)
    except (CommandImportError, UsageError) + USER_ERRORS as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0


def _parse(parser, argv):
    """``parser.parse_args(argv)``, except that ``key=value`` overrides may also follow options.

    argparse (before Python 3.12) stops filling a ``nargs="*"`` positional at
    the first option, so ``compile CONFIG --topology v5e:2x2 data.batch_size=8``
    would reject the override; such trailing arguments are appended to
    ``overrides`` instead (in the order given). Anything else left over is an
    error, as in ``parse_args``.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in a and not a.startswith("-")
                                                                       for a in extra):
            args.overrides = args.overrides + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# What JAX itself looks at to find accelerators (NVIDIA and AMD device files; TPU chips on the PCI bus under
# Google's vendor id), plus the device files TPU runtimes open. Any Google PCI device counts, to err on the side of
# leaving JAX's own choice alone.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _accelerator_attached() -> bool:
    """Whether this host shows a TPU chip or a GPU (or we cannot tell)."""
    import glob

    if any(os.path.exists(p) for p in _GPU_DEVICE_FILES) or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            return True
    return False


def _cpu_only_host_skips_tpu_probe() -> None:
    """On a host without accelerators, runs JAX on the CPU without first trying a TPU.

    With the ``tpu`` extra installed (libtpu, for ``bitune-jax compile``),
    JAX's first computation tries a TPU backend even where none is attached:
    it loads the 700 MB library (a few seconds and ~250 MB more memory) and
    libtpu prints warnings about missing TPU workers. When ``JAX_PLATFORMS``
    is unset, libtpu installed and no TPU chip or GPU attached, commands run
    with ``JAX_PLATFORMS=cpu``, the backend JAX would have ended up with.
    """
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or _accelerator_attached():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


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
