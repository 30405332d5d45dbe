"""One writer per workdir: a lock file that records who writes there.

Training (``samrobust.main``) and evaluation (``samrobust.evaluate``) take
``WORKDIR/lock.json`` (host, pid, start time, purpose) before they write anything and
remove it when they end, however they end. A second process on the same workdir stops at
once with a :class:`WorkdirLockedError` naming the holder. A lock left by a process that no
longer runs on this host (killed with SIGKILL, a crashed machine rebooted) is stale: it is
taken over with a warning. A lock from another host cannot be checked from here; the error
says to delete it if that job is gone.

Taking the lock is atomic. On a local disk the lock is created with ``O_EXCL``; a stale one
is moved aside, then created anew. On ``gs://`` (google-cloud-storage) it is uploaded with
the precondition ``ifGenerationMatch=0``, which GCS grants only if no lock object exists; a
stale one is overwritten with ``ifGenerationMatch=<its generation>``, so of several
processes taking over the same stale lock exactly one wins; release deletes the lock only at
the generation this process wrote. Other remote schemes (``s3://``, ...) are refused.
"""

import datetime
import json
import os
import socket
import time
from types import TracebackType
from typing import Any

from absl import logging
from etils import epath

from samrobust import paths
from samrobust.errors import UserError

LOCK_NAME = "lock.json"


class WorkdirLockedError(UserError):
    """Another process holds the workdir."""


def prepare(workdir: str) -> epath.Path:
    """The workdir as a path, created if missing; a ``UserError`` if it is a file."""
    path = paths.path(workdir)
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


class _LocalLockFile:
    """``lock.json`` on a local disk."""

    def __init__(self, path: epath.Path):
        self.path = path

    def create(self, data: bytes) -> bool:
        """Writes the lock if there is none; whether it did."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> tuple[bytes, None] | None:
        """(content, version) of the lock, or None if there is none."""
        try:
            return self.path.read_bytes(), None
        except FileNotFoundError:
            return None

    def take_over(self, data: bytes, version: None) -> bool:
        """Replaces a stale lock with ``data``; whether this process now holds it."""
        del version
        stale = self.path.parent / f"{LOCK_NAME}.stale-{os.getpid()}"
        try:  # one of several racing processes wins the rename
            self.path.rename(stale)
            stale.unlink()
        except FileNotFoundError:
            pass
        return self.create(data)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class _GcsLockFile:
    """``lock.json`` on GCS; every change is conditional on the object's generation."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.blob = paths.gcs_blob(path)
        self.generation: int | None = None  # of the lock this process wrote

    def _upload(self, data: bytes, if_generation_match: int) -> bool:
        from google.api_core import exceptions

        try:
            self.blob.upload_from_string(
                data, content_type="application/json", if_generation_match=if_generation_match
            )
        except exceptions.PreconditionFailed:
            return False
        except exceptions.NotFound as e:  # a conditional upload 404s only without a bucket
            raise UserError(
                f"cannot write {self.path}: bucket gs://{self.blob.bucket.name} does not exist "
                "(or these credentials cannot see it); create it or fix --workdir"
            ) from e
        self.generation = self.blob.generation
        return True

    def create(self, data: bytes) -> bool:
        """Writes the lock if there is none; whether it did."""
        return self._upload(data, 0)

    def read(self) -> tuple[bytes, int] | None:
        """(content, generation) of the lock, or None if there is none."""
        from google.api_core import exceptions

        blob = self.blob.bucket.get_blob(self.blob.name)
        try:  # the download is of that generation: content and generation agree
            return (blob.download_as_bytes(), blob.generation) if blob else None
        except exceptions.NotFound:  # replaced or deleted meanwhile
            return None

    def take_over(self, data: bytes, version: int) -> bool:
        """Replaces the stale lock of generation ``version``; whether this process won."""
        return self._upload(data, version)

    def delete(self) -> None:
        from google.api_core import exceptions

        try:
            self.blob.delete(if_generation_match=self.generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass


def _lock_file(workdir: str) -> _LocalLockFile | _GcsLockFile:
    if paths.is_local(workdir):
        return _LocalLockFile(prepare(workdir) / LOCK_NAME)
    if os.fspath(workdir).startswith("gs://"):
        return _GcsLockFile(prepare(workdir) / LOCK_NAME)
    raise UserError(
        f"--workdir={workdir}: work directories must be local or gs:// (the one-writer lock "
        "needs an atomic create-if-absent, which is implemented for those only)"
    )


class WorkdirLock:
    """``with WorkdirLock(workdir, "training"):`` holds ``workdir/lock.json`` inside."""

    def __init__(self, workdir: str, purpose: str):
        self.workdir = workdir
        self.file = _lock_file(workdir)
        self.path = self.file.path
        self.purpose = purpose
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "purpose": purpose,
        }
        self.held = False

    def _holder(self) -> tuple[dict, Any] | None:
        """(record, version) of the lock, or None if it vanished; waits briefly for one being
        written."""
        for _ in range(20):
            found = self.file.read()
            if found is None:
                return None
            try:
                return json.loads(found[0]), found[1]
            except ValueError:  # being written right now
                time.sleep(0.05)
        raise WorkdirLockedError(
            f"{self.path} is not a readable lock: if no process uses --workdir={self.workdir}, "
            "delete that file"
        )

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises ``WorkdirLockedError`` if held."""
        data = json.dumps(self.record).encode()
        for _ in range(3):
            if self.file.create(data):
                self.held = True
                return
            found = self._holder()
            if found is None:  # released meanwhile
                continue
            holder, version = found
            same_host = holder.get("host") == self.record["host"]
            if same_host and not _pid_alive(int(holder.get("pid", -1))):
                logging.warning(
                    "taking over the stale lock %s: %s by pid %s since %s, which no longer runs",
                    self.path,
                    holder.get("purpose"),
                    holder.get("pid"),
                    holder.get("started"),
                )
                if self.file.take_over(data, version):
                    self.held = True
                    return
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
            found = self.file.read()
            if found is not None and self._is_me(json.loads(found[0])):
                self.file.delete()

    def _is_me(self, holder: dict) -> bool:
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
