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
