"""Orbax checkpoints of the train state, with the config they were made under.

Each checkpoint holds the ``TrainState`` and, as JSON, the run's config. Resuming compares
that config with the current one: keys that shape the state or the training trajectory
must match, so a checkpoint is never silently continued under another recipe. Only
logging, checkpointing and evaluation settings may change between resumptions.

Resuming falls back past damaged checkpoints: the newest readable one is used, each damaged
one is moved aside to ``damaged-<step>-<time>`` (kept, never deleted) with a warning, so
that training can save that step again. (Stopping on a signal is
:mod:`samrobust.preemption`'s.)

A run keeps two kinds: the latest ``keep_checkpoints`` in ``WORKDIR/checkpoints`` and, when
it evaluates during training, the best one by validation robust accuracy in
``WORKDIR/checkpoints_best`` (orbax's ``best_fn``; a tie goes to the later step).
"""

import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from samrobust import paths
from samrobust.errors import UserError

# Config keys that may differ between a checkpoint and the run that resumes it.
RESUMABLE_KEYS = frozenset(
    {
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "eval_batch_size",
        "eval_num_examples",
        "eval_pgd_steps",
        "data_dir",
        "cache_dir",
        "lock_stale_after_s",
    }
)
# Config keys added after runs existed, with the value that every run saved without them
# ran with: a saved config that lacks one matches a config that holds that value.
ADDED_KEYS = {
    "nesterov": False,
    "label_smoothing": 0.0,
    "lr_triangle": [0.2, 0.23, 0.07],
    "norm_bias_lr_scale": 1.0,
    "sam_group_size": -1,
    "at_loss": "ce",
    "at_beta": 6.0,
    "sam_start_fraction": 0.0,
    "sam_probability": 1.0,
    "awp_gamma": 0.0,
    "ema_decay": 0.0,
    "stop_on_collapse": 0.0,
    "attack.start_scale": 1.0,
    "attack.project": True,
    "padding": "same",
}
CHECKPOINTS = {"latest": "checkpoints", "best": "checkpoints_best"}
BEST_METRIC = "val_robust"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used: incompatible config, or unreadable files."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read."""

    def __init__(self, where: epath.PathLike, cause: BaseException):
        text = (str(cause).splitlines() or [""])[0].split(" See full TensorStore details")[0]
        self.reason = f"{type(cause).__name__}: {text[:160]}"
        super().__init__(
            f"Checkpoint {where} is unreadable ({self.reason}). Evaluate or resume from "
            "another checkpoint, or start again in a new --workdir."
        )


def quiet_orbax() -> None:
    """Keeps orbax's per-save INFO chatter out of a command line's progress output (its
    warnings still show)."""
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in r.pathname
    )


def flatten_config(d: dict, prefix: str = "") -> dict:
    """Nested config dicts to dotted keys (tuples as lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between two config dicts, resumable keys aside
    (a key of :data:`ADDED_KEYS` missing from either counts as its listed value)."""
    a, b = ADDED_KEYS | flatten_config(saved), ADDED_KEYS | flatten_config(current)
    keys = sorted((set(a) | set(b)) - RESUMABLE_KEYS)
    return [
        f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)
    ]


