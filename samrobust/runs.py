"""A training run's checkpoint, ready to evaluate: its config, weights, model and data.

:func:`load_run` restores a ``samrobust.main`` run (local or ``gs://``) for
:func:`samrobust.robustness.evaluate`::

  run = load_run("runs/sam", checkpoint="best")
  report = robustness.evaluate(run.logits_fn, run.variables, images, labels)

:func:`load_torch_checkpoint` does the same for a RobustBench-format PyTorch checkpoint
(:mod:`samrobust.torch_weights`), whose reports go to a workdir of the caller's choosing.
"""

import dataclasses
import hashlib
import io
import json
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import input_pipeline, models, paths, torch_weights
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


TORCH_EVAL_BATCH_SIZE = 256  # a PyTorch checkpoint's evaluation batch (no config says one)
TORCH_RECORD = "torch_checkpoint.json"  # which checkpoint a workdir's reports are of


def read_torch_state_dict(path: str) -> tuple[dict[str, Any], str]:
    """``(state_dict as float32/int numpy arrays, sha256 of the file)`` of a PyTorch
    checkpoint: a ``state_dict``, or a dict holding one under ``state_dict``; the ``module.``
    (DataParallel) and ``model.`` prefixes removed, as RobustBench's loader does."""
    try:
        import torch
    except ImportError:
        raise EvaluationError(
            "--torch_checkpoint needs torch: pip install -e '.[reference]'"
        ) from None
    file = paths.path(path)
    if not file.is_file():
        raise EvaluationError(f"--torch_checkpoint={path} does not exist")
    data = file.read_bytes()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files it cannot read
        raise EvaluationError(
            f"--torch_checkpoint={path} is not a PyTorch state_dict torch.load can read "
            f"with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EvaluationError(
            f"--torch_checkpoint={path} holds a {type(obj).__name__}, not a state_dict"
        )
    state = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.float() if v.is_floating_point() else v  # bfloat16 has no numpy type
            state[k.removeprefix("module.").removeprefix("model.")] = v.numpy()
    return state, hashlib.sha256(data).hexdigest()


def load_torch_checkpoint(
    path: str,
    workdir: str,
    dataset: str,
    *,
    data_dir: str | None = None,
    mesh: Mesh | None = None,
) -> Run:
    """The RobustBench-format PyTorch checkpoint ``path`` (PreActResNet-18 or WideResNet:
    :func:`samrobust.torch_weights.from_state_dict`) as a :class:`Run` (step 0) on
    ``dataset``'s test split, its reports going to ``workdir``. Everything is checked
    before anything is written. The model keeps the checkpoint's own input normalisation
    (its ``mu``/``sigma``, or none), not the dataset's."""
    state, sha256 = read_torch_state_dict(path)
    try:
        model, variables = torch_weights.from_state_dict(state)
    except torch_weights.WeightsError as e:
        raise EvaluationError(f"--torch_checkpoint={path}: {e}") from None
    ds = input_pipeline.load(dataset, data_dir)
    classes = variables["params"]["Dense_0"]["bias"].shape[0]
    channels = variables["params"]["stem"]["kernel"].shape[2]
    if classes != ds.num_classes or ds.test_images.shape[1:] != (32, 32, channels):
        raise EvaluationError(
            f"--torch_checkpoint={path} takes 32x32x{channels} images and has {classes} "
            f"outputs; {dataset} has {ds.test_images.shape[1:]} images and {ds.num_classes} "
            "classes: pass the --dataset (and --data_dir) it was trained on"
        )
    config = {
        "mode": "torch",
        "dataset": dataset,
        "data_dir": data_dir,
        "eval_batch_size": TORCH_EVAL_BATCH_SIZE,
        "seed": 0,
        "model": torch_weights.architecture(state),
        "padding": "torch",
        "mean": list(model.mean),
        "std": list(model.std),
        "torch_checkpoint": path,
        "torch_sha256": sha256,
    }
    variables = jax.device_put(variables, NamedSharding(mesh or default_mesh(), P()))
    return Run(workdir, config, 0, model_logits_fn(model.apply), variables, ds)


def claim_torch_workdir(workdir: str, run: Run) -> None:
    """Records in ``workdir`` which PyTorch checkpoint its reports are of (the first
    evaluation there); an ``EvaluationError`` if it holds another's (or a training run's)."""
    path = paths.path(workdir)
    if (path / "config.json").exists():
        raise EvaluationError(
            f"--workdir={workdir} is a training run's: give --torch_checkpoint a workdir of its own"
        )
    record = path / TORCH_RECORD
    mine = {k: run.config[k] for k in ("torch_checkpoint", "torch_sha256")}
    if record.exists():
        theirs = json.loads(record.read_text())
        if theirs["torch_sha256"] != mine["torch_sha256"]:
            raise EvaluationError(
                f"--workdir={workdir} holds the reports of {theirs['torch_checkpoint']} "
                f"(sha256 {theirs['torch_sha256'][:12]}), not of this checkpoint: give it "
                "a workdir of its own"
            )
    else:
        record.write_text(json.dumps(mine, indent=2))
