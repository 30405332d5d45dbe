"""Orbax checkpoints of the train state, with the config they were made under.

Each checkpoint holds the ``TrainState`` and, as JSON, the run's config. Resuming compares
that config with the current one: keys that shape the state or the training trajectory
must match, so a checkpoint is never silently continued under another recipe. Only
logging, checkpointing and evaluation settings may change between resumptions.
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
    }
)


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
    """Saves every ``every_steps`` steps (and on ``force``), keeps the latest ``keep``."""

    def __init__(self, workdir: str, config: dict, *, every_steps: int, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.config = config
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every_steps, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """``(state, extras)`` of the latest checkpoint, or None if there is none.

        ``state`` is restored into ``abstract_state``'s structure; ``extras`` is what
        :meth:`save` was given (e.g. the training time so far).
        """
        step = self.manager.latest_step()
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
        self, step: int, state: Any, *, extras: dict | None = None, force: bool = False
    ) -> bool:
        """Saves ``state`` (and JSON ``extras``) if ``step`` is due or ``force``; returns whether
        it saved."""
        meta = {"config": self.config, "extras": extras or {}}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_state(
    workdir: str, sharding: jax.sharding.Sharding, step: int | None = None
) -> tuple[int, Any] | None:
    """``(step, state)`` of a run's checkpoint (default: the latest), every array placed with
    ``sharding``; the state's structure is read from the checkpoint. None if there is none.

    Orbax's errors for damaged files propagate: callers say what to do about them.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return None
    # "meta" (the config as JSON) is restored too: orbax warns about items left unread.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
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
