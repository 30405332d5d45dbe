"""A training run's checkpoint, ready to evaluate: its config, weights, model and data.

:func:`load_run` restores a ``samrobust.main`` run (local or ``gs://``) for
:func:`samrobust.robustness.evaluate`::

  run = load_run("runs/sam", checkpoint="best")
  report = robustness.evaluate(run.logits_fn, run.variables, images, labels)
"""

import dataclasses
import json
from typing import Any

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import input_pipeline, models, paths
from samrobust.checkpoint import CheckpointError, checkpoint_dir, read_state
from samrobust.errors import UserError
from samrobust.parallel import default_mesh
from samrobust.robustness import ApplyFn, model_logits_fn
from samrobust.step import evaluated_weights, evaluation_variables


class EvaluationError(UserError, RuntimeError):
    """A workdir cannot be evaluated; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run's checkpoint, ready to evaluate."""

    workdir: str
    config: dict[str, Any]
    step: int
    logits_fn: ApplyFn
    variables: Any  # the weight average of a run with config.ema_decay, else the weights
    dataset: input_pipeline.Dataset

    @property
    def weights(self) -> str:
        """Which weights ``variables`` holds: ``ema`` or ``trained``."""
        return evaluated_weights(self.config)


def parse_checkpoint(text: str) -> str | int:
    """``best``, ``latest`` or a step number, as ``--checkpoint`` takes it."""
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"{text!r} is not best, latest or a step number (e.g. --checkpoint=best)")


def _restore(workdir: str, mesh: Mesh, checkpoint: str | int) -> tuple[int, dict[str, Any]]:
    """(step, ``{"params", "batch_stats"}``) of checkpoint ``best``, ``latest`` or a step,
    replicated on ``mesh``: the weight average where the run kept one."""
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
    return step, evaluation_variables(state)


def load_run(
    workdir: str,
    *,
    data_dir: str | None = None,
    mesh: Mesh | None = None,
    checkpoint: str | int = "latest",
) -> Run:
    """A checkpoint (``best``, ``latest`` or a step) of the ``samrobust.main`` run in
    ``workdir`` (local or e.g. gs://), its model (from ``workdir/config.json``) and its
    dataset (``data_dir`` overrides the run's)."""
    config = run_config(workdir)
    step, variables = _restore(workdir, mesh or default_mesh(), checkpoint)
    ds = input_pipeline.load(
        config["dataset"], data_dir or config.get("data_dir"), cache_dir=config.get("cache_dir")
    )
    model = models.from_config(config, ds)
    return Run(workdir, config, step, model_logits_fn(model.apply), variables, ds)


def run_config(workdir: str) -> dict[str, Any]:
    """The config a ``samrobust.main`` run in ``workdir`` saved; an ``EvaluationError`` if
    ``workdir`` is not such a run."""
    path = paths.path(workdir)
    if not path.is_dir():
        raise EvaluationError(
            f"--workdir={workdir} does not exist. Pass the --workdir of a training run, or "
            f"train one: python -m samrobust.main --config=configs/sam.py:digits "
            f"--workdir={workdir}"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EvaluationError(
            f"{config_path} not found: {workdir} is not a samrobust training run. Pass the "
            "--workdir given to samrobust.main (it holds config.json and checkpoints/)."
        )
    return json.loads(config_path.read_text())
