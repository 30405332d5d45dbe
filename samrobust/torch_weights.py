"""RobustBench's PyTorch weights <-> samrobust's Flax variables (numpy; torch only to write
a file), and the RobustBench record of an exported run.

Two RobustBench architectures are samrobust's own models, parameter for parameter:

- ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)`` of
  ``robustbench/model_zoo/architectures/resnet.py`` (e.g. ``Rice2020OverfittingNetL2``):
  :func:`samrobust.models.preact_resnet18` at width 64 (RobustBench fixes the width);
- ``WideResNet(depth, widen_factor=k)`` of ``.../wide_resnet.py`` (e.g.
  ``Rice2020OverfittingNet``, ``Carmon2019Unlabeled``): :func:`samrobust.models.wide_resnet`
  of the same depth and k.

Both pad their stride-2 convs like PyTorch, so the Flax model is built with
``padding="torch"``. A state_dict's ``mu``/``sigma`` buffers (the classes that normalise
their input) become the model's mean and std; without them the model takes raw ``[0, 1]``
pixels (mean 0, std 1).

  model, variables = from_state_dict({k: v.numpy() for k, v in torch.load(f).items()})
  logits = model.apply(variables, images_nhwc, train=False)
  state_dict = to_state_dict(variables, mean, std)  # back: RobustBench's names and layouts
  save(state_dict, epath.Path("model.pt"))  # torch.save of tensors (needs torch)

Layouts: Flax conv kernels are HWIO, torch's OIHW; a Flax dense kernel is ``[in, out]``,
torch's linear weight ``[out, in]``; Flax BatchNorm's ``scale``/``bias``/``mean``/``var``
are torch's ``weight``/``bias``/``running_mean``/``running_var`` (both with epsilon 1e-5).
"""

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from samrobust import models
from samrobust.attacks import format_eps

ARCHITECTURES = ("preact_resnet18", "wide_resnet")
# A PreActResNet block's torch names -> its Flax names.
_BLOCK = {"bn1": "BatchNorm_0", "conv1": "Conv_0", "bn2": "BatchNorm_1", "conv2": "Conv_1"}
_BN = {"weight": "scale", "bias": "bias"}
_BN_STATS = {"running_mean": "mean", "running_var": "var"}

# samrobust models (``config.model``) that RobustBench's classes hold: the class, and the
# architecture name RobustBench's model-info records use.
ROBUSTBENCH_CLASSES = {
    "preact_resnet18": (
        "PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True) with mu/sigma buffers",
        "PreActResNet-18",
    ),
    "wrn28_10": ("WideResNet(depth=28, widen_factor=10) with mu/sigma buffers", "WideResNet-28-10"),
    "wrn34_10": ("WideResNet(depth=34, widen_factor=10) with mu/sigma buffers", "WideResNet-34-10"),
}
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's names of our norms


class WeightsError(ValueError):
    """A state_dict that is not one of the architectures this module maps."""


def architecture(state_dict: Mapping[str, Any]) -> str:
    """Which of :data:`ARCHITECTURES` a RobustBench state_dict holds."""
    if "layer1.0.conv1.weight" in state_dict:
        if "bn1.weight" in state_dict:
            raise WeightsError(
                "a ResNet of post-activation blocks (a BatchNorm after its first conv): "
                "samrobust maps RobustBench's pre-activation PreActResNet-18 and WideResNet"
            )
        if "bn.weight" not in state_dict:
            raise WeightsError(
                "a PreActResNet without the BatchNorm before its linear layer (RobustBench's "
                "bn_before_fc=False): samrobust's PreActResNet-18 is RobustBench's "
                "PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)"
            )
        return "preact_resnet18"
    if "block1.layer.0.conv1.weight" in state_dict:
        return "wide_resnet"
    raise WeightsError(
        "neither RobustBench's PreActResNet (layer1.0.conv1.weight) nor its WideResNet "
        f"(block1.layer.0.conv1.weight); its first keys: {list(state_dict)[:4]}"
    )


def _blocks(state_dict: Mapping[str, Any], arch: str) -> list[str]:
    """The torch name prefixes of the residual blocks, in the order Flax numbers them."""
    if arch == "preact_resnet18":
        pattern = r"(layer(\d+)\.(\d+))\."
    else:
        pattern = r"(block(\d+)\.layer\.(\d+))\."
    found = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for k in state_dict
        if (m := re.match(pattern, k))
    }
    return sorted(found, key=found.get)


