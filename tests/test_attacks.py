"""Tests of ``samrobust.attacks``: PGD (Linf / L2) and the attack losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from samrobust.attacks import (
    ball_start,
    cross_entropy,
    cw_margin,
    dlr_loss,
    dlr_targeted_loss,
    format_eps,
    input_loss,
    is_adversarial,
    parse_eps,
    pgd,
)

SHAPE = (4, 3, 3, 2)  # batch of tiny NHWC images
D = int(np.prod(SHAPE[1:]))


# --- a linear 2-class model: the worst case is known in closed form ------------------


def _linear_problem(seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, 2)).astype(np.float32)
    b = rng.normal(size=(2,)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=SHAPE).astype(np.float32)  # box inactive for eps <= 0.3
    y = np.array([0, 1, 1, 0], np.int32)

    def logits_fn(v):
        return v.reshape(v.shape[0], -1) @ W + b

    # Both losses grow as the margin z_y - z_other = (W_y - W_other) . x + const shrinks,
    # so the worst case moves x against w = W_y - W_other.
    w = np.stack([W[:, yi] - W[:, 1 - yi] for yi in y]).reshape(SHAPE)
    return logits_fn, x, y, w


def _np_ce(logits, y):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    return lse - logits[np.arange(len(y)), y]


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [False, True])
def test_linf_reaches_analytic_worst_case(loss, random_start):
    logits_fn, x, y, w = _linear_problem()
    eps = 0.1
    x_adv = pgd(
        input_loss(logits_fn, loss),
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.key(0),
        eps=eps,
        step_size=0.025,
        steps=12,
        unroll=1,
        norm="linf",
        random_start=random_start,
    )
    want = x - eps * np.sign(w)
    np.testing.assert_allclose(np.asarray(x_adv), want, atol=1e-6)
    # ...and that point has the largest loss of the ball: above the clean loss.
    adv_loss, clean_loss = _np_ce(logits_fn(want), y), _np_ce(logits_fn(x), y)
    np.testing.assert_allclose(_np_ce(logits_fn(np.asarray(x_adv)), y), adv_loss, rtol=1e-5)
    assert np.all(adv_loss > clean_loss)


@pytest.mark.parametrize("project", [False, True])
def test_n_fgsm_is_one_unprojected_step_from_a_wider_start(project):
    """N-FGSM (start_scale 2, one step of eps, no projection) on the linear model: exactly
    ``x + noise - eps sign(w)``, up to 3 eps from x; projected, the same clipped to eps."""
    logits_fn, x, y, w = _linear_problem()
    eps, key = 0.05, jax.random.key(4)  # x in [0.3, 0.7]: the box stays inactive at 3 eps
    kw = dict(eps=eps, step_size=eps, steps=1, norm="linf", start_scale=2.0)
    x_adv = pgd(
        input_loss(logits_fn), jnp.asarray(x), jnp.asarray(y), key, **kw, project_to_ball=project
    )
    noise = np.asarray(ball_start(key, jnp.asarray(x), 2 * eps, "linf"))
    assert np.abs(noise).max() > 1.5 * eps  # the start is wider than the ball
    want = noise - eps * np.sign(w)
    if project:
        want = np.clip(np.clip(noise, -eps, eps) - eps * np.sign(w), -eps, eps)
    np.testing.assert_allclose(np.asarray(x_adv) - x, want, atol=1e-6)
    assert (np.abs(np.asarray(x_adv) - x).max() > 1.5 * eps) != project


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_l2_reaches_analytic_worst_case_exactly(loss):
    """From x, steps of eps/4 along the per-example unit gradient reach the boundary in 4."""
    logits_fn, x, y, w = _linear_problem(1)
    eps = 0.25
    x_adv = pgd(
        input_loss(logits_fn, loss),
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.key(0),
        eps=eps,
        step_size=eps / 4,
        steps=4,
        unroll=1,
        norm="l2",
        random_start=False,
    )
    wn = np.sqrt(np.sum(w**2, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(np.asarray(x_adv), x - eps * w / wn, atol=1e-5)


def test_l2_random_start_converges_to_worst_case():
    logits_fn, x, y, w = _linear_problem(2)
    eps = 0.25
    x_adv = pgd(
        input_loss(logits_fn, "ce"),
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.key(3),
        eps=eps,
        step_size=0.1,
        steps=60,
        unroll=1,
        norm="l2",
        random_start=True,
    )
    wn = np.sqrt(np.sum(w**2, axis=(1, 2, 3), keepdims=True))
    want = x - eps * w / wn
    np.testing.assert_allclose(np.asarray(x_adv), want, atol=2e-3)
    np.testing.assert_allclose(
        _np_ce(logits_fn(np.asarray(x_adv)), y), _np_ce(logits_fn(want), y), rtol=1e-3
    )


# --- invariants on random inputs, box boundary included ------------------------------

_k = jax.random.split(jax.random.key(42), 2)
_W1 = 2.0 * jax.random.normal(_k[0], (D, 8))
_W2 = jax.random.normal(_k[1], (8, 3))


def _mlp_logits(v):
    return jnp.tanh(v.reshape(v.shape[0], -1) @ _W1) @ _W2


_MLP_LOSS = input_loss(_mlp_logits, "ce")


@functools.partial(jax.jit, static_argnames=("eps", "norm", "random_start", "steps", "unroll"))
def _pgd_mlp(x, y, key, *, eps, norm, random_start, steps=3, unroll=None):
    return pgd(
        _MLP_LOSS,
        x,
        y,
        key,
        eps=eps,
        step_size=eps / 2 if eps else 0.1,
        steps=steps,
        norm=norm,
        random_start=random_start,
        unroll=unroll,
    )


_pixels = st.one_of(
    st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=32, allow_subnormal=False)
)


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float32, SHAPE, elements=_pixels),
    eps=st.sampled_from([0.0, 0.05, 2.0]),
    norm=st.sampled_from(["linf", "l2"]),
    random_start=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pgd_stays_in_ball_and_box(x, eps, norm, random_start, seed):
    y = jnp.asarray(np.arange(SHAPE[0]) % 3, jnp.int32)
    x_adv = np.asarray(
        _pgd_mlp(
            jnp.asarray(x), y, jax.random.key(seed), eps=eps, norm=norm, random_start=random_start
        )
    )
    delta = x_adv.astype(np.float64) - x.astype(np.float64)
    if norm == "linf":
        dist = np.max(np.abs(delta), axis=(1, 2, 3))
    else:
        dist = np.sqrt(np.sum(delta**2, axis=(1, 2, 3)))
    assert np.all(dist <= eps + 1e-6)
    assert np.all(x_adv >= 0.0) and np.all(x_adv <= 1.0)
    assert np.all(np.isfinite(x_adv))


@pytest.mark.parametrize("norm,eps,step_size", [("linf", 0.1, 0.03), ("l2", 0.6, 0.2)])
def test_pgd_matches_hand_loop_on_nonlinear_model(norm, eps, step_size):
    """PGD on a tanh MLP (the gradient changes along the path) against a numpy loop."""
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 1, SHAPE)
    x[0, 0] = 0.0  # the box is active here
    x[1, 1] = 1.0
    y = np.array([0, 1, 2, 0], np.int32)
    steps = 6
    got = pgd(
        _MLP_LOSS,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y),
        jax.random.key(0),
        eps=eps,
        step_size=step_size,
        steps=steps,
        norm=norm,
        random_start=False,
        unroll=1,
    )
    grad = jax.grad(_MLP_LOSS)
    d = np.zeros_like(x)
    for _ in range(steps):
        g = np.asarray(grad(jnp.asarray(x + d, jnp.float32), jnp.asarray(y)), np.float64)
        if norm == "linf":
            d = np.clip(d + step_size * np.sign(g), -eps, eps)
        else:
            gn = np.sqrt(np.sum(g**2, axis=(1, 2, 3), keepdims=True))
            d = d + step_size * g / gn
            dn = np.sqrt(np.sum(d**2, axis=(1, 2, 3), keepdims=True))
            d = d * np.minimum(1.0, eps / dn)
        d = np.clip(x + d, 0.0, 1.0) - x
    np.testing.assert_allclose(np.asarray(got), x + d, atol=1e-5)
    # The gradient is not constant: a fixed-direction attack lands elsewhere.
    g0 = np.asarray(grad(jnp.asarray(x, jnp.float32), jnp.asarray(y)), np.float64)
    d0 = eps * (
        np.sign(g0) if norm == "linf" else g0 / np.sqrt(np.sum(g0**2, (1, 2, 3), keepdims=True))
    )
    assert np.max(np.abs((np.clip(x + d0, 0, 1) - x) - d)) > 1e-3


def test_unroll_factors_agree():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(0, 1, SHAPE), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0], jnp.int32)
    for norm in ("linf", "l2"):
        kw = dict(eps=0.3, norm=norm, random_start=True, steps=4)
        a = _pgd_mlp(x, y, jax.random.key(1), unroll=1, **kw)
        b = _pgd_mlp(x, y, jax.random.key(1), unroll=4, **kw)
        assert float(jnp.max(jnp.abs(a - x))) > 0.0  # the attack moved
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_zero_steps_without_random_start_returns_x():
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, SHAPE), jnp.float32)
    y = jnp.zeros((SHAPE[0],), jnp.int32)
    for norm in ("linf", "l2"):
        out = pgd(
            _MLP_LOSS,
            x,
            y,
            jax.random.key(0),
            eps=0.1,
            step_size=0.1,
            steps=0,
            norm=norm,
            random_start=False,
        )
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


# --- attack on a trained model -------------------------------------------------------


def _train_tiny_mlp():
    """A width-8 tanh MLP trained on two separable blobs in [0, 1]^D."""
    rng = np.random.default_rng(0)
    n = 64
    y = np.arange(n) % 2
    centres = np.where(y[:, None] == 0, 0.4, 0.6)
    x = np.clip(centres + 0.04 * rng.normal(size=(n, D)), 0, 1).astype(np.float32)
    x, y = jnp.asarray(x.reshape((n,) + SHAPE[1:])), jnp.asarray(y, jnp.int32)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = (
        0.3 * jax.random.normal(k1, (D, 8)),
        jnp.zeros(8),
        0.3 * jax.random.normal(k2, (8, 2)),
        jnp.zeros(2),
    )

    def logits(p, v):
        h = jnp.tanh(v.reshape(v.shape[0], -1) @ p[0] + p[1])
        return h @ p[2] + p[3]

    def loss(p):
        return jnp.mean(cross_entropy(logits(p, x), y))

    @jax.jit
    def train(p):
        def step(_, p):
            return jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p))

        return jax.lax.fori_loop(0, 300, step, p)

    params = train(params)
    return functools.partial(logits, params), x, y


def test_pgd_raises_loss_of_trained_model():
    logits_fn, x, y = _train_tiny_mlp()
    clean_logits = logits_fn(x)
    assert float(jnp.mean(jnp.argmax(clean_logits, 1) == y)) == 1.0  # it did learn
    clean = cross_entropy(clean_logits, y)
    for norm, eps, step in (("linf", 0.08, 0.02), ("l2", 0.5, 0.1)):
        for random_start in (False, True):
            x_adv = pgd(
                input_loss(logits_fn, "ce"),
                x,
                y,
                jax.random.key(1),
                eps=eps,
                step_size=step,
                steps=10,
                norm=norm,
                random_start=random_start,
                unroll=1,  # small compile; unrolling is tested separately
            )
            adv = cross_entropy(logits_fn(x_adv), y)
            assert bool(jnp.all(adv > clean)), (norm, random_start)
            assert float(jnp.mean(adv)) > 10 * float(jnp.mean(clean)), (norm, random_start)


# --- losses against hand computations ------------------------------------------------


def test_cross_entropy_matches_hand():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [10.0, 30.0, -5.0]], np.float32)
    y = np.array([0, 2, 0], np.int32)
    got = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(y)))
    want = np.array(
        [
            -np.log(np.exp(2.0) / (np.exp(2.0) + np.exp(-1.0) + np.exp(0.5))),
            np.log(3.0),
            20.0 + np.log(1 + np.exp(-20.0) + np.exp(-35.0)),
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_cw_margin_matches_hand():
    logits = np.array(
        [[2.0, -1.0, 0.5], [1.0, 3.0, 3.0], [-4.0, -2.0, -7.0], [5.0, 5.0, 1.0]], np.float32
    )
    y = np.array([0, 1, 2, 1], np.int32)
    want = [0.5 - 2.0, 3.0 - 3.0, -2.0 - (-7.0), 5.0 - 5.0]
    got = np.asarray(cw_margin(jnp.asarray(logits), jnp.asarray(y)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # bfloat16 logits come back as float32
    assert cw_margin(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(y)).dtype == jnp.float32


def test_input_loss_sums_per_example():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3, 0], jnp.int32)
    for name, fn in (("ce", cross_entropy), ("cw", cw_margin)):
        got = input_loss(lambda v: v, name)(logits, y)
        np.testing.assert_allclose(float(got), float(jnp.sum(fn(logits, y))), rtol=1e-6)


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(norm="l1"),
        dict(norm="Linf"),
        dict(eps=-0.1),
        dict(step_size=-0.1),
        dict(steps=-1),
        dict(start_scale=-1.0),
    ],
)
def test_pgd_invalid_arguments_raise(kw):
    args = dict(eps=0.1, step_size=0.01, steps=1, norm="linf") | kw
    x = jnp.full(SHAPE, 0.5)
    with pytest.raises(ValueError):
        pgd(_MLP_LOSS, x, jnp.zeros(SHAPE[0], jnp.int32), jax.random.key(0), **args)


def test_input_loss_unknown_raises():
    with pytest.raises(ValueError, match="loss"):
        input_loss(lambda v: v, "hinge")


def test_dlr_losses_match_their_formulas():
    z = jnp.array([[3.0, 1.0, 2.0, -1.0, 0.5], [0.0, 4.0, 1.0, 2.0, 3.0]])
    y = jnp.array([0, 2])
    # sorted: row 0: 3, 2, 1, 0.5, -1 ; row 1: 4, 3, 2, 1, 0
    np.testing.assert_allclose(dlr_loss(z, y), [-(3 - 2) / (3 - 1), -(1 - 4) / (4 - 2)], rtol=1e-6)
    t = jnp.array([2, 4])
    np.testing.assert_allclose(
        dlr_targeted_loss(z, y, t),
        [-(3 - 2) / (3 - (1 + 0.5) / 2), -(1 - 3) / (4 - (2 + 1) / 2)],
        rtol=1e-6,
    )
    # Fewer classes: 2 -> the plain margin; targeted with 3 -> z_pi1 - z_pi3.
    np.testing.assert_allclose(dlr_loss(z[:, :2], jnp.array([0, 0])), [-2.0, 4.0])
    np.testing.assert_allclose(
        dlr_targeted_loss(z[:, :3], jnp.array([0, 0]), jnp.array([2, 1])),
        [-(3 - 2) / (3 - 1), -(0 - 4) / (4 - 0)],
        rtol=1e-6,
    )


def test_eps_parsing_and_formatting():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.5") == 0.5
    for bad in ("abc", "1/0", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_eps(bad)
    assert [format_eps(e) for e in (8 / 255, 0.25 / 255, 0.5, 0.1234567)] == [
        "8/255",
        "0.25/255",
        "0.5",
        "0.123457",
    ]


def test_is_adversarial_is_the_one_acceptance_rule():
    x = jnp.full((4, 2), 0.5)
    logits = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # y = 0 for all
    x_adv = x.at[0].add(0.1).at[1].add(0.1).at[2].add(0.1 + 2e-6).at[3].set(jnp.nan)
    ok = is_adversarial(logits, jnp.zeros(4, jnp.int32), x, x_adv, eps=0.1, norm="linf")
    # fooled within eps (+ VALID_TOL); not misclassified; out of the ball; not finite
    assert ok.tolist() == [True, False, False, False]
