"""One writer per workdir: a lease file that records who writes there.

Training (``samrobust.main``) and evaluation (``samrobust.evaluate``) take
``WORKDIR/lock.json`` (host, pid, start time, purpose, heartbeat) before they write anything
and remove it when they end, however they end. A second process on the same workdir stops
at once with a :class:`WorkdirLockedError` naming the holder.

The lock is a lease: a thread of the holder rewrites its heartbeat every
``stale_after_s / 10`` seconds (a minute by default). A lock is stale, and taken over with a
warning naming the old holder, when its heartbeat is older than ``stale_after_s`` (10
minutes by default; ``config.lock_stale_after_s``, ``--lock_stale_after_s``) whatever host
wrote it (a node lost without a signal, a preempted VM), or at once when it names a process
of this host that no longer runs (SIGKILL). Heartbeats are compared with this host's clock:
the hosts' clocks must agree to well within ``stale_after_s``. A holder that finds its lock
taken over (it was stopped or cut off for longer than that) records it, and
:meth:`WorkdirLock.check` (called by training before every checkpoint and by both before
their final writes) stops it with a :class:`WorkdirLockedError`. A lock without a heartbeat
(written by samrobust before leases) is never taken over from another host.

Taking the lock is atomic. On a local disk the lock is created as a hard link of a complete file
(``link`` fails if the name exists); a stale one
is moved aside (by one of several racing processes; one that moved a live lock, written
meanwhile, puts it back), then created anew. On ``gs://`` (google-cloud-storage) it is uploaded with
the precondition ``ifGenerationMatch=0``, which GCS grants only if no lock object exists; a
stale one is overwritten with ``ifGenerationMatch=<its generation>``, so of several
processes taking over the same stale lock exactly one wins; release deletes the lock only at
the generation this process wrote. Other remote schemes (``s3://``, ...) are refused.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from absl import logging
from etils import epath

from samrobust import paths
from samrobust.errors import UserError

LOCK_NAME = "lock.json"
DEFAULT_STALE_AFTER_S = 600.0


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

    def _tmp(self) -> epath.Path:
        return self.path.parent / f"{LOCK_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"

    def create(self, data: bytes) -> bool:
        """Writes the lock if there is none; whether it did. A hard link of a complete file:
        the lock never exists half-written."""
        tmp = self._tmp()
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def read(self) -> tuple[bytes, bytes] | None:
        """(content, version) of the lock, or None if there is none; the version is the
        content."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def take_over(self, data: bytes, version: bytes) -> bool:
        """Replaces the stale lock whose content is ``version`` with ``data``; whether this
        process now holds it. Of several racing processes one moves the stale lock aside; one
        that moved a live lock (written meanwhile) puts it back."""
        moved = self.path.parent / f"{LOCK_NAME}.stale-{os.getpid()}-{threading.get_ident()}"
        try:
            self.path.rename(moved)
        except FileNotFoundError:  # moved or released meanwhile
            return self.create(data)
        if moved.read_bytes() != version:
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)  # back, unless yet another lock exists by now
            moved.unlink()
            return False
        moved.unlink()
        return self.create(data)

    def refresh(self, data: bytes, version: bytes) -> bool:
        """Rewrites the lock this process holds (atomically: readers never see a partial
        file); whether it did."""
        del version
        tmp = self._tmp()
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return True

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

    def refresh(self, data: bytes, version: int) -> bool:
        """Rewrites the lock if it is still at generation ``version``; whether it did."""
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


def _age(holder: dict) -> float | None:
    """Seconds since the holder's last heartbeat (this host's clock), None without one."""
    beat = holder.get("heartbeat")
    return time.time() - float(beat) if isinstance(beat, (int, float)) else None


