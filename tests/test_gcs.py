"""``gs://`` work directories against a real GCS emulator (fake-gcs-server) on 127.0.0.1.

The emulator runs for this module; ``STORAGE_EMULATOR_HOST`` points every client at it (the
test process's and, through the environment, the command lines'), as it would point them at
any emulator: ``samrobust.paths`` does the rest. Objects are checked with
google-cloud-storage, independently of the code under test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.gcs_emulator import fake_gcs_server
from samrobust import paths
from samrobust.errors import UserError
from samrobust.workdir import LOCK_NAME, WorkdirLock, WorkdirLockedError, _GcsLockFile
from tests.helpers import TINY_TRAIN, load_checkpoint, run_main, run_module, start_main

BUCKET = "samrobust-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A google-cloud-storage client of fake-gcs-server (bucket ``BUCKET``), with
    ``STORAGE_EMULATOR_HOST`` set for this module."""
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with fake_gcs_server(str(log), BUCKET) as client:
        yield client


def objects(gcs, prefix: str) -> list[str]:
    """Names of the objects under ``prefix/``, relative to it."""
    return sorted(b.name[len(prefix) + 1 :] for b in gcs.list_blobs(BUCKET, prefix=prefix + "/"))


def read(gcs, name: str) -> bytes:
    return gcs.bucket(BUCKET).blob(name).download_as_bytes()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_one_takeover_of_a_stale_lock_wins(gcs, caplog):
    workdir = f"gs://{BUCKET}/lock"
    with WorkdirLock(workdir, "training"):
        assert json.loads(read(gcs, f"lock/{LOCK_NAME}"))["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError, match=f"in use: training by pid {os.getpid()}"):
            WorkdirLock(workdir, "evaluation").acquire()
    assert objects(gcs, "lock") == []  # released

    # A stale lock (a dead process on this host): of two takeovers, exactly one wins.
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": "then"}
    gcs.bucket(BUCKET).blob(f"lock/{LOCK_NAME}").upload_from_string(json.dumps(stale))
    a, b = (_GcsLockFile(paths.path(f"{workdir}/{LOCK_NAME}")) for _ in range(2))
    _, generation = a.read()
    assert a.take_over(b'{"pid": "a"}', generation)
    assert not b.take_over(b'{"pid": "b"}', generation)
    assert json.loads(read(gcs, f"lock/{LOCK_NAME}")) == {"pid": "a"}

    gcs.bucket(BUCKET).blob(f"lock/{LOCK_NAME}").upload_from_string(json.dumps(stale))
    with WorkdirLock(workdir, "evaluation"):
        assert json.loads(read(gcs, f"lock/{LOCK_NAME}"))["purpose"] == "evaluation"
    assert "taking over the stale lock" in caplog.text

    other = {"host": "tpu-vm-7", "pid": 1, "started": "then", "purpose": "training"}
    gcs.bucket(BUCKET).blob(f"lock/{LOCK_NAME}").upload_from_string(
        json.dumps({**other, "heartbeat": time.time() - 30})
    )
    with pytest.raises(WorkdirLockedError, match=f"host tpu-vm-7 .* delete {workdir}/"):
        WorkdirLock(workdir, "training").acquire()

    # A lost node: another host's lease whose heartbeat is older than the stale time.
    gcs.bucket(BUCKET).blob(f"lock/{LOCK_NAME}").upload_from_string(
        json.dumps({**other, "heartbeat": time.time() - 601})
    )
    with WorkdirLock(workdir, "evaluation", stale_after_s=0.5) as lock:  # beats every 0.05 s
        first = json.loads(read(gcs, f"lock/{LOCK_NAME}"))
        assert first["purpose"] == "evaluation"
        time.sleep(0.3)  # the holder's refreshes are conditional on its own generation
        assert json.loads(read(gcs, f"lock/{LOCK_NAME}"))["heartbeat"] > first["heartbeat"]
        lock.check()
        gcs.bucket(BUCKET).blob(f"lock/{LOCK_NAME}").upload_from_string(json.dumps(other))
        time.sleep(0.3)
        with pytest.raises(WorkdirLockedError, match="lost the lock .* host tpu-vm-7"):
            lock.check()
    assert "on tpu-vm-7 since then, whose last heartbeat was 601 s" in caplog.text
    assert json.loads(read(gcs, f"lock/{LOCK_NAME}")) == other  # not its own: kept


def test_missing_bucket_and_unsupported_schemes_are_user_errors(gcs):
    with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
        WorkdirLock("gs://no-such-bucket/run", "training").acquire()
    with pytest.raises(UserError, match="must be local or gs://"):
        WorkdirLock("s3://bucket/run", "training")


def test_metrics_append_across_writers(gcs, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from samrobust.metrics import MetricWriter

    for step in (1, 2):  # a run and its resumption
        writer = MetricWriter(f"gs://{BUCKET}/metrics")
        writer.write(step, {"train/loss": 1.0 / step})
        writer.close()
        time.sleep(1)  # event files are named by the second
    lines = [json.loads(x) for x in read(gcs, "metrics/metrics.jsonl").splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    events = [n for n in objects(gcs, "metrics") if n.startswith("events.out.tfevents")]
    assert len(events) == 2
    for name in events:
        (tmp_path / name).write_bytes(read(gcs, f"metrics/{name}"))
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_appends_upload_only_new_bytes_and_stay_below_the_component_limit(gcs):
    """Each flush uploads its own bytes (composed on the server), not the object so far;
    at ``max_components`` the object is rewritten whole once and composing starts over."""
    appender = paths.ObjectAppender(paths.path(f"gs://{BUCKET}/append/log"), max_components=4)
    lines = [f"line {i}\n".encode() for i in range(10)]
    for line in lines:
        appender.write(line)
        appender.flush()
        appender.flush()  # nothing new: no request
    blob = gcs.bucket(BUCKET).get_blob("append/log")
    assert blob.download_as_bytes() == b"".join(lines)
    assert objects(gcs, "append") == ["log"]  # no part left behind
    # Flushes 1-4 upload 7 bytes each (the 4th composes the 4th component); the 5th rewrites
    # the 35 bytes of lines 0-4; 6-8 compose; the 9th rewrites lines 0-8; the 10th composes.
    assert appender.bytes_uploaded == 4 * 7 + 35 + 3 * 7 + 63 + 7


def test_metrics_benchmark_counts_what_each_strategy_uploads(gcs):
    from experiments import bench_metrics

    row = bench_metrics.measure(gcs, BUCKET, steps=30, log_every=1)
    assert row["flushes"] == 30
    assert row["uploaded_bytes"] == row["final_bytes"]  # each byte once (no rewrite yet)
    assert row["whole_rewrite_bytes"] > 10 * row["final_bytes"]  # about flushes / 2 times


def test_damaged_checkpoint_is_moved_aside(gcs, caplog):
    import jax.numpy as jnp

    from samrobust.checkpoint import Checkpointer

    workdir = f"gs://{BUCKET}/damaged"
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(workdir, {"a": 1}, every_steps=1, keep=5)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] + step})
    ckpt.close()
    data = [n for n in objects(gcs, "damaged/checkpoints/2/state") if "d/" in n]
    assert data  # array data files of the ocdbt store
    for name in data:
        blob = gcs.bucket(BUCKET).blob(f"damaged/checkpoints/2/state/{name}")
        blob.upload_from_string(b"not an array")

    ckpt = Checkpointer(workdir, {"a": 1}, every_steps=1, keep=5)
    restored, _ = ckpt.restore(state)
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 1)
    assert "checkpoint step 2 is damaged" in caplog.text
    names = objects(gcs, "damaged/checkpoints")
    assert not any(n.startswith("2/") for n in names)
    (moved,) = {n.split("/")[0] for n in names if n.startswith("damaged-2-")}
    assert len([n for n in names if n.startswith(f"{moved}/")]) > 3  # every file moved


