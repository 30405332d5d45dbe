"""What the attacks of the cascade share: the :class:`Stage` protocol and its loop.

An attack of the cascade is a :class:`Stage`: ``n_runs`` independent runs (restarts x
target classes), each ``n_steps`` iterations (queries for Square) of a pure ``step`` on a
per-example ``State`` (a dict of arrays whose first axis is the batch) made by ``init``.
Every state holds ``x``, ``y``, ``adv`` (the attack's point) and ``fooled`` (the attack
believes ``adv`` is an adversarial within ``eps``). Because every field is per example,
and every random draw comes from a per-example key (:func:`samrobust.attacks.example_keys`),
the cascade may drop finished points and repack the rest between steps without changing
any point's result. :func:`run` executes one run inside ``jit`` with ``lax.fori_loop``
(the stand-alone attack functions use it); the cascade drives ``step`` itself
(:mod:`samrobust.autoattack.cascade`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from samrobust.attacks import LogitsFn

State = dict[str, jax.Array]


@jax.tree_util.register_pytree_node_class
class RandomizedModel:
    """A model that is random at test time, ``fn(x, key) -> logits`` (e.g. dropout kept on):
    calling it is one draw under ``key``; :meth:`draw` gives another. AutoAttack's *rand*
    version averages APGD's gradients over draws (expectation over transformation); its
    checks of a returned point use the default draw. Pass ``fn`` as a
    ``jax.tree_util.Partial`` (its parameters then stay arguments of the jitted attacks)."""

    def __init__(self, fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array):
        self.fn, self.key = fn, key

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x, self.key)

    def draw(self, key: jax.Array) -> "RandomizedModel":
        return RandomizedModel(self.fn, key)

    def tree_flatten(self):
        if isinstance(self.fn, jax.tree_util.Partial):  # its parameters are leaves
            return (self.fn, self.key), None
        return (self.key,), self.fn

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children) if aux is None else cls(aux, *children)


InitFn = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array, jax.Array], State]
StepFn = Callable[[LogitsFn, State, jax.Array], State]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One attack of the cascade.

    ``init(logits_fn, x, y, keys, run) -> state`` (``keys``: one per example; ``run``: the
    run's index, traced), ``step(logits_fn, state, i) -> state`` (``i``: the iteration,
    traced). ``segment``: iterations between the cascade's checks for finished points.
    """

    name: str
    n_runs: int
    n_steps: int
    init: InitFn
    step: StepFn
    segment: int


def batch_shape(x: jax.Array) -> tuple[int, ...]:
    """``(B, 1, 1, ...)``: broadcasts a per-example value against ``x``."""
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def bwhere(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example ``where``: ``a`` for the examples in ``mask``, else ``b``."""
    return jnp.where(mask.reshape(batch_shape(a)), a, b)


def target_classes(logits: jax.Array, j: jax.Array | int) -> jax.Array:
    """The ``(j + 2)``-th most likely class at the clean point (``j = 0``: the runner-up)."""
    order = jnp.argsort(logits, axis=-1)
    col = logits.shape[-1] - 2 - j
    return jnp.take_along_axis(order, jnp.broadcast_to(col, (logits.shape[0], 1)), axis=1)[:, 0]


def n_targets(logits_fn: LogitsFn, x: jax.Array, n_target_classes: int, who: str) -> int:
    """``min(n_target_classes, num_classes - 1)``: how many target classes a targeted attack
    can try against the model's output."""
    n_cls = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    n_t = min(n_target_classes, n_cls - 1)
    if n_t < 1:
        raise ValueError(f"{who} needs at least 2 classes and n_target_classes >= 1")
    return n_t


def run(
    stage: Stage,
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    keys: jax.Array,
    j: jax.Array | int,
    unroll: int = 1,
) -> State:
    """Run ``j`` of ``stage`` on a batch, all ``n_steps`` in one ``lax.fori_loop``
    (jittable; on XLA:CPU the cascade's Python-driven loop is faster)."""
    state = stage.init(logits_fn, x, y, keys, jnp.asarray(j, jnp.int32))
    return jax.lax.fori_loop(
        0, stage.n_steps, lambda i, s: stage.step(logits_fn, s, i), state, unroll=unroll
    )
