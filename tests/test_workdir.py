"""One writer per workdir: the lock through real processes."""

import json
import os
import signal
import subprocess
import sys
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


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"host": "tpu-vm-7", "pid": 1, "started": "then", "purpose": "training"})
    )
    with pytest.raises(WorkdirLockedError, match=f"host tpu-vm-7 .* delete {tmp_path}"):
        WorkdirLock(str(tmp_path), "training").acquire()


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
