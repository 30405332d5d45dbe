"""Evaluation during training: clean and PGD accuracy on the validation split every
``config.eval_every_epochs`` epochs, the best checkpoint by validation robust accuracy
(``WORKDIR/checkpoints_best``), and the catastrophic-overfitting guard
(``config.stop_on_collapse``: training stops when the robust accuracy falls that far below
its best, recorded in ``WORKDIR/collapse.json``)."""

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from samrobust import attacks, correctness, input_pipeline, paths, robustness
from samrobust.checkpoint import BEST_METRIC, Checkpointer
from samrobust.config_check import uses_attack
from samrobust.metrics import MetricWriter
from samrobust.step import TrainState, evaluation_variables


def validation_spec(config: ml_collections.ConfigDict) -> attacks.PGDSpec:
    """The PGD budget of evaluation during training: ``config.val_attack``'s fields where
    set, else the run's AT budget (at/sam_at) or Linf 2/255, step 0.5/255, PGD-10; under
    the collapse guard at least PGD-10 (step eps/4) even when training is single-step."""
    if uses_attack(config.mode):
        a = config.attack
        default = attacks.PGDSpec(a.norm, a.eps, a.step_size, a.steps)
    else:
        default = attacks.PGDSpec("linf", 2 / 255, 0.5 / 255, 10)
    if config.stop_on_collapse and default.steps < 10:  # the guard must see multi-step PGD
        default = attacks.PGDSpec(default.norm, default.eps, default.eps / 4, 10)
    v = config.val_attack
    return attacks.PGDSpec(
        v.norm if v.norm is not None else default.norm,
        v.eps if v.eps is not None else default.eps,
        v.step_size if v.step_size is not None else default.step_size,
        v.steps if v.steps is not None else default.steps,
    )


class Validator:
    """Evaluation during training: clean and PGD accuracy on the validation split (the test
    split when there is none) and the best checkpoint by robust accuracy."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        ds: input_pipeline.Dataset,
        apply_fn: Any,
        mesh: Mesh,
        key: jax.Array,
        workdir: str,
        config_dict: dict,
    ):
        self.split = "val" if ds.num_val else "test"
        self.images, self.labels = (
            (ds.val_images, ds.val_labels) if ds.num_val else (ds.test_images, ds.test_labels)
        )
        if not ds.num_val:
            logging.warning(
                "validating on the TEST split (config.val_examples = 0): the best checkpoint "
                "is then chosen on test data. Hold out a validation split with e.g. "
                "--config.val_examples=1000"
            )
        self.spec = validation_spec(config)
        self.every_epochs = config.eval_every_epochs
        self.batch_size = config.eval_batch_size
        self.mesh, self.key = mesh, key
        logits_fn = robustness.model_logits_fn(apply_fn)
        self.fns = {
            "clean": correctness.make_correct_fn(logits_fn, None, mesh),
            "robust": correctness.make_correct_fn(logits_fn, self.spec, mesh),
        }
        self.checkpointer = Checkpointer(workdir, config_dict, every_steps=1, keep=1, best=True)
        self.last: tuple[int, float] | None = None  # (step, robust accuracy) of the last one

    def __call__(self, step: int, state: TrainState, writer: MetricWriter) -> float:
        """Evaluates ``state``, logs ``val/clean`` and ``val/robust``, offers it as the best
        checkpoint; returns the seconds it took."""
        start = time.perf_counter()
        variables = evaluation_variables(state)
        accuracy = {
            name: float(
                correctness.correctness(
                    fn,
                    variables,
                    self.images,
                    self.labels,
                    self.key,
                    batch_size=self.batch_size,
                    mesh=self.mesh,
                ).mean()
            )
            for name, fn in self.fns.items()
        }
        writer.write(step, {f"val/{k}": v for k, v in accuracy.items()}, split=self.split)
        self.last = (step, accuracy["robust"])
        if step not in self.checkpointer.all_steps():  # a resumed run may have saved it
            self.checkpointer.save(
                step,
                state,
                force=True,
                metrics={BEST_METRIC: accuracy["robust"], "val_clean": accuracy["clean"]},
            )
        seconds = time.perf_counter() - start
        logging.info(
            "validation at step %d on %d %s images: clean %.4f, %s %.4f (%.0f s)",
            step,
            len(self.labels),
            self.split,
            accuracy["clean"],
            self.spec.name,
            accuracy["robust"],
            seconds,
        )
        return seconds

    def best(self) -> tuple[int, dict[str, float]]:
        """The best step and its validation accuracies (``clean``, ``robust``)."""
        self.checkpointer.manager.wait_until_finished()
        step = self.checkpointer.best_step()
        metrics = self.checkpointer.manager.metrics(step)
        return step, {"clean": metrics["val_clean"], "robust": metrics[BEST_METRIC]}

    def collapsed(self, drop: float) -> dict[str, Any] | None:
        """After a validation: the collapse record if its robust accuracy is more than
        ``drop`` below the best so far (catastrophic overfitting), else None."""
        best_step, best = self.best()
        step, robust = self.last
        if best["robust"] - robust <= drop:
            return None
        return {
            "step": step,
            "val_robust": robust,
            "best_step": best_step,
            "best_val_robust": best["robust"],
        }

    def describe(self) -> dict[str, Any]:
        """What the validation was: split, size, attack, frequency."""
        return {
            "split": self.split,
            "examples": len(self.labels),
            "every_epochs": self.every_epochs,
            "attack": dataclasses.asdict(self.spec) | {"name": self.spec.name},
        }


def collapse_path(workdir: str) -> epath.Path:
    return paths.path(workdir) / "collapse.json"


def read_collapse(workdir: str) -> dict[str, Any] | None:
    """The collapse record of a run that stopped on catastrophic overfitting, else None."""
    path = collapse_path(workdir)
    return json.loads(path.read_text()) if path.exists() else None


def write_collapse(workdir: str, record: dict[str, Any]) -> None:
    collapse_path(workdir).write_text(json.dumps(record, indent=2))
