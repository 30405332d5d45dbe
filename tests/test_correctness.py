"""samrobust.correctness: per-example correctness under PGD (or clean), data parallel over
all devices, against the analytic worst case of a two-class linear model."""

import jax
import numpy as np

from samrobust.attacks import PGDSpec
from samrobust.correctness import correctness, make_correct_fn
from samrobust.parallel import default_mesh, replicate


def linear_logits(variables, x):
    return x.reshape(x.shape[0], -1) @ variables["w"]


def test_pgd_correctness_is_the_analytic_robust_set_of_a_linear_model(caplog):
    """Two classes, logits ``x @ w``: the Linf worst case lowers the margin by exactly
    ``eps ||w_y - w_other||_1`` (box inactive), which PGD reaches; 37 points in batches of 16
    on every device (the last batch padded); progress is logged under a name."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 2)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(37, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 2, 37).astype(np.int32)
    z = x.reshape(37, -1) @ w
    margin = z[np.arange(37), y] - z[np.arange(37), 1 - y]
    l1 = np.abs(w[:, 0] - w[:, 1]).sum()
    m = np.sort(margin[margin > 0])
    eps = float(m[len(m) // 2 - 1] + m[len(m) // 2]) / 2 / l1  # between two points' margins
    assert eps < 0.3  # the box is never active
    robust = margin > eps * l1
    assert 0 < robust.sum() < (margin > 0).sum()  # the attack changes some decisions

    mesh = default_mesh()
    variables = replicate({"w": w}, mesh)
    kw = dict(batch_size=2 * mesh.size, mesh=mesh)
    clean = correctness(
        make_correct_fn(linear_logits, None, mesh), variables, x, y, jax.random.key(0), **kw
    )
    np.testing.assert_array_equal(clean, margin > 0)
    spec = PGDSpec(norm="linf", eps=eps, step_size=eps / 4, steps=10)
    with caplog.at_level("INFO"):
        under_pgd = correctness(
            make_correct_fn(linear_logits, spec, mesh, unroll=1),
            variables,
            x,
            y,
            jax.random.key(0),
            name=spec.name,
            **kw,
        )
    np.testing.assert_array_equal(under_pgd, robust)
    assert f"eval {spec.name} batch 1/" in caplog.text
