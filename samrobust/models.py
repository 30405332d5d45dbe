"""Models: PreActResNet-18 (the paper's network), WideResNet-28-10 / 34-10, and
``fast_cifar``, a network of airbench94's design for fast CIFAR-10 training.

Inputs are images in ``[0, 1]`` (NHWC). Per-channel normalisation with the dataset's mean
and std is the model's first op, so attacks perturb the raw pixels as in the paper.
BatchNorm uses batch statistics and updates its running averages when ``train=True``
(apply with ``mutable=['batch_stats']``) and the running averages when ``train=False``.
PyTorch's BatchNorm momentum 0.1 and epsilon 1e-5 are kept.

``padding`` (PreActResNet and WideResNet) says how a stride-2 3x3 conv pads an even input:
``"same"`` is XLA's ``SAME`` (0 before, 1 after), ``"torch"`` is PyTorch's ``padding=1`` (1
on both sides), the layout of RobustBench's classes (:mod:`samrobust.torch_weights`). The
two sample different pixels, so weights trained with one give other logits under the other;
every other conv pads the same either way.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ModuleDef = Any

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
PADDINGS = ("same", "torch")


def strided_padding(padding: str) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """A stride-2 3x3 conv's flax ``padding`` under ``padding`` (one of :data:`PADDINGS`)."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return "SAME" if padding == "same" else ((1, 1), (1, 1))


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
    padding: str = "same"

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(self.norm()(x))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(
                self.features, (1, 1), (self.stride, self.stride), name="shortcut"
            )(out)
        else:
            shortcut = x
        pad = strided_padding(self.padding) if self.stride != 1 else "SAME"
        out = self.conv(self.features, (3, 3), (self.stride, self.stride), padding=pad)(out)
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
    padding: str = "same"

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
                x = PreActBlock(width, stride, conv, norm, self.dropout, self.padding)(x, train)
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
    padding: str = "same",
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
        padding=padding,
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
    padding: str = "same",
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
        padding=padding,
    )


