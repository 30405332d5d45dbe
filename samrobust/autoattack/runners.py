"""Where AutoAttack's jitted pieces run: :class:`Local` (one device, ``jax.jit``) or
:class:`Sharded` (every batch split over a mesh, the model replicated)."""

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from samrobust import parallel
from samrobust.attacks import LogitsFn

Tree = Any


class Runner(Protocol):
    """Runs ``fn(logits_fn, batch_tree, *scalars) -> batch_tree`` on batches whose size is a
    multiple of ``multiple``; ``put``/``get`` move global host batches in and out."""

    multiple: int

    def put(self, tree: Tree) -> Tree: ...

    def get(self, tree: Tree) -> Tree: ...

    def jit(self, fn: Callable, logits_fn: LogitsFn, n_scalars: int) -> Callable: ...


def _bind(jitted: Callable, fn: Callable, logits_fn: LogitsFn) -> Callable:
    """A pytree model (``jax.tree_util.Partial``) is a traced argument, so its parameters are
    not baked into the executable; any other callable is closed over."""
    if isinstance(logits_fn, jax.tree_util.Partial):
        return functools.partial(jitted(fn), logits_fn)
    return jitted(lambda *args: fn(logits_fn, *args))


class Local:
    """One device: plain ``jax.jit``."""

    multiple = 1

    def put(self, tree: Tree) -> Tree:
        return jax.device_put(tree)

    def get(self, tree: Tree) -> Tree:
        return jax.tree.map(np.asarray, tree)

    def jit(self, fn: Callable, logits_fn: LogitsFn, n_scalars: int) -> Callable:
        return _bind(jax.jit, fn, logits_fn)


class Sharded:
    """Every batch split over ``mesh`` (all processes feed their slice of the same global
    batch); the model replicated."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.multiple = mesh.size

    def put(self, tree: Tree) -> Tree:
        pc, pi = jax.process_count(), jax.process_index()

        def one(a):
            per = len(a) // pc
            return parallel.shard_batch(self.mesh, a[pi * per : (pi + 1) * per])[0]

        return jax.tree.map(one, tree)

    def get(self, tree: Tree) -> Tree:
        return jax.tree.map(parallel.gather, tree)

    def jit(self, fn: Callable, logits_fn: LogitsFn, n_scalars: int) -> Callable:
        def jitted(f):
            if isinstance(logits_fn, jax.tree_util.Partial):
                specs = (P(), P(parallel.AXIS)) + (P(),) * n_scalars
            else:
                specs = (P(parallel.AXIS),) + (P(),) * n_scalars
            return parallel.sharded_jit(f, self.mesh, specs, P(parallel.AXIS))

        return _bind(jitted, fn, logits_fn)
