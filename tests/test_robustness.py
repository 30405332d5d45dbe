"""Tests of ``samrobust.robustness``, the evaluation library: exact AutoAttack robust sets
through the sharded suite, sanity checks in the report, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import autoattack as aa
from samrobust import reports, robustness
from samrobust.attacks import format_eps
from samrobust.autoattack import Budget


def linear_logits(variables, x):
    return x.reshape(x.shape[0], -1) @ variables["w"] + variables["b"]


def _linear_problem(k: int = 5):
    """(w, b, x, y, distance of each point to its nearest decision boundary) of a linear
    ``k``-class model on 48 points, 4 of them misclassified; ``b`` centres the logits, so
    that the boundaries run through the data and the nearest boundary point of every
    point lies inside the [0, 1] box (checked: the distance is then the true one)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, k)).astype(np.float32)
    x = rng.uniform(0.3, 0.7, size=(48, 4, 4, 1)).astype(np.float32)
    z = x.reshape(48, -1) @ w
    b = -z.mean(axis=0)
    z = z + b
    y = np.argmax(z, axis=1).astype(np.int32)
    y[:4] = (y[:4] + 1) % k  # 4 misclassified points
    dist = np.zeros(48)
    for i in range(48):
        d, u = min(
            ((z[i, y[i]] - z[i, u]) / np.linalg.norm(w[:, u] - w[:, y[i]]), u)
            for u in range(k)
            if u != y[i]
        )
        dist[i] = d
        step = w[:, u] - w[:, y[i]]
        nearest = x[i].reshape(-1) + d * step / np.linalg.norm(step)
        assert d <= 0 or 0 <= nearest.min() <= nearest.max() <= 1
    return w, b, x, y, dist


def _linear_autoattack(k: int = 5, budget: Budget | None = None, **kwargs):
    """(boundary distances, eps, report): the autoattack suite on :func:`_linear_problem`
    at L2 eps = the median distance of the correctly classified points, a small budget."""
    w, b, x, y, dist = _linear_problem(k)
    eps = float(np.median(dist[4:]))
    report = robustness.evaluate(
        linear_logits,
        {"w": w, "b": b},
        x,
        y,
        suite="autoattack",
        eps=eps,
        norm="l2",
        batch_size=16,
        budget=budget or Budget(n_iter=20, n_target_classes=4, n_queries=50),
        unroll=1,
        **kwargs,
    )
    return dist, eps, report


def test_autoattack_suite_finds_the_exact_robust_set_of_a_linear_model():
    """For a linear model (box inactive) a point is robust iff its distance to the nearest
    decision boundary, ``min_t (z_y - z_t) / ||w_y - w_t||_2``, exceeds eps."""
    dist, eps, report = _linear_autoattack()
    name = f"autoattack_l2_{format_eps(eps)}"
    assert list(report["accuracy"]) == ["clean", name]
    clean = report["masks"]["clean"]
    np.testing.assert_array_equal(clean, np.arange(48) >= 4)
    np.testing.assert_array_equal(report["masks"][name], clean & (dist > eps))
    assert report["autoattack"]["max_perturbation"] <= eps + 1e-6
    # 4 targets is all there are; the only warning is the reduced budget.
    assert len(report["warnings"]) == 1 and "reduced" in report["warnings"][0]


@pytest.mark.parametrize("k", [2, 3])
def test_autoattack_on_two_or_three_classes_targets_the_classes_there_are(k):
    """Fewer classes than 4 target classes + 1 (as the reference does: the target count is
    capped at k - 1, and the report warns, naming the DLR loss's fallback): still exactly
    the points farther than eps from every boundary stay robust."""
    dist, eps, report = _linear_autoattack(k)
    name = f"autoattack_l2_{format_eps(eps)}"
    clean = report["masks"]["clean"]
    np.testing.assert_array_equal(clean, np.arange(48) >= 4)
    np.testing.assert_array_equal(report["masks"][name], clean & (dist > eps))
    assert 0 < report["masks"][name].sum() < clean.sum()  # both kinds of point present
    assert f"4 target classes requested but only {k - 1} are possible" in report["warnings"]
    assert any(f"with only {k} classes" in w and "DLR" in w for w in report["warnings"])


def test_a_custom_autoattack_is_named_by_its_attacks_and_never_reported_as_standard():
    """``attacks=("apgd-dlr", "apgd-ce")``: only those run, in that order; untargeted
    APGD-DLR fools points; no point within its boundary distance is called fooled."""
    dist, eps, report = _linear_autoattack(attacks=("apgd-dlr", "apgd-ce"))
    name = f"autoattack-apgd-dlr+apgd-ce_l2_{format_eps(eps)}"
    assert list(report["accuracy"]) == ["clean", name]
    assert list(report["autoattack"]["stages"]) == ["apgd-dlr", "apgd-ce"]
    assert report["attacks"][name]["version"] == "custom"
    robust, clean = report["masks"][name], report["masks"]["clean"]
    assert np.all(robust[clean & (dist > eps)])  # the truly robust stay robust
    assert report["masks"][f"{name}/apgd-dlr"].sum() < clean.sum()  # APGD-DLR fooled some
    assert any("custom AutoAttack" in w for w in report["warnings"])
    assert "AutoAttack custom (apgd-dlr, apgd-ce)" in reports.markdown(report)
    stem = reports.report_stem("autoattack", "latest", "l2", eps, attacks=("apgd-dlr", "apgd-ce"))
    assert stem.startswith("eval_autoattack-apgd-dlr+apgd-ce_l2_")


