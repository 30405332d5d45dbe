"""The data-parallel promise: a train step over 8 devices is the 1-device step on the same
global batch (for a model without BatchNorm, whose statistics are per device by design),
and the replicated parameters stay identical on every device."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sam as sam_config
from configs import sgd as sgd_config
from samrobust import optim, parallel
from samrobust.step import StepOptions, create_train_state, make_train_step


class NoBatchNorm(nn.Module):
    """Conv -> ReLU -> Dense: no BatchNorm, so nothing is per device but the data."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        del train
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def mesh_of(n: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), (parallel.AXIS,))


def run_steps(config, n_devices: int, steps: int = 3):
    mesh = mesh_of(n_devices)
    model = NoBatchNorm()
    tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10))
    state = create_train_state(jax.random.key(0), model, tx, (4, 4, 1), mesh)
    step = make_train_step(model.apply, tx, StepOptions(), mesh)
    x = jax.random.uniform(jax.random.key(1), (16, 4, 4, 1))
    y = jnp.arange(16) % 3
    for i in range(steps):
        images, labels = parallel.shard_batch(mesh, np.asarray(x) + i / 10, np.asarray(y))
        state, _ = step(state, images, labels, jax.random.key(2))
    return state


@pytest.mark.parametrize(
    "name,config",
    [
        ("sgd", sgd_config.get_config("digits")),
        ("synchronised sam", sam_config.get_config("digits")),
    ],
)
def test_eight_devices_equal_one_device_on_the_same_global_batch(name, config):
    assert jax.device_count() == 8
    config.rho, config.sam_sync = 0.2, True  # SAM: one perturbation from the global gradient
    one, eight = run_steps(config, 1), run_steps(config, 8)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # Replicated: every device holds the same parameters, bit for bit.
    for leaf in jax.tree.leaves(eight.params):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 8
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0])


def test_cpu_devices_flag_validation():
    with pytest.raises(ValueError, match="cpu_devices must be >= 1"):
        parallel.set_cpu_devices(0)


def test_xla_cpu_defaults_turn_ynn_fusions_off_unless_the_user_decided(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    parallel.set_xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
    )
    mine = "--xla_cpu_experimental_ynn_fusion_type=+x"
    monkeypatch.setenv("XLA_FLAGS", mine)
    parallel.set_xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == mine
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(parallel, "YNN_MEASURED", frozenset())  # a jaxlib not measured
    parallel.set_xla_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ
