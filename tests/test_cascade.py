"""The AutoAttack cascade (samrobust.autoattack.cascade): its semantics with scripted
stages, exact robust sets of a linear model (one device and sharded), packed = unpacked,
resuming from a journal, and a trained MLP."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samrobust import autoattack as aa
from samrobust.attacks import input_loss, pgd
from samrobust.autoattack.base import Stage
from samrobust.autoattack.cascade import make_stages
from tests.toy_models import D, H, analytic_distance, assert_valid, linear_model


def _scripted_stage(name: str, points: set[int], delta: float, n: int) -> Stage:
    """A stage that 'fools' ``points`` (identified by a tag pixel) by moving x_1 up by
    ``delta``, and claims to have fooled them."""
    idx = jnp.asarray(sorted(points) or [-1])

    def init(model, xb, yb, keys, j):
        ids = jnp.round(xb[:, 3, 3, 0] * 1000).astype(jnp.int32) - 100
        hit = jnp.isin(ids, idx)
        adv = xb.at[:, 0, 1, 0].add(jnp.where(hit, delta, 0.0))
        return {"x": xb, "y": yb, "adv": adv, "fooled": hit}

    return Stage(name, n_runs=1, n_steps=1, init=init, step=lambda m, s, i: s, segment=1)


def test_cascade_counts_a_point_robust_only_if_every_attack_failed():
    """Scripted stages: each 'fools' a fixed set; points outside the ball are refused."""
    # class = argmax(x_0, x_1); a pytree model, passed to the jitted stages as an argument
    f = jax.tree_util.Partial(
        lambda w, xb: xb.reshape(xb.shape[0], -1) @ w, jnp.eye(D, 2, dtype=jnp.float32)
    )
    n = 10
    x = np.full((n, H, H, 1), 0.5, np.float32)
    x[:, 0, 0, 0] = 0.6  # class 0 with margin 0.1
    y = np.zeros(n, np.int32)
    x[9, 0, 1, 0] = 0.7  # point 9 is misclassified from the start
    for i in range(n):
        x[i, 3, 3, 0] = (100 + i) / 1000  # tag each point with its index
    eps = 0.15
    stages = [
        _scripted_stage("a", {0, 1}, 0.12, n),  # fools 0 and 1 within eps
        _scripted_stage("b", {1, 2, 3}, 0.3, n),  # out of the ball: refused
        _scripted_stage("c", {3, 4}, 0.12, n),
        _scripted_stage("d", {4, 9}, 0.12, n),  # 9 was never robust
    ]
    res = aa.run_cascade(
        f, x, y, jax.random.key(0), stages, eps=eps, norm="linf", batch_size=4, unroll=1
    )
    np.testing.assert_array_equal(res.clean, np.arange(n) != 9)
    expected = {
        "a": {2, 3, 4, 5, 6, 7, 8},
        "b": {2, 3, 4, 5, 6, 7, 8},
        "c": {2, 5, 6, 7, 8},
        "d": {2, 5, 6, 7, 8},
    }
    for name, robust_set in expected.items():
        assert set(np.flatnonzero(res.stages[name])) == robust_set, name
    assert res.rejected == {"a": 0, "b": 2, "c": 0, "d": 0}  # 1 was already fooled
    assert res.attacked == {"a": 9, "b": 7, "c": 7, "d": 5}
    np.testing.assert_array_equal(res.robust, res.stages["d"])
    np.testing.assert_array_equal(res.x_adv[res.robust], x[res.robust])
    np.testing.assert_array_equal(res.x_adv[9], x[9])
    assert res.max_perturbation == pytest.approx(0.12, abs=1e-6)
    assert_valid(x, res.x_adv, eps, "linf")


def test_a_long_batch_logs_its_progress(monkeypatch, caplog):
    """A batch that runs longer than PROGRESS_SECONDS logs its step and the points left."""
    f = jax.tree_util.Partial(
        lambda w, xb: xb.reshape(xb.shape[0], -1) @ w, jnp.eye(D, 2, dtype=jnp.float32)
    )
    x = np.full((3, H, H, 1), 0.5, np.float32)
    x[:, 0, 0, 0] = 0.6
    stage = dataclasses.replace(_scripted_stage("slow", set(), 0.0, 3), n_steps=4)
    monkeypatch.setattr(aa.cascade, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO)
    aa.run_cascade(f, x, np.zeros(3, np.int32), jax.random.key(0), [stage], eps=0.1, norm="linf")
    lines = [r.getMessage() for r in caplog.records if "points still robust" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == [
        f"autoattack slow run 1: step {i}/4" for i in (1, 2, 3)
    ]
    assert all("3 of 3 points still robust" in line for line in lines)


def _check_cascade(res, f, x, y, eps, norm):
    x_adv, robust = np.asarray(res.x_adv), np.asarray(res.robust)
    names = list(res.stages)
    assert names == list(aa.STANDARD_ATTACKS)
    prev = np.asarray(res.clean)
    for name in names:  # robust sets only shrink
        cur = np.asarray(res.stages[name])
        assert np.all(cur <= prev), name
        prev = cur
    np.testing.assert_array_equal(robust, prev)
    pred = np.argmax(np.asarray(f(jnp.asarray(x_adv))), axis=1)
    assert np.all(pred[~robust] != y[~robust])  # every non-robust point is fooled (or was)
    np.testing.assert_array_equal(x_adv[robust], x[robust])
    assert_valid(x, x_adv, eps, norm)
    assert float(res.max_perturbation) <= eps + 1e-6


def test_autoattack_on_a_trained_mlp_orders_clean_pgd_autoattack(mlp):
    f, x, y = mlp
    eps = 0.06
    key = jax.random.PRNGKey(0)
    clean = np.mean(np.argmax(np.asarray(f(x)), axis=1) == y)
    x_pgd = jax.jit(
        lambda x, y, k: pgd(input_loss(f), x, y, k, eps=eps, step_size=eps / 4, steps=10, unroll=1)
    )(x, y, key)
    pgd_acc = np.mean(np.argmax(np.asarray(f(x_pgd)), axis=1) == y)
    res = aa.autoattack(
        f,
        x,
        y,
        key,
        eps=eps,
        norm="linf",
        budget=aa.Budget(n_iter=20, n_target_classes=3, n_queries=200),
        batch_size=16,
        unroll=1,
    )
    assert res.clean_accuracy == pytest.approx(clean)
    assert clean > pgd_acc >= res.robust_accuracy > 0
    assert np.mean(res.stages["apgd-ce"]) <= pgd_acc  # APGD-CE alone matches PGD
    _check_cascade(res, f, x, y, eps, "linf")
    assert not aa.sanity_checks(f, x, y, result=res, n_target_classes=3)


@pytest.mark.parametrize("sharded", [False, True])
def test_cascade_is_exact_on_a_linear_model(linear5, sharded):
    """L2: robust iff the analytic distance exceeds eps, on one device and sharded over the
    8 CPU devices of the tests."""
    w, x, y = linear5
    f = linear_model(w)
    dist = analytic_distance(w, x, y, "l2")
    eps = float(np.median(dist))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    res = aa.autoattack(
        f,
        x,
        y,
        jax.random.key(0),
        eps=eps,
        norm="l2",
        budget=aa.Budget(n_iter=20, n_target_classes=4, n_queries=100),
        batch_size=8,
        runner=aa.Sharded(mesh) if sharded else aa.Local(),
    )
    _check_cascade(res, f, x, y, eps, "l2")
    clear = np.abs(dist / eps - 1) > 0.02
    np.testing.assert_array_equal(res.robust[clear], (dist > eps)[clear])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_packed_cascade_equals_unpacked(mlp, norm):
    """Dropping fooled points and repacking the rest changes no point's result: the same
    robust set after every attack as fixed batches run to the end. (The adversarials may
    differ: a packed run keeps a point's fooling iterate from when it was dropped.)"""
    f, x, y = mlp
    eps = 0.08 if norm == "linf" else 0.3
    budget = aa.Budget(n_iter=20, n_target_classes=3, n_queries=200)
    runs = [
        aa.autoattack(
            f,
            x,
            y,
            jax.random.key(3),
            eps=eps,
            norm=norm,
            budget=budget,
            batch_size=32,
            compact=compact,
            unroll=1,
        )
        for compact in (True, False)
    ]
    packed, unpacked = runs
    assert 0 < packed.robust.sum() < packed.clean.sum()  # some points fooled, some not
    for name in aa.STANDARD_ATTACKS:
        np.testing.assert_array_equal(packed.stages[name], unpacked.stages[name], err_msg=name)
    for res in runs:
        _check_cascade(res, f, x, y, eps, norm)


def test_a_journal_resumes_an_interrupted_cascade(mlp, tmp_path):
    """An evaluation stopped after a few batches continues from its journal and ends with
    the result of an uninterrupted one."""
    f, x, y = mlp
    kw = dict(
        eps=0.08,
        norm="linf",
        budget=aa.Budget(n_iter=10, n_target_classes=3, n_queries=100),
        batch_size=16,
        unroll=1,
    )
    full = aa.autoattack(f, x, y, jax.random.key(5), **kw)

    class StopError(Exception):
        pass

    class Interrupted(aa.Journal):
        def record(self, stage, run, batch, **arrays):
            super().record(stage, run, batch, **arrays)
            if stage == "apgd-t" and run == 1:
                raise StopError

    settings = {"test": 1}
    with pytest.raises(StopError):
        aa.autoattack(f, x, y, jax.random.key(5), journal=Interrupted(tmp_path, settings), **kw)
    journal = aa.Journal(tmp_path, settings)
    assert len(list(journal.path.glob("*.npz"))) >= 3
    resumed = aa.autoattack(f, x, y, jax.random.key(5), journal=journal, **kw)
    assert resumed.resumed >= 3
    for name in aa.STANDARD_ATTACKS:
        np.testing.assert_array_equal(resumed.stages[name], full.stages[name], err_msg=name)
    np.testing.assert_allclose(resumed.x_adv, full.x_adv, atol=1e-6)
    # Other settings: another folder, nothing reused.
    assert aa.Journal(tmp_path, {"test": 2}).load("apgd-ce", 0) == []


def test_the_plus_version_has_the_references_attacks_order_and_budgets():
    """Against ``pyautoattack.AutoAttack(version="plus")``'s own settings: the attacks and
    their order, restarts and targets; and the runs each of our stages makes of them."""
    torch = pytest.importorskip("torch")
    pyaa = pytest.importorskip("pyautoattack", reason="pyautoattack is not installed")
    ref = pyaa.AutoAttack(torch.nn.Linear(4, 10), norm="Linf", eps=0.03, version="plus")
    assert tuple(ref.attacks_to_run) == aa.PLUS_ATTACKS
    assert ref.apgd.n_restarts == ref.fab.n_restarts == aa.PLUS_BUDGET.n_restarts == 5
    assert ref.apgd_targeted.n_restarts == 1  # and fab-t's, set when it runs
    assert ref.apgd_targeted.n_target_classes == ref.fab.n_target_classes == 9
    assert ref.square.n_queries == aa.PLUS_BUDGET.n_queries
    assert ref.apgd.n_iter == ref.fab.n_iter == aa.PLUS_BUDGET.n_iter
    stages = make_stages(
        aa.PLUS_ATTACKS, eps=0.03, norm="linf", budget=aa.PLUS_BUDGET, num_classes=10
    )
    assert [(s.name, s.n_runs) for s in stages] == [
        ("apgd-ce", 5),
        ("apgd-dlr", 5),
        ("fab", 5),
        ("square", 1),
        ("apgd-t", 9),
        ("fab-t", 9),
    ]
    rand = pyaa.AutoAttack(torch.nn.Linear(4, 10), norm="Linf", eps=0.03, version="rand")
    assert tuple(rand.attacks_to_run) == aa.RAND_ATTACKS
    assert rand.apgd.eot_iter == aa.RAND_BUDGET.eot_iter == 20
    assert rand.apgd.n_restarts == aa.RAND_BUDGET.n_restarts == 1
    assert aa.resolve_version(None, None, None) == (aa.STANDARD_ATTACKS, aa.STANDARD_BUDGET)
    assert aa.resolve_version("plus", None, None) == (aa.PLUS_ATTACKS, aa.PLUS_BUDGET)
    assert aa.resolve_version(None, ["fab"], None) == (("fab",), aa.STANDARD_BUDGET)
    with pytest.raises(ValueError, match="needs its list of attacks"):
        aa.resolve_version("custom", None, None)
    with pytest.raises(ValueError, match="Unknown AutoAttack version 'random'"):
        aa.resolve_version("random", None, None)


def _noisy_linear(w, x, key):
    """A linear model whose logits carry a little Gaussian noise at test time."""
    z = x.reshape(x.shape[0], -1) @ w
    return z + 1e-4 * jax.random.normal(key, z.shape)


def test_rand_on_a_randomized_model_matches_its_attacks_on_the_mean_model(linear5):
    """``version="rand"`` on a model random at test time (a linear model with logit noise
    far below every point's margin): APGD-CE then APGD-DLR, gradients averaged over draws,
    fool exactly the points the same two attacks fool on the noise-free model, and no point
    farther than eps from the boundary; rand and ``RandomizedModel`` go together."""
    w, x, y = linear5
    dist = analytic_distance(w, x, y, "linf")
    eps = float(np.sort(dist)[7] + np.sort(dist)[8]) / 2  # between two points' distances
    partial = jax.tree_util.Partial(_noisy_linear, jnp.asarray(w))
    model = aa.RandomizedModel(partial, jax.random.key(1))
    kw = dict(eps=eps, norm="linf", batch_size=16, unroll=1)
    budget = aa.Budget(n_iter=20, eot_iter=4)
    res = aa.autoattack(model, x, y, jax.random.key(0), version="rand", budget=budget, **kw)
    assert list(res.stages) == list(aa.RAND_ATTACKS)
    mean_model = aa.autoattack(
        linear_model(w),
        x,
        y,
        jax.random.key(0),
        attacks=aa.RAND_ATTACKS,
        budget=aa.Budget(n_iter=20),
        **kw,
    )
    np.testing.assert_array_equal(res.robust, mean_model.robust)
    assert np.all(res.robust[dist > eps]) and res.robust.sum() < len(y)
    with pytest.raises(ValueError, match="RandomizedModel"):
        aa.autoattack(model, x, y, jax.random.key(0), **kw)  # standard on a random model
    with pytest.raises(ValueError, match="RandomizedModel"):
        aa.autoattack(linear_model(w), x, y, jax.random.key(0), version="rand", **kw)


def test_invalid_arguments():
    f = linear_model(np.ones((D, 3), np.float32))
    x = jnp.full((2, H, H, 1), 0.5)
    y = jnp.zeros(2, jnp.int32)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="norm"):
        aa.apgd(f, x, y, key, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        aa.apgd(f, x, y, key, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="Unknown attacks"):
        aa.autoattack(f, x, y, key, eps=0.1, attacks=("apgd-ce", "apgd-dlr-rand"))
    with pytest.raises(ValueError, match="budget"):
        aa.Budget(n_iter=0)
    with pytest.raises(ValueError, match="device count"):
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
        aa.autoattack(f, x, y, key, eps=0.1, batch_size=4, runner=aa.Sharded(mesh))
    with pytest.raises(ValueError, match="NHWC"):
        aa.square_attack(f, x.reshape(2, -1), y, key, eps=0.1)
