"""FAB (Croce & Hein, ICML 2020, arXiv 1907.02044, Alg. 1), targeted (FAB-T) and
untargeted: the reference's ``autoattack/fab_pt.py``.

For a target class ``t``: ``n_iter`` steps that linearise ``z_t - z_y`` at the iterate,
project both the iterate and ``x`` onto that hyperplane within ``[0, 1]``
(:func:`project_hyperplane_box`), step to the convex combination with weight
``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` on the projection of ``x``, extrapolated
by ``eta``, and, once adversarial, pull back towards ``x`` by ``beta``. Restart 0 starts at
``x`` (the standard protocol uses one); later restarts at a random point at distance
``eps / 2``. Untargeted FAB (AutoAttack *plus*) linearises every ``z_j - z_y`` at each
step (the full Jacobian: one backward pass per class) and takes the ``j`` whose hyperplane
is nearest in the dual norm, ``|z_j - z_y| / ||grad(z_j - z_y)||_q``, as the reference's
``get_diff_logits_grads_batch`` does. :func:`stage` is FAB as a cascade stage (a run per
target class and restart, or per restart; a point
counts as fooled once its smallest adversarial is within ``eps``); :func:`fab_targeted`
the stand-alone, jittable attack, also as a minimum-norm attack (``eps=None``).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from samrobust.attacks import (
    LogitsFn,
    check_norm,
    example_keys,
    perturbation_norm,
    sphere_start,
    take,
)
from samrobust.autoattack.base import Stage, State, bwhere, n_targets, run, target_classes

BISECTION_STEPS = 40  # halvings of [0, max breakpoint]: beyond float32 resolution


def project_hyperplane_box(t: jax.Array, w: jax.Array, c: jax.Array, norm: str) -> jax.Array:
    """Minimal-norm ``d`` with ``<w, d> = c`` and ``0 <= t + d <= 1`` (rows of ``[B, D]``).

    The optimum moves every coordinate in the direction ``sign(c w_i)`` by ``min(tau, u_i)``
    (Linf) or ``min(tau |w_i|, u_i)`` (L2, the KKT point), ``u_i`` being the room left in the
    box, with the smallest ``tau`` that reaches the hyperplane. ``<w, d>(tau) = sum_i a_i
    min(tau, b_i)`` is piecewise linear and increasing, with breakpoints ``b_i``. The
    reference sorts the breakpoints; sorting is slow on XLA:CPU (an argsort of 64 x 3072
    takes longer than the network's gradient), so :data:`BISECTION_STEPS` bisection steps
    bracket ``tau`` between breakpoints and the linear piece there gives it in closed form.
    If the box does not reach the hyperplane, ``d`` goes to the box's furthest corner (as
    the reference).
    """
    sign = jnp.sign(c)[:, None] * jnp.sign(w)
    room = jnp.maximum(jnp.where(sign > 0, 1.0 - t, t), 0.0)
    absw = jnp.abs(w)
    active = absw > 0
    if norm == "linf":
        a, brk = absw, room
    else:
        a, brk = jnp.square(absw), room / jnp.where(active, absw, 1.0)
    a, brk = jnp.where(active, a, 0.0), jnp.where(active, brk, 0.0)
    goal = jnp.abs(c)

    def reach(tau):  # <w, d> at radius tau, per row
        return jnp.sum(a * jnp.minimum(tau[:, None], brk), axis=1)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        short = reach(mid) < goal
        return jnp.where(short, mid, lo), jnp.where(short, hi, mid)

    top = jnp.max(brk, axis=1)
    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, (jnp.zeros_like(top), top))
    # On the piece through lo the breakpoints <= lo are saturated: <w, d> = s + tau * slope.
    saturated = brk <= lo[:, None]
    s = jnp.sum(jnp.where(saturated, a * brk, 0.0), axis=1)
    slope = jnp.sum(jnp.where(saturated, 0.0, a), axis=1)
    tau = jnp.clip((goal - s) / jnp.maximum(slope, 1e-30), lo, hi)
    tau = jnp.where(reach(top) >= goal, tau, jnp.inf)
    move = jnp.minimum(tau[:, None], brk)
    if norm == "l2":
        move = jnp.where(active, jnp.minimum(move * absw, room), 0.0)
    return jnp.where(active, sign * move, 0.0)


def _init(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    keys: jax.Array,
    j: jax.Array,
    *,
    eps: float | None,
    norm: str,
    n_restarts: int,
    targeted: bool,
) -> State:
    x = jax.lax.stop_gradient(x)
    start = x
    if n_restarts > 1:  # restart 0 starts at x, the others at random points
        away = jnp.clip(x + 0.5 * eps * sphere_start(keys, x, norm), 0.0, 1.0)
        start = jnp.where(j % n_restarts > 0, away, x)
    b = x.shape[0]
    return dict(
        x=x,
        y=y,
        target=target_classes(logits_fn(x), j // n_restarts) if targeted else y,
        x1=start.reshape(b, -1),
        adv=x,
        best=jnp.full((b,), jnp.inf, jnp.float32),
        fooled=jnp.zeros((b,), bool),
    )


def _targeted_hyperplane(logits_fn, x1, x, y, target, norm):
    """``(grad f, f)`` of ``f = z_target - z_y`` at the flat iterates ``x1``."""
    del norm

    def diff(xf):
        z = logits_fn(xf.reshape(x.shape))
        f = take(z, target) - take(z, y)  # > 0 once the target beats the true class
        return jnp.sum(f), f

    return jax.grad(diff, has_aux=True)(x1)


def _nearest_hyperplane(logits_fn, x1, x, y, target, norm):
    """``(grad f, f)`` of the ``f = z_j - z_y`` (``j != y``) whose linearised boundary is
    nearest to ``x1`` in ``norm``: ``|f| / ||grad f||_q`` smallest (``q`` the dual norm)."""
    del target
    z, vjp = jax.vjp(lambda xf: logits_fn(xf.reshape(x.shape)), x1)
    classes = jnp.eye(z.shape[-1], dtype=z.dtype)
    g = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, z.shape))[0], out_axes=1)(classes)
    df = z - take(z, y)[:, None]  # [b, C]
    dg = g - jnp.take_along_axis(g, y[:, None, None], axis=1)  # [b, C, D]
    dual = jnp.sum(jnp.abs(dg), -1) if norm == "linf" else jnp.sqrt(jnp.sum(dg**2, -1))
    dist = jnp.abs(df) / (1e-12 + dual)
    dist = jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), jnp.inf, dist)
    j = jnp.argmin(dist, axis=-1)
    return jnp.take_along_axis(dg, j[:, None, None], axis=1)[:, 0], take(df, j)


def _step(
    logits_fn: LogitsFn,
    s: State,
    i: jax.Array,
    *,
    eps: float | None,
    norm: str,
    alpha_max: float,
    eta: float,
    beta: float,
    targeted: bool,
) -> State:
    del i
    x, y, target = s["x"], s["y"], s["target"]
    b = x.shape[0]
    x0 = x.reshape(b, -1)

    x1 = s["x1"]
    w, f = (_targeted_hyperplane if targeted else _nearest_hyperplane)(
        logits_fn, x1, x, y, target, norm
    )
    d1 = project_hyperplane_box(x1, w, -f, norm)
    d2 = project_hyperplane_box(x0, w, -f + jnp.sum(w * (x1 - x0), axis=1), norm)
    a1 = jnp.maximum(perturbation_norm(d1, norm), 1e-8)
    a2 = jnp.maximum(perturbation_norm(d2, norm), 1e-8)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
    is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape)), axis=-1) != y
    dist = perturbation_norm(x1 - x0, norm)
    better = is_adv & (dist < s["best"])
    best = jnp.where(better, dist, s["best"])
    return dict(
        s,
        x1=jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1),
        adv=bwhere(better, x1.reshape(x.shape), s["adv"]),
        best=best,
        fooled=best <= (jnp.inf if eps is None else eps),
    )


def stage(
    *,
    eps: float | None,
    norm: str,
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> Stage:
    """FAB as a cascade stage: FAB-T, a run per target class and restart; untargeted
    (``n_target_classes=0``), a run per restart."""
    check_norm(norm)
    if n_iter < 1 or n_restarts < 1 or n_target_classes < 0:
        raise ValueError(
            f"fab needs n_iter, n_restarts >= 1 and n_target_classes >= 0; got {n_iter}, "
            f"{n_restarts}, {n_target_classes}"
        )
    if eps is None and n_restarts > 1:
        raise ValueError("fab random restarts need eps")
    kw = dict(eps=eps, norm=norm, targeted=n_target_classes > 0)
    return Stage(
        name="fab-t" if n_target_classes else "fab",
        n_runs=max(n_target_classes, 1) * n_restarts,
        n_steps=n_iter,
        init=functools.partial(_init, n_restarts=n_restarts, **kw),
        step=functools.partial(_step, alpha_max=alpha_max, eta=eta, beta=beta, **kw),
        segment=max(n_iter // 10, 1),
    )


def fab_targeted(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float | None,
    norm: str = "linf",
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    unroll: int = 1,
) -> jax.Array:
    """FAB-T over the ``min(n_target_classes, num_classes - 1)`` most likely wrong classes.

    With ``eps`` (AutoAttack) a target class is tried only while some point is not yet
    fooled within ``eps``, and points whose smallest adversarial is farther than ``eps`` are
    returned as ``x``. With ``eps=None`` it returns the smallest adversarial over all
    targets (``x`` where none was found). Clean-misclassified points are returned as ``x``.
    """
    x = jax.lax.stop_gradient(x)
    n_t = n_targets(logits_fn, x, n_target_classes, "fab_targeted")
    st = stage(
        eps=eps,
        norm=norm,
        n_iter=n_iter,
        n_target_classes=n_t,
        n_restarts=n_restarts,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
    )
    return _smallest_adversarials(st, logits_fn, x, y, key, eps, unroll)


def fab(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float | None,
    unroll: int = 1,
    **options: Any,
) -> jax.Array:
    """Untargeted FAB (each step towards the nearest linearised boundary): ``options`` are
    :func:`stage`'s (``norm``, ``n_iter``, ``n_restarts``, ``alpha_max``, ``eta``,
    ``beta``); returns as :func:`fab_targeted` does."""
    x = jax.lax.stop_gradient(x)
    st = stage(eps=eps, n_target_classes=0, **{"norm": "linf", **options})
    return _smallest_adversarials(st, logits_fn, x, y, key, eps, unroll)


def _smallest_adversarials(
    st: Stage,
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    eps: float | None,
    unroll: int,
) -> jax.Array:
    """Every run of ``st`` (each only while some point is still open); per point the
    smallest adversarial found (within ``eps`` if given), else ``x``."""
    attackable = jnp.argmax(logits_fn(x), axis=-1) == y
    ids = jnp.arange(x.shape[0])

    def open_(best):  # still to attack: not yet fooled within eps (eps=None: every point)
        return attackable & (best > (-1.0 if eps is None else eps))

    def attack(j, carry):
        adv, best = carry
        s = run(st, logits_fn, x, y, example_keys(jax.random.fold_in(key, j), ids), j, unroll)
        take_it = open_(best) & (s["best"] < best)
        return bwhere(take_it, s["adv"], adv), jnp.where(take_it, s["best"], best)

    def body(j, carry):
        skip = ~jnp.any(open_(carry[1]))
        return jax.lax.cond(skip, lambda c: c, functools.partial(attack, j), carry)

    init = (x, jnp.where(attackable, jnp.inf, 0.0).astype(jnp.float32))
    adv, best = jax.lax.fori_loop(0, st.n_runs, body, init)
    keep = attackable & (best < jnp.inf)
    if eps is not None:
        keep = keep & (best <= eps)
    return jax.lax.stop_gradient(bwhere(keep, adv, x))
