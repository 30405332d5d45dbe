"""Tests of ``samrobust.sam``: the SAM / ASAM optax transformation.

Every numerical check compares against the SAM algebra written out by hand in this file
(global norm, ascent step, momentum SGD with weight decay), in float64 numpy where the
gradient has a closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samrobust.sam import awp, layerwise_perturbation, perturbs, sam

RHO, LR, WD, MOM = 0.05, 0.1, 5e-4, 0.9


def _tx(rho=RHO, **kw):
    return optax.chain(sam(rho, **kw), optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM))


def _run_tx(tx, grad_fn, params, steps, *, jit=False):
    """Runs ``steps`` optimizer steps of ``tx``; returns the list of iterates."""

    def step(p, s):
        g = grad_fn(p)
        updates, s = tx.update(g, s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


# --- hand-written reference ----------------------------------------------------------


def _global_norm(tree):
    return np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in tree))


def _sam_e(g, w, rho):
    n = _global_norm(g)
    return [rho * gi / (n + 1e-12) for gi in g]


def _awp_v(g, w, gamma):
    """AWP: every array of >= 2 dimensions by gamma x its own norm; vectors unperturbed."""
    return [
        gamma * np.linalg.norm(wi) * gi / np.linalg.norm(gi) if wi.ndim > 1 else 0 * wi
        for gi, wi in zip(g, w, strict=True)
    ]


def _hand_sam_sgd(grad, params, steps, rho=RHO, lr=LR, wd=WD, mom=MOM, perturb=_sam_e):
    """Two-pass SAM (or another ``perturb(g, w, radius)``) then momentum SGD with
    decoupled-from-ascent weight decay.

    ``params`` is a list of float64 arrays, ``grad(list) -> list``. Returns the iterates.
    """
    w = [np.asarray(p, np.float64) for p in params]
    m = [np.zeros_like(p) for p in w]
    out = []
    for _ in range(steps):
        g = grad(w)
        e = perturb(g, w, rho)
        g_sam = grad([wi + ei for wi, ei in zip(w, e, strict=True)])
        d = [gs + wd * wi for gs, wi in zip(g_sam, w, strict=True)]  # add_decayed_weights
        m = [di + mom * mi for di, mi in zip(d, m, strict=True)]  # optax.trace (no nesterov)
        w = [wi - lr * mi for wi, mi in zip(w, m, strict=True)]
        out.append(w)
    return out


def _hand_sgd(grad, params, steps, lr=LR, wd=WD, mom=MOM):
    return _hand_sam_sgd(grad, params, steps, rho=0.0, lr=lr, wd=wd, mom=mom)


# --- quadratic loss ------------------------------------------------------------------

_rng = np.random.default_rng(0)
Q_H = {"a": _rng.uniform(0.5, 3.0, (3,)), "b": _rng.uniform(0.5, 3.0, (2, 2))}
Q_C = {"a": _rng.normal(size=(3,)), "b": _rng.normal(size=(2, 2))}
Q_W0 = {"a": _rng.normal(size=(3,)), "b": _rng.normal(size=(2, 2))}
KEYS = ("a", "b")  # dict leaf order (sorted)


def _quad_loss(p):
    return sum(
        0.5
        * jnp.sum(jnp.asarray(Q_H[k], jnp.float32) * (p[k] - jnp.asarray(Q_C[k], jnp.float32)) ** 2)
        for k in KEYS
    )


def _quad_grad_np(w):
    return [Q_H[k] * (wk - Q_C[k]) for k, wk in zip(KEYS, w, strict=True)]


def _as_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _leaves64(tree):
    return [np.asarray(tree[k], np.float64) for k in KEYS]


@pytest.mark.parametrize("jit", [False, True])
def test_sam_matches_hand_two_pass_quadratic(jit):
    steps = 6
    got = _run_tx(_tx(), jax.grad(_quad_loss), _as_jax(Q_W0), steps, jit=jit)
    want = _hand_sam_sgd(_quad_grad_np, _leaves64(Q_W0), steps)
    for g, w in zip(got, want, strict=True):
        for k, wk in zip(KEYS, w, strict=True):
            np.testing.assert_allclose(np.asarray(g[k]), wk, rtol=1e-6, atol=1e-6)
    # The perturbation must matter: plain momentum SGD ends elsewhere.
    plain = _hand_sgd(_quad_grad_np, _leaves64(Q_W0), steps)[-1]
    assert max(np.max(np.abs(a - b)) for a, b in zip(want[-1], plain, strict=True)) > 1e-3


def test_awp_matches_hand_layerwise_two_pass_quadratic():
    steps, gamma = 5, 0.2
    tx = optax.chain(awp(gamma), optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM))
    got = _run_tx(tx, jax.grad(_quad_loss), _as_jax(Q_W0), steps, jit=True)
    want = _hand_sam_sgd(_quad_grad_np, _leaves64(Q_W0), steps, rho=gamma, perturb=_awp_v)
    for g, w in zip(got, want, strict=True):
        for k, wk in zip(KEYS, w, strict=True):
            np.testing.assert_allclose(np.asarray(g[k]), wk, rtol=1e-6, atol=1e-6)
    # Only the matrix "b" is perturbed: SAM's global ball ends elsewhere.
    sam_end = _hand_sam_sgd(_quad_grad_np, _leaves64(Q_W0), steps, rho=gamma)[-1]
    assert max(np.max(np.abs(a - b)) for a, b in zip(want[-1], sam_end, strict=True)) > 1e-3


def test_awp_gamma_zero_is_the_plain_gradient_bitwise():
    params, loss = _mlp_problem()
    grad_fn = jax.grad(loss)
    got = _run_tx(optax.chain(awp(0.0), optax.sgd(LR)), grad_fn, params, 1)
    want = _run_tx(optax.sgd(LR), grad_fn, params, 1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layerwise_perturbation_of_a_zero_gradient_is_zero():
    params = {"k": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    v = layerwise_perturbation(jax.tree.map(jnp.zeros_like, params), params, 0.01)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(v))


def test_sam_rho_zero_is_plain_sgd():
    steps = 3
    got = _run_tx(_tx(0.0), jax.grad(_quad_loss), _as_jax(Q_W0), steps)
    want = _hand_sgd(_quad_grad_np, _leaves64(Q_W0), steps)
    for k, wk in zip(KEYS, want[-1], strict=True):
        np.testing.assert_allclose(np.asarray(got[-1][k]), wk, rtol=1e-6, atol=1e-6)


# --- small MLP -----------------------------------------------------------------------


def _mlp_problem():
    k = jax.random.split(jax.random.key(1), 6)
    params = {
        "w1": 0.5 * jax.random.normal(k[0], (5, 8)),
        "b1": 0.1 * jax.random.normal(k[1], (8,)),
        "w2": 0.5 * jax.random.normal(k[2], (8, 3)),
        "b2": jnp.zeros((3,)),
    }
    x = jax.random.normal(k[3], (8, 5))
    y = jax.random.randint(k[4], (8,), 0, 3)

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        logits = h @ p["w2"] + p["b2"]
        logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
        return -jnp.mean(logp[jnp.arange(8), y])

    return params, loss


def _hand_sam_sgd_tree(grad_fn, params, steps, rho=RHO):
    """Same algebra as :func:`_hand_sam_sgd`, on a jax pytree (gradients from jax.grad)."""
    w, m = params, jax.tree.map(jnp.zeros_like, params)
    out = []
    for _ in range(steps):
        g = grad_fn(w)
        n = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        e = jax.tree.map(lambda gi: rho * gi / (n + 1e-12), g)  # noqa: B023 (called at once)
        g_sam = grad_fn(jax.tree.map(jnp.add, w, e))
        m = jax.tree.map(lambda gs, wi, mi: gs + WD * wi + MOM * mi, g_sam, w, m)
        w = jax.tree.map(lambda wi, mi: wi - LR * mi, w, m)
        out.append(w)
    return out


def test_sam_matches_hand_two_pass_mlp():
    params, loss = _mlp_problem()
    grad_fn = jax.grad(loss)
    steps = 5
    rho = 0.5  # large enough that SAM and SGD iterates differ clearly
    got = _run_tx(_tx(rho), grad_fn, params, steps, jit=True)
    want = _hand_sam_sgd_tree(grad_fn, params, steps, rho=rho)
    for g, w in zip(got, want, strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g, w)
    plain = _hand_sam_sgd_tree(grad_fn, params, steps, rho=0.0)[-1]
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(want[-1]), jax.tree.leaves(plain), strict=True)
    )
    assert diff > 1e-4


# --- perturbation formulas ------------------------------------------------------------


def _perturbation_of(tx, grads, params):
    """With ``grad_fn = identity`` the SAM update is ``params + e``: returns ``e``."""
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=lambda p: p)
    return jax.tree.map(
        lambda u, p: np.asarray(u, np.float64) - np.asarray(p, np.float64), updates, params
    )


def test_sam_perturbation_formula():
    rho = 0.3
    grads = _as_jax(Q_C)
    params = _as_jax(Q_W0)
    e = _perturbation_of(sam(rho), grads, params)
    g = _leaves64(Q_C)
    n = _global_norm(g)
    for k, gk in zip(KEYS, g, strict=True):
        np.testing.assert_allclose(e[k], rho * gk / n, atol=1e-6)
    assert _global_norm([e[k] for k in KEYS]) == pytest.approx(rho, rel=1e-5)


def test_asam_perturbation_formula():
    rho = 0.3
    grads = _as_jax(Q_C)
    params = _as_jax(Q_W0)
    e = _perturbation_of(sam(rho, adaptive=True), grads, params)
    g, w = _leaves64(Q_C), _leaves64(Q_W0)
    n = _global_norm([np.abs(wk) * gk for wk, gk in zip(w, g, strict=True)])
    for k, gk, wk in zip(KEYS, g, w, strict=True):
        np.testing.assert_allclose(e[k], rho * wk**2 * gk / (n + 1e-12), atol=1e-6)
    # ASAM differs from SAM unless |w| is constant.
    e_sam = _perturbation_of(sam(rho), grads, params)
    assert max(np.max(np.abs(e[k] - e_sam[k])) for k in KEYS) > 1e-3


def test_asam_scale_invariance():
    """ASAM's perturbation of w*s (grad g/s) is s times that of w: it follows the scale."""
    rho, s = 0.2, 4.0
    params, grads = _as_jax(Q_W0), _as_jax(Q_C)
    e1 = _perturbation_of(sam(rho, adaptive=True), grads, params)
    e2 = _perturbation_of(
        sam(rho, adaptive=True),
        jax.tree.map(lambda g: g / s, grads),
        jax.tree.map(lambda p: p * s, params),
    )
    for k in KEYS:
        np.testing.assert_allclose(e2[k], s * e1[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_perturbation(adaptive):
    params = _as_jax(Q_W0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_fn = jax.grad(_quad_loss)
    tx = sam(0.1, adaptive=adaptive)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
        zeros, tx.init(params), params
    )
    want = grad_fn(params)
    for k in KEYS:
        assert np.all(np.isfinite(updates[k]))
        np.testing.assert_array_equal(updates[k], want[k])


def test_asam_zero_params_no_nan():
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    e = _perturbation_of(sam(0.1, adaptive=True), _as_jax(Q_C), params)
    for k in KEYS:
        np.testing.assert_array_equal(e[k], 0.0)


# --- rho schedule --------------------------------------------------------------------


def test_rho_schedule_follows_update_count():
    schedule = optax.linear_schedule(0.0, 0.4, transition_steps=4)
    tx = sam(schedule)
    params = _as_jax(Q_W0)
    grads = _as_jax(Q_C)
    g = _leaves64(Q_C)
    n = _global_norm(g)

    @jax.jit
    def step(state):
        return tx.update(grads, state, params, grad_fn=lambda p: p)

    state = tx.init(params)
    for t in range(6):
        updates, state = step(state)
        if t == 0:  # radius 0: SAM is off, the update is the incoming gradient (no 2nd pass)
            for k in KEYS:
                np.testing.assert_array_equal(updates[k], grads[k])
            continue
        e = [np.asarray(updates[k], np.float64) - np.asarray(params[k], np.float64) for k in KEYS]
        rho_t = min(0.1 * t, 0.4)
        assert _global_norm(e) == pytest.approx(rho_t, abs=1e-6)
        for ek, gk in zip(e, g, strict=True):
            np.testing.assert_allclose(ek, rho_t * gk / n, atol=1e-6)
    assert int(state.count) == 6


def test_rho_schedule_eager_records_argument():
    """An eager grad_fn sees its argument: it must be w + schedule(t) * g / ||g||."""
    schedule = lambda count: 0.05 * (count + 1)  # noqa: E731
    tx = sam(schedule)
    params = _as_jax(Q_W0)
    grads = _as_jax(Q_C)
    seen = []

    def grad_fn(p):
        seen.append(jax.tree.map(np.asarray, p))
        return p

    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grads, state, params, grad_fn=grad_fn)
    g = _leaves64(Q_C)
    n = _global_norm(g)
    assert len(seen) == 3
    for t, p in enumerate(seen):
        for k, gk in zip(KEYS, g, strict=True):
            np.testing.assert_allclose(
                p[k], np.asarray(params[k], np.float64) + 0.05 * (t + 1) * gk / n, atol=1e-6
            )


# --- transformations -----------------------------------------------------------------


def test_sam_under_vmap():
    """vmap over independent problems: each row's norm is its own (no mixing across rows)."""
    b = 4
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(b, 3))
    h = rng.uniform(0.5, 2.0, size=(b, 3))
    c = rng.normal(size=(b, 3))
    tx = _tx(0.3)

    def run(w, hh, cc):
        grad_fn = lambda p: hh * (p - cc)  # noqa: E731
        state = tx.init(w)
        for _ in range(3):
            updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
            w = optax.apply_updates(w, updates)
        return w

    got = jax.jit(jax.vmap(run))(*(jnp.asarray(a, jnp.float32) for a in (w0, h, c)))
    for i in range(b):
        grad = lambda w, i=i: [h[i] * (w[0] - c[i])]  # noqa: E731
        want = _hand_sam_sgd(grad, [w0[i]], 3, rho=0.3)[-1][0]
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-6, atol=1e-6)


