"""Tests of ``samrobust.evaluate``, the CLI, end to end on a tiny digits run (and the library
on the restored run against it).

One tiny training run (``tests.helpers.TINY``) is shared by the module. Attack loops are
rolled (``unroll=1``) and AutoAttack's budget is reduced: most of the runtime is compilation.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from samrobust import input_pipeline, robustness, runs
from tests.helpers import (
    REPO,
    TINY_TRAIN,
    built_once,
    run_main,
    run_two_processes,
    subprocess_env,
    write_folder,
)

N = 32  # test examples evaluated
AA_FAST = ["--n_iter=10", "--n_queries=100", "--unroll=1"]
# The reports' stems: a reduced budget is named, never written as the standard protocol.
FULL_STEM = f"eval_full_linf_8_255_it10_tc9_q100_sub{N}"
AA_STEM = f"eval_autoattack_linf_8_255_it10_tc9_q100_sub{N}"
PAPER = [
    "clean",
    "pgd10_ce_linf_1/255",
    "pgd10_ce_linf_2/255",
    "pgd10_ce_l2_16/255",
    "pgd10_ce_l2_32/255",
]
EXTRA = ["pgd20_ce_linf_4/255", "pgd20_cw_linf_4/255", "pgd20_ce_linf_8/255", "pgd20_cw_linf_8/255"]
AA = "autoattack_linf_8/255"
STAGES = ["apgd-ce", "apgd-t", "fab-t", "square"]


def run_evaluate(workdir: str, *flags: str, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "samrobust.evaluate", f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> str:
    """A copy of the shared tiny run, for this module's reports."""
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    shutil.copytree(tiny_run, workdir)
    return workdir


@pytest.fixture(scope="module")
def full_eval(tiny_run, tmp_path_factory) -> tuple[str, str, dict, dict]:
    """``--suite=full`` on N test examples (the evaluation subset), 8 devices (the host CPU
    split by ``--cpu_devices``), on a copy of the tiny run, once per session (it takes
    minutes): (its workdir, stderr, JSON, masks)."""

    def build(workdir: str) -> None:
        shutil.copytree(tiny_run, workdir)
        flags = ("--suite=full", f"--num_examples={N}", "--cpu_devices=8", *AA_FAST)
        proc = run_evaluate(workdir, *flags, devices=1)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(os.path.join(workdir, "stderr.txt"), "w") as f:
            f.write(proc.stderr)

    workdir = built_once(tmp_path_factory, "full-eval", build)
    with open(os.path.join(workdir, f"{FULL_STEM}.json")) as f:
        report = json.load(f)
    with np.load(os.path.join(workdir, f"{FULL_STEM}_masks.npz")) as m:
        masks = dict(m)
    return workdir, open(os.path.join(workdir, "stderr.txt")).read(), report, masks


def test_cli_full_suite_writes_json_markdown_and_masks(full_eval):
    workdir, log, report, masks = full_eval
    acc = report["accuracy"]
    assert list(acc) == PAPER + EXTRA + [AA]
    assert report["run"]["step"] == 1437 // 64 and report["run"]["dataset"] == "digits"
    assert report["num_examples"] == N and report["devices"] == 8 and report["batch_size"] == 64
    assert report["attacks"]["pgd20_cw_linf_8/255"]["step_size"] == pytest.approx(2 / 255)
    assert report["attacks"][AA] == {
        "attack": "AutoAttack",
        "version": "standard",
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
        "norm": "linf",
        "eps": pytest.approx(8 / 255),
        "n_iter": 10,
        "n_target_classes": 9,
        "n_queries": 100,
        "n_restarts": 1,
        "eot_iter": 1,
    }
    assert all(report["images_per_s"][k] > 0 for k in acc)

    # Masks: one per attack and per AutoAttack stage, consistent with the accuracies.
    assert set(masks) == {k.replace("/", "_") for k in acc} | {
        f"{AA}_{s}".replace("/", "_") for s in STAGES
    }
    for name, value in acc.items():
        m = masks[name.replace("/", "_")]
        assert m.dtype == bool and m.shape == (N,) and m.mean() == pytest.approx(value)

    # Ordering: clean >= PGD >= AutoAttack (same budget); AutoAttack's masks only shrink.
    aa_masks = [masks["clean"]] + [masks[f"{AA}_{s}".replace("/", "_")] for s in STAGES]
    for before, after in zip(aa_masks, aa_masks[1:], strict=False):
        assert not np.any(after & ~before)
    assert np.array_equal(aa_masks[-1], masks[AA.replace("/", "_")])
    assert all(acc["clean"] >= acc[k] for k in PAPER + EXTRA)
    assert acc[AA] <= min(acc["pgd20_ce_linf_8/255"], acc["pgd20_cw_linf_8/255"])
    assert acc["clean"] > acc[AA]  # a 1-epoch model is not robust at 8/255

    details = report["autoattack"]
    assert details["name"] == AA
    assert list(details["stages"]) == STAGES and details["stages"]["square"] == acc[AA]
    assert 0 < details["max_perturbation"] <= 8 / 255 + 1e-6
    assert details["rejected"] == dict.fromkeys(STAGES, 0)
    assert details["attacked"]["apgd-ce"] == masks["clean"].sum()
    assert any("reduced AutoAttack budget" in w for w in report["warnings"])

    with open(os.path.join(workdir, f"{FULL_STEM}.md")) as f:
        md = f.read()
    assert "| attack | norm | eps | accuracy | img/s |" in md
    assert "| PGD-20 CW, step 2/255 | linf | 8/255 |" in md
    assert "AutoAttack standard (n_iter 10, n_queries 100) | linf | 8/255 |" in md
    assert f"{100 * acc[AA]:.2f}%" in md and "after fab-t" in md
    assert "reduced AutoAttack budget" in md

    # Progress: per attack and per AutoAttack batch, with images/s; the default radius.
    assert "eval pgd20_cw_linf_8/255 batch 1/1" in log and "img/s" in log
    assert "autoattack apgd-t run 1/9 batch 1/1" in log
    assert "digits has no standard one" in log


