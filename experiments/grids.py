"""The sweep grids of ``experiments/sweep.py``: named lists of runs of ``samrobust.main``.

  python -m experiments.sweep --grid=digits --root=/tmp/digits --dry_run

Every grid holds the methods of the paper (Wei, Zhu & Zhang 2023; ``../shared/PAPER.md``):

- SGD, the baseline.
- SAM alone, rho in {0.05, 0.1, 0.2, 0.3, 0.4, 0.5} (the default 0.05 and the extended
  version's sweep).
- Linf AT, eps in {1, 2, 4, 8}/255 with step {0.5, 1, 1, 2}/255 and {5, 5, 10, 10} PGD steps.
- L2 AT, eps in {16, 32, 64, 128}/255, step eps/2, 5 PGD steps.
- SAM+AT: rho 0.05 with the default attack (Linf 8/255, step 2/255, 5 steps).

``cifar10_cpu`` is the CIFAR-10 reproduction sized for two CPU cores (the JPEG copy in
``../shared/data``; its scale is explained at ``CIFAR10_CPU_SCALE``): SGD, SAM rho in
{0.05, 0.1, 0.2, 0.4}, Linf AT at 2/255 and 8/255, L2 AT at 32/255, all AT with PGD-5.
``cifar10_fast`` is the same comparison at real accuracy: the fast recipe
(``configs/<mode>.py:fast``, the ``fast_cifar`` network; sized at ``CIFAR10_FAST_SCALE``),
SGD and SAM rho in {0.05, 0.1, 0.2, 0.4} over 3 seeds, the three AT configs over 2.
``paper_cifar10`` and ``paper_cifar100`` are the paper's recipe as is (``configs/<mode>.py``:
PreActResNet-18, 100 epochs, batch 128), for GPU/TPU machines. ``digits`` runs the same
methods with the same budgets on the offline 8x8 digits dataset (``configs/<mode>.py:digits``)
so that the whole grid, 3 seeds and the PGD-10 evaluation included, fits in an hour on two
CPU cores; its scaling is explained at ``DIGITS_SCALE``. ``smoke`` is two tiny runs for tests.
"""

