"""Tests of the benchmark's profile breakdown
(``python -m experiments.bench --sections=profile``)."""

import jax
import jax.numpy as jnp
from jax import lax

from experiments import bench


def _conv(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_op_kinds_tells_weight_gradient_from_forward_convolutions():
    x = jnp.ones((4, 8, 8, 5))
    w = jnp.ones((3, 3, 5, 6))
    forward = jax.jit(_conv).lower(x, w).compile().as_text()
    assert set(bench.op_kinds(forward).values()) >= {"conv"}
    assert "conv weight-grad" not in bench.op_kinds(forward).values()

    weight_grad = jax.jit(jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2)))
    kinds = bench.op_kinds(weight_grad.lower(w).compile().as_text()).values()
    assert "conv weight-grad" in kinds and "conv" in kinds  # the forward conv stays "conv"


def test_op_kinds_names_every_instruction_of_the_entry_computation():
    f = jax.jit(lambda a: jnp.sum(jnp.transpose(a, (1, 0)) * 2.0, axis=0))
    text = f.lower(jnp.ones((64, 32))).compile().as_text()
    kinds = bench.op_kinds(text)
    entry = text[text.index("ENTRY") :]
    root = next(line for line in entry.splitlines() if "ROOT" in line)
    name = root.split("=")[0].replace("ROOT", "").strip().lstrip("%")
    assert name in kinds and kinds[name] in {"reduce", "transpose/copy", "elementwise"}
