"""Orbax checkpoints of the train state, with the config they were made under.

Each checkpoint holds the ``TrainState`` and, as JSON, the run's config. Resuming compares
that config with the current one: keys that shape the state or the training trajectory
must match, so a checkpoint is never silently continued under another recipe. Only
logging, checkpointing and evaluation settings may change between resumptions.

A run keeps two kinds: the latest ``keep_checkpoints`` in ``WORKDIR/checkpoints`` and, when
it evaluates during training, the best one by validation robust accuracy in
``WORKDIR/checkpoints_best`` (orbax's ``best_fn``; a tie goes to the later step).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
    }
)
CHECKPOINTS = {"latest": "checkpoints", "best": "checkpoints_best"}
BEST_METRIC = "val_robust"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incompatible config, or unreadable files."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between two config dicts, resumable keys aside."""
    a, b = _flatten(saved), _flatten(current)
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
        self, workdir: str, config: dict, *, every_steps: int, keep: int, best: bool = False
    ):
        self.directory = checkpoint_dir(workdir, "best" if best else "latest")
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, create=True
        )
        if best:
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
        """``(state, extras)`` of checkpoint ``step`` (default: the latest), or None if there
        is none.

        ``state`` is restored into ``abstract_state``'s structure; ``extras`` is what
        :meth:`save` was given (e.g. the training time so far).
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"Checkpoint {where} is unreadable ({type(e).__name__}: {e}). Delete that "
                "directory to resume from the previous checkpoint, or use a new --workdir."
            ) from e
        mismatch = config_mismatch(meta["meta"]["config"], self.config)
        if mismatch:
            raise CheckpointError(
                f"Checkpoint {where} was made with a different config:\n  "
                + "\n  ".join(mismatch)
                + "\nResume with the same settings, or start this config in a new --workdir."
            )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {where} does not match the model/optimizer state "
                f"({type(e).__name__}: {e}). Delete it to resume from the previous "
                "checkpoint, or use a new --workdir."
            ) from e
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


def checkpoint_dir(workdir: str, kind: str = "latest") -> str:
    """The directory of a run's ``latest`` checkpoints or of its ``best`` one."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS[kind])


def read_state(
    workdir: str, sharding: jax.sharding.Sharding, step: int | None = None, kind: str = "latest"
) -> tuple[int, Any] | None:
    """``(step, state)`` of a run's checkpoint, every array placed with ``sharding``; the
    state's structure is read from the checkpoint. None if there is none.

    ``kind="latest"`` reads ``step`` (default: the newest) from the latest checkpoints;
    ``kind="best"`` reads the best checkpoint. Orbax's errors for damaged files propagate:
    callers say what to do about them.
    """
    directory = checkpoint_dir(workdir, kind)
    if not os.path.isdir(directory):
        return None
    # "meta" (the config as JSON) is restored too: orbax warns about items left unread.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as mngr:
        if step is None:
            steps = mngr.all_steps()
            step = max(steps) if steps else None  # the best store holds only the best
        if step is None:
            return None
        if step not in mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {directory}; it holds steps "
                f"{sorted(mngr.all_steps())}"
            )
        meta = mngr.item_metadata(step)["state"]
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta
        )
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    return step, restored["state"]