class WorkdirLock:
    """``with WorkdirLock(workdir, "training"):`` holds ``workdir/lock.json`` inside, as a
    lease refreshed every ``stale_after_s / 10`` seconds."""

    def __init__(self, workdir: str, purpose: str, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        if not stale_after_s > 0:
            raise UserError(
                f"the lock's stale time must be positive (got {stale_after_s} s): "
                f"pass e.g. {DEFAULT_STALE_AFTER_S:.0f}"
            )
        self.workdir = workdir
        self.file = _lock_file(workdir)
        self.path = self.file.path
        self.purpose = purpose
        self.stale_after_s = float(stale_after_s)
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "purpose": purpose,
            "heartbeat": time.time(),
            "token": uuid.uuid4().hex,  # which lock object of that process wrote it
        }
        self.held = False
        self.lost: str | None = None  # why the lock is no longer this process's
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

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

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lock is stale, or None if it is live."""
        if holder.get("host") == self.record["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return "which no longer runs"
        age = _age(holder)
        if age is not None and age > self.stale_after_s:
            return f"whose last heartbeat was {age:.0f} s ago (> {self.stale_after_s:.0f} s)"
        return None

    def _data(self) -> bytes:
        self.record["heartbeat"] = time.time()
        return json.dumps(self.record).encode()

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises ``WorkdirLockedError`` if held."""
        for _ in range(3):
            if self.file.create(self._data()):
                self._start()
                return
            found = self._holder()
            if found is None:  # released meanwhile
                continue
            holder, version = found
            why = self._stale(holder)
            if why is not None:
                logging.warning(
                    "taking over the stale lock %s: %s by pid %s on %s since %s, %s",
                    self.path,
                    holder.get("purpose"),
                    holder.get("pid"),
                    holder.get("host"),
                    holder.get("started"),
                    why,
                )
                if self.file.take_over(self._data(), version):
                    self._start()
                    return
                continue
            raise WorkdirLockedError(self._in_use(holder))
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing")

    def _in_use(self, holder: dict) -> str:
        same_host = holder.get("host") == self.record["host"]
        where = "this host" if same_host else f"host {holder.get('host')}"
        age = _age(holder)
        if same_host:
            fix = "wait for it to end or stop it"
        elif age is None:  # written before leases: no heartbeat to go stale
            fix = f"wait for it to end or stop it; if that job is gone, delete {self.path}"
        else:
            fix = (
                f"wait for it to end or stop it; a lock is taken over once its heartbeat is "
                f"{self.stale_after_s:.0f} s old (this one: {age:.0f} s), or delete {self.path} "
                "if that job is gone"
            )
        return (
            f"--workdir={self.workdir} is in use: {holder.get('purpose')} by pid "
            f"{holder.get('pid')} on {where} since {holder.get('started')} "
            f"(lock {self.path}); {fix}"
        )

    def _start(self) -> None:
        self.held, self.lost = True, None
        self._stop.clear()
        self._refresher = threading.Thread(
            target=self._refresh_loop, name="workdir-lease", daemon=True
        )
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.stale_after_s / 10):
            try:
                self.refresh()
            except Exception as e:  # a transient storage error: the next beat retries
                logging.warning("could not refresh the lock %s: %s", self.path, e)
            if self.lost:
                logging.error("%s", self.lost)
                return

    def refresh(self) -> None:
        """Rewrites the heartbeat if the lock is still this process's, else records that it
        was lost (see :meth:`check`)."""
        found = self._holder()
        if found is not None and self._is_me(found[0]):
            if self.file.refresh(self._data(), found[1]):
                return
            found = self._holder()
        holder = found[0] if found else None
        self.lost = (
            f"lost the lock {self.path}: "
            + (
                f"taken over by {holder.get('purpose')} (pid {holder.get('pid')} on host "
                f"{holder.get('host')}) after this process failed to refresh it for "
                f"{self.stale_after_s:.0f} s"
                if holder
                else "it was deleted"
            )
            + f"; stopping so as not to write beside another process in --workdir={self.workdir}"
        )

    def check(self) -> None:
        """Raises ``WorkdirLockedError`` if this process lost its lock."""
        if self.lost:
            raise WorkdirLockedError(self.lost)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is this process's (also after an
        interrupted ``acquire``)."""
        self.held = False
        self._stop.set()
        if self._refresher is not None:
            if self._refresher.is_alive():  # not if a signal interrupted its start: it
                self._refresher.join()  # then sees the stop event whenever it runs
            self._refresher = None
        found = self.file.read()
        with contextlib.suppress(ValueError):  # unreadable: not one this process wrote
            if found is not None and self._is_me(json.loads(found[0])):
                self.file.delete()

    def _is_me(self, holder: dict) -> bool:
        return holder.get("token") == self.record["token"]

    def __enter__(self) -> "WorkdirLock":
        try:
            self.acquire()
        except BaseException:  # e.g. SIGTERM right after the lock was written
            self.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
