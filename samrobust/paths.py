"""The path layer: workdirs, data dirs and sweep roots, local or ``gs://``.

Every file the project reads or writes under such a directory goes through :func:`path`
(an ``etils.epath.Path``), never ``os.path`` or ``open``. Local paths are made absolute;
``gs://bucket/dir`` is kept as it is.

The clients behind ``gs://`` use Google's default credentials, and all of them an emulator
when ``STORAGE_EMULATOR_HOST`` (its URL) is set, through :func:`configure_clients` (run at
import; environment variables already set win):

- Files and folders: epath's fsspec backend, i.e. gcsfs. epath would use ``tf.io.gfile``
  whenever tensorflow is installed, but TensorFlow's GCS filesystem has its endpoint compiled
  in (``https://www.googleapis.com/storage/v1/``) and ignores ``STORAGE_EMULATOR_HOST``, so
  ``EPATH_USE_TF=false`` is set (``EPATH_USE_TF=true`` brings ``tf.io.gfile`` back, untested
  here). epath reads it once, at its first remote path: import this module before that.
  With an emulator, ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` too: gcsfs would otherwise
  ask the StorageControl gRPC API for the bucket's type before every operation, which
  emulators do not serve (with credentials at hand, a minute's retries each time).
- Checkpoint arrays: orbax writes them with tensorstore, which reads
  ``TENSORSTORE_GCS_HTTP_URL`` rather than ``STORAGE_EMULATOR_HOST``: with an emulator, it
  is set to the emulator's URL.
- The workdir lock: google-cloud-storage (:func:`gcs_blob`), for its generation
  preconditions (see ``samrobust.workdir``).

Objects cannot be appended to: :func:`open_append` gives, for a ``gs://`` path, an
:class:`ObjectAppender`, whose every flush uploads only the bytes written since, as a part
object, and composes object and part into the object on the server. A run's metrics
therefore cost bytes in proportion to their length, not to its square (as rewriting the
whole object at every flush, ``tf.io.gfile``'s way, does).
"""

import functools
import io
import os
import uuid
from typing import IO, TYPE_CHECKING

from etils import epath

from samrobust.errors import UserError

if TYPE_CHECKING:
    from google.cloud import storage


def configure_clients() -> None:
    """Sets the clients' environment variables (see the module docstring) unless set."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


configure_clients()


def is_local(p: epath.PathLike) -> bool:
    """Whether ``p`` is a local path (not ``scheme://...``)."""
    return "://" not in os.fspath(p)


def path(p: epath.PathLike) -> epath.Path:
    """``p`` as an epath path: absolute if local, as given if remote (``gs://...``)."""
    return epath.Path(p).resolve() if is_local(p) else epath.Path(p)


@functools.cache
def _gcs_client() -> "storage.Client":
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client(project=None)  # object operations need no project
    except DefaultCredentialsError as e:
        raise UserError(
            "gs:// paths need Google credentials: run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS (on GCE/TPU VMs the VM's account is used)"
        ) from e


def gcs_blob(p: epath.PathLike) -> "storage.Blob":
    """The google-cloud-storage blob of ``gs://bucket/name``."""
    bucket, _, name = os.fspath(p).removeprefix("gs://").partition("/")
    return _gcs_client().bucket(bucket).blob(name)


class ObjectAppender(io.BufferedIOBase):
    """Appends to a ``gs://`` object: each flush uploads what was written since as a part
    object and composes [object, part] into the object (GCS ``compose``, on the server),
    conditional on the object's generation, so that a second writer fails loudly. Every
    ``max_components`` flushes the object is rewritten whole once, which keeps it below
    GCS's limit on a composite object's components (amortised: still linear in bytes)."""

    def __init__(self, p: epath.Path, max_components: int = 1000):
        super().__init__()
        self.path = p
        self.blob = gcs_blob(p)
        self.max_components = max_components
        self.bytes_uploaded = 0  # by this appender: parts and whole rewrites
        self._pending = bytearray()
        self._components = 0  # of the object, as far as this appender made it

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._pending += data
        return len(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data, bucket = bytes(self._pending), self.blob.bucket
        current = bucket.get_blob(self.blob.name)
        components = max(self._components, current.component_count or 1) if current else 0
        if current is None:
            self.blob.upload_from_string(data, if_generation_match=0)
            self.bytes_uploaded += len(data)
            self._components = 1
        elif components >= self.max_components:
            whole = current.download_as_bytes(if_generation_match=current.generation) + data
            self.blob.upload_from_string(whole, if_generation_match=current.generation)
            self.bytes_uploaded += len(whole)
            self._components = 1
        else:
            part = bucket.blob(f"{self.blob.name}.part-{uuid.uuid4().hex}")
            part.upload_from_string(data, if_generation_match=0)
            self.bytes_uploaded += len(data)
            try:
                self.blob.compose([current, part], if_generation_match=current.generation)
            finally:
                part.delete()
            self._components = components + 1
        self._pending.clear()


def open_append(p: epath.Path) -> IO[bytes] | ObjectAppender:
    """``p`` opened to append bytes: a file if local, an :class:`ObjectAppender` on gs://."""
    if is_local(p):
        return p.open("ab")
    if not os.fspath(p).startswith("gs://"):
        raise UserError(f"{p}: appending to files is implemented for local and gs:// paths only")
    return ObjectAppender(p)
