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

The primitives every attack shares live here too (:mod:`samrobust.autoattack` builds on
them): norm checks, per-example norms, projection, random starts in the ball and on its
sphere, the attack losses (CE, CW margin, DLR and their targeted forms),
:func:`is_adversarial` (the one acceptance rule, with the one tolerance ``VALID_TOL``),
:class:`PGDSpec` and the radius notation (:func:`format_eps`, :func:`parse_eps`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, y) -> scalar to maximise
LogitsFn = Callable[[jax.Array], jax.Array]  # x -> logits: the model every attack sees
NORMS = ("linf", "l2")
VALID_TOL = 1e-6  # slack on ||x_adv - x|| <= eps when accepting an adversarial (AutoAttack's)


def check_norm(norm: str) -> None:
    """Raises ``ValueError`` unless ``norm`` is one of ``NORMS``."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    logits = logits.astype(jnp.float32)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    other = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(other, axis=1) - true


def take(z: jax.Array, idx: jax.Array) -> jax.Array:
    """``z[b, idx[b]]`` for every row ``b``."""
    return jnp.take_along_axis(z, idx[:, None], axis=1)[:, 0]


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Untargeted DLR loss (Croce & Hein 2020, eq. 5), per example.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``pi`` sorting the logits in
    decreasing order. With 2 classes the denominator is 1 (the DLR loss needs 3 classes).
    """
    z = logits.astype(jnp.float32)
    margin = -cw_margin(z, labels)  # z_y - max_{i != y} z_i
    if z.shape[-1] < 3:
        return -margin
    zs = jnp.sort(z, axis=-1)
    return -margin / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, target: jax.Array) -> jax.Array:
    """Targeted DLR loss, per example: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)``.

    With 3 classes the denominator is ``z_pi1 - z_pi3``, with 2 it is 1.
    """
    z = logits.astype(jnp.float32)
    num = take(z, labels) - take(z, target)
    k = z.shape[-1]
    if k < 3:
        return -num
    zs = jnp.sort(z, axis=-1)
    den = zs[:, -1] - (0.5 * (zs[:, -3] + zs[:, -4]) if k >= 4 else zs[:, -3])
    return -num / (den + 1e-12)