# --- data parallel: 8 fake CPU devices -----------------------------------------------

N_DEV = 8


def _cpu_devices():
    devs = jax.devices("cpu")
    if len(devs) < N_DEV:
        pytest.skip(f"needs {N_DEV} CPU devices (XLA_FLAGS set in conftest), got {len(devs)}")
    return devs[:N_DEV]


def _dp_problem():
    rng = np.random.default_rng(7)
    w = {"a": rng.normal(size=(3,)), "b": rng.normal(size=(2, 2))}
    d = {"a": rng.uniform(0.5, 3.0, (N_DEV, 3)), "b": rng.uniform(0.5, 3.0, (N_DEV, 2, 2))}
    c = {"a": rng.normal(size=(N_DEV, 3)), "b": rng.normal(size=(N_DEV, 2, 2))}
    return w, d, c


def _dp_sam_updates(axis_name, rho, tx=None):
    devices = _cpu_devices()
    w, d, c = _dp_problem()
    tx = tx or sam(rho, axis_name=axis_name)

    def per_device(params, dd, cc):
        # loss_i(w) = 0.5 * sum(d_i (w - c_i)^2): different data on every device
        def grad_fn(p):
            return jax.tree.map(lambda pk, dk, ck: dk * (pk - ck), p, dd, cc)

        updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
        return updates, jax.lax.pmean(updates, "batch")

    f = jax.pmap(per_device, axis_name="batch", in_axes=(None, 0, 0), devices=devices)
    local, mean = f(_as_jax(w), _as_jax(d), _as_jax(c))
    return w, d, c, local, mean


