"""Training: the train state, one pure train step for every mode, and the training loop.

The step (``train_step``) is, per device:
  augment -> [AT: PGD inner maximisation on the inputs] -> loss and gradient at w
  -> SAM (optax transformation: gradient at w + e) -> mean over devices
  -> weight decay + momentum SGD.
BatchNorm statistics come from the first, unperturbed pass and are averaged over devices.
``make_train_step`` maps it over all devices with ``shard_map`` (pmap semantics: each
device sees its own slice of the global batch).
"""

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import attacks, input_pipeline, losses, models, parallel, paths, robustness
from samrobust.checkpoint import (
    BEST_METRIC,
    Checkpointer,
    PreemptedError,
    Preemption,
    flatten_config,
)
from samrobust.errors import UserError
from samrobust.metrics import MetricWriter
from samrobust.sam import sam
from samrobust.workdir import WorkdirLock

AXIS = parallel.AXIS
MODES = ("sgd", "sam", "at", "sam_at")
LR_SCHEDULES = ("piecewise", "cosine", "triangle")


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key and the fix."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static parts of the train step."""

    crop_padding: int = 0
    flip: bool = False
    attack: attacks.PGDSpec | None = None  # PGD for adversarial training
    label_smoothing: float = 0.0
    sam_groups: int = 1  # SAM perturbations per device (m-sharpness within a device)
    at_loss: str = "ce"  # ce (Madry) | trades | mart: the loss of the AT modes
    at_beta: float = 6.0  # TRADES / MART weight of the KL term


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
    v = config.val_attack
    check(
        v.norm is None or v.norm in attacks.NORMS,
        "val_attack.norm",
        f"must be one of {attacks.NORMS}",
        "linf",
    )
    for key, example in (("eps", "0.0078"), ("step_size", "0.002"), ("steps", "10")):
        check(v[key] is None or v[key] >= 0, f"val_attack.{key}", "must be >= 0", example)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The paper's piecewise schedule (x0.1 at 75% and 90%), cosine decay, or ``triangle``
    (airbench's): linear from ``lr_triangle[0]`` x the peak at step 0 to the peak at the
    fraction ``lr_triangle[1]`` of training, then linear to ``lr_triangle[2]`` x the peak."""
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, total_steps)
    if config.lr_schedule == "triangle":
        start, peak, end = config.lr_triangle
        peak_step = int(peak * total_steps)
        lr = config.learning_rate
        return optax.join_schedules(
            [
                optax.linear_schedule(start * lr, lr, peak_step),
                optax.linear_schedule(lr, end * lr, total_steps - peak_step),
            ],
            [peak_step],
        )
    return optax.piecewise_constant_schedule(
        config.learning_rate, {int(0.75 * total_steps): 0.1, int(0.9 * total_steps): 0.1}
    )


def create_optimizer(
    config: ml_collections.ConfigDict,
    learning_rate: optax.ScalarOrSchedule,
    grouped: bool = False,
    total_steps: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """SAM (for SAM modes) -> mean over devices -> weight decay -> momentum SGD
    (Nesterov with ``config.nesterov``).

    ``config.norm_bias_lr_scale`` = s multiplies the learning rate of BatchNorm biases by s
    and divides their weight decay by s (their decay per step is unchanged; airbench's
    ``bias_scaler``). Frozen parameters (:func:`samrobust.models.is_frozen`) get no weight
    decay. The device mean needs the ``AXIS`` mapped axis: use the optimizer inside the step.
    With ``grouped=True`` (:func:`sam_groups`) SAM takes per-group gradients. Cheaper SAM:
    ``config.sam_start_fraction`` (of ``total_steps``) runs plain steps before it, and
    ``config.sam_probability`` makes each step SAM with that probability; the second pass is
    skipped on the other steps (``lax.cond``).
    """
    parts = []
    if uses_sam(config.mode):
        rho: Any = config.rho
        if config.sam_start_fraction:
            start = int(config.sam_start_fraction * total_steps)
            rho = lambda count: jnp.where(count >= start, config.rho, 0.0)  # noqa: E731
        parts.append(
            sam(
                rho,
                adaptive=config.adaptive,
                axis_name=AXIS if config.sam_sync else None,
                grouped=grouped,
                probability=config.sam_probability,
                seed=config.seed,
            )
        )
    scale = config.norm_bias_lr_scale

    def decay_mask(norm_bias: bool):
        def mask(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: (
                    not models.is_frozen(path) and models.is_norm_bias(path) == norm_bias
                ),
                params,
            )

        return mask

    parts += [
        optax.stateless(lambda g, _: jax.lax.pmean(g, AXIS)),  # SAM gradients are local
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask(False)),
        optax.add_decayed_weights(config.weight_decay / scale, mask=decay_mask(True)),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
    ]
    if scale != 1:
        parts.append(optax.masked(optax.scale(scale), decay_mask(True)))
    return optax.chain(*parts)


def validation_spec(config: ml_collections.ConfigDict) -> attacks.PGDSpec:
    """The PGD budget of evaluation during training: ``config.val_attack``'s fields where
    set, else the run's AT budget (at/sam_at) or Linf 2/255, step 0.5/255, PGD-10."""
    if uses_attack(config.mode):
        a = config.attack
        default = attacks.PGDSpec(a.norm, a.eps, a.step_size, a.steps)
    else:
        default = attacks.PGDSpec("linf", 2 / 255, 0.5 / 255, 10)
    v = config.val_attack
    return attacks.PGDSpec(
        v.norm if v.norm is not None else default.norm,
        v.eps if v.eps is not None else default.eps,
        v.step_size if v.step_size is not None else default.step_size,
        v.steps if v.steps is not None else default.steps,
    )


def step_options(config: ml_collections.ConfigDict) -> StepOptions:
    attack = None
    if uses_attack(config.mode):
        a = config.attack
        attack = attacks.PGDSpec(a.norm, a.eps, a.step_size, a.steps)
    return StepOptions(
        crop_padding=config.crop_padding,
        flip=config.flip,
        attack=attack,
        label_smoothing=config.label_smoothing,
        sam_groups=sam_groups(config, jax.device_count()),
        at_loss=config.at_loss if uses_attack(config.mode) else "ce",
        at_beta=config.at_beta,
    )


def sam_groups(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """SAM perturbations per device: the per-device batch over ``config.sam_group_size``
    (-1: the per-device batch, one perturbation per device); 1 outside SAM modes."""
    per_device = config.batch_size // num_devices
    if not uses_sam(config.mode) or config.sam_group_size == -1:
        return 1
    return per_device // config.sam_group_size


def augment(key: jax.Array, images: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    """Reflect-pad + random crop and random horizontal flip, per example."""
    n, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(
            lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        )(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        images = jnp.where(mirror, images[:, :, ::-1], images)
    return images


def train_step(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    apply_fn: Any,
    tx: optax.GradientTransformationExtraArgs,
    options: StepOptions,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One training step on this device's shard. Call inside a map over ``AXIS``."""
    key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))
    k_aug, k_attack = jax.random.split(key)
    x = augment(k_aug, images, options.crop_padding, options.flip)

    def forward(params, inputs):
        logits, new_vars = apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
        )
        return logits, new_vars.get("batch_stats", {})  # {}: a model without BN

    def loss_fn(params, clean, adv, targets):
        """The training loss on (clean, adversarial) inputs: (loss, (logits, BN stats))."""
        if options.at_loss == "ce":  # on the PGD examples (AT), else on the clean inputs
            logits, stats = forward(params, adv)
            return losses.cross_entropy(logits, targets, options.label_smoothing), (logits, stats)
        clean_logits, stats = forward(params, clean)  # TRADES / MART: stats of the clean pass
        logits, _ = forward(params, adv)
        method = losses.trades if options.at_loss == "trades" else losses.mart
        loss = method(clean_logits, logits, targets, options.at_beta, options.label_smoothing)
        return loss, (logits, stats)

    x_adv = x
    if options.attack is not None:  # AT: PGD examples (train-mode BN, stats unused)
        a = options.attack
        logits_at = lambda z: forward(state.params, z)[0]  # noqa: E731
        if options.at_loss == "trades":
            attack_loss = losses.trades_attack_loss(logits_at, logits_at(x))
        else:
            attack_loss = attacks.input_loss(logits_at)
        x_adv = attacks.pgd(
            attack_loss,
            x,
            labels,
            k_attack,
            eps=a.eps,
            step_size=a.step_size,
            steps=a.steps,
            norm=a.norm,
        )

    # SAM's ascent/descent gradients are fresh gradients of the loss: no attack leak.
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    grad_fn = jax.grad(lambda p, *batch: loss_fn(p, *batch)[0])
    batch = (x, x_adv, labels)
    if options.sam_groups == 1:
        (loss, (logits, batch_stats)), grads = value_and_grad(state.params, *batch)
        sam_grad_fn = lambda p: grad_fn(p, *batch)  # noqa: E731
    else:  # one SAM perturbation per group of examples: each group's own pass, BN included
        batch = tuple(a.reshape(options.sam_groups, -1, *a.shape[1:]) for a in batch)
        (group_losses, (logits, stats)), grads = jax.vmap(value_and_grad, (None, 0, 0, 0))(
            state.params, *batch
        )
        loss, logits = jnp.mean(group_losses), logits.reshape(-1, logits.shape[-1])
        batch_stats = jax.tree.map(lambda a: jnp.mean(a, axis=0), stats)
        sam_grad_fn = lambda p: jax.vmap(grad_fn)(p, *batch)  # noqa: E731
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=sam_grad_fn)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=jax.lax.pmean(batch_stats, AXIS),
        opt_state=opt_state,
    )
    return new_state, jax.lax.pmean(metrics, AXIS)


