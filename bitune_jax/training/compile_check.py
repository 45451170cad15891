"""Does a run fit on a TPU slice? Compile its train step for the slice, on any host.

libtpu has a compile-only mode: given a topology name (``v5e:4x4``) it
describes that slice's devices without any TPU attached, and XLA compiles a
program for them as it would on the slice. :func:`compile_train_step` builds
the run's real train step (:func:`bitune_jax.training.step.make_train_step`,
with the mesh, logical-axis rules, optimizer, remat policy and attention of
the config) over those devices, from abstract inputs only
(``jax.ShapeDtypeStruct``: no weights are read, the base shapes come from the
model's ``config.json`` or GGUF metadata), lowers and compiles it, and reports
what XLA plans per chip (arguments, outputs, temporaries, peak) against the
chip's HBM, the compile time and the model FLOPs of one step. MaxText's
``train_compile.py`` is the public example of the technique.

A step that does not fit fails to compile (XLA's ``RESOURCE_EXHAUSTED``);
that becomes :class:`DoesNotFitError`, whose message says by how much and
what to change. ``bitune-jax compile CONFIG.yaml --topology v5e:2x2
[key=value ...]`` runs this from the shell (exit status 3 when it does not
fit). libtpu is the optional ``tpu`` extra (``pip install -e ".[tpu]"``); it
is loaded into the process by :func:`tpu_devices` only.

The step is compiled for the largest batch the run can feed it
(:func:`largest_batch`: every example of the step at the longest the config
allows, padded or, with ``data.packing``, packed), so a run that compiles
here fits whatever its data.

``cost_analysis()`` of a compiled program does not count the FLOPs inside
Pallas kernels (such as splash attention) and counts a loop's body once (the
layers are a ``lax.scan``), so the reported model FLOPs come from
:func:`bitune_jax.apps.bench.step_flops` instead; XLA's own count is
reported next to it as it is.

Example (needs libtpu; a notebook)::

    from bitune_jax.config import load_config
    from bitune_jax.training.compile_check import compile_train_step
    report = compile_train_step(load_config("configs/gemma2b_instruct.yaml",
                                            ["model.source=configs/models/gemma-2b"]), "v5e:2x2")
    report["memory_per_chip"]["peak_bytes"] / 2 ** 30
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Tuple

GiB = 2 ** 30

# HBM per chip, by generation, from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
# Each entry: (dimensions of the topology name, HBM bytes per chip, libtpu chip configuration).
# v4 and v5p chips have two TensorCores that run as one device ("megacore").
GENERATIONS = {
    "v4": (3, 32 * GiB, "megacore"),
    "v5e": (2, 16 * GiB, "default"),
    "v5p": (3, 95 * GiB, "megacore"),
    "v6e": (2, 32 * GiB, "default"),
}
EXAMPLES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}

INSTALL = 'pip install -e ".[tpu]"  (or: pip install "jax[tpu]==<your jax version>")'


class TpuCompilerMissingError(ValueError):
    """libtpu (the TPU compiler) is not installed."""


class DoesNotFitError(Exception):
    """The train step needs more HBM per chip than the topology has (XLA's ``RESOURCE_EXHAUSTED``).

    Not a ``ValueError``: the config is valid, the slice is too small for it
    (``bitune-jax compile`` exits with status 3 for it, 2 for bad input).
    """


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice named like ``v5e:4x4``: a chip generation and its chip grid.

    >>> t = Topology.parse("v5e:4x4")
    >>> t.chips, t.hbm_bytes // 2 ** 30, t.chips_per_host_bounds
    (16, 16, (2, 2, 1))
    >>> Topology.parse("v4:2x2x1").chip_config_name
    'megacore'
    """

    generation: str
    dims: Tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "Topology":
        """``GENERATION:AxB[xC]`` (v4 and v5p take three dimensions, v5e and v6e two); ``ValueError`` otherwise."""
        allowed = ", ".join(f"{g} (e.g. {EXAMPLES[g]})" for g in GENERATIONS)
        gen, sep, shape = str(text).strip().lower().partition(":")
        if not sep or gen not in GENERATIONS:
            raise ValueError(f"--topology {text!r}: expected GENERATION:AxB[xC]; generations: {allowed}")
        try:
            dims = tuple(int(x) for x in shape.split("x"))
        except ValueError:
            dims = ()
        if len(dims) != GENERATIONS[gen][0] or min(dims) < 1:
            raise ValueError(f"--topology {text!r}: {gen} takes {GENERATIONS[gen][0]} dimensions >= 1 "
                             f"(e.g. {EXAMPLES[gen]}); generations: {allowed}")
        return cls(gen, dims)

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.dims))}"

    @property
    def chips(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation][1]

    @property
    def chip_config_name(self) -> str:
        return GENERATIONS[self.generation][2]

    @property
    def chips_per_host_bounds(self) -> Tuple[int, int, int]:
        """Chips of one host in each dimension: 2x2 hosts (v4/v5p: 2x2x1), smaller slices on one host."""
        return (min(self.dims[0], 2), min(self.dims[1], 2), 1)

    @property
    def wrap(self) -> Tuple[bool, bool, bool]:
        """Torus wrap-around links: v4/v5p slices of 4x4x4 and up, v5e/v6e dimensions of 16."""
        if len(self.dims) == 3:
            return (min(self.dims) >= 4,) * 3
        return (self.dims[0] == 16, self.dims[1] == 16, False)

    @property
    def libtpu_name(self) -> str:
        """The topology name libtpu takes (it calls v5p ``v5``)."""
        return self.name.replace("v5p:", "v5:")


