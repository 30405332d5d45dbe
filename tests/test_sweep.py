"""Tests of ``experiments/sweep.py`` (every grid builds), the sweep end to end, and the report."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from experiments import report, sweep
from experiments.grids import GRIDS, RunSpec
from tests.helpers import REPO, subprocess_env


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_dry_run_builds_and_validates_every_config(grid, tmp_path, capsys):
    root = str(tmp_path / grid)
    assert sweep.main([f"--grid={grid}", f"--root={root}", "--dry_run", "--eval=autoattack"]) == 0
    out = capsys.readouterr().out
    runs = sweep.expand(grid, root, seeds=3)
    assert len(runs) == sum(min(3, s.seeds or 3) for s in GRIDS[grid])
    assert len({r.name for r in runs}) == len(runs)
    assert f"{len(runs)} runs of grid {grid!r} built and validated: 0 done, 0 resume" in out
    assert out.count("-m samrobust.evaluate") == len(runs)
    assert not os.path.exists(root)  # a dry run writes nothing
    for run in runs:
        assert run.workdir == os.path.join(root, run.name)
        config = sweep.build_config(run.train_command())
        assert config.mode == run.spec.mode and config.seed == run.seed
        for key, value in run.spec.overrides:
            got = config
            for part in key.split("."):
                got = got[part]
            assert got == value, (run.name, key)


def method_overrides(spec: RunSpec) -> tuple:
    scale = {"dataset", "width", "num_epochs"}
    return spec.mode, tuple((k, v) for k, v in spec.overrides if k not in scale)


def test_cifar10_fast_runs_3_seeds_of_sgd_and_sam_and_2_of_at(tmp_path):
    names = [r.name for r in sweep.expand("cifar10_fast", str(tmp_path), seeds=3)]
    assert names[:5] == [
        "sgd_s0",
        "sam_rho0.05_s0",
        "sam_rho0.1_s0",
        "sam_rho0.2_s0",
        "sam_rho0.4_s0",
    ]
    assert "sam_rho0.4_s2" in names and "at_linf_eps8_s1" in names
    assert not any(n.startswith("at_") and n.endswith("_s2") for n in names)
    assert len(names) == 5 * 3 + 3 * 2
    assert {s.config for s in GRIDS["cifar10_fast"]} == {
        "configs/sgd.py:fast",
        "configs/sam.py:fast",
        "configs/at.py:fast",
    }


def test_grids_hold_the_papers_methods():
    paper = [method_overrides(s) for s in GRIDS["paper_cifar10"]]
    assert len(paper) == 16
    # The digits grid and the CIFAR-100 grid run exactly the same methods and budgets.
    for grid in ("paper_cifar100", "digits"):
        assert [method_overrides(s) for s in GRIDS[grid]] == paper
    names = [s.name for s in GRIDS["paper_cifar10"]]
    assert names[:2] == ["sgd", "sam_rho0.05"] and "at_linf_eps8" in names
    at8 = dict(GRIDS["paper_cifar10"][names.index("at_linf_eps8")].overrides)
    assert at8["attack.eps"] == 8 / 255 and at8["attack.step_size"] == 2 / 255
    assert at8["attack.steps"] == 10
    l2 = dict(GRIDS["paper_cifar10"][names.index("at_l2_eps64")].overrides)
    assert l2["attack.step_size"] == l2["attack.eps"] / 2 and l2["attack.steps"] == 5
    assert {s.config for s in GRIDS["digits"]} == {
        f"configs/{m}.py:digits" for m in ("sgd", "sam", "at", "sam_at")
    }


def test_invalid_override_and_changed_config_are_refused(tmp_path, capsys):
    root = str(tmp_path)
    assert sweep.main(["--grid=smoke", f"--root={root}", "--dry_run", "--override=rho=-1"]) == 2
    assert "config.rho = -1.0: must be >= 0" in capsys.readouterr().err
    assert sweep.main(["--grid=smoke", f"--root={root}", "--dry_run", "--override=rh=1"]) == 2
    assert "unknown config key 'rh'" in capsys.readouterr().err

    # A finished run is skipped only if it was made with the grid's config.
    run = sweep.expand("smoke", root, seeds=1)[0]
    config = sweep.build_config(run.train_command()).to_dict()
    os.makedirs(run.workdir)
    for name, data in (("results.json", {}), ("config.json", config | {"width": 16})):
        with open(os.path.join(run.workdir, name), "w") as f:
            json.dump(data, f)
    assert sweep.main(["--grid=smoke", f"--root={root}", "--seeds=1", "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 finished runs") and "width: checkpoint 16 vs now 4" in err


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_sweep_end_to_end_then_report(tmp_path):
    root = str(tmp_path / "sweep")
    args = ("--grid=smoke", f"--root={root}", "--seeds=1")
    out = run_module("experiments.sweep", *args).stdout
    names = ["sgd_s0", "sam_rho0.05_s0"]
    assert "[1/2] sgd_s0: training" in out and "ETA" in out and "complete" in out
    for name in names:
        results = json.load(open(os.path.join(root, name, "results.json")))
        assert results["total_steps"] == 1437 // 64
        assert "img/s" in open(os.path.join(root, name, "log.txt")).read()

    # Finished runs are skipped; so is an evaluation whose json exists.
    for i, name in enumerate(names):
        with open(os.path.join(root, name, "eval_autoattack_linf_8_255.json"), "w") as f:
            accuracy = {"autoattack_linf_8/255": 0.25 + i / 10}
            json.dump(
                {"suite": "autoattack", "run": {"checkpoint": "latest"}, "accuracy": accuracy}, f
            )
    logs = {n: open(os.path.join(root, n, "log.txt")).read() for n in names}
    out = run_module("experiments.sweep", *args, "--eval=autoattack").stdout
    assert out.count("done, skipped") == 2
    assert logs == {n: open(os.path.join(root, n, "log.txt")).read() for n in names}

    # An interrupted run (here: no results.json, checkpoints kept) resumes.
    os.remove(os.path.join(root, "sam_rho0.05_s0", "results.json"))
    out = run_module("experiments.sweep", *args).stdout
    assert "[1/2] sgd_s0: done, skipped" in out and "sam_rho0.05_s0: resuming" in out
    assert "resuming at step 22" in open(os.path.join(root, "sam_rho0.05_s0", "log.txt")).read()

    out_dir = str(tmp_path / "report")
    run_module(
        "experiments.report",
        f"--root={root}",
        f"--out={out_dir}",
        "--robust_key=pgd2_ce_linf_2/255",
    )
    md = open(os.path.join(out_dir, "report.md")).read()
    assert "| SGD | digits | 1 |" in md and "| SAM rho=0.05 | digits | 1 |" in md
    assert "autoattack:autoattack_linf_8/255" in md and "| 35.0 |" in md
    data = json.load(open(os.path.join(out_dir, "report.json")))
    assert [g["label"] for g in data["groups"]] == ["SGD", "SAM rho=0.05"]
    assert data["groups"][0]["cost_vs_sgd"]["mean"] == 1.0
    assert os.path.getsize(os.path.join(out_dir, "report.png")) > 10_000


def write_run(root, name: str, seed: int, accuracy: dict, seconds: float, **config) -> str:
    """A finished run directory as samrobust.main leaves it (config.json, results.json)."""
    cfg = default.get_config("digits").to_dict()
    attack = config.pop("attack", {})
    cfg.update(config, seed=seed)
    cfg["attack"].update(attack)
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg, f)
    results = {"mode": cfg["mode"], "accuracy": accuracy, "train_seconds": seconds}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    return workdir


def test_report_aggregates_mean_and_std_over_seeds(tmp_path):
    root = str(tmp_path / "runs")
    key = report.DEFAULT_ROBUST_KEY
    sgd_clean, sgd_rob, sgd_s = [0.90, 0.92, 0.97], [0.50, 0.55, 0.60], [10.0, 12.0, 14.0]
    sam_clean, sam_rob, sam_s = [0.93, 0.94, 0.95], [0.60, 0.64, 0.62], [20.0, 30.0, 28.0]
    for s in range(3):
        write_run(root, f"sgd_s{s}", s, {"clean": sgd_clean[s], key: sgd_rob[s]}, sgd_s[s])
        write_run(
            root,
            f"sam_rho0.1_s{s}",
            s,
            {"clean": sam_clean[s], key: sam_rob[s]},
            sam_s[s],
            mode="sam",
            rho=0.1,
            log_every_steps=7 + s,  # bookkeeping keys do not split a group
        )
    # Two seeds of AT, one with an AutoAttack evaluation; and a wider SGD (its own group).
    at = {"norm": "linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10}
    for s, rob in ((0, 0.8), (2, 0.9)):
        workdir = write_run(
            root, f"at_s{s}", s, {"clean": 0.8, key: rob}, 110.0, mode="at", attack=at
        )
    for eps, acc in (("8", 0.7), ("2", 0.75)):  # two budgets, in files side by side
        with open(os.path.join(workdir, f"eval_autoattack_linf_{eps}_255.json"), "w") as f:
            accuracy = {"clean": 0.66, f"autoattack_linf_{eps}/255": acc}  # on its N points
            json.dump(
                {"suite": "autoattack", "run": {"checkpoint": "latest"}, "accuracy": accuracy}, f
            )
    with open(os.path.join(workdir, "eval_autoattack_linf_8_255_it10_tc9_q5000.json"), "w") as f:
        json.dump(  # a quick look with a reduced budget: not the standard protocol's figure
            {
                "suite": "autoattack",
                "run": {"checkpoint": "latest"},
                "accuracy": {"autoattack_linf_8/255": 0.78},
                "autoattack": {"budget": {"n_iter": 10, "n_target_classes": 9, "n_queries": 5000}},
            },
            f,
        )
    write_run(root, "sgd_w32_s0", 0, {"clean": 0.99, key: 0.7}, 40.0, width=32)
    os.makedirs(os.path.join(root, "unfinished_s0", "checkpoints"))

    data = report.report(root, str(tmp_path / "out"))
    groups = {g["label"]: g for g in data["groups"]}
    assert list(groups) == [
        "SGD (width=16)",
        "SGD (width=32)",
        "SAM rho=0.1",
        "AT Linf 8/255 PGD-10",
    ]
    assert data["incomplete"] == ["unfinished_s0"]

    sgd, sam, at_g = groups["SGD (width=16)"], groups["SAM rho=0.1"], groups["AT Linf 8/255 PGD-10"]
    assert sgd["seeds"] == [0, 1, 2] and sam["runs"] == [f"sam_rho0.1_s{s}" for s in range(3)]
    for group, clean, rob in ((sgd, sgd_clean, sgd_rob), (sam, sam_clean, sam_rob)):
        for stat, values in ((group["metrics"]["clean"], clean), (group["metrics"][key], rob)):
            assert stat["n"] == 3
            np.testing.assert_allclose(stat["mean"], np.mean(values))
            np.testing.assert_allclose(stat["std"], np.std(values, ddof=1))
    # Cost: per-seed ratio to SGD's train seconds, then mean +- std over seeds.
    ratios = np.array(sam_s) / np.array(sgd_s)
    np.testing.assert_allclose(sam["cost_vs_sgd"]["mean"], ratios.mean())
    np.testing.assert_allclose(sam["cost_vs_sgd"]["std"], ratios.std(ddof=1))
    np.testing.assert_allclose(at_g["cost_vs_sgd"]["values"], [110 / 10, 110 / 14])
    assert groups["SGD (width=32)"]["cost_vs_sgd"]["values"] == [1.0]
    assert (sgd["nominal_cost"], sam["nominal_cost"], at_g["nominal_cost"]) == (1, 2, 11)
    assert at_g["metrics"]["autoattack:autoattack_linf_8/255"] == {
        "mean": 0.7,
        "std": 0.0,
        "n": 1,
        "values": [0.7],
    }
    assert at_g["metrics"]["autoattack:autoattack_linf_2/255"]["values"] == [0.75]
    quick = at_g["metrics"]["autoattack_it10_tc9_q5000:autoattack_linf_8/255"]
    assert quick["values"] == [0.78]
    np.testing.assert_allclose(at_g["metrics"][key]["std"], np.std([0.8, 0.9], ddof=1))

    md = open(tmp_path / "out" / "report.md").read()
    assert (
        "| SGD (width=16) | digits | 3 | 93.0 ± 3.6 | 55.0 ± 5.0 | – | – | – | – | 12.0 ± 2.0 |"
        in md
    )
    assert f"| {ratios.mean():.2f} ± {ratios.std(ddof=1):.2f} [2] |" in md
    assert (
        "| AT Linf 8/255 PGD-10 | digits | 2 | 80.0 ± 0.0 | 85.0 ± 7.1 | 66.0 | 75.0 | 70.0 "
        "| 78.0 |" in md
    )
    assert "unfinished_s0" in md
    assert os.path.getsize(tmp_path / "out" / "report.png") > 10_000
    assert json.load(open(tmp_path / "out" / "report.json")) == json.loads(json.dumps(data))

    # Paired with SGD of the same seed: SAM - SGD per seed; AT has seeds 0 and 2 only.
    np.testing.assert_allclose(
        sam["vs_sgd"]["clean"]["values"], np.subtract(sam_clean, sgd_clean), atol=1e-12
    )
    assert sam["vs_sgd"]["clean"]["higher"] == 2  # 0.95 < 0.97 in seed 2
    np.testing.assert_allclose(at_g["vs_sgd"][key]["values"], [0.8 - 0.50, 0.9 - 0.60])
    assert "autoattack:autoattack_linf_8/255" not in at_g["vs_sgd"]  # SGD has none
    assert "| SAM rho=0.1 | digits | +1.0 ± 2.6 (2/3) | +7.0 ± 4.4 (3/3) |" in md

    # The plot pairs each robust accuracy with the clean accuracy on the same points.
    aa_key = "autoattack:autoattack_linf_8/255"
    assert report.clean_key(aa_key) == "autoattack:clean" and report.clean_key(key) == "clean"
    [[(_, rob, clean)]] = report.tradeoff_series(data["groups"], aa_key).values()
    assert (rob["values"], clean["values"]) == ([0.7], [0.66])
    series = report.tradeoff_series(data["groups"], key)
    assert [
        c["mean"] for _, _, c in series["AT Linf", json.dumps(at_g["base"], sort_keys=True)]
    ] == [0.8]

    # Robust keys no run has are skipped; the plot gets one panel per remaining key.
    data = report.report(
        root,
        str(tmp_path / "out2"),
        ["pgd10_ce_linf_8/255", key, "autoattack:autoattack_linf_8/255"],
    )
    assert data["robust_keys"] == [key, "autoattack:autoattack_linf_8/255"]
    with pytest.raises(ValueError, match="available"):
        report.report(root, str(tmp_path / "out"), ["pgd10_ce_linf_8/255"])

    with pytest.raises(ValueError, match="is not a directory"):
        report.report(str(tmp_path / "none"))

    # Runs timed on an unevenly shared machine: only the nominal cost is reported.
    assert report.main([f"--root={root}", f"--out={tmp_path / 'out3'}", "--no-measured_cost"]) == 0
    md = open(tmp_path / "out3" / "report.md").read()
    assert "Train s" not in md and "Cost vs SGD" not in md and "| Nominal cost |" in md
    assert "| SGD (width=16) | digits | 3 | 93.0 ± 3.6 | 55.0 ± 5.0 | – | – | – | – | 1 |" in md
    assert "| AT Linf 8/255 PGD-10 | digits | 2 |" in md and md.count("| 11 |") == 1
    assert os.path.getsize(tmp_path / "out3" / "report.png") > 10_000


def test_shards_partition_the_grid(tmp_path, capsys):
    root = str(tmp_path)
    names = []
    for i in range(4):
        assert sweep.main(["--grid=digits", f"--root={root}", "--dry_run", f"--shard={i}/4"]) == 0
        names.append(re.findall(r"\] (\S+) \(new\)", capsys.readouterr().out))
    everything = [run.name for run in sweep.expand("digits", root, seeds=3)]
    assert sorted(sum(names, [])) == sorted(everything)  # disjoint, complete
    assert names[1] == everything[1::4]
    assert sweep.main(["--grid=smoke", f"--root={root}", "--seeds=1", "--shard=3/4"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_eval_flags_name_the_report_a_run_is_checked_for(tmp_path, capsys):
    assert sweep.eval_stem("autoattack", []) == "eval_autoattack_linf_8_255"
    flags = ["--eps=2/255", "--num_examples=1000", "--checkpoint=best"]
    assert sweep.eval_stem("autoattack", flags) == "eval_autoattack_linf_2_255_sub1000_best"
    assert sweep.eval_stem("paper", ["--num_examples=10"]) == "eval_paper_sub10"
    quick = sweep.eval_stem("autoattack", ["--n_iter=10"])
    assert quick == "eval_autoattack_linf_8_255_it10_tc9_q5000"
    with pytest.raises(ValueError, match="--n_iter=x: expected a whole number"):
        sweep.eval_stem("autoattack", ["--n_iter=x"])
    args = ["--grid=smoke", f"--root={tmp_path}", "--eval=autoattack", "--eval_flag=--eps=x"]
    with pytest.raises(SystemExit) as e:
        sweep.main(args)
    assert e.value.code == 2 and "--eval_flag" in capsys.readouterr().err
