"""FAB-T and untargeted FAB (samrobust.autoattack.fab): the box-constrained hyperplane
projection against bisection, the exact minimal adversarial distance of a linear model, and
untargeted FAB against the reference's ``FABAttack_PT`` on the same network."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from samrobust import autoattack as aa
from samrobust.attacks import perturbation_norm
from samrobust.autoattack.fab import project_hyperplane_box
from tests.toy_models import analytic_distance, assert_valid, linear_model


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
    return jax.jit(functools.partial(project_hyperplane_box, norm=norm))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_adversarial_distance_of_a_linear_model(linear5, norm):
    w, x, y = linear5
    f = linear_model(w)
    attack = jax.jit(
        lambda x, y, k: aa.fab_targeted(f, x, y, k, eps=None, norm=norm, n_iter=30, unroll=1)
    )
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert np.all(np.argmax(np.asarray(f(x_adv)), axis=1) != y)
    dist = np.asarray(perturbation_norm(x_adv - x, norm))
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


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_untargeted_fab_finds_the_minimal_adversarial_distance_of_a_linear_model(linear5, norm):
    """One run, no target classes: each step heads for the nearest class boundary, so the
    minimum over the 4 wrong classes is found (FAB-T needs a run per target for it)."""
    w, x, y = linear5
    f = linear_model(w)
    attack = jax.jit(lambda x, y, k: aa.fab(f, x, y, k, eps=None, norm=norm, n_iter=30))
    x_adv = attack(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert np.all(np.argmax(np.asarray(f(x_adv)), axis=1) != y)
    dist = np.asarray(perturbation_norm(x_adv - x, norm))
    np.testing.assert_allclose(dist, analytic_distance(w, x, y, norm), rtol=0.01)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_untargeted_fab_matches_the_reference_on_the_same_mlp(mlp, norm):
    """``pyautoattack.fab_pt.FABAttack_PT`` (untargeted, one run from ``x``: deterministic)
    on a torch copy of the MLP: the same points fooled within eps, the same distances."""
    torch = pytest.importorskip("torch")
    fab_pt = pytest.importorskip("pyautoattack.fab_pt", reason="pyautoattack is not installed")
    logits_fn, x, y = mlp
    p = {k: torch.tensor(np.asarray(v)) for k, v in logits_fn.args[0].items()}

    def torch_mlp(z):
        return torch.relu(z.reshape(len(z), -1) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    eps = {"linf": 0.1, "l2": 0.4}[norm]
    ref = fab_pt.FABAttack_PT(
        torch_mlp, norm={"linf": "Linf", "l2": "L2"}[norm], n_iter=20, eps=eps, device="cpu"
    ).perturb(torch.tensor(x), torch.tensor(y, dtype=torch.long))
    ours = aa.fab(
        logits_fn,
        jnp.asarray(x),
        jnp.asarray(y),
        jax.random.PRNGKey(0),
        eps=eps,
        norm=norm,
        n_iter=20,
    )
    ref, ours = ref.numpy(), np.asarray(ours)
    fooled = [np.argmax(np.asarray(logits_fn(jnp.asarray(a))), 1) != y for a in (ref, ours)]
    np.testing.assert_array_equal(fooled[0], fooled[1])
    assert 0 < fooled[0].sum() < len(y)  # some points fooled, some not: a real comparison
    dist = [np.asarray(perturbation_norm(jnp.asarray(a - x), norm)) for a in (ref, ours)]
    np.testing.assert_allclose(dist[1], dist[0], atol=1e-5)
