"""experiments/torch_preact.py: the torch copy of samrobust's PreActResNet gives its logits.

A randomly initialised Flax model with non-trivial BatchNorm parameters and running
statistics (drawn at random) is copied into torch; the
eval-mode logits must agree to 1e-4 (max abs) on CIFAR-shaped inputs, on the digits shape
and on odd sizes where XLA's 'SAME' padding of the stride-2 convs is (1, 1), not (0, 1).
"""

import copy
import functools
import os

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch is not installed (pip install -e '.[reference]' for the AutoAttack reference)",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import torch_preact  # noqa: E402
from samrobust import autoattack as aa  # noqa: E402
from samrobust import models  # noqa: E402

TOL = 1e-4


def _flax_variables(model, shape, seed):
    """Random variables, without ``model.init`` (whose compilation takes ~20 s here).

    He-normal kernels; BN scale, bias and running mean/var drawn away from 1, 0, 0, 1, so
    eval mode's affine maps are all non-trivial and distinct per channel.
    """
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 2.0, leaf.shape)
        else:  # bias, mean
            value = 0.3 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _setup(shape, *, wrn=False):
    """(Flax model, its variables, the torch copy): one per input shape, shared by tests."""
    c = shape[-1]
    mean, std = tuple(np.linspace(0.3, 0.5, c)), tuple(np.linspace(0.2, 0.3, c))
    if wrn:  # WRN-10-2: stage 0 widens 16 -> 32 at stride 1, so block 0 has the shortcut
        model = models.wide_resnet(10, 2, 5, mean, std)
    else:
        model = models.create_model("preact_resnet18", 10, mean, std, width=4)
    variables = _flax_variables(model, shape, seed=sum(shape) + wrn)
    return model, variables, torch_preact.from_flax(variables, mean=mean, std=std)


def _max_diff(model, variables, net, x):
    """Max abs difference of the two models' eval-mode logits on NHWC ``x``."""
    flax_logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
    torch_logits = torch_preact.torch_logits(net, x)
    assert flax_logits.shape == torch_logits.shape
    assert 1e-2 < np.std(flax_logits) and np.max(np.abs(flax_logits)) < 1e3  # not vacuous
    return float(np.max(np.abs(flax_logits - torch_logits)))


def _images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, h, w, c)).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "sizes"),
    [
        ((32, 32, 3), [(32, 32)]),  # CIFAR: the stride-2 convs pad (0, 1) at 32, 16, 8, 4
        ((8, 8, 1), [(8, 8)]),  # digits
        ((9, 9, 3), [(9, 9), (7, 12)]),  # odd sizes pad (1, 1); H != W
    ],
)
def test_preact_resnet18_logits_match(shape, sizes):
    model, variables, net = _setup(shape)
    assert not net.training
    for h, w in sizes:
        assert _max_diff(model, variables, net, _images(6, h, w, shape[-1])) <= TOL, (h, w)


def test_torch_padding_one_would_not_match():
    """The stride-2 convs' asymmetric padding matters: torch's padding=1 breaks the match."""
    assert torch_preact.same_padding(32, 3, 2) == (0, 1)
    assert torch_preact.same_padding(9, 3, 2) == (1, 1)
    assert torch_preact.same_padding(32, 3, 1) == (1, 1)
    assert torch_preact.same_padding(32, 1, 2) == (0, 0)
    model, variables, _ = _setup((32, 32, 3))
    net = copy.deepcopy(_setup((32, 32, 3))[2])
    for block in net.blocks:  # what a naive port would do
        if block.conv1.stride == 2:
            block.conv1.forward = functools.partial(_conv_padding_one, block.conv1)
    assert _max_diff(model, variables, net, _images(4, 32, 32, 3)) > 1e-3


