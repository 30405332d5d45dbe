"""APGD (Croce & Hein, ICML 2020, arXiv 2003.01690, Alg. 1): the reference's
``autoattack/autopgd_base.py``.

Momentum 0.75, initial step ``2 eps``, a random start on the sphere of the ball, and step
halving with a restart from the best point at the checkpoints of :func:`checkpoints`: the
step is halved where the loss increased in at most ``rho`` of the steps since the last
checkpoint, or where it was not halved at the previous checkpoint and the best loss has
not improved. The count of increasing steps compares consecutive iterates from ``x^(0)``
on, as in the paper (the reference's first comparison reads an unset row of its buffer).

:func:`stage` gives APGD-CE and APGD-T as cascade stages; :func:`apgd` and
:func:`apgd_targeted` are the stand-alone, jittable attacks. Non-fooled points get their
best point (highest loss; across runs the largest CW margin) instead of the clean input,
so progress can be measured; fooled points the last fooling iterate of the first
successful run, as in the reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.attacks import (
    LogitsFn,
    ascent_direction,
    ce_targeted_loss,
    check_norm,
    cross_entropy,
    cw_margin,
    dlr_loss,
    dlr_targeted_loss,
    example_keys,
    project,
    sphere_start,
)
from samrobust.autoattack.base import (
    Stage,
    State,
    batch_shape,
    bwhere,
    n_targets,
    run,
    target_classes,
)

LOSSES = ("ce", "dlr")


def checkpoints(n_iter: int) -> list[int]:
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


def _per_example_loss(loss: str, targeted: bool):
    if targeted:
        return {"ce": ce_targeted_loss, "dlr": dlr_targeted_loss}[loss]
    return {"ce": lambda z, y, t: cross_entropy(z, y), "dlr": lambda z, y, t: dlr_loss(z, y)}[loss]


def _value_and_grad(logits_fn: LogitsFn, loss_of, y, target, eot_iter: int = 1, key=None):
    """``x -> ((loss, (per-example loss, logits)), grad)``. With ``eot_iter > 1``
    (``logits_fn`` a :class:`~samrobust.autoattack.base.RandomizedModel`), the gradient is
    the mean over ``eot_iter`` draws of the model under ``key``'s folds, and the losses and
    logits the last draw's, as in the reference's expectation over transformation."""

    def objective(xa, model):
        z = model(xa)
        li = loss_of(z, y, target)
        return jnp.sum(li), (li, z)

    vg = jax.value_and_grad(objective, has_aux=True)
    if eot_iter == 1:
        return lambda xa: vg(xa, logits_fn)

    def eot(xa):
        def body(e, grad_sum):
            _, g = vg(xa, logits_fn.draw(jax.random.fold_in(key, e)))
            return grad_sum + g

        grad_sum = jax.lax.fori_loop(0, eot_iter - 1, body, jnp.zeros_like(xa))
        out, g = vg(xa, logits_fn.draw(jax.random.fold_in(key, eot_iter - 1)))
        return out, (grad_sum + g) / eot_iter

    return eot


def _model_key(s: State, i: jax.Array) -> jax.Array | None:
    """The batch's key for the model's draws at iteration ``i`` (-1: the start); None for a
    deterministic model (no ``model_key`` in the state)."""
    if "model_key" not in s:
        return None
    return jax.random.fold_in(jax.random.wrap_key_data(s["model_key"][0]), i)


def _init(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    keys: jax.Array,
    j: jax.Array,
    *,
    eps: float,
    norm: str,
    loss: str,
    targeted: bool,
    n_restarts: int,
    eot_iter: int,
) -> State:
    """The state at ``x^(0)``: a random point on the sphere of the ball, clipped to [0, 1]."""
    x = jax.lax.stop_gradient(x)
    target = target_classes(logits_fn(x), j // n_restarts) if targeted else y
    x_adv = jnp.clip(x + eps * sphere_start(keys, x, norm), 0.0, 1.0)
    eot: State = {}  # the model's keys, for an EOT stage only
    if eot_iter > 1:
        model_key = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        if jnp.issubdtype(model_key.dtype, jax.dtypes.prng_key):
            model_key = jax.random.key_data(model_key)
        eot = {"model_key": model_key}
    loss_of = _per_example_loss(loss, targeted)
    key0 = _model_key(eot, jnp.int32(-1))
    (_, (loss0, z0)), grad = _value_and_grad(logits_fn, loss_of, y, target, eot_iter, key0)(x_adv)
    return dict(
        **eot,
        x=x,
        y=y,
        target=target,
        x_adv=x_adv,
        x_old=x_adv,
        grad=grad,
        x_best=x_adv,
        grad_best=grad,
        loss_best=loss0,
        adv=x_adv,
        fooled=jnp.argmax(z0, axis=-1) != y,
        step=jnp.full(batch_shape(x), 2.0 * eps, jnp.float32),
        n_up=jnp.zeros(y.shape, jnp.float32),
        loss_prev=loss0,
        reduced_last=jnp.ones(y.shape, bool),
        loss_best_last=loss0,
    )


def _step(
    logits_fn: LogitsFn,
    s: State,
    i: jax.Array,
    *,
    eps: float,
    norm: str,
    n_iter: int,
    loss: str,
    targeted: bool,
    rho: float,
    eot_iter: int,
) -> State:
    """One APGD iteration, then the step-size check if ``i`` ends a checkpoint interval."""
    x, y = s["x"], s["y"]
    ckpt = np.zeros(n_iter, bool)
    ckpt_len = np.ones(n_iter, np.float32)
    previous = 0
    for c in checkpoints(n_iter):
        ckpt[c - 1], ckpt_len[c - 1] = True, c - previous
        previous = c
    at_ckpt, interval = jnp.asarray(ckpt)[i], jnp.asarray(ckpt_len)[i]

    def to_ball(z):
        return x + project(z - x, x, eps, norm)

    momentum = s["x_adv"] - s["x_old"]
    a = jnp.where(i > 0, 0.75, 1.0)
    z = to_ball(s["x_adv"] + s["step"] * ascent_direction(s["grad"], norm))
    x_new = to_ball(s["x_adv"] + (z - s["x_adv"]) * a + momentum * (1.0 - a))
    loss_of = _per_example_loss(loss, targeted)
    vg = _value_and_grad(logits_fn, loss_of, y, s["target"], eot_iter, _model_key(s, i))
    (_, (li, logits)), grad = vg(x_new)
    miss = jnp.argmax(logits, axis=-1) != y
    improved = li > s["loss_best"]
    loss_best = jnp.where(improved, li, s["loss_best"])
    x_best = bwhere(improved, x_new, s["x_best"])
    grad_best = bwhere(improved, grad, s["grad_best"])
    n_up = s["n_up"] + (li > s["loss_prev"]).astype(jnp.float32)
    # Checkpoint: halve the step and go back to the best point where progress stalled.
    oscillating = n_up <= rho * interval
    stalled = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
    reduce = at_ckpt & (oscillating | stalled)
    return dict(
        s,
        x_old=s["x_adv"],
        x_adv=bwhere(reduce, x_best, x_new),
        grad=bwhere(reduce, grad_best, grad),
        x_best=x_best,
        grad_best=grad_best,
        loss_best=loss_best,
        adv=bwhere(miss, x_new, s["adv"]),
        fooled=s["fooled"] | miss,
        step=bwhere(reduce, s["step"] / 2.0, s["step"]),
        n_up=jnp.where(at_ckpt, 0.0, n_up),
        loss_prev=li,
        reduced_last=jnp.where(at_ckpt, reduce, s["reduced_last"]),
        loss_best_last=jnp.where(at_ckpt, loss_best, s["loss_best_last"]),
    )


def _check(eps: float, norm: str, n_iter: int, loss: str, n_runs: int) -> None:
    check_norm(norm)
    if loss not in LOSSES:
        raise ValueError(f"Unknown APGD loss {loss!r}; choose one of {LOSSES}")
    if eps < 0 or n_iter < 1 or n_runs < 1:
        raise ValueError(
            f"apgd needs eps >= 0, n_iter >= 1, n_restarts >= 1; got {eps}, {n_iter}, {n_runs}"
        )


def stage(
    *,
    eps: float,
    norm: str,
    n_iter: int = 100,
    loss: str = "ce",
    n_target_classes: int = 0,
    n_restarts: int = 1,
    rho: float = 0.75,
    eot_iter: int = 1,
) -> Stage:
    """APGD as a cascade stage: untargeted (``n_target_classes=0``, APGD-CE with the
    standard ``loss="ce"``) or targeted against each of the ``n_target_classes`` most
    likely wrong classes in turn (APGD-T with ``loss="dlr"``), ``n_restarts`` runs each.
    ``eot_iter > 1``: gradients averaged over that many draws of a
    :class:`~samrobust.autoattack.base.RandomizedModel` (AutoAttack *rand*)."""
    _check(eps, norm, n_iter, loss, n_restarts)
    if eot_iter < 1:
        raise ValueError(f"eot_iter must be >= 1; got {eot_iter}")
    targeted = n_target_classes > 0
    kw = dict(eps=eps, norm=norm, loss=loss, targeted=targeted, eot_iter=eot_iter)
    return Stage(
        name="apgd-t" if targeted else f"apgd-{loss}",
        n_runs=n_restarts * max(n_target_classes, 1),
        n_steps=n_iter,
        init=functools.partial(_init, n_restarts=n_restarts, **kw),
        step=functools.partial(_step, n_iter=n_iter, rho=rho, **kw),
        segment=max(n_iter // 10, 1),
    )


def _best_of_runs(
    st: Stage, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, unroll: int
) -> jax.Array:
    """Runs every run of ``st``, each only while some point is not yet fooled, and keeps
    per example the first fooling point, else the best point with the largest CW margin.
    Clean-misclassified points keep ``x``."""
    x = jax.lax.stop_gradient(x)
    fooled = jnp.argmax(logits_fn(x), axis=-1) != y
    score = jnp.full(y.shape, -jnp.inf, jnp.float32)
    ids = jnp.arange(x.shape[0])

    def attack(j, carry):
        adv, fooled, score = carry
        s = run(st, logits_fn, x, y, example_keys(jax.random.fold_in(key, j), ids), j, unroll)
        cand = bwhere(s["fooled"], s["adv"], s["x_best"])
        cand_score = cw_margin(logits_fn(cand), y)
        take = ~fooled & (s["fooled"] | (cand_score > score))
        adv = bwhere(take, cand, adv)
        return adv, fooled | (take & s["fooled"]), jnp.where(take, cand_score, score)

    def body(j, carry):
        return jax.lax.cond(jnp.all(carry[1]), lambda c: c, functools.partial(attack, j), carry)

    adv, _, _ = jax.lax.fori_loop(0, st.n_runs, body, (x, fooled, score))
    return jax.lax.stop_gradient(adv)


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
    n_restarts: int = 1,
    rho: float = 0.75,
    unroll: int = 1,
) -> jax.Array:
    """Untargeted APGD on ``loss`` (``"ce"`` or ``"dlr"``): ``x_adv`` in the ``eps`` ball and
    ``[0, 1]`` (see the module docstring). Jittable with the keywords static."""
    st = stage(eps=eps, norm=norm, n_iter=n_iter, loss=loss, n_restarts=n_restarts, rho=rho)
    return _best_of_runs(st, logits_fn, x, y, key, unroll)


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
    unroll: int = 1,
) -> jax.Array:
    """APGD-T: targeted APGD (targeted DLR by default) against each of the
    ``min(n_target_classes, num_classes - 1)`` most likely wrong classes at ``x`` in turn,
    ``n_restarts`` runs each; a run attacks only while some point is not yet fooled."""
    st = stage(
        eps=eps,
        norm=norm,
        n_iter=n_iter,
        loss=loss,
        n_target_classes=n_targets(logits_fn, x, n_target_classes, "apgd_targeted"),
        n_restarts=n_restarts,
        rho=rho,
    )
    return _best_of_runs(st, logits_fn, x, y, key, unroll)
