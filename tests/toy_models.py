"""Tiny models with known optima, shared by the attack tests (linear models: exact minimal
distances; a trained MLP: a realistic decision boundary)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samrobust.attacks import perturbation_norm

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
    assert np.max(np.asarray(perturbation_norm(jnp.asarray(x_adv - x), norm))) <= eps + 1e-6


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