def _np_grad(w, d, c, i, k):
    return d[k][i] * (w[k] - c[k][i])


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_data_parallel_sam_matches_numpy(axis_name):
    rho = 0.5
    w, d, c, local, mean = _dp_sam_updates(axis_name, rho)
    grads = [[_np_grad(w, d, c, i, k) for k in KEYS] for i in range(N_DEV)]
    if axis_name is None:  # every device perturbs with its own gradient
        es = [[rho * gk / _global_norm(g) for gk in g] for g in grads]
    else:  # one perturbation from the device-averaged gradient
        gbar = [np.mean([g[j] for g in grads], axis=0) for j in range(len(KEYS))]
        e = [rho * gk / _global_norm(gbar) for gk in gbar]
        es = [e] * N_DEV
    want = [
        [d[k][i] * (w[k] + es[i][j] - c[k][i]) for j, k in enumerate(KEYS)] for i in range(N_DEV)
    ]
    for i in range(N_DEV):
        for j, k in enumerate(KEYS):
            np.testing.assert_allclose(np.asarray(local[k][i]), want[i][j], rtol=1e-5, atol=1e-6)
    # The pmean'd SAM gradient (what the train step applies) is the device average.
    for j, k in enumerate(KEYS):
        avg = np.mean([want[i][j] for i in range(N_DEV)], axis=0)
        for i in range(N_DEV):
            np.testing.assert_allclose(np.asarray(mean[k][i]), avg, rtol=1e-5, atol=1e-6)


