"""Robustness evaluation of a training run, the command line (the library is
:mod:`samrobust.robustness`)::

  python -m samrobust.evaluate --workdir=DIR [--suite=clean|paper|autoattack|full]
      [--eps=8/255] [--norm=linf|l2] [--num_examples=N] [--batch_size=N]
      [--checkpoint=latest|best|STEP]

loads the latest checkpoint of ``DIR`` (local or gs://; ``--checkpoint=best``: the best one
by validation robust accuracy, in ``DIR/checkpoints_best``; ``--checkpoint=STEP``: that
step; reports then end in ``_best`` / ``_step<STEP>``) with the model from
``DIR/config.json``, evaluates ``N`` test examples (default: all; fewer: the fixed,
class-stratified subset of :func:`samrobust.input_pipeline.eval_subset`, the same points
for every run) and writes
``DIR/<stem>.json`` (accuracies, images/s, budgets, AutoAttack details, warnings, the
run), the table ``DIR/<stem>.md`` and the per-example masks ``DIR/<stem>_masks.npz``, where
the stem is ``eval_paper``, or ``eval_autoattack_linf_8_255`` / ``eval_full_l2_0.5`` with
the AutoAttack radius, so that several radii live side by side, and ``_sub<N>`` after
``--num_examples=N`` (the report's ``subset`` names its points: the rule and a sha256 of
the indices). ``--batch_size`` (global) and ``--seed`` default to the run's
``eval_batch_size`` and ``seed``; ``--data_dir`` overrides the run's. ``--n_iter``,
``--n_target_classes``, ``--n_queries`` and ``--n_restarts`` shrink AutoAttack's budget
(100 / 9 / 5000 / 1) for quick looks (the stem then ends in ``_it<N>_tc<N>_q<N>``, e.g.
``eval_autoattack_linf_8_255_it10_tc9_q5000``); ``--version=plus`` runs AutoAttack plus
(stem ``eval_autoattack-plus_linf_8_255``), ``--attacks=a,b`` a custom version;
``--unroll`` sets the attacks' loop unrolling.

A RobustBench-format PyTorch checkpoint (PreActResNet-18 or WideResNet; see
:mod:`samrobust.torch_weights`) is evaluated the same way, in JAX on whatever devices JAX
has, its reports written to ``DIR``::

  python -m samrobust.evaluate --torch_checkpoint=model.pt --dataset=image_folder \
      --data_dir=../shared/data/cifar10-jpeg.tar.gz --workdir=DIR --suite=autoattack

AutoAttack records every finished batch in ``DIR/<report stem>_journal/``: a killed
evaluation, run again with the same flags, continues where it stopped and ends with the same
result; the journal is deleted once the report is written. The workdir's lock (a lease,
taken over once its heartbeat is ``--lock_stale_after_s`` old) is held from loading the
checkpoint to writing the report, so a training run and an evaluation never share a
workdir; SIGTERM (a scheduler's stop) ends the evaluation with exit code 143, releasing the
lock and keeping the journal.
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence

import jax
from absl import flags, logging

from samrobust import (
    attacks,
    errors,
    input_pipeline,
    parallel,
    paths,
    preemption,
    reports,
    robustness,
    runs,
)
from samrobust import autoattack as aa
from samrobust.checkpoint import quiet_orbax
from samrobust.errors import UserError
from samrobust.workdir import DEFAULT_STALE_AFTER_S, WorkdirLock

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The command line's flags, on ``flag_values``."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Training run directory (of samrobust.main); with --torch_checkpoint, where the "
        "reports go (created).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "torch_checkpoint",
        None,
        "Evaluate this RobustBench-format PyTorch state_dict (PreActResNet-18 or WideResNet, "
        "samrobust.torch_weights) instead of a training run; needs --dataset.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "dataset",
        None,
        input_pipeline.DATASETS,
        "The test split a --torch_checkpoint is evaluated on (image_folder: with --data_dir).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "checkpoint",
        "latest",
        "Which checkpoint: latest, best (by validation robust accuracy; runs with "
        "--config.eval_every_epochs) or a step number.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "suite", "paper", robustness.SUITES, "Evaluation suite.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "eps",
        None,
        "AutoAttack radius, e.g. 8/255 or 0.5 (default: Linf 8/255, L2 0.5).",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "norm", None, attacks.NORMS, "AutoAttack norm (default linf).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num_examples",
        -1,
        "Evaluate N test examples, a fixed class-stratified subset (-1: all).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Global batch size, a multiple of the device count (default: the run's eval_batch_size).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "seed", None, "Attack seed (default: the run's seed).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data_dir", None, "The dataset's data_dir (default: the run's).", flag_values=flag_values
    )
    _define_autoattack_flags(flag_values)
    flags.DEFINE_integer(
        "unroll",
        None,
        "Attack iterations per loop body: PGD's fori_loop unroll (default: full on CPU) and "
        "AutoAttack's iterations per jitted call on CPU / fori_loop unroll elsewhere.",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "lock_stale_after_s",
        DEFAULT_STALE_AFTER_S,
        "Take over the workdir's lock once its holder's heartbeat is this many seconds old.",
        flag_values=flag_values,
    )
    parallel.define_runtime_flags(flag_values)
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


def _define_autoattack_flags(flag_values: flags.FlagValues) -> None:
    """AutoAttack's version and budget."""
    flags.DEFINE_enum(
        "version",
        None,
        aa.VERSIONS,
        "AutoAttack's version (default: standard, or custom with --attacks); plus: "
        f"{','.join(aa.PLUS_ATTACKS)} with 5 restarts of the untargeted attacks.",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "attacks",
        None,
        f"A custom AutoAttack: these attacks in this order, of {','.join(aa.ATTACKS)} "
        "(default: the standard apgd-ce,apgd-t,fab-t,square).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "n_iter", 100, "AutoAttack iterations (standard: 100).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "n_target_classes", 9, "AutoAttack target classes (standard: 9).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "n_queries", 5000, "Square Attack queries (standard: 5000).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "n_restarts",
        None,
        "Runs of APGD-CE, APGD-DLR and untargeted FAB (default: the version's, 1 or plus's 5).",
        flag_values=flag_values,
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The evaluation the flags ask for (the flags' values checked)."""

    eps: float | None
    checkpoint: str | int
    budget: aa.Budget
    attacks: tuple[str, ...]


def settings(flag_values: flags.FlagValues = FLAGS) -> Settings:
    """The parsed flags' settings; a ``UserError`` naming the flag for a bad value."""
    fv = flag_values
    try:
        eps = None if fv.eps is None else attacks.parse_eps(fv.eps)
    except ValueError as e:
        raise UserError(f"--eps: {e}") from None
    try:
        checkpoint = runs.parse_checkpoint(fv.checkpoint)
    except ValueError as e:
        raise UserError(f"--checkpoint: {e}") from None
    try:
        names, full = aa.resolve_version(fv.version, fv.attacks or None, None)
    except ValueError as e:
        raise UserError(f"--version/--attacks: {e}") from None
    if full.eot_iter > 1:
        raise UserError(f"--version=rand: {robustness.RAND_IS_FOR_RANDOM_MODELS}")
    try:
        restarts = full.n_restarts if fv.n_restarts is None else fv.n_restarts
        budget = aa.Budget(fv.n_iter, fv.n_target_classes, fv.n_queries, restarts)
    except ValueError as e:
        raise UserError(f"--n_iter/--n_target_classes/--n_queries/--n_restarts: {e}") from None
    if fv.torch_checkpoint and fv.dataset is None:
        raise UserError(
            "--torch_checkpoint needs --dataset: e.g. --dataset=cifar10, or "
            "--dataset=image_folder --data_dir=../shared/data/cifar10-jpeg.tar.gz"
        )
    if fv.dataset is not None and not fv.torch_checkpoint:
        raise UserError("--dataset is for --torch_checkpoint: a training run's is in its config")
    if fv.torch_checkpoint and checkpoint != "latest":
        raise UserError(
            "--checkpoint picks a training run's checkpoint: drop it with --torch_checkpoint"
        )
    if fv.num_examples == 0 or fv.num_examples < -1:
        raise UserError("--num_examples must be positive, or -1 for the whole test split")
    return Settings(eps, checkpoint, budget, names)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    s = settings()
    eps, checkpoint, budget, attack_names = s.eps, s.checkpoint, s.budget, s.attacks
    quiet_orbax()
    preemption.exit_on_sigterm()  # the journal keeps finished batches
    parallel.initialize_runtime()
    mesh = parallel.default_mesh()
    run = None
    if FLAGS.torch_checkpoint:  # loaded and checked before the lock creates the workdir
        run = runs.load_torch_checkpoint(
            FLAGS.torch_checkpoint, FLAGS.workdir, FLAGS.dataset, data_dir=FLAGS.data_dir, mesh=mesh
        )
        config = run.config
    else:  # a run's workdir, read before the lock creates anything there
        config = runs.run_config(FLAGS.workdir)
    batch_size = config["eval_batch_size"] if FLAGS.batch_size is None else FLAGS.batch_size
    try:  # the library's checks, as user errors
        aa_eps, aa_norm = robustness.check_settings(
            FLAGS.suite, eps, FLAGS.norm, batch_size, mesh.size, attack_names
        )
    except ValueError as e:
        raise UserError(f"--suite={FLAGS.suite} --eps/--norm/--batch_size/--attacks: {e}") from None
    if aa_eps is not None and eps is None:
        logging.info(
            "AutoAttack radius: %s %s (the default%s; set it with --eps)",
            aa_norm,
            attacks.format_eps(aa_eps),
            ", CIFAR's budget: digits has no standard one" if config["dataset"] == "digits" else "",
        )
    is_chief = jax.process_index() == 0
    lock = WorkdirLock(FLAGS.workdir, "evaluation", FLAGS.lock_stale_after_s) if is_chief else None
    with lock or contextlib.nullcontext():  # one writer per workdir
        if run is None:
            run = runs.load_run(
                FLAGS.workdir, data_dir=FLAGS.data_dir, mesh=mesh, checkpoint=checkpoint
            )
        elif lock is not None:
            runs.claim_torch_workdir(FLAGS.workdir, run)
        _evaluate(run, mesh, aa_eps, aa_norm, batch_size, checkpoint, budget, attack_names, lock)


def _evaluate(
    run: runs.Run,
    mesh: jax.sharding.Mesh,
    eps: float | None,
    norm: str | None,
    batch_size: int,
    checkpoint: str | int,
    budget: aa.Budget,
    attack_names: tuple[str, ...],
    lock: WorkdirLock | None,
) -> None:
    config, ds = run.config, run.dataset
    images, labels, subset = input_pipeline.evaluation_points(ds, FLAGS.num_examples)
    stem = reports.report_stem(
        FLAGS.suite, checkpoint, norm, eps, budget, FLAGS.num_examples, attack_names
    )
    torch_sha256 = config.get("torch_sha256")
    weights = f"torch-{torch_sha256[:16]}" if torch_sha256 else f"step{run.step}"
    journal_dir = paths.path(run.workdir) / f"{stem}_journal" / weights
    what = (
        f"{config['torch_checkpoint']} ({config['model']})"
        if torch_sha256
        else f"{run.workdir} step {run.step} ({config['mode']}, {config['model']} width "
        f"{config['width']})"
    )
    logging.info(
        "Evaluating %s on %d %s test examples (%s): %s suite, batch %d, %d devices",
        what,
        len(labels),
        ds.name,
        subset["rule"],
        FLAGS.suite,
        batch_size,
        mesh.size,
    )
    report = robustness.evaluate(
        run.logits_fn,
        run.variables,
        images,
        labels,
        suite=FLAGS.suite,
        eps=eps,
        norm=norm,
        num_classes=ds.num_classes,
        batch_size=batch_size,
        seed=config["seed"] if FLAGS.seed is None else FLAGS.seed,
        mesh=mesh,
        budget=budget,
        attacks=attack_names,
        journal_dir=journal_dir,
        unroll=FLAGS.unroll,
    )
    report["subset"] = subset
    report["run"] = {"workdir": os.fspath(paths.path(run.workdir)), "dataset": ds.name}
    if torch_sha256:  # which file, and the normalisation it carried
        keys = ("mode", "model", "torch_checkpoint", "torch_sha256", "padding", "mean", "std")
    else:
        report["run"] |= {"step": run.step, "checkpoint": FLAGS.checkpoint, "weights": run.weights}
        keys = ("mode", "model", "width")
    report["run"] |= {k: config[k] for k in keys}
    if lock is not None:
        lock.check()
        for path in reports.write_report(run.workdir, report, stem):
            logging.info("wrote %s", path)
        if journal_dir.parent.exists():  # the report holds everything it recorded
            journal_dir.parent.rmtree()
    logging.info("accuracy: %s", json.dumps(report["accuracy"]))


if __name__ == "__main__":
    define_flags()
    errors.run(main)
