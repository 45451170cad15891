"""lm-evaluation-harness with bitune-jax models: ``bitune-jax lm-eval ARGS`` is ``lm-eval ARGS`` plus ``bitune_jax``.

Every argument after ``lm-eval`` goes to the harness's own command line
(``lm_eval.__main__.cli_evaluate``), which has no plugin mechanism for
models; this command first registers ``--model bitune_jax``
(:class:`bitune_jax.evaluation.lm_eval_adapter.BituneLM`). Example, an exported
adapter folder on the packaged SmolLM2-135M-Instruct::

    bitune-jax lm-eval --model bitune_jax --model_args model=smollm2,adapters=runs/x/adapters \\
        --tasks arc_easy --apply_chat_template --output_path results/

(the harness's packaged tasks such as ``arc_easy`` download their data; a task
YAML over local files, passed with ``--include_path``, runs offline: see the
README's lm-evaluation-harness section).

Model arguments: model, adapters, variant, dtype (float32, bfloat16),
batch_size, max_length, max_gen_toks, attention. Without ``--batch_size``
(on the command line or in a ``--config`` file) the model's own default is
used rather than the harness's 1; ``--batch_size auto`` means that default too
(there is no automatic search). ``bitune-jax lm-eval run --help`` shows the
harness's options; ``ls tasks`` and ``validate`` work as with ``lm-eval``.
"""
from __future__ import annotations

import argparse
import sys

HELP = "run lm-evaluation-harness (lm-eval's arguments) with --model bitune_jax"


def add_arguments(p) -> None:
    p.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="lm-eval's arguments (see `bitune-jax lm-eval run --help`)")
    # Every argument belongs to the harness, options included: with no prefix characters of its
    # own, this parser reads `--model bitune_jax ...` as the text it passes on.
    p.prefix_chars = "\0"
    p.set_defaults(_print_help=p.print_help)


def run(args) -> None:
    if args.harness_args in ([], ["-h"], ["--help"]):
        args._print_help()
        raise SystemExit(0)
    from bitune_jax.evaluation.lm_eval_adapter import register

    try:
        register()
    except ImportError as e:
        from bitune_jax.cli import CommandImportError

        raise CommandImportError(f"subcommand 'lm-eval' is unavailable: {e}") from e
    run_harness(args.harness_args)


def run_harness(harness_args) -> None:
    """``lm_eval.__main__.cli_evaluate`` on ``harness_args`` (it reads ``sys.argv``), plus this model's
    default batch size for a ``--model bitune_jax`` run that sets none."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    saved = sys.argv
    sys.argv = ["lm-eval", *harness_args]
    try:
        setup_logging()
        parser = HarnessCLI()
        ns = parser.parse_args()
        _default_batch_size(ns)
        parser.execute(ns)
    finally:
        sys.argv = saved


def _default_batch_size(ns) -> None:
    """Gives a ``run`` of ``bitune_jax`` without a batch size the adapter's default (the harness would use 1)."""
    from bitune_jax.evaluation.lm_eval_adapter import DEFAULT_BATCH_SIZE

    if getattr(ns, "command", None) != "run" or "batch_size" in vars(ns):  # --batch_size's default is SUPPRESS
        return
    config = {}
    if getattr(ns, "config", None):
        from lm_eval.config.evaluate_config import EvaluatorConfig

        config = EvaluatorConfig.load_yaml_config(ns.config)
    if (ns.model or config.get("model")) == "bitune_jax" and "batch_size" not in config:
        ns.batch_size = str(DEFAULT_BATCH_SIZE)
