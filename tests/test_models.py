"""Tests of ``samrobust.models``: sizes, shapes, BatchNorm modes and input normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import models
from samrobust.models import MODELS, Normalize, create_model, wide_resnet

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def _n_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name,expected",
    [("preact_resnet18", 11_172_170), ("wrn28_10", 36_479_194), ("wrn34_10", 46_160_474)],
)
def test_parameter_counts(name, expected):
    model = create_model(name, 10, MEAN, STD)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert _n_params(shapes) == expected
    assert set(shapes) == {"params", "batch_stats"}


def test_models_tuple_matches_create_model():
    assert set(MODELS) == {"preact_resnet18", "wrn28_10", "wrn34_10", "fast_cifar"}
    for name in MODELS:  # every listed name builds a model with 10 logits
        model = create_model(name, 10, MEAN, STD, width=4)
        out = jax.eval_shape(
            lambda m=model: m.init_with_output(
                jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
            )[0]
        )
        assert out.shape == (1, 10), name


# --- shapes --------------------------------------------------------------------------


def _small(num_classes=10, mean=MEAN, std=STD, width=4):
    return create_model("preact_resnet18", num_classes, mean, std, width=width)


def _random_variables(model, x, rng):
    """Variables shaped by ``model.init`` (traced only), filled with He-scaled normals.

    BatchNorm scale/bias are random too; running statistics start at mean 0, var 1.
    """
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape)
        if name == "bias":
            return 0.1 * rng.normal(size=leaf.shape)
        if name == "var":
            return np.ones(leaf.shape)
        assert name == "mean", path
        return np.zeros(leaf.shape)

    filled = jax.tree_util.tree_map_with_path(fill, shapes)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), filled)


@pytest.fixture(scope="module")
def small_model():
    """PreActResNet-18 of width 4 with random weights (``model.init`` compiles slowly on CPU)."""
    model = _small()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (4, 8, 8, 3)), jnp.float32)
    return model, _random_variables(model, x, rng), x


@pytest.mark.parametrize("size", [8, 32])
def test_output_shapes_width4(small_model, size):
    # Global average pooling: the same weights serve any input size.
    model, variables, _ = small_model
    x = jnp.full((2, size, size, 3), 0.5)
    out = model.apply(variables, x, train=False)
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 10)
    assert np.all(np.isfinite(out))


def test_num_classes_sets_output_width():
    model = _small(num_classes=7)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert variables["params"]["Dense_0"]["kernel"].shape == (32, 7)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", ["wrn28_10", "wrn34_10"])
def test_wrn_output_shape_abstract(name):
    model = create_model(name, 100, MEAN, STD)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 100)


def test_bfloat16_model_returns_float32_logits():
    model = create_model("preact_resnet18", 10, MEAN, STD, width=4, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.dtype == jnp.float32


# --- BatchNorm -----------------------------------------------------------------------


def _conv3x3_same(x, k):
    """Hand-written SAME 3x3 stride-1 cross-correlation, NHWC x HWIO."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, k.shape[-1]))
    for di in range(3):
        for dj in range(3):
            out += xp[:, di : di + h, dj : dj + w, :] @ k[di, dj]
    return out


def test_train_mode_updates_batch_stats_with_momentum(small_model):
    model, variables, x = small_model
    _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old_bs, new_bs = variables["batch_stats"], new["batch_stats"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old_bs, new_bs)
    assert all(jax.tree.leaves(changed))
    # The first BatchNorm sees stem(normalise(x)): running mean = 0.9 * 0 + 0.1 * batch mean.
    xn = (np.asarray(x, np.float64) - np.array(MEAN)) / np.array(STD)
    stem = _conv3x3_same(xn, np.asarray(variables["params"]["stem"]["kernel"], np.float64))
    np.testing.assert_allclose(
        np.asarray(new_bs["PreActBlock_0"]["BatchNorm_0"]["mean"]),
        0.1 * stem.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_train_mode_output_depends_on_batch(small_model):
    model, variables, x = small_model
    other = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (3, 8, 8, 3)), jnp.float32)
    batch_a = x
    batch_b = jnp.concatenate([x[:1], other])
    out_a, _ = model.apply(variables, batch_a, train=True, mutable=["batch_stats"])
    out_b, _ = model.apply(variables, batch_b, train=True, mutable=["batch_stats"])
    assert float(jnp.max(jnp.abs(out_a[0] - out_b[0]))) > 1e-4