def test_a_model_with_torch_padding_maps_with_torch_padding():
    """``padding="torch"`` (the RobustBench layout) in Flax and in the torch copy."""
    mean, std = tuple(np.linspace(0.3, 0.5, 3)), tuple(np.linspace(0.2, 0.3, 3))  # _setup's
    model = models.create_model("preact_resnet18", 10, mean, std, width=4, padding="torch")
    variables = _flax_variables(model, (32, 32, 3), seed=67)
    x = _images(4, 32, 32, 3)
    net = torch_preact.from_flax(variables, mean=mean, std=std, padding="torch")
    assert _max_diff(model, variables, net, x) <= TOL
    same = torch_preact.from_flax(variables, mean=mean, std=std)
    assert _max_diff(model, variables, same, x) > 1e-3


def _conv_padding_one(conv, z):
    return torch.nn.functional.conv2d(z, conv.weight, stride=conv.stride, padding=1)


def test_wide_resnet_and_input_gradients():
    """A small WideResNet maps too; input gradients flow, parameters take none."""
    model, variables, net = _setup((8, 8, 1), wrn=True)
    assert [b.conv1.stride for b in net.blocks] == [1, 2, 2]
    assert [b.shortcut is not None for b in net.blocks] == [True, True, True]
    x = _images(5, 8, 8, 1)
    assert _max_diff(model, variables, net, x) <= TOL
    xt = torch_preact.nhwc_to_nchw(x).requires_grad_(True)
    net(xt).sum().backward()
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0
    assert all(p.grad is None for p in net.parameters())


