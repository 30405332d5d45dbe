"""Robustness evaluation: clean accuracy, PGD and AutoAttack on any ``apply_fn`` + variables.

Suites (test inputs in ``[0, 1]``, model in eval mode, every attack data parallel over all
devices, per-example masks kept so that runs can be compared point by point):

- ``paper`` (the paper's protocol): clean accuracy and PGD-10 with random start at
  Linf 1/255 (step 0.25/255), Linf 2/255 (0.5/255), L2 16/255 (2/255), L2 32/255 (4/255).
- ``autoattack``: clean accuracy and AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square;
  :mod:`samrobust.autoattack`) at ``eps`` in ``norm``. Defaults: Linf 8/255, L2 0.5 (the
  RobustBench CIFAR budgets, also used for SVHN). ``digits`` has no standard budget; it
  gets the same defaults, and the log says so.
- ``full``: ``paper`` + ``autoattack`` + PGD-20 with random start and step eps/4, on the
  cross-entropy and on the Carlini-Wagner margin (``attacks.cw_margin``), at Linf 4/255 and
  8/255. ``eps``/``norm`` change only the AutoAttack budget.

Accuracy under PGD is the accuracy at the final iterate (the paper's metric; PGD's
projection keeps every iterate in the ball and in ``[0, 1]``). Under AutoAttack a point is
robust if it is correctly classified and no attack returned a valid adversarial for it:
misclassified, within ``eps + 1e-6``, inside ``[0, 1]`` and finite; every returned point is
checked on the host, invalid ones are counted and rejected, and the largest accepted
perturbation is reported. AutoAttack runs as a host-side cascade (:func:`autoattack_suite`):
before each attack the points still robust are packed into global batches that
``shard_map`` splits over the devices, so fooled points cost nothing in later attacks.

Sanity checks, as AutoAttack's (:func:`samrobust.autoattack.sanity_checks`), end every
suite; each finding goes to ``logging.warning`` and to the report's ``warnings``: outputs
that look like probabilities instead of logits; correctly classified points with a zero
input gradient; repeated forward passes that disagree (a randomised model); Square lowering
the accuracy left by the gradient attacks (gradient masking); clean accuracy below a robust
accuracy. A reduced AutoAttack budget and rejected adversarials are warned about as well.

Command line (a training run of ``samrobust.main``)::

  python -m samrobust.evaluate --workdir=DIR [--suite=paper|autoattack|full]
      [--eps=8/255] [--norm=linf|l2] [--num_examples=N] [--batch_size=N]

loads the latest checkpoint in ``DIR/checkpoints`` (``--checkpoint=best``: the best one by
validation robust accuracy, in ``DIR/checkpoints_best``; ``--checkpoint=STEP``: that step;
reports then end in ``_best`` / ``_step<STEP>``) with the model from ``DIR/config.json``,
evaluates the first ``N`` test examples (default: all) and writes ``DIR/eval_<suite>.json``
(accuracies, images/s, budgets, AutoAttack details, warnings, the run), the table
``DIR/eval_<suite>.md`` and the per-example masks ``DIR/eval_<suite>_masks.npz`` (keyed
by attack name with ``/`` as ``_``). ``--batch_size`` (global) and ``--seed`` default to
the run's ``eval_batch_size`` and ``seed``; ``--data_dir`` overrides the run's.
``--n_iter``, ``--n_target_classes`` and ``--n_queries`` shrink AutoAttack's budget
(100 / 9 / 5000) for quick looks; ``--unroll`` sets the attacks' loop unrolling. Images/s
figures exclude compilation.

Python, on any model (``logits_fn(variables, x) -> logits``)::

  report = evaluate(model_logits_fn(model.apply), variables, images, labels,
                    suite="autoattack", eps=8 / 255, norm="linf")
  report["accuracy"]  # {"clean": ..., "autoattack_linf_8/255": ...}

:func:`pgd_suite` and :func:`autoattack_suite` are the building blocks; :func:`load_run`
restores a training run's model and variables.
"""

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import attacks, errors, input_pipeline, models, parallel
from samrobust import autoattack as aa
from samrobust.attacks import PGDSpec
from samrobust.checkpoint import CheckpointError, checkpoint_dir, read_state
from samrobust.errors import UserError
from samrobust.parallel import AXIS, default_mesh, gather, replicate, shard_batch
from samrobust.workdir import WorkdirLock

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (variables, x) -> logits
SUITES = ("paper", "autoattack", "full")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
STANDARD_BUDGET = {"n_iter": 100, "n_target_classes": 9, "n_queries": 5000}
VALID_TOL = 1e-6  # slack on ||x_adv - x|| <= eps, as AutoAttack's


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
SUITE_PGD = {"paper": PAPER_SUITE, "autoattack": (), "full": PAPER_SUITE + FULL_EXTRA}


