"""Robustness evaluation, the library: clean accuracy, PGD and AutoAttack of any
``logits_fn`` + variables (a training run's checkpoints through :mod:`samrobust.runs`).

Suites (test inputs in ``[0, 1]``, model in eval mode, every attack data parallel over all
devices, per-example masks kept so that runs can be compared point by point):

- ``clean``: clean accuracy only (e.g. to check an imported checkpoint before attacking it).
- ``paper`` (the paper's protocol): clean accuracy and PGD-10 with random start at
  Linf 1/255 (step 0.25/255), Linf 2/255 (0.5/255), L2 16/255 (2/255), L2 32/255 (4/255).
- ``autoattack``: clean accuracy and AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square;
  :mod:`samrobust.autoattack`) at ``eps`` in ``norm``. Defaults: Linf 8/255, L2 0.5 (the
  RobustBench CIFAR budgets, also used for SVHN and, for want of one, the digits).
- ``full``: ``paper`` + ``autoattack`` + PGD-20 with random start and step eps/4, on the
  cross-entropy and on the Carlini-Wagner margin, at Linf 4/255 and 8/255.

Accuracy under PGD is the accuracy at the final iterate (the paper's metric). Under
AutoAttack a point is robust if it is correctly classified and no attack returned an
adversarial that :func:`samrobust.attacks.is_adversarial` accepts; the cascade runs over
all devices (:class:`samrobust.autoattack.Sharded`) and, given a journal directory,
records every finished batch so that an interrupted evaluation resumes. The reference's
sanity checks end every suite (:func:`samrobust.autoattack.sanity_checks`); findings go to
``logging.warning`` and to the report's ``warnings``, as do a reduced AutoAttack budget and
refused adversarials.

Python, on any model::

  report = evaluate(model_logits_fn(model.apply), variables, images, labels,
                    suite="autoattack", eps=8 / 255, norm="linf")
  report["accuracy"]  # {"clean": ..., "autoattack_linf_8/255": ...}

:func:`samrobust.runs.load_run` restores a training run (``samrobust.main``) for it,
:mod:`samrobust.reports` names and writes reports, and ``python -m samrobust.evaluate`` is
the command line.
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from samrobust import autoattack as aa
from samrobust.attacks import PGDSpec, check_norm, format_eps
from samrobust.correctness import ApplyFn, correctness, make_correct_fn
from samrobust.parallel import default_mesh, replicate

SUITES = ("clean", "paper", "autoattack", "full")
AUTOATTACK_SUITES = ("autoattack", "full")  # the suites that run AutoAttack
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
RAND_IS_FOR_RANDOM_MODELS = (
    "AutoAttack rand (expectation over draws) is for models random at test time; these "
    "suites evaluate deterministic models: use standard or plus, or call "
    "samrobust.autoattack.autoattack on a RandomizedModel"
)

PAPER_SUITE = (
    PGDSpec("linf", 1 / 255, 0.25 / 255),
    PGDSpec("linf", 2 / 255, 0.5 / 255),
    PGDSpec("l2", 16 / 255, 2 / 255),
    PGDSpec("l2", 32 / 255, 4 / 255),
)
FULL_EXTRA = tuple(
    PGDSpec("linf", e / 255, e / 4 / 255, steps=20, loss=loss)
    for e in (4, 8)
    for loss in ("ce", "cw")
)
SUITE_PGD = {"clean": (), "paper": PAPER_SUITE, "autoattack": (), "full": PAPER_SUITE + FULL_EXTRA}


def model_logits_fn(apply_fn: Callable) -> ApplyFn:
    """Eval-mode logits of a Flax model with BatchNorm: ``apply_fn(variables, x, train=False)``."""
    return lambda variables, x: apply_fn(variables, x, train=False)


def pgd_suite(
    logits_fn: ApplyFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    specs: Sequence[PGDSpec] = PAPER_SUITE,
    batch_size: int = 256,
    seed: int = 0,
    mesh: Mesh | None = None,
    unroll: int | None = None,
) -> dict[str, Any]:
    """Clean and PGD accuracies; returns ``{"accuracy": {...}, "masks": {...}, "images_per_s"}``.

    ``batch_size`` is global and must divide by the device count. ``unroll``: see
    :func:`samrobust.correctness.make_correct_fn`.
    """
    mesh = mesh or default_mesh()
    variables = replicate(variables, mesh)
    key = jax.random.key(seed)
    accuracy, masks, rates = {}, {}, {}
    for spec in (None, *specs):
        name = "clean" if spec is None else spec.name
        fn = make_correct_fn(logits_fn, spec, mesh, unroll)
        correctness(
            fn,
            variables,
            images[:batch_size],
            labels[:batch_size],
            key,
            batch_size=batch_size,
            mesh=mesh,
        )  # compile outside the timing
        start = time.perf_counter()
        mask = correctness(
            fn, variables, images, labels, key, batch_size=batch_size, mesh=mesh, name=name
        )
        rates[name] = len(images) / (time.perf_counter() - start)
        accuracy[name], masks[name] = float(mask.mean()), mask
        logging.info("eval %-28s accuracy %.4f  (%.0f img/s)", name, accuracy[name], rates[name])
    return {"accuracy": accuracy, "masks": masks, "images_per_s": rates}


# --------------------------------------------------------------------------------------------
# AutoAttack
# --------------------------------------------------------------------------------------------


def autoattack_suite(
    logits_fn: ApplyFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float,
    norm: str = "linf",
    budget: aa.Budget = aa.STANDARD_BUDGET,
    batch_size: int = 256,
    seed: int = 0,
    mesh: Mesh | None = None,
    unroll: int | None = None,
    journal: aa.Journal | None = None,
    attacks: Sequence[str] = aa.STANDARD_ATTACKS,
) -> aa.AutoAttackResult:
    """AutoAttack (``attacks``: the standard four, or a custom version) with every batch
    split over ``mesh``
    (:func:`samrobust.autoattack.autoattack` with a :class:`~samrobust.autoattack.Sharded`
    runner); ``batch_size`` is global."""
    mesh = mesh or default_mesh()
    model = jax.tree_util.Partial(logits_fn, replicate(variables, mesh))
    return aa.autoattack(
        model,
        images,
        labels,
        jax.random.fold_in(jax.random.key(seed), 1),  # not PGD's stream
        eps=eps,
        norm=norm,
        budget=budget,
        batch_size=batch_size,
        runner=aa.Sharded(mesh),
        unroll=unroll,
        journal=journal,
        attacks=attacks,
    )


def journal_settings(images: np.ndarray, labels: np.ndarray, **settings: Any) -> dict[str, Any]:
    """What makes two AutoAttack evaluations the same (a :class:`~samrobust.autoattack.
    Journal` resumes only the same one): the points (hashed) and ``settings``."""
    digest = hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return {"points": digest.hexdigest(), "num_examples": len(images), **settings}


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def check_settings(
    suite: str,
    eps: float | None,
    norm: str | None,
    batch_size: int,
    num_devices: int,
    attacks: Sequence[str] = aa.STANDARD_ATTACKS,
) -> tuple[float | None, str | None]:
    """``(eps, norm)`` of AutoAttack (the defaults filled in: Linf, :data:`DEFAULT_EPS`;
    ``(None, None)`` for the suites without AutoAttack) for :func:`evaluate`'s settings;
    a ``ValueError`` naming what is wrong."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {SUITES}")
    if suite not in AUTOATTACK_SUITES and (eps is not None or norm is not None):
        raise ValueError(
            "eps and norm set the AutoAttack budget: use them with the autoattack or full suite"
        )
    aa.check_attacks(attacks)
    if suite not in AUTOATTACK_SUITES and tuple(attacks) != aa.STANDARD_ATTACKS:
        raise ValueError("attacks choose AutoAttack's: use them with the autoattack or full suite")
    norm = norm or "linf"
    check_norm(norm)
    if batch_size <= 0 or batch_size % num_devices:
        raise ValueError(
            f"batch size {batch_size} must be a positive multiple of the device count "
            f"{num_devices} (e.g. {num_devices * max(1, batch_size // num_devices)})"
        )
    if suite not in AUTOATTACK_SUITES:
        return None, None
    return (DEFAULT_EPS[norm] if eps is None else eps), norm


