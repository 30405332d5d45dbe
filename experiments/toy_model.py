"""SAM vs adversarial training on a linear classifier: a small, exactly analysable toy.

The setting is OUR OWN design. It is not the simplified model or the theorem of Wei, Zhu &
Zhang (2023, arXiv 2305.05392) or of Zhang et al. (ICML 2024, arXiv 2402.15152); it only
illustrates their claims (SAM alone raises robust accuracy over SGD without costing clean
accuracy; AT buys more robustness for less clean accuracy; both act as feature
perturbations, SAM's the weaker one) in a case where every quantity has a closed form.

Data (balanced labels ``y = +-1``, independent Gaussian coordinates)::

    x_0 ~ N(y * ROBUST_MEAN, ROBUST_STD^2)            one robust feature (large mean)
    x_j ~ N(y * NONROBUST_MEAN, NONROBUST_STD^2)       N_NONROBUST weak, non-robust features

Alone, the robust feature gives ``Phi(2/2) = 84%`` accuracy and an Linf perturbation of
0.1 barely moves it; each non-robust feature is nearly useless (signal 0.1, noise 1), but
50 of them together carry real signal (``Phi(0.1 * sqrt(50)) = 76%``), and an Linf
perturbation of ``eps = NONROBUST_MEAN`` cancels all of it.

Model ``f(x) = w.x + b`` with logistic loss ``l(m) = log(1 + exp(-m))`` on the margin
``m_i = y_i (w.x_i + b)``, trained by full-batch gradient descent with weight decay on
``w`` (decay applied after the SAM step, as in ``samrobust.sam``). Three trainers:

- SGD: gradient of the mean loss.
- AT (Linf, radius eps): the inner maximum is closed form for a linear model,
  ``min_{||d||_inf <= eps} y (w.(x+d) + b) = m - eps ||w||_1`` (Hoelder; worst ``d =
  -eps y sign(w)``), so AT minimises the mean of ``l(m_i - eps ||w||_1)``.
- SAM (L2, radius rho): ``e = rho g / ||g||`` with ``g`` the gradient over ``(w, b)``
  (``samrobust.sam.perturbation``), update with the gradient at ``(w, b) + e``. The ascent
  gradient is taken per group of ``m`` examples (m-sharpness, Foret et al. 2021); the
  descent gradient is always the full-batch mean. ``m = 1`` (per-example SAM) is the main
  SAM here; ``m = n`` (one perturbation for the whole batch) is reported alongside.

SAM as a feature perturbation. For a linear model ``(w + e_w).x + (b + e_b) = w.x + b +
e.x~`` with ``x~ = (x, 1)``: a weight perturbation changes margin ``i`` by ``y_i e.x~_i``,
exactly what an input perturbation ``d_i`` with ``w.d_i = e.x~_i`` does. The smallest such
``d_i`` has Linf norm ``|e.x~_i| / ||w||_1``, while AT's worst case moves every margin by
``eps ||w||_1``. So SAM acts as an input perturbation of (induced) Linf radius

    delta_i = -y_i e.x~_i / ||w||_1             (positive when SAM lowers the margin)

which is directly comparable with AT's ``eps``. With ``m = 1`` it is exact and simple:
``g_i = l'(m_i) y_i x~_i`` with ``l' < 0``, so ``e_i = -rho y_i x~_i / ||x~_i||``, the SAM
margin is ``m_i - rho ||x~_i||_2`` (also the exact max of the loss over the rho-ball) and
``delta_i = rho ||x~_i||_2 / ||w||_1``: SAM subtracts ``rho * ||x~||_2`` (weight radius x
input norm), AT subtracts ``eps * ||w||_1`` (input radius x weight dual norm). A second
measure, ``delta_loss``, is the radius at which the AT loss at SAM's weights equals SAM's
perturbed loss.

Evaluation is exact, not sampled: for ``x | y ~ N(y mu, diag(s^2))`` the attacked margin
``y (w.x + b) - eps ||w||_1`` is Gaussian, so clean (eps = 0) and Linf-robust accuracy at
``TEST_EPS`` are ``1/2 [Phi((w.mu - eps||w||_1 + b)/||s w||) + Phi((w.mu - eps||w||_1 -
b)/||s w||)]``.

Run: ``python -m experiments.toy_model --out=experiments/results`` (a few seconds on CPU)
writes ``toy_model.png``, ``toy_model.md`` and ``toy_model.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.sam import perturbation

Params = dict[str, jax.Array]

# ----------------------------------------------------------------------------------------
# Documented settings (all results in experiments/results/toy_model.* come from these).
# ----------------------------------------------------------------------------------------
SEED = 0
N_TRAIN = 1000
N_NONROBUST = 50
ROBUST_MEAN = 2.0  # large per-feature signal: the robust feature
ROBUST_STD = 2.0
NONROBUST_MEAN = 0.1  # tiny per-feature signal: flipped by an Linf perturbation of 0.1
NONROBUST_STD = 1.0
WEIGHT_DECAY = 0.05  # on w only, same for every trainer
LEARNING_RATE = 0.5
STEPS = 1000  # full-batch steps from w = 0, b = 0; lr constant, then linear decay to 0
TEST_EPS = 0.1  # Linf radius of the robust-accuracy evaluation (= NONROBUST_MEAN)
SAM_RHOS = (0.1, 0.3, 1.0, 3.0, 10.0)  # per-example SAM (m = 1)
FULL_BATCH_SAM_RHOS = (0.05, 0.1, 0.2, 0.3)  # m = N_TRAIN; larger rho does not converge
AT_EPSS = (0.025, 0.05, 0.1, 0.2)
COMPARED_RHO = 1.0  # the (SAM, AT) pair the claims are checked on
COMPARED_EPS = 0.1  # AT trained at the test radius, as in practice
CLEAN_TOLERANCE = 0.005  # "without hurting clean accuracy": at most 0.5 points lower
CHECK_SEEDS = (0, 1, 2, 3, 4)  # the compared pair re-run on fresh data draws


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything :func:`run` depends on; the defaults are the documented settings."""

    seed: int = SEED
    n_train: int = N_TRAIN
    n_nonrobust: int = N_NONROBUST
    robust_mean: float = ROBUST_MEAN
    robust_std: float = ROBUST_STD
    nonrobust_mean: float = NONROBUST_MEAN
    nonrobust_std: float = NONROBUST_STD
    weight_decay: float = WEIGHT_DECAY
    learning_rate: float = LEARNING_RATE
    steps: int = STEPS
    test_eps: float = TEST_EPS
    sam_rhos: tuple[float, ...] = SAM_RHOS
    full_batch_sam_rhos: tuple[float, ...] = FULL_BATCH_SAM_RHOS
    at_epss: tuple[float, ...] = AT_EPSS
    compared_rho: float = COMPARED_RHO
    compared_eps: float = COMPARED_EPS
    clean_tolerance: float = CLEAN_TOLERANCE
    check_seeds: tuple[int, ...] = CHECK_SEEDS


