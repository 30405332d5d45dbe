"""Checkpoints through real processes: falling back past a damaged checkpoint, and
SIGTERM/SIGINT saving the current step so that the resumed run ends bitwise equal."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from samrobust import preemption
from samrobust.checkpoint import config_mismatch
from samrobust.preemption import PreemptedError, Preemption
from tests.helpers import (
    TINY_RUN,
    TINY_TRAIN,
    digits_config,
    load_checkpoint,
    run_main,
    run_module,
    start_main,
)

OVERRIDES = TINY_RUN  # the shared run's: 22 steps, a checkpoint every 5 (and at 22), all kept


def damage(workdir: str, step: int) -> None:
    """Overwrites the array data of checkpoint ``step`` (its metadata stays readable)."""
    data = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        with open(os.path.join(data, name), "wb") as f:
            f.write(b"not an array")


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def finished_run(tiny_run) -> tuple[str, dict]:
    """The shared finished tiny SGD run (every checkpoint kept; copy it to change it) and its
    final state."""
    return tiny_run, load_checkpoint(tiny_run)


def test_resume_falls_back_past_a_damaged_checkpoint(finished_run, tmp_path):
    source, final = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    os.remove(os.path.join(workdir, "results.json"))
    damage(workdir, 22)

    proc = run_main("configs/sgd.py:digits", workdir, *OVERRIDES)
    assert "checkpoint step 22 is damaged" in proc.stderr
    assert "resuming at step 20" in proc.stderr
    aside = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "damaged" in d]
    assert len(aside) == 1 and aside[0].startswith("damaged-22-")  # kept, not deleted
    assert_trees_equal(load_checkpoint(workdir), final)  # steps 21-22 redone exactly
    assert json.load(open(os.path.join(workdir, "results.json")))["total_steps"] == 22


def test_no_readable_checkpoint_stops_and_moves_nothing(finished_run, tmp_path):
    source, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    for step in (5, 10, 15, 20, 22):
        damage(workdir, step)
    proc = run_main("configs/sgd.py:digits", workdir, *OVERRIDES, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # One error line. (orbax/tensorstore may also print "Event loop is closed" tracebacks
    # from their reader threads after several failed reads: not ours to silence.)
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "error: No readable checkpoint" in errors[0], errors
    assert "step 22:" in errors[0] and "step 5:" in errors[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == [
        "5",
        "10",
        "15",
        "20",
        "22",
    ]


@pytest.mark.slow
def test_evaluate_skips_a_damaged_latest_checkpoint(finished_run, tmp_path):
    source, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    damage(workdir, 22)
    proc = run_module(
        "samrobust.evaluate",
        f"--workdir={workdir}",
        "--suite=clean",
        "--num_examples=16",
        "--batch_size=16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 22" in proc.stderr and "damaged" in proc.stderr
    report = json.load(open(os.path.join(workdir, "eval_clean_sub16.json")))
    assert report["run"]["step"] == 20
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "22"))  # left as it is


def _wait_for_metrics(workdir: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run has logged its first metrics (step 5): it is training."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run logged nothing"
        time.sleep(0.02)


# Checkpoints only at the end (every 1000 steps): what survives a signal is the signal's save.
SIGNAL_OVERRIDES = [*TINY_TRAIN, "--config.num_epochs=3", "--config.checkpoint_every_steps=1000"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("signal") / "reference")
    run_main("configs/sam.py:digits", workdir, *SIGNAL_OVERRIDES)
    return load_checkpoint(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_resume_is_bitwise_equal(tmp_path, signum, uninterrupted):
    overrides = SIGNAL_OVERRIDES
    workdir = str(tmp_path / "stopped")
    proc = start_main("configs/sam.py:digits", workdir, *overrides, stderr=subprocess.PIPE)
    _wait_for_metrics(workdir, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert len(steps) == 1 and 5 <= steps[0] < 66, steps  # stopped mid-run, saved there
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step {steps[0]} of 66" in err
    assert not os.path.exists(os.path.join(workdir, "lock.json"))  # released

    resumed = run_main("configs/sam.py:digits", workdir, *overrides)
    assert f"resuming at step {steps[0]}" in resumed.stderr
    assert_trees_equal(load_checkpoint(workdir), uninterrupted)


def test_preemption_turns_a_signal_into_a_stop_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    preemption = Preemption()
    try:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(2) and preemption.exit_code == 143
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) is before
    assert PreemptedError("x", 143).exit_code == 143


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_lost_in_a_destructor_still_stops_the_evaluation():
    """Python ignores the handler's SystemExit when the signal lands in ``__del__`` (in a CI
    run: JAX's garbage-collector callback, and the evaluation ran to its end); the next batch
    boundary (``exit_if_signalled``) raises it again."""

    class Dying:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    class Broken:
        def __del__(self):
            raise ValueError("a bug")

    before, hook, printed = signal.getsignal(signal.SIGTERM), sys.unraisablehook, []
    sys.unraisablehook = printed.append  # what Python would print as "Exception ignored"
    try:
        preemption.exit_on_sigterm()
        preemption.exit_if_signalled()  # no signal yet: nothing happens
        Dying()  # the handler runs inside __del__: its SystemExit is ignored
        assert not printed  # no bug to report
        with pytest.raises(SystemExit) as stop:
            preemption.exit_if_signalled()
        assert stop.value.code == 143
        preemption.exit_if_signalled()  # the signal counts once
        hook_now = sys.unraisablehook
        preemption.exit_on_sigterm()  # a second call does not wrap the hook again
        assert sys.unraisablehook is hook_now
        Broken()  # any other ignored exception is still reported
        assert [type(p.exc_value) for p in printed] == [ValueError]
    finally:
        signal.signal(signal.SIGTERM, before)
        sys.unraisablehook = hook
        preemption._sigterm = None


def test_config_mismatch_names_changed_keys_but_not_resumable_ones():
    # The refusal itself, through the CLI on a finished run: tests/test_errors.py.
    saved = digits_config().to_dict()
    assert config_mismatch(saved, digits_config(width=8, rho=0.2).to_dict()) == [
        "rho: checkpoint 0.05 vs now 0.2",
        "width: checkpoint 4 vs now 8",
    ]
    # Logging/eval settings may change on resume.
    assert (
        config_mismatch(saved, digits_config(log_every_steps=7, eval_pgd_steps=3).to_dict()) == []
    )
    # A config saved before a key existed ran with the key's listed value: it still matches
    # a config that holds that value, on either side, and not one that holds another.
    older = {k: v for k, v in saved.items() if k not in ("nesterov", "label_smoothing")}
    assert config_mismatch(older, saved) == config_mismatch(saved, older) == []
    assert config_mismatch(older, digits_config(label_smoothing=0.2).to_dict()) == [
        "label_smoothing: checkpoint 0.0 vs now 0.2"
    ]
