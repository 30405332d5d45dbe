"""Tests of samrobust.autoattack on tiny linear and MLP models (analytic optima where they exist).

Attack budgets are reduced (n_iter 10-30, a few hundred Square queries) and ``unroll=1``
keeps compilation short; most of the runtime is XLA compilation.
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from samrobust import autoattack as aa
from samrobust.attacks import cw_margin, input_loss, pgd

H = 4  # images are H x H x 1
D = H * H


def linear_model(w: np.ndarray, b: np.ndarray | None = None):
    """logits = flatten(x) @ w + b."""
    w = jnp.asarray(w, jnp.float32)
    b = jnp.zeros(w.shape[1]) if b is None else jnp.asarray(b, jnp.float32)
    return lambda x: x.reshape(x.shape[0], -1) @ w + b


def analytic_distance(w: np.ndarray, x: np.ndarray, y: np.ndarray, norm: str) -> np.ndarray:
    """Minimal ||delta|| flipping a linear model (box inactive): min_t m_t / ||w_y - w_t||_*."""
    z = x.reshape(len(x), -1) @ w
    out = np.full(len(x), np.inf)
    for i in range(len(x)):
        for t in range(w.shape[1]):
            if t != y[i]:
                dw = w[:, y[i]] - w[:, t]
                dual = np.abs(dw).sum() if norm == "linf" else np.linalg.norm(dw)
                out[i] = min(out[i], (z[i, y[i]] - z[i, t]) / dual)
    return out


def assert_valid(x, x_adv, eps, norm):
    x, x_adv = np.asarray(x), np.asarray(x_adv)
    assert np.all(x_adv >= 0.0) and np.all(x_adv <= 1.0)
    assert np.max(np.asarray(aa.perturbation_norm(jnp.asarray(x_adv - x), norm))) <= eps + 1e-6


@pytest.fixture(scope="module")
def linear5():
    """A 5-class linear model on 4x4x1 inputs in [0.3, 0.7] (the box is never active)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D, 5)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(16, H, H, 1)).astype(np.float32)
    y = np.argmax(x.reshape(16, -1) @ w, axis=1).astype(np.int32)
    return w, x, y


@pytest.fixture(scope="module")
def mlp():
    """A 16-32-4 ReLU MLP trained on overlapping Gaussian blobs; test points and labels."""
    rng = np.random.default_rng(0)
    means = rng.uniform(0.25, 0.75, (4, D))

    def sample(n, seed):
        r = np.random.default_rng(seed)
        y = r.integers(0, 4, n)
        x = np.clip(means[y] + 0.25 * r.normal(size=(n, D)), 0.0, 1.0)
        return x.reshape(n, H, H, 1).astype(np.float32), y.astype(np.int32)

    x_train, y_train = sample(512, 1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "w1": jax.random.normal(k1, (D, 32)) / 4,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 4)) / 6,
        "b2": jnp.zeros(4),
    }

    def apply(p, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    opt = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(_, carry):
            p, s = carry
            g = jax.grad(
                lambda q: optax.softmax_cross_entropy_with_integer_labels(
                    apply(q, x_train), y_train
                ).mean()
            )(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, 300, step, (p, opt.init(p)))[0]

    params = train(params)
    x, y = sample(48, 2)
    return functools.partial(apply, params), x, y


# ------------------------------------------------------------------------------- losses


def test_dlr_losses_match_their_formulas():
    z = jnp.array([[3.0, 1.0, 2.0, -1.0, 0.5], [0.0, 4.0, 1.0, 2.0, 3.0]])
    y = jnp.array([0, 2])
    # sorted: row 0: 3, 2, 1, 0.5, -1 ; row 1: 4, 3, 2, 1, 0
    np.testing.assert_allclose(
        aa.dlr_loss(z, y), [-(3 - 2) / (3 - 1), -(1 - 4) / (4 - 2)], rtol=1e-6
    )
    t = jnp.array([2, 4])
    np.testing.assert_allclose(
        aa.dlr_targeted_loss(z, y, t),
        [-(3 - 2) / (3 - (1 + 0.5) / 2), -(1 - 3) / (4 - (2 + 1) / 2)],
        rtol=1e-6,
    )
    # Fewer classes: 2 -> the plain margin; targeted with 3 -> z_pi1 - z_pi3.
    np.testing.assert_allclose(aa.dlr_loss(z[:, :2], jnp.array([0, 0])), [-2.0, 4.0])
    np.testing.assert_allclose(
        aa.dlr_targeted_loss(z[:, :3], jnp.array([0, 0]), jnp.array([2, 1])),
        [-(3 - 2) / (3 - 1), -(0 - 4) / (4 - 0)],
        rtol=1e-6,
    )


def test_apgd_checkpoints_follow_the_paper_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    p, expected = [0.0, 0.22], []
    while p[-1] <= 1.0:
        expected.append(round(100 * p[-1]))
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert aa.apgd_checkpoints(100) == expected == [22, 41, 57, 70, 80, 87, 93, 99]


def test_square_p_schedule():
    p = [float(aa.square_p_schedule(i, 0.8)) for i in (0, 10, 11, 50, 51, 8000, 8001)]
    assert p == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512])