def test_eval_mode_uses_running_averages(small_model):
    model, variables, x = small_model
    # Give the running averages non-trivial values with a few train-mode passes.
    state = variables
    for _ in range(3):
        _, upd = model.apply(state, x, train=True, mutable=["batch_stats"])
        state = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    other = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (3, 8, 8, 3)), jnp.float32)
    out_a = model.apply(state, x, train=False)
    out_b = model.apply(state, jnp.concatenate([x[:1], other]), train=False)
    out_1 = model.apply(state, x[:1], train=False)
    # Each example's output is independent of the rest of the batch...
    np.testing.assert_allclose(np.asarray(out_a[0]), np.asarray(out_b[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_a[0]), np.asarray(out_1[0]), rtol=1e-5, atol=1e-5)
    # ...and it is the running averages that are used: other statistics, other outputs.
    out_init = model.apply(variables, x, train=False)
    assert float(jnp.max(jnp.abs(out_a - out_init))) > 1e-4
    # Eval mode does not touch the statistics.
    _, same = model.apply(state, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], state["batch_stats"])


# --- normalisation -------------------------------------------------------------------


def test_normalize_module_formula():
    x = np.random.default_rng(2).uniform(0, 1, (2, 3, 3, 3)).astype(np.float32)
    out = Normalize(MEAN, STD).apply({}, jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(out), (x - np.array(MEAN)) / np.array(STD), rtol=1e-6, atol=1e-6
    )


def test_normalisation_is_first_op(small_model):
    """Model(mean m, std s) on x == model(mean 0, std 1) on (x - m) / s, same weights."""
    _, variables, x = small_model
    plain = _small(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    xn = (x - jnp.asarray(MEAN)) / jnp.asarray(STD)
    for train in (False, True):
        kw = dict(mutable=["batch_stats"]) if train else {}
        a = _small().apply(variables, x, train=train, **kw)
        b = plain.apply(variables, xn, train=train, **kw)
        a, b = (a[0], b[0]) if train else (a, b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # With the (untrained) running averages, the statistics are visible in the output.
    c = _small(mean=MEAN[::-1], std=STD).apply(variables, x, train=False)
    assert float(jnp.max(jnp.abs(c - _small().apply(variables, x, train=False)))) > 1e-4


# --- errors --------------------------------------------------------------------------


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="config.model"):
        create_model("resnet50", 10, MEAN, STD)


def test_wide_resnet_bad_depth_raises():
    with pytest.raises(ValueError, match="depth"):
        wide_resnet(27, 10, 10, MEAN, STD)


# --- fast_cifar ---------------------------------------------------------------------------


def test_fast_cifar_shapes_and_parameter_count():
    model = create_model("fast_cifar", 10, MEAN, STD, width=64)
    variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    out = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    # airbench94's: 2x2 whitening (24 filters + bias), conv groups 64/256/256, BN biases,
    # a bias-free 256 -> 10 head.
    convs = 24 * 64 + 64 * 64 + 64 * 256 + 256 * 256 + 256 * 256 + 256 * 256
    expected = (12 * 24 + 24) + 9 * convs + 2 * (64 + 256 + 256) + 256 * 10
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == expected == 1_971_640
    assert "scale" not in str(jax.tree_util.tree_structure(variables["params"]))  # BN: bias only
    k = variables["params"]["_ConvGroup_1"]["Conv_0"]["kernel"]  # (3, 3, 64, 256), dirac
    np.testing.assert_array_equal(k[1, 1, :, :64], np.eye(64))
    assert float(jnp.sum(jnp.abs(k[:, :, :, :64]))) == 64.0 and float(jnp.std(k[..., 64:])) > 0


def test_whitening_kernel_whitens_the_patches_and_is_frozen():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=(64, 12, 12, 1))
    images = np.clip(base + 0.1 * rng.normal(size=(64, 12, 12, 3)), 0, 1)  # correlated channels
    mean, std = (0.5, 0.5, 0.5), (0.3, 0.3, 0.3)
    kernel = models.whitening_kernel(images, mean, std, eps=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
    x = (images - np.asarray(mean)) / np.asarray(std)
    out = jax.lax.conv_general_dilated(
        x, kernel[..., :12], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).reshape(-1, 12)
    np.testing.assert_allclose(out.T @ out / len(out), np.eye(12), atol=2e-3)  # white

    model = create_model("fast_cifar", 10, mean, std, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    params = models.init_from_data(params, np.tile(images, (1, 3, 3, 1))[:, :32, :32], mean, std)
    assert params["whiten"]["kernel"].shape == (2, 2, 3, 24)

    def loss(p):
        return jnp.sum(model.apply({"params": p, "batch_stats": batch_stats}, x32, train=False))

    x32 = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
    batch_stats = model.init(jax.random.key(0), x32, train=False)["batch_stats"]
    g = jax.grad(loss)(params)
    assert float(jnp.max(jnp.abs(g["whiten"]["kernel"]))) == 0.0  # frozen
    assert float(jnp.max(jnp.abs(g["whiten"]["bias"]))) > 0.0  # trained
    assert models.is_frozen(jax.tree_util.tree_flatten_with_path(params)[0][-1][0])
