"""Projected gradient descent (Madry et al., 2018) as a jitted ``lax.fori_loop``.

``pgd`` maximises ``loss_fn(x, y)`` over ``x_adv`` in the ``eps`` ball around ``x``
(Linf or L2) intersected with the valid input range ``[0, 1]``, and returns ``x_adv``.

- Linf step: ``delta += step_size * sign(grad)``; projection clips ``delta`` to
  ``[-eps, eps]``. Random start: uniform in the ball.
- L2 step: ``delta += step_size * grad / ||grad||`` (per example); projection rescales
  ``delta`` into the ball. Random start: a uniformly random direction with radius uniform
  in ``[0, eps]`` (the paper's code).
- Every iterate is clipped to ``[0, 1]``. Clipping only moves pixels towards ``x``, so
  ``||x_adv - x|| <= eps`` and ``0 <= x_adv <= 1`` hold for every returned point.

XLA:CPU runs a convolution network's input gradient several times slower inside a
``while`` loop than unrolled (the loop body keeps a slow kernel layout). ``unroll``
(passed to ``lax.fori_loop``) removes that overhead; the default, ``None``, unrolls fully on
CPU and not at all on GPU/TPU, where the loop costs nothing extra and compiles faster.
``python -m experiments.bench --sections=pgd`` measures both.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
NORMS = ("linf", "l2")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    other = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(other, axis=1) - true


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def input_loss(logits_fn: Callable[[jax.Array], jax.Array], loss: str = "ce") -> LossFn:
    """Turns ``logits_fn(x)`` into ``loss_fn(x, y)``: the batch sum of a per-example loss.

    A sum (not a mean) keeps each example's gradient independent of the batch size.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown attack loss {loss!r}; choose one of {tuple(LOSSES)}")
    per_example = LOSSES[loss]
    return lambda x, y: jnp.sum(per_example(logits_fn(x), y))


def _flat_norm(v: jax.Array) -> jax.Array:
    """Per-example L2 norm, broadcastable against ``v``."""
    n = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))
    return n


def project(delta: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """Projects ``delta`` onto the ``eps`` ball, then so that ``x + delta`` lies in [0, 1]."""
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / (_flat_norm(delta) + 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0) - x


def ball_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """A random point of the ball (Linf: uniform; L2: random direction, radius U[0, eps])."""
    if norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / (_flat_norm(direction) + 1e-12)
    radius = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype, 0.0, eps)
    return direction * radius


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """Steepest ascent direction of unit norm: ``sign(g)`` (Linf) or ``g / ||g||`` (L2)."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / (_flat_norm(grad) + 1e-12)


def default_unroll(steps: int) -> int:
    """Full unroll on XLA:CPU (avoids the slow in-loop conv layout), none elsewhere."""
    return max(steps, 1) if jax.default_backend() == "cpu" else 1


def pgd(
    loss_fn: LossFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    unroll: int | bool | None = None,
) -> jax.Array:
    """Returns the adversarial input ``x_adv`` found by ``steps`` steps of PGD.

    Args:
      loss_fn: ``loss_fn(x, y) -> scalar`` to maximise (e.g. :func:`input_loss`).
      x: clean inputs in ``[0, 1]``, batch first. y: labels, passed through to ``loss_fn``.
      key: PRNG key for the random start.
      eps, step_size: radius and step length (floats, or traced scalars under ``jit``).
      steps: number of steps (a Python int >= 0).
      norm: ``"linf"`` or ``"l2"``.
      random_start: start from a random point of the ball instead of ``x``.
      unroll: ``lax.fori_loop`` unroll factor; ``None`` picks :func:`default_unroll`.

    The result carries no gradient (``stop_gradient``).
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}")
    if steps < 0 or any(isinstance(v, (int, float)) and v < 0 for v in (eps, step_size)):
        raise ValueError(f"pgd needs eps, step_size, steps >= 0; got {eps}, {step_size}, {steps}")
    x = jax.lax.stop_gradient(x)
    delta = ball_start(key, x, eps, norm) if random_start else jnp.zeros_like(x)
    delta = project(delta, x, eps, norm)
    grad_fn = jax.grad(loss_fn)

    def body(_, d):
        g = grad_fn(x + d, y)
        return project(d + step_size * ascent_direction(g, norm), x, eps, norm)

    unroll = default_unroll(steps) if unroll is None else unroll
    delta = jax.lax.fori_loop(0, steps, body, delta, unroll=unroll)
    return jax.lax.stop_gradient(x + delta)


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
