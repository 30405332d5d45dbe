"""AutoAttack, "standard" version (Croce & Hein, ICML 2020, arXiv 2003.01690), in pure JAX.

The protocol is a cascade of four parameter-free attacks. Each attack runs only on the points
that are still robust (correctly classified, and not fooled by an earlier attack); a point
counts as robust only if *every* attack failed on it:

1. APGD-CE (:func:`apgd`, ``loss="ce"``): Auto-PGD on the cross-entropy, 100 iterations.
2. APGD-T (:func:`apgd_targeted`): Auto-PGD on the targeted DLR loss, once for each of the
   9 most likely wrong classes (``num_classes - 1`` if fewer), 100 iterations each.
3. FAB-T (:func:`fab_targeted`): the targeted Fast Adaptive Boundary attack (Croce & Hein,
   ICML 2020, arXiv 1907.02044), a minimum-norm attack, over the same 9 target classes,
   100 iterations each; a point counts as fooled if the adversarial found is within ``eps``.
4. Square (:func:`square_attack`): the score-based Square Attack (Andriushchenko et al.,
   ECCV 2020, arXiv 1912.00049) on the margin loss, 5000 queries, no gradients.

:func:`autoattack` is the host-side driver: it gathers the points still robust before each
attack into fixed-size batches (padded, so each attack compiles once), re-checks every
returned point (misclassified, within ``eps`` + 1e-6, inside ``[0, 1]``) before it counts,
and finally verifies the largest perturbation. :func:`autoattack_batch` is the same cascade
as one jittable function: every attack runs on the whole batch, and only points still robust
take its result, which gives the same robust set. :func:`sanity_checks` reproduces the
reference's warnings (``autoattack/checks.py``). Every attack is a pure function of
``(logits_fn, x, y, key)`` that can be jitted with its configuration static; loops are
``lax.fori_loop`` left rolled by default (``unroll=None`` means 1: unrolling 100 iterations
costs minutes of compilation on XLA:CPU and ran slower there too), and an attack run (restart or
target class) is skipped with ``lax.cond`` once every point of the batch is fooled. Pass a
model with large parameters as ``jax.tree_util.Partial(apply_fn, params)``: the driver then
hands it to the jitted attacks as an argument instead of baking the parameters in as
constants. Measured on one H100 (PreActResNet-18, CIFAR shapes, batch 250, full budgets):
APGD-CE 0.4 s, APGD-T 3.5 s, FAB-T 5.1 s, Square 8.8-9.5 s per batch of robust points.

Differences from the reference implementation (github.com/fra31/auto-attack), all deliberate:

- APGD step-size checkpoints and conditions are the reference's (``n_iter_2 = 0.22 n_iter``,
  decrease 0.03, minimum 0.06; halve the step and restart from the best point when the loss
  increased in at most ``rho`` of the steps since the last checkpoint, or when the step was
  not halved at the previous checkpoint and the best loss has not improved). The count of
  increasing steps compares consecutive iterates from ``x^(0)`` on, as in the paper; the
  reference's first comparison reads an unset (zero) row of its loss buffer.
- Non-fooled points: the attacks return their best point (APGD: highest-loss iterate, across
  runs the one with the largest Carlini-Wagner margin ``max_{j!=y} z_j - z_y``; Square: lowest
  margin) instead of the clean input, so progress can be measured. Fooled points get the
  first run's adversarial, as in the reference. Clean-misclassified points are returned as is.
- DLR with fewer classes than it needs (the reference fails): with 2 classes both DLR losses
  use denominator 1 (the plain margin); targeted DLR with 3 classes uses ``z_pi1 - z_pi3``.
  :func:`sanity_checks` warns as the reference does.
- FAB's projection onto ``{<w, z> = b} \\cap [0, 1]^d`` is solved exactly by the same
  sort-and-cumulative-sum method as the reference (a breakpoint search on the radius), written
  as one closed form for Linf and L2.
- Square: each example draws its own window position, signs and (L2) pattern orientation, as
  in the original Square Attack code; the AutoAttack reference shares one window per query
  across the batch. Window positions are uniform over all ``H - s + 1`` offsets (the reference never
  picks the last one). Windows are clamped to the image size for images smaller than the
  schedule assumes (the reference needs ``H >= 5``).
- Randomised models (``version="rand"``, EOT) and the L1 versions are not implemented.
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.attacks import (
    NORMS,
    _flat_norm,
    ascent_direction,
    cross_entropy,
    cw_margin,
    project,
)

LogitsFn = Callable[[jax.Array], jax.Array]
StageFn = Callable[[LogitsFn, jax.Array, jax.Array, jax.Array], jax.Array]
Array = jax.Array | np.ndarray

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
_SQUARE_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


# --------------------------------------------------------------------------------------------
# Losses and small helpers
# --------------------------------------------------------------------------------------------


def _take(z: jax.Array, idx: jax.Array) -> jax.Array:
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
    num = _take(z, labels) - _take(z, target)
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


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example Linf or L2 norm of ``delta`` (shape ``[B]``)."""
    flat = delta.reshape(delta.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def is_adversarial(
    logits_fn: LogitsFn,
    x: jax.Array,
    x_adv: jax.Array,
    y: jax.Array,
    *,
    eps: float,
    norm: str,
    tol: float = 1e-6,
) -> jax.Array:
    """Whether ``x_adv`` is a valid adversarial example: misclassified, ``||x_adv - x|| <=
    eps + tol``, inside ``[0, 1]`` and finite (per example, bool ``[B]``)."""
    pred = jnp.argmax(logits_fn(x_adv), axis=-1)
    axes = tuple(range(1, x.ndim))
    in_box = jnp.all((x_adv >= 0.0) & (x_adv <= 1.0) & jnp.isfinite(x_adv), axis=axes)
    in_ball = perturbation_norm(x_adv - x, norm) <= eps + tol
    return (pred != y) & in_box & in_ball


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}")


