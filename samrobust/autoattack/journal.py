"""A journal of an AutoAttack evaluation's finished batches: an interrupted evaluation, run
again with the same settings, resumes where it stopped and ends with the same result."""

import hashlib
import io
import json
from typing import Any

import jax
import numpy as np
from etils import epath

from samrobust import paths


class Journal:
    """Finished batches of one evaluation, one small ``.npz`` per batch under
    ``directory/<settings hash>/`` (local or any epath, e.g. gs://), written by process 0.
    Evaluations with other settings (points, labels, budget, seed...) use other folders."""

    def __init__(self, directory: str | epath.Path, settings: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        self.path = paths.path(directory) / digest[:16]
        self.settings = settings
        self.writer = jax.process_index() == 0

    def _name(self, stage: str, run: int, batch: int) -> str:
        return f"{stage}_run{run:03d}_batch{batch:05d}.npz"

    def load(self, stage: str, run: int) -> list[dict[str, np.ndarray]]:
        """The recorded batches of ``stage``'s run ``run``, in order."""
        out = []
        while (p := self.path / self._name(stage, run, len(out))).exists():
            with np.load(io.BytesIO(p.read_bytes())) as f:
                out.append(dict(f))
        return out

    def record(self, stage: str, run: int, batch: int, **arrays: np.ndarray) -> None:
        if not self.writer:
            return
        if batch == 0 and run == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "settings.json").write_text(json.dumps(self.settings, indent=2))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp = self.path / f".{self._name(stage, run, batch)}.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.rename(self.path / self._name(stage, run, batch))
