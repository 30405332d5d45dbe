"""One writer per workdir: a lock file that records who writes there.

Training (``samrobust.main``) and evaluation (``samrobust.evaluate``) take
``WORKDIR/lock.json`` (host, pid, start time, purpose) before they write anything and
remove it when they end, however they end. A second process on the same workdir stops at
once with a :class:`WorkdirLockedError` naming the holder. A lock left by a process that no
longer runs on this host (killed with SIGKILL, a crashed machine rebooted) is stale: it is
taken over with a warning. A lock from another host cannot be checked from here; the error
says to delete it if that job is gone. On local disks the lock is created atomically
(``O_EXCL``); on object stores (``gs://``) there is a short window between the check and the
write.
"""

import datetime
import json
import os
import socket
import time
from types import TracebackType

from absl import logging
from etils import epath

from samrobust.errors import UserError

LOCK_NAME = "lock.json"


class WorkdirLockedError(UserError):
    """Another process holds the workdir."""


def prepare(workdir: str) -> epath.Path:
    """The workdir as a path, created if missing; a ``UserError`` if it is a file."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file: pass a directory (new or a run's)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class WorkdirLock:
    """``with WorkdirLock(workdir, "training"):`` holds ``workdir/lock.json`` inside."""

    def __init__(self, workdir: str, purpose: str):
        self.workdir = workdir
        self.path = prepare(workdir) / LOCK_NAME
        self.purpose = purpose
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "purpose": purpose,
        }
        self.held = False

    def _create(self) -> bool:
        """Writes the lock file if there is none; whether it did."""
        data = json.dumps(self.record).encode()
        if not _is_local(self.path):
            if self.path.exists():
                return False
            self.path.write_bytes(data)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _holder(self) -> dict | None:
        """The lock's record, or None if it vanished; waits briefly for one being written."""
        for _ in range(20):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except ValueError:  # being written right now
                time.sleep(0.05)
        raise WorkdirLockedError(
            f"{self.path} is not a readable lock: if no process uses --workdir={self.workdir}, "
            "delete that file"
        )

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises ``WorkdirLockedError`` if held."""
        for _ in range(3):
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:  # released meanwhile
                continue
            same_host = holder.get("host") == self.record["host"]
            if same_host and not _pid_alive(int(holder.get("pid", -1))):
                logging.warning(
                    "taking over the stale lock %s: %s by pid %s since %s, which no longer runs",
                    self.path,
                    holder.get("purpose"),
                    holder.get("pid"),
                    holder.get("started"),
                )
                stale = self.path.parent / f"{LOCK_NAME}.stale-{os.getpid()}"
                try:  # one of several racing processes wins the rename
                    self.path.rename(stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            where = "this host" if same_host else f"host {holder.get('host')}"
            fix = (
                "wait for it to end or stop it"
                if same_host
                else f"wait for it to end or stop it; if that job is gone, delete {self.path}"
            )
            raise WorkdirLockedError(
                f"--workdir={self.workdir} is in use: {holder.get('purpose')} by pid "
                f"{holder.get('pid')} on {where} since {holder.get('started')} "
                f"(lock {self.path}); {fix}"
            )
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self._holder_is_me():
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def _holder_is_me(self) -> bool:
        holder = json.loads(self.path.read_text())
        return holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