def make_correct_fn(
    logits_fn: LogitsFn, spec: PGDSpec | None, mesh: Mesh, unroll: int | None = None
) -> Callable:
    """Jitted ``(variables, x, y, key) -> per-example correctness`` under ``spec`` (None: clean).

    ``eps`` and ``step_size`` are traced, so budgets that share norm, steps and loss share
    one compiled program. ``unroll``: PGD's ``fori_loop`` unroll (None: ``attacks.pgd``'s).
    """
    if spec is None:
        return functools.partial(
            _correct_fn(logits_fn, None, None, None, None, mesh), eps=0.0, step_size=0.0
        )
    return functools.partial(
        _correct_fn(logits_fn, spec.norm, spec.steps, spec.loss, unroll, mesh),
        eps=spec.eps,
        step_size=spec.step_size,
    )


@functools.lru_cache(maxsize=32)
def _correct_fn(logits_fn, norm, steps, loss, unroll, mesh):
    def local(variables, x, y, key, eps, step_size):
        if norm is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
            loss_fn = attacks.input_loss(lambda z: logits_fn(variables, z), loss)
            x = attacks.pgd(
                loss_fn,
                x,
                y,
                key,
                eps=eps,
                step_size=step_size,
                steps=steps,
                norm=norm,
                unroll=unroll,
            )
        return jnp.argmax(logits_fn(variables, x), axis=-1) == y

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P(), P(), P()),
        out_specs=P(AXIS),
        check_vma=False,
    )
    return jax.jit(
        lambda variables, x, y, key, *, eps, step_size: mapped(
            variables, x, y, key, jnp.float32(eps), jnp.float32(step_size)
        )
    )


def correctness(
    correct_fn: Callable,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int,
    mesh: Mesh,
    name: str | None = None,
) -> np.ndarray:
    """Per-example correctness (bool array over ``images``) of a ``make_correct_fn`` function.

    With ``name``, logs progress after the first batch and then at most every 10 s: batch,
    accuracy so far, images/s.
    """
    out, n_correct, start, logged = [], 0, time.perf_counter(), -np.inf
    n_batches = -(-len(images) // batch_size)
    batches = input_pipeline.eval_batches(
        images,
        labels,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for i, (x, y, _) in enumerate(batches):
        c = correct_fn(variables, *shard_batch(mesh, x, y), jax.random.fold_in(key, i))
        out.append(gather(c)[: len(images) - i * batch_size])
        n_correct += int(out[-1].sum())
        now = time.perf_counter()
        if name and now - logged >= 10:
            logged, done = now, min((i + 1) * batch_size, len(images))
            logging.info(
                "eval %s batch %d/%d: accuracy %.4f so far (%.0f img/s)",
                name,
                i + 1,
                n_batches,
                n_correct / done,
                done / (now - start),
            )
    return np.concatenate(out)


def pgd_suite(
    logits_fn: LogitsFn,
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
    :func:`make_correct_fn`.
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


def model_logits_fn(apply_fn: Callable) -> LogitsFn:
    """Eval-mode logits of a Flax model with BatchNorm: ``apply_fn(variables, x, train=False)``."""
    return lambda variables, x: apply_fn(variables, x, train=False)


# --------------------------------------------------------------------------------------------
# AutoAttack
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _autoattack_stage_fn(logits_fn, name, eps, norm, budget, unroll, mesh):
    """Jitted ``(variables, x, y, key) -> (x_adv, misclassified at x_adv)``, over ``mesh``."""
    stage = aa.make_stage(name, eps=eps, norm=norm, unroll=unroll, **dict(budget))

    def local(variables, x, y, key):
        model = functools.partial(logits_fn, variables)
        adv = stage(model, x, y, jax.random.fold_in(key, jax.lax.axis_index(AXIS)))
        return adv, jnp.argmax(model(adv), axis=-1) != y

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS), P()),
            out_specs=(P(AXIS), P(AXIS)),
            check_vma=False,
        )
    )


