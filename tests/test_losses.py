"""Tests of ``samrobust.losses`` against hand-written numpy on fixed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import attacks, losses

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [1.0, 1.5, -2.0]], np.float32)
ADV = np.array([[0.5, 0.4, 0.6], [1.5, 0.2, 1.0], [2.0, 0.5, -1.0]], np.float32)
LABELS = np.array([0, 1, 0])


def log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_label_smoothing_loss_against_numpy():
    logp = log_softmax(LOGITS)
    targets = np.eye(3)[LABELS] * 0.8 + 0.2 / 3
    want = -(targets * logp).sum(1).mean()
    np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS, 0.2), want, rtol=1e-6)
    plain = -logp[np.arange(3), LABELS].mean()
    np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS), plain, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_trades_against_numpy(beta):
    lp, lq = log_softmax(LOGITS), log_softmax(ADV)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    want = -lp[np.arange(3), LABELS].mean() + beta * kl.mean()
    np.testing.assert_allclose(losses.trades(LOGITS, ADV, LABELS, beta), want, rtol=1e-6)
    if beta == 0:  # beta 0 is the clean cross-entropy
        np.testing.assert_allclose(
            losses.trades(LOGITS, ADV, LABELS, 0.0), losses.cross_entropy(LOGITS, LABELS)
        )


def test_mart_against_numpy():
    p_clean, p_adv = np.exp(log_softmax(LOGITS)), np.exp(log_softmax(ADV))
    rows = np.arange(3)
    wrong = [
        max((j for j in range(3) if j != y), key=lambda j: p_adv[i, j])
        for i, y in enumerate(LABELS)
    ]
    boosted = -np.log(p_adv[rows, LABELS]) - np.log(1.0001 - p_adv[rows, wrong] + 1e-12)
    kl = (p_clean * (np.log(p_clean + 1e-12) - np.log(p_adv + 1e-12))).sum(1)
    want = boosted.mean() + 5.0 * (kl * (1.0000001 - p_clean[rows, LABELS])).mean()
    np.testing.assert_allclose(losses.mart(LOGITS, ADV, LABELS, 5.0), want, rtol=1e-5)
    assert wrong == [2, 0, 1]  # the most likely wrong class, not the top-2 of all classes


def test_trades_inner_attack_increases_the_kl():
    """PGD on TRADES' attack loss moves a linear model's prediction away from the clean one
    far more than random points of the same ball do."""
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], (12, 4))
    x = jax.random.uniform(k[1], (16, 12))
    logits_fn = lambda z: 5.0 * z @ w  # noqa: E731
    clean = logits_fn(x)
    loss = losses.trades_attack_loss(logits_fn, clean)
    y = jnp.zeros(16, jnp.int32)
    adv = attacks.pgd(loss, x, y, k[2], eps=0.05, step_size=0.02, steps=10, norm="linf")
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.05 + 1e-6
    random = jnp.clip(x + jax.random.uniform(k[2], x.shape, minval=-0.05, maxval=0.05), 0, 1)
    assert float(loss(adv, y)) > 3 * float(loss(random, y)) > 0
