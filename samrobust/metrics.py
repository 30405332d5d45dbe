"""Metric logging: a ``metrics.jsonl`` line and a TensorBoard scalar per logged value.

TensorBoard event files are written here directly (TFRecord framing of tensorboard's own
``Event`` protos) so that logging never imports tensorflow. Only process 0 writes. The
workdir may be ``gs://``: each flush (one per logged step) then uploads only the new bytes
of both files, composed into the objects on the server (:func:`samrobust.paths.open_append`).
"""

import json
import os
import socket
import struct
import time
from collections.abc import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from samrobust import paths


def format_seconds(s: float) -> str:
    """``H:MM:SS``, as progress lines (training's ETA, the sweep's) print durations."""
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and a TensorBoard event file."""

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        directory = paths.path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = paths.open_append(directory / "metrics.jsonl")
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self._events = paths.open_append(directory / name)
        self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write_event(self, event: event_pb2.Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._events.write(header + struct.pack("<I", masked_crc32c(header)))
        self._events.write(data + struct.pack("<I", masked_crc32c(data)))

    def write(self, step: int, scalars: Mapping[str, float], **extra) -> None:
        """Logs ``scalars`` at ``step``; ``extra`` fields go to the JSON line only."""
        if not self.enabled:
            return
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
        ]
        self._write_event(
            event_pb2.Event(
                wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
            )
        )
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}, **extra}
        self._jsonl.write((json.dumps(record) + "\n").encode())
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()