def autoattack_suite(
    logits_fn: LogitsFn,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    seed: int = 0,
    mesh: Mesh | None = None,
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    unroll: int = 1,
) -> tuple[aa.AutoAttackResult, dict[str, Any]]:
    """AutoAttack "standard" as a host-side cascade whose attacks run over all devices.

    Before each attack, the points still robust are packed into global batches of
    ``min(batch_size, N rounded up to the device count)`` (the last one padded by
    repetition, so each attack compiles once); ``shard_map`` splits every batch over
    ``mesh``. A returned point counts only if it is misclassified, within ``eps + 1e-6`` and
    inside ``[0, 1]``. Logs every batch. Returns the :class:`~samrobust.autoattack.
    AutoAttackResult` (numpy arrays) and timings: per attack ``images_per_s`` (points
    attacked / seconds, compilation excluded), ``compile_s``, ``attacked`` and ``rejected``
    (misclassified but invalid returned points), and the overall ``total_images_per_s``.
    ``n_iter``, ``n_target_classes``, ``n_queries``, ``unroll``: as
    :func:`samrobust.autoattack.autoattack`, except that loops are rolled by default on every
    backend: fully unrolled (AutoAttack's CPU default), a width-4 PreActResNet on 8x8 inputs
    took 3.5-4 min per attack to compile on CPU and ran slower than rolled.
    """
    if norm not in attacks.NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {attacks.NORMS}")
    mesh = mesh or default_mesh()
    variables = replicate(variables, mesh)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n = len(images)
    bs = min(batch_size, -(-n // mesh.size) * mesh.size)
    if bs % mesh.size:
        raise ValueError(f"batch_size={batch_size} must divide by the device count {mesh.size}")
    per_host = bs // jax.process_count()
    host = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    key = jax.random.fold_in(jax.random.key(seed), 1)  # not PGD's stream
    clean = correctness(
        make_correct_fn(logits_fn, None, mesh),
        variables,
        images,
        labels,
        key,
        batch_size=bs,
        mesh=mesh,
    )
    robust, x_adv = clean.copy(), images.copy()
    stages: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {"images_per_s": {}, "compile_s": {}, "attacked": {}, "rejected": {}}
    budget = (("n_iter", n_iter), ("n_target_classes", n_target_classes), ("n_queries", n_queries))
    total_s = 0.0
    for si, name in enumerate(aa.STANDARD_ATTACKS):
        fn = _autoattack_stage_fn(logits_fn, name, eps, norm, budget, unroll, mesh)
        todo = np.flatnonzero(robust)
        n_batches = -(-len(todo) // bs)
        compile_s, rejected, start = 0.0, 0, time.perf_counter()
        for bi in range(n_batches):
            chunk = todo[bi * bs : (bi + 1) * bs]
            idx = np.resize(chunk, bs)[host]
            args = (
                variables,
                *shard_batch(mesh, images[idx], labels[idx]),
                jax.random.fold_in(jax.random.fold_in(key, si), bi),
            )
            if bi == 0:  # compile outside the timing
                t = time.perf_counter()
                fn.lower(*args).compile()
                compile_s = time.perf_counter() - t
            adv, wrong = (gather(a)[: len(chunk)] for a in fn(*args))
            dist = np.asarray(aa.perturbation_norm(jnp.asarray(adv - images[chunk]), norm))
            in_box = np.all(
                (adv >= 0) & (adv <= 1) & np.isfinite(adv), axis=tuple(range(1, adv.ndim))
            )
            fooled = wrong & in_box & (dist <= eps + VALID_TOL)
            rejected += int(np.sum(wrong & ~fooled))
            robust[chunk[fooled]] = False
            x_adv[chunk[fooled]] = adv[fooled]
            seconds = time.perf_counter() - start - compile_s
            logging.info(
                "autoattack %s batch %d/%d: fooled %d of %d; robust accuracy %.4f (%.0f img/s)",
                name,
                bi + 1,
                n_batches,
                int(fooled.sum()),
                len(chunk),
                robust.mean(),
                min(len(todo), (bi + 1) * bs) / seconds,
            )
        seconds = time.perf_counter() - start - compile_s
        total_s += seconds
        stages[name] = robust.copy()
        stats["images_per_s"][name] = len(todo) / seconds if len(todo) else None
        stats["compile_s"][name] = compile_s
        stats["attacked"][name] = len(todo)
        stats["rejected"][name] = rejected
        logging.info(
            "autoattack after %-7s robust accuracy %.4f (%d points attacked in %.1f s, "
            "compiled in %.1f s)",
            name,
            robust.mean(),
            len(todo),
            seconds,
            compile_s,
        )
    stats["total_images_per_s"] = n / total_s if total_s else None
    max_pert = float(np.max(aa.perturbation_norm(jnp.asarray(x_adv - images), norm))) if n else 0.0
    return aa.AutoAttackResult(x_adv, robust, clean, stages, max_pert), stats


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def format_eps(eps: float) -> str:
    """A radius for people: ``0.5``, ``8/255``, ``0.25/255`` (the shorter exact form)."""
    if abs(eps * 1000 - round(eps * 1000)) < 1e-6:
        return f"{eps:g}"
    k = eps * 255
    return f"{round(k, 2):g}/255" if abs(k * 100 - round(k * 100)) < 1e-4 else f"{eps:g}"


def parse_eps(text: str) -> float:
    """``"8/255"`` or ``"0.031"`` -> float (>= 0)."""
    num, _, den = text.partition("/")
    try:
        eps = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps {text!r} is not a number or a fraction like 8/255") from None
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {text!r}")
    return eps


def _describe(spec: PGDSpec) -> dict[str, Any]:
    return {
        "attack": f"PGD-{spec.steps}",
        "loss": spec.loss,
        "norm": spec.norm,
        "eps": spec.eps,
        "step_size": spec.step_size,
        "steps": spec.steps,
        "random_start": True,
    }


def evaluate(
    logits_fn: LogitsFn,
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
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    unroll: int | None = None,
) -> dict[str, Any]:
    """Runs ``suite`` (see the module docstring) on ``logits_fn(variables, x) -> logits``.

    ``eps``/``norm`` set the AutoAttack budget (default Linf 8/255 or L2 0.5; not allowed for
    ``paper``). ``num_classes`` is checked against the model's output (inferred if None).
    ``batch_size`` is global and must divide by the device count; ``n_iter``,
    ``n_target_classes``, ``n_queries`` shrink AutoAttack's budget (the report warns);
    ``unroll`` sets every attack's ``fori_loop`` unroll (None: PGD's default, full on CPU,
    and 1 for AutoAttack; 1 compiles fastest).
    Returns a dict: ``accuracy`` and ``images_per_s`` (by attack name, ``clean`` first),
    ``attacks`` (each name's budget), ``masks`` (per-example bool arrays; AutoAttack's also
    after each of its attacks, as ``<name>/<attack>``), ``autoattack`` (details, unless
    ``paper``), ``warnings``, and the settings.
    """
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}; choose one of {SUITES}")
    if suite == "paper" and (eps is not None or norm is not None):
        raise ValueError("eps and norm set the AutoAttack budget: use suite='autoattack' or 'full'")
    norm = norm or "linf"
    if norm not in attacks.NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {attacks.NORMS}")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    mesh = mesh or default_mesh()
    if batch_size <= 0 or batch_size % mesh.size:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the device count {mesh.size}"
        )
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if not len(images) or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (> 0); got {len(images)}, {len(labels)}")
    variables = replicate(variables, mesh)
    out = jax.eval_shape(logits_fn, variables, jax.ShapeDtypeStruct(images[:1].shape, jnp.float32))
    if num_classes is not None and out.shape[-1] != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model outputs {out.shape[-1]} logits")
    num_classes = out.shape[-1]

    specs = SUITE_PGD[suite]
    pgd = pgd_suite(
        logits_fn,
        variables,
        images,
        labels,
        specs=specs,
        batch_size=batch_size,
        seed=seed,
        mesh=mesh,
        unroll=unroll,
    )
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
        "attacks": {"clean": {"attack": "none"}} | {s.name: _describe(s) for s in specs},
        "masks": pgd["masks"],
    }
    warnings = []
    result = None
    if suite != "paper":
        budget = {"n_iter": n_iter, "n_target_classes": n_target_classes, "n_queries": n_queries}
        result, stats = autoattack_suite(
            logits_fn,
            variables,
            images,
            labels,
            eps=eps,
            norm=norm,
            batch_size=batch_size,
            seed=seed,
            mesh=mesh,
            unroll=1 if unroll is None else unroll,
            **budget,
        )
        name = f"autoattack_{norm}_{format_eps(eps)}"
        report["accuracy"][name] = result.robust_accuracy
        report["images_per_s"][name] = stats["total_images_per_s"]
        report["attacks"][name] = {
            "attack": "AutoAttack",
            "version": "standard",
            "norm": norm,
            "eps": eps,
            **budget,
        }
        report["masks"][name] = result.robust
        report["masks"].update({f"{name}/{k}": v for k, v in result.stages.items()})
        report["autoattack"] = {
            "name": name,
            "stages": {k: float(v.mean()) for k, v in result.stages.items()},
            "max_perturbation": result.max_perturbation,
            **stats,
        }
        if budget != STANDARD_BUDGET:
            warnings.append(
                f"reduced AutoAttack budget {budget} (standard: {STANDARD_BUDGET}): "
                "not the standard protocol; the robust accuracy may be over-estimated"
            )
        if sum(stats["rejected"].values()):
            warnings.append(
                f"attacks returned misclassified points outside the eps-ball or "
                f"[0, 1], rejected: {stats['rejected']}"
            )
    pgd_acc = [report["accuracy"][s.name] for s in specs]
    warnings += aa.sanity_checks(
        jax.tree_util.Partial(logits_fn, variables),
        images,
        labels,
        result=result,
        robust_accuracy=max(pgd_acc) if pgd_acc else None,
        n_target_classes=n_target_classes,
        attacks=aa.STANDARD_ATTACKS if result is not None else (),
        batch_size=batch_size,
    )
    for w in warnings:
        logging.warning("sanity check: %s", w)
    report["warnings"] = warnings
    return report


