"""Metric logging: a ``metrics.jsonl`` line and a TensorBoard scalar per logged value.

TensorBoard event files are written here directly (TFRecord framing of tensorboard's own
``Event`` protos) so that logging never imports tensorflow. Only process 0 writes.
"""

import json
import os
import socket
import struct
import time
from collections.abc import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c


class MetricWriter:
    """Appends scalars to ``workdir/metrics.jsonl`` and a TensorBoard event file."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self._events = open(os.path.join(workdir, name), "ab")  # noqa: SIM115
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
        self._jsonl.write(json.dumps(record) + "\n")
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()