def test_data_parallel_awp_perturbs_with_the_device_averaged_gradient():
    gamma = 0.5
    w, d, c, local, _ = _dp_sam_updates(None, gamma, tx=awp(gamma, axis_name="batch"))
    grads = [[_np_grad(w, d, c, i, k) for k in KEYS] for i in range(N_DEV)]
    gbar = [np.mean([g[j] for g in grads], axis=0) for j in range(len(KEYS))]
    v = _awp_v(gbar, [w[k] for k in KEYS], gamma)
    for i in range(N_DEV):
        for j, k in enumerate(KEYS):
            want = d[k][i] * (w[k] + v[j] - c[k][i])
            np.testing.assert_allclose(np.asarray(local[k][i]), want, rtol=1e-5, atol=1e-6)


def test_data_parallel_local_and_synced_differ():
    *_, local_none, _ = _dp_sam_updates(None, 0.5)
    *_, local_sync, _ = _dp_sam_updates("batch", 0.5)
    diff = max(float(np.max(np.abs(local_none[k] - local_sync[k]))) for k in KEYS)
    assert diff > 1e-2


# --- errors --------------------------------------------------------------------------


def test_negative_rho_raises():
    with pytest.raises(ValueError, match="rho"):
        sam(-0.1)
    with pytest.raises(ValueError, match="gamma"):
        awp(-0.1)


