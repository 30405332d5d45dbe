"""Stopping on a signal: SIGTERM (schedulers, spot and TPU preemption) and SIGINT.

Training (:class:`Preemption`) stops at the next step boundary with a checkpoint at that
step and exits with ``128 + signal`` (:class:`PreemptedError`); the same command resumes.
Evaluation (:func:`exit_on_sigterm`) unwinds at once (or, when the signal lands where Python
ignores exceptions, at the next batch), releasing the workdir's lock; its AutoAttack journal
keeps the finished batches.
"""

import signal
import sys
import threading
from types import FrameType
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM (how schedulers and spot/TPU preemption stop jobs) and SIGINT become a stop
    at the next step boundary: call :meth:`reached` once per step.

    Single process: the signal sets a flag. Several processes: JAX's preemption service
    (``jax.distributed``) catches SIGTERM and :meth:`reached` is true at the same step on
    all of them (``multihost_utils.reached_preemption_sync_point``); SIGINT keeps its usual
    meaning there. A second SIGINT stops at once (KeyboardInterrupt).
    """

    def __init__(self):
        self.signum: int | None = None
        self.multi = jax.process_count() > 1
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning(
            "received %s: stopping after this step with a checkpoint", signal.Signals(signum).name
        )

    def reached(self, step: int) -> bool:
        """Whether to save and stop at ``step``."""
        if self.multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as shells report it."""
        return 128 + (self.signum or signal.SIGTERM)

    def close(self) -> None:
        """Puts the previous signal handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class PreemptedError(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is the code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_sigterm: int | None = None  # set by exit_on_sigterm's handler
_previous_unraisablehook = sys.unraisablehook


def _unraisable(info: Any) -> None:
    """``sys.unraisablehook`` under :func:`exit_on_sigterm`: the lost exit is re-raised later
    (:func:`exit_if_signalled`), not a bug to print; everything else as before."""
    if not (_sigterm is not None and isinstance(info.exc_value, SystemExit)):
        _previous_unraisablehook(info)


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises ``SystemExit(143)`` in the main thread: ``with`` blocks
    and ``finally`` clauses run (the workdir's lock is released) before the process ends.

    Python ignores an exception raised inside ``__del__`` or a garbage-collector callback
    (JAX runs one), so a signal landing there would be lost: long loops call
    :func:`exit_if_signalled` between batches, which raises it again (and the ignored
    ``SystemExit`` is not printed as if it were a bug).
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        del frame
        global _sigterm
        _sigterm = signum
        logging.warning("received SIGTERM: stopping")
        sys.exit(128 + signum)

    global _previous_unraisablehook
    if sys.unraisablehook is not _unraisable:  # installed once
        _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _unraisable
    signal.signal(signal.SIGTERM, handle)


def exit_if_signalled() -> None:
    """``SystemExit(143)`` if :func:`exit_on_sigterm`'s handler has run (a no-op otherwise);
    the signal counts once."""
    global _sigterm
    if _sigterm is not None:
        signum, _sigterm = _sigterm, None
        sys.exit(128 + signum)
