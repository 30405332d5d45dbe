"""The optimiser of every mode: learning-rate schedules and the optax chain
SAM or AWP -> mean over devices -> weight decay -> momentum SGD."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from samrobust import models
from samrobust.config_check import uses_sam
from samrobust.parallel import AXIS
from samrobust.sam import awp, perturbs, sam


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


def _sam_rho(config: ml_collections.ConfigDict, total_steps: int) -> optax.ScalarOrSchedule:
    """SAM's radius: ``config.rho``, or 0 before ``config.sam_start_fraction`` of the steps."""
    if not config.sam_start_fraction:
        return config.rho
    start = int(config.sam_start_fraction * total_steps)
    return lambda count: jnp.where(count >= start, config.rho, 0.0)


def sam_perturbs(
    config: ml_collections.ConfigDict, total_steps: int
) -> Callable[[int], bool] | None:
    """Cheaper SAM on the host: whether update ``count`` of :func:`create_optimizer`'s SAM
    takes the second pass (``config.sam_start_fraction``, ``config.sam_probability``);
    ``None`` when every update is alike (plain SAM, or no SAM)."""
    if not uses_sam(config.mode) or (not config.sam_start_fraction and config.sam_probability == 1):
        return None
    rho = _sam_rho(config, total_steps)
    draw = jax.vmap(lambda n: perturbs(n, rho, config.sam_probability, config.seed))
    schedule = np.asarray(jax.jit(draw)(jnp.arange(total_steps)))  # once: no per-step sync
    return lambda count: bool(schedule[count])


def create_optimizer(
    config: ml_collections.ConfigDict,
    learning_rate: optax.ScalarOrSchedule,
    grouped: bool = False,
    total_steps: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """SAM (for SAM modes) or AWP (``config.awp_gamma``) -> mean over devices -> weight
    decay -> momentum SGD (Nesterov with ``config.nesterov``).

    ``config.norm_bias_lr_scale`` = s multiplies the learning rate of BatchNorm biases by s
    and divides their weight decay by s (their decay per step is unchanged; airbench's
    ``bias_scaler``). Frozen parameters (:func:`samrobust.models.is_frozen`) get no weight
    decay. The device mean needs the ``AXIS`` mapped axis: use the optimizer inside the step.
    With ``grouped=True`` (:func:`sam_groups`) SAM takes per-group gradients. Cheaper SAM:
    ``config.sam_start_fraction`` (of ``total_steps``) runs plain steps before it, and
    ``config.sam_probability`` makes each step SAM with that probability; the second pass is
    skipped on the other steps (``lax.cond``, or the train step's ``perturb`` from
    :func:`sam_perturbs`).
    """
    parts = []
    if uses_sam(config.mode):
        parts.append(
            sam(
                _sam_rho(config, total_steps),
                adaptive=config.adaptive,
                axis_name=AXIS if config.sam_sync else None,
                grouped=grouped,
                probability=config.sam_probability,
                seed=config.seed,
            )
        )
    if config.awp_gamma:  # AT-AWP: the perturbation from the whole batch, as the reference
        parts.append(awp(config.awp_gamma, axis_name=AXIS))
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
