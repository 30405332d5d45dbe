"""Training: ``train_and_evaluate(config, workdir)``, the loop around the pure train step
(:mod:`samrobust.step`).

A run: validate the config (:mod:`samrobust.config_check`), take the workdir's lock, load
the data, restore the latest readable checkpoint (or initialise), then step, logging
metrics (:mod:`samrobust.metrics`), saving checkpoints, validating
(:mod:`samrobust.validation`), until the end or a signal (:mod:`samrobust.preemption`);
finally evaluate the paper suite on the test points and write ``results.json``.
"""

import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from samrobust import (
    input_pipeline,
    models,
    parallel,
    paths,
    reports,
    robustness,
)
from samrobust.checkpoint import (
    Checkpointer,
)
from samrobust.config_check import ConfigError, validate_config
from samrobust.errors import UserError
from samrobust.metrics import MetricWriter, format_seconds
from samrobust.optim import create_optimizer, learning_rate_schedule, sam_perturbs
from samrobust.preemption import PreemptedError, Preemption
from samrobust.step import (
    TrainState,
    create_train_state,
    evaluated_weights,
    evaluation_variables,
    make_train_steps,
    reset_ema,
    sam_groups,
    step_options,
)
from samrobust.validation import Validator, read_collapse, write_collapse
from samrobust.workdir import WorkdirLock


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir``'s latest readable checkpoint), evaluates, writes
    results; ``workdir`` may be local or ``gs://``. Holds the workdir's lock throughout
    (process 0). On SIGTERM/SIGINT it saves a checkpoint at the current step and raises
    ``PreemptedError``."""
    validate_config(config, jax.device_count())
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"config.batch_size must divide by the process count {jax.process_count()}"
        )
    is_chief = jax.process_index() == 0
    lock = WorkdirLock(workdir, "training", config.lock_stale_after_s) if is_chief else None
    preemption = Preemption()
    try:
        with lock or contextlib.nullcontext():
            return _train_and_evaluate(config, workdir, preemption, lock)
    finally:
        preemption.close()


@dataclasses.dataclass
class _Setup:
    """What every stage of a training run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    ds: input_pipeline.Dataset
    model: Any
    mesh: Mesh
    steps_per_epoch: int
    total_steps: int

    @property
    def is_chief(self) -> bool:
        return jax.process_index() == 0


@dataclasses.dataclass
class _Timing:
    """Training time (not compilation: the first step of each segment is not timed, nor is
    evaluation) of the earlier segments of a resumed run and of this one."""

    earlier_seconds: float = 0.0
    earlier_steps: int = 0
    seconds: float = 0.0
    steps: int = 0

    def extras(self) -> dict[str, float]:
        """What a checkpoint records, for the segments after it."""
        return {"train_seconds": self.total_seconds, "timed_steps": self.total_steps}

    @property
    def total_seconds(self) -> float:
        return self.earlier_seconds + self.seconds

    @property
    def total_steps(self) -> int:
        return self.earlier_steps + self.steps


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: Preemption,
    lock: WorkdirLock | None,
) -> dict[str, Any]:
    setup = _setup(config, workdir)
    lr_fn = learning_rate_schedule(config, setup.total_steps)
    grouped = sam_groups(config, setup.mesh.size) > 1
    tx = create_optimizer(config, lr_fn, grouped, setup.total_steps)
    init_key, step_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    config_dict = config.to_dict()
    check_lock = lock.check if lock is not None else lambda: None
    with contextlib.ExitStack() as resources:  # closed here, however the run ends
        ckpt = Checkpointer(
            workdir,
            config_dict,
            every_steps=config.checkpoint_every_steps,
            keep=config.keep_checkpoints,
        )
        resources.callback(ckpt.close)
        state, timing = _initial_state(setup, tx, init_key, ckpt)
        _announce(setup, config_dict, int(state.step))
        writer = MetricWriter(workdir, enabled=setup.is_chief)
        resources.callback(writer.close)
        validator = None
        if config.eval_every_epochs:
            validator = Validator(
                config, setup.ds, setup.model.apply, setup.mesh, eval_key, workdir, config_dict
            )
            resources.callback(validator.checkpointer.close)
        step_fn = make_train_steps(
            setup.model.apply,
            tx,
            step_options(config),
            setup.mesh,
            sam_perturbs(config, setup.total_steps),
        )
        collapse = read_collapse(workdir) if validator is not None else None
        if collapse is None:
            state, collapse = _train_loop(
                setup,
                state,
                step_fn,
                step_key,
                lr_fn,
                timing,
                ckpt,
                writer,
                validator,
                preemption,
                check_lock,
            )
        if collapse is not None:  # evaluate the best checkpoint, from before the collapse
            logging.warning(
                "catastrophic overfitting: validation robust accuracy %.4f at step %d, %.4f "
                "at step %d; training stopped there and the best checkpoint (step %d) is "
                "evaluated",
                collapse["val_robust"],
                collapse["step"],
                collapse["best_val_robust"],
                collapse["best_step"],
                collapse["best_step"],
            )
            state, _ = validator.checkpointer.restore(state, step=collapse["best_step"])
        if jax.process_count() > 1:  # every process must hold the same replica
            multihost_utils.assert_equal(
                jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params),
                "parameter replicas differ across processes",
            )
        results, masks = _final_evaluation(setup, state, timing, validator, writer)
        if collapse is not None:
            results["collapse"] = collapse
        if setup.is_chief:
            check_lock()
            out = paths.path(workdir)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            reports.save_masks(out / "eval_masks.npz", masks)
    logging.info("results: %s", json.dumps(results["accuracy"]))
    return results


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Setup:
    """The dataset (train/val sizes checked against it), the model and the mesh."""
    try:
        ds = input_pipeline.load(
            config.dataset,
            config.data_dir,
            train_examples=config.train_examples,
            val_examples=config.val_examples,
            cache_dir=config.cache_dir,
        )
    except ValueError as e:  # train/val sizes that do not fit the dataset
        raise ConfigError(str(e)) from e
    steps_per_epoch = len(ds.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config.batch_size = {config.batch_size} is larger than the {ds.name} train split "
            f"({len(ds.train_images)} images); lower it."
        )
    model = models.from_config(config, ds)
    mesh = parallel.default_mesh()
    total_steps = config.num_epochs * steps_per_epoch
    return _Setup(config, workdir, ds, model, mesh, steps_per_epoch, total_steps)


