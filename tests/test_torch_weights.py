"""samrobust.torch_weights against RobustBench's own architecture classes: randomly
initialised RobustBench models (no download) give the same logits in Flax, and our
weights load back into their classes.

The classes come from the installed ``robustbench`` (the ``reference`` extra), loaded from
its files: ``import robustbench`` also imports torchvision, whose registry wheel is built
for CUDA torch and does not load beside the CPU torch these machines install."""

import ast
import hashlib
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from samrobust import models, runs, torch_weights
from tests.helpers import (
    CIFAR10_JPEG,
    REPO,
    extract_slice,
    load_folder,
    run_main,
    run_module,
    write_folder,
)

torch = pytest.importorskip("torch")
if importlib.util.find_spec("robustbench") is None:  # finds, does not import
    pytest.skip("robustbench is not installed (the reference extra)", allow_module_level=True)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def robustbench_architectures(name: str):
    """``robustbench/model_zoo/architectures/<name>.py`` as a module (it imports only torch)."""
    root = importlib.util.find_spec("robustbench").submodule_search_locations[0]
    path = os.path.join(root, "model_zoo", "architectures", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"robustbench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomised(net, seed: int, mean=None, std=None):
    """``net`` in eval mode with random BatchNorm statistics and affine parameters (fresh
    ones are the identity), and ``mu``/``sigma`` buffers when ``mean``/``std`` are given."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    if mean is not None:
        net.register_buffer("mu", torch.tensor(mean).view(1, 3, 1, 1))
        net.register_buffer("sigma", torch.tensor(std).view(1, 3, 1, 1))
    return net.eval()


def torch_logits(net, images_nhwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    if hasattr(net, "mu"):
        x = (x - net.mu) / net.sigma  # what Rice2020OverfittingNet(L2).forward does
    with torch.no_grad():
        return net(x).numpy()


def state_dict(net) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in net.state_dict().items()}


def images(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(size=(n, 32, 32, 3)).astype(np.float32)


def assert_same_logits(net) -> tuple:
    model, variables = torch_weights.from_state_dict(state_dict(net))
    x = images()
    ours = np.asarray(jax.jit(model.apply, static_argnames="train")(variables, x, train=False))
    theirs = torch_logits(net, x)
    assert np.abs(theirs).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    return model, variables


def test_robustbench_preact_resnet18_gives_our_logits_and_loads_ours_back():
    rb = robustbench_architectures("resnet")
    net = randomised(
        rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True), 0, CIFAR_MEAN, CIFAR_STD
    )
    model, variables = assert_same_logits(net)
    assert model.stage_widths == [64, 128, 256, 512] and model.padding == "torch"
    assert model.mean == pytest.approx(CIFAR_MEAN) and model.std == pytest.approx(CIFAR_STD)

    back = torch_weights.to_state_dict(variables, model.mean, model.std)
    fresh = rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
    fresh.register_buffer("mu", torch.zeros(1, 3, 1, 1))
    fresh.register_buffer("sigma", torch.ones(1, 3, 1, 1))
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()})
    original = state_dict(net)
    assert set(back) == set(original)
    for key, value in original.items():
        np.testing.assert_allclose(back[key], value, rtol=0, atol=0, err_msg=key)


def test_robustbench_wide_resnet_without_normalisation_gives_our_logits():
    rb = robustbench_architectures("wide_resnet")
    net = randomised(rb.WideResNet(depth=16, widen_factor=2, sub_block1=True), 1)
    model, variables = assert_same_logits(net)  # sub_block1 (unused by forward) is ignored
    assert model.stage_widths == [32, 64, 128] and model.blocks_per_stage == 2
    assert model.mean == (0.0,) * 3 and model.std == (1.0,) * 3

    # The reason for padding="torch": the same weights under XLA's SAME padding differ.
    same = models.wide_resnet(16, 2, 10, model.mean, model.std, padding="same")
    x = images()
    diff = np.abs(np.asarray(same.apply(variables, x, train=False)) - torch_logits(net, x))
    assert diff.max() > 1e-2

    back = torch_weights.to_state_dict(variables, model.mean, model.std)
    fresh = rb.WideResNet(depth=16, widen_factor=2)
    fresh.register_buffer("mu", torch.zeros(1, 3, 1, 1))
    fresh.register_buffer("sigma", torch.ones(1, 3, 1, 1))
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()})
    original = {k: v for k, v in state_dict(net).items() if not k.startswith("sub_block1")}
    assert set(back) == set(original) | {"mu", "sigma"}
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_other_architectures_are_named_not_mapped():
    rb = robustbench_architectures("resnet")
    plain = state_dict(rb.PreActResNet(rb.PreActBlock, [2, 2, 2, 2]))  # no bn_before_fc
    with pytest.raises(torch_weights.WeightsError, match="bn_before_fc"):
        torch_weights.from_state_dict(plain)
    with pytest.raises(torch_weights.WeightsError, match="post-activation"):
        torch_weights.from_state_dict(state_dict(rb.ResNet18()))
    with pytest.raises(torch_weights.WeightsError, match="neither"):
        torch_weights.from_state_dict({"conv.weight": np.zeros((1, 3, 3, 3))})


def test_damaged_or_other_layouts_of_a_known_architecture_are_weights_errors():
    rb = robustbench_architectures("resnet")
    good = state_dict(rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True))
    missing = {k: v for k, v in good.items() if k != "layer2.1.bn1.running_var"}
    with pytest.raises(torch_weights.WeightsError, match="missing entry"):
        torch_weights.from_state_dict(missing)
    with pytest.raises(torch_weights.WeightsError, match="does not have"):
        torch_weights.from_state_dict(good | {"layer1.0.conv3.weight": np.zeros((64, 64, 1, 1))})
    other = rb.PreActResNet(rb.PreActBlockV2, [3, 3, 1, 1], bn_before_fc=True)
    with pytest.raises(torch_weights.WeightsError, match="expected"):
        torch_weights.from_state_dict(state_dict(other))


def test_evaluate_takes_a_robustbench_checkpoint(tmp_path, monkeypatch):
    """``samrobust.evaluate --torch_checkpoint``: a DataParallel-style RobustBench checkpoint
    of a WideResNet on a 32x32 image folder; the clean predictions are torch's on the same
    points, and the report names the file."""
    rb = robustbench_architectures("wide_resnet")
    net = randomised(
        rb.WideResNet(depth=10, widen_factor=1, num_classes=3), 2, CIFAR_MEAN, CIFAR_STD
    )
    checkpoint = tmp_path / "model.pt"
    weights = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": weights, "epoch": 7}, checkpoint)
    root = tmp_path / "images"
    write_folder(root, per_class=(1, 4), size=32)  # 3 classes, 12 test images
    monkeypatch.setenv("SAMROBUST_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "eval")
    proc = run_module(
        "samrobust.evaluate",
        f"--torch_checkpoint={checkpoint}",
        "--dataset=image_folder",
        f"--data_dir={root}",
        f"--workdir={out}",
        "--suite=clean",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "eval_clean.json")) as f:
        report = json.load(f)
    assert report["run"]["torch_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert report["run"]["padding"] == "torch"
    with open(os.path.join(out, "torch_checkpoint.json")) as f:  # the workdir's owner
        assert json.load(f)["torch_sha256"] == report["run"]["torch_sha256"]
    assert report["run"]["mean"] == pytest.approx(CIFAR_MEAN)
    ds = load_folder(root, tmp_path)
    theirs = torch_logits(net, ds.test_images).argmax(-1) == ds.test_labels
    with np.load(os.path.join(out, "eval_clean_masks.npz")) as masks:
        np.testing.assert_array_equal(masks["clean"], theirs)
    assert report["accuracy"]["clean"] == pytest.approx(theirs.mean())


def test_a_torch_workdir_belongs_to_one_checkpoint(tmp_path):
    """The first evaluation records its checkpoint; another's (or a training run's workdir)
    is refused, so reports of two models never overwrite each other."""
    workdir = tmp_path / "eval"
    workdir.mkdir()

    def run(sha256: str) -> runs.Run:
        config = {"torch_checkpoint": f"/models/{sha256}.pt", "torch_sha256": sha256 * 8}
        return runs.Run(str(workdir), config, 0, None, None, None)

    runs.claim_torch_workdir(str(workdir), run("a"))
    runs.claim_torch_workdir(str(workdir), run("a"))  # the same again: fine
    with pytest.raises(runs.EvaluationError, match="holds the reports of /models/a.pt"):
        runs.claim_torch_workdir(str(workdir), run("b"))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "config.json").write_text("{}")
    with pytest.raises(runs.EvaluationError, match="a training run's"):
        runs.claim_torch_workdir(str(tmp_path / "train"), run("a"))


def test_a_checkpoint_for_other_data_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMROBUST_CACHE", str(tmp_path / "cache"))
    rb = robustbench_architectures("wide_resnet")
    checkpoint = tmp_path / "model.pt"
    torch.save(rb.WideResNet(depth=10, widen_factor=1, num_classes=10).state_dict(), checkpoint)
    root = tmp_path / "images"
    write_folder(root, per_class=(1, 1), size=32)  # 3 classes
    with pytest.raises(runs.EvaluationError, match="10 outputs; image_folder has"):
        runs.load_torch_checkpoint(
            str(checkpoint), str(tmp_path / "out"), "image_folder", data_dir=str(root)
        )
    assert not (tmp_path / "out").exists()


def robustbench_model_info_fields() -> list[str]:
    """The fields of RobustBench's ``ModelInfo`` (``robustbench/utils.py``, what its
    ``benchmark(..., to_disk=True)`` writes), read from the source: importing it imports
    torchvision."""
    root = importlib.util.find_spec("robustbench").submodule_search_locations[0]
    with open(os.path.join(root, "utils.py")) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ModelInfo")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def test_model_info_is_robustbench_record_of_an_autoattack_report():
    """The record of a real report (AT Linf 8/255 of the CIFAR-10 grid, AutoAttack on the
    1,000-point subset): RobustBench's fields in its order, its formats, our figures."""
    path = "experiments/results/cifar10_cpu/runs/at_linf_eps8_s0/"
    with open(os.path.join(REPO, path, "eval_autoattack_linf_8_255_sub1000.json")) as f:
        report = json.load(f)
    info = torch_weights.model_info(report, "at_linf_8", "cifar10")
    assert list(info) == robustbench_model_info_fields()
    assert info["clean_acc"] == "45.6" and info["autoattack_acc"] == "23.1"
    assert info["eps"] == pytest.approx(8 / 255) and info["architecture"] == "PreActResNet-18"
    assert info["name"] == "at_linf_8" and info["dataset"] == "cifar10"
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert "standard, linf 8/255) on 1000 test points; step 1248" in info["footnote"]