def test_a_constant_schedule_equals_its_float_radius():
    steps = 3
    grad = jax.grad(_quad_loss)
    scheduled = _run_tx(_tx(optax.constant_schedule(RHO)), grad, _as_jax(Q_W0), steps)
    fixed = _run_tx(_tx(RHO), grad, _as_jax(Q_W0), steps)
    for a, b in zip(scheduled, fixed, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # ... and a radius does matter here: rho 0 ends elsewhere.
    plain = _run_tx(_tx(0.0), grad, _as_jax(Q_W0), steps)[-1]
    assert max(float(np.max(np.abs(plain[k] - fixed[-1][k]))) for k in KEYS) > 1e-4


def test_missing_grad_fn_raises():
    tx = sam(0.1)
    params = _as_jax(Q_W0)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params), grad_fn=lambda p: p)
    chained = _tx()
    with pytest.raises(ValueError, match="grad_fn"):
        chained.update(params, chained.init(params), params)


# --- per-group perturbations (m-sharpness within a device) ------------------------------


def _grouped_problem(groups: int):
    params, _ = _mlp_problem()
    k = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(k[0], (8, 5))
    y = jax.random.randint(k[1], (8,), 0, 3)

    def loss(p, xs, ys):
        logits = jnp.tanh(xs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
        return -jnp.mean(logp[jnp.arange(len(ys)), ys])

    xg, yg = x.reshape(groups, -1, 5), y.reshape(groups, -1)
    return params, loss, xg, yg


@pytest.mark.parametrize("adaptive", [False, True])
def test_grouped_sam_matches_an_explicit_loop_over_groups(adaptive):
    params, loss, xg, yg = _grouped_problem(groups=4)
    grad = jax.grad(loss)
    tx = sam(0.3, adaptive=adaptive, grouped=True)
    per_group = jax.vmap(grad, (None, 0, 0))(params, xg, yg)
    grad_fn = lambda pg: jax.vmap(grad)(pg, xg, yg)  # noqa: E731
    got, _ = tx.update(per_group, tx.init(params), params, grad_fn=grad_fn)

    expected = []
    for xs, ys in zip(xg, yg, strict=True):  # the two passes, group by group
        g = grad(params, xs, ys)
        t = jax.tree.map(jnp.abs, params) if adaptive else jax.tree.map(jnp.ones_like, params)
        n = _global_norm(jax.tree.leaves(jax.tree.map(jnp.multiply, t, g)))
        e = jax.tree.map(lambda ti, gi: 0.3 * ti * ti * gi / (n + 1e-12), t, g)  # noqa: B023
        expected.append(grad(jax.tree.map(jnp.add, params, e), xs, ys))
    want = jax.tree.map(lambda *gs: sum(gs) / len(gs), *expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    # Not the single perturbation of the whole batch.
    whole, _ = sam(0.3, adaptive=adaptive).update(
        grad(params, xg.reshape(8, 5), yg.reshape(8)),
        sam(0.3).init(params),
        params,
        grad_fn=lambda p: grad(p, xg.reshape(8, 5), yg.reshape(8)),
    )
    assert (
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole), strict=True)
        )
        > 1e-4
    )


