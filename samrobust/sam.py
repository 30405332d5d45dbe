"""Sharpness-Aware Minimization (and its sibling AWP) as optax gradient transformations.

SAM (Foret et al., 2021, arXiv 2010.01412) minimises ``max_{||e|| <= rho} L(w + e)``.
To first order the inner maximiser is ``e = rho * g / ||g||``, and the update uses the
gradient at ``w + e``:

    e(w)   = rho * g / (||g||_2 + eps)                 (one global norm over the pytree)
    g_sam  = grad L(w + e(w))

ASAM (Kwon et al., 2021, arXiv 2102.11600; ``adaptive=True``) rescales the ball by
``T = |w|`` elementwise: ``e = rho * T^2 g / (||T g||_2 + eps)``.

``sam(...)`` returns ``g_sam`` as its update, so whatever optax transformation is chained
after it (weight decay, momentum SGD, Adam...) does the descent step at ``w``::

    tx = optax.chain(sam(0.05), optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params,
                               grad_fn=lambda p: jax.grad(loss)(p, batch))
    params = optax.apply_updates(params, updates)

Weight decay chained *after* SAM enters the descent step only, not the ascent direction
(as in the paper's code).

Data parallelism: with ``axis_name=None`` every device perturbs with its own local
gradient (m-sharpness, m = per-device batch; what google-research/sam does). With an axis
name the gradient is averaged over that axis first, so all devices share one perturbation
(synchronised SAM). Either way the returned SAM gradient is the *local* gradient at the
perturbed point: averaging it over devices is the train step's job (chain
``optax.stateless`` with ``lax.pmean`` after ``sam``, as ``samrobust.train`` does).

Why not ``optax.contrib.sam``: it runs the ascent as separate optimizer steps
(``sync_period``), has no ``rho`` argument (the radius is hidden in an inner optimizer's
learning rate), and needs ``opaque_mode=True`` plus a gradient function for models with
BatchNorm. Here one ``update`` call is one SAM step, ``rho`` may be a schedule, and the
gradient function is a plain closure, so BatchNorm statistics or other state stay under
the caller's control. To get auxiliary outputs of the perturbed pass (logits, new
BatchNorm statistics), call :func:`sam_gradient` directly.

AWP (:func:`awp`; Wu et al. 2020, arXiv 2004.05884) is the same two-pass update with
another ball: per weight array of two or more dimensions, radius ``gamma * ||w_l||``
(relative, layer-wise), biases and normalisation parameters unperturbed. On the adversarial
loss it is AT-AWP; SAM on the adversarial loss (the ``sam_at`` mode) differs from it only
in the ball (one global L2 ball of radius ``rho`` over all parameters).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class SAMState(NamedTuple):
    """State of :func:`sam` and :func:`awp`: the number of updates (drives a schedule)."""

    count: jax.Array


def perturbation(
    grads: PyTree,
    params: PyTree,
    rho: float | jax.Array,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> PyTree:
    """Returns the SAM (or ASAM) weight perturbation ``e`` for ``grads`` at ``params``.

    A zero gradient gives a zero perturbation (the ``eps`` in the denominator), never NaN.
    """
    if adaptive:
        scaled = jax.tree.map(lambda g, w: jnp.abs(w) * g, grads, params)
        norm = optax.global_norm(scaled)
        return jax.tree.map(lambda s, w: rho * jnp.abs(w) * s / (norm + eps), scaled, params)
    norm = optax.global_norm(grads)
    return jax.tree.map(lambda g: rho * g / (norm + eps), grads)


def sam_gradient(
    grad_fn: Callable[[PyTree], Any],
    grads: PyTree,
    params: PyTree,
    rho: float | jax.Array,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> Any:
    """Evaluates ``grad_fn`` at ``params + e``; returns whatever ``grad_fn`` returns.

    ``grads`` is the gradient at ``params`` (the ascent direction). With ``axis_name`` it
    is averaged over that mapped axis before the perturbation is formed.
    """
    e_fn = functools.partial(perturbation, rho=rho, adaptive=adaptive, eps=eps)
    return _perturbed(grad_fn, grads, params, e_fn, axis_name)


def _perturbed(grad_fn, grads, params, e_fn, axis_name):
    """``grad_fn`` at ``params + e_fn(grads, params)``, ``grads`` averaged over
    ``axis_name`` first (when given)."""
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    return grad_fn(jax.tree.map(jnp.add, params, e_fn(grads, params)))


def sam(
    rho: ScalarOrSchedule,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: str | None = None,
    grouped: bool = False,
    probability: float = 1.0,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """SAM as an optax transformation: turns the gradient at ``w`` into the one at ``w + e``.

    Args:
      rho: perturbation radius, a float or an optax schedule of the update count.
      adaptive: ASAM (perturbation scaled elementwise by ``|w|``).
      eps: added to the gradient norm; keeps a zero gradient from dividing by zero.
      axis_name: mapped axis over which to average the ascent gradient (synchronised SAM);
        ``None`` perturbs with the local gradient on every device.
      grouped: m-sharpness within a device: the incoming gradients carry a leading group
        axis (one gradient per group of examples), every group gets its own perturbation
        ``e_g``, ``grad_fn`` maps parameters with that leading axis to per-group gradients
        (group g's loss at ``w + e_g``), and the update is their mean over groups.
      probability: randomised SAM (Zhao et al. 2022, arXiv 2203.09962): each update is a
        SAM update with this probability, else the plain gradient (drawn from ``seed`` and
        the update count, the same on every device).

    Cheaper SAM with the cost really saved: when ``rho`` is a schedule or ``probability <
    1``, the second pass runs only on the updates where the radius is > 0 and the draw says
    SAM (:func:`perturbs`); on the others the update is the incoming gradient (the gradient
    at ``w``), e.g. SAM in the last 30% of 1000 updates:
    ``sam(lambda n: jnp.where(n >= 700, 0.1, 0.0))``. Inside ``jit`` the choice is a
    ``lax.cond``; on XLA:CPU that makes every step slower than the second pass it saves, so
    a training loop should rather compile the step twice and pass ``perturb=True/False``
    (decided by :func:`perturbs` on the host), as ``samrobust.train`` does.

    The update call needs ``params`` and the keyword ``grad_fn(params) -> grads``, the loss
    gradient (same pytree structure as ``params``); ``perturb`` (a Python bool, optional)
    forces the choice.
    """
    if not callable(rho) and rho < 0:
        raise ValueError(f"sam: rho must be >= 0, got {rho}")
    if grouped and axis_name is not None:
        raise ValueError("sam: grouped perturbations are per device; use axis_name=None")
    if not 0 <= probability <= 1:
        raise ValueError(f"sam: probability must be in [0, 1], got {probability}")
    return _weight_perturbation(
        "sam",
        functools.partial(perturbation, adaptive=adaptive, eps=eps),
        rho,
        axis_name=axis_name,
        grouped=grouped,
        probability=probability,
        seed=seed,
    )


def layerwise_perturbation(
    grads: PyTree, params: PyTree, gamma: float | jax.Array, *, eps: float = 1e-20
) -> PyTree:
    """AWP's weight perturbation: ``v = gamma * ||w|| * g / ||g||`` for every weight array
    of two or more dimensions (kernels), each with its own norms; zero for biases and
    normalisation parameters (one-dimensional), as in csdongxian/AWP's ``diff_in_weights``."""

    def one(g, w):
        if w.ndim <= 1:
            return jnp.zeros_like(w)
        return gamma * jnp.linalg.norm(w) * g / (jnp.linalg.norm(g) + eps)

    return jax.tree.map(one, grads, params)


def awp(
    gamma: ScalarOrSchedule, *, axis_name: str | None = None, eps: float = 1e-20
) -> optax.GradientTransformationExtraArgs:
    """Adversarial Weight Perturbation (Wu et al. 2020, arXiv 2004.05884) as an optax
    transformation: the gradient at ``w + v``, ``v`` = :func:`layerwise_perturbation`.

    SAM's sibling: the same two passes, but the radius is relative and per layer (``gamma``,
    0.005-0.01 in the paper) instead of one global ``rho``. The reference's proxy model takes
    one SGD ascent step and rescales its difference layer-wise, which is this ``v``. Chained
    like :func:`sam`; ``axis_name`` averages the ascent gradient over devices first (the
    reference perturbs with the whole batch's gradient). ``gamma`` may be a schedule (e.g.
    0 during a warm-up), in which case the second pass runs only where it is > 0.
    """
    if not callable(gamma) and gamma < 0:
        raise ValueError(f"awp: gamma must be >= 0, got {gamma}")
    return _weight_perturbation(
        "awp",
        functools.partial(layerwise_perturbation, eps=eps),
        gamma,
        axis_name=axis_name,
    )


def perturbs(
    count: int | jax.Array,
    radius_or_schedule: ScalarOrSchedule,
    probability: float = 1.0,
    seed: int = 0,
) -> jax.Array:
    """Whether update ``count`` of :func:`sam` (or :func:`awp`) perturbs: the radius at
    ``count`` is > 0 and, with ``probability < 1``, the draw from ``seed`` and ``count``
    says so. Evaluated on the host, it picks the program of the update's ``perturb=``."""
    radius = radius_or_schedule(count) if callable(radius_or_schedule) else radius_or_schedule
    active = jnp.asarray(radius) > 0
    if probability < 1:
        key = jax.random.fold_in(jax.random.key(seed), count)
        active &= jax.random.bernoulli(key, probability)
    return active


def _weight_perturbation(
    name: str,
    weight_perturbation: Callable[[PyTree, PyTree, Any], PyTree],
    radius_or_schedule: ScalarOrSchedule,
    *,
    axis_name: str | None,
    grouped: bool = False,
    probability: float = 1.0,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The transformation :func:`sam` and :func:`awp` share: the update is ``grad_fn`` at
    ``params + weight_perturbation(grads, params, radius)``; schedules and random skipping as in
    :func:`sam`, or the update's ``perturb`` keyword (a Python bool) decides."""

    def init_fn(params: PyTree) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, grad_fn=None, perturb=None, **extra_args):
        del extra_args
        if params is None or grad_fn is None:
            raise ValueError(
                f"{name}: update needs params and grad_fn, e.g. "
                "tx.update(grads, state, params, grad_fn=jax.grad(loss))"
            )
        scheduled = callable(radius_or_schedule)
        radius = radius_or_schedule(state.count) if scheduled else radius_or_schedule

        def perturbed():
            e_fn = lambda g, w: weight_perturbation(g, w, radius)  # noqa: E731
            if not grouped:
                return _perturbed(grad_fn, updates, params, e_fn, axis_name)
            e = jax.vmap(lambda g: e_fn(g, params))(updates)
            per_group = grad_fn(jax.tree.map(lambda w, eg: w[None] + eg, params, e))
            return jax.tree.map(lambda g: jnp.mean(g, axis=0), per_group)

        def plain():
            return jax.tree.map(lambda g: jnp.mean(g, axis=0), updates) if grouped else updates

        if perturb is not None:  # decided by the caller (e.g. on the host): no lax.cond
            new_grads = perturbed() if perturb else plain()
        elif scheduled or probability < 1:
            active = perturbs(state.count, radius, probability, seed)
            try:  # eager (a concrete radius and draw): call only the branch taken
                new_grads = perturbed() if bool(active) else plain()
            except jax.errors.ConcretizationTypeError:  # traced: lax.cond runs one branch
                new_grads = jax.lax.cond(active, perturbed, plain)
        else:
            new_grads = perturbed()
        return new_grads, SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
