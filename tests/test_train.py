"""Unit tests of the training system: config errors, the step's maths, checkpoints, NaN."""

import dataclasses
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import at as at_config
from configs import sam_at as sam_at_config
from configs import sgd as sgd_config
from samrobust import attacks, config_check, input_pipeline, optim, parallel, train
from samrobust.checkpoint import config_mismatch
from samrobust.step import (
    StepOptions,
    augment,
    create_train_state,
    make_train_step,
    sam_groups,
    step_options,
)
from tests.helpers import REPO, load_checkpoint, subprocess_env


def digits_config(module=sgd_config, **overrides):
    config = module.get_config("digits")
    config.width = 4
    config.num_epochs = 1
    config.batch_size = 64
    config.eval_batch_size = 64
    config.eval_num_examples = 64
    config.eval_pgd_steps = 1
    config.attack.steps = 1
    for k, v in overrides.items():
        target = config
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return config


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("mode", "adam", "config.mode = 'adam'"),
        ("dataset", "imagenet", "config.dataset = 'imagenet'"),
        ("model", "vgg", "config.model = 'vgg'"),
        ("rho", -0.1, "config.rho = -0.1: must be >= 0"),
        ("attack.eps", -1.0, "config.attack.eps = -1.0: must be >= 0"),
        ("attack.steps", -2, "config.attack.steps = -2: must be >= 0"),
        ("attack.norm", "l1", "config.attack.norm = 'l1'"),
        ("batch_size", 12, "config.batch_size = 12: must be a positive multiple of the device"),
        ("lr_schedule", "step", "config.lr_schedule = 'step'"),
    ],
)
def test_invalid_config_fails_before_any_compute(tmp_path, key, value, message):
    config = digits_config(**{key: value})
    with pytest.raises(
        config_check.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")
    ) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert "--config." + key in str(e.value)  # names the fix
    assert not (tmp_path / "checkpoints").exists()


def test_missing_tfds_dataset_fails_fast_with_the_fixes(tmp_path):
    config = digits_config(dataset="cifar10", data_dir=str(tmp_path / "no_data"))
    start = time.perf_counter()
    with pytest.raises(input_pipeline.DatasetUnavailableError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 60  # not the minutes of download retries
    for fix in ("--config.data_dir", "tfds build cifar10", ":digits"):
        assert fix in str(e.value)


def test_digits_split_is_fixed_and_stratified():
    a, b = input_pipeline.load_digits(), input_pipeline.load_digits()
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert len(a.train_images) + len(a.test_images) == 1797
    assert a.image_shape == (8, 8, 1) and a.train_images.max() <= 1.0
    counts = np.bincount(a.test_labels, minlength=10) / np.bincount(
        np.concatenate([a.train_labels, a.test_labels]), minlength=10
    )
    np.testing.assert_allclose(counts, 0.2, atol=0.01)


def test_train_batches_resume_and_host_slices():
    images = np.arange(100, dtype=np.float32)[:, None]
    labels = np.arange(100, dtype=np.int32)
    full = input_pipeline.train_batches(images, labels, 20, seed=3)
    seq = [next(full)[1] for _ in range(12)]
    resumed = input_pipeline.train_batches(images, labels, 20, seed=3, start_step=7)
    for s in range(7, 12):
        np.testing.assert_array_equal(next(resumed)[1], seq[s])
    # An epoch (5 steps) covers every example once; epochs differ in order.
    assert sorted(np.concatenate(seq[:5])) == list(range(100))
    assert not np.array_equal(np.concatenate(seq[:5]), np.concatenate(seq[5:10]))
    hosts = [
        next(
            input_pipeline.train_batches(
                images, labels, 20, seed=3, process_index=i, process_count=2
            )
        )[1]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate(hosts)), np.sort(seq[0]))


class TinyNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense on flattened inputs: small enough to check by hand."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


def test_sam_at_step_matches_independent_two_pass_computation():
    """One sam_at step against PGD, SAM and momentum SGD written out by hand."""
    config = digits_config(sam_at_config, rho=0.3, weight_decay=0.01, learning_rate=0.2)
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
    gnorm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    w_adv = jax.tree.map(lambda w, gi: w + 0.3 * gi / gnorm, params0, g)
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