def have_tpu_compiler() -> bool:
    """Whether libtpu is installed (checked without importing it)."""
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: Topology):
    """Compile-only devices of ``topology`` (loads libtpu into this process).

    Raises :class:`TpuCompilerMissingError` when libtpu is not installed and
    ``ValueError`` when libtpu rejects the topology.
    """
    if not have_tpu_compiler():
        raise TpuCompilerMissingError(f"compiling for a TPU topology needs libtpu, which is not installed; "
                                      f"run: {INSTALL}")
    # Without TPUs attached, libtpu would otherwise ask the cloud metadata server for the slice. And it takes a
    # machine-wide lock (/tmp/libtpu_lockfile) that would make a second compile at the same time (or a training
    # run on this host's TPUs) fail; compiling touches no TPU, so it does not need the lock.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_native_stderr():  # libtpu's start-up complaints that this host is no TPU worker
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name,
                                                chip_config_name=topology.chip_config_name,
                                                chips_per_host_bounds=topology.chips_per_host_bounds,
                                                num_slices=1, wrap=topology.wrap)
    except Exception as e:  # libtpu's own words, e.g. an unsupported grid
        raise ValueError(f"--topology {topology.name!r}: libtpu cannot describe it: {_first_line(e)}") from None
    return list(desc.devices)