def _initial_state(
    setup: _Setup, tx: optax.GradientTransformation, key: jax.Array, ckpt: Checkpointer
) -> tuple[TrainState, _Timing]:
    """The latest readable checkpoint's state, or a fresh one (with the model's
    data-dependent initialisation, if it has one); the earlier segments' timing."""
    ds, mesh = setup.ds, setup.mesh
    state = create_train_state(
        key, setup.model, tx, ds.image_shape, mesh, ema=bool(setup.config.ema_decay)
    )
    restored = ckpt.restore(state)
    if restored is not None:
        state, extras = restored
        return state, _Timing(extras.get("train_seconds", 0.0), extras.get("timed_steps", 0))
    if models.has_data_init(state.params):
        # fast_cifar's whitening layer, from a fixed stratified subset of the train split.
        sample = input_pipeline.eval_subset(ds.train_labels, min(5000, len(ds.train_labels)))
        params = models.init_from_data(state.params, ds.train_images[sample], ds.mean, ds.std)
        state = reset_ema(state.replace(params=parallel.replicate(params, mesh)))
    return state, _Timing()


def _announce(setup: _Setup, config_dict: dict[str, Any], start_step: int) -> None:
    """Writes ``config.json`` (process 0) and logs what the run will do."""
    config = setup.config
    if setup.is_chief:
        out = paths.path(setup.workdir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    logging.info(
        "%s on %s: %d steps (%d epochs x %d), global batch %d on %d devices, %s",
        config.mode,
        setup.ds.name,
        setup.total_steps,
        config.num_epochs,
        setup.steps_per_epoch,
        config.batch_size,
        jax.device_count(),
        f"resuming at step {start_step}" if start_step else "from scratch",
    )


def _train_loop(
    setup: _Setup,
    state: TrainState,
    step_fn: Callable[[int], Callable],
    step_key: jax.Array,
    lr_fn: optax.Schedule,
    timing: _Timing,
    ckpt: Checkpointer,
    writer: MetricWriter,
    validator: Validator | None,
    preemption: Preemption,
    check_lock: Callable[[], None],
) -> tuple[TrainState, dict[str, Any] | None]:
    """Steps from ``state.step`` to the end: logs, checkpoints, validates; stops with a
    checkpoint on a signal (``PreemptedError``) or a non-finite loss
    (``TrainingDivergedError``), and on catastrophic overfitting
    (``config.stop_on_collapse``; returns the collapse record with the state)."""
    config, total_steps = setup.config, setup.total_steps
    start_step = int(state.step)
    batches = input_pipeline.prefetch(
        input_pipeline.train_batches(
            setup.ds.train_images,
            setup.ds.train_labels,
            config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    pending: list[dict[str, jax.Array]] = []
    t_last, last_step = None, start_step
    eval_every = config.eval_every_epochs * setup.steps_per_epoch
    for step in range(start_step + 1, total_steps + 1):
        images, labels = parallel.shard_batch(setup.mesh, *next(batches))
        state, metrics = step_fn(step - 1)(state, images, labels, step_key)
        pending.append(metrics)
        stop = preemption.reached(step)
        log_due = step % config.log_every_steps == 0 or step == total_steps
        ckpt_due = step % config.checkpoint_every_steps == 0 or step == total_steps or stop
        if log_due or ckpt_due or step == start_step + 1:
            summary = _fetch_metrics(pending, step, ckpt, config)
            now = time.perf_counter()
            if t_last is not None:  # the first step (compilation) is not timed
                timing.seconds += now - t_last
                timing.steps += step - last_step
            t_last, last_step = now, step
            if log_due:
                summary["learning_rate"] = float(lr_fn(step - 1))
                _log_progress(writer, step, total_steps, summary, timing, config.batch_size)
        if ckpt_due:
            check_lock()
            ckpt.save(step, state, force=step == total_steps or stop, extras=timing.extras())
        if validator is not None and (step % eval_every == 0 or step == total_steps):
            jax.block_until_ready(state)
            seconds = validator(step, state, writer)
            if t_last is not None:  # evaluation is not training time
                t_last += seconds
            collapse = None
            if config.stop_on_collapse:
                collapse = validator.collapsed(config.stop_on_collapse)
            if collapse is not None:
                check_lock()
                if not ckpt_due:
                    ckpt.save(step, state, force=True, extras=timing.extras())
                if setup.is_chief:
                    write_collapse(setup.workdir, collapse)
                return state, collapse
        if stop:
            raise PreemptedError(
                f"stopped by {signal.Signals(preemption.exit_code - 128).name} at step {step} "
                f"of {total_steps}: checkpoint {step} saved in {ckpt.directory}; run the same "
                "command to resume",
                preemption.exit_code,
            )
    return state, None


def _fetch_metrics(
    pending: list[dict[str, jax.Array]],
    step: int,
    ckpt: Checkpointer,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
    """The mean of the pending steps' metrics; stops the run if any loss is not finite."""
    fetched = jax.device_get(pending)
    pending.clear()
    losses_ = np.array([m["loss"] for m in fetched])
    if not np.all(np.isfinite(losses_)):
        raise TrainingDivergedError(
            f"Loss is {losses_[~np.isfinite(losses_)][0]} by step {step}. The last good "
            f"checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}. Lower "
            f"--config.learning_rate (now {config.learning_rate}) or --config.rho "
            f"(now {config.rho}), and resume or start a new --workdir."
        )
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _log_progress(
    writer: MetricWriter,
    step: int,
    total_steps: int,
    summary: dict[str, float],
    timing: _Timing,
    batch_size: int,
) -> None:
    rate = timing.steps * batch_size / timing.seconds if timing.steps else 0.0
    eta = (total_steps - step) * timing.seconds / timing.steps if timing.steps else 0.0
    writer.write(step, {f"train/{k}": v for k, v in summary.items()}, images_per_s=rate)
    logging.info(
        "step %d/%d (%.0f%%) loss %.4f acc %.3f lr %.4g | %.0f img/s | ETA %s",
        step,
        total_steps,
        100 * step / total_steps,
        summary["loss"],
        summary["accuracy"],
        summary["learning_rate"],
        rate,
        format_seconds(eta),
    )


def _final_evaluation(
    setup: _Setup,
    state: TrainState,
    timing: _Timing,
    validator: Validator | None,
    writer: MetricWriter,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The paper suite (PGD at ``config.eval_pgd_steps``) on the test points
    (``config.eval_num_examples``) for the final state and the best checkpoint: the
    results and the final state's per-example masks."""
    config, ds = setup.config, setup.ds
    test_images, test_labels, test_subset = input_pipeline.evaluation_points(
        ds, config.eval_num_examples
    )

    def test_suite(state: TrainState) -> dict[str, Any]:
        return robustness.pgd_suite(
            robustness.model_logits_fn(setup.model.apply),
            evaluation_variables(state),
            test_images,
            test_labels,
            specs=[
                dataclasses.replace(s, steps=config.eval_pgd_steps) for s in robustness.PAPER_SUITE
            ],
            batch_size=config.eval_batch_size,
            seed=config.seed,
            mesh=setup.mesh,
        )

    report = test_suite(state)
    results = {
        "mode": config.mode,
        "dataset": ds.name,
        "total_steps": int(state.step),
        "train_images_per_s": (
            timing.total_steps * config.batch_size / timing.total_seconds
            if timing.total_steps
            else None
        ),
        "train_seconds": timing.total_seconds,
        "train_examples": len(ds.train_labels),
        "val_examples": ds.num_val,
        "test_examples": len(test_labels),
        "test_subset": test_subset,
        "weights": evaluated_weights(config),
        "accuracy": report["accuracy"],
        "eval_images_per_s": report["images_per_s"],
    }
    if validator is not None:
        best_step, best_val = validator.best()
        logging.info("best checkpoint: step %d (validation %s)", best_step, best_val)
        if best_step == int(state.step):
            best_accuracy = report["accuracy"]
        else:
            best_state, _ = validator.checkpointer.restore(state, step=best_step)
            best_accuracy = test_suite(best_state)["accuracy"]
        results["validation"] = validator.describe()
        results["best"] = {"step": best_step, "val": best_val, "accuracy": best_accuracy}
    writer.write(int(state.step), {f"eval/{k}": v for k, v in report["accuracy"].items()})
    return results, report["masks"]