def test_sweep_log_dry_run_and_report_on_gcs(gcs, capsys):
    from configs import default
    from experiments import report, sweep

    root = f"gs://{BUCKET}/sweep"
    log = paths.path(f"{root}/logged/log.txt")
    assert sweep.run_logged([sys.executable, "-c", "print('first')"], log) == 0
    code = "import sys; print('second'); sys.exit(3)"
    assert sweep.run_logged([sys.executable, "-c", code], log) == 3
    text = read(gcs, "sweep/logged/log.txt").decode()
    assert text.count("\n==== ") == 2 and "first\n" in text and "second\n" in text
    assert sweep.log_tail(log).endswith("second\n")

    assert sweep.main(["--grid=smoke", f"--root={root}", "--seeds=1", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"--workdir={root}/sgd_s0" in out and "2 runs of grid 'smoke'" in out

    for seed in (0, 1):  # finished runs, as samrobust.main leaves them
        config = default.get_config("digits").to_dict() | {"seed": seed}
        run = paths.path(f"{root}/sgd_s{seed}")
        (run / "config.json").write_text(json.dumps(config))
        results = {"accuracy": {"clean": 0.9, report.DEFAULT_ROBUST_KEY: 0.5}, "train_seconds": 1}
        (run / "results.json").write_text(json.dumps(results))
    data = report.report(root)
    assert [g["label"] for g in data["groups"]] == ["SGD"] and data["incomplete"] == ["logged"]
    assert {"report.md", "report.png", "report.json"} <= set(objects(gcs, "sweep"))


def test_image_folder_data_dir_in_the_bucket(gcs, tmp_path):
    from samrobust import input_pipeline
    from tests.test_input_pipeline import write_folder

    local = tmp_path / "images"
    write_folder(local)
    for f in local.rglob("*.*"):
        blob = gcs.bucket(BUCKET).blob(f"images/{f.relative_to(local)}")
        blob.upload_from_filename(f)
    cache = str(tmp_path / "cache")
    remote = input_pipeline.load("image_folder", f"gs://{BUCKET}/images", cache_dir=cache)
    expected = input_pipeline.load("image_folder", str(local), cache_dir=cache)
    np.testing.assert_array_equal(remote.train_images, expected.train_images)
    np.testing.assert_array_equal(remote.test_labels, expected.test_labels)


# Preempted and resumed: 66 steps, metrics every 5; checkpoints at the signal and the end.
RUN = f"gs://{BUCKET}/run"
OVERRIDES = [*TINY_TRAIN, "--config.num_epochs=3", "--config.checkpoint_every_steps=1000"]


@pytest.fixture(scope="module")
def gcs_run(gcs) -> dict:
    """A digits run in ``RUN``, stopped by SIGTERM after its first metrics and resumed:
    the objects and logs after each part."""
    proc = start_main("configs/sam.py:digits", RUN, *OVERRIDES, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not gcs.bucket(BUCKET).blob("run/metrics.jsonl").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run logged nothing"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stopped_log = proc.communicate(timeout=600)
    stopped = {
        "rc": proc.returncode,
        "log": stopped_log,
        "objects": objects(gcs, "run"),
        "metrics": read(gcs, "run/metrics.jsonl"),
    }
    resumed = run_main("configs/sam.py:digits", RUN, *OVERRIDES, check=False)
    return {"stopped": stopped, "resumed": resumed, "objects": objects(gcs, "run")}


@pytest.mark.slow
def test_digits_run_writes_everything_to_the_bucket_and_resumes(gcs, gcs_run, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    stopped, resumed = gcs_run["stopped"], gcs_run["resumed"]
    assert stopped["rc"] == 143, stopped["log"][-3000:]
    steps = {int(n.split("/")[1]) for n in stopped["objects"] if n.startswith("checkpoints/")}
    assert len(steps) == 1 and 5 <= min(steps) < 66, stopped["objects"]
    step = steps.pop()
    assert f"stopped by SIGTERM at step {step} of 66" in stopped["log"]
    assert {"config.json", "metrics.jsonl"} <= set(stopped["objects"])
    assert LOCK_NAME not in stopped["objects"] and "results.json" not in stopped["objects"]

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stderr
    names = gcs_run["objects"]
    assert {"config.json", "metrics.jsonl", "results.json", "eval_masks.npz"} <= set(names)
    assert f"checkpoints/{step}/_CHECKPOINT_METADATA" in names
    assert "checkpoints/66/_CHECKPOINT_METADATA" in names and LOCK_NAME not in names
    assert json.loads(read(gcs, "run/results.json"))["total_steps"] == 66
    metrics = read(gcs, "run/metrics.jsonl")
    assert metrics.startswith(stopped["metrics"])  # appended to, not overwritten
    lines = [json.loads(x) for x in metrics.splitlines()]
    train = [x["step"] for x in lines if "train/loss" in x]
    assert train == [*range(5, 66, 5), 66]  # both parts of the run, in order
    events = [n for n in names if n.startswith("events.out.tfevents")]
    assert len(events) == 2  # one per part
    for name in events:
        (tmp_path / name).write_bytes(read(gcs, f"run/{name}"))
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == train
    final = load_checkpoint(RUN)  # through the same path layer, from the bucket
    assert int(final["step"]) == 66
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final["params"]))


@pytest.mark.slow
def test_evaluate_reads_a_gcs_run(gcs, gcs_run):
    proc = run_module(
        "samrobust.evaluate", f"--workdir={RUN}", "--suite=clean", "--num_examples=64"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "eval_clean_sub64"
    assert {f"{stem}.json", f"{stem}.md", f"{stem}_masks.npz"} <= set(objects(gcs, "run"))
    report = json.loads(read(gcs, f"run/{stem}.json"))
    assert report["num_examples"] == 64 and report["run"]["workdir"] == RUN
    assert 0 < report["accuracy"]["clean"] <= 1