def test_autoattack_plus_runs_six_attacks_finds_the_exact_robust_set_and_is_named_plus():
    """``version="plus"`` (2 restarts here): the reference's six attacks in its order, the
    exact robust set of the linear model, its own metric and stem, and the cut budget said."""
    budget = Budget(n_iter=20, n_target_classes=4, n_queries=50, n_restarts=2)
    dist, eps, report = _linear_autoattack(budget=budget, version="plus")
    name = f"autoattack-plus_l2_{format_eps(eps)}"
    assert list(report["accuracy"]) == ["clean", name]
    assert list(report["autoattack"]["stages"]) == list(aa.PLUS_ATTACKS)
    assert report["attacks"][name]["version"] == "plus"
    assert report["attacks"][name]["n_restarts"] == 2
    clean = report["masks"]["clean"]
    np.testing.assert_array_equal(report["masks"][name], clean & (dist > eps))
    assert any("reduced AutoAttack budget" in w and "plus" in w for w in report["warnings"])
    assert not any("custom" in w for w in report["warnings"])
    assert "AutoAttack plus (n_iter 20, n_queries 50, n_restarts 2)" in reports.markdown(report)
    stem = reports.report_stem
    assert stem("autoattack", attacks=aa.PLUS_ATTACKS) == "eval_autoattack-plus_linf_8_255"
    assert stem("autoattack", budget=budget, attacks=aa.PLUS_ATTACKS).endswith("_q50_r2")
    with pytest.raises(ValueError, match="for others use 'custom'"):
        robustness.evaluate(linear_logits, {}, dist, dist, version="plus", attacks=["fab"])
    with pytest.raises(ValueError, match="random at test time"):
        robustness.evaluate(linear_logits, {}, dist, dist, suite="autoattack", version="rand")


def test_the_clean_suite_is_the_clean_accuracy_alone():
    rng = np.random.default_rng(2)
    variables = {"w": rng.normal(size=(16, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    x = rng.uniform(0, 1, size=(8, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    report = robustness.evaluate(linear_logits, variables, x, y, suite="clean", batch_size=8)
    correct = np.asarray(linear_logits(variables, x)).argmax(-1) == y
    assert list(report["accuracy"]) == ["clean"] and "autoattack" not in report
    np.testing.assert_array_equal(report["masks"]["clean"], correct)


def test_sanity_checks_reach_the_report():
    """A model returning probabilities is flagged (and evaluated nonetheless)."""
    rng = np.random.default_rng(1)
    variables = {"w": rng.normal(size=(16, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    x = rng.uniform(0, 1, size=(8, 4, 4, 1)).astype(np.float32)
    y = np.zeros(8, np.int32)
    report = robustness.evaluate(
        lambda v, xb: jax.nn.softmax(linear_logits(v, xb)),
        variables,
        x,
        y,
        suite="autoattack",
        batch_size=8,
        budget=Budget(n_iter=2, n_target_classes=4, n_queries=5),
        unroll=1,
    )
    assert any("probability" in w for w in report["warnings"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"suite": "strong"}, "unknown suite"),
        ({"suite": "autoattack", "norm": "l1"}, "Unknown norm"),
        ({"eps": 8 / 255}, "AutoAttack budget"),
        ({"suite": "clean", "norm": "l2"}, "AutoAttack budget"),
        ({"suite": "autoattack", "attacks": ("apgd-ce", "pgd")}, "distinct names"),
        ({"suite": "autoattack", "attacks": ("apgd-ce", "apgd-ce")}, "distinct names"),
        ({"attacks": ("apgd-ce",)}, "use them with the autoattack or full suite"),
        ({"batch_size": 12}, "multiple of the device count"),
        ({"num_classes": 10}, "outputs 5 logits"),
    ],
)
def test_invalid_arguments_fail_before_any_attack(kwargs, message):
    variables = {"w": jnp.ones((16, 5)), "b": jnp.zeros(5)}
    x = np.zeros((8, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match=message):
        robustness.evaluate(linear_logits, variables, x, np.zeros(8, np.int32), **kwargs)


def test_report_stems_keep_autoattack_budgets_apart():
    stem = reports.report_stem
    assert stem("paper") == "eval_paper" and stem("paper", "best") == "eval_paper_best"
    assert stem("autoattack") == "eval_autoattack_linf_8_255"  # the default budget
    assert stem("autoattack", "latest", "linf", 2 / 255) == "eval_autoattack_linf_2_255"
    assert stem("full", 1248, "l2") == "eval_full_l2_0.5_step1248"
    assert stem("autoattack", "best", "l2", 0.25) == "eval_autoattack_l2_0.25_best"
    quick = Budget(n_iter=10, n_queries=100)  # a quick look keeps off the standard report
    assert stem("autoattack", "best", None, None, quick) == (
        "eval_autoattack_linf_8_255_it10_tc9_q100_best"
    )
    assert stem("autoattack", budget=Budget()) == "eval_autoattack_linf_8_255"
    # N points (the evaluation subset) never share a stem with all of them, nor with M.
    assert stem("paper", num_examples=1000) == "eval_paper_sub1000"
    assert stem("autoattack", "best", num_examples=500) == "eval_autoattack_linf_8_255_sub500_best"
    with pytest.raises(ValueError, match="norm"):
        stem("autoattack", norm="l3")
