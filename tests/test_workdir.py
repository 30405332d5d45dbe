"""One writer per workdir: the lock (a lease) through real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from samrobust.workdir import LOCK_NAME, WorkdirLock, WorkdirLockedError
from tests.helpers import REPO, TINY, main_command, start_main, subprocess_env


def hold_lock(workdir: str) -> subprocess.Popen:
    """A real process that takes the lock and sleeps; returns once it holds it."""
    code = (
        "import sys, time; from samrobust.workdir import WorkdirLock; "
        f"lock = WorkdirLock({workdir!r}, 'training'); lock.acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_released_and_stale_ones_are_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    holder = hold_lock(workdir)
    try:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == holder.pid and record["purpose"] == "training"
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(workdir, "evaluation").acquire()
        assert f"training by pid {holder.pid} on this host" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release: the lock goes stale
        holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with WorkdirLock(workdir, "evaluation") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released on exit


def test_a_signal_while_the_heartbeat_starts_still_releases_the_lock(tmp_path, monkeypatch):
    """SIGTERM's ``SystemExit`` inside ``Thread.start`` (before the heartbeat thread counts as
    started, seen in CI): the signal's exit propagates and the lock is deleted."""

    def interrupted_start(self):
        raise SystemExit(143)

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(SystemExit):
        with WorkdirLock(str(tmp_path / "run"), "evaluation"):
            pass
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def other_host(age_s: float | None) -> dict:
    """A lock record of another host whose heartbeat is ``age_s`` old (None: written before
    leases, without one)."""
    record = {"host": "tpu-vm-7", "pid": 1, "started": "then", "purpose": "training"}
    return record if age_s is None else {**record, "heartbeat": time.time() - age_s}


def test_lock_of_another_host_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path, caplog):
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps(other_host(age_s=30)))  # a live lease
    with pytest.raises(WorkdirLockedError, match="host tpu-vm-7 .*this one: 30 s"):
        WorkdirLock(str(tmp_path), "training").acquire()
    lock_file.write_text(json.dumps(other_host(age_s=None)))  # no heartbeat: never stale
    with pytest.raises(WorkdirLockedError, match=f"host tpu-vm-7 .* delete {tmp_path}"):
        WorkdirLock(str(tmp_path), "training", stale_after_s=1).acquire()
    lock_file.write_text(json.dumps(other_host(age_s=601)))  # a lost node
    with WorkdirLock(str(tmp_path), "evaluation"):
        assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    assert "training by pid 1 on tpu-vm-7 since then, whose last heartbeat was 601 s" in caplog.text
    assert not lock_file.exists()


def contend(lock: WorkdirLock, start: threading.Barrier, results: list[str]) -> None:
    start.wait()
    try:
        lock.acquire()
        results.append("won")
    except WorkdirLockedError:
        results.append("refused")


def test_of_two_contenders_for_a_stale_lock_exactly_one_wins(tmp_path):
    for _ in range(10):
        (tmp_path / LOCK_NAME).write_text(json.dumps(other_host(age_s=3600)))
        locks = [WorkdirLock(str(tmp_path), "training") for _ in range(2)]
        start, results = threading.Barrier(2), []
        threads = [threading.Thread(target=contend, args=(k, start, results)) for k in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["refused", "won"]
        winner, loser = sorted(locks, key=lambda k: not k.held)
        loser.release()  # the same process, but not its lock: kept
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winner.record["token"]
        winner.release()
        assert not (tmp_path / LOCK_NAME).exists()


def test_the_holder_refreshes_its_heartbeat_and_notices_a_takeover(tmp_path):
    lock_file = tmp_path / LOCK_NAME
    with WorkdirLock(str(tmp_path), "training", stale_after_s=0.5) as lock:  # beats every 0.05 s
        first = json.loads(lock_file.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock_file.read_text())["heartbeat"] > first
        lock.check()  # still held
        lock_file.write_text(json.dumps(other_host(age_s=0)))  # taken over behind its back
        time.sleep(0.3)
        with pytest.raises(WorkdirLockedError, match="lost the lock .* host tpu-vm-7"):
            lock.check()
    assert json.loads(lock_file.read_text())["host"] == "tpu-vm-7"  # not deleted: not its own


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(Exception, match="is a file: pass a directory"):
        WorkdirLock(str(path), "training")


def test_second_training_process_on_a_workdir_stops_at_once(tmp_path):
    workdir = str(tmp_path / "run")
    overrides = [*TINY, "--config.num_epochs=30"]  # long enough to still run
    first = start_main("configs/sgd.py:digits", workdir, *overrides)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(workdir, LOCK_NAME)):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        start = time.time()
        second = subprocess.run(
            main_command("configs/sgd.py:digits", workdir, *overrides),
            cwd=REPO,
            env=subprocess_env(1),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert time.time() - start < 60  # before any data loading or compilation
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --workdir={workdir} is in use: training by pid {first.pid}")
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the holder goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143