# --------------------------------------------------------------------------------------------
# Training runs and the command line
# --------------------------------------------------------------------------------------------


class EvaluationError(UserError, RuntimeError):
    """A workdir cannot be evaluated; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run's latest checkpoint, ready to evaluate."""

    workdir: str
    config: dict[str, Any]
    step: int
    logits_fn: LogitsFn
    variables: Any
    dataset: input_pipeline.Dataset


def parse_checkpoint(text: str) -> str | int:
    """``best``, ``latest`` or a step number, as ``--checkpoint`` takes it."""
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not best, latest or a step number (e.g. --checkpoint=best)")


def _restore(workdir: str, mesh: Mesh, checkpoint: str | int) -> tuple[int, dict[str, Any]]:
    """(step, ``{"params", "batch_stats"}``) of checkpoint ``best``, ``latest`` or a step,
    replicated on ``mesh``."""
    kind = "best" if checkpoint == "best" else "latest"
    directory = checkpoint_dir(workdir, kind)
    if kind == "best":
        missing = EvaluationError(
            f"No best checkpoint in {directory}: the run did not evaluate during training. "
            "Train with --config.eval_every_epochs=N (and --config.val_examples=M), or pass "
            "--checkpoint=latest."
        )
    else:
        missing = EvaluationError(
            f"No checkpoint in {directory}: the run has not saved one yet. Train (or resume) "
            f"it until it saves one, e.g. python -m samrobust.main "
            f"--config=configs/sam.py:digits --workdir={workdir} (checkpoints every "
            "--config.checkpoint_every_steps steps and at the end)."
        )
    step = checkpoint if isinstance(checkpoint, int) else None
    try:
        found = read_state(workdir, NamedSharding(mesh, P()), step, kind)
    except FileNotFoundError as e:
        raise EvaluationError(f"--checkpoint={checkpoint}: {e}") from e
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(
            f"The {checkpoint} checkpoint in {directory} is unreadable ({type(e).__name__}: "
            f"{e}). Delete that step's directory to evaluate the previous checkpoint, or "
            "train again."
        ) from e
    if found is None:
        raise missing
    step, state = found
    return step, {"params": state["params"], "batch_stats": state["batch_stats"]}


