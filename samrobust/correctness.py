"""Per-example correctness of a model under a PGD attack (or clean), data parallel over a
mesh: the jitted kernel that validation during training and the evaluation suites of
:mod:`samrobust.robustness` share."""

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from samrobust import attacks, input_pipeline, parallel, preemption
from samrobust.attacks import PGDSpec
from samrobust.parallel import AXIS, gather, shard_batch

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (variables, x) -> logits


def make_correct_fn(
    logits_fn: ApplyFn, spec: PGDSpec | None, mesh: Mesh, unroll: int | None = None
) -> Callable:
    """Jitted ``(variables, x, y, key) -> per-example correctness`` under ``spec`` (None: clean).

    ``eps`` and ``step_size`` are traced, so budgets that share norm, steps and loss share
    one compiled program. ``unroll``: PGD's ``fori_loop`` unroll (None: ``attacks.pgd``'s).
    """
    if spec is None:
        return functools.partial(
            _correct_fn(logits_fn, None, None, None, None, mesh, 1.0, True), eps=0.0, step_size=0.0
        )
    return functools.partial(
        _correct_fn(
            logits_fn,
            spec.norm,
            spec.steps,
            spec.loss,
            unroll,
            mesh,
            spec.start_scale,
            spec.project,
        ),
        eps=spec.eps,
        step_size=spec.step_size,
    )


@functools.lru_cache(maxsize=32)
def _correct_fn(logits_fn, norm, steps, loss, unroll, mesh, start_scale, project):
    def local(variables, x, y, key, eps, step_size):
        if norm is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
            loss_fn = attacks.input_loss(lambda z: logits_fn(variables, z), loss)
            x = attacks.pgd(
                loss_fn,
                x,
                y,
                key,
                eps=eps,
                step_size=step_size,
                steps=steps,
                norm=norm,
                unroll=unroll,
                start_scale=start_scale,
                project_to_ball=project,
            )
        return jnp.argmax(logits_fn(variables, x), axis=-1) == y

    mapped = parallel.sharded_jit(
        local,
        mesh,
        (P(), P(AXIS), P(AXIS), P(), P(), P()),
        P(AXIS),
    )
    return jax.jit(
        lambda variables, x, y, key, *, eps, step_size: mapped(
            variables, x, y, key, jnp.float32(eps), jnp.float32(step_size)
        )
    )


def correctness(
    correct_fn: Callable,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int,
    mesh: Mesh,
    name: str | None = None,
) -> np.ndarray:
    """Per-example correctness (bool array over ``images``) of a ``make_correct_fn`` function.

    With ``name``, logs progress after the first batch and then at most every 10 s: batch,
    accuracy so far, images/s.
    """
    out, n_correct, start, logged = [], 0, time.perf_counter(), -np.inf
    n_batches = -(-len(images) // batch_size)
    batches = input_pipeline.eval_batches(
        images,
        labels,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for i, (x, y, _) in enumerate(batches):
        preemption.exit_if_signalled()
        c = correct_fn(variables, *shard_batch(mesh, x, y), jax.random.fold_in(key, i))
        out.append(gather(c)[: len(images) - i * batch_size])
        n_correct += int(out[-1].sum())
        now = time.perf_counter()
        if name and now - logged >= 10:
            logged, done = now, min((i + 1) * batch_size, len(images))
            logging.info(
                "eval %s batch %d/%d: accuracy %.4f so far (%.0f img/s)",
                name,
                i + 1,
                n_batches,
                n_correct / done,
                done / (now - start),
            )
    return np.concatenate(out)