def test_python_api_on_the_restored_run_matches_the_cli(run_dir, full_eval):
    """``load_run`` + ``evaluate`` in this process (8 devices too) give the CLI's masks."""
    _, _, cli_report, cli_masks = full_eval
    run = runs.load_run(run_dir)
    images, labels, subset = input_pipeline.evaluation_points(run.dataset, N)
    assert cli_report["subset"] == subset  # the CLI's N points are the evaluation subset
    report = robustness.evaluate(
        run.logits_fn,
        run.variables,
        images,
        labels,
        suite="paper",
        num_classes=10,
        batch_size=64,
        seed=0,
        unroll=1,
    )
    assert list(report["accuracy"]) == PAPER and "autoattack" not in report
    for name in PAPER:
        np.testing.assert_array_equal(report["masks"][name], cli_masks[name.replace("/", "_")])
    assert report["warnings"] == []


@pytest.mark.slow
def test_training_and_evaluate_take_the_same_stratified_points_of_a_sorted_folder(tmp_path):
    """On a class-sorted image folder, training's ``eval_num_examples=N`` and ``evaluate
    --num_examples=N`` evaluate the same stratified N points (not the first N: one class)."""
    root = tmp_path / "images"
    write_folder(root, per_class=(22, 10))  # 3 classes; test labels 0*10, 1*10, 2*10
    workdir, n = str(tmp_path / "run"), 12
    data = ["--config.dataset=image_folder", f"--config.data_dir={root}"]
    data += [f"--config.cache_dir={tmp_path / 'cache'}", "--config.crop_padding=0"]
    run_main(
        "configs/sgd.py:digits", workdir, *TINY_TRAIN, *data, f"--config.eval_num_examples={n}"
    )
    proc = run_evaluate(workdir, "--suite=clean", f"--num_examples={n}", devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "results.json")) as f:
        trained = json.load(f)
    with open(os.path.join(workdir, f"eval_clean_sub{n}.json")) as f:
        evaluated = json.load(f)
    ds = input_pipeline.load("image_folder", str(root), cache_dir=str(tmp_path / "cache"))
    idx = input_pipeline.eval_subset(ds.test_labels, n)
    np.testing.assert_array_equal(np.bincount(ds.test_labels[idx]), [4, 4, 4])
    expected = input_pipeline.describe_subset(idx, 30)
    assert trained["test_subset"] == evaluated["subset"] == expected
    assert trained["test_examples"] == evaluated["num_examples"] == n
    with np.load(os.path.join(workdir, "eval_masks.npz")) as m:
        assert m["clean"].shape == (n,)
    assert f"on {n} image_folder test examples (class-stratified, seed 0)" in proc.stderr