def evaluate(
    logits_fn: ApplyFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    suite: str = "paper",
    eps: float | None = None,
    norm: str | None = None,
    num_classes: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    mesh: Mesh | None = None,
    budget: aa.Budget | None = None,
    unroll: int | None = None,
    journal_dir: str | epath.Path | None = None,
    attacks: Sequence[str] | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """Runs ``suite`` (see the module docstring) on ``logits_fn(variables, x) -> logits``.

    ``eps``/``norm`` set the AutoAttack budget (default Linf 8/255 or L2 0.5; only for the
    :data:`AUTOATTACK_SUITES`). ``num_classes`` is checked against the model's output
    (inferred if None).
    ``batch_size`` is global and must divide by the device count. ``version``: AutoAttack's
    (:func:`samrobust.autoattack.resolve_version`: ``"standard"``, ``"plus"`` (metric
    ``autoattack-plus_...``) or ``"custom"``: ``attacks``, any of
    :data:`samrobust.autoattack.ATTACKS` in that order, metric ``autoattack-<a>+<b>_...``);
    a ``budget`` below the version's and a custom version are warned about. ``unroll``: PGD's
    ``fori_loop`` unroll (None: full on CPU) and
    AutoAttack's (:func:`samrobust.autoattack.cascade.iterations_per_call`). ``journal_dir``: where
    AutoAttack records finished batches, to resume an interrupted evaluation.
    Returns a dict: ``accuracy`` and ``images_per_s`` (by attack name, ``clean`` first),
    ``attacks`` (each name's budget), ``masks`` (per-example bool arrays; AutoAttack's also
    after each of its attacks, as ``<name>/<attack>``), ``autoattack`` (details, for the
    :data:`AUTOATTACK_SUITES`), ``warnings``, and the settings.
    """
    mesh = mesh or default_mesh()
    attacks, budget = aa.resolve_version(version, attacks, budget)
    if budget.eot_iter > 1:
        raise ValueError(RAND_IS_FOR_RANDOM_MODELS)
    eps, norm = check_settings(suite, eps, norm, batch_size, mesh.size, attacks)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    variables = replicate(variables, mesh)
    num_classes = _checked_num_classes(logits_fn, variables, images, labels, num_classes)

    specs = SUITE_PGD[suite]
    kw = dict(batch_size=batch_size, seed=seed, mesh=mesh, unroll=unroll)
    pgd = pgd_suite(logits_fn, variables, images, labels, specs=specs, **kw)
    report: dict[str, Any] = {
        "suite": suite,
        "num_examples": len(images),
        "num_classes": num_classes,
        "batch_size": batch_size,
        "seed": seed,
        "devices": mesh.size,
        "unroll": unroll,
        "accuracy": pgd["accuracy"],
        "images_per_s": pgd["images_per_s"],
        "attacks": {"clean": {"attack": "none"}} | {s.name: s.describe() for s in specs},
        "masks": pgd["masks"],
    }
    warnings, result = [], None
    if suite in AUTOATTACK_SUITES:
        journal = None
        if journal_dir is not None:
            journal = _journal(journal_dir, images, labels, eps, norm, seed, budget, attacks)
        result = autoattack_suite(
            logits_fn,
            variables,
            images,
            labels,
            eps=eps,
            norm=norm,
            budget=budget,
            journal=journal,
            attacks=attacks,
            **kw,
        )
        warnings += _add_autoattack(report, result, eps, norm, budget, journal, attacks)
    pgd_acc = [report["accuracy"][s.name] for s in specs]
    warnings += aa.sanity_checks(
        jax.tree_util.Partial(logits_fn, variables),
        images,
        labels,
        result=result,
        robust_accuracy=max(pgd_acc) if pgd_acc else None,
        n_target_classes=budget.n_target_classes,
        attacks=attacks if result is not None else (),
        batch_size=batch_size,
    )
    for w in warnings:
        logging.warning("sanity check: %s", w)
    report["warnings"] = warnings
    return report


def _checked_num_classes(
    logits_fn: ApplyFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None,
) -> int:
    """The model's class count, checked against ``num_classes`` and the inputs' shapes."""
    if not len(images) or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0); got {len(images)}, {len(labels)}")
    out = jax.eval_shape(logits_fn, variables, jax.ShapeDtypeStruct(images[:1].shape, jnp.float32))
    if num_classes is not None and out.shape[-1] != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model outputs {out.shape[-1]} logits")
    return out.shape[-1]