def _normalisation(state_dict: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if "mu" in state_dict and "sigma" in state_dict:
        mean, std = (np.asarray(state_dict[k], np.float64).reshape(-1) for k in ("mu", "sigma"))
        return tuple(map(float, mean)), tuple(map(float, std))
    channels = np.shape(state_dict["conv1.weight"])[1]
    return (0.0,) * channels, (1.0,) * channels


# Entries a state_dict may hold that the forward pass does not use.
_IGNORED = re.compile(r"(.*\.num_batches_tracked|sub_block1\..*)$")


def from_state_dict(
    state_dict: Mapping[str, Any], *, dtype: Any = np.float32
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)``: the Flax model (``padding="torch"``) of a RobustBench
    PreActResNet-18 or WideResNet ``state_dict`` (name -> array) and its weights as
    ``{"params", "batch_stats"}`` numpy trees. Unused entries (``num_batches_tracked``,
    WideResNet's ``sub_block1``) are ignored; a missing, extra or misshapen entry is a
    :class:`WeightsError`. (Keys and shapes cannot tell RobustBench's ``PreActBlock`` with
    ``out_shortcut=False``, whose shortcut reads the block's input, from ``PreActBlockV2``;
    no RobustBench model pairs it with ``bn_before_fc=True``.)"""
    arch = architecture(state_dict)
    try:
        model, variables = _from_state_dict(state_dict, arch, dtype)
    except KeyError as e:
        raise WeightsError(f"missing entry {e} for {arch}") from None
    mean, std = model.mean, model.std
    extra = set(state_dict) - set(to_state_dict(variables, mean, std))
    extra = sorted(k for k in extra if not _IGNORED.match(k))
    if extra:
        raise WeightsError(f"entries {arch} does not have: {extra[:4]}")
    channels = variables["params"]["stem"]["kernel"].shape[2]
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, channels), np.float32),
    )
    expected = jax.tree_util.tree_flatten_with_path(shapes)[0]
    found = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    for path, leaf in expected:
        if path not in found or np.shape(found[path]) != leaf.shape:
            got = np.shape(found[path]) if path in found else "nothing"
            raise WeightsError(
                f"{arch} {jax.tree_util.keystr(path)}: {got}, "
                f"expected {leaf.shape} (blocks per stage other than RobustBench's?)"
            )
    return model, variables


def _from_state_dict(
    state_dict: Mapping[str, Any], arch: str, dtype: Any
) -> tuple[nn.Module, dict]:
    sd = {k: np.asarray(v, dtype) for k, v in state_dict.items()}
    names = _blocks(sd, arch)
    if arch == "preact_resnet18":
        top_bn, linear, shortcut = "bn", "linear", "shortcut.0"
    else:
        top_bn, linear, shortcut = "bn1", "fc", "convShortcut"
    params: dict[str, Any] = {"stem": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0)}}
    stats: dict[str, Any] = {}

    def bn(prefix: str, p: dict, s: dict, name: str) -> None:
        p[name] = {new: sd[f"{prefix}.{old}"] for old, new in _BN.items()}
        s[name] = {new: sd[f"{prefix}.{old}"] for old, new in _BN_STATS.items()}

    for i, block in enumerate(names):
        p, s = params.setdefault(f"PreActBlock_{i}", {}), stats.setdefault(f"PreActBlock_{i}", {})
        for old, new in _BLOCK.items():
            if old.startswith("bn"):
                bn(f"{block}.{old}", p, s, new)
            else:
                p[new] = {"kernel": sd[f"{block}.{old}.weight"].transpose(2, 3, 1, 0)}
        if f"{block}.{shortcut}.weight" in sd:
            p["shortcut"] = {"kernel": sd[f"{block}.{shortcut}.weight"].transpose(2, 3, 1, 0)}
    bn(top_bn, params, stats, "BatchNorm_0")
    num_classes = sd[f"{linear}.weight"].shape[0]
    params["Dense_0"] = {
        "kernel": sd[f"{linear}.weight"].T,
        "bias": sd.get(f"{linear}.bias", np.zeros(num_classes, dtype)),
    }
    mean, std = _normalisation(sd)
    widths = [params[f"PreActBlock_{i}"]["Conv_0"]["kernel"].shape[-1] for i in range(len(names))]
    if arch == "preact_resnet18":
        if len(names) != 8:
            raise WeightsError(f"a PreActResNet of {len(names)} blocks: PreActResNet-18 has 8")
        model = models.preact_resnet18(num_classes, mean, std, width=widths[0], padding="torch")
    else:
        model = models.wide_resnet(
            6 * (len(names) // 3) + 4, widths[0] // 16, num_classes, mean, std, padding="torch"
        )
    return model, {"params": params, "batch_stats": stats}


def to_state_dict(
    variables: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]
) -> dict[str, np.ndarray]:
    """RobustBench's state_dict of a samrobust PreActResNet-18 or WideResNet (``variables``:
    ``{"params", "batch_stats"}``), with the input normalisation as ``mu``/``sigma``
    buffers (as ``Rice2020OverfittingNetL2`` and ``Rice2020OverfittingNet`` hold it): the
    inverse of :func:`from_state_dict`.
    ``variables`` of three stages are a WideResNet's, of four a PreActResNet-18's."""
    params = _numpy(variables["params"])
    stats = _numpy(variables["batch_stats"])
    n = sum(k.startswith("PreActBlock_") for k in params)
    widths = [params[f"PreActBlock_{i}"]["Conv_0"]["kernel"].shape[-1] for i in range(n)]
    # A stage starts where the width changes: the stage (0-based) of each block.
    stages = np.cumsum([0] + [widths[i] != widths[i - 1] for i in range(1, n)])
    wide = stages[-1] == 2  # WideResNets have three stages, PreActResNets four
    sd: dict[str, np.ndarray] = {"conv1.weight": params["stem"]["kernel"].transpose(3, 2, 0, 1)}

    def bn(prefix: str, p: Mapping, s: Mapping) -> None:
        for old, new in _BN.items():
            sd[f"{prefix}.{old}"] = p[new]
        for old, new in _BN_STATS.items():
            sd[f"{prefix}.{old}"] = s[new]
        sd[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)

    index = [int(np.sum(stages[:i] == stages[i])) for i in range(n)]  # within its stage
    for i in range(n):
        p, s = params[f"PreActBlock_{i}"], stats[f"PreActBlock_{i}"]
        stage = stages[i] + 1
        block = f"block{stage}.layer.{index[i]}" if wide else f"layer{stage}.{index[i]}"
        for old, new in _BLOCK.items():
            if old.startswith("bn"):
                bn(f"{block}.{old}", p[new], s[new])
            else:
                sd[f"{block}.{old}.weight"] = p[new]["kernel"].transpose(3, 2, 0, 1)
        if "shortcut" in p:
            name = "convShortcut" if wide else "shortcut.0"
            sd[f"{block}.{name}.weight"] = p["shortcut"]["kernel"].transpose(3, 2, 0, 1)
    bn("bn1" if wide else "bn", params["BatchNorm_0"], stats["BatchNorm_0"])
    linear = "fc" if wide else "linear"
    sd[f"{linear}.weight"] = params["Dense_0"]["kernel"].T
    sd[f"{linear}.bias"] = params["Dense_0"]["bias"]
    sd["mu"] = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    sd["sigma"] = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return sd


def _numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def save(state_dict: Mapping[str, Any], path: epath.Path) -> None:
    """``torch.save`` of ``state_dict`` as CPU tensors at ``path`` (local or e.g. gs://)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buffer)
    path.write_bytes(buffer.getvalue())


def export_problem(config: Mapping[str, Any]) -> str | None:
    """Why RobustBench's classes cannot hold a run of ``config`` (a training run's
    ``config.json``), with the fix; ``None`` when they can."""
    if config["model"] not in ROBUSTBENCH_CLASSES:
        return (
            f"model {config['model']} is none of RobustBench's classes: train one of "
            f"{', '.join(ROBUSTBENCH_CLASSES)} (--config.model=...)"
        )
    if config["model"] == "preact_resnet18" and config["width"] != 64:
        return (
            f"width {config['width']}: RobustBench's PreActResNet-18 has width 64 "
            "(--config.width=64)"
        )
    if config.get("padding", "same") != "torch":
        return (
            "its stride-2 convs pad like XLA (padding 'same'), RobustBench's like PyTorch: "
            "train with --config.padding=torch"
        )
    return None


def model_info(report: Mapping[str, Any], name: str, dataset: str) -> dict[str, Any]:
    """The record RobustBench's ``benchmark(..., to_disk=True)`` writes to
    ``model_info/<dataset>/<Linf|L2>/<name>.json`` (every field of its ``ModelInfo``, in its
    order; accuracies in percent as strings with 2 decimals, as it writes them), filled from
    a samrobust AutoAttack ``report`` of a run (:mod:`samrobust.evaluate`)."""
    attack = report["autoattack"]["name"]
    settings = report["attacks"][attack]
    points = "all" if report["subset"]["rule"] == "all" else report["num_examples"]
    return {
        "link": None,
        "name": name,
        "authors": None,
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": None,
        "architecture": ROBUSTBENCH_CLASSES[report["run"]["model"]][1],
        "eps": settings["eps"],
        "clean_acc": str(round(report["accuracy"]["clean"] * 100, 2)),
        "reported": None,
        "corruptions_acc": None,
        "corruptions_acc_3d": None,
        "corruptions_mce": None,
        "corruptions_mce_3d": None,
        "autoattack_acc": str(round(report["accuracy"][attack] * 100, 2)),
        "footnote": (
            f"samrobust's JAX AutoAttack ({settings['version']}, {settings['norm']} "
            f"{format_eps(settings['eps'])}) on {points} test points; step {report['run']['step']}"
        ),
    }