def test_cli_errors_name_the_fix(tmp_path, run_dir):
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    with open(os.path.join(run_dir, "config.json")) as src:
        (no_ckpt / "config.json").write_text(src.read())
    (tmp_path / "empty").mkdir()
    fix = "python -m samrobust.main --config="  # how to create a run there
    cases = [
        ([f"--workdir={tmp_path / 'missing'}"], ["does not exist", fix]),
        ([f"--workdir={tmp_path / 'empty'}"], ["config.json not found", "--workdir given to"]),
        ([f"--workdir={no_ckpt}"], ["No checkpoint", fix]),
        ([f"--workdir={run_dir}", "--suite=strong"], ["--suite", "paper"]),
        ([f"--workdir={run_dir}", "--suite=full", "--norm=l1"], ["--norm", "linf"]),
        ([f"--workdir={run_dir}", "--eps=8/255"], ["autoattack or full suite"]),
    ]
    for flags, messages in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "samrobust.evaluate", *flags],
            cwd=REPO,
            env=subprocess_env(1),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0, flags
        for message in messages:
            assert message in proc.stderr, (flags, message, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, flags
    assert not (tmp_path / "missing").exists()  # the lock creates nothing for a bad workdir


def test_sigterm_releases_the_lock(run_dir, tmp_path):
    """A scheduler's SIGTERM while the evaluation holds the workdir (loading the checkpoint
    and the data, compiling): exit code 143, no traceback, no lock left behind."""
    import signal
    import time

    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    child = subprocess.Popen(
        [sys.executable, "-m", "samrobust.evaluate", f"--workdir={workdir}", "--num_examples=8"],
        cwd=REPO,
        env=subprocess_env(1),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(workdir, "lock.json")):
        assert child.poll() is None and time.time() < deadline, child.stderr.read()[-3000:]
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    stderr = child.communicate(timeout=120)[1]
    assert child.returncode == 143, stderr[-3000:]
    assert "received SIGTERM" in stderr and "Traceback" not in stderr
    assert not os.path.exists(os.path.join(workdir, "lock.json"))
    assert not os.path.exists(os.path.join(workdir, "eval_paper_sub8.json"))


@pytest.mark.slow
def test_two_evaluate_processes_match_one_process_with_two_devices(run_dir, tmp_path):
    """``--coordinator_address`` on 127.0.0.1: 2 processes x 1 device report what 1 process
    x 2 devices (``--cpu_devices=2``) reports, point by point."""

    flags = ["--suite=paper", "--num_examples=32", "--batch_size=16", "--unroll=1"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    for copy in (single, multi):
        shutil.copytree(run_dir, copy)
    proc = run_evaluate(single, *flags, "--cpu_devices=2", devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_two_processes([sys.executable, "-m", "samrobust.evaluate", f"--workdir={multi}", *flags])
    reports = [json.load(open(os.path.join(w, "eval_paper_sub32.json"))) for w in (single, multi)]
    assert reports[0]["devices"] == reports[1]["devices"] == 2
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
    masks = [np.load(os.path.join(w, "eval_paper_sub32_masks.npz")) for w in (single, multi)]
    for key in masks[0].files:
        np.testing.assert_array_equal(masks[0][key], masks[1][key])


@pytest.mark.slow
def test_a_killed_autoattack_evaluation_resumes_to_the_same_result(run_dir, full_eval, tmp_path):
    """SIGKILL an ``--suite=autoattack`` evaluation once its journal holds a few batches;
    the same command again finishes from there (taking over the dead process's lock) and
    reports what the uninterrupted ``full_eval`` reports for AutoAttack (same points, devices,
    batches, budget and seed), point by point."""
    import signal
    import time

    _, _, whole, whole_masks = full_eval
    flags = ["--suite=autoattack", f"--num_examples={N}", "--cpu_devices=8", *AA_FAST]
    killed = str(tmp_path / "killed")
    shutil.copytree(run_dir, killed)
    journal = os.path.join(killed, f"{AA_STEM}_journal")
    child = subprocess.Popen(
        [sys.executable, "-m", "samrobust.evaluate", f"--workdir={killed}", *flags],
        cwd=REPO,
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        done = [f for _, _, fs in os.walk(journal) for f in fs if f.endswith(".npz")]
        if len(done) >= 3:
            break
        time.sleep(0.2)
    assert child.poll() is None, "the evaluation ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not os.path.exists(os.path.join(killed, f"{AA_STEM}.json"))

    proc = run_evaluate(killed, *flags, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stale" in proc.stderr  # the killed process's lock
    report = json.load(open(os.path.join(killed, f"{AA_STEM}.json")))
    assert report["autoattack"]["resumed_batches"] >= 3
    assert report["accuracy"] == {k: whole["accuracy"][k] for k in ("clean", AA)}
    assert report["autoattack"]["stages"] == whole["autoattack"]["stages"]
    masks = np.load(os.path.join(killed, f"{AA_STEM}_masks.npz"))
    assert AA.replace("/", "_") in masks.files and set(masks.files) <= set(whole_masks)
    for key in masks.files:
        np.testing.assert_array_equal(masks[key], whole_masks[key])
    assert not os.path.exists(journal)  # removed once the report is written


def test_the_rand_version_is_refused_for_a_training_run():
    """samrobust's runs are deterministic at test time: ``--version=rand`` is a user error
    naming the fix (checked with the CLI's own flags, in this process)."""
    from absl import flags

    from samrobust import evaluate
    from samrobust.errors import UserError

    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["samrobust.evaluate", "--workdir=w", "--suite=autoattack", "--version=rand"])
    with pytest.raises(UserError, match="--version=rand: .*random at test time.*standard or plus"):
        evaluate.settings(fv)
