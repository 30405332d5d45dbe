"""End-to-end tests of ``python -m samrobust.main`` on the offline digits dataset."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.helpers import (
    CIFAR10_JPEG,
    REPO,
    TINY,
    TINY_TRAIN,
    load_checkpoint,
    main_command,
    read_results,
    run_main,
    run_module,
    run_two_processes,
    subprocess_env,
    train_on_cifar10_slice,
)

# Each mode's step once, on 1 device or sharded over 8: SGD and AT on 1, SAM + AT (both
# perturbations under sharding) on 8. SAM alone runs in the README's digits run (1 device),
# the killed-and-resumed run (2 devices) and the two-process run; SAM + AT on 1 device in
# the killed-and-resumed run.
MODE_DEVICES = [("sgd", 1), ("at", 1), ("sam_at", 8)]


@pytest.mark.parametrize(("mode", "devices"), MODE_DEVICES)
def test_main_runs_every_mode(tmp_path, mode, devices):
    workdir = str(tmp_path / mode)
    proc = run_main(f"configs/{mode}.py:digits", workdir, *TINY, devices=devices)
    results = read_results(workdir)
    assert results["mode"] == mode and results["dataset"] == "digits"
    assert results["total_steps"] == 1437 // 64
    assert set(results["accuracy"]) == {
        "clean",
        "pgd2_ce_linf_1/255",
        "pgd2_ce_linf_2/255",
        "pgd2_ce_l2_16/255",
        "pgd2_ce_l2_32/255",
    }
    for acc in results["accuracy"].values():
        assert 0.0 <= acc <= 1.0
    assert results["train_images_per_s"] > 0
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines if "train/loss" in x] == [5, 10, 15, 20, 22]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert "img/s" in proc.stderr and "ETA" in proc.stderr
    assert f"{devices} devices" in proc.stderr


def test_tensorboard_reads_the_event_file(tiny_run):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(tiny_run)
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20, 22]
    assert "eval/clean" in acc.Tags()["scalars"]


def test_cpu_devices_must_be_positive(tmp_path):
    proc = run_main("configs/sgd.py:digits", str(tmp_path), "--cpu_devices=0", check=False)
    assert proc.returncode != 0
    assert "--cpu_devices=0: 0 is not a positive integer" in proc.stderr


@pytest.mark.slow
def test_default_digits_run_learns(tmp_path):
    """The README's first command: far above chance (10%) on the digits test split (its
    final evaluation without PGD: the training is what is tested)."""
    workdir = str(tmp_path / "sam")
    run_main(
        "configs/sam.py:digits",
        workdir,
        "--config.eval_num_examples=120",
        "--config.eval_pgd_steps=0",
    )
    assert read_results(workdir)["accuracy"]["clean"] > 0.9


def _wait_for_checkpoint(workdir: str, step: int, proc: subprocess.Popen, timeout: float) -> None:
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "run ended"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


# Two epochs (44 steps), a checkpoint every 4: the runs killed and resumed or split over
# processes.
RESUMABLE = [
    *TINY_TRAIN,
    "--config.num_epochs=2",
    "--config.checkpoint_every_steps=4",
    "--config.keep_checkpoints=20",
]


TWO_DEVICES = "--cpu_devices=2"  # the host CPU split into 2 XLA devices


@pytest.fixture(scope="module")
def sam_on_2_devices(tmp_path_factory) -> str:
    """A finished ``RESUMABLE`` SAM run on 2 devices of one process (``--cpu_devices=2``):
    the reference of the killed-and-resumed run and of the two-process run."""
    workdir = str(tmp_path_factory.mktemp("sam2") / "run")
    proc = run_main("configs/sam.py:digits", workdir, *RESUMABLE, TWO_DEVICES)
    assert "2 devices (2 local)" in proc.stderr
    return workdir


@pytest.mark.parametrize("mode", ["sam_at", pytest.param("sam", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_ends_bitwise_equal(tmp_path, request, mode):
    """SAM + AT on 1 device; SAM sharded over 2 (against the shared reference)."""
    if mode == "sam":
        overrides = [*RESUMABLE, TWO_DEVICES]
        reference = request.getfixturevalue("sam_on_2_devices")
    else:
        overrides = RESUMABLE
        reference = str(tmp_path / "reference")
        run_main(f"configs/{mode}.py:digits", reference, *overrides)

    resumed = str(tmp_path / "resumed")
    proc = subprocess.Popen(
        main_command(f"configs/{mode}.py:digits", resumed, *overrides),
        cwd=REPO,
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_checkpoint(resumed, 8, proc, timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps_done = sorted(
        int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")) if s.isdigit()
    )
    assert steps_done[-1] < 44, "the run finished before it was killed"
    proc = run_main(f"configs/{mode}.py:digits", resumed, *overrides)
    assert f"resuming at step {steps_done[-1]}" in proc.stderr

    a, b = load_checkpoint(reference), load_checkpoint(resumed)
    assert int(a["step"]) == int(b["step"]) == 44
    # Training time adds up over both segments (each segment's first step is not timed).
    extras = [
        json.load(open(os.path.join(w, "checkpoints", "44", "meta", "metadata")))["extras"]
        for w in (reference, resumed)
    ]
    assert [e["timed_steps"] for e in extras] == [43, 42]
    assert read_results(resumed)["train_seconds"] == pytest.approx(extras[1]["train_seconds"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, sam_on_2_devices):
    """jax.distributed on 127.0.0.1: 2 processes x 1 device == 1 process x 2 devices
    (the host CPU split by ``--cpu_devices``). With more devices per all-reduce the
    layouts add in different orders and a run drifts apart by float rounding
    (docs/batch-jobs.md); a sum of two terms has one order."""
    multi = str(tmp_path / "multi")
    stderr = run_two_processes(main_command("configs/sam.py:digits", multi, *RESUMABLE))
    assert "2 devices (1 local), process 0 of 2" in stderr
    a, b = load_checkpoint(sam_on_2_devices), load_checkpoint(multi)
    assert int(a["step"]) == int(b["step"]) == 44
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert read_results(multi)["total_steps"] == read_results(sam_on_2_devices)["total_steps"]


@pytest.mark.slow
def test_validation_during_training_keeps_the_best_checkpoint(tmp_path):
    """eval_every_epochs on a held-out split: val/* metrics, the best checkpoint by robust
    accuracy, results.json's "best", and evaluate --checkpoint=best reading it."""
    from samrobust.checkpoint import checkpoint_dir

    workdir = str(tmp_path / "val")
    overrides = [o for o in TINY_TRAIN if "num_epochs" not in o]
    run_main(
        "configs/sgd.py:digits",
        workdir,
        *overrides,
        "--config.num_epochs=3",
        "--config.val_examples=200",
        "--config.eval_every_epochs=1",
        "--config.val_attack.steps=2",
    )
    results = read_results(workdir)
    assert results["val_examples"] == 200 and results["train_examples"] == 1438 - 200
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    val = {x["step"]: x for x in lines if "val/robust" in x}
    steps_per_epoch = (1438 - 200) // 64
    assert sorted(val) == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert all(x["split"] == "val" and 0 <= x["val/clean"] <= 1 for x in val.values())
    best = max(sorted(val), key=lambda s: (val[s]["val/robust"], s))  # ties: the later step
    assert results["best"]["step"] == best
    assert results["best"]["val"]["robust"] == val[best]["val/robust"]
    assert set(results["best"]["accuracy"]) == set(results["accuracy"])
    assert results["validation"]["split"] == "val"
    assert results["validation"]["attack"]["name"] == "pgd2_ce_linf_2/255"
    assert os.listdir(checkpoint_dir(workdir, "best")) == [str(best)]
    assert int(load_checkpoint(workdir)["step"]) == 3 * steps_per_epoch  # latest = final

    proc = run_module(
        "samrobust.evaluate",
        f"--workdir={workdir}",
        "--checkpoint=best",
        "--suite=clean",
        "--num_examples=32",
        "--batch_size=32",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval_clean_sub32_best.json")) as f:
        report = json.load(f)
    assert report["run"]["step"] == best and report["run"]["checkpoint"] == "best"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CIFAR10_JPEG), reason="../shared/data not beside the repo")
def test_fast_sam_recipe_on_a_slice_of_real_cifar10_beats_chance(tmp_path):
    """``configs/sam.py:fast`` (fast_cifar, whitening init, label smoothing, Nesterov,
    triangle schedule, SAM per group of 50) on 1,000 train and 200 test images of the
    shared CIFAR-10 JPEG copy, width 16, 8 epochs (0.445 clean when written, 0.52 at 15)."""
    results = train_on_cifar10_slice(
        tmp_path,
        "configs/sam.py:fast",
        "--config.width=16",
        "--config.num_epochs=8",
        "--config.batch_size=100",
        "--config.sam_group_size=50",
        "--config.eval_batch_size=100",
        "--config.eval_pgd_steps=0",
    )
    assert results["mode"] == "sam" and results["train_examples"] == 1000
    assert results["accuracy"]["clean"] > 0.3, results["accuracy"]  # chance: 0.10