def make_train_step(apply_fn: Any, tx: Any, options: StepOptions, mesh: Mesh):
    """``train_step`` over all devices of ``mesh``, jitted, with the state donated.

    Returns ``step(state, images, labels, key) -> (state, metrics)``; images and labels are
    global arrays sharded over ``AXIS``, the state replicated.
    """
    step = functools.partial(train_step, apply_fn=apply_fn, tx=tx, options=options)
    return parallel.sharded_jit(
        step, mesh, (P(), P(AXIS), P(AXIS), P()), (P(), P()), donate_argnums=0
    )


def create_train_state(
    key: jax.Array, model: Any, tx: Any, image_shape: tuple[int, ...], mesh: Mesh
) -> TrainState:
    """Initial state, replicated over ``mesh``."""

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(key)


class Validator:
    """Evaluation during training: clean and PGD accuracy on the validation split (the test
    split when there is none) and the best checkpoint by robust accuracy."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        ds: input_pipeline.Dataset,
        apply_fn: Any,
        mesh: Mesh,
        key: jax.Array,
        workdir: str,
        config_dict: dict,
    ):
        self.split = "val" if ds.num_val else "test"
        self.images, self.labels = (
            (ds.val_images, ds.val_labels) if ds.num_val else (ds.test_images, ds.test_labels)
        )
        if not ds.num_val:
            logging.warning(
                "validating on the TEST split (config.val_examples = 0): the best checkpoint "
                "is then chosen on test data. Hold out a validation split with e.g. "
                "--config.val_examples=1000"
            )
        self.spec = validation_spec(config)
        self.every_epochs = config.eval_every_epochs
        self.batch_size = config.eval_batch_size
        self.mesh, self.key = mesh, key
        logits_fn = robustness.model_logits_fn(apply_fn)
        self.fns = {
            "clean": robustness.make_correct_fn(logits_fn, None, mesh),
            "robust": robustness.make_correct_fn(logits_fn, self.spec, mesh),
        }
        self.checkpointer = Checkpointer(workdir, config_dict, every_steps=1, keep=1, best=True)

    def __call__(self, step: int, state: TrainState, writer: MetricWriter) -> float:
        """Evaluates ``state``, logs ``val/clean`` and ``val/robust``, offers it as the best
        checkpoint; returns the seconds it took."""
        start = time.perf_counter()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        accuracy = {
            name: float(
                robustness.correctness(
                    fn,
                    variables,
                    self.images,
                    self.labels,
                    self.key,
                    batch_size=self.batch_size,
                    mesh=self.mesh,
                ).mean()
            )
            for name, fn in self.fns.items()
        }
        writer.write(step, {f"val/{k}": v for k, v in accuracy.items()}, split=self.split)
        if step not in self.checkpointer.all_steps():  # a resumed run may have saved it
            self.checkpointer.save(
                step,
                state,
                force=True,
                metrics={BEST_METRIC: accuracy["robust"], "val_clean": accuracy["clean"]},
            )
        seconds = time.perf_counter() - start
        logging.info(
            "validation at step %d on %d %s images: clean %.4f, %s %.4f (%.0f s)",
            step,
            len(self.labels),
            self.split,
            accuracy["clean"],
            self.spec.name,
            accuracy["robust"],
            seconds,
        )
        return seconds

    def best(self) -> tuple[int, dict[str, float]]:
        """The best step and its validation accuracies (``clean``, ``robust``)."""
        self.checkpointer.manager.wait_until_finished()
        step = self.checkpointer.best_step()
        metrics = self.checkpointer.manager.metrics(step)
        return step, {"clean": metrics["val_clean"], "robust": metrics[BEST_METRIC]}

    def describe(self) -> dict[str, Any]:
        """What the validation was: split, size, attack, frequency."""
        return {
            "split": self.split,
            "examples": len(self.labels),
            "every_epochs": self.every_epochs,
            "attack": dataclasses.asdict(self.spec) | {"name": self.spec.name},
        }


def _format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir``'s latest readable checkpoint), evaluates, writes
    results; ``workdir`` may be local or ``gs://``. Holds the workdir's lock throughout
    (process 0). On SIGTERM/SIGINT it saves a checkpoint at the current step and raises
    ``PreemptedError``."""
    validate_config(config, jax.device_count())
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"config.batch_size must divide by the process count {jax.process_count()}"
        )
    is_chief = jax.process_index() == 0
    lock = WorkdirLock(workdir, "training", config.lock_stale_after_s) if is_chief else None
    preemption = Preemption()
    try:
        with lock or contextlib.nullcontext():
            return _train_and_evaluate(config, workdir, preemption, lock)
    finally:
        preemption.close()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: Preemption,
    lock: WorkdirLock | None,
) -> dict[str, Any]:
    check_lock = lock.check if lock is not None else lambda: None
    try:
        ds = input_pipeline.load(
            config.dataset,
            config.data_dir,
            train_examples=config.train_examples,
            val_examples=config.val_examples,
            cache_dir=config.cache_dir,
        )
    except ValueError as e:  # train/val sizes that do not fit the dataset
        raise ConfigError(str(e)) from e
    steps_per_epoch = len(ds.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config.batch_size = {config.batch_size} is larger than the {ds.name} train split "
            f"({len(ds.train_images)} images); lower it."
        )
    total_steps = config.num_epochs * steps_per_epoch
    is_chief = jax.process_index() == 0

    model = models.from_config(config, ds)
    lr_fn = learning_rate_schedule(config, total_steps)
    mesh = parallel.default_mesh()
    tx = create_optimizer(config, lr_fn, sam_groups(config, mesh.size) > 1, total_steps)
    key = jax.random.key(config.seed)
    init_key, step_key, eval_key = jax.random.split(key, 3)
    state = create_train_state(init_key, model, tx, ds.image_shape, mesh)

    config_dict = config.to_dict()
    ckpt = Checkpointer(
        workdir,
        config_dict,
        every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    restored = ckpt.restore(state)
    # Training time of earlier segments of this run (a resumed run adds to it).
    earlier = {"train_seconds": 0.0, "timed_steps": 0}
    if restored is not None:
        state, extras = restored
        earlier.update(extras)
    elif models.has_data_init(state.params):
        # fast_cifar's whitening layer, from a fixed stratified subset of the train split.
        sample = input_pipeline.eval_subset(ds.train_labels, min(5000, len(ds.train_labels)))
        params = models.init_from_data(state.params, ds.train_images[sample], ds.mean, ds.std)
        state = state.replace(params=parallel.replicate(params, mesh))
    start_step = int(state.step)
    out = paths.path(workdir)
    if is_chief:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    logging.info(
        "%s on %s: %d steps (%d epochs x %d), global batch %d on %d devices, %s",
        config.mode,
        ds.name,
        total_steps,
        config.num_epochs,
        steps_per_epoch,
        config.batch_size,
        jax.device_count(),
        f"resuming at step {start_step}" if start_step else "from scratch",
    )

    writer = MetricWriter(workdir, enabled=is_chief)
    validator, eval_every = None, config.eval_every_epochs * steps_per_epoch
    if eval_every:
        validator = Validator(config, ds, model.apply, mesh, eval_key, workdir, config_dict)
    step_fn = make_train_step(model.apply, tx, step_options(config), mesh)
    batches = input_pipeline.prefetch(
        input_pipeline.train_batches(
            ds.train_images,
            ds.train_labels,
            config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )

    pending: list[dict[str, jax.Array]] = []
    timed_steps, timed_seconds, t_last, last_step = 0, 0.0, None, start_step

    def flush(step: int) -> dict[str, float]:
        """Fetches pending metrics; stops the run if any loss is not finite."""
        fetched = jax.device_get(pending)
        pending.clear()
        losses = np.array([m["loss"] for m in fetched])
        if not np.all(np.isfinite(losses)):
            ckpt.close()
            raise TrainingDivergedError(
                f"Loss is {losses[~np.isfinite(losses)][0]} by step {step}. The last good "
                f"checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}. Lower "
                f"--config.learning_rate (now {config.learning_rate}) or --config.rho "
                f"(now {config.rho}), and resume or start a new --workdir."
            )
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}

    for step in range(start_step + 1, total_steps + 1):
        images, labels = parallel.shard_batch(mesh, *next(batches))
        state, metrics = step_fn(state, images, labels, step_key)
        pending.append(metrics)
        stop = preemption.reached(step)
        log_due = step % config.log_every_steps == 0 or step == total_steps
        ckpt_due = step % config.checkpoint_every_steps == 0 or step == total_steps or stop
        if log_due or ckpt_due or step == start_step + 1:
            summary = flush(step)
            now = time.perf_counter()
            if t_last is not None:  # the first step (compilation) is not timed
                timed_seconds += now - t_last
                timed_steps += step - last_step
            t_last, last_step = now, step
            if log_due:
                rate = timed_steps * config.batch_size / timed_seconds if timed_steps else 0.0
                eta = (total_steps - step) * timed_seconds / timed_steps if timed_steps else 0.0
                summary["learning_rate"] = float(lr_fn(step - 1))
                writer.write(step, {f"train/{k}": v for k, v in summary.items()}, images_per_s=rate)
                logging.info(
                    "step %d/%d (%.0f%%) loss %.4f acc %.3f lr %.4g | %.0f img/s | ETA %s",
                    step,
                    total_steps,
                    100 * step / total_steps,
                    summary["loss"],
                    summary["accuracy"],
                    summary["learning_rate"],
                    rate,
                    _format_seconds(eta),
                )
        if ckpt_due:
            check_lock()
            ckpt.save(
                step,
                state,
                force=step == total_steps or stop,
                extras={
                    "train_seconds": earlier["train_seconds"] + timed_seconds,
                    "timed_steps": earlier["timed_steps"] + timed_steps,
                },
            )
        if validator is not None and (step % eval_every == 0 or step == total_steps):
            jax.block_until_ready(state)
            seconds = validator(step, state, writer)
            if t_last is not None:  # evaluation is not training time
                t_last += seconds
        if stop:
            ckpt.close()
            if validator is not None:
                validator.checkpointer.close()
            writer.close()
            raise PreemptedError(
                f"stopped by {signal.Signals(preemption.exit_code - 128).name} at step {step} "
                f"of {total_steps}: checkpoint {step} saved in {ckpt.directory}; run the same "
                "command to resume",
                preemption.exit_code,
            )
    ckpt.close()
    if jax.process_count() > 1:  # every process must hold the same replica
        multihost_utils.assert_equal(
            jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params),
            "parameter replicas differ across processes",
        )

    test_images, test_labels, test_subset = input_pipeline.evaluation_points(
        ds, config.eval_num_examples
    )

    def test_suite(state: TrainState) -> dict[str, Any]:
        return robustness.pgd_suite(
            robustness.model_logits_fn(model.apply),
            {"params": state.params, "batch_stats": state.batch_stats},
            test_images,
            test_labels,
            specs=[
                dataclasses.replace(s, steps=config.eval_pgd_steps) for s in robustness.PAPER_SUITE
            ],
            batch_size=config.eval_batch_size,
            seed=config.seed,
            mesh=mesh,
        )

    report = test_suite(state)
    # Over every segment of the run; the first step of each (compilation) is not timed.
    all_seconds = earlier["train_seconds"] + timed_seconds
    all_steps = earlier["timed_steps"] + timed_steps
    results = {
        "mode": config.mode,
        "dataset": ds.name,
        "total_steps": int(state.step),
        "train_images_per_s": all_steps * config.batch_size / all_seconds if all_steps else None,
        "train_seconds": all_seconds,
        "train_examples": len(ds.train_labels),
        "val_examples": ds.num_val,
        "test_examples": len(test_labels),
        "test_subset": test_subset,
        "accuracy": report["accuracy"],
        "eval_images_per_s": report["images_per_s"],
    }
    if validator is not None:
        best_step, best_val = validator.best()
        logging.info("best checkpoint: step %d (validation %s)", best_step, best_val)
        if best_step == int(state.step):
            best_accuracy = report["accuracy"]
        else:
            best_state, _ = validator.checkpointer.restore(state, step=best_step)
            best_accuracy = test_suite(best_state)["accuracy"]
        validator.checkpointer.close()
        results["validation"] = validator.describe()
        results["best"] = {"step": best_step, "val": best_val, "accuracy": best_accuracy}
    writer.write(int(state.step), {f"eval/{k}": v for k, v in report["accuracy"].items()})
    writer.close()
    if is_chief:
        check_lock()
        (out / "results.json").write_text(json.dumps(results, indent=2))
        robustness.save_masks(out / "eval_masks.npz", report["masks"])
    logging.info("results: %s", json.dumps(results["accuracy"]))
    return results
