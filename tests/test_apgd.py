"""APGD (samrobust.autoattack.apgd): the paper's step schedule, the analytic worst case of
a linear model, and success at least as often as PGD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import autoattack as aa
from samrobust.attacks import cw_margin, input_loss, pgd
from samrobust.autoattack.apgd import checkpoints
from tests.toy_models import D, H, analytic_distance, assert_valid, linear_model


def test_apgd_checkpoints_follow_the_paper_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    p, expected = [0.0, 0.22], []
    while p[-1] <= 1.0:
        expected.append(round(100 * p[-1]))
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == expected == [22, 41, 57, 70, 80, 87, 93, 99]


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

    unroll = 2 if norm == "linf" else 1  # an unrolled loop once
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


def _dropout_linear(w, x, key):
    """A linear model with dropout on its inputs kept at test time (keep 1/2, rescaled)."""
    keep = jax.random.bernoulli(key, 0.5, x.shape).astype(x.dtype)
    return (x * keep * 2.0).reshape(x.shape[0], -1) @ w


def test_eot_gradient_is_the_mean_over_draws_and_the_outputs_the_last_draws(linear5):
    """APGD's expectation over transformation (AutoAttack rand): the gradient is the mean of
    the per-draw gradients under the key's folds 0..n-1, computed by hand here; the loss and
    logits are the last draw's (as in the reference)."""
    from samrobust.autoattack.apgd import _per_example_loss, _value_and_grad

    w, x, y = linear5
    model = aa.RandomizedModel(jax.tree_util.Partial(_dropout_linear, jnp.asarray(w)), None)
    loss_of = _per_example_loss("ce", targeted=False)
    key = jax.random.key(3)
    (_, (li, z)), grad = _value_and_grad(model, loss_of, y, y, eot_iter=4, key=key)(x)

    def draw(xa, e):
        return _dropout_linear(w, xa, jax.random.fold_in(key, e))

    by_hand = [jax.grad(lambda xa, e=e: jnp.sum(loss_of(draw(xa, e), y, y)))(x) for e in range(4)]
    np.testing.assert_allclose(np.asarray(grad), np.mean(by_hand, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(by_hand[0], by_hand[1])  # the draws differ: a real average
    np.testing.assert_allclose(np.asarray(z), np.asarray(draw(x, 3)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(li), np.asarray(loss_of(z, y, y)), rtol=1e-6)