# PyTorch's default init of conv and linear weights (kaiming_uniform with a = sqrt(5)):
# uniform with variance 1 / (3 fan_in). With BatchNorm after every conv the weights' scale
# sets the effective learning rate, so airbench's learning rates assume this init.
_torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _dirac_init(base: Callable = _torch_default_init) -> Callable:
    """``base`` init with the first ``in_features`` filters set to the identity (a 1 at the
    kernel's centre on their own input channel): an implicit residual at initialisation."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, cin, cout = shape
        kernel = base(key, shape, dtype)
        n = min(cin, cout)
        eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n))
        return kernel.at[..., :n].set(eye)

    return init


class _ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features)(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.gelu(self.norm()(x), approximate=False)
        x = self.conv(self.features)(x)
        return nn.gelu(self.norm()(x), approximate=False)


WHITEN_PATCH = 2  # the whitening layer's kernel size


class _Whiten(nn.Module):
    """A ``WHITEN_PATCH`` x ``WHITEN_PATCH`` valid conv with ``2 * patch dimension`` filters
    whose kernel gets no gradient (``stop_gradient``: frozen where it was set); bias trained."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = WHITEN_PATCH * WHITEN_PATCH * x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (WHITEN_PATCH, WHITEN_PATCH, x.shape[-1], 2 * dim),
        )
        bias = self.param("bias", nn.initializers.zeros, (2 * dim,))
        y = jax.lax.conv_general_dilated(
            x,
            jax.lax.stop_gradient(kernel).astype(self.dtype),
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


def _keys(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_frozen(path: Sequence[Any]) -> bool:
    """Whether the parameter at ``path`` (a pytree key path) is frozen: the whitening
    kernel, which the model never differentiates; the optimizer does not decay it."""
    return _keys(path)[-2:] == ("whiten", "kernel")


def is_norm_bias(path: Sequence[Any]) -> bool:
    """Whether the parameter at ``path`` is a BatchNorm bias."""
    keys = _keys(path)
    return len(keys) >= 2 and keys[-1] == "bias" and keys[-2].startswith("BatchNorm")


def has_data_init(params: Any) -> bool:
    """Whether a model's ``params`` have data-dependent parts (:func:`init_from_data`)."""
    return "whiten" in params


def init_from_data(
    params: Any, images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> Any:
    """``params`` with the data-dependent parts set from train ``images``: the whitening
    kernel of :class:`FastCifarNet` (:func:`whitening_kernel`); other models unchanged."""
    if not has_data_init(params):
        return params
    kernel = whitening_kernel(images, mean, std)
    return {**params, "whiten": {**params["whiten"], "kernel": jnp.asarray(kernel)}}


def whitening_kernel(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], eps: float = 5e-4
) -> np.ndarray:
    """The whitening layer's kernel for ``images`` (NHWC in [0, 1]), as in airbench: the
    eigenvectors ``v_i`` of the covariance of all normalised ``WHITEN_PATCH``-square patches,
    scaled by ``1 / sqrt(lambda_i + eps)``, largest first, then their negatives (HWIO)."""
    x = (np.asarray(images, np.float64) - np.asarray(mean)) / np.asarray(std)
    n, h, w, c = x.shape
    p = WHITEN_PATCH
    patches = np.stack(
        [x[:, i : h - p + 1 + i, j : w - p + 1 + j] for i in range(p) for j in range(p)], axis=3
    ).reshape(-1, p * p * c)  # (patch row, patch col, channel) order = HWI
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = np.concatenate([filters, -filters], axis=1)
    return kernel.reshape(p, p, c, 2 * p * p * c).astype(np.float32)


class FastCifarNet(nn.Module):
    """airbench94's network (Jordan 2024, arXiv 2404.00498), written from its description.

    A 2x2 ``whiten`` conv (``2 * 3 * 2 * 2 = 24`` filters, kernel frozen: set from the data
    by :func:`whitening_kernel`, bias trained) and GELU, three conv groups of widths
    ``(w, 4w, 4w)``, a 3x3 max-pool, a bias-free linear layer scaled by 1/9. BatchNorm has
    no learned scale (bias only), running averages ``0.6 old + 0.4 batch`` and epsilon
    1e-12; weights start as PyTorch's defaults, convs as identity on their first channels
    (dirac init).
    """

    width: int
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(
            nn.Conv,
            kernel_size=(3, 3),
            use_bias=False,
            padding="SAME",
            dtype=self.dtype,
            kernel_init=_dirac_init(),
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            use_scale=False,
            momentum=0.6,  # running = 0.6 running + 0.4 batch (airbench's PyTorch 0.4)
            epsilon=1e-12,
            dtype=self.dtype,
        )
        x = Normalize(self.mean, self.std)(x.astype(self.dtype))
        x = nn.gelu(_Whiten(self.dtype, name="whiten")(x), approximate=False)
        for w in (self.width, 4 * self.width, 4 * self.width):
            x = _ConvGroup(w, conv, norm)(x)
        x = nn.max_pool(x, (3, 3), (3, 3))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=_torch_default_init
        )(x)
        x = x / 9
        return x.astype(jnp.float32)


# The registry: name -> constructor(num_classes, mean, std, *, width, dtype, padding).
def _wrn(depth: int) -> Callable[..., nn.Module]:
    def make(num_classes, mean, std, *, width, dtype, padding):
        del width  # WideResNet-depth-10 has fixed widths
        return wide_resnet(depth, 10, num_classes, mean, std, dtype=dtype, padding=padding)

    return make


def fast_cifar(num_classes, mean, std, *, width=64, dtype=jnp.float32, padding="same") -> nn.Module:
    """:class:`FastCifarNet`; ``width`` is the first group's (64 = airbench94's 64/256/256).
    Its convs all have stride 1 (max-pools downsample): ``padding`` changes nothing."""
    strided_padding(padding)  # still one of PADDINGS
    return FastCifarNet(width, num_classes, tuple(mean), tuple(std), dtype)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "fast_cifar": fast_cifar,
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
    padding: str = "same",
) -> nn.Module:
    """Builds a model by name (one of ``MODELS``). ``width`` affects PreActResNet and
    fast_cifar, ``padding`` (one of :data:`PADDINGS`) the stride-2 convs."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; set config.model to one of {MODELS}")
    return _REGISTRY[name](num_classes, mean, std, width=width, dtype=dtype, padding=padding)


def from_config(config: Mapping[str, Any], dataset: Any) -> nn.Module:
    """The model of a run: ``config``'s ``model``, ``width``, ``padding`` and
    ``half_precision`` (a ConfigDict or its ``config.json``: runs saved before ``padding``
    existed padded ``"same"``) for ``dataset``'s classes and normalisation."""
    return create_model(
        config["model"],
        dataset.num_classes,
        dataset.mean,
        dataset.std,
        width=config["width"],
        dtype=jnp.bfloat16 if config["half_precision"] else jnp.float32,
        padding=config.get("padding", "same"),
    )
