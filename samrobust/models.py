"""Models: PreActResNet-18 (the paper's network) and WideResNet-28-10 / 34-10.

Inputs are images in ``[0, 1]`` (NHWC). Per-channel normalisation with the dataset's mean
and std is the model's first op, so attacks perturb the raw pixels as in the paper.
BatchNorm uses batch statistics and updates its running averages when ``train=True``
(apply with ``mutable=['batch_stats']``) and the running averages when ``train=False``.
PyTorch's BatchNorm momentum 0.1 and epsilon 1e-5 are kept.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the first op of every model."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, x):
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x - mean) / std


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv, BN-ReLU-conv, add."""

    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(self.norm()(x))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(
                self.features, (1, 1), (self.stride, self.stride), name="shortcut"
            )(out)
        else:
            shortcut = x
        out = self.conv(self.features, (3, 3), (self.stride, self.stride))(out)
        out = nn.relu(self.norm()(out))
        if self.dropout:
            out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = self.conv(self.features, (3, 3))(out)
        return out + shortcut


class _PreActNet(nn.Module):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU, global pool, linear."""

    stage_widths: Sequence[int]
    blocks_per_stage: int
    stem_width: int
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(
            nn.Conv, use_bias=False, padding="SAME", kernel_init=_conv_init, dtype=self.dtype
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=None,
        )
        x = Normalize(self.mean, self.std)(x.astype(self.dtype))
        x = conv(self.stem_width, (3, 3), name="stem")(x)
        for i, width in enumerate(self.stage_widths):
            for j in range(self.blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                x = PreActBlock(width, stride, conv, norm, self.dropout)(x, train)
        x = nn.relu(norm()(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)


def preact_resnet18(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    width: int = 64,
    dtype: Any = jnp.float32,
) -> nn.Module:
    """PreActResNet-18 of the paper's code; ``width`` is the first stage's channel count."""
    return _PreActNet(
        stage_widths=[width, 2 * width, 4 * width, 8 * width],
        blocks_per_stage=2,
        stem_width=width,
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        dtype=dtype,
    )


def wide_resnet(
    depth: int,
    widen_factor: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
) -> nn.Module:
    """WideResNet-depth-k (Zagoruyko & Komodakis, 2016) with pre-activation blocks."""
    if (depth - 4) % 6:
        raise ValueError(f"wide_resnet: depth must be 6n+4 (28, 34, ...), got {depth}")
    return _PreActNet(
        stage_widths=[16 * widen_factor, 32 * widen_factor, 64 * widen_factor],
        blocks_per_stage=(depth - 4) // 6,
        stem_width=16,
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        dropout=dropout,
        dtype=dtype,
    )


# The registry: name -> constructor(num_classes, mean, std, *, width, dtype).
def _wrn(depth: int) -> Callable[..., nn.Module]:
    def make(num_classes, mean, std, *, width, dtype):
        del width  # WideResNet-depth-10 has fixed widths
        return wide_resnet(depth, 10, num_classes, mean, std, dtype=dtype)

    return make


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "wrn28_10": _wrn(28),
    "wrn34_10": _wrn(34),
}
MODELS = tuple(_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    width: int = 64,
    dtype: Any = jnp.float32,
) -> nn.Module:
    """Builds a model by name (one of ``MODELS``). ``width`` only affects PreActResNet."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; set config.model to one of {MODELS}")
    return _REGISTRY[name](num_classes, mean, std, width=width, dtype=dtype)


def from_config(config: Mapping[str, Any], dataset: Any) -> nn.Module:
    """The model of a run: ``config``'s ``model``, ``width`` and ``half_precision`` (a
    ConfigDict or its ``config.json``) for ``dataset``'s classes and normalisation."""
    return create_model(
        config["model"],
        dataset.num_classes,
        dataset.mean,
        dataset.std,
        width=config["width"],
        dtype=jnp.bfloat16 if config["half_precision"] else jnp.float32,
    )
