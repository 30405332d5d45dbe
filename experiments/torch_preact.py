"""PyTorch copy of samrobust's PreActResNet (``samrobust.models``) for the reference AutoAttack.

  from experiments.torch_preact import from_flax
  net = from_flax(run.variables, mean=run.dataset.mean, std=run.dataset.std)
  logits = net(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))  # NCHW in [0, 1]

:func:`from_flax` builds a :class:`TorchPreActNet` in eval mode and copies a Flax
``_PreActNet``'s ``params`` and ``batch_stats`` into it; the architecture (widths, blocks,
strides, classes, input channels) is read from the variables' shapes, so the PreActResNet-18
of any ``width`` and the WideResNets of ``samrobust.models`` all map. The torch module takes
NCHW images in ``[0, 1]`` (what torch AutoAttack feeds) and returns the same logits as the
Flax model's ``apply(variables, x_nhwc, train=False)``, to float32 rounding (tests check
1e-4 max abs). Semantics reproduced from the Flax code, not from torch's defaults:

- ``Normalize`` ``(x - mean) / std`` per channel is the first op (``mean``/``std`` are not
  Flax variables; pass the dataset's).
- Convolutions use XLA's ``'SAME'`` padding: total ``max((ceil(n / s) - 1) * s + k - n, 0)``,
  the smaller half before, the larger after. A stride-2 3x3 conv on an even size pads
  (0, 1), not torch's ``padding=1`` (1, 1), which would shift every later feature map by
  one pixel; on an odd size it pads (1, 1). :class:`SameConv2d` pads explicitly per input
  size, so any H x W the Flax model takes works (CIFAR 32x32, digits 8x8, odd sizes).
- Pre-activation block: ``out = relu(bn1(x))``; the shortcut is a 1x1 conv (stride s, no
  bias) of ``out`` when the stride or the width changes, else ``x`` itself; then
  ``conv2(relu(bn2(conv1(out)))) + shortcut``. No conv has a bias.
- BatchNorm in eval mode with the running statistics, ``eps=1e-5``
  (``y = (x - mean) / sqrt(var + eps) * scale + bias``, the same in both; Flax's momentum
  0.9 is torch's 0.1, used only in train mode, where torch would also store the *unbiased*
  batch variance and Flax the biased one: train this copy, and the two drift apart).
- Head: ``relu(bn(x))``, mean over H and W, dense (Flax kernel ``[in, out]`` is torch's
  ``weight.T``). Conv kernels are HWIO in Flax, OIHW in torch.

Models trained with ``half_precision`` compute in bfloat16 in Flax; this copy is float32,
so their logits differ by far more than 1e-4.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch convention; Flax's momentum=0.9


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA/TensorFlow ``'SAME'`` padding of one spatial axis: ``(before, after)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Module):
    """Bias-free conv with Flax/XLA ``padding='SAME'``, computed from each input's H and W;
    ``padding="torch"``: PyTorch's ``kernel // 2`` on every side (``samrobust.models``'
    ``padding="torch"`` for the stride-2 convs)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, padding="same"
    ):
        super().__init__()
        if padding not in ("same", "torch"):  # samrobust.models.PADDINGS
            raise ValueError(f"padding must be 'same' or 'torch', got {padding!r}")
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "torch":
            top = bottom = left = right = self.kernel // 2
        else:
            top, bottom = same_padding(x.shape[-2], self.kernel, self.stride)
            left, right = same_padding(x.shape[-1], self.kernel, self.stride)
        if top or bottom or left or right:
            x = nn.functional.pad(x, (left, right, top, bottom))
        return nn.functional.conv2d(x, self.weight, stride=self.stride)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class PreActBlock(nn.Module):
    """``samrobust.models.PreActBlock``: BN-ReLU-conv, BN-ReLU-conv, plus the shortcut."""

    def __init__(
        self, in_channels: int, features: int, stride: int, shortcut: bool, padding="same"
    ):
        super().__init__()
        self.bn1 = _bn(in_channels)
        self.conv1 = SameConv2d(in_channels, features, 3, stride, padding if stride > 1 else "same")
        self.bn2 = _bn(features)
        self.conv2 = SameConv2d(features, features, 3)
        self.shortcut = SameConv2d(in_channels, features, 1, stride) if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(nn.functional.relu(self.bn2(out)))
        return out + shortcut