def ce_targeted_loss(logits: jax.Array, labels: jax.Array, target: jax.Array) -> jax.Array:
    """Targeted cross-entropy to maximise: ``-CE(z, t)`` (``labels`` unused)."""
    del labels
    return -cross_entropy(logits, target)


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def input_loss(logits_fn: LogitsFn, loss: str = "ce") -> LossFn:
    """Turns ``logits_fn(x)`` into ``loss_fn(x, y)``: the batch sum of a per-example loss.

    A sum (not a mean) keeps each example's gradient independent of the batch size.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown attack loss {loss!r}; choose one of {tuple(LOSSES)}")
    per_example = LOSSES[loss]
    return lambda x, y: jnp.sum(per_example(logits_fn(x), y))


def flat_norm(v: jax.Array) -> jax.Array:
    """Per-example L2 norm, broadcastable against ``v``."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example Linf or L2 norm of ``delta`` (shape ``[B]``)."""
    flat = delta.reshape(delta.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def is_adversarial(
    logits_adv: jax.Array,
    y: jax.Array,
    x: jax.Array,
    x_adv: jax.Array,
    *,
    eps: float,
    norm: str,
) -> jax.Array:
    """The acceptance rule of every attack's result (bool ``[B]``): ``x_adv`` is
    misclassified (``logits_adv`` are the model's logits at ``x_adv``), within
    ``eps + VALID_TOL`` of ``x``, inside ``[0, 1]`` and finite."""
    axes = tuple(range(1, x.ndim))
    in_box = jnp.all((x_adv >= 0.0) & (x_adv <= 1.0) & jnp.isfinite(x_adv), axis=axes)
    in_ball = perturbation_norm(x_adv - x, norm) <= eps + VALID_TOL
    return (jnp.argmax(logits_adv, axis=-1) != y) & in_box & in_ball


def project(delta: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """Projects ``delta`` onto the ``eps`` ball, then so that ``x + delta`` lies in [0, 1]."""
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / (flat_norm(delta) + 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0) - x


def ball_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """A random point of the ball (Linf: uniform; L2: random direction, radius U[0, eps])."""
    if norm == "linf":
        return jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / (flat_norm(direction) + 1e-12)
    radius = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype, 0.0, eps)
    return direction * radius


def sphere_start(keys: jax.Array, x: jax.Array, norm: str) -> jax.Array:
    """A random direction of unit norm per example, from per-example ``keys`` (``[B]``):
    Linf ``t / ||t||_inf`` with ``t`` uniform in ``[-1, 1]^d``; L2 a normalised Gaussian.
    APGD starts on the sphere ``x + eps * sphere_start(...)``."""
    shape = x.shape[1:]
    if norm == "linf":
        t = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0))(keys)
        t = t / (jnp.max(jnp.abs(t), axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-12)
    else:
        t = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
        t = t / (flat_norm(t) + 1e-12)
    return t.astype(x.dtype)


def example_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
    """One key per example: ``fold_in(key, id)``. Randomness drawn from these depends on the
    example's ``id`` only, not on which batch or position it is attacked in."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """Steepest ascent direction of unit norm: ``sign(g)`` (Linf) or ``g / ||g||`` (L2)."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / (flat_norm(grad) + 1e-12)


def pgd_unroll(steps: int) -> int:
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
    start_scale: float = 1.0,
    project_to_ball: bool = True,
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
      unroll: ``lax.fori_loop`` unroll factor; ``None`` picks :func:`pgd_unroll`.
      start_scale: the random start's radius in units of ``eps``.
      project_to_ball: project onto the ``eps`` ball after every step (``False``: only onto
        the image box ``[0, 1]``). N-FGSM (de Jorge et al. 2022) is one step of size ``eps``
        from a start of scale 2, not projected: ``x_adv - x`` reaches ``3 eps``.

    The result carries no gradient (``stop_gradient``).
    """
    check_norm(norm)
    if steps < 0 or any(
        isinstance(v, (int, float)) and v < 0 for v in (eps, step_size, start_scale)
    ):
        raise ValueError(
            f"pgd needs eps, step_size, steps, start_scale >= 0; got {eps}, {step_size}, "
            f"{steps}, {start_scale}"
        )
    x = jax.lax.stop_gradient(x)
    radius = start_scale * eps
    delta = ball_start(key, x, radius, norm) if random_start else jnp.zeros_like(x)
    if project_to_ball:
        constrain = lambda d: project(d, x, eps, norm)  # noqa: E731
    else:
        constrain = lambda d: jnp.clip(x + d, 0.0, 1.0) - x  # noqa: E731
    delta = constrain(delta)
    grad_fn = jax.grad(loss_fn)

    def body(_, d):
        g = grad_fn(x + d, y)
        return constrain(d + step_size * ascent_direction(g, norm))

    unroll = pgd_unroll(steps) if unroll is None else unroll
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
    start_scale: float = 1.0  # the random start's radius / eps
    project: bool = True  # onto the eps ball (False: N-FGSM's unprojected step)

    @property
    def name(self) -> str:
        """Metric name, e.g. ``pgd10_ce_linf_2/255``."""
        return f"pgd{self.steps}_{self.loss}_{self.norm}_{format_eps(self.eps)}"

    def describe(self) -> dict:
        """The budget as a report records it."""
        return {
            "attack": f"PGD-{self.steps}",
            "loss": self.loss,
            "norm": self.norm,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "random_start": True,
            "start_scale": self.start_scale,
            "projected": self.project,
        }


def format_eps(eps: float) -> str:
    """A radius for people and metric names: ``0.5``, ``8/255``, ``0.25/255`` (the shorter
    exact form)."""
    if abs(eps * 1000 - round(eps * 1000)) < 1e-6:
        return f"{eps:g}"
    k = eps * 255
    return f"{round(k, 2):g}/255" if abs(k * 100 - round(k * 100)) < 1e-4 else f"{eps:g}"


def parse_eps(text: str) -> float:
    """``"8/255"`` or ``"0.031"`` -> float (>= 0)."""
    num, _, den = text.partition("/")
    try:
        eps = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps {text!r} is not a number or a fraction like 8/255") from None
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {text!r}")
    return eps
