"""Config validation: every key of ``configs/default.py`` checked before anything runs.

:func:`validate_config` raises a :class:`ConfigError` naming the key, its value, what is
wrong and an example fix (``config.rho = -1.0: must be >= 0 (e.g. --config.rho=0.05)``);
the command lines print it as one ``error:`` line. The sweep imports this module to check a
grid's configs without the training code.
"""

import functools
import math
from collections.abc import Callable

import ml_collections

from samrobust import attacks, input_pipeline, losses, models
from samrobust.checkpoint import flatten_config
from samrobust.errors import UserError

MODES = ("sgd", "sam", "at", "sam_at")
LR_SCHEDULES = ("piecewise", "cosine", "triangle")

Check = Callable[[bool, str, str, str], None]  # (ok, key, what is wrong, example value)


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key and the fix."""


def uses_sam(mode: str) -> bool:
    return mode in ("sam", "sam_at")


def uses_attack(mode: str) -> bool:
    return mode in ("at", "sam_at")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` naming the key and the fix for any invalid value."""

    def check(ok: bool, key: str, what: str, example: str) -> None:
        if not ok:
            value = functools.reduce(getattr, key.split("."), config)
            raise ConfigError(f"config.{key} = {value!r}: {what} (e.g. --config.{key}={example})")

    _check_method(config, check)
    _check_recipe(config, num_devices, check)
    _check_run(config, num_devices, check)


def _check_method(config: ml_collections.ConfigDict, check: Check) -> None:
    """The mode, data, model and attack."""
    for key, value in flatten_config(config.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{key} = {value}: must be a finite number")
    check(config.mode in MODES, "mode", f"must be one of {MODES}", "sam")
    check(
        config.dataset in input_pipeline.DATASETS,
        "dataset",
        f"must be one of {input_pipeline.DATASETS}",
        "digits",
    )
    check(
        config.model in models.MODELS, "model", f"must be one of {models.MODELS}", "preact_resnet18"
    )
    check(config.width > 0, "width", "must be > 0", "64")
    check(
        config.padding in models.PADDINGS, "padding", f"must be one of {models.PADDINGS}", "torch"
    )
    check(config.rho >= 0, "rho", "must be >= 0", "0.05")
    check(
        config.attack.norm in attacks.NORMS,
        "attack.norm",
        f"must be one of {attacks.NORMS}",
        "linf",
    )
    check(config.attack.eps >= 0, "attack.eps", "must be >= 0", "0.0314")
    check(config.attack.step_size >= 0, "attack.step_size", "must be >= 0", "0.0078")
    check(config.attack.steps >= 0, "attack.steps", "must be >= 0", "5")
    check(config.attack.start_scale >= 0, "attack.start_scale", "must be >= 0", "2")


def _check_recipe(config: ml_collections.ConfigDict, num_devices: int, check: Check) -> None:
    """The optimisation recipe."""
    check(config.num_epochs > 0, "num_epochs", "must be > 0", "100")
    check(config.learning_rate > 0, "learning_rate", "must be > 0", "0.1")
    check(
        config.lr_schedule in LR_SCHEDULES,
        "lr_schedule",
        f"must be one of {LR_SCHEDULES}",
        "cosine",
    )
    check(config.weight_decay >= 0, "weight_decay", "must be >= 0", "5e-4")
    check(config.eval_pgd_steps >= 0, "eval_pgd_steps", "must be >= 0", "10")
    check(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)", "0.2")
    check(
        config.at_loss in losses.AT_LOSSES,
        "at_loss",
        f"must be one of {losses.AT_LOSSES}",
        "trades",
    )
    check(
        config.at_loss == "ce" or uses_attack(config.mode),
        "at_loss",
        f"{config.at_loss} needs an adversarial mode (--config.mode=at or sam_at)",
        "ce",
    )
    check(config.at_beta >= 0, "at_beta", "must be >= 0", "6.0")
    check(config.awp_gamma >= 0, "awp_gamma", "must be >= 0", "0.005")
    check(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)", "0.999")
    check(
        not config.awp_gamma or config.mode == "at",
        "awp_gamma",
        "AWP perturbs the weights of adversarial training: needs --config.mode=at (sam_at "
        "perturbs them already)",
        "0",
    )
    check(0 <= config.sam_start_fraction < 1, "sam_start_fraction", "must be in [0, 1)", "0.7")
    check(0 < config.sam_probability <= 1, "sam_probability", "must be in (0, 1]", "0.5")
    check(config.norm_bias_lr_scale > 0, "norm_bias_lr_scale", "must be > 0 (1 = off)", "64")
    check(
        len(config.lr_triangle) == 3
        and min(config.lr_triangle) >= 0
        and 0 <= config.lr_triangle[1] <= 1,
        "lr_triangle",
        "must be (start factor, peak fraction in [0, 1], end factor), all >= 0",
        "'(0.2,0.23,0.07)'",
    )
    per_device = config.batch_size // max(num_devices, 1)
    check(
        config.sam_group_size == -1
        or (config.sam_group_size > 0 and per_device % config.sam_group_size == 0),
        "sam_group_size",
        f"must be -1 (the per-device batch) or divide the per-device batch {per_device}",
        str(per_device),
    )
    check(
        not (config.sam_sync and config.sam_group_size not in (-1, per_device)),
        "sam_group_size",
        "groups within a device need per-device perturbations: drop --config.sam_sync",
        "-1",
    )


def _check_run(config: ml_collections.ConfigDict, num_devices: int, check: Check) -> None:
    """Batches, logging, checkpoints, evaluation and the lock."""
    check(config.crop_padding >= 0, "crop_padding", "must be >= 0", "4")
    for key in ("batch_size", "eval_batch_size"):
        check(
            config[key] > 0 and config[key] % num_devices == 0,
            key,
            f"must be a positive multiple of the device count ({num_devices})",
            str(max(num_devices, 1) * 16),
        )
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check(config[key] > 0, key, "must be > 0", "100")
    check(config.lock_stale_after_s > 0, "lock_stale_after_s", "must be > 0 seconds", "600")
    check(
        config.train_examples == -1 or config.train_examples > 0,
        "train_examples",
        "must be -1 (all) or > 0",
        "10000",
    )
    check(
        config.eval_num_examples == -1 or config.eval_num_examples > 0,
        "eval_num_examples",
        "must be -1 (the whole test split) or > 0",
        "1000",
    )
    check(config.val_examples >= 0, "val_examples", "must be >= 0 (0 = none)", "1000")
    check(config.eval_every_epochs >= 0, "eval_every_epochs", "must be >= 0 (0 = off)", "5")
    check(0 <= config.stop_on_collapse < 1, "stop_on_collapse", "must be in [0, 1)", "0.2")
    check(
        not config.stop_on_collapse or config.eval_every_epochs,
        "stop_on_collapse",
        "the guard watches validation: add --config.eval_every_epochs=1",
        "0",
    )
    v = config.val_attack
    check(
        v.norm is None or v.norm in attacks.NORMS,
        "val_attack.norm",
        f"must be one of {attacks.NORMS}",
        "linf",
    )
    for key, example in (("eps", "0.0078"), ("step_size", "0.002"), ("steps", "10")):
        check(v[key] is None or v[key] >= 0, f"val_attack.{key}", "must be >= 0", example)
