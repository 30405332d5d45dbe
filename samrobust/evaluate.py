"""Robustness evaluation: clean accuracy and PGD suites on any ``apply_fn`` + variables.

``paper`` suite (the paper's protocol): PGD-10 with random start, model in eval mode, at
Linf 1/255 (step 0.25/255), Linf 2/255 (0.5/255), L2 16/255 (2/255), L2 32/255 (4/255).
Every attack runs data parallel over all devices; per-example correctness masks are kept
so that runs can be compared point by point.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import attacks
from samrobust.input_pipeline import eval_batches

AXIS = "batch"
LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (variables, x) -> logits


@dataclasses.dataclass(frozen=True)
class PGDSpec:
    """One PGD evaluation budget."""

    norm: str
    eps: float
    step_size: float
    steps: int = 10
    loss: str = "ce"

    @property
    def name(self) -> str:
        scale = 255.0
        return f"pgd{self.steps}_{self.loss}_{self.norm}_{self.eps * scale:g}/255"


PAPER_SUITE = (
    PGDSpec("linf", 1 / 255, 0.25 / 255),
    PGDSpec("linf", 2 / 255, 0.5 / 255),
    PGDSpec("l2", 16 / 255, 2 / 255),
    PGDSpec("l2", 32 / 255, 4 / 255),
)


def default_mesh() -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def make_correct_fn(logits_fn: LogitsFn, spec: PGDSpec | None, mesh: Mesh) -> Callable:
    """Jitted ``(variables, x, y, key) -> per-example correctness`` under ``spec`` (None: clean).

    ``eps`` and ``step_size`` are traced, so budgets that share norm, steps and loss share
    one compiled program.
    """
    if spec is None:
        return functools.partial(
            _correct_fn(logits_fn, None, None, None, mesh), eps=0.0, step_size=0.0
        )
    return functools.partial(
        _correct_fn(logits_fn, spec.norm, spec.steps, spec.loss, mesh),
        eps=spec.eps,
        step_size=spec.step_size,
    )


@functools.lru_cache(maxsize=32)
def _correct_fn(logits_fn, norm, steps, loss, mesh):
    def local(variables, x, y, key, eps, step_size):
        if norm is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
            loss_fn = attacks.input_loss(lambda z: logits_fn(variables, z), loss)
            x = attacks.pgd(
                loss_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, norm=norm
            )
        return jnp.argmax(logits_fn(variables, x), axis=-1) == y

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P(), P(), P()),
        out_specs=P(AXIS),
        check_vma=False,
    )
    return jax.jit(
        lambda variables, x, y, key, *, eps, step_size: mapped(
            variables, x, y, key, jnp.float32(eps), jnp.float32(step_size)
        )
    )


def _global(mesh: Mesh, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local)


def correctness(
    correct_fn: Callable,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """Per-example correctness (bool array over ``images``) of a ``make_correct_fn`` function."""
    out = []
    for i, (x, y, _) in enumerate(
        eval_batches(
            images,
            labels,
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    ):
        c = correct_fn(variables, _global(mesh, x), _global(mesh, y), jax.random.fold_in(key, i))
        out.append(np.asarray(multihost_utils.process_allgather(c, tiled=True)))
    return np.concatenate(out)[: len(images)]


def pgd_suite(
    logits_fn: LogitsFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    specs: Sequence[PGDSpec] = PAPER_SUITE,
    batch_size: int = 256,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Clean and PGD accuracies; returns ``{"accuracy": {...}, "masks": {...}, "images_per_s"}``.

    ``batch_size`` is global and must divide by the device count.
    """
    mesh = mesh or default_mesh()
    key = jax.random.key(seed)
    accuracy, masks, rates = {}, {}, {}
    for spec in (None, *specs):
        name = "clean" if spec is None else spec.name
        fn = make_correct_fn(logits_fn, spec, mesh)
        correctness(
            fn,
            variables,
            images[:batch_size],
            labels[:batch_size],
            key,
            batch_size=batch_size,
            mesh=mesh,
        )  # compile outside the timing
        start = time.perf_counter()
        mask = correctness(fn, variables, images, labels, key, batch_size=batch_size, mesh=mesh)
        rates[name] = len(images) / (time.perf_counter() - start)
        accuracy[name], masks[name] = float(mask.mean()), mask
        logging.info("eval %-28s accuracy %.4f  (%.0f img/s)", name, accuracy[name], rates[name])
    return {"accuracy": accuracy, "masks": masks, "images_per_s": rates}


def model_logits_fn(apply_fn: Callable) -> LogitsFn:
    """Eval-mode logits of a Flax model with BatchNorm: ``apply_fn(variables, x, train=False)``."""
    return lambda variables, x: apply_fn(variables, x, train=False)