@pytest.mark.slow
def test_export_writes_weights_robustbench_loads(tmp_path, monkeypatch):
    """``samrobust.export`` of a width-64 PreActResNet-18 run (``padding=torch``, one step on
    2 train images per class of the CIFAR-10 JPEG copy): RobustBench's class loads the file
    and gives the run's logits; model_info waits for the run's AutoAttack report."""
    root = tmp_path / "cifar10"
    extract_slice(CIFAR10_JPEG, root, {"train": 2, "test": 2})
    monkeypatch.setenv("SAMROBUST_CACHE", str(tmp_path / "cache"))
    workdir, out = str(tmp_path / "run"), tmp_path / "out"
    run_main(
        "configs/sgd.py",
        workdir,
        "--config.dataset=image_folder",
        f"--config.data_dir={root}",
        "--config.width=64",
        "--config.padding=torch",
        "--config.num_epochs=1",
        "--config.batch_size=20",
        "--config.eval_batch_size=20",
        "--config.eval_pgd_steps=0",
    )
    proc = run_module(
        "samrobust.export", f"--workdir={workdir}", f"--out={out}", "--dataset=cifar10"
    )
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-3000:]
    assert "samrobust.evaluate --workdir=" in proc.stderr and "--weights_only" in proc.stderr

    proc = run_module(
        "samrobust.export",
        f"--workdir={workdir}",
        f"--out={out}",
        "--weights_only",
        "--name=m",
        "--dataset=cifar10",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "model_info").exists()
    rb = robustbench_architectures("resnet")
    net = rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
    net.register_buffer("mu", torch.zeros(1, 3, 1, 1))
    net.register_buffer("sigma", torch.ones(1, 3, 1, 1))
    net.load_state_dict(torch.load(out / "m.pt"))  # strict: every entry, no other
    run = runs.load_run(workdir)
    x = run.dataset.test_images
    ours = np.asarray(jax.jit(run.logits_fn)(run.variables, x))
    theirs = torch_logits(net.eval(), x)
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_export_refuses_a_run_robustbench_cannot_hold(tmp_path):
    """A grid run (width 8, XLA padding): the width is named with the fix, nothing written."""
    run = os.path.join(REPO, "experiments/results/cifar10_cpu/runs/sgd_s0")
    out = tmp_path / "out"
    proc = run_module("samrobust.export", f"--workdir={run}", f"--out={out}")
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-3000:]
    assert "width 8: RobustBench's PreActResNet-18 has width 64 (--config.width=64)" in proc.stderr
