"""Square Attack (samrobust.autoattack.square): the p schedule, the L2 window pattern
against the reference construction, and progress without gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import autoattack as aa
from samrobust.autoattack import square
from tests.toy_models import D, H, assert_valid, linear_model


def test_square_p_schedule():
    p = [float(square.square_p_schedule(i, 0.8)) for i in (0, 10, 11, 50, 51, 8000, 8001)]
    assert p == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512])


@pytest.mark.parametrize("s", [1, 3, 5, 6])
def test_square_window_pattern_matches_the_reference_construction(s):
    """The closed form drawn in a window at (1, 2) equals the loop-built eta(s)."""
    pat = square._eta_window(
        8, 9, jnp.array([1, 1]), jnp.array([2, 2]), jnp.asarray(s), jnp.array([False, True])
    )
    eta = square.square_eta(s)
    np.testing.assert_allclose(pat[0, 1 : 1 + s, 2 : 2 + s], eta, atol=1e-6)
    np.testing.assert_allclose(pat[1, 1 : 1 + s, 2 : 2 + s], eta.T, atol=1e-6)
    assert float(jnp.sum(jnp.abs(pat))) == pytest.approx(2 * np.abs(eta).sum(), rel=1e-5)
    assert np.linalg.norm(eta) == pytest.approx(1.0)
    if s >= 2:  # two stacked halves of opposite signs
        assert np.all(eta[: s // 2] >= 0) and np.all(eta[s // 2 :] <= 0)


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
        attacks=("apgd-ce", "square"),
        budget=aa.Budget(n_iter=10, n_queries=300),
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