def _journal(
    journal_dir: str | epath.Path,
    images: np.ndarray,
    labels: np.ndarray,
    eps: float,
    norm: str,
    seed: int,
    budget: aa.Budget,
    attacks: tuple[str, ...],
) -> aa.Journal:
    """AutoAttack's journal, keyed by everything its results depend on."""
    custom = {} if attacks == aa.STANDARD_ATTACKS else {"attacks": list(attacks)}
    limits = aa.budget_key(budget)
    settings = journal_settings(images, labels, eps=eps, norm=norm, seed=seed, **limits, **custom)
    return aa.Journal(journal_dir, settings)


def _add_autoattack(
    report: dict[str, Any],
    result: aa.AutoAttackResult,
    eps: float,
    norm: str,
    budget: aa.Budget,
    journal: aa.Journal | None,
    attacks: tuple[str, ...],
) -> list[str]:
    """Adds AutoAttack's accuracy, masks and details to ``report``; its warnings."""
    name = autoattack_name(norm, eps, attacks)
    version = aa.version_of(attacks)
    budget_dict = dataclasses.asdict(budget)
    total_s = sum(result.seconds.values())
    report["accuracy"][name] = result.robust_accuracy
    report["images_per_s"][name] = report["num_examples"] / total_s if total_s else None
    report["attacks"][name] = {
        "attack": "AutoAttack",
        "version": version,
        "attacks": list(attacks),
        "norm": norm,
        "eps": eps,
        **budget_dict,
    }
    report["masks"][name] = result.robust
    report["masks"].update({f"{name}/{k}": v for k, v in result.stages.items()})
    report["autoattack"] = {
        "name": name,
        "stages": {k: float(v.mean()) for k, v in result.stages.items()},
        "max_perturbation": result.max_perturbation,
        "images_per_s": {
            k: result.attacked[k] / s if result.attacked[k] and s else None
            for k, s in result.seconds.items()
        },
        "seconds": result.seconds,
        "attacked": result.attacked,
        "rejected": result.rejected,
        "resumed_batches": result.resumed,
        "budget": budget_dict,
    }
    if journal is not None:
        report["autoattack"]["journal"] = str(journal.path)
    warnings = []
    full = aa.version_budget(attacks)
    if budget != full:
        warnings.append(
            f"reduced AutoAttack budget {budget_dict} ({version}: "
            f"{dataclasses.asdict(full)}): not the {version} protocol; the robust "
            "accuracy may be over-estimated"
        )
    if version == "custom":
        warnings.append(
            f"a custom AutoAttack ({'+'.join(attacks)}; standard: "
            f"{'+'.join(aa.STANDARD_ATTACKS)}): not the standard protocol"
        )
    if sum(result.rejected.values()):
        warnings.append(
            f"attacks returned misclassified points outside the eps-ball or "
            f"[0, 1], rejected: {result.rejected}"
        )
    return warnings


def autoattack_name(
    norm: str | None = None,
    eps: float | None = None,
    names: Sequence[str] = aa.STANDARD_ATTACKS,
) -> str:
    """The AutoAttack metric name, e.g. ``autoattack_linf_8/255`` (defaults: Linf, and
    :data:`DEFAULT_EPS` of the norm); plus is ``autoattack-plus_linf_8/255``, and a custom
    version's names its attacks: ``autoattack-apgd-ce+apgd-t_linf_8/255``."""
    norm = norm or "linf"
    check_norm(norm)
    version = {"standard": "", "plus": "-plus"}.get(aa.version_of(names), "-" + "+".join(names))
    return f"autoattack{version}_{norm}_{format_eps(DEFAULT_EPS[norm] if eps is None else eps)}"