# ----------------------------------------------------------------------------------------
# Data and exact evaluation
# ----------------------------------------------------------------------------------------
def feature_moments(s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional mean ``mu`` (for y = +1) and per-coordinate std ``sd``."""
    mu = np.array([s.robust_mean] + [s.nonrobust_mean] * s.n_nonrobust)
    sd = np.array([s.robust_std] + [s.nonrobust_std] * s.n_nonrobust)
    return mu, sd


def sample(s: Settings, n: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """Draws ``n`` examples ``(x, y)``: ``y`` uniform in {-1, +1}, ``x ~ N(y mu, diag sd^2)``."""
    mu, sd = feature_moments(s)
    k_y, k_x = jax.random.split(jax.random.PRNGKey(seed))
    y = jnp.where(jax.random.bernoulli(k_y, 0.5, (n,)), 1.0, -1.0)
    x = y[:, None] * jnp.asarray(mu, jnp.float32) + jnp.asarray(sd, jnp.float32) * (
        jax.random.normal(k_x, (n, mu.size))
    )
    return x, y


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def population_accuracy(
    w: np.ndarray, b: float, mu: np.ndarray, sd: np.ndarray, eps: float = 0.0
) -> float:
    """Exact accuracy under the worst Linf perturbation of radius ``eps`` (0: clean).

    ``y (w.x + b) - eps ||w||_1`` given ``y`` is ``N(w.mu + y b - eps ||w||_1, ||sd * w||^2)``.
    """
    w = np.asarray(w, np.float64)
    b = float(b)
    scale = float(np.linalg.norm(sd * w))
    if scale == 0.0:
        return 0.5 * (float(b > 0) + float(b < 0))
    mean = float(w @ mu) - eps * float(np.abs(w).sum())
    return 0.5 * (_phi((mean + b) / scale) + _phi((mean - b) / scale))


# ----------------------------------------------------------------------------------------
# Losses, perturbations, training
# ----------------------------------------------------------------------------------------
def margins(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example margins ``y (w.x + b)``."""
    return y * (x @ params["w"] + params["b"])


def linf_adversarial_margins(params: Params, x: jax.Array, y: jax.Array, eps: float) -> jax.Array:
    """Closed-form worst-case margins in the Linf ball: ``y (w.x + b) - eps ||w||_1``."""
    return margins(params, x, y) - eps * jnp.sum(jnp.abs(params["w"]))


def logistic_loss(
    params: Params, x: jax.Array, y: jax.Array, eps: float | jax.Array = 0.0
) -> jax.Array:
    """Mean logistic loss; with ``eps > 0`` the exact Linf adversarial (AT) loss."""
    return jnp.mean(jax.nn.softplus(-linf_adversarial_margins(params, x, y, eps)))


def _groups(x: jax.Array, y: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    n = x.shape[0]
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {n} examples")
    return x.reshape(n // group_size, group_size, -1), y.reshape(n // group_size, group_size)


@functools.partial(jax.jit, static_argnames=("group_size",))
def sam_perturbations(
    params: Params, x: jax.Array, y: jax.Array, rho: float | jax.Array, group_size: int
) -> Params:
    """SAM weight perturbations ``e = rho g / ||g||``, one per group of ``group_size``.

    ``g`` is ``jax.grad`` of the group's mean loss over ``(w, b)``; returned leaves carry a
    leading group axis. In float32 a group whose margins all exceed about 90 has a gradient
    that underflows to 0, hence a zero perturbation (0.1% of the examples at rho = 10 here).
    """
    xg, yg = _groups(x, y, group_size)

    def one(xx: jax.Array, yy: jax.Array) -> Params:
        return perturbation(jax.grad(logistic_loss)(params, xx, yy), params, rho)

    return jax.vmap(one)(xg, yg)


@functools.partial(jax.jit, static_argnames=("group_size",))
def sam_margin_drops(
    params: Params, x: jax.Array, y: jax.Array, rho: float | jax.Array, group_size: int
) -> jax.Array:
    """``m_i(w, b) - m_i((w, b) + e_group(i))``: how much SAM lowers each training margin."""
    e = sam_perturbations(params, x, y, rho, group_size)
    xg, yg = _groups(x, y, group_size)
    change = yg * (jnp.einsum("gkd,gd->gk", xg, e["w"]) + e["b"][:, None])
    return -change.reshape(-1)


def _data_gradient(
    params: Params, x: jax.Array, y: jax.Array, method: str, radius: jax.Array, group_size: int
) -> Params:
    if method == "sgd":
        return jax.grad(logistic_loss)(params, x, y)
    if method == "at":
        return jax.grad(logistic_loss)(params, x, y, radius)
    if method == "sam":
        xg, yg = _groups(x, y, group_size)

        def one(xx: jax.Array, yy: jax.Array) -> Params:
            e = perturbation(jax.grad(logistic_loss)(params, xx, yy), params, radius)
            return jax.grad(logistic_loss)(jax.tree.map(jnp.add, params, e), xx, yy)

        # Equal group sizes: the mean over groups is the full-batch mean.
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), jax.vmap(one)(xg, yg))
    raise ValueError(f"unknown method {method!r}")


def update_direction(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    method: str,
    radius: jax.Array,
    group_size: int,
    weight_decay: float,
) -> Params:
    """The descent direction: data gradient (SGD / AT / SAM) plus weight decay on ``w``."""
    g = _data_gradient(params, x, y, method, radius, group_size)
    return {"w": g["w"] + weight_decay * params["w"], "b": g["b"]}


def lr_schedule(t: jax.Array, steps: int) -> jax.Array:
    """Learning-rate factor: 1 for the first half, then linear decay to 0.

    The decay lets the AT trainer (a subgradient method: ``||w||_1`` has kinks at 0) settle
    instead of oscillating around zero weights; smooth objectives have converged before it.
    """
    half = steps // 2
    return jnp.where(t < half, 1.0, (steps - t) / (steps - half))


@functools.partial(jax.jit, static_argnames=("method", "group_size", "steps"))
def _train_batched(
    x: jax.Array,
    y: jax.Array,
    radii: jax.Array,
    weight_decay: float,
    learning_rate: float,
    *,
    method: str,
    group_size: int,
    steps: int,
) -> tuple[Params, jax.Array]:
    def single(radius: jax.Array) -> tuple[Params, jax.Array]:
        params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}

        def direction(p: Params) -> Params:
            return update_direction(p, x, y, method, radius, group_size, weight_decay)

        def step(p: Params, t: jax.Array) -> tuple[Params, None]:
            d = direction(p)
            lr = learning_rate * lr_schedule(t, steps)
            return jax.tree.map(lambda a, g: a - lr * g, p, d), None

        params, _ = jax.lax.scan(step, params, jnp.arange(steps))
        d = direction(params)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(d)))
        return params, norm

    return jax.vmap(single)(radii)