def test_from_flax_rejects_other_trees():
    _, variables, _ = _setup((8, 8, 1))
    mean, std = (0.5,), (0.25,)
    extra = dict(variables["params"], Extra_0={"kernel": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="not a samrobust PreActNet"):
        torch_preact.from_flax({**variables, "params": extra}, mean=mean, std=std)
    with pytest.raises(ValueError, match="mean/std"):
        torch_preact.from_flax(variables, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_reference_cascade_on_the_copy():
    """experiments/aa_reference.py drives the reference's attacks as its cascade does."""
    pytest.importorskip("pyautoattack", reason="pyautoattack is not installed")
    from experiments import aa_reference

    budget = aa_reference.samrobust_aa.Budget(n_iter=3, n_target_classes=2, n_queries=4)
    protocol = aa_reference.Protocol(budget=budget)
    assert not protocol.full and "NON-STANDARD" in protocol.describe()
    assert aa_reference.Protocol().full
    _, _, net = _setup((8, 8, 1))
    adversary = aa_reference.make_reference(net, norm="linf", eps=0.3, seed=0, protocol=protocol)
    assert (adversary.apgd.n_iter, adversary.apgd.n_iter_2, adversary.fab.n_iter) == (3, 1, 3)
    assert adversary.apgd_targeted.n_target_classes == adversary.fab.n_target_classes == 2
    assert adversary.square.n_queries == 4
    x = _images(6, 8, 8, 1, seed=3)
    y = torch_preact.torch_logits(net, x).argmax(1)  # all correct at x
    y[0] = (y[0] + 1) % 10  # one misclassified point
    ref = aa_reference.run_reference(adversary, x, y, batch_size=4, attacks=protocol.attacks)
    assert list(ref["stages"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert ref["clean"].tolist() == [False] + [True] * 5
    masks = [ref["clean"], *ref["stages"].values()]
    for before, after in zip(masks, masks[1:], strict=False):
        assert not np.any(after & ~before)  # a cascade only removes points
    assert ref["max_perturbation"] <= 0.3 + 1e-6
    assert np.array_equal(ref["robust"], ref["stages"]["square"])


def test_an_interrupted_reference_cascade_resumes_from_its_journal(tmp_path):
    """Every finished (stage, batch) is recorded; a run that lost its last records redoes
    only those and ends where an uninterrupted run ends."""
    pytest.importorskip("pyautoattack", reason="pyautoattack is not installed")
    from experiments import aa_reference

    budget = aa_reference.samrobust_aa.Budget(n_iter=3, n_target_classes=2, n_queries=4)
    protocol = aa_reference.Protocol(budget=budget)
    _, _, net = _setup((8, 8, 1))
    x = _images(6, 8, 8, 1, seed=3)
    y = torch_preact.torch_logits(net, x).argmax(1)

    def run(journal):
        adversary = aa_reference.make_reference(net, norm="l2", eps=0.02, seed=0, protocol=protocol)
        return aa_reference.run_reference(
            adversary, x, y, batch_size=4, attacks=protocol.attacks, journal=journal
        )

    journal = str(tmp_path / "journal")
    whole = run(journal)
    records = sorted(os.listdir(journal))
    assert whole["resumed_batches"] == 0 and len(records) >= len(protocol.attacks)
    os.remove(os.path.join(journal, records[-1]))  # as if killed during that batch
    resumed = run(journal)
    assert resumed["resumed_batches"] == len(records) - 1
    for key in ("clean", "robust"):
        np.testing.assert_array_equal(resumed[key], whole[key])
    for name, mask in whole["stages"].items():
        np.testing.assert_array_equal(resumed["stages"][name], mask)
    assert resumed["max_perturbation"] == pytest.approx(whole["max_perturbation"])
    assert set(os.listdir(journal)) == set(records)


def test_compile_timer_merges_overlapping_spans():
    from experiments import aa_reference

    timer = aa_reference.CompileTimer()
    timer.spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]
    assert timer.seconds == pytest.approx(4.0)


def test_a_comparison_journal_keeps_our_result_and_refuses_other_settings(tmp_path):
    from experiments import aa_reference

    path = str(tmp_path / "j")
    settings = {"eps": 8 / 255, "norm": "linf", "budget": {"n_iter": 100}}
    assert aa_reference.open_journal(path, settings) == path
    ours = {
        "clean": np.array([True, False, True]),
        "robust": np.array([False, False, True]),
        "stages": {"apgd-ce": np.array([True, False, True]), "square": np.array([0, 0, 1], bool)},
        "stage_seconds": {"apgd-ce": 1.5, "square": 2.0},
        "max_perturbation": 0.03,
        "seconds": 4.0,
        "compile_seconds": 0.5,
    }
    aa_reference.save_ours(os.path.join(path, "ours.npz"), ours)
    back = aa_reference.load_ours(os.path.join(path, "ours.npz"))
    assert list(back["stages"]) == ["apgd-ce", "square"]
    for key in ("clean", "robust"):
        np.testing.assert_array_equal(back[key], ours[key])
    assert {k: v for k, v in back.items() if k not in ("clean", "robust", "stages")} == {
        k: v for k, v in ours.items() if k not in ("clean", "robust", "stages")
    }
    assert aa_reference.open_journal(path, dict(settings)) == path  # same settings: resume
    with pytest.raises(SystemExit, match="other settings \\(eps\\)"):
        aa_reference.open_journal(path, settings | {"eps": 2 / 255})


def test_comparison_protocols_from_the_flags():
    """``--version``, ``--budget=reduced``, ``--attacks`` and ``--n_*`` give the library's
    attacks and Budget; a standard comparison's settings keep their pre-restart keys."""
    from experiments import aa_reference

    def protocol(*flags):
        return aa_reference.protocol_from(aa_reference.parse_args(["--workdir=w", *flags]))

    standard = protocol()
    assert (
        standard.full and standard.version == "standard" and "n_restarts" not in standard.asdict()
    )
    plus = protocol("--version=plus")
    assert plus.full and plus.attacks == aa.PLUS_ATTACKS and plus.budget == aa.PLUS_BUDGET
    quick = protocol("--version=plus", "--budget=reduced")
    assert not quick.full and (quick.budget.n_iter, quick.budget.n_restarts) == (10, 5)
    assert "NON-STANDARD" in quick.describe() and quick.asdict()["n_restarts"] == 5
    custom = protocol("--attacks=apgd-ce,fab", "--n_restarts=2")
    assert custom.version == "custom" and not custom.full and custom.budget.n_restarts == 2
    with pytest.raises(SystemExit, match="error: .*Unknown attacks"):
        protocol("--attacks=apgd-ce,pgd")
