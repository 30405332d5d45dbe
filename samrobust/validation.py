"""Evaluation during training: clean and PGD accuracy on the validation split every
``config.eval_every_epochs`` epochs, and the best checkpoint by validation robust accuracy
(``WORKDIR/checkpoints_best``)."""

import dataclasses
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from samrobust import attacks, input_pipeline, robustness
from samrobust.checkpoint import BEST_METRIC, Checkpointer
from samrobust.config_check import uses_attack
from samrobust.metrics import MetricWriter
from samrobust.step import TrainState


def validation_spec(config: ml_collections.ConfigDict) -> attacks.PGDSpec:
    """The PGD budget of evaluation during training: ``config.val_attack``'s fields where
    set, else the run's AT budget (at/sam_at) or Linf 2/255, step 0.5/255, PGD-10."""
    if uses_attack(config.mode):
        a = config.attack
        default = attacks.PGDSpec(a.norm, a.eps, a.step_size, a.steps)
    else:
        default = attacks.PGDSpec("linf", 2 / 255, 0.5 / 255, 10)
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
            "clean": robustness.make_correct_fn(logits_fn, None, mesh),
            "robust": robustness.make_correct_fn(logits_fn, self.spec, mesh),
        }
        self.checkpointer = Checkpointer(workdir, config_dict, every_steps=1, keep=1, best=True)

    def __call__(self, step: int, state: TrainState, writer: MetricWriter) -> float:
        """Evaluates ``state``, logs ``val/clean`` and ``val/robust``, offers it as the best
        checkpoint; returns the seconds it took."""
        start = time.perf_counter()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        accuracy = {
            name: float(
                robustness.correctness(
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

    def describe(self) -> dict[str, Any]:
        """What the validation was: split, size, attack, frequency."""
        return {
            "split": self.split,
            "examples": len(self.labels),
            "every_epochs": self.every_epochs,
            "attack": dataclasses.asdict(self.spec) | {"name": self.spec.name},
        }