import dataclasses
import os
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training config: ``configs/<mode>.py[:arg]`` plus ``--config.<key>=<value>`` flags."""

    name: str  # the workdir name, before the seed suffix
    mode: str  # sgd | sam | at | sam_at
    overrides: tuple[tuple[str, Any], ...] = ()
    config_arg: str | None = None  # "digits" for the offline variant, "fast" for fast_cifar
    seeds: int | None = None  # at most this many seeds (None: as many as --seeds asks)

    @property
    def config(self) -> str:
        """The ``--config`` flag value, relative to the repository root."""
        path = f"configs/{self.mode}.py"
        return f"{path}:{self.config_arg}" if self.config_arg else path


SAM_RHOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
# (eps, step size, PGD steps) in units of 1/255.
LINF_AT = ((1, 0.5, 5), (2, 1, 5), (4, 1, 10), (8, 2, 10))
L2_AT = ((16, 8, 5), (32, 16, 5), (64, 32, 5), (128, 64, 5))

# digits: the paper's methods and budgets (rho, eps, step sizes, PGD steps all as above),
# scaled in compute only. The defaults of `configs/<mode>.py:digits` stay (batch 64, lr
# 0.05, crop padding 1, no flip, the piecewise schedule, PGD-10 evaluation on all 359 test
# images); the PreActResNet-18 is narrowed from width 16 to 8 and trains 20 epochs (440
# steps) instead of 30. Measured on 2 shared CPU cores, wall time per run (training +
# evaluation): SGD ~30 s, SAM ~30 s, PGD-5 AT ~49 s, PGD-10 AT ~92 s, of which ~20-55 s
# is process start, compilation and evaluation; the grid is ~12.5 min per seed, ~37 min
# for 3 seeds. AutoAttack (`--eval=autoattack`, Linf 8/255) is not in that budget: per
# model on 359 images, ~12 min with the attacks fully unrolled (CPU default; mostly
# compilation) or ~4 min with `--eval_flag=--unroll=1`, i.e. 3-10 h for the grid.
# The eps are the paper's nominal values in [0, 1] pixel units, not rescaled to 8x8
# images (an L2 ball of radius 128/255 is a larger per-pixel change on 64 pixels than on
# 3072), and digits' pixels come in steps of 1/16 = 16/255.
DIGITS_SCALE = (("width", 8), ("num_epochs", 20))

# cifar10_cpu: the paper's recipe (batch 128, lr 0.1, momentum 0.9, weight decay 5e-4, the
# piecewise schedule x0.1 at 75% and 90%, reflect-pad-4 crop + flip, PGD-10 paper suite on
# all 10,000 test images) on the CIFAR-10 JPEG copy, scaled in compute only: PreActResNet-18
# at width 8 (1/8 of the paper's channels), a fixed class-stratified subset of 20,000 train
# images (2,000 per class), 8 epochs (1,248 steps), one CPU device. Measured on the 2 shared
# cores (experiments/results/cifar10_cpu/SIZING.md): train step at batch 128 SGD 713 img/s,
# SAM 415, PGD-5 AT 184; PGD-10 evaluation ~137 img/s, i.e. ~5 min per run for the paper
# suite. Training ~73 min + evaluation ~40 min + start-up: about 2 hours per seed.
CIFAR10_DATA = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CIFAR10_CPU_SCALE = (
    ("dataset", "image_folder"),
    ("data_dir", os.path.normpath(CIFAR10_DATA)),
    ("width", 8),
    ("train_examples", 20000),
    ("num_epochs", 8),
    ("log_every_steps", 52),
    ("checkpoint_every_steps", 208),
    ("keep_checkpoints", 1),
)


# cifar10_fast: the fast recipe (`configs/<mode>.py:fast`: fast_cifar at width 32, 10
# epochs of all 50,000 train images, batch 512, label smoothing 0.2, SAM perturbing per 128
# examples) on the CIFAR-10 JPEG copy; the paper suite (PGD-10) on all 10,000 test images.
# Measured (experiments/results/cifar10_fast/RECIPE.md): SGD ~30 min of training on the 2
# cores (86.8% clean, seed 0), SAM with groups of 128 2.2x, PGD-5 AT 3.9x: ~12.5 h of
# training per seed, so the CPU grid waits for a better accuracy/time point or a GPU.
CIFAR10_FAST_SCALE = (
    ("dataset", "image_folder"),
    ("data_dir", os.path.normpath(CIFAR10_DATA)),
    ("log_every_steps", 20),
    ("checkpoint_every_steps", 97),
    ("keep_checkpoints", 1),
)


def cpu_grid_methods(
    scale: tuple[tuple[str, Any], ...],
    config_arg: str | None = None,
    sgd_sam_seeds: int | None = None,
    at_seeds: int | None = None,
) -> list[RunSpec]:
    """The CPU grids' methods: SGD; SAM rho 0.05-0.4; Linf AT 2/255 (step 1/255) and 8/255
    (step 2/255); L2 AT 32/255 (step 16/255); every AT with PGD-5 (the paper's code). The
    seeds cap the runs of SGD/SAM and of AT (None: as many as the sweep asks)."""

    def run(
        name: str, mode: str, *overrides: tuple[str, Any], seeds: int | None = sgd_sam_seeds
    ) -> RunSpec:
        return RunSpec(name, mode, (*scale, *overrides), config_arg, seeds)

    def at(norm: str, eps: int, step: int) -> RunSpec:
        return run(
            f"at_{norm}_eps{eps}",
            "at",
            ("attack.norm", norm),
            ("attack.eps", eps / 255),
            ("attack.step_size", step / 255),
            ("attack.steps", 5),
            seeds=at_seeds,
        )

    runs = [run("sgd", "sgd")]
    runs += [run(f"sam_rho{rho:g}", "sam", ("rho", rho)) for rho in (0.05, 0.1, 0.2, 0.4)]
    return runs + [at("linf", 2, 1), at("linf", 8, 2), at("l2", 32, 16)]


# smoke: a few steps of a width-4 network (tests.helpers.TINY), for the sweep's own tests.
SMOKE_SCALE = (
    ("width", 4),
    ("num_epochs", 1),
    ("eval_num_examples", 64),
    ("eval_batch_size", 64),
    ("log_every_steps", 5),
    ("checkpoint_every_steps", 5),
    ("eval_pgd_steps", 2),
)


def paper_methods(
    scale: tuple[tuple[str, Any], ...] = (), config_arg: str | None = None
) -> list[RunSpec]:
    """SGD, SAM over rho, Linf and L2 AT over eps, SAM+AT; ``scale`` is added to every run."""

    def run(name: str, mode: str, *overrides: tuple[str, Any]) -> RunSpec:
        return RunSpec(name, mode, (*scale, *overrides), config_arg)

    runs = [run("sgd", "sgd")]
    runs += [run(f"sam_rho{rho:g}", "sam", ("rho", rho)) for rho in SAM_RHOS]
    for norm, budgets in (("linf", LINF_AT), ("l2", L2_AT)):
        runs += [
            run(
                f"at_{norm}_eps{eps:g}",
                "at",
                ("attack.norm", norm),
                ("attack.eps", eps / 255),
                ("attack.step_size", step / 255),
                ("attack.steps", steps),
            )
            for eps, step, steps in budgets
        ]
    runs.append(
        run(
            "sam_at_rho0.05_linf_eps8",
            "sam_at",
            ("rho", 0.05),
            ("attack.norm", "linf"),
            ("attack.eps", 8 / 255),
            ("attack.step_size", 2 / 255),
            ("attack.steps", 5),
        )
    )
    return runs


GRIDS: dict[str, list[RunSpec]] = {
    "paper_cifar10": paper_methods((("dataset", "cifar10"),)),
    "paper_cifar100": paper_methods((("dataset", "cifar100"),)),
    "digits": paper_methods(DIGITS_SCALE, "digits"),
    "cifar10_cpu": cpu_grid_methods(CIFAR10_CPU_SCALE),
    "cifar10_fast": cpu_grid_methods(CIFAR10_FAST_SCALE, "fast", sgd_sam_seeds=3, at_seeds=2),
    "smoke": [
        RunSpec("sgd", "sgd", SMOKE_SCALE, "digits"),
        RunSpec("sam_rho0.05", "sam", (*SMOKE_SCALE, ("rho", 0.05)), "digits"),
    ],
}
