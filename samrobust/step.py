"""The train state and one pure train step for every mode.

The step (``train_step``) is, per device:
  augment -> [AT: PGD inner maximisation on the inputs] -> loss and gradient at w
  -> SAM (optax transformation: gradient at w + e) -> mean over devices
  -> weight decay + momentum SGD.
BatchNorm statistics come from the first, unperturbed pass and are averaged over devices.
``make_train_step`` maps it over all devices with ``shard_map`` (pmap semantics: each
device sees its own slice of the global batch).
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from samrobust import attacks, losses, parallel
from samrobust.config_check import uses_attack, uses_sam
from samrobust.parallel import AXIS


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables: ``{"params", "batch_stats"}``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


class EMATrainState(TrainState):
    """A train state with an exponential moving average of the weights
    (``config.ema_decay``): ``ema = {"params", "batch_stats"}``, what evaluation uses."""

    ema: Any


def evaluation_variables(state: TrainState | Mapping[str, Any]) -> dict[str, Any]:
    """The variables evaluation uses: the weight average of a state (or a checkpoint's
    state dict) that holds one, else its weights."""
    if isinstance(state, Mapping):
        return dict(state.get("ema") or {k: state[k] for k in ("params", "batch_stats")})
    return dict(state.ema) if isinstance(state, EMATrainState) else state.variables


def evaluated_weights(config: Mapping[str, Any]) -> str:
    """Which weights evaluation uses for a run of ``config``: ``ema`` or ``trained``."""
    return "ema" if config.get("ema_decay") else "trained"


def reset_ema(state: TrainState) -> TrainState:
    """The state with its weight average (if it has one) set to its weights."""
    return state.replace(ema=state.variables) if isinstance(state, EMATrainState) else state


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
    ema_decay: float = 0.0  # weight averaging: ema <- d * ema + (1 - d) * new weights


def step_options(config: ml_collections.ConfigDict) -> StepOptions:
    attack = None
    if uses_attack(config.mode):
        a = config.attack
        attack = attacks.PGDSpec(
            a.norm, a.eps, a.step_size, a.steps, start_scale=a.start_scale, project=a.project
        )
    return StepOptions(
        crop_padding=config.crop_padding,
        flip=config.flip,
        attack=attack,
        label_smoothing=config.label_smoothing,
        sam_groups=sam_groups(config, jax.device_count()),
        at_loss=config.at_loss if uses_attack(config.mode) else "ce",
        at_beta=config.at_beta,
        ema_decay=config.ema_decay,
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
    perturb: bool | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One training step on this device's shard. Call inside a map over ``AXIS``.

    ``perturb``: passed to SAM/AWP's update (True: the second pass, False: the plain
    gradient; None: their own rule, see :func:`samrobust.sam.perturbs`)."""
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
            start_scale=a.start_scale,
            project_to_ball=a.project,
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
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, grad_fn=sam_grad_fn, perturb=perturb
    )
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=jax.lax.pmean(batch_stats, AXIS),
        opt_state=opt_state,
    )
    if options.ema_decay:
        d = options.ema_decay
        ema = jax.tree.map(lambda e, w: d * e + (1 - d) * w, state.ema, new_state.variables)
        new_state = new_state.replace(ema=ema)
    return new_state, jax.lax.pmean(metrics, AXIS)


def make_train_step(
    apply_fn: Any, tx: Any, options: StepOptions, mesh: Mesh, perturb: bool | None = None
):
    """``train_step`` over all devices of ``mesh``, jitted, with the state donated.

    Returns ``step(state, images, labels, key) -> (state, metrics)``; images and labels are
    global arrays sharded over ``AXIS``, the state replicated. ``perturb``: see
    :func:`train_step`.
    """
    step = functools.partial(train_step, apply_fn=apply_fn, tx=tx, options=options, perturb=perturb)
    return parallel.sharded_jit(
        step, mesh, (P(), P(AXIS), P(AXIS), P()), (P(), P()), donate_argnums=0
    )


def make_train_steps(
    apply_fn: Any,
    tx: Any,
    options: StepOptions,
    mesh: Mesh,
    perturbs: Callable[[int], bool] | None = None,
) -> Callable[[int], Callable]:
    """The train step of update ``count`` (0 for the first): one program, or with
    ``perturbs`` (cheaper SAM, :func:`samrobust.optim.sam_perturbs`) two, one with SAM's
    second pass and one without, picked on the host by ``perturbs(count)``. Each compiles
    on its first use. (A ``lax.cond`` in one program costs more than the pass it saves on
    XLA:CPU: docs/performance.md.)"""
    if perturbs is None:
        step = make_train_step(apply_fn, tx, options, mesh)
        return lambda count: step
    steps = {p: make_train_step(apply_fn, tx, options, mesh, p) for p in (False, True)}
    return lambda count: steps[perturbs(count)]


# XLA:CPU compiles the initial state at this level: LLVM's full optimisation of the
# initialisers' unrolled PRNG code is most of a small run's start, and level 1 gives the
# same bits in a fraction of the time (`python -m experiments.bench --sections=init`).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def create_train_state(
    key: jax.Array,
    model: Any,
    tx: Any,
    image_shape: tuple[int, ...],
    mesh: Mesh,
    ema: bool = False,
) -> TrainState:
    """Initial state, replicated over ``mesh``; with ``ema``, an :class:`EMATrainState`
    whose average starts at the initial weights."""

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        state = TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )
        if ema:
            state = reset_ema(EMATrainState(**vars(state), ema=None))
        return state

    init_fn = jax.jit(init, out_shardings=NamedSharding(mesh, P()))
    if jax.default_backend() != "cpu":
        return init_fn(key)
    return init_fn.lower(key).compile(compiler_options=INIT_COMPILER_OPTIONS)(key)