def largest_batch(cfg, batch_devices: int = 1) -> dict:
    """The largest batch the training loop can feed one step of run ``cfg``, as ``jax.ShapeDtypeStruct``.

    Its ``data.batch_size * optim.grad_accum`` examples are taken at the
    longest the config allows. Padded format
    (:func:`bitune_jax.data.pipeline.collate`): that many rows of
    ``max_prompt_len`` prompt and ``max_answer_len`` answer tokens (each at
    most ``max_len - 1``). With ``data.packing``
    (:func:`bitune_jax.data.packing.pack`): examples that long share no
    row, so one row each at the row capacity
    (:func:`~bitune_jax.data.packing.pack_capacity`), rows rounded up to a
    multiple of ``batch_devices`` per micro-batch as the loop rounds them.
    Packing lowers the number of rows a typical step gets, not this largest
    shape.

    >>> from bitune_jax.config import Config
    >>> cfg = Config.from_dict({"data": {"batch_size": 3, "max_prompt_len": 448, "max_answer_len": 64}})
    >>> {k: v.shape for k, v in largest_batch(cfg).items()}
    {'prompt_ids': (3, 448), 'prompt_len': (3,), 'answer_ids': (3, 64), 'answer_len': (3,)}
    >>> packed = Config.from_dict({"data": {"batch_size": 3, "packing": True}})
    >>> largest_batch(packed, batch_devices=2)["pre_ids"].shape, largest_batch(packed)["ans_seg"].shape
    ((4, 447), (3, 64))
    """
    import jax
    import jax.numpy as jnp

    from bitune_jax import bitune
    from bitune_jax.data import pipeline

    data, accum = cfg.data, cfg.optim.grad_accum
    if getattr(data, "packing", False):
        rows = accum * pipeline.round_up(data.batch_size, batch_devices)
        S, A = pipeline.pack_capacity(data)
        return {k: jax.ShapeDtypeStruct((rows, S if k.startswith("pre_") else A), jnp.int32)
                for k in bitune.PACKED_KEYS}
    P, A = data.max_prompt_len, data.max_answer_len
    if getattr(data, "max_len", None) is not None:
        P, A = min(P, data.max_len - 1), min(A, data.max_len - 1)
    rows = accum * data.batch_size
    return {"prompt_ids": jax.ShapeDtypeStruct((rows, P), jnp.int32),
            "prompt_len": jax.ShapeDtypeStruct((rows,), jnp.int32),
            "answer_ids": jax.ShapeDtypeStruct((rows, A), jnp.int32),
            "answer_len": jax.ShapeDtypeStruct((rows,), jnp.int32)}


def abstract_inputs(cfg, model_cfg, optimizer, batch_devices: int = 1):
    """``(state, base, batch)`` of run ``cfg`` as ``jax.ShapeDtypeStruct`` trees (nothing is allocated).

    ``state`` is what :func:`bitune_jax.training.step.init_state` makes of
    fresh adapters, ``base`` has the shapes of
    :func:`bitune_jax.model.transformer.param_shapes` in the model's dtype,
    ``batch`` is :func:`largest_batch`.
    """
    import jax

    from bitune_jax import bitune
    from bitune_jax.model import transformer
    from bitune_jax.training import step as ts

    dtype = transformer.compute_dtype(model_cfg)
    base = jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), transformer.param_shapes(model_cfg),
                                  is_leaf=lambda x: isinstance(x, tuple))

    def init(base):
        trainable = bitune.init_trainable(jax.random.PRNGKey(cfg.train.seed), model_cfg, cfg.method, base)
        return ts.init_state(trainable, optimizer)

    return jax.eval_shape(init, base), base, largest_batch(cfg, batch_devices)