def test_one_group_equals_plain_sam():
    params, loss, xg, yg = _grouped_problem(groups=1)
    grad = jax.grad(loss)
    grouped, _ = sam(0.3, grouped=True).update(
        jax.vmap(grad, (None, 0, 0))(params, xg, yg),
        sam(0.3).init(params),
        params,
        grad_fn=lambda pg: jax.vmap(grad)(pg, xg, yg),
    )
    plain, _ = sam(0.3).update(
        grad(params, xg[0], yg[0]),
        sam(0.3).init(params),
        params,
        grad_fn=lambda p: grad(p, xg[0], yg[0]),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), grouped, plain
    )


def test_grouped_sam_refuses_a_synchronising_axis():
    with pytest.raises(ValueError, match="grouped perturbations are per device"):
        sam(0.1, grouped=True, axis_name="batch")


# --- cheaper SAM: a radius that is 0 early, randomised SAM ------------------------------


def _count_passes(tx, steps: int) -> tuple[list, list[bool]]:
    """Runs ``tx`` (jitted) on the MLP problem; per step, whether the SAM pass ran (seen as
    a different update from the plain gradient's)."""
    params, loss = _mlp_problem()
    grad = jax.grad(loss)
    step = jax.jit(lambda p, s: tx.update(grad(p), s, p, grad_fn=grad))
    state, used = tx.init(params), []
    for _ in range(steps):
        updates, state = step(params, state)
        used.append(
            max(
                float(jnp.max(jnp.abs(u - g)))
                for u, g in zip(
                    jax.tree.leaves(updates), jax.tree.leaves(grad(params)), strict=True
                )
            )
            > 1e-6
        )
    return updates, used


def test_a_radius_schedule_that_is_zero_early_skips_sam_until_it_starts():
    tx = sam(lambda n: jnp.where(n >= 3, 0.5, 0.0))
    updates, used = _count_passes(tx, 6)
    assert used == [False, False, False, True, True, True]
    params, loss = _mlp_problem()
    want, _ = sam(0.5).update(
        jax.grad(loss)(params), sam(0.5).init(params), params, grad_fn=jax.grad(loss)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates, want)
    # The second pass sits under lax.cond: the jitted update has a conditional.
    jaxpr = jax.make_jaxpr(
        lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p, grad_fn=jax.grad(loss))
    )
    assert "cond" in str(jaxpr(params))


def test_perturbs_predicts_the_pass_on_the_host_and_perturb_forces_it_without_a_cond():
    """What the train loop does for cheaper SAM: ``perturbs(count)`` on the host, then a
    program compiled with ``perturb=True`` or ``False`` (no ``lax.cond``)."""
    tx = sam(0.5, probability=0.5, seed=3)
    _, used = _count_passes(tx, 40)
    assert used == [bool(perturbs(n, 0.5, 0.5, 3)) for n in range(40)]
    late = lambda n: jnp.where(n >= 3, 0.5, 0.0)  # noqa: E731
    assert [bool(perturbs(n, late)) for n in range(6)] == [False] * 3 + [True] * 3
    params, loss = _mlp_problem()
    grad = jax.grad(loss)
    sam_update = sam(0.5).update(grad(params), sam(0.5).init(params), params, grad_fn=grad)[0]
    for forced, want in ((False, grad(params)), (True, sam_update)):
        update = lambda p, forced=forced: tx.update(  # noqa: E731
            grad(p), tx.init(p), p, grad_fn=grad, perturb=forced
        )[0]
        assert "cond" not in str(jax.make_jaxpr(update)(params))
        got = jax.jit(update)(params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("probability,lo,hi", [(1.0, 40, 40), (0.5, 12, 28), (0.0, 0, 0)])
def test_randomised_sam_uses_sam_on_a_fraction_of_the_steps(probability, lo, hi):
    if probability == 0.0:
        with pytest.raises(ValueError, match="probability"):
            sam(0.5, probability=-0.1)
    _, used = _count_passes(sam(0.5, probability=probability, seed=3), 40)
    assert lo <= sum(used) <= hi
    _, again = _count_passes(sam(0.5, probability=probability, seed=3), 40)
    assert used == again  # the draws follow the seed and the update count