# ------------------------------------------------------------------------ FAB projection


def _bisect_projection(t, w, c, norm):
    """Reference solution by bisection on the radius (numpy, float64)."""
    s = np.sign(c) * np.sign(w)
    room = np.where(s > 0, 1 - t, t)

    def move(r):
        return np.minimum(r, room) if norm == "linf" else np.minimum(r * np.abs(w), room)

    lo, hi = 0.0, 1e6
    if np.sum(np.abs(w) * move(hi)) < abs(c):
        return s * move(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sum(np.abs(w) * move(mid)) < abs(c) else (lo, mid)
    return s * move(hi)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 3.0))
def test_projection_is_the_box_constrained_minimum(norm, seed, scale):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, (4, 12))
    w = rng.normal(size=(4, 12)) * (rng.uniform(size=(4, 12)) > 0.2)  # some zero weights
    c = rng.normal(size=4) * scale
    d = np.asarray(
        _jit_projection(norm)(
            jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32)
        ),
        np.float64,
    )
    for i in range(4):
        ref = _bisect_projection(t[i], w[i], c[i], norm)
        # float32 against float64: tau = (|c| - sum of saturated terms) / slope cancels.
        np.testing.assert_allclose(d[i], ref, atol=1e-3)
        assert np.all(t[i] + d[i] >= -1e-6) and np.all(t[i] + d[i] <= 1 + 1e-6)
        reach = np.sum(np.abs(w[i]) * np.abs(ref))
        if reach >= abs(c[i]) * (1 - 1e-9):  # the box reaches the hyperplane
            assert abs(w[i] @ d[i] - c[i]) <= 1e-4 * (1 + abs(c[i]))
        norm_of = np.max if norm == "linf" else np.linalg.norm
        assert norm_of(np.abs(d[i])) <= norm_of(np.abs(ref)) * (1 + 1e-3) + 1e-6


@functools.cache
def _jit_projection(norm):
    return jax.jit(functools.partial(aa.project_hyperplane_box, norm=norm))