def compile_train_step(cfg, topology, *, model_cfg=None) -> dict:
    """Compiles the train step of run ``cfg`` for a TPU ``topology``; returns a JSON-ready report.

    Args:
      cfg: a :class:`bitune_jax.config.Config`; ``model.source`` only needs
        the architecture (an HF folder's ``config.json``, a GGUF's metadata).
      topology: a :class:`Topology` or its name (``"v5e:2x2"``).
      model_cfg: the model's :class:`~bitune_jax.model.config.ModelConfig`,
        instead of reading it from ``cfg.model.source``.

    Raises :class:`DoesNotFitError` when XLA runs out of HBM,
    :class:`TpuCompilerMissingError` without libtpu, ``ValueError`` for a bad
    topology or a mesh the topology's chips cannot form.
    """
    import jax
    import numpy as np

    from bitune_jax.apps.bench import FLOPS_FORMULA, step_flops
    from bitune_jax.model import attention
    from bitune_jax.training import sharding as shd
    from bitune_jax.training import step as ts

    topo = topology if isinstance(topology, Topology) else Topology.parse(topology)
    if model_cfg is None:
        from bitune_jax.conversion import load_model_config
        from bitune_jax.conversion.assets import resolve_model_source

        model_cfg = load_model_config(resolve_model_source(cfg.model.source), dtype=cfg.model.dtype)
    # What `auto` means on the TPU, not on this host's backend.
    impl = attention.resolve(cfg.model.attention, softcap=model_cfg.attn_logit_softcap, backend="tpu")
    devices = tpu_devices(topo)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    optimizer = ts.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
    state, base, batch = abstract_inputs(cfg, model_cfg, optimizer, mesh.shape["data"] * mesh.shape["fsdp"])
    step_fn = ts.make_train_step(model_cfg, cfg.method, optimizer, mesh=mesh, rules=cfg.mesh.table, state=state,
                                 base=base, batch=batch, grad_accum=cfg.optim.grad_accum, remat=cfg.train.remat,
                                 attention=impl,
                                 dropout_seed=cfg.train.seed if cfg.method.peft.dropout > 0 else None)
    packed = "pre_ids" in batch
    rows = int(batch["pre_ids" if packed else "prompt_ids"].shape[0])
    split = shd.batch_sharding(mesh, batch, cfg.mesh.table)["pre_ids" if packed else "prompt_ids"].spec[0]
    batch_shards = int(np.prod([mesh.shape[a] for a in ((split,) if isinstance(split, str) else split or ())]))
    t0 = time.perf_counter()
    with attention.splash_interpret(False):  # the TPU kernel itself, whatever BITUNE_SPLASH_INTERPRET says
        lowered = step_fn.lower(state, base, batch)
    t1 = time.perf_counter()
    # Pallas kernels (splash attention) lower to Mosaic custom calls; counted to show they are in the step.
    kernels = lowered.as_text().count("tpu_custom_call")
    try:
        compiled = lowered.compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFitError(_does_not_fit(e, cfg, topo, mesh, rows, batch_shards)) from None
        raise
    t2 = time.perf_counter()

    ma = compiled.memory_analysis()
    mem = {key: int(getattr(ma, attr)) for key, attr in (
        ("argument_bytes", "argument_size_in_bytes"), ("output_bytes", "output_size_in_bytes"),
        ("alias_bytes", "alias_size_in_bytes"), ("temp_bytes", "temp_size_in_bytes"),
        ("generated_code_bytes", "generated_code_size_in_bytes"))}
    # Everything live at once if nothing were reused: arguments, outputs not donated, all temporaries.
    mem["total_bytes"] = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    peak = getattr(ma, "peak_memory_in_bytes", None)
    mem["peak_bytes"] = int(peak) if peak else mem["total_bytes"]
    mem["hbm_bytes"] = topo.hbm_bytes
    mem["peak_fraction_of_hbm"] = mem["peak_bytes"] / topo.hbm_bytes
    prompt_w = int(batch["pre_ids"].shape[1]) if packed else int(batch["prompt_ids"].shape[1])
    answer_w = int(batch["ans_ids" if packed else "answer_ids"].shape[1])
    # A packed row's prefill span is a prompt of one token more, as step_flops counts spans.
    flops = step_flops(model_cfg, cfg.method.variant, rows, prompt_w + 1 if packed else prompt_w, answer_w,
                       rank=cfg.method.peft.rank)
    xla_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # not every backend reports costs
        pass
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    return {
        "topology": topo.name, "device_kind": devices[0].device_kind, "chips": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "model": cfg.model.source, "family": model_cfg.family, "dtype": model_cfg.dtype,
        "base_params": count(base), "trainable_params": count(state.trainable),
        "variant": cfg.method.variant, "attention": impl, "remat": cfg.train.remat, "pallas_kernels": kernels,
        "batch": {"packed": packed, "rows": rows, "prompt_width": prompt_w, "answer_width": answer_w,
                  "grad_accum": cfg.optim.grad_accum, "split_over_chips": batch_shards},
        "memory_per_chip": mem,
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "model_flops_per_step": flops["total"], "model_flops_per_chip": flops["total"] / len(devices),
        "model_flops_terms": {k: v for k, v in flops.items() if k not in ("total", "tokens")},
        "model_flops_formula": FLOPS_FORMULA,
        "xla_flops_per_chip": xla_flops,
    }