class Checkpointer:
    """Saves every ``every_steps`` steps (and on ``force``), keeps the latest ``keep``.

    With ``best=True`` it is the best-checkpoint store instead: every :meth:`save` passes
    ``metrics`` and only the checkpoint with the highest ``BEST_METRIC`` is kept.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        config: dict,
        *,
        every_steps: int,
        keep: int,
        best: bool = False,
    ):
        self.directory = checkpoint_dir(workdir, "best" if best else "latest")
        self.config = config
        if not best:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every_steps, create=True
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m[BEST_METRIC],
                best_mode="max",
                keep_checkpoints_without_metrics=False,
                create=True,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """``(state, extras)`` of checkpoint ``step``, or by default of the newest readable
        one (damaged newer ones are moved aside with a warning); None if there is none.

        ``state`` is restored into ``abstract_state``'s structure; ``extras`` is what
        :meth:`save` was given (e.g. the training time so far). A checkpoint of another
        config raises ``CheckpointError``.
        """
        if step is not None:
            return self._restore_step(abstract_state, step)
        damaged: list[tuple[int, DamagedCheckpointError]] = []
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(abstract_state, candidate)
            except DamagedCheckpointError as e:
                damaged.append((candidate, e))
                continue
            if damaged:
                self._move_aside(damaged)
            return restored
        if damaged:
            raise CheckpointError(
                f"No readable checkpoint in {self.directory}: "
                + "; ".join(f"step {s}: {e.reason}" for s, e in damaged)
                + ". Start again in a new --workdir (the damaged ones are left as they are)."
            )
        return None

    def _move_aside(self, damaged: list[tuple[int, "DamagedCheckpointError"]]) -> None:
        """Moves damaged checkpoints to ``damaged-<step>-<time>`` (kept, so that their steps
        can be saved again), warning for each."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step, e in damaged:
            aside = self.directory / f"damaged-{step}-{stamp}"
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(aside)
            logging.warning(
                "checkpoint step %d is damaged (%s): moved to %s (kept); resuming from the "
                "newest readable one",
                step,
                e.reason,
                aside,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("samrobust checkpoint fallback")
        self.manager.reload()

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        # A fresh reader per attempt: after failed restores orbax's shared manager floods
        # stderr with "Event loop is closed" tracebacks from tensorstore callbacks.
        where = self.directory / str(step)
        with ocp.CheckpointManager(self.directory) as reader:
            try:
                meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                mismatch = config_mismatch(meta["meta"]["config"], self.config)
            except Exception as e:  # orbax raises many types for damaged files
                raise DamagedCheckpointError(where, e) from e
            if mismatch:
                raise CheckpointError(
                    f"Checkpoint {where} was made with a different config:\n  "
                    + "\n  ".join(mismatch)
                    + "\nResume with the same settings, or start this config in a new --workdir."
                )
            try:
                restored = reader.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:  # same config, unreadable state: damaged files
                raise DamagedCheckpointError(where, e) from e
        return restored["state"], meta["meta"].get("extras", {})

    def save(
        self,
        step: int,
        state: Any,
        *,
        extras: dict | None = None,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Saves ``state`` (and JSON ``extras``) if ``step`` is due or ``force``; returns whether
        it saved. ``metrics`` rank the checkpoints of a ``best`` store."""
        meta = {"config": self.config, "extras": extras or {}}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
            metrics=metrics,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: epath.PathLike, kind: str = "latest") -> epath.Path:
    """The directory of a run's ``latest`` checkpoints or of its ``best`` one."""
    return paths.path(workdir) / CHECKPOINTS[kind]


def read_state(
    workdir: epath.PathLike,
    sharding: jax.sharding.Sharding,
    step: int | None = None,
    kind: str = "latest",
) -> tuple[int, Any] | None:
    """``(step, state)`` of a run's checkpoint, every array placed with ``sharding``; the
    state's structure is read from the checkpoint. None if there is none.

    ``kind="latest"`` reads ``step`` from the latest checkpoints, by default the newest
    readable one (a damaged newer one is skipped with a warning naming its step, and left as
    it is); ``kind="best"`` reads the best checkpoint. Orbax's errors for a damaged ``step``
    asked for, or when none is readable, propagate: callers say what to do about them.
    """
    directory = checkpoint_dir(workdir, kind)
    if not directory.is_dir():
        return None

    # "meta" (the config as JSON) is restored too: orbax warns about items left unread.
    def reader() -> ocp.CheckpointManager:  # fresh per attempt, as in Checkpointer
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(directory, item_handlers=handlers)

    with reader() as mngr:
        steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {directory}; it holds steps {sorted(steps)}"
        )
    candidates = [step] if step is not None else steps
    for i, candidate in enumerate(candidates):
        try:
            with reader() as mngr:
                meta = mngr.item_metadata(candidate)["state"]
                target = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta
                )
                restored = mngr.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                    ),
                )
            return candidate, restored["state"]
        except Exception as e:  # orbax raises many types for damaged files
            if i == len(candidates) - 1:
                raise
            logging.warning(
                "checkpoint step %d in %s is damaged (%s: %s); using the previous one",
                candidate,
                directory,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
    return None