class TorchPreActNet(nn.Module):
    """``samrobust.models._PreActNet`` in torch: NCHW inputs in ``[0, 1]`` -> logits.

    ``blocks``: ``(features, stride, has_shortcut)`` per block, in order.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        stem_width: int,
        blocks: Sequence[tuple[int, int, bool]],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: str = "same",
    ):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean/std have {len(mean)}/{len(std)} entries for {in_channels} input channels"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.stem = SameConv2d(in_channels, stem_width, 3)
        layers, width = [], stem_width
        for features, stride, shortcut in blocks:
            layers.append(PreActBlock(width, features, stride, shortcut, padding))
            width = features
        self.blocks = nn.ModuleList(layers)
        self.bn = _bn(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = nn.functional.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))


def _array(value: Any) -> torch.Tensor:
    """A float32 torch copy of a jax/numpy array (works on replicated jax arrays)."""
    return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))


def _conv(kernel: Any) -> torch.Tensor:
    """Flax HWIO kernel -> torch OIHW weight."""
    return _array(kernel).permute(3, 2, 0, 1).contiguous()


def _block_names(params: Mapping[str, Any]) -> list[str]:
    names = [k for k in params if k.startswith("PreActBlock_")]
    return sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))


def from_flax(
    variables: Mapping[str, Any],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    padding: str = "same",
) -> TorchPreActNet:
    """A :class:`TorchPreActNet` (eval mode, no parameter gradients) holding ``variables``.

    ``variables``: ``{"params", "batch_stats"}`` of ``samrobust.models.preact_resnet18`` /
    ``create_model(...)`` (any width; WideResNets too). ``mean``/``std``: the
    normalisation the Flax model was built with (``run.dataset.mean``/``std``), ``padding``
    its stride-2 convs' (``run.config["padding"]``; runs without one: ``"same"``). Every
    Flax variable is copied exactly once, and every torch parameter and buffer is set.
    """
    params, stats = variables["params"], variables["batch_stats"]
    names = _block_names(params)
    stem = params["stem"]["kernel"]
    blocks = []
    for i, name in enumerate(names):
        has_shortcut = "shortcut" in params[name]
        # _PreActNet: stride 2 on the first block of every stage but the first; each such
        # block changes the width, so it has the shortcut conv (and block 0 never strides).
        stride = 2 if i > 0 and has_shortcut else 1
        blocks.append((int(params[name]["Conv_0"]["kernel"].shape[-1]), stride, has_shortcut))
    dense = params["Dense_0"]
    net = TorchPreActNet(
        in_channels=int(stem.shape[2]),
        stem_width=int(stem.shape[3]),
        blocks=blocks,
        num_classes=int(dense["kernel"].shape[1]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        padding=padding,
    )

    state: dict[str, torch.Tensor] = {"mean": net.mean, "std": net.std}
    used: list[tuple[str, ...]] = []

    def bn(prefix: str, p: Mapping[str, Any], s: Mapping[str, Any], path: tuple[str, ...]):
        state[f"{prefix}.weight"] = _array(p["scale"])
        state[f"{prefix}.bias"] = _array(p["bias"])
        state[f"{prefix}.running_mean"] = _array(s["mean"])
        state[f"{prefix}.running_var"] = _array(s["var"])
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
        used.extend([(*path, "scale"), (*path, "bias"), (*path, "mean"), (*path, "var")])

    state["stem.weight"] = _conv(stem)
    used.append(("stem", "kernel"))
    for i, name in enumerate(names):
        p, s = params[name], stats[name]
        bn(f"blocks.{i}.bn1", p["BatchNorm_0"], s["BatchNorm_0"], (name, "BatchNorm_0"))
        bn(f"blocks.{i}.bn2", p["BatchNorm_1"], s["BatchNorm_1"], (name, "BatchNorm_1"))
        state[f"blocks.{i}.conv1.weight"] = _conv(p["Conv_0"]["kernel"])
        state[f"blocks.{i}.conv2.weight"] = _conv(p["Conv_1"]["kernel"])
        used.extend([(name, "Conv_0", "kernel"), (name, "Conv_1", "kernel")])
        if "shortcut" in p:
            state[f"blocks.{i}.shortcut.weight"] = _conv(p["shortcut"]["kernel"])
            used.append((name, "shortcut", "kernel"))
    bn("bn", params["BatchNorm_0"], stats["BatchNorm_0"], ("BatchNorm_0",))
    state["fc.weight"] = _array(dense["kernel"]).T.contiguous()
    state["fc.bias"] = _array(dense["bias"])
    used.extend([("Dense_0", "kernel"), ("Dense_0", "bias")])

    n_flax = sum(len(_leaves(tree)) for tree in (params, stats))
    if len(used) != n_flax or len(set(used)) != len(used):
        raise ValueError(
            f"from_flax copied {len(set(used))} of {n_flax} Flax variables: not a "
            "samrobust PreActNet (preact_resnet18 / wide_resnet)?"
        )
    net.load_state_dict(state, strict=True)
    net.eval()
    net.requires_grad_(False)
    return net


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [tree]


def nhwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    """NHWC numpy images (samrobust's layout) -> a contiguous float32 NCHW torch tensor."""
    return torch.from_numpy(
        np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2))
    )


@torch.no_grad()
def torch_logits(net: nn.Module, images_nhwc: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of ``net`` on NHWC numpy images, batched, as a float32 numpy array."""
    out = [
        net(nhwc_to_nchw(images_nhwc[i : i + batch_size])).numpy()
        for i in range(0, len(images_nhwc), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
