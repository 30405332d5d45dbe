"""The training loop (``samrobust.train``): config errors before any compute, NaN losses,
no tensorflow on the offline default."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from samrobust import config_check, train
from tests.helpers import REPO, digits_config, load_checkpoint, subprocess_env


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("mode", "adam", "config.mode = 'adam'"),
        ("dataset", "imagenet", "config.dataset = 'imagenet'"),
        ("model", "vgg", "config.model = 'vgg'"),
        ("rho", -0.1, "config.rho = -0.1: must be >= 0"),
        ("attack.eps", -1.0, "config.attack.eps = -1.0: must be >= 0"),
        ("attack.steps", -2, "config.attack.steps = -2: must be >= 0"),
        ("attack.norm", "l1", "config.attack.norm = 'l1'"),
        ("batch_size", 12, "config.batch_size = 12: must be a positive multiple of the device"),
        ("lr_schedule", "step", "config.lr_schedule = 'step'"),
    ],
)
def test_invalid_config_fails_before_any_compute(tmp_path, key, value, message):
    config = digits_config(**{key: value})
    with pytest.raises(
        config_check.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")
    ) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert "--config." + key in str(e.value)  # names the fix
    assert not (tmp_path / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    config = digits_config(
        learning_rate=1e12, log_every_steps=1, checkpoint_every_steps=1, keep_checkpoints=50
    )
    with pytest.raises(train.TrainingDivergedError, match="last good checkpoint") as e:
        train.train_and_evaluate(config, workdir)
    assert "--config.learning_rate" in str(e.value)
    state = load_checkpoint(workdir)
    assert 1 <= int(state["step"]) < 22
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
    assert not (tmp_path / "run" / "results.json").exists()


def test_training_on_digits_never_imports_tensorflow():
    code = (
        "import sys; from samrobust import main, train, evaluate, autoattack, input_pipeline; "
        "input_pipeline.load('digits'); assert 'tensorflow' not in sys.modules, 'tf imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(1),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_the_weight_average_is_checkpointed_and_is_what_every_evaluation_uses(tmp_path):
    from samrobust import correctness, input_pipeline, parallel, runs

    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(digits_config(ema_decay=0.9), workdir)
    assert results["weights"] == "ema"
    state = load_checkpoint(workdir)
    gap = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(state["ema"]["params"]), jax.tree.leaves(state["params"]), strict=True
        )
    )
    assert gap > 1e-4  # the average is not the weights
    run = runs.load_run(workdir)
    assert run.weights == "ema"
    for got, want in zip(
        jax.tree.leaves(run.variables), jax.tree.leaves(state["ema"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    # The final evaluation's clean accuracy is the average's.
    images, labels, _ = input_pipeline.evaluation_points(run.dataset, 64)
    mesh = parallel.default_mesh()
    clean = correctness.correctness(
        correctness.make_correct_fn(run.logits_fn, None, mesh),
        run.variables,
        images,
        labels,
        jax.random.key(0),
        batch_size=64,
        mesh=mesh,
    )
    assert float(clean.mean()) == results["accuracy"]["clean"]


@pytest.mark.slow
def test_a_collapsing_fast_at_run_stops_and_evaluates_its_pre_collapse_checkpoint(tmp_path):
    """FGSM-RS on the digits with a learning rate that grows 60x in the second half: the
    validation PGD accuracy collapses (0.525 at step 38, 0.175 at step 57 when crafted)."""
    from configs import at as at_config
    from samrobust.validation import read_collapse

    workdir = str(tmp_path / "run")
    config = digits_config(
        at_config,
        num_epochs=4,
        width=8,
        val_examples=200,
        eval_every_epochs=1,
        stop_on_collapse=0.05,
        learning_rate=0.1,
        lr_schedule="triangle",
        lr_triangle=(1.0, 0.5, 60.0),
        **{"attack.eps": 0.05, "attack.step_size": 0.0625, "attack.steps": 1},
    )
    results = train.train_and_evaluate(config, workdir)
    collapse = results["collapse"]
    assert collapse == read_collapse(workdir)
    assert collapse["best_step"] < collapse["step"] < 76  # stopped before the end
    assert collapse["best_val_robust"] - collapse["val_robust"] > 0.05
    assert results["total_steps"] == collapse["best_step"]  # the evaluated state is the best
    assert results["validation"]["attack"]["steps"] == 10  # the guard watches PGD-10
    assert int(load_checkpoint(workdir)["step"]) == collapse["step"]
    # Running the command again (a scheduler's retry) trains no further.
    again = train.train_and_evaluate(config, workdir)
    assert again["collapse"] == collapse and again["accuracy"] == results["accuracy"]
    assert int(load_checkpoint(workdir)["step"]) == collapse["step"]