def train(
    x: jax.Array,
    y: jax.Array,
    method: str,
    radii: jax.Array | tuple[float, ...],
    *,
    group_size: int = 1,
    weight_decay: float = WEIGHT_DECAY,
    learning_rate: float = LEARNING_RATE,
    steps: int = STEPS,
) -> tuple[Params, jax.Array]:
    """Full-batch GD from ``w = 0, b = 0`` for every radius in ``radii`` (vmapped).

    ``method`` is ``"sgd"`` (radius unused), ``"at"`` (Linf eps) or ``"sam"`` (rho, ascent
    per group of ``group_size``). Returns the batched final parameters and, per radius, the
    norm of the update direction at the end (about 0 when converged; SAM with one batch-wide
    perturbation and large ``rho`` oscillates instead).
    """
    return _train_batched(
        x,
        y,
        jnp.asarray(radii, jnp.float32),
        weight_decay,
        learning_rate,
        method=method,
        group_size=group_size,
        steps=steps,
    )


# ----------------------------------------------------------------------------------------
# Induced perturbation strength
# ----------------------------------------------------------------------------------------
def induced_linf_radius(
    params: Params, x: jax.Array, y: jax.Array, rho: float, group_size: int
) -> jax.Array:
    """Per-example ``delta_i = (SAM margin drop) / ||w||_1``, in Linf input units.

    AT with radius ``eps`` lowers every margin by exactly ``eps ||w||_1``, so ``delta_i`` is
    the Linf radius whose worst-case input perturbation moves margin ``i`` as SAM does.
    """
    return sam_margin_drops(params, x, y, rho, group_size) / jnp.sum(jnp.abs(params["w"]))


