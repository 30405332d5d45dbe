"""Devices and processes: the data-parallel mesh and moving batches onto it, the CPU split
into devices, and the multi-process runtime.

Everything runs on a 1-D mesh over all devices (axis ``AXIS``): global batches are sharded
over it (:func:`shard_batch`), variables replicated (:func:`replicate`), results gathered
back to every host (:func:`gather`).

Both command lines (``samrobust.main``, ``samrobust.evaluate``) take the same flags
(:func:`define_runtime_flags`) and call :func:`initialize_runtime` before JAX's first
operation: ``--cpu_devices=N`` splits the host CPU into N XLA devices; ``--distributed``
(TPU pods, SLURM: ``jax.distributed.initialize()`` auto-detects) or
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` start JAX's
distributed runtime, after which every process runs the same program on its share of
every batch.
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"  # the one mesh axis: data parallelism over every device of every process


def set_cpu_devices(n: int | None) -> None:
    """Splits the host CPU into ``n`` XLA devices; call before JAX's first operation.

    XLA:CPU spreads one device's small convolutions poorly over several cores. At CIFAR
    shapes one device per core, each with a slice of the batch, trains 1.1-1.5x faster on
    2 cores (``experiments/results/bench_cpu_*_2dev.json``); on the 8x8 digits the per-step
    synchronisation costs more than it gains. As on several GPUs, BatchNorm statistics and
    SAM's perturbation are then per device. ``None`` keeps JAX's default; GPU/TPU devices
    are unaffected.
    """
    if n is None:
        return
    if n < 1:
        raise ValueError(f"cpu_devices must be >= 1, got {n}: use one per core, e.g. 2")
    jax.config.update("jax_num_cpu_devices", n)


YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# jaxlib versions on which YNN_FLAG was measured (its YNNPACK fusions slow our convolutions).
YNN_MEASURED = frozenset({(0, 10)})


def set_xla_cpu_defaults() -> None:
    """Turns XLA:CPU's YNNPACK fusions off (``XLA_FLAGS`` gets ``YNN_FLAG=``) unless
    ``XLA_FLAGS`` already sets them, on the jaxlib versions where that was measured
    (:data:`YNN_MEASURED`; the flag is experimental, and an unknown flag aborts XLA). Call
    before JAX's first operation; it changes only the CPU backend.

    On 2 cores with jaxlib 0.10.2, PreActResNet-18 width 8, batch 128, one CPU device, the
    train step ran 1.1-1.3x faster (SGD 278-284 ms vs 358-393 ms, SAM 539-601 vs 704-761,
    PGD-5 AT 1290-1300 vs 1371-1496; ``experiments/results/bench_cpu_ynn_w8_b128.txt``)
    and AutoAttack on an AT model took 1109 s instead of 1693 s
    (``experiments/results/aa_reference/*_noynn.md``). An ``XLA_FLAGS`` that names the flag
    is left as it is (its value is a list of YNN fusion types, see XLA's flag help).
    """
    current = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in current or jaxlib.version.__version_info__[:2] not in YNN_MEASURED:
        return
    os.environ["XLA_FLAGS"] = f"{current} {YNN_FLAG}=".strip()


CPU_DEVICES_HELP = (
    "Split the host CPU into N XLA devices (default: JAX's); one per core is faster at CIFAR "
    "shapes."
)


def default_mesh() -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """This host's slices of a global batch -> global arrays sharded over ``AXIS``."""
    sharding = NamedSharding(mesh, P(AXIS))
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def replicate(variables: Any, mesh: Mesh) -> Any:
    """``variables`` on every device of ``mesh`` (a no-op when they already are)."""
    return jax.device_put(variables, NamedSharding(mesh, P()))


def gather(a: jax.Array) -> np.ndarray:
    """A global array sharded over ``AXIS`` (all processes) as one numpy array."""
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def define_runtime_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """``--cpu_devices``, ``--distributed``, ``--coordinator_address``, ``--num_processes``,
    ``--process_id``."""
    flags.DEFINE_integer(
        "cpu_devices", None, CPU_DEVICES_HELP, lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() (auto-detects TPU pods and SLURM).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 (multi-process).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (multi-process).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (multi-process).", flag_values=flag_values
    )


def initialize_runtime(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Applies :func:`set_xla_cpu_defaults` and the runtime flags: CPU devices, then the
    distributed runtime if asked for.
    Processes other than 0 log warnings only."""
    set_xla_cpu_defaults()
    set_cpu_devices(flag_values.cpu_devices)
    if flag_values.distributed or flag_values.coordinator_address:
        # Cross-process collectives for CPU devices (harmless on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
        )
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "JAX %s: %d devices (%d local), process %d of %d",
        jax.__version__,
        jax.device_count(),
        jax.local_device_count(),
        jax.process_index(),
        jax.process_count(),
    )


def sharded_jit(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any, **jit_kwargs) -> Callable:
    """``jax.jit(shard_map(fn))`` over ``mesh``: ``fn`` sees each device's shard of the
    arguments specified ``P(AXIS)`` (and whole copies of those specified ``P()``)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, **jit_kwargs)
