"""The pure train step (``samrobust.step``) against independent two-pass computations."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import at as at_config
from configs import sam_at as sam_at_config
from samrobust import attacks, config_check, optim, parallel
from samrobust.step import (
    StepOptions,
    augment,
    create_train_state,
    evaluation_variables,
    make_train_step,
    make_train_steps,
    sam_groups,
    step_options,
)
from tests.helpers import digits_config


class TinyNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense on flattened inputs: small enough to check by hand."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


@pytest.mark.parametrize("perturbation", ["sam", "awp"])
def test_adversarial_step_matches_independent_two_pass_computation(perturbation):
    """One sam_at step (SAM) or at step with AWP against PGD, the weight perturbation and
    momentum SGD written out by hand."""
    if perturbation == "sam":
        config = digits_config(sam_at_config, rho=0.3, weight_decay=0.01, learning_rate=0.2)
    else:
        config = digits_config(at_config, awp_gamma=0.3, weight_decay=0.01, learning_rate=0.2)
    config.attack.update(norm="linf", eps=0.1, step_size=0.04, steps=3)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 100))
    options = StepOptions(attack=attacks.PGDSpec("linf", 0.1, 0.04, 3))
    state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    key = jax.random.key(2)
    step = make_train_step(model.apply, tx, options, mesh)
    params0, stats0 = jax.device_get((state.params, state.batch_stats))
    new_state, metrics = step(state, x, y, key)

    # The step's documented key use: fold in step and device, split into (augment, attack).
    k_attack = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 0), 0))[1]

    def loss(p, z):
        logits, upd = model.apply(
            {"params": p, "batch_stats": stats0}, z, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)
        return jnp.mean(ce), upd["batch_stats"]

    z = jnp.clip(x + jax.random.uniform(k_attack, x.shape, minval=-0.1, maxval=0.1), 0, 1)
    for _ in range(3):
        gz = jax.grad(lambda z: loss(params0, z)[0] * 8)(z)
        z = jnp.clip(x + jnp.clip(z + 0.04 * jnp.sign(gz) - x, -0.1, 0.1), 0, 1)
    (l0, stats1), g = jax.value_and_grad(loss, has_aux=True)(params0, z)
    if perturbation == "sam":  # one global ball of radius 0.3
        gnorm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
        w_adv = jax.tree.map(lambda w, gi: w + 0.3 * gi / gnorm, params0, g)
    else:  # AWP: kernels only, each by 0.3 x its own norm
        w_adv = jax.tree.map(
            lambda w, gi: (
                w + 0.3 * np.linalg.norm(w) * gi / np.linalg.norm(gi) if w.ndim > 1 else w
            ),
            params0,
            g,
        )
    g_sam = jax.grad(lambda p: loss(p, z)[0])(w_adv)
    # optax.sgd with momentum: buffer = g (first step); update = -lr * buffer.
    expected = jax.tree.map(lambda w, gi: w - 0.2 * (gi + 0.01 * w), params0, g_sam)

    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats1), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # first pass's statistics
    np.testing.assert_allclose(metrics["loss"], l0, rtol=1e-6)
    assert int(new_state.step) == 1


def test_per_device_and_synchronised_sam_differ_on_8_devices():
    assert jax.device_count() == 8
    mesh = parallel.default_mesh()
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(1), (16, 2, 2, 1))
    y = jnp.arange(16) % 3
    results = []
    for sync in (False, True):
        config = digits_config(sam_at_config, mode="sam", rho=0.5, sam_sync=sync)
        tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10))
        state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
        step = make_train_step(model.apply, tx, StepOptions(), mesh)
        new_state, _ = step(state, x, y, jax.random.key(3))
        results.append(jax.device_get(new_state.params))
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True)
    )
    assert diff > 1e-5


def test_at_with_awp_keeps_the_8_replicas_identical_and_moves_them():
    mesh = parallel.default_mesh()
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(1), (16, 2, 2, 1))
    y = jnp.arange(16) % 3
    options = StepOptions(attack=attacks.PGDSpec("linf", 0.1, 0.04, 2))
    results = []
    for gamma in (0.0, 0.5):
        config = digits_config(at_config, awp_gamma=gamma)
        tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10))
        state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
        new_state, _ = make_train_step(model.apply, tx, options, mesh)(
            state, x, y, jax.random.key(3)
        )
        for leaf in jax.tree.leaves(new_state.params):
            replicas = [np.asarray(s.data) for s in leaf.addressable_shards]
            assert len(replicas) == 8
            for r in replicas[1:]:
                np.testing.assert_array_equal(r, replicas[0])
        results.append(jax.device_get(new_state.params))
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True)
    )
    assert diff > 1e-5  # the perturbation changes the update


def test_the_weight_average_follows_its_formula():
    config = digits_config(at_config, mode="sgd", ema_decay=0.8)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10))
    state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh, ema=True)
    step = make_train_step(model.apply, tx, step_options(config), mesh)
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    want = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    for _ in range(3):
        state, _ = step(state, x, y, jax.random.key(2))
        new = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        want = jax.tree.map(lambda e, w: 0.8 * e + 0.2 * w, want, new)
    for got, w in zip(jax.tree.leaves(state.ema), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(
        evaluation_variables(state)["params"]["Dense_0"]["kernel"],
        state.ema["params"]["Dense_0"]["kernel"],
    )


def test_late_sam_before_its_start_is_the_sgd_step_bitwise():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    results = []
    for overrides in ({"mode": "sgd"}, {"mode": "sam", "rho": 0.5, "sam_start_fraction": 0.5}):
        config = digits_config(at_config, **overrides)
        tx = optim.create_optimizer(
            config, optim.learning_rate_schedule(config, 10), total_steps=10
        )
        state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
        step = make_train_step(model.apply, tx, step_options(config), mesh)
        for _ in range(2):
            state, _ = step(state, x, y, jax.random.key(2))
        results.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cheaper_sam_chosen_on_the_host_matches_its_lax_cond():
    """Randomised and late SAM in training: two programs picked per step by
    ``optim.sam_perturbs`` give what one program with SAM's own ``lax.cond`` gives."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    cheaper = {"sam_probability": 0.5, "seed": 1}, {"sam_start_fraction": 0.5}
    assert optim.sam_perturbs(digits_config(at_config, mode="sam"), 6) is None
    for overrides in cheaper:
        config = digits_config(at_config, mode="sam", rho=0.5, **overrides)
        perturbs = optim.sam_perturbs(config, 6)
        assert {perturbs(n) for n in range(6)} == {False, True}  # both programs run
        tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 6), total_steps=6)
        results = []
        for chooser in (perturbs, None):  # None: one program, SAM's own lax.cond
            steps = make_train_steps(model.apply, tx, step_options(config), mesh, chooser)
            state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
            for n in range(6):
                state, _ = steps(n)(state, x, y, jax.random.key(2))
            results.append(jax.device_get(state.params))
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_initial_state_compiled_at_a_lower_level_has_the_default_bits():
    """``create_train_state`` compiles at ``INIT_COMPILER_OPTIONS`` on the CPU (much faster);
    the weights are those of the model's own jitted init."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    config = digits_config(at_config, mode="sgd")
    tx = optim.create_optimizer(config, 0.1)
    state = create_train_state(jax.random.key(3), model, tx, (2, 2, 1), mesh)
    want = jax.jit(lambda k: model.init(k, jnp.zeros((1, 2, 2, 1)), train=False))(jax.random.key(3))
    for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_augment_crop_and_flip():
    images = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
    same = augment(jax.random.key(0), images, 0, False)
    np.testing.assert_array_equal(same, images)
    flipped = [augment(jax.random.key(k), images, 0, True) for k in range(20)]
    assert any(np.array_equal(f[0], images[0, :, ::-1]) for f in flipped)
    assert all(
        np.array_equal(f[0], images[0]) or np.array_equal(f[0], images[0, :, ::-1]) for f in flipped
    )
    cropped = augment(jax.random.key(1), images, 1, False)
    assert cropped.shape == images.shape
    # A crop of the reflect-padded image: every output pixel value occurs in the input row set.
    assert set(np.asarray(cropped[0]).ravel()) <= set(np.asarray(images[0]).ravel())


def test_grouped_sam_step_matches_per_group_two_pass_computation():
    """A sam step with sam_group_size = half the batch: each group's own pass (BatchNorm
    over the group), its own perturbation, then the mean SAM gradient, written by hand."""
    config = digits_config(sam_at_config, mode="sam", rho=0.4, weight_decay=0.01)
    config.update(learning_rate=0.2, batch_size=8, sam_group_size=4)
    assert sam_groups(config, 1) == 2
    assert sam_groups(digits_config(sam_at_config, mode="sam", batch_size=8), 1) == 1
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 100), grouped=True)
    state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    step = make_train_step(model.apply, tx, StepOptions(sam_groups=2), mesh)
    params0, stats0 = jax.device_get((state.params, state.batch_stats))
    new_state, metrics = step(state, x, y, jax.random.key(2))

    def loss(p, xs, ys):
        logits, upd = model.apply(
            {"params": p, "batch_stats": stats0}, xs, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), ys[:, None], 1)
        return jnp.mean(ce), upd["batch_stats"]

    g_sams, stats, losses = [], [], []
    for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
        (l0, s1), g = jax.value_and_grad(loss, has_aux=True)(params0, xs, ys)
        gnorm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
        w_adv = jax.tree.map(lambda w, gi: w + 0.4 * gi / gnorm, params0, g)  # noqa: B023
        g_sams.append(jax.grad(lambda p: loss(p, xs, ys)[0])(w_adv))  # noqa: B023
        stats.append(s1)
        losses.append(l0)
    g_sam = jax.tree.map(lambda a, b: (a + b) / 2, *g_sams)
    expected = jax.tree.map(lambda w, gi: w - 0.2 * (gi + 0.01 * w), params0, g_sam)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, *stats)
    for got, want in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(mean_stats), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], (losses[0] + losses[1]) / 2, rtol=1e-6)


def test_trades_with_beta_zero_is_clean_cross_entropy_training():
    """at + TRADES with beta 0: the PGD examples enter only the KL term, so the step equals
    an SGD step on the clean inputs (same key, same augmentation); beta > 0 differs."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
    model = TinyNet()
    x = jax.random.uniform(jax.random.key(1), (8, 2, 2, 1))
    y = jnp.arange(8) % 3
    params = {}
    for name, mode, at_loss, beta in (
        ("sgd", "sgd", "ce", 6.0),
        ("trades0", "at", "trades", 0.0),
        ("trades6", "at", "trades", 6.0),
    ):
        config = digits_config(at_config, mode=mode, at_loss=at_loss, at_beta=beta)
        config_check.validate_config(config, 1)
        tx = optim.create_optimizer(config, 0.1)
        state = create_train_state(jax.random.key(0), model, tx, (2, 2, 1), mesh)
        options = dataclasses.replace(step_options(config), crop_padding=0)
        if mode == "at":
            assert options.at_loss == "trades" and options.attack is not None
        step = make_train_step(model.apply, tx, options, mesh)
        params[name] = jax.device_get(step(state, x, y, jax.random.key(2))[0].params)
    for a, b in zip(
        jax.tree.leaves(params["sgd"]), jax.tree.leaves(params["trades0"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(params["sgd"]), jax.tree.leaves(params["trades6"]), strict=True
        )
    )
    assert diff > 1e-5
