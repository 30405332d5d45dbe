"""The optimiser (``samrobust.optim``): schedules, Nesterov, bias scaling and frozen
layers, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samrobust import optim, parallel
from tests.helpers import digits_config


def test_learning_rate_schedules():
    config = digits_config(learning_rate=0.1)
    lr = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose(
        [lr(0), lr(74), lr(75), lr(89), lr(90)], [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6
    )
    config.lr_schedule = "cosine"
    lr = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.1, 0.05, 0.0], atol=1e-7)


def test_triangle_schedule():
    config = digits_config(learning_rate=2.0, lr_schedule="triangle", lr_triangle=(0.2, 0.25, 0.1))
    lr = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose(
        [lr(0), lr(10), lr(25), lr(55), lr(100)], [0.4, 1.04, 2.0, 1.28, 0.2], rtol=1e-5
    )


def test_nesterov_norm_bias_scale_and_frozen_whitening_against_hand_computation():
    """Two optimizer steps on named parameters: Nesterov momentum, BatchNorm biases with
    lr x 64 and weight decay / 64, the frozen whitening kernel without weight decay."""
    config = digits_config(learning_rate=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    config.norm_bias_lr_scale = 64.0
    tx = optim.create_optimizer(config, 0.1)
    params = {
        "BatchNorm_0": {"bias": jnp.array([1.0, -2.0])},
        "Dense_0": {"kernel": jnp.array([[0.5, 3.0]]), "bias": jnp.array([2.0])},
        "whiten": {"kernel": jnp.array([4.0]), "bias": jnp.array([1.0])},
    }
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    update = jax.vmap(lambda g, s, p: tx.update(g, s, p), axis_name=parallel.AXIS)
    state = jax.tree.map(lambda a: a[None], tx.init(params))
    p = params
    for _ in range(2):
        batched = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
        updates, state = update(batched(grads), state, batched(p))
        p = optax.apply_updates(p, jax.tree.map(lambda a: a[0], updates))

    def hand(w, wd, scale):
        w, trace = np.asarray(w, np.float64), 0.0
        for _ in range(2):
            d = 0.1 + wd * w
            trace = d + 0.85 * trace
            w = w - scale * 0.1 * (d + 0.85 * trace)  # optax's Nesterov
        return w

    np.testing.assert_allclose(
        p["BatchNorm_0"]["bias"], hand([1.0, -2.0], 0.01 / 64, 64), rtol=1e-5
    )
    np.testing.assert_allclose(p["Dense_0"]["kernel"], hand([[0.5, 3.0]], 0.01, 1), rtol=1e-5)
    np.testing.assert_allclose(p["Dense_0"]["bias"], hand([2.0], 0.01, 1), rtol=1e-5)
    np.testing.assert_allclose(p["whiten"]["kernel"], hand([4.0], 0.0, 1), rtol=1e-5)
    np.testing.assert_allclose(p["whiten"]["bias"], hand([1.0], 0.01, 1), rtol=1e-5)