def _batch_shape(x: jax.Array) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _best_of_runs(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    n_runs: int,
    run: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
) -> jax.Array:
    """Runs ``run(j, key_j) -> (candidate, fooled)`` for ``j < n_runs`` and keeps per example
    the first fooling candidate, else the candidate with the largest CW margin.

    Clean-misclassified points keep ``x``; a run is skipped once every point is fooled.
    """
    fooled = jnp.argmax(logits_fn(x), axis=-1) != y
    score = jnp.full(y.shape, -jnp.inf, jnp.float32)

    def attack(j, carry):
        adv, fooled, score = carry
        cand, cand_fooled = run(j, jax.random.fold_in(key, j))
        cand_score = cw_margin(logits_fn(cand), y)
        take = ~fooled & (cand_fooled | (cand_score > score))
        adv = jnp.where(take.reshape(_batch_shape(x)), cand, adv)
        return adv, fooled | (take & cand_fooled), jnp.where(take, cand_score, score)

    def body(j, carry):
        return jax.lax.cond(jnp.all(carry[1]), lambda c: c, functools.partial(attack, j), carry)

    adv, _, _ = jax.lax.fori_loop(0, n_runs, body, (x, fooled, score))
    return adv


def _target_classes(logits: jax.Array, j: jax.Array) -> jax.Array:
    """The ``(j + 2)``-th most likely class at the clean point (``j = 0``: the runner-up)."""
    order = jnp.argsort(logits, axis=-1)
    col = logits.shape[-1] - 2 - j
    return jnp.take_along_axis(order, jnp.broadcast_to(col, (logits.shape[0], 1)), axis=1)[:, 0]