def loss_equivalent_radius(
    params: Params, x: jax.Array, y: jax.Array, rho: float, group_size: int
) -> float:
    """The ``delta`` at which the AT loss ``mean l(m_i - delta ||w||_1)`` equals SAM's loss.

    SAM's loss is the mean of ``l`` at each example's SAM-perturbed margin. The AT loss is
    increasing in ``delta``, so bisection finds it (negative if SAM raises the loss less
    than nothing, i.e. lowers it).
    """
    drops = np.asarray(sam_margin_drops(params, x, y, rho, group_size), np.float64)
    return _loss_equivalent_radius(params, x, y, drops)


def _loss_equivalent_radius(params: Params, x: jax.Array, y: jax.Array, drops: np.ndarray) -> float:
    m = np.asarray(margins(params, x, y), np.float64)
    l1 = float(np.abs(np.asarray(params["w"], np.float64)).sum())

    def loss(shift: np.ndarray | float) -> float:
        return float(np.mean(np.logaddexp(0.0, shift - m)))  # mean l(m - shift)

    target = loss(drops)
    lo, hi = -1.0, 1.0
    while loss(hi * l1) < target:
        hi *= 2.0
    while loss(lo * l1) > target:
        lo *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if loss(mid * l1) < target else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------
def _summaries(
    s: Settings,
    x: jax.Array,
    y: jax.Array,
    method: str,
    radii: tuple[float, ...],
    group_size: int,
) -> list[dict[str, Any]]:
    mu, sd = feature_moments(s)
    params, update_norms = train(
        x,
        y,
        method,
        jnp.asarray(radii),
        group_size=group_size,
        weight_decay=s.weight_decay,
        learning_rate=s.learning_rate,
        steps=s.steps,
    )
    rows = []
    for k, radius in enumerate(radii):
        p = {"w": params["w"][k], "b": params["b"][k]}
        w = np.asarray(p["w"], np.float64)
        row: dict[str, Any] = {
            "method": method,
            "radius": float(radius),
            "group_size": group_size if method == "sam" else None,
            "clean_acc": population_accuracy(w, float(p["b"]), mu, sd, 0.0),
            "robust_acc": population_accuracy(w, float(p["b"]), mu, sd, s.test_eps),
            "w_robust": float(w[0]),
            "w_nonrobust_mean": float(w[1:].mean()),
            "w_l1": float(np.abs(w).sum()),
            "w_l2": float(np.linalg.norm(w)),
            "w_mu_over_l1": float(w @ mu / np.abs(w).sum()),
            "b": float(p["b"]),
            "update_norm": float(update_norms[k]),
        }
        if method == "sam":
            drops = np.asarray(sam_margin_drops(p, x, y, radius, group_size), np.float64)
            delta = drops / row["w_l1"]  # = induced_linf_radius(p, x, y, radius, group_size)
            row["induced_radius_mean"] = float(delta.mean())
            row["induced_radius_frac_positive"] = float((delta > 0).mean())
            row["induced_radius_loss_equiv"] = _loss_equivalent_radius(p, x, y, drops)
            row["margin_drop_over_margin"] = float(
                drops.mean() / np.asarray(margins(p, x, y), np.float64).mean()
            )
        elif method == "at":
            row["induced_radius_mean"] = float(radius)
            row["induced_radius_loss_equiv"] = float(radius)
        rows.append(row)
    return rows


