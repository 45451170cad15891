"""Multi-process start-up on JAX's own runtime (``jax.distributed``).

Every process of a multi-host run calls :func:`initialize` once, before any
other JAX call. Where the processes come from decides how it is called:

* **Explicit** (a local multi-process run, a cluster JAX does not know): a
  coordinator address ``host:port`` that process 0 listens on, the process
  count and this process's id, from the arguments or from the environment
  variables ``BITUNE_COORDINATOR``, ``BITUNE_NUM_PROCESSES`` and
  ``BITUNE_PROCESS_ID`` (what ``launch/local_cpu.sh`` sets).
* **Detected**: on Cloud TPU VMs (``gcloud ... --worker=all``), GKE TPU
  slices (JobSet), SLURM job steps (``srun``) and Open MPI, JAX reads the
  coordinator, count and id from the environment itself, so
  ``jax.distributed.initialize()`` is called without arguments.
* **Single process**: neither of the above (or ``BITUNE_NUM_PROCESSES=1``):
  nothing to do.

On CPU, cross-process collectives need an implementation; we select gloo
(TCP), which ships with jaxlib. The per-process CPU device count is set the
usual way, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

After start-up ``jax.devices()`` lists every device of every process, a mesh
built from it spans all hosts, and each process feeds only its own rows of
the global batch (:mod:`bitune_jax.data.pipeline` slices them by
``jax.process_index()``). Only :func:`is_main` (process 0) logs, writes
metrics and plots; orbax writes checkpoints from all processes together.

Example (two terminals on one machine)::

    BITUNE_COORDINATOR=127.0.0.1:12355 BITUNE_NUM_PROCESSES=2 BITUNE_PROCESS_ID=0 \\
        bitune-jax train configs/smollm2_demo.yaml
    BITUNE_COORDINATOR=127.0.0.1:12355 BITUNE_NUM_PROCESSES=2 BITUNE_PROCESS_ID=1 \\
        bitune-jax train configs/smollm2_demo.yaml
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

log = logging.getLogger(__name__)

ENV_COORDINATOR = "BITUNE_COORDINATOR"
ENV_NUM_PROCESSES = "BITUNE_NUM_PROCESSES"
ENV_PROCESS_ID = "BITUNE_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Startup:
    """How :func:`initialize` started this process.

    Attributes:
      mode: ``explicit`` (coordinator/count/id given), ``detected`` (a cluster
        JAX recognises), ``single`` (no ``jax.distributed``) or ``already``
        (``jax.distributed`` was initialized before the call).
      cluster: the detected environment's name (e.g. ``SlurmCluster``), or "".
    """

    mode: str
    cluster: str = ""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def detected_cluster() -> str:
    """Name of the cluster environment JAX would auto-detect, or "" for none.

    Asks JAX's own cluster detectors (Cloud TPU VM, GKE TPU, SLURM, Open MPI,
    Kubernetes; not the opt-in mpi4py one), so we call
    ``jax.distributed.initialize()`` without arguments exactly where JAX can
    fill them in.
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # private module moved: fall back to the plain markers
        if all(k in os.environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
            return "SlurmCluster"
        if "OMPI_MCA_orte_hnp_uri" in os.environ:
            return "OmpiCluster"
        return ""
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return ""


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None) -> Startup:
    """Starts ``jax.distributed`` when this is one process of several.

    Call it once per process before any other JAX use (creating arrays or
    asking for devices initializes the backend, after which it is too late).

    Args:
      coordinator: ``host:port`` of process 0's coordinator service; default
        ``$BITUNE_COORDINATOR``. Setting it (or ``num_processes > 1``) asks for
        the explicit mode, which then needs all three values.
      num_processes: process count; default ``$BITUNE_NUM_PROCESSES``. 1 means
        a single process whatever the environment says.
      process_id: this process's id in ``[0, num_processes)``; default
        ``$BITUNE_PROCESS_ID``.
      local_device_ids: restricts this process to these local devices (e.g.
        one GPU per process); default: JAX's choice.

    Returns:
      A :class:`Startup` saying which mode was used.

    Raises:
      ValueError: explicit mode with a missing or inconsistent value.
    """
    import jax

    if jax.distributed.is_initialized():
        return Startup("already")
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)

    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id={process_id} with num_processes=1")
        return Startup("single")
    if coordinator is not None or num_processes is not None or process_id is not None:
        missing = [name for name, v in ((f"coordinator (${ENV_COORDINATOR})", coordinator),
                                        (f"num_processes (${ENV_NUM_PROCESSES})", num_processes),
                                        (f"process_id (${ENV_PROCESS_ID})", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start needs {', '.join(missing)} as well")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
        if ":" not in coordinator:
            raise ValueError(f"coordinator={coordinator!r} must be host:port")
        _use_cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return Startup("explicit")

    cluster = detected_cluster()
    if not cluster:
        return Startup("single")
    _use_cpu_collectives()
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return Startup("detected", cluster)


def _use_cpu_collectives() -> None:
    """Gloo collectives for CPU devices (jax's default today; set so it stays so)."""
    import jax

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_main() -> bool:
    """True on process 0, the one that logs, writes metrics and plots."""
    import jax

    return jax.process_index() == 0


def describe() -> str:
    """One line for the log: process index/count and local/global device counts."""
    import jax

    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.devices()[0].platform} devices")