# --------------------------------------------------------------------------------------------
# APGD
# --------------------------------------------------------------------------------------------


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations after which APGD checks its step size: ``p_j n_iter`` for ``p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the reference's integer
    form (intervals of ``int(0.22 n)`` shrinking by ``int(0.03 n)`` to at least
    ``int(0.06 n)``). For ``n_iter = 100``: 22, 41, 57, 70, 80, 87, 93, 99."""
    k = max(int(0.22 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    out, counter = [], 0
    for i in range(n_iter):
        counter += 1
        if counter == k:
            out.append(i + 1)
            k, counter = max(k - size_decr, k_min), 0
    return out


def _apgd_run(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    target: jax.Array | None,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    loss: str,
    rho: float,
    unroll: int | bool,
) -> tuple[jax.Array, jax.Array]:
    """One APGD run (reference ``attack_single_run``); returns ``(candidate, fooled)`` where
    the candidate is the last misclassified iterate if any, else the highest-loss one."""
    if target is None:
        per_example = {"ce": lambda z: cross_entropy(z, y), "dlr": lambda z: dlr_loss(z, y)}
    else:
        per_example = {
            "ce": lambda z: ce_targeted_loss(z, y, target),
            "dlr": lambda z: dlr_targeted_loss(z, y, target),
        }
    loss_of = per_example[loss]

    def objective(xa):
        z = logits_fn(xa)
        li = loss_of(z)
        return jnp.sum(li), (li, z)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    bshape = _batch_shape(x)
    axes = tuple(range(1, x.ndim))

    def bwhere(mask, a, b):
        return jnp.where(mask.reshape(bshape), a, b)

    # Random start on the sphere of the ball (Linf: t / ||t||_inf, t uniform; L2: Gaussian).
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0)
        t = t / (jnp.max(jnp.abs(t), axis=axes, keepdims=True) + 1e-12)
    else:
        t = jax.random.normal(key, x.shape, jnp.float32)
        t = t / (_flat_norm(t) + 1e-12)
    x_adv = jnp.clip(x + eps * t.astype(x.dtype), 0.0, 1.0)
    (_, (loss0, z0)), grad = value_and_grad(x_adv)
    fooled = jnp.argmax(z0, axis=-1) != y

    ckpt = np.zeros(n_iter, bool)
    ckpt_len = np.ones(n_iter, np.float32)
    previous = 0
    for c in apgd_checkpoints(n_iter):
        ckpt[c - 1], ckpt_len[c - 1] = True, c - previous
        previous = c
    ckpt, ckpt_len = jnp.asarray(ckpt), jnp.asarray(ckpt_len)

    def to_ball(z):
        return x + project(z - x, x, eps, norm)

    def body(i, s):
        momentum = s["x_adv"] - s["x_old"]
        a = jnp.where(i > 0, 0.75, 1.0)
        z = to_ball(s["x_adv"] + s["step"] * ascent_direction(s["grad"], norm))
        x_new = to_ball(s["x_adv"] + (z - s["x_adv"]) * a + momentum * (1.0 - a))
        (_, (li, logits)), grad = value_and_grad(x_new)
        miss = jnp.argmax(logits, axis=-1) != y
        improved = li > s["loss_best"]
        loss_best = jnp.where(improved, li, s["loss_best"])
        s = dict(
            s,
            x_old=s["x_adv"],
            x_adv=x_new,
            grad=grad,
            x_best_adv=bwhere(miss, x_new, s["x_best_adv"]),
            fooled=s["fooled"] | miss,
            x_best=bwhere(improved, x_new, s["x_best"]),
            grad_best=bwhere(improved, grad, s["grad_best"]),
            loss_best=loss_best,
            n_up=s["n_up"] + (li > s["loss_prev"]).astype(jnp.float32),
            loss_prev=li,
        )
        # Checkpoint: halve the step and go back to the best point where progress stalled.
        oscillating = s["n_up"] <= rho * ckpt_len[i]
        stalled = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        reduce = ckpt[i] & (oscillating | stalled)
        return dict(
            s,
            step=jnp.where(reduce.reshape(bshape), s["step"] / 2.0, s["step"]),
            x_adv=bwhere(reduce, s["x_best"], s["x_adv"]),
            grad=bwhere(reduce, s["grad_best"], s["grad"]),
            n_up=jnp.where(ckpt[i], 0.0, s["n_up"]),
            reduced_last=jnp.where(ckpt[i], reduce, s["reduced_last"]),
            loss_best_last=jnp.where(ckpt[i], loss_best, s["loss_best_last"]),
        )

    state = dict(
        x_adv=x_adv,
        x_old=x_adv,
        grad=grad,
        x_best=x_adv,
        grad_best=grad,
        loss_best=loss0,
        x_best_adv=x_adv,
        fooled=fooled,
        step=jnp.full(bshape, 2.0 * eps, jnp.float32),
        n_up=jnp.zeros(y.shape, jnp.float32),
        loss_prev=loss0,
        reduced_last=jnp.ones(y.shape, bool),
        loss_best_last=loss0,
    )
    state = jax.lax.fori_loop(0, n_iter, body, state, unroll=unroll)
    cand = bwhere(state["fooled"], state["x_best_adv"], state["x_best"])
    return cand, state["fooled"]


def _apgd_checks(eps: float, norm: str, n_iter: int, loss: str, n_restarts: int) -> None:
    _check_norm(norm)
    if loss not in ("ce", "dlr"):
        raise ValueError(f"Unknown APGD loss {loss!r}; choose 'ce' or 'dlr'")
    if eps < 0 or n_iter < 1 or n_restarts < 1:
        raise ValueError(
            f"apgd needs eps >= 0, n_iter >= 1, n_restarts >= 1; got {eps}, {n_iter}, {n_restarts}"
        )


def apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    loss: str = "ce",
    target: jax.Array | None = None,
    n_restarts: int = 1,
    rho: float = 0.75,
    unroll: int | bool | None = None,
) -> jax.Array:
    """Auto-PGD (Croce & Hein 2020, Alg. 1): returns ``x_adv`` in the ``eps`` ball and ``[0, 1]``.

    Momentum 0.75, initial step ``2 eps``, step halving with restart from the best point at
    the checkpoints of :func:`apgd_checkpoints` (see the module docstring for the
    conditions). ``loss``: ``"ce"`` or ``"dlr"``; with ``target`` (labels ``[B]``) the
    targeted variant (``-CE(z, t)`` or targeted DLR). Points fooled at some iterate get the
    last fooling iterate of the first successful restart; the others their best point.
    Clean-misclassified points are returned unchanged. The result carries no gradient.
    """
    _apgd_checks(eps, norm, n_iter, loss, n_restarts)
    unroll = 1 if unroll is None else unroll  # rolled: see the module docstring
    x = jax.lax.stop_gradient(x)
    run = functools.partial(
        _apgd_run,
        logits_fn,
        x,
        y,
        eps=eps,
        norm=norm,
        n_iter=n_iter,
        loss=loss,
        rho=rho,
        unroll=unroll,
    )
    adv = _best_of_runs(logits_fn, x, y, key, n_restarts, lambda j, k: run(k, target))
    return jax.lax.stop_gradient(adv)


def apgd_targeted(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_restarts: int = 1,
    loss: str = "dlr",
    rho: float = 0.75,
    unroll: int | bool | None = None,
) -> jax.Array:
    """APGD-T: targeted APGD (targeted DLR loss by default) against each of the
    ``min(n_target_classes, num_classes - 1)`` most likely wrong classes at ``x`` in turn,
    ``n_restarts`` runs each; each run attacks only the points not yet fooled."""
    _apgd_checks(eps, norm, n_iter, loss, n_restarts)
    unroll = 1 if unroll is None else unroll  # rolled: see the module docstring
    x = jax.lax.stop_gradient(x)
    clean_logits = logits_fn(x)
    n_t = min(n_target_classes, clean_logits.shape[-1] - 1)
    if n_t < 1:
        raise ValueError("apgd_targeted needs at least 2 classes and n_target_classes >= 1")
    run = functools.partial(
        _apgd_run,
        logits_fn,
        x,
        y,
        eps=eps,
        norm=norm,
        n_iter=n_iter,
        loss=loss,
        rho=rho,
        unroll=unroll,
    )

    def targeted(j, k):
        return run(k, _target_classes(clean_logits, j // n_restarts))

    adv = _best_of_runs(logits_fn, x, y, key, n_t * n_restarts, targeted)
    return jax.lax.stop_gradient(adv)


# --------------------------------------------------------------------------------------------
# FAB-T
# --------------------------------------------------------------------------------------------


def project_hyperplane_box(t: jax.Array, w: jax.Array, c: jax.Array, norm: str) -> jax.Array:
    """Minimal-norm ``d`` with ``<w, d> = c`` and ``0 <= t + d <= 1`` (rows of ``[B, D]``).

    The optimum moves every coordinate in the direction ``sign(c w_i)`` by ``min(tau, u_i)``
    (Linf) or ``min(tau |w_i|, u_i)`` (L2, the KKT point), ``u_i`` being the room left in the
    box, with the smallest ``tau`` that reaches the hyperplane. ``<w, d>`` is piecewise
    linear and increasing in ``tau``, so sorting the breakpoints and taking cumulative sums
    gives ``tau`` exactly (the reference's ``projection_linf/l2`` do the same). If the box
    does not reach the hyperplane, ``d`` goes to the box's furthest corner (as the reference).
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
    order = jnp.argsort(brk, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    b_s = jnp.take_along_axis(brk, order, axis=1)
    saturated = jnp.cumsum(a_s * b_s, axis=1) - a_s * b_s  # sum over breakpoints before k
    slope = jnp.sum(a_s, axis=1, keepdims=True) - (jnp.cumsum(a_s, axis=1) - a_s)
    reach = saturated + b_s * slope  # <w, d> at tau = k-th breakpoint
    goal = jnp.abs(c)
    ok = reach >= goal[:, None]
    k = jnp.argmax(ok, axis=1)
    tau = (goal - _take(saturated, k)) / jnp.maximum(_take(slope, k), 1e-30)
    tau = jnp.where(jnp.any(ok, axis=1), jnp.maximum(tau, 0.0), jnp.inf)
    move = jnp.minimum(tau[:, None], brk)
    if norm == "l2":
        move = jnp.where(active, jnp.minimum(move * absw, room), 0.0)
    return jnp.where(active, sign * move, 0.0)


def _fab_run(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    target: jax.Array,
    x_start: jax.Array,
    *,
    norm: str,
    n_iter: int,
    alpha_max: float,
    eta: float,
    beta: float,
    unroll: int | bool,
) -> tuple[jax.Array, jax.Array]:
    """One targeted FAB run from ``x_start``; returns the smallest adversarial found and its
    distance to ``x`` (``inf`` where none)."""
    b = x.shape[0]
    x0 = x.reshape(b, -1)

    def diff(xf):
        z = logits_fn(xf.reshape(x.shape))
        f = _take(z, target) - _take(z, y)  # > 0 once the target beats the true class
        return jnp.sum(f), f

    grad_fn = jax.grad(diff, has_aux=True)

    def norm_of(v):
        return perturbation_norm(v, norm)

    def body(_, carry):
        x1, adv, best = carry
        w, f = grad_fn(x1)
        d1 = project_hyperplane_box(x1, w, -f, norm)
        d2 = project_hyperplane_box(x0, w, -f + jnp.sum(w * (x1 - x0), axis=1), norm)
        a1 = jnp.maximum(norm_of(d1), 1e-8)
        a2 = jnp.maximum(norm_of(d2), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape)), axis=-1) != y
        dist = norm_of(x1 - x0)
        better = is_adv & (dist < best)
        adv = jnp.where(better[:, None], x1, adv)
        best = jnp.where(better, dist, best)
        x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
        return x1, adv, best

    init = (x_start.reshape(b, -1), x0, jnp.full((b,), jnp.inf, jnp.float32))
    _, adv, best = jax.lax.fori_loop(0, n_iter, body, init, unroll=unroll)
    return adv.reshape(x.shape), best


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
    unroll: int | bool | None = None,
) -> jax.Array:
    """FAB-T (Croce & Hein, ICML 2020, arXiv 1907.02044, Alg. 1, targeted version).

    For each of the ``min(n_target_classes, num_classes - 1)`` most likely wrong classes
    ``t`` at ``x``: ``n_iter`` steps that linearise ``z_t - z_y`` at the iterate, project both
    the iterate and ``x`` onto that hyperplane within ``[0, 1]`` (:func:`project_hyperplane_box`),
    step to the convex combination with weight ``alpha = min(|d1| / (|d1| + |d2|),
    alpha_max)`` on the projection of ``x``, extrapolated by ``eta``, and, once adversarial,
    pull back towards ``x`` by ``beta``. Restart 0 starts at ``x`` (the standard protocol
    uses one); later restarts start at a random point at distance ``eps / 2`` (needs ``eps``).

    With ``eps`` given (AutoAttack), a target class is tried only on the points not yet
    fooled within ``eps``, and points whose smallest adversarial is farther than ``eps``
    are returned as ``x``. With ``eps=None`` it returns the smallest adversarial over all
    targets (``x`` where none was found). Clean-misclassified points are returned as ``x``.
    """
    _check_norm(norm)
    if n_iter < 1 or n_restarts < 1:
        raise ValueError(f"fab_targeted needs n_iter, n_restarts >= 1; got {n_iter}, {n_restarts}")
    if eps is None and n_restarts > 1:
        raise ValueError("fab_targeted random restarts need eps")
    unroll = 1 if unroll is None else unroll  # rolled: see the module docstring
    x = jax.lax.stop_gradient(x)
    clean_logits = logits_fn(x)
    n_t = min(n_target_classes, clean_logits.shape[-1] - 1)
    if n_t < 1:
        raise ValueError("fab_targeted needs at least 2 classes and n_target_classes >= 1")
    attackable = jnp.argmax(clean_logits, axis=-1) == y
    bshape = _batch_shape(x)
    radius = 0.0 if eps is None else 0.5 * eps

    def done(best):
        return ~attackable | (best <= (-1.0 if eps is None else eps))

    def attack(j, carry):
        adv, best = carry
        x_start = x
        if n_restarts > 1:  # restart 0 starts at x, the others at random points
            kj = jax.random.fold_in(key, j)
            if norm == "linf":
                u = jax.random.uniform(kj, x.shape, jnp.float32, -1.0, 1.0)
                u = u / (jnp.max(jnp.abs(u), axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-12)
            else:
                u = jax.random.normal(kj, x.shape, jnp.float32)
                u = u / (_flat_norm(u) + 1e-12)
            x_start = jnp.where(j % n_restarts > 0, jnp.clip(x + radius * u, 0.0, 1.0), x)
        cand, dist = _fab_run(
            logits_fn,
            x,
            y,
            _target_classes(clean_logits, j // n_restarts),
            x_start,
            norm=norm,
            n_iter=n_iter,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            unroll=unroll,
        )
        take = ~done(best) & (dist < best)
        return jnp.where(take.reshape(bshape), cand, adv), jnp.where(take, dist, best)

    def body(j, carry):
        return jax.lax.cond(
            jnp.all(done(carry[1])), lambda c: c, functools.partial(attack, j), carry
        )

    init = (x, jnp.where(attackable, jnp.inf, 0.0).astype(jnp.float32))
    adv, best = jax.lax.fori_loop(0, n_t * n_restarts, body, init)
    keep = attackable & (best < jnp.inf)
    if eps is not None:
        keep = keep & (best <= eps)
    return jax.lax.stop_gradient(jnp.where(keep.reshape(bshape), adv, x))


# --------------------------------------------------------------------------------------------
# Square Attack
# --------------------------------------------------------------------------------------------


def square_p_schedule(i: jax.Array | int, p_init: float = 0.8) -> jax.Array:
    """Fraction ``p`` of pixels changed at query ``i`` (Andriushchenko et al. 2020; halved
    after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)."""
    halvings = jnp.sum(jnp.asarray(i) > jnp.asarray(_SQUARE_P_THRESHOLDS))
    return p_init / 2.0 ** halvings.astype(jnp.float32)


def _window_mask(h: int, w: int, vh: jax.Array, vw: jax.Array, s: jax.Array) -> jax.Array:
    """``[B, H, W, 1]`` mask of the ``s x s`` windows with top-left corners ``(vh, vw)``."""
    rows = jnp.arange(h)[None, :, None] - vh[:, None, None]
    cols = jnp.arange(w)[None, None, :] - vw[:, None, None]
    inside = (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)
    return inside[..., None]


def _rect_profile(di: jax.Array, dj: jax.Array, n: jax.Array, m: jax.Array, csum: jax.Array):
    """Reference ``eta_rectangles(n, m)`` (before normalisation) at local coordinates.

    Cell ``(i, j)`` of the ``n x m`` block gets ``sum_{k = dist}^{K-1} 1 / (k+1)^2``, with
    ``dist`` its Chebyshev distance to ``(n//2, m//2)`` and ``K = max(n, m) // 2 + 1``.
    """
    inside = (di >= 0) & (di < n) & (dj >= 0) & (dj < m)
    dist = jnp.maximum(jnp.abs(di - n // 2), jnp.abs(dj - m // 2))
    top = jnp.maximum(n // 2, m // 2) + 1
    val = jnp.take(csum, top, mode="clip") - jnp.take(csum, jnp.minimum(dist, top), mode="clip")
    return jnp.where(inside, val, 0.0)


def _eta_window(
    h: int, w: int, vh: jax.Array, vw: jax.Array, s: jax.Array, transpose: jax.Array
) -> jax.Array:
    """The L2 Square update's pattern (reference ``eta(s)``) in an ``s x s`` window at
    ``(vh, vw)``: two stacked blocks of concentric rectangles with opposite signs, unit L2
    norm, transposed where ``transpose``. Returns ``[B, H, W]`` (zero outside the window)."""
    csum = jnp.concatenate(
        [jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, max(h, w) + 2) ** 2)]
    ).astype(jnp.float32)
    di = jnp.arange(h)[None, :, None] - vh[:, None, None]
    dj = jnp.arange(w)[None, None, :] - vw[:, None, None]
    inside = (di >= 0) & (di < s) & (dj >= 0) & (dj < s)
    tr = transpose[:, None, None]
    di, dj = jnp.where(tr, dj, di), jnp.where(tr, di, dj)
    half = s // 2

    def unit(v):
        return v / (jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True)) + 1e-12)

    top = unit(_rect_profile(di, dj, half, s, csum))
    bottom = unit(_rect_profile(di - half, dj, s - half, s, csum))
    return unit(jnp.where(inside, top - bottom, 0.0))


def square_eta(s: int) -> np.ndarray:
    """The reference ``eta(s)`` (untransposed) as a numpy ``s x s`` array: the pattern that
    :func:`_eta_window` draws in a window."""

    def rectangles(n, m):
        out = np.zeros((n, m))
        for k in range(max(n, m) // 2 + 1):
            r0, c0 = n // 2 - k, m // 2 - k
            out[max(r0, 0) : max(r0 + 2 * k + 1, 0), max(c0, 0) : max(c0 + 2 * k + 1, 0)] += (
                1.0 / (k + 1) ** 2
            )
        return out / (np.linalg.norm(out) + 1e-12)

    out = np.concatenate([rectangles(s // 2, s), -rectangles(s - s // 2, s)])
    return out / np.linalg.norm(out)


def _square_l2_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The L2 Square start (unnormalised): a grid of ``s x s`` blocks, ``s = H // 5``, each
    holding :func:`square_eta` (randomly transposed) times a random sign per channel."""
    b, h, w, c = shape
    s = max(h // 5, 1)
    oh, ow = max((h - 5 * s) // 2, 0), max((w - 5 * s) // 2, 0)  # grid offset
    nh, nw = (h - oh) // s, (w - ow) // s  # number of blocks that fit
    u = jax.random.uniform(key, (b, nh, nw, 1, 1, c + 1))  # one RNG call: cheaper to compile
    eta = jnp.asarray(square_eta(s), jnp.float32)
    pat = jnp.where(u[..., 0] < 0.5, eta.T, eta)[..., None]  # [b, nh, nw, s, s, 1]
    sign = jnp.where(u[..., 1:] < 0.5, 1.0, -1.0)
    blocks = (pat * sign).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * s, nw * s, c)
    return jnp.zeros(shape, jnp.float32).at[:, oh : oh + nh * s, ow : ow + nw * s].set(blocks)


def square_attack(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    unroll: int | bool = 1,
) -> jax.Array:
    """Square Attack (Andriushchenko et al., ECCV 2020, arXiv 1912.00049): random search on
    the margin ``z_y - max_{j != y} z_j`` using only forward passes; inputs ``[B, H, W, C]``.

    Linf: start from vertical stripes ``x +- eps`` (one sign per column and channel); each
    query moves a random ``s x s`` window (``s^2 ~ p H W``, :func:`square_p_schedule`) by
    ``+-2 eps`` per channel, projected back onto the ball and ``[0, 1]``. L2: start from a
    grid of ``H//5``-sized blocks of the pseudo-Gaussian pattern (:func:`_eta_window`), and
    each query moves the mass of a second random window into a first one, adds the pattern
    with random signs there, and rescales the whole perturbation to norm ``eps`` (the
    reference's update). A query is kept if it lowers the margin; fooled points stop.
    ``unroll`` defaults to 1: the loop has no input gradient, and unrolling thousands of
    queries would only slow compilation. Returns the lowest-margin point per example.
    """
    _check_norm(norm)
    if x.ndim != 4:
        raise ValueError(f"square_attack needs NHWC images; got shape {x.shape}")
    if eps < 0 or n_queries < 0:
        raise ValueError(f"square_attack needs eps, n_queries >= 0; got {eps}, {n_queries}")
    b, h, w, c = x.shape
    x = jax.lax.stop_gradient(x)

    def margin(xa):
        return -cw_margin(logits_fn(xa), y)

    def signs(u):
        return jnp.where(u < 0.5, 1.0, -1.0).astype(x.dtype)

    def normalize(v):
        return v / (_flat_norm(v) + 1e-12)

    k_init, k_loop = jax.random.split(key)
    if norm == "linf":
        x_best = jnp.clip(x + eps * signs(jax.random.uniform(k_init, (b, 1, w, c))), 0.0, 1.0)
    else:
        x_best = jnp.clip(x + eps * normalize(_square_l2_init(k_init, x.shape)), 0.0, 1.0)

    clean_ok = margin(x) > 0
    m_best = jnp.where(clean_ok, margin(x_best), -jnp.inf)
    x_best = jnp.where(clean_ok.reshape(_batch_shape(x)), x_best, x)

    # Each query makes one RNG call (every call site compiles its own generator).
    def offsets(u, s):
        """Uniform window corners in ``[0, n - s]`` from uniforms ``u``."""
        n = jnp.asarray([h, w, h, w][: u.shape[1]])
        return jnp.minimum(jnp.floor(u * (n - s + 1)), n - s).astype(jnp.int32)

    def propose_linf(k, i, xb):
        s = jnp.round(jnp.sqrt(square_p_schedule(i, p_init) * h * w)).astype(jnp.int32)
        s = jnp.clip(s, 1, min(h, w))
        u = jax.random.uniform(k, (b, 2 + c))
        v = offsets(u[:, :2], s)
        step = _window_mask(h, w, v[:, 0], v[:, 1], s) * (2.0 * eps) * signs(u[:, None, None, 2:])
        return x + project(xb + step - x, x, eps, "linf")

    def propose_l2(k, i, xb):
        s = jnp.maximum(jnp.round(jnp.sqrt(square_p_schedule(i, p_init) * h * w)), 3)
        s = s.astype(jnp.int32)
        s = jnp.minimum(s + (1 - s % 2), min(h, w))  # odd, at most the image size
        u = jax.random.uniform(k, (b, 5 + c))
        v = offsets(u[:, :4], s)
        m1 = _window_mask(h, w, v[:, 0], v[:, 1], s).astype(x.dtype)
        m2 = _window_mask(h, w, v[:, 2], v[:, 3], s).astype(x.dtype)
        delta = xb - x
        norm_win1 = jnp.sqrt(jnp.sum(jnp.square(delta * m1), axis=(1, 2), keepdims=True))
        norm_img = _flat_norm(delta)
        norm_wins = _flat_norm(delta * jnp.maximum(m1, m2))
        pat = _eta_window(h, w, v[:, 0], v[:, 1], s, u[:, 4] < 0.5)
        new = pat[..., None] * signs(u[:, None, None, 5:]) + delta * m1 / (1e-12 + norm_win1)
        new_norm = jnp.sqrt(jnp.sum(jnp.square(new), axis=(1, 2), keepdims=True))
        scale = jnp.sqrt(jnp.maximum(eps**2 - norm_img**2, 0.0) / c + norm_wins**2)
        new = new / (1e-12 + new_norm) * scale
        delta = delta * (1.0 - m2)
        delta = delta * (1.0 - m1) + new * m1
        return jnp.clip(x + eps * normalize(delta), 0.0, 1.0)

    propose = propose_linf if norm == "linf" else propose_l2

    def query(i, carry):
        xb, mb = carry
        x_new = propose(jax.random.fold_in(k_loop, i), i, xb)
        m_new = margin(x_new)
        improved = (mb > 0) & (m_new < mb)
        return jnp.where(improved.reshape(_batch_shape(x)), x_new, xb), jnp.where(
            improved, m_new, mb
        )

    def body(i, carry):
        return jax.lax.cond(jnp.any(carry[1] > 0), functools.partial(query, i), lambda c: c, carry)

    x_best, _ = jax.lax.fori_loop(0, n_queries, body, (x_best, m_best), unroll=unroll)
    return jax.lax.stop_gradient(x_best)


# --------------------------------------------------------------------------------------------
# The cascade
# --------------------------------------------------------------------------------------------


class AutoAttackResult(NamedTuple):
    """Result of :func:`autoattack` / :func:`autoattack_batch`.

    ``x_adv``: the adversarial input of each fooled point, ``x`` for the others.
    ``robust``: bool ``[N]``, correctly classified and not fooled by any attack.
    ``clean``: bool ``[N]``, correctly classified at ``x``.
    ``stages``: attack name -> robust mask after that attack (cascade order; the last one
    equals ``robust``). ``max_perturbation``: largest ``||x_adv - x||`` (Linf or L2).
    """

    x_adv: Array
    robust: Array
    clean: Array
    stages: dict[str, Array]
    max_perturbation: float | jax.Array

    @property
    def robust_accuracy(self) -> float:
        return float(np.mean(np.asarray(self.robust)))

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(np.asarray(self.clean)))


def make_stage(
    name: str,
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    unroll: int | bool | None = None,
) -> StageFn:
    """The attack ``name`` of the standard protocol as ``(logits_fn, x, y, key) -> x_adv``."""
    if name == "apgd-ce":
        return functools.partial(apgd, eps=eps, norm=norm, n_iter=n_iter, loss="ce", unroll=unroll)
    if name == "apgd-t":
        return functools.partial(
            apgd_targeted,
            eps=eps,
            norm=norm,
            n_iter=n_iter,
            n_target_classes=n_target_classes,
            unroll=unroll,
        )
    if name == "fab-t":
        return functools.partial(
            fab_targeted,
            eps=eps,
            norm=norm,
            n_iter=n_iter,
            n_target_classes=n_target_classes,
            unroll=unroll,
        )
    if name == "square":
        return functools.partial(square_attack, eps=eps, norm=norm, n_queries=n_queries)
    raise ValueError(f"Unknown attack {name!r}; choose from {STANDARD_ATTACKS}")


def _standard_stages(
    logits_fn: LogitsFn,
    x: Array,
    *,
    eps: float,
    norm: str,
    num_classes: int,
    version: str,
    attacks: Sequence[str] | None,
    n_iter: int,
    n_target_classes: int,
    n_queries: int,
    unroll: int | bool | None,
) -> list[tuple[str, StageFn]]:
    _check_norm(norm)
    if version != "standard":
        raise NotImplementedError(f"Only version='standard' is implemented, not {version!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    out_dim = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    if out_dim != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model outputs {out_dim} logits")
    names = STANDARD_ATTACKS if attacks is None else tuple(attacks)
    return [
        (
            name,
            make_stage(
                name,
                eps=eps,
                norm=norm,
                n_iter=n_iter,
                n_target_classes=n_target_classes,
                n_queries=n_queries,
                unroll=unroll,
            ),
        )
        for name in names
    ]


def _jit_model(fn: Callable, logits_fn: LogitsFn) -> Callable:
    """``jit(fn)(logits_fn, *args)`` as a function of ``args``; a pytree model (``jax.tree_util.
    Partial``) is a traced argument, any other callable is closed over (static)."""
    if isinstance(logits_fn, jax.tree_util.Partial):
        jitted = jax.jit(fn)
        return lambda *args: jitted(logits_fn, *args)
    return jax.jit(functools.partial(fn, logits_fn))


def run_cascade(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: jax.Array,
    stages: Sequence[tuple[str, StageFn]],
    *,
    eps: float,
    norm: str,
    batch_size: int = 250,
) -> AutoAttackResult:
    """Runs ``stages`` (name, ``(logits_fn, x, y, key) -> x_adv``) as a cascade, on the host.

    Before each stage the points still robust are gathered into batches of
    ``min(batch_size, N)`` (the last one padded by repetition, so each stage compiles once).
    A returned point counts only if :func:`is_adversarial` holds for it. Raises
    ``RuntimeError`` if a final perturbation leaves the ball (+1e-6) or ``[0, 1]``.

    Each stage is jitted for this call. A ``logits_fn`` that is a pytree, e.g.
    ``jax.tree_util.Partial(apply_fn, params)``, is passed to the jitted functions as an
    argument, so its arrays are not baked into the executables as constants (they are for a
    plain closure).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    bs = max(1, min(batch_size, n))
    predict = _jit_model(lambda f, xb: jnp.argmax(f(xb), axis=-1), logits_fn)
    check = _jit_model(functools.partial(is_adversarial, eps=eps, norm=norm), logits_fn)

    def batches(idx):
        for start in range(0, len(idx), bs):
            chunk = idx[start : start + bs]
            yield start // bs, chunk, np.resize(chunk, bs)

    clean = np.zeros(n, bool)
    for _, chunk, padded in batches(np.arange(n)):
        clean[chunk] = np.asarray(predict(x[padded]))[: len(chunk)] == y[chunk]
    robust = clean.copy()
    x_adv = x.copy()
    masks: dict[str, np.ndarray] = {}
    for si, (name, fn) in enumerate(stages):
        attack = _jit_model(fn, logits_fn)
        for bi, chunk, padded in batches(np.flatnonzero(robust)):
            kb = jax.random.fold_in(jax.random.fold_in(key, si), bi)
            xb, yb = jnp.asarray(x[padded]), jnp.asarray(y[padded])
            adv = attack(xb, yb, kb)
            ok = np.asarray(check(xb, adv, yb))[: len(chunk)]
            robust[chunk[ok]] = False
            x_adv[chunk[ok]] = np.asarray(adv)[: len(chunk)][ok]
        masks[name] = robust.copy()
    max_pert = float(np.max(perturbation_norm(jnp.asarray(x_adv - x), norm))) if n else 0.0
    if not (max_pert <= eps + 1e-6 and np.all((x_adv >= 0) & (x_adv <= 1))):
        raise RuntimeError(f"AutoAttack produced an invalid point (max perturbation {max_pert})")
    return AutoAttackResult(x_adv, robust, clean, masks, max_pert)


def autoattack(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    num_classes: int,
    version: str = "standard",
    batch_size: int = 250,
    attacks: Sequence[str] | None = None,
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    unroll: int | bool | None = None,
) -> AutoAttackResult:
    """AutoAttack "standard": APGD-CE -> APGD-T -> FAB-T -> Square (see the module docstring).

    ``attacks`` runs a sub-sequence instead (names from ``STANDARD_ATTACKS``); ``n_iter``,
    ``n_target_classes`` and ``n_queries`` override the protocol's 100 / 9 / 5000 (for
    tests). Returns an :class:`AutoAttackResult` of numpy arrays.
    """
    stages = _standard_stages(
        logits_fn,
        x,
        eps=eps,
        norm=norm,
        num_classes=num_classes,
        version=version,
        attacks=attacks,
        n_iter=n_iter,
        n_target_classes=n_target_classes,
        n_queries=n_queries,
        unroll=unroll,
    )
    return run_cascade(logits_fn, x, y, key, stages, eps=eps, norm=norm, batch_size=batch_size)


def autoattack_batch(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    num_classes: int,
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    unroll: int | bool | None = None,
) -> AutoAttackResult:
    """The cascade of :func:`autoattack` on one batch as a single jittable function (make the
    keyword arguments static). Every attack runs on the whole batch and only points still
    robust take its result, so the robust set follows the cascade's semantics; the work is
    that of running every attack on every point. No final ``RuntimeError`` check (it cannot
    raise under ``jit``); ``max_perturbation`` is a scalar array."""
    stages = _standard_stages(
        logits_fn,
        x,
        eps=eps,
        norm=norm,
        num_classes=num_classes,
        version=version,
        attacks=attacks,
        n_iter=n_iter,
        n_target_classes=n_target_classes,
        n_queries=n_queries,
        unroll=unroll,
    )
    x = jax.lax.stop_gradient(x)
    clean = jnp.argmax(logits_fn(x), axis=-1) == y
    robust, x_adv, masks = clean, x, {}
    for si, (name, fn) in enumerate(stages):
        adv = fn(logits_fn, x, y, jax.random.fold_in(key, si))
        fooled = robust & is_adversarial(logits_fn, x, adv, y, eps=eps, norm=norm)
        x_adv = jnp.where(fooled.reshape(_batch_shape(x)), adv, x_adv)
        robust = robust & ~fooled
        masks[name] = robust
    max_pert = jnp.max(perturbation_norm(x_adv - x, norm))
    return AutoAttackResult(x_adv, robust, clean, masks, max_pert)


# --------------------------------------------------------------------------------------------
# Sanity checks (reference autoattack/checks.py)
# --------------------------------------------------------------------------------------------


def sanity_checks(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    *,
    result: AutoAttackResult | None = None,
    robust_accuracy: float | None = None,
    n_target_classes: int = 9,
    attacks: Sequence[str] = STANDARD_ATTACKS,
    batch_size: int = 250,
    n_repeats: int = 5,
    tol: float = 1e-5,
    random_tol: float = 1e-4,
    square_tol: float = 0.002,
) -> list[str]:
    """Warnings that an AutoAttack evaluation may be unreliable (empty list: none).

    Checks, as the reference: the outputs look like probabilities (in ``[0, 1]`` up to
    ``tol``, rows summing to 1) instead of logits; ``n_repeats`` forward passes disagree
    (a randomised model; the model is called eagerly, outside ``jit``); points where the DLR
    loss has an all-zero input gradient (among correctly classified points); too few
    classes for DLR / the number of targets.
    With ``result`` (of an evaluation of the same points): Square lowered the robust
    accuracy left by the gradient attacks by more than ``square_tol`` (a sign of gradient
    masking), and the clean accuracy is below the robust accuracy; ``robust_accuracy`` (e.g.
    of PGD) is compared with the clean accuracy as well.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    bs = max(1, min(batch_size, n))
    warnings: list[str] = []

    def forward():
        return np.concatenate(
            [np.asarray(logits_fn(jnp.asarray(x[i : i + bs])), np.float32) for i in range(0, n, bs)]
        )

    outputs = [forward() for _ in range(max(n_repeats, 1))]
    out = outputs[0]
    n_cls = out.shape[-1]
    if out.max() < 1 + tol and out.min() > -tol and np.all(np.abs(out.sum(-1) - 1) < tol):
        warnings.append(
            "the outputs look like a probability distribution (in [0, 1], rows "
            "summing to 1): attacks need the logits"
        )
    unit = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs]
    n_correct = [int(np.sum(o.argmax(-1) == y)) for o in outputs]
    max_diff = max(
        (
            float(np.max(np.linalg.norm(a - b, axis=-1)))
            for i, a in enumerate(unit)
            for b in unit[i + 1 :]
        ),
        default=0.0,
    )
    if len(set(n_correct)) > 1 or max_diff > random_tol:
        warnings.append(
            f"repeated forward passes disagree (max normalised difference "
            f"{max_diff:.2e}): the model looks randomised; the standard version "
            "assumes a deterministic model"
        )

    # The DLR loss is constant where y ranks third, so only the attacked (correctly
    # classified) points are checked, as in the reference (which checks inside APGD).
    grad_fn = _jit_model(
        jax.grad(lambda f, xb, yb: jnp.sum(dlr_loss(f(xb), yb)), argnums=1), logits_fn
    )
    correct = out.argmax(-1) == y
    zero = 0
    for i in range(0, n, bs):
        g = np.asarray(grad_fn(jnp.asarray(x[i : i + bs]), jnp.asarray(y[i : i + bs])))
        flat_zero = np.abs(g.reshape(g.shape[0], -1)).sum(-1) == 0
        zero += int(np.sum(flat_zero & correct[i : i + bs]))
    if zero:
        warnings.append(
            f"there are {zero} correctly classified points with zero gradient (of "
            "the DLR loss): gradient-based attacks may be unreliable"
        )

    if "apgd-t" in attacks or "apgd-dlr" in attacks:
        if n_cls <= 2:
            warnings.append(
                f"with only {n_cls} classes the DLR loss is not defined (falls back to the margin)"
            )
        elif n_cls == 3:
            warnings.append(
                f"with only {n_cls} classes the targeted DLR loss is not defined "
                "(falls back to a 3-class denominator)"
            )
    if ("apgd-t" in attacks or "fab-t" in attacks) and n_target_classes + 1 > n_cls:
        warnings.append(
            f"{n_target_classes} target classes requested but only {n_cls - 1} are possible"
        )

    clean_acc = float(np.mean(out.argmax(-1) == y)) if n else 0.0
    if result is not None:
        accs = {"clean": float(np.mean(np.asarray(result.clean)))}
        accs.update({k: float(np.mean(np.asarray(v))) for k, v in result.stages.items()})
        if "square" in accs and len(accs) > 2:
            before = min(v for k, v in accs.items() if k != "square")
            if accs["square"] < before - square_tol:
                warnings.append(
                    f"Square Attack lowered the robust accuracy by "
                    f"{before - accs['square']:.2%} after the gradient attacks: "
                    "a sign of gradient masking; consider adaptive attacks"
                )
        if clean_acc < result.robust_accuracy:
            warnings.append(
                f"clean accuracy {clean_acc:.2%} is below the robust accuracy "
                f"{result.robust_accuracy:.2%}"
            )
    if robust_accuracy is not None and clean_acc < robust_accuracy:
        warnings.append(
            f"clean accuracy {clean_acc:.2%} is below the given robust accuracy "
            f"{robust_accuracy:.2%}"
        )
    return warnings