def _claims(
    s: Settings, sgd: dict[str, Any], sam: dict[str, Any], at: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    return {
        "clean_sam_ge_clean_sgd_minus_tol": {
            "holds": sam["clean_acc"] >= sgd["clean_acc"] - s.clean_tolerance,
            "values": [sam["clean_acc"], sgd["clean_acc"], s.clean_tolerance],
        },
        "robust_sam_gt_robust_sgd": {
            "holds": sam["robust_acc"] > sgd["robust_acc"],
            "values": [sam["robust_acc"], sgd["robust_acc"]],
        },
        "robust_at_gt_robust_sam": {
            "holds": at["robust_acc"] > sam["robust_acc"],
            "values": [at["robust_acc"], sam["robust_acc"]],
        },
        "clean_at_lt_clean_sam": {
            "holds": at["clean_acc"] < sam["clean_acc"],
            "values": [at["clean_acc"], sam["clean_acc"]],
        },
        "induced_radius_sam_lt_eps_at": {
            "holds": sam["induced_radius_mean"] < at["radius"],
            "values": [sam["induced_radius_mean"], at["radius"]],
        },
    }


def _pair(s: Settings, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    x, y = sample(s, s.n_train, seed)
    sgd = _summaries(s, x, y, "sgd", (0.0,), 1)[0]
    sam = _summaries(s, x, y, "sam", (s.compared_rho,), 1)[0]
    at = _summaries(s, x, y, "at", (s.compared_eps,), 1)[0]
    return sgd, sam, at


def run(settings: Settings | None = None, *, check_seeds: bool = True) -> dict[str, Any]:
    """Trains every model of the sweep on one data draw and checks the claims.

    Returns a JSON-ready dict: ``settings``, ``runs`` (one row per trained model: method,
    radius, SAM group size, exact clean / robust accuracy, weights, SAM's induced radius),
    ``claims`` (each with ``holds`` and the compared ``values``) for the pair
    (``compared_rho``, ``compared_eps``), and, with ``check_seeds``, the same claims on
    fresh data draws (``seed_checks``).
    """
    s = settings or Settings()
    if s.compared_rho not in s.sam_rhos or s.compared_eps not in s.at_epss:
        raise ValueError("compared_rho / compared_eps must be in the sweeps")
    x, y = sample(s, s.n_train, s.seed)
    sgd = _summaries(s, x, y, "sgd", (0.0,), 1)
    sam = _summaries(s, x, y, "sam", s.sam_rhos, 1)
    sam_full = _summaries(s, x, y, "sam", s.full_batch_sam_rhos, s.n_train)
    at = _summaries(s, x, y, "at", s.at_epss, 1)
    sam_star = next(r for r in sam if r["radius"] == s.compared_rho)
    at_star = next(r for r in at if r["radius"] == s.compared_eps)
    mu, sd = feature_moments(s)
    bayes_w = mu / sd**2  # Bayes-optimal (clean) direction for this Gaussian model
    mean_w = mu  # class-mean direction (per-example SAM tends to its sample version as rho grows)
    out: dict[str, Any] = {
        "settings": dataclasses.asdict(s),
        "reference": {
            "bayes_clean": population_accuracy(bayes_w, 0.0, mu, sd, 0.0),
            "bayes_robust": population_accuracy(bayes_w, 0.0, mu, sd, s.test_eps),
            "class_mean_clean": population_accuracy(mean_w, 0.0, mu, sd, 0.0),
            "class_mean_robust": population_accuracy(mean_w, 0.0, mu, sd, s.test_eps),
            "robust_feature_only": population_accuracy(np.eye(mu.size)[0], 0.0, mu, sd, s.test_eps),
        },
        "runs": sgd + sam + sam_full + at,
        "claims": _claims(s, sgd[0], sam_star, at_star),
        "full_batch_sam_claims": {
            f"rho={r['radius']}": _claims(s, sgd[0], r, at_star) for r in sam_full
        },
    }
    if check_seeds:
        out["seed_checks"] = {}
        for seed in s.check_seeds:
            p_sgd, p_sam, p_at = _pair(s, seed)
            out["seed_checks"][str(seed)] = {
                "claims": {k: v["holds"] for k, v in _claims(s, p_sgd, p_sam, p_at).items()},
                "clean": [p_sgd["clean_acc"], p_sam["clean_acc"], p_at["clean_acc"]],
                "robust": [p_sgd["robust_acc"], p_sam["robust_acc"], p_at["robust_acc"]],
                "sam_induced_radius": p_sam["induced_radius_mean"],
            }
    return out


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: str) -> None:
    """Two panels: clean vs robust accuracy; SAM's induced radius vs rho next to AT's eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    runs = results["runs"]
    sgd = [r for r in runs if r["method"] == "sgd"][0]
    sam = [r for r in runs if r["method"] == "sam" and r["group_size"] == 1]
    full = [r for r in runs if r["method"] == "sam" and r["group_size"] != 1]
    at = [r for r in runs if r["method"] == "at"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11.5, 4.6))

    def curve(
        rows: list[dict[str, Any]], label: str, fmt: str, name: str, offset: tuple[int, int]
    ) -> None:
        xs = [100 * sgd["clean_acc"]] + [100 * r["clean_acc"] for r in rows]
        ys = [100 * sgd["robust_acc"]] + [100 * r["robust_acc"] for r in rows]
        ax0.plot(xs, ys, fmt, label=label, alpha=0.85)
        for r, cx, cy in zip(rows, xs[1:], ys[1:], strict=True):
            if name == "rho (m=n)" and r is not rows[-1]:
                continue  # these sit on top of the SGD point; label the last one only
            ax0.annotate(
                f"{name}={r['radius']:g}",
                (cx, cy),
                fontsize=7,
                xytext=offset,
                textcoords="offset points",
            )

    curve(sam, "SAM, per-example (m=1), rho sweep", "o-", "rho", (4, 2))
    curve(full, "SAM, full batch (m=n), rho sweep", "s--", "rho (m=n)", (-62, -3))
    curve(at, "AT (Linf), eps sweep", "^-", "eps", (4, 2))
    pair = [
        next(r for r in sam if r["radius"] == s["compared_rho"]),
        next(r for r in at if r["radius"] == s["compared_eps"]),
    ]
    ax0.plot(
        [100 * r["clean_acc"] for r in pair],
        [100 * r["robust_acc"] for r in pair],
        "o",
        ms=14,
        mfc="none",
        mec="red",
        label="compared pair",
    )
    ax0.plot(100 * sgd["clean_acc"], 100 * sgd["robust_acc"], "k*", ms=13, label="SGD")
    ax0.set_xlabel("clean accuracy (%, exact)")
    ax0.set_ylabel(f"Linf robust accuracy at eps={s['test_eps']:g} (%, exact)")
    ax0.set_title("Linear toy (our design): accuracy vs robustness")
    ax0.legend(fontsize=8, loc="lower left")
    ax0.grid(alpha=0.3)

    ax1.plot(
        [r["radius"] for r in sam],
        [r["induced_radius_mean"] for r in sam],
        "o-",
        label="SAM m=1: mean margin drop / ||w||_1",
    )
    ax1.plot(
        [r["radius"] for r in sam],
        [r["induced_radius_loss_equiv"] for r in sam],
        "o:",
        label="SAM m=1: loss-equivalent radius",
    )
    ax1.plot(
        [r["radius"] for r in full],
        [r["induced_radius_mean"] for r in full],
        "s--",
        label="SAM m=n: mean margin drop / ||w||_1",
    )
    for k, r in enumerate(at):
        ax1.axhline(r["radius"], color=f"C{k + 3}", lw=1, ls="-.", label=f"AT eps={r['radius']:g}")
    ax1.plot(pair[0]["radius"], pair[0]["induced_radius_mean"], "o", ms=14, mfc="none", mec="red")
    ax1.set_xscale("log")
    ax1.set_xlabel("SAM rho (L2 radius in weight space)")
    ax1.set_ylabel("induced Linf input radius")
    ax1.set_title("SAM as an input perturbation vs AT's eps")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The results table and a plain statement of what this toy does and does not show."""
    s = results["settings"]
    ref = results["reference"]
    c = results["claims"]
    lines = [
        "# SAM vs AT on a linear toy model (our own design)",
        "",
        "Generated by `python -m experiments.toy_model --out=experiments/results`.",
        "",
        "**This setup is ours, not the paper's.** The simplified model and theorem of Wei, Zhu"
        " & Zhang (2023) / Zhang et al. (ICML 2024) are not reproduced here; this is a linear"
        " logistic classifier on Gaussian data that we designed to be exactly analysable. It"
        " illustrates the claims; it proves nothing about deep networks.",
        "",
        f"Data: y = +-1; one robust feature x_0 ~ N(y*{s['robust_mean']:g},"
        f" {s['robust_std']:g}^2) and {s['n_nonrobust']} non-robust features x_j ~"
        f" N(y*{s['nonrobust_mean']:g}, {s['nonrobust_std']:g}^2); {s['n_train']} training"
        f" examples (seed {s['seed']}). Model f(x) = w.x + b, logistic loss, full-batch GD"
        f" (lr {s['learning_rate']:g}, {s['steps']} steps from 0), weight decay"
        f" {s['weight_decay']:g} on w for every trainer. AT: exact Linf inner maximum"
        " (margin - eps ||w||_1). SAM: e = rho g/||g|| (`samrobust.sam.perturbation`), ascent"
        " gradient per example (m = 1, main) or over the whole batch (m = n). Accuracies are"
        f" exact population values; robust = worst case in the Linf ball of radius"
        f" {s['test_eps']:g}.",
        "",
        "The main SAM here is the per-example (m = 1, m-sharpness) form. With a single"
        " batch-wide perturbation (g summed over all examples) SAM gives no robustness gain"
        " in this toy; those rows are in the table too, and the last bullet below says so.",
        "",
        f"References: Bayes-optimal direction clean {_pct(ref['bayes_clean'])}% / robust"
        f" {_pct(ref['bayes_robust'])}%; class-mean direction {_pct(ref['class_mean_clean'])}%"
        f" / {_pct(ref['class_mean_robust'])}%; robust feature alone robust"
        f" {_pct(ref['robust_feature_only'])}%.",
        "",
        "| method | radius | clean % | robust % | w_0 | mean w_j (j>0) | L1 norm of w |"
        " induced Linf radius (mean) | loss-equiv. radius | final update norm* |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        name = {"sgd": "SGD", "at": "AT (Linf)"}.get(r["method"], "")
        if r["method"] == "sam":
            name = "SAM m=1" if r["group_size"] == 1 else f"SAM m={r['group_size']} (full)"
        radius = "-" if r["method"] == "sgd" else f"{r['radius']:g}"
        ind = r.get("induced_radius_mean")
        leq = r.get("induced_radius_loss_equiv")
        lines.append(
            f"| {name} | {radius} | {_pct(r['clean_acc'])} | {_pct(r['robust_acc'])} |"
            f" {r['w_robust']:.3f} | {r['w_nonrobust_mean']:.4f} | {r['w_l1']:.2f} |"
            f" {'-' if ind is None else f'{ind:.3f}'} | {'-' if leq is None else f'{leq:.3f}'}"
            f" | {r['update_norm']:.1e} |"
        )
    lines += [
        "",
        "\\* Norm of the final update direction (data gradient + weight decay); about 0 means"
        " converged. AT's loss has kinks where a weight is 0, so its subgradient stays"
        " nonzero there although the iterates have settled (the learning rate decays to 0;"
        " in our check, 4x more steps moved no accuracy by more than 1e-4).",
    ]
    yes = {True: "holds", False: "**does not hold**"}
    rho, eps = s["compared_rho"], s["compared_eps"]
    lines += [
        "",
        f"## Claims, checked on the pair SAM (m=1, rho={rho:g}) vs AT (eps={eps:g})",
        "",
        f"1. clean(SAM) >= clean(SGD) - {100 * s['clean_tolerance']:g} pt:"
        f" {_pct(c['clean_sam_ge_clean_sgd_minus_tol']['values'][0])} vs"
        f" {_pct(c['clean_sam_ge_clean_sgd_minus_tol']['values'][1])}:"
        f" {yes[c['clean_sam_ge_clean_sgd_minus_tol']['holds']]}.",
        f"2. robust(SAM) > robust(SGD): {_pct(c['robust_sam_gt_robust_sgd']['values'][0])} vs"
        f" {_pct(c['robust_sam_gt_robust_sgd']['values'][1])}:"
        f" {yes[c['robust_sam_gt_robust_sgd']['holds']]}.",
        f"3. robust(AT) > robust(SAM): {_pct(c['robust_at_gt_robust_sam']['values'][0])} vs"
        f" {_pct(c['robust_at_gt_robust_sam']['values'][1])}:"
        f" {yes[c['robust_at_gt_robust_sam']['holds']]}.",
        f"4. clean(AT) < clean(SAM): {_pct(c['clean_at_lt_clean_sam']['values'][0])} vs"
        f" {_pct(c['clean_at_lt_clean_sam']['values'][1])}:"
        f" {yes[c['clean_at_lt_clean_sam']['holds']]}.",
        f"5. SAM's induced Linf radius < AT's eps:"
        f" {c['induced_radius_sam_lt_eps_at']['values'][0]:.3f} vs {eps:g}:"
        f" {yes[c['induced_radius_sam_lt_eps_at']['holds']]}.",
        "",
    ]
    if "seed_checks" in results:
        lines += [
            "Same pair on fresh data draws (clean / robust %, SGD, SAM, AT; claims 1-5):",
            "",
            "| seed | SGD | SAM | AT | SAM induced radius | claims 1-5 |",
            "|---|---|---|---|---|---|",
        ]
        for seed, v in results["seed_checks"].items():
            cells = [f"{_pct(a)} / {_pct(b)}" for a, b in zip(v["clean"], v["robust"], strict=True)]
            marks = "".join("Y" if h else "n" for h in v["claims"].values())
            lines.append(
                f"| {seed} | {' | '.join(cells)} | {v['sam_induced_radius']:.3f} | {marks} |"
            )
        lines.append("")
    lines += _discussion(results)
    return "\n".join(lines) + "\n"


def _discussion(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    c = results["claims"]
    runs = results["runs"]
    sgd = [r for r in runs if r["method"] == "sgd"][0]
    sam = [r for r in runs if r["method"] == "sam" and r["group_size"] == 1]
    full = [r for r in runs if r["method"] == "sam" and r["group_size"] != 1]
    at = [r for r in runs if r["method"] == "at"]
    star = next(r for r in sam if r["radius"] == s["compared_rho"])
    below = [r for r in sam if r["induced_radius_mean"] < s["compared_eps"]]
    first4 = [c[k]["holds"] for k in list(c)[:4]]
    full_diff = [100 * (r["robust_acc"] - sgd["robust_acc"]) for r in full]
    sam_best = max(sam, key=lambda r: r["robust_acc"])
    at_star = next(r for r in at if r["radius"] == s["compared_eps"])
    at_match = min(at, key=lambda r: abs(r["clean_acc"] - sam_best["clean_acc"]))
    side = "above" if sam_best["robust_acc"] > at_match["robust_acc"] else "below"
    if all(first4):
        verdict = "claims 1-4 hold for the compared pair"
        if _all_seeds(results, range(4)):
            verdict += " and on every re-drawn data set"
    else:
        failed = [str(i + 1) for i, h in enumerate(first4) if not h]
        verdict = f"claim(s) {', '.join(failed)} do NOT hold for the compared pair"
    lines = [
        "## What this shows, plainly",
        "",
        "- Mechanism. Per-example SAM (m = 1) is exactly logistic regression with every margin"
        " lowered by rho * ||(x_i, 1)||_2; Linf AT lowers every margin by eps * ||w||_1. Both"
        " are margin (feature) perturbations, dual by Hoelder's inequality (weight radius x"
        " input norm vs input radius x weight dual norm). SAM's shift does not depend on w, so"
        " it only re-weights the examples toward equal weights, which turns the fit toward the"
        " class-mean direction (more weight on the large-mean robust feature than the"
        " logistic fit gives it, w_0 / mean w_j rising from"
        f" {sgd['w_robust'] / sgd['w_nonrobust_mean']:.1f} to"
        f" {star['w_robust'] / star['w_nonrobust_mean']:.1f} at rho = {star['radius']:g}) and"
        " scales w up; it never removes the non-robust weights. AT's shift grows with"
        " ||w||_1, an L1 pressure that drives the many small non-robust weights to zero"
        f" (ratio {at_star['w_robust'] / max(at_star['w_nonrobust_mean'], 1e-12):.1f} at"
        f" eps = {at_star['radius']:g}). Result: {verdict}.",
        f"- Over the sweep, SAM's best robust accuracy is {_pct(sam_best['robust_acc'])}% (rho"
        f" = {sam_best['radius']:g}, clean {_pct(sam_best['clean_acc'])}%), still below AT at"
        f" eps = {at_star['radius']:g} ({_pct(at_star['robust_acc'])}%). For large rho SAM"
        " starts to cost clean accuracy too, i.e. behaves like a weak AT. At matched clean"
        f" accuracy, though, SAM's curve lies {side}"
        f" AT's here (SAM rho = {sam_best['radius']:g}: {_pct(sam_best['clean_acc'])} /"
        f" {_pct(sam_best['robust_acc'])}% vs AT eps = {at_match['radius']:g}:"
        f" {_pct(at_match['clean_acc'])} / {_pct(at_match['robust_acc'])}%)"
        + (
            ": in this toy SAM is the better trade when clean accuracy matters most."
            if side == "above"
            else "."
        ),
        "- Claim 5, in the literal form 'SAM's induced input radius is smaller than AT's eps',"
        + (" holds" if c["induced_radius_sam_lt_eps_at"]["holds"] else " does **not** hold")
        + f" for the compared pair ({star['induced_radius_mean']:.3f} vs"
        f" {s['compared_eps']:g}). The induced radius is below eps = {s['compared_eps']:g}"
        " only for rho in "
        + (str([r["radius"] for r in below]) if below else "none of the sweep")
        + (
            f", where SAM's robustness gain is"
            f" {100 * (below[-1]['robust_acc'] - sgd['robust_acc']):+.2f} pt"
            if below
            else ""
        )
        + ". In this family of data that looks structural rather than a tuning failure: the"
        " mean induced radius is about"
        " (margin drop / margin) x (w.mu / ||w||_1), and w.mu / ||w||_1 is a |w|-weighted"
        " average of the feature means, so for a w with nonnegative entries it is at least"
        f" the smallest feature mean, {s['nonrobust_mean']:g} ({star['w_mu_over_l1']:.3f} at"
        f" rho = {star['radius']:g}, where the drop is {star['margin_drop_over_margin']:.2f}"
        " of the mean margin). A margin drop large enough to change the fit therefore has an"
        " induced radius of the order of the eps at which AT already removes the non-robust"
        " features. What is weaker in this toy is the effect per unit of induced radius (a"
        " w-independent re-weighting vs an L1 penalty), not the radius.",
        "- SAM with one perturbation for the whole batch (m = n) changes robust accuracy by"
        f" {min(full_diff):+.2f} to {max(full_diff):+.2f} pt over rho ="
        f" {[r['radius'] for r in full]}: no real gain (||w||_1 grows from"
        f" {sgd['w_l1']:.2f} to {full[-1]['w_l1']:.2f} and w_0 / mean w_j moves from"
        f" {sgd['w_robust'] / sgd['w_nonrobust_mean']:.1f} to"
        f" {full[-1]['w_robust'] / full[-1]['w_nonrobust_mean']:.1f}, i.e. not toward the"
        " robust feature). Its induced radius is small"
        f" ({min(r['induced_radius_mean'] for r in full):.3f} to"
        f" {max(r['induced_radius_mean'] for r in full):.3f}) but so is its effect. In our"
        " trials it stopped converging (oscillating) for rho around 1, so the sweep stops at"
        " 0.3. The robustness benefit in this toy comes"
        " from the per-example (m-sharpness) form only.",
    ]
    return lines


def _all_seeds(results: dict[str, Any], idx: range) -> bool:
    checks = results.get("seed_checks")
    if not checks:
        return False
    names = list(next(iter(checks.values()))["claims"])
    return all(v["claims"][names[i]] for v in checks.values() for i in idx)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (``argv``: default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results", help="output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``--out DIR`` writes ``toy_model.png``, ``toy_model.md``, ``toy_model.json``."""
    args = parse_args(argv)
    results = run()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy_model.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "toy_model.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(args.out, "toy_model.png"))
    for name, claim in results["claims"].items():
        print(f"{name}: {'holds' if claim['holds'] else 'does NOT hold'} {claim['values']}")
    return results


if __name__ == "__main__":
    main()
