"""A normal (non-editable) install runs ``bitune-jax demo``: its configs ship inside the package.

The package is installed with ``pip install .`` (no dependencies, no build isolation) from a copy of the
source into a fresh virtual environment whose ``site-packages`` also sees the test environment's packages
(one ``.pth`` line; that folder's own ``.pth`` files, among them the editable install of this checkout, are
not run). The commands then run from a folder outside the source tree, which is on no ``sys.path``.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env, timeout=120):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_a_plain_install_runs_the_demo_with_its_packaged_configs(tmp_path):
    src = _mkdir(tmp_path / "src")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "bitune_jax"), src / "bitune_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=os.environ.copy())
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp_path, env=os.environ.copy()).strip()
    with open(os.path.join(site, "test_env.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # the test environment's packages (jax, pip, setuptools)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--ignore-installed", str(src)], cwd=tmp_path, env=env, timeout=300)
    shutil.rmtree(src)  # nothing may be read from the copy either

    elsewhere = _mkdir(tmp_path / "elsewhere")
    out = _run([str(venv / "bin" / "bitune-jax"), "demo", "--quick", "--help"], cwd=elsewhere, env=env)
    assert "usage: bitune-jax demo" in out and "--quick" in out

    probe = (
        "import os, sys, bitune_jax\n"
        "from bitune_jax.apps import demo\n"
        "from bitune_jax.config import load_config\n"
        "quick = load_config(os.path.join(demo.CONFIG_DIR, demo.PRESETS['quick']['config']))\n"
        "full = load_config(os.path.join(demo.CONFIG_DIR, demo.PRESETS['full']['config']))\n"
        "print(bitune_jax.__file__)\n"
        "print(demo.CONFIG_DIR)\n"
        "print(quick.train.steps, quick.data.max_prompt_len, full.train.steps, full.optim.lr)\n"
        f"print({ROOT!r} in [os.path.abspath(p) for p in sys.path])\n"
    )
    lines = _run([str(python), "-c", probe], cwd=elsewhere, env=env).splitlines()
    package_file, config_dir, values, source_on_path = lines[-4:]
    assert package_file.startswith(str(venv)) and not package_file.startswith(ROOT + os.sep)
    assert config_dir.startswith(str(venv))
    assert values == "8 128 30 0.002"  # the packaged demo_quick.yaml over its base demo.yaml
    assert source_on_path == "False"


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