def summary(report: dict) -> str:
    """A few readable lines of a :func:`compile_train_step` report."""
    m = report["memory_per_chip"]
    b = report["batch"]
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    xla = report["xla_flops_per_chip"]
    lines = [
        f"compiled the {report['variant']} train step for {report['topology']} ({report['chips']} x "
        f"{report['device_kind']}, mesh {mesh}) in {report['compile_s']:.1f} s (lowering {report['lower_s']:.1f} s)",
        f"model {report['model']} ({report['family']}, {_count(report['base_params'])} params, {report['dtype']}), "
        f"{_count(report['trainable_params'])} trainable; " + (
            f"packed batch {b['rows']} rows x ({b['prompt_width']} prefill + {b['answer_width']} answer-stream)"
            if b["packed"] else f"batch {b['rows']} x ({b['prompt_width']} prompt + {b['answer_width']} answer)")
        + f" tokens, attention {report['attention']}, remat {report['remat']}",
        f"per chip: arguments {gib(m['argument_bytes'])}, outputs {gib(m['output_bytes'])} "
        f"(aliased {gib(m['alias_bytes'])}), temporaries {gib(m['temp_bytes'])}; peak {gib(m['peak_bytes'])} "
        f"of {gib(m['hbm_bytes'])} HBM ({100 * m['peak_fraction_of_hbm']:.0f}%)",
        f"model FLOPs per step {report['model_flops_per_step']:.3g} ({report['model_flops_per_chip']:.3g} per chip)"
        + (f"; XLA's count, {xla:.3g} per chip, has one pass of the layer loop and no Pallas kernel"
           if xla is not None else ""),
    ]
    splits = report["mesh"]["data"] * report["mesh"]["fsdp"]
    if b["split_over_chips"] < splits:
        lines.append(f"note: the batch's {b['rows']} rows are not a multiple of mesh data*fsdp={splits}, so it is "
                     f"not split: every chip runs all of it (choose data.batch_size or the mesh so that it divides)")
    return "\n".join(lines)


def _count(n: int) -> str:
    """``2.51 B``, ``1.23 M``, ``106.8 K``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if unit == 'K' else 2}f} {unit}"
    return str(n)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Drops what native code writes to file descriptor 2 within the block (Python's own errors still raise)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _does_not_fit(e: BaseException, cfg, topo: Topology, mesh, rows: int, batch_shards: int) -> str:
    """The :class:`DoesNotFitError` message: XLA's numbers and what to change."""
    lines = [line.strip() for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line] or [_first_line(e)]
    detail = lines[0].split("RESOURCE_EXHAUSTED:", 1)[-1].strip().rstrip(".")
    hints = []
    splits = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_shards < splits:
        hints.append(f"a data.batch_size whose {rows} rows per step are a multiple of mesh data*fsdp={splits} "
                     f"(now they are not, so the batch is not split: every chip runs all of it)")
    if cfg.train.remat not in ("full", "prompt_mlp"):
        hints.append(f"train.remat=prompt_mlp (the prompt streams recompute their MLP) or train.remat=full "
                     f"(every layer recomputed) (now {cfg.train.remat})")
    elif cfg.train.remat == "prompt_mlp":
        hints.append("train.remat=full (now prompt_mlp)")
    if mesh.shape["fsdp"] * mesh.shape["tensor"] < topo.chips:
        hints.append(f"shard the frozen base over more chips with mesh.fsdp / mesh.tensor (now data="
                     f"{mesh.shape['data']}, fsdp={mesh.shape['fsdp']}, tensor={mesh.shape['tensor']}; e.g. "
                     f"mesh.data=1 mesh.fsdp={topo.chips})")
    hints.append(f"a smaller data.batch_size (now {cfg.data.batch_size}; raise optim.grad_accum to keep the "
                 f"examples per update)" if cfg.optim.grad_accum == 1 else
                 f"a smaller data.batch_size (now {cfg.data.batch_size}, optim.grad_accum {cfg.optim.grad_accum})")
    hints.append(f"shorter data.max_prompt_len / data.max_answer_len (now {cfg.data.max_prompt_len} / "
                 f"{cfg.data.max_answer_len})")
    hints.append("a topology with more chips or more HBM per chip")
    return (f"the train step does not fit in the {topo.hbm_bytes / GiB:.0f} GiB of HBM per chip of {topo.name} "
            f"(XLA: {detail}); try " + "; ".join(hints))