def load_run(
    workdir: str,
    *,
    data_dir: str | None = None,
    mesh: Mesh | None = None,
    checkpoint: str | int = "latest",
) -> Run:
    """A checkpoint (``best``, ``latest`` or a step) of the ``samrobust.main`` run in
    ``workdir``, its model (from ``workdir/config.json``) and its dataset (``data_dir``
    overrides the run's)."""
    if not os.path.isdir(workdir):
        raise EvaluationError(
            f"--workdir={workdir} does not exist. Pass the --workdir of a training run, or "
            f"train one: python -m samrobust.main --config=configs/sam.py:digits "
            f"--workdir={workdir}"
        )
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise EvaluationError(
            f"{config_path} not found: {workdir} is not a samrobust training run. Pass the "
            "--workdir given to samrobust.main (it holds config.json and checkpoints/)."
        )
    with open(config_path) as f:
        config = json.load(f)
    step, variables = _restore(workdir, mesh or default_mesh(), checkpoint)
    ds = input_pipeline.load(
        config["dataset"], data_dir or config.get("data_dir"), cache_dir=config.get("cache_dir")
    )
    model = models.create_model(
        config["model"],
        ds.num_classes,
        ds.mean,
        ds.std,
        width=config["width"],
        dtype=jnp.bfloat16 if config["half_precision"] else jnp.float32,
    )
    return Run(workdir, config, step, model_logits_fn(model.apply), variables, ds)


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, with the run, the AutoAttack details and warnings."""
    lines = [f"# Robustness evaluation: `{report['suite']}` suite", ""]
    run = report.get("run")
    if run:
        lines.append(
            f"Run `{run['workdir']}` (checkpoint step {run['step']}): {run['mode']}, "
            f"{run['model']} (width {run['width']}) on {run['dataset']}."
        )
    lines += [
        f"{report['num_examples']} test examples, batch {report['batch_size']}, seed "
        f"{report['seed']}, {report['devices']} devices. Images/s exclude compilation.",
        "",
        "| attack | norm | eps | accuracy | img/s |",
        "|:--|:--|--:|--:|--:|",
    ]
    for name, acc in report["accuracy"].items():
        a = report["attacks"][name]
        rate = report["images_per_s"][name]
        rate = f"{rate:.0f}" if rate else "-"
        if name == "clean":
            what, norm, eps = "clean", "", ""
        elif a["attack"] == "AutoAttack":
            what = f"AutoAttack standard (n_iter {a['n_iter']}, n_queries {a['n_queries']})"
            norm, eps = a["norm"], format_eps(a["eps"])
        else:
            what = f"{a['attack']} {a['loss'].upper()}, step {format_eps(a['step_size'])}"
            norm, eps = a["norm"], format_eps(a["eps"])
        lines.append(f"| {what} | {norm} | {eps} | {100 * acc:.2f}% | {rate} |")
        if name == report.get("autoattack", {}).get("name"):
            details = report["autoattack"]
            for stage, stage_acc in details["stages"].items():
                stage_rate = details["images_per_s"][stage]
                stage_rate = f"{stage_rate:.0f}" if stage_rate else "-"
                lines.append(
                    f"| &nbsp;&nbsp;after {stage} | {norm} | {eps} | "
                    f"{100 * stage_acc:.2f}% | {stage_rate} |"
                )
    if "autoattack" in report:
        lines += [
            "",
            f"Largest AutoAttack perturbation: {report['autoattack']['max_perturbation']:.6g} "
            f"({report['attacks'][report['autoattack']['name']]['norm']}); all adversarials "
            "checked against eps and [0, 1].",
        ]
    lines += ["", "Warnings:" if report["warnings"] else "No sanity-check warnings."]
    lines += [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def report_stem(suite: str, checkpoint: str | int = "latest") -> str:
    """``eval_<suite>`` for the latest checkpoint, ``eval_<suite>_best`` for the best one,
    ``eval_<suite>_step<N>`` for step N."""
    if checkpoint == "latest":
        return f"eval_{suite}"
    return (
        f"eval_{suite}_{checkpoint}" if checkpoint == "best" else f"eval_{suite}_step{checkpoint}"
    )


def write_report(
    workdir: str, report: dict[str, Any], checkpoint: str | int = "latest"
) -> list[str]:
    """Writes ``<stem>.json``, ``.md`` and ``_masks.npz`` to ``workdir`` (:func:`report_stem`);
    their paths."""
    stem = os.path.join(workdir, report_stem(report["suite"], checkpoint))
    paths = [f"{stem}.json", f"{stem}.md", f"{stem}_masks.npz"]
    with open(paths[0], "w") as f:
        json.dump({k: v for k, v in report.items() if k != "masks"}, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown(report))
    np.savez_compressed(paths[2], **{k.replace("/", "_"): v for k, v in report["masks"].items()})
    return paths


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training run directory (of samrobust.main).")
    flags.DEFINE_string(
        "checkpoint",
        "latest",
        "Which checkpoint: latest, best (by validation robust accuracy; runs with "
        "--config.eval_every_epochs) or a step number.",
    )
    flags.DEFINE_enum("suite", "paper", SUITES, "Evaluation suite.")
    flags.DEFINE_string(
        "eps", None, "AutoAttack radius, e.g. 8/255 or 0.5 (default: Linf 8/255, L2 0.5)."
    )
    flags.DEFINE_enum("norm", None, attacks.NORMS, "AutoAttack norm (default linf).")
    flags.DEFINE_integer("num_examples", -1, "Evaluate the first N test examples (-1: all).")
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Global batch size, a multiple of the device count (default: the run's eval_batch_size).",
    )
    flags.DEFINE_integer("seed", None, "Attack seed (default: the run's seed).")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's).")
    flags.DEFINE_integer("n_iter", 100, "AutoAttack iterations (standard: 100).")
    flags.DEFINE_integer("n_target_classes", 9, "AutoAttack target classes (standard: 9).")
    flags.DEFINE_integer("n_queries", 5000, "Square Attack queries (standard: 5000).")
    flags.DEFINE_integer(
        "unroll",
        None,
        "Unroll of the attacks' iteration loops (default: PGD's, full on CPU; 1 for "
        "AutoAttack). 1 compiles fastest.",
    )
    parallel.define_runtime_flags()
    flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    if FLAGS.suite == "paper" and (FLAGS.eps is not None or FLAGS.norm is not None):
        raise UserError(
            "--eps and --norm set the AutoAttack budget: use them with "
            "--suite=autoattack or --suite=full"
        )
    try:
        eps = None if FLAGS.eps is None else parse_eps(FLAGS.eps)
    except ValueError as e:
        raise UserError(f"--eps: {e}") from None
    try:
        checkpoint = parse_checkpoint(FLAGS.checkpoint)
    except ValueError as e:
        raise UserError(f"--checkpoint: {e}") from None
    if FLAGS.num_examples == 0 or FLAGS.num_examples < -1:
        raise UserError("--num_examples must be positive, or -1 for the whole test split")
    logging.get_absl_handler().addFilter(  # orbax's INFO chatter
        lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in r.pathname
    )
    parallel.initialize_runtime()
    mesh = default_mesh()
    run = load_run(FLAGS.workdir, data_dir=FLAGS.data_dir, mesh=mesh, checkpoint=checkpoint)
    config, ds = run.config, run.dataset
    batch_size = config["eval_batch_size"] if FLAGS.batch_size is None else FLAGS.batch_size
    if batch_size <= 0 or batch_size % mesh.size:
        raise UserError(
            f"batch size {batch_size} is not a positive multiple of the device count "
            f"{mesh.size}: pass e.g. --batch_size={mesh.size * max(1, batch_size // mesh.size)}"
        )
    n = (
        len(ds.test_images)
        if FLAGS.num_examples == -1
        else min(FLAGS.num_examples, len(ds.test_images))
    )
    if FLAGS.suite != "paper" and eps is None:
        eps = DEFAULT_EPS[FLAGS.norm or "linf"]
        logging.info(
            "AutoAttack radius: %s %s (the default%s; set it with --eps)",
            FLAGS.norm or "linf",
            format_eps(eps),
            ", CIFAR's budget: digits has no standard one" if ds.name == "digits" else "",
        )
    logging.info(
        "Evaluating %s step %d (%s, %s width %d) on %d %s test examples: %s suite, batch %d, "
        "%d devices",
        run.workdir,
        run.step,
        config["mode"],
        config["model"],
        config["width"],
        n,
        ds.name,
        FLAGS.suite,
        batch_size,
        mesh.size,
    )
    lock = WorkdirLock(run.workdir, "evaluation") if jax.process_index() == 0 else None
    with lock or contextlib.nullcontext():  # one writer per workdir
        report = evaluate(
            run.logits_fn,
            run.variables,
            ds.test_images[:n],
            ds.test_labels[:n],
            suite=FLAGS.suite,
            eps=eps,
            norm=FLAGS.norm,
            num_classes=ds.num_classes,
            batch_size=batch_size,
            seed=config["seed"] if FLAGS.seed is None else FLAGS.seed,
            mesh=mesh,
            n_iter=FLAGS.n_iter,
            n_target_classes=FLAGS.n_target_classes,
            n_queries=FLAGS.n_queries,
            unroll=FLAGS.unroll,
        )
        report["run"] = {
            "workdir": os.path.abspath(run.workdir),
            "step": run.step,
            "checkpoint": FLAGS.checkpoint,
            "mode": config["mode"],
            "dataset": ds.name,
            "model": config["model"],
            "width": config["width"],
        }
        if jax.process_index() == 0:
            for path in write_report(run.workdir, report, checkpoint):
                logging.info("wrote %s", path)
    logging.info("accuracy: %s", json.dumps(report["accuracy"]))


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