@pytest.mark.parametrize("s", [1, 3, 5, 6])
def test_square_window_pattern_matches_the_reference_construction(s):
    """The closed form drawn in a window at (1, 2) equals the loop-built eta(s)."""
    pat = aa._eta_window(
        8, 9, jnp.array([1, 1]), jnp.array([2, 2]), jnp.asarray(s), jnp.array([False, True])
    )
    eta = aa.square_eta(s)
    np.testing.assert_allclose(pat[0, 1 : 1 + s, 2 : 2 + s], eta, atol=1e-6)
    np.testing.assert_allclose(pat[1, 1 : 1 + s, 2 : 2 + s], eta.T, atol=1e-6)
    assert float(jnp.sum(jnp.abs(pat))) == pytest.approx(2 * np.abs(eta).sum(), rel=1e-5)
    assert np.linalg.norm(eta) == pytest.approx(1.0)
    if s >= 2:  # two stacked halves of opposite signs
        assert np.all(eta[: s // 2] >= 0) and np.all(eta[s // 2 :] <= 0)


# ----------------------------------------------------------------- linear-model optima


@pytest.mark.parametrize("norm,eps", [("linf", 0.04), ("l2", 0.15)])
def test_apgd_finds_the_analytic_worst_case_of_a_binary_linear_model(norm, eps):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(D, 2)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(8, H, H, 1)).astype(np.float32)
    b = np.zeros(2, np.float32)
    z = x.reshape(8, -1) @ w
    b[1] = -np.median(z[:, 1] - z[:, 0])  # about half of each class
    f = linear_model(w, b)
    y = np.argmax(np.asarray(f(jnp.asarray(x))), axis=1).astype(np.int32)
    dw = w[:, y].T - w[:, 1 - y].T  # [8, D]: gradient of the margin z_y - z_other
    if norm == "linf":
        x_star = x.reshape(8, -1) - eps * np.sign(dw)
    else:
        x_star = x.reshape(8, -1) - eps * dw / np.linalg.norm(dw, axis=1, keepdims=True)
    margin_star = -np.asarray(cw_margin(f(jnp.asarray(x_star)), jnp.asarray(y)))
    robust = margin_star > 0  # the worst case does not flip these

    unroll = None if norm == "linf" else 1  # cover the default (full unroll on CPU) once
    n_iter = 10 if norm == "linf" else 20  # Linf reaches the corner in one step
    attack = jax.jit(
        lambda x, y, k: aa.apgd(f, x, y, k, eps=eps, norm=norm, n_iter=n_iter, unroll=unroll)
    )
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert_valid(x, x_adv, eps, norm)
    margin = -np.asarray(cw_margin(f(x_adv), jnp.asarray(y)))
    assert 0 < robust.sum() < 8
    # Robust points: APGD's best point is the analytic worst case.
    np.testing.assert_allclose(margin[robust], margin_star[robust], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_adv).reshape(8, -1)[robust], x_star[robust], atol=2e-3)
    # The others are fooled.
    assert np.all(margin[~robust] < 0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_adversarial_distance_of_a_linear_model(linear5, norm):
    w, x, y = linear5
    f = linear_model(w)
    attack = jax.jit(
        lambda x, y, k: aa.fab_targeted(f, x, y, k, eps=None, norm=norm, n_iter=30, unroll=1)
    )
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert np.all(np.argmax(np.asarray(f(x_adv)), axis=1) != y)
    dist = np.asarray(aa.perturbation_norm(x_adv - x, norm))
    # eta = 1.05 overshoots, then beta = 0.9 backtracking converges to the boundary.
    np.testing.assert_allclose(dist, analytic_distance(w, x, y, norm), rtol=0.01)
    # With eps, FAB-T keeps only adversarials within eps.
    eps = float(np.median(dist))
    x_eps = jax.jit(
        lambda x, y, k: aa.fab_targeted(f, x, y, k, eps=eps, norm=norm, n_iter=30, unroll=1)
    )(x, y, jax.random.PRNGKey(0))
    fooled = np.argmax(np.asarray(f(x_eps)), axis=1) != y
    np.testing.assert_array_equal(fooled, dist <= eps)
    assert_valid(x, x_eps, eps, norm)


def test_apgd_ce_and_apgd_t_succeed_at_least_as_often_as_pgd(linear5):
    w, x, y = linear5
    f = linear_model(w)
    eps = float(np.median(analytic_distance(w, x, y, "linf")))
    key = jax.random.PRNGKey(0)
    args = (jnp.asarray(x), jnp.asarray(y), key)
    x_pgd = jax.jit(
        lambda x, y, k: pgd(input_loss(f), x, y, k, eps=eps, step_size=eps / 4, steps=10, unroll=1)
    )(*args)
    x_ce = jax.jit(lambda x, y, k: aa.apgd(f, x, y, k, eps=eps, n_iter=20, unroll=1))(*args)
    x_t = jax.jit(
        lambda x, y, k: aa.apgd_targeted(
            f, x, y, k, eps=eps, n_iter=20, n_target_classes=4, unroll=1
        )
    )(*args)

    def success(xa):
        assert_valid(x, xa, eps, "linf")
        return np.mean(np.argmax(np.asarray(f(xa)), axis=1) != y)

    s_pgd = success(x_pgd)
    assert s_pgd > 0
    assert success(x_ce) >= s_pgd
    assert success(x_t) >= s_pgd
    # The optimum flips exactly the points with analytic distance <= eps.
    assert success(x_t) <= np.mean(analytic_distance(w, x, y, "linf") <= eps + 1e-6)


# ----------------------------------------------------------------------- the cascade


def test_cascade_counts_a_point_robust_only_if_every_attack_failed():
    """Fake stages: each 'fools' a fixed set; invalid points must not count."""
    # class = argmax(x_0, x_1); a pytree model, passed to the jitted stages as an argument
    f = jax.tree_util.Partial(
        lambda w, xb: xb.reshape(xb.shape[0], -1) @ w, jnp.eye(D, 2, dtype=jnp.float32)
    )
    n = 10
    x = np.full((n, H, H, 1), 0.5, np.float32)
    x[:, 0, 0, 0] = 0.6  # class 0 with margin 0.1
    y = np.zeros(n, np.int32)
    x[9, 0, 1, 0] = 0.7  # point 9 is misclassified from the start

    def flipper(points, delta):
        """Flips ``points`` (indices into the full set) by moving x_1 up by ``delta``."""
        sel = np.zeros((n, 1, 1, 1), np.float32)
        sel[list(points)] = 1.0

        def stage(model, xb, yb, key):
            # batches hold points in order of their index among those still robust
            idx = jnp.asarray(np.flatnonzero(sel[:, 0, 0, 0]))
            ids = jnp.round(xb[:, 3, 3, 0] * 1000).astype(jnp.int32) - 100
            hit = jnp.isin(ids, idx)
            return xb.at[:, 0, 1, 0].add(jnp.where(hit, delta, 0.0))

        return stage

    for i in range(n):
        x[i, 3, 3, 0] = (100 + i) / 1000  # tag each point with its index
    eps = 0.15
    stages = [
        ("a", flipper({0, 1}, 0.12)),  # fools 0 and 1 within eps
        ("b", flipper({1, 2, 3}, 0.3)),  # out of the ball: fools nothing
        ("c", flipper({3, 4}, 0.12)),
        ("d", flipper({4, 9}, 0.12)),  # 9 was never robust
    ]
    res = aa.run_cascade(f, x, y, jax.random.PRNGKey(0), stages, eps=eps, norm="linf", batch_size=4)
    np.testing.assert_array_equal(res.clean, np.arange(n) != 9)
    expected = {
        "a": {2, 3, 4, 5, 6, 7, 8},
        "b": {2, 3, 4, 5, 6, 7, 8},
        "c": {2, 5, 6, 7, 8},
        "d": {2, 5, 6, 7, 8},
    }
    for name, robust_set in expected.items():
        assert set(np.flatnonzero(res.stages[name])) == robust_set, name
    np.testing.assert_array_equal(res.robust, res.stages["d"])
    np.testing.assert_array_equal(res.x_adv[res.robust], x[res.robust])
    np.testing.assert_array_equal(res.x_adv[9], x[9])
    assert res.max_perturbation == pytest.approx(0.12, abs=1e-6)
    assert_valid(x, res.x_adv, eps, "linf")


def _check_cascade(res, f, x, y, eps, norm):
    x_adv, robust = np.asarray(res.x_adv), np.asarray(res.robust)
    names = list(res.stages)
    assert names == list(aa.STANDARD_ATTACKS)
    prev = np.asarray(res.clean)
    for name in names:  # robust sets only shrink
        cur = np.asarray(res.stages[name])
        assert np.all(cur <= prev), name
        prev = cur
    np.testing.assert_array_equal(robust, prev)
    pred = np.argmax(np.asarray(f(jnp.asarray(x_adv))), axis=1)
    assert np.all(pred[~robust] != y[~robust])  # every non-robust point is fooled (or was)
    np.testing.assert_array_equal(x_adv[robust], x[robust])
    assert_valid(x, x_adv, eps, norm)
    assert float(res.max_perturbation) <= eps + 1e-6


def test_autoattack_on_a_trained_mlp_orders_clean_pgd_autoattack(mlp):
    f, x, y = mlp
    eps = 0.06
    key = jax.random.PRNGKey(0)
    clean = np.mean(np.argmax(np.asarray(f(x)), axis=1) == y)
    x_pgd = jax.jit(
        lambda x, y, k: pgd(input_loss(f), x, y, k, eps=eps, step_size=eps / 4, steps=10, unroll=1)
    )(x, y, key)
    pgd_acc = np.mean(np.argmax(np.asarray(f(x_pgd)), axis=1) == y)
    res = aa.autoattack(
        f,
        x,
        y,
        key,
        eps=eps,
        norm="linf",
        num_classes=4,
        n_iter=20,
        n_target_classes=3,
        n_queries=200,
        batch_size=16,
        unroll=1,
    )
    assert res.clean_accuracy == pytest.approx(clean)
    assert clean > pgd_acc >= res.robust_accuracy > 0
    assert np.mean(res.stages["apgd-ce"]) <= pgd_acc  # APGD-CE alone matches PGD
    _check_cascade(res, f, x, y, eps, "linf")
    assert not aa.sanity_checks(f, x, y, result=res, n_target_classes=3)


def test_autoattack_batch_is_jittable_and_exact_on_a_linear_model(linear5):
    """L2, whole cascade in one jit: robust iff the analytic distance exceeds eps."""
    w, x, y = linear5
    f = linear_model(w)
    dist = analytic_distance(w, x, y, "l2")
    eps = float(np.median(dist))
    run = jax.jit(
        functools.partial(
            aa.autoattack_batch,
            f,
            eps=eps,
            norm="l2",
            num_classes=5,
            n_iter=20,
            n_target_classes=4,
            n_queries=100,
            unroll=1,
        )
    )
    res = run(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    _check_cascade(res, f, x, y, eps, "l2")
    clear = np.abs(dist / eps - 1) > 0.02
    np.testing.assert_array_equal(np.asarray(res.robust)[clear], (dist > eps)[clear])


# ------------------------------------------------------- gradient-free and sanity checks


def test_square_makes_progress_without_gradients_and_the_checks_notice():
    """A binary linear model behind stop_gradient: APGD is blind, Square is not."""
    rng = np.random.default_rng(2)
    w = rng.choice([-1.0, 1.0], D) * rng.uniform(0.5, 1.5, D)
    eps = 0.05
    n = 16
    v = rng.uniform(-0.15, 0.15, (n, D))
    v -= np.outer(v @ w, w) / (w @ w)  # orthogonal to w: w . x = 0.5 sum(w) for all points
    x = (0.5 + v).reshape(n, H, H, 1).astype(np.float32)
    # score = w.x + b = -0.7 eps ||w||_1 < 0: class 0, flipped only near the worst corner
    # (a random Linf start moves the score by ~ eps ||w||_2 / sqrt(3), 4.7 times less).
    b = -0.5 * w.sum() - 0.7 * eps * np.abs(w).sum()
    lin = linear_model(np.stack([np.zeros(D), w], 1), np.array([0.0, b]))

    def blind(xb):
        return lin(jax.lax.stop_gradient(xb))

    y = np.zeros(n, np.int32)
    res = aa.autoattack(
        blind,
        x,
        y,
        jax.random.PRNGKey(0),
        eps=eps,
        norm="linf",
        num_classes=2,
        attacks=("apgd-ce", "square"),
        n_iter=10,
        n_queries=300,
        unroll=1,
    )
    assert res.clean_accuracy == 1.0
    assert np.mean(res.stages["apgd-ce"]) == 1.0  # zero gradients: no progress
    assert np.mean(res.stages["square"]) <= 0.25  # Square still fools most points
    assert_valid(x, res.x_adv, eps, "linf")
    warnings = aa.sanity_checks(blind, x, y, result=res, attacks=("apgd-ce", "square"))
    assert any("zero gradient" in m for m in warnings)
    assert any("Square Attack lowered" in m for m in warnings)
    # The same model with gradients: no such warnings.
    assert not aa.sanity_checks(lin, x, y, attacks=("apgd-ce",))


def test_sanity_checks_fire_on_softmax_and_randomised_models(linear5):
    w, x, y = linear5
    f = linear_model(w)
    assert aa.sanity_checks(f, x, y, n_target_classes=4) == []

    probs = aa.sanity_checks(lambda xb: jax.nn.softmax(f(xb)), x, y, n_target_classes=4)
    assert len(probs) == 1 and "probability" in probs[0]

    rng = np.random.default_rng(0)

    def noisy(xb):  # eager calls draw fresh noise: a randomised defence
        return f(xb) + jnp.asarray(rng.normal(0, 0.5, (xb.shape[0], 5)), jnp.float32)

    rand = aa.sanity_checks(noisy, x, y, n_target_classes=4)
    assert any("disagree" in m for m in rand)

    few = aa.sanity_checks(f, x, y)  # 9 targets requested, 4 possible
    assert any("target classes" in m for m in few)

    # A result claiming more robust than clean points (e.g. evaluated on another model).
    fake = aa.AutoAttackResult(
        x, np.ones(16, bool), np.ones(16, bool), {"apgd-ce": np.ones(16, bool)}, 0.0
    )
    wrong = aa.sanity_checks(
        lambda xb: -f(xb), x, y, result=fake, n_target_classes=4, robust_accuracy=0.9
    )
    assert sum("below" in m for m in wrong) == 2


def test_invalid_arguments():
    f = linear_model(np.ones((D, 3), np.float32))
    x = jnp.full((2, H, H, 1), 0.5)
    y = jnp.zeros(2, jnp.int32)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="norm"):
        aa.apgd(f, x, y, key, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        aa.apgd(f, x, y, key, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="num_classes"):
        aa.autoattack(f, x, y, key, eps=0.1, num_classes=10)
    with pytest.raises(NotImplementedError):
        aa.autoattack(f, x, y, key, eps=0.1, num_classes=3, version="rand")
    with pytest.raises(ValueError, match="NHWC"):
        aa.square_attack(f, x.reshape(2, -1), y, key, eps=0.1)