def test_learning_rate_schedules():
    config = digits_config(learning_rate=0.1)
    lr = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose(
        [lr(0), lr(74), lr(75), lr(89), lr(90)], [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6
    )
    config.lr_schedule = "cosine"
    lr = optim.learning_rate_schedule(config, 100)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.1, 0.05, 0.0], atol=1e-7)


def test_config_mismatch_names_changed_keys_but_not_resumable_ones():
    # The refusal itself, through the CLI on a finished run: tests/test_errors.py.
    saved = digits_config().to_dict()
    assert config_mismatch(saved, digits_config(width=8, rho=0.2).to_dict()) == [
        "rho: checkpoint 0.05 vs now 0.2",
        "width: checkpoint 4 vs now 8",
    ]
    # Logging/eval settings may change on resume.
    assert (
        config_mismatch(saved, digits_config(log_every_steps=7, eval_pgd_steps=3).to_dict()) == []
    )
    # A config saved before a key existed ran with the key's listed value: it still matches
    # a config that holds that value, on either side, and not one that holds another.
    older = {k: v for k, v in saved.items() if k not in ("nesterov", "label_smoothing")}
    assert config_mismatch(older, saved) == config_mismatch(saved, older) == []
    assert config_mismatch(older, digits_config(label_smoothing=0.2).to_dict()) == [
        "label_smoothing: checkpoint 0.0 vs now 0.2"
    ]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    config = digits_config(
        learning_rate=1e12, log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=50
    )
    with pytest.raises(train.TrainingDivergedError, match="last good checkpoint") as e:
        train.train_and_evaluate(config, workdir)
    assert "--config.learning_rate" in str(e.value)
    state = load_checkpoint(workdir)
    assert 1 <= int(state["step"]) < 22
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
    assert not (tmp_path / "run" / "results.json").exists()


def test_at_config_defaults_are_the_papers():
    config = at_config.get_config()
    assert (config.dataset, config.model, config.width) == ("cifar10", "preact_resnet18", 64)
    assert (config.num_epochs, config.batch_size, config.learning_rate) == (100, 128, 0.1)
    assert (config.momentum, config.weight_decay) == (0.9, 5e-4)
    assert config.attack.norm == "linf" and config.attack.steps == 5
    np.testing.assert_allclose([config.attack.eps, config.attack.step_size], [8 / 255, 2 / 255])


def test_tfds_path_converts_images_and_labels(monkeypatch):
    """load_tfds on tfds's own mock data (its testing utility; no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=12):
        ds = input_pipeline.load("cifar10")
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.float32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    assert ds.train_images.max() > 0.5  # scaled from uint8, not left in [0, 255] or [0, 1/255]
    assert ds.test_labels.dtype == np.int32 and ds.test_labels.max() < 10
    assert (ds.num_classes, ds.mean) == (10, (0.4914, 0.4822, 0.4465))


def test_training_on_digits_never_imports_tensorflow():
    code = (
        "import sys; from samrobust import main, train, evaluate, autoattack, input_pipeline; "
        "input_pipeline.load('digits'); assert 'tensorflow' not in sys.modules, 'tf imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(1),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- the fast recipe's pieces ------------------------------------------------------------


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


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sam_group_size": 5}, "config.sam_group_size = 5: must be -1"),
        ({"sam_group_size": 32, "sam_sync": True}, "drop --config.sam_sync"),
        ({"label_smoothing": 1.0}, "config.label_smoothing = 1.0"),
        ({"norm_bias_lr_scale": 0.0}, "config.norm_bias_lr_scale = 0.0"),
        ({"lr_triangle": (0.2, 1.5, 0.1)}, "config.lr_triangle"),
        ({"at_loss": "trades"}, "trades needs an adversarial mode"),
        ({"sam_start_fraction": 1.0}, "config.sam_start_fraction = 1.0"),
        ({"sam_probability": 0.0}, "config.sam_probability = 0.0"),
        ({"at_loss": "hinge"}, "config.at_loss = 'hinge'"),
        ({"lock_stale_after_s": 0.0}, "config.lock_stale_after_s = 0.0"),
    ],
)
def test_invalid_recipe_fields_are_config_errors(overrides, message):
    config = digits_config(sam_at_config, mode="sam", **overrides)
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate_config(config, 1)


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
