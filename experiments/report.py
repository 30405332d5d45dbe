"""Collects a sweep's runs into a table (mean ± std over seeds) and a clean-vs-robust plot.

  python -m experiments.report --root=/tmp/digits
  python -m experiments.report --root=/tmp/digits --out=/tmp/report --robust_key=pgd10_ce_l2_32/255
  python -m experiments.report --root=R --robust_key=pgd10_ce_linf_2/255 \
      --robust_key=autoattack_sub1000:autoattack_linf_8/255

Reads every ``ROOT/<run>/results.json`` (from ``samrobust.main``), its ``config.json`` and
any ``eval_*.json`` (from ``samrobust.evaluate``; metric ``<suite>:<key>``, e.g.
``autoattack:autoattack_linf_2/255``; ``<suite>_best:<key>`` for the best checkpoint,
``autoattack_it10_tc9_q5000:<key>`` for a reduced AutoAttack budget,
``autoattack_sub1000:<key>`` on the 1,000-point evaluation subset). Runs are
grouped by their config without the seed (and logging/checkpoint settings), and labelled by
method and hyperparameters (``SAM rho=0.1``, ``AT Linf 8/255 PGD-10``). Writes to ``--out``
(default ROOT). Both may be ``gs://bucket/dir`` (see ``samrobust.paths``):

- ``report.md``: per group, accuracies in % as mean ± sample std over seeds, measured
  training seconds, and the training cost relative to SGD: each run's ``train_seconds``
  over the SGD run with the same seed and the same non-method config, averaged over seeds,
  next to the nominal cost (SGD 1, SAM 2, PGD-k AT k+1, SAM+AT k+2); then the paired
  comparison with SGD: per method and metric, the difference to the SGD run of the same
  seed (and the same non-method config), mean ± std over seeds, and in how many seeds the
  method was higher.
- ``report.png``: per dataset, clean accuracy against each ``--robust_key`` accuracy
  (repeatable; keys no run has are skipped; the clean accuracy is the one measured on the
  same points, e.g. ``autoattack_sub1000:clean`` on the same 1,000-point subset) with error bars:
  SAM over rho, Linf AT and L2 AT over eps as curves, SAM+AT and SGD as points; then the
  training cost relative to SGD.
- ``report.json``: everything in the table, with the per-seed values.

``--robust_key`` is any metric in the table, e.g. ``pgd10_ce_l2_32/255`` or
``autoattack:autoattack_linf_8/255``. ``train_seconds`` excludes compilation; a run resumed
from a checkpoint counts only its last segment, and one resumed after its last step (0 s)
is left out of the timings. ``--no-measured_cost`` leaves the train seconds, their ratio
to SGD's and the cost panel out (only the nominal cost stays): for runs that shared the
machine unevenly, whose seconds measure the load and not the method.
"""

import argparse
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from samrobust import paths, reports
from samrobust.autoattack import STANDARD_ATTACKS, Budget
from samrobust.checkpoint import ADDED_KEYS, flatten_config
from samrobust.runs import parse_checkpoint

DEFAULT_ROBUST_KEY = "pgd10_ce_linf_2/255"
# Settings that do not change what a run measures: not part of a group's identity.
IGNORED_KEYS = frozenset(
    {
        "seed",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "data_dir",
        "cache_dir",
    }
)
SAM_KEYS = ("rho", "adaptive", "sam_sync")
ATTACK_KEYS = (
    "attack.norm",
    "attack.eps",
    "attack.step_size",
    "attack.steps",
    "attack.start_scale",
    "attack.project",
)
# The method keys each mode uses; the others are dropped from its identity.
MODE_KEYS = {
    "sgd": (),
    "sam": SAM_KEYS,
    "at": ATTACK_KEYS,
    "sam_at": SAM_KEYS + ATTACK_KEYS,
}
METHOD_KEYS = frozenset({"mode", *SAM_KEYS, *ATTACK_KEYS})
FAMILIES = ("SGD", "SAM", "ASAM", "AT Linf", "AT L2", "SAM+AT")
CURVE_PARAM = {"SAM": "rho", "ASAM": "rho", "AT Linf": "eps", "AT L2": "eps"}
MARKERS = "osD^v<>"  # one per distinct data/model setting in a plot


def read_json(path: epath.Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_run(workdir: epath.PathLike) -> dict[str, Any]:
    """One finished run: name, flat config, metrics (accuracy fractions) and timings."""
    workdir = paths.path(workdir)
    results = read_json(workdir / "results.json")
    metrics = dict(results["accuracy"])
    for f in sorted(workdir.iterdir()):
        if f.name.startswith("eval_") and f.name.endswith(".json"):
            report = read_json(f)
            checkpoint = parse_checkpoint(report["run"]["checkpoint"])
            details = report.get("autoattack", {})  # its stages: the attacks, in order
            budget = details.get("budget")
            suite = (
                report["suite"]
                + (
                    reports.budget_suffix(
                        Budget(**budget), tuple(details.get("stages", STANDARD_ATTACKS))
                    )
                    if budget
                    else ""
                )
                + reports.subset_suffix(report.get("subset"))
                + reports.checkpoint_suffix(checkpoint)
            )
            metrics.update({f"{suite}:{k}": v for k, v in report["accuracy"].items()})
    return {
        "name": workdir.name,
        "config": ADDED_KEYS | flatten_config(read_json(workdir / "config.json")),
        "metrics": metrics,
        "train_seconds": results["train_seconds"],
    }


def load_runs(root: epath.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """(finished runs, names of run directories without results.json or config.json)."""
    runs, incomplete = [], []
    root_dir = paths.path(root)
    if not root_dir.is_dir():
        raise ValueError(f"--root={root} is not a directory: pass the sweep's --root")
    for workdir in sorted(root_dir.iterdir()):
        if not workdir.is_dir():
            continue
        if all((workdir / f).exists() for f in ("results.json", "config.json")):
            runs.append(load_run(workdir))
        else:
            incomplete.append(workdir.name)
    return runs, incomplete


def identity(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method keys the mode uses, every other key that matters) of a flat config."""
    method = {"mode": config["mode"]} | {k: config.get(k) for k in MODE_KEYS[config["mode"]]}
    base = {k: v for k, v in config.items() if k not in IGNORED_KEYS | METHOD_KEYS}
    return method, base


def describe(method: dict[str, Any]) -> tuple[str, str, float | None]:
    """(label, family, curve parameter) of a method, e.g. ("SAM rho=0.1", "SAM", 0.1)."""
    mode = method["mode"]
    sam = "ASAM" if method.get("adaptive") else "SAM"
    if mode == "sgd":
        return "SGD", "SGD", None
    if mode == "sam":
        return f"{sam} rho={method['rho']:g}", sam, method["rho"]
    norm = {"linf": "Linf", "l2": "L2"}.get(method["attack.norm"], method["attack.norm"])
    eps = round(method["attack.eps"] * 255, 3)
    attack = f"{norm} {eps:g}/255 PGD-{method['attack.steps']}"
    if mode == "at":
        return f"AT {attack}", f"AT {norm}", eps
    return f"{sam}+AT rho={method['rho']:g} {attack}", "SAM+AT", method["rho"]


def nominal_cost(method: dict[str, Any]) -> int:
    """Gradient computations per step relative to SGD: SAM 2, PGD-k AT k+1, SAM+AT k+2."""
    mode = method["mode"]
    return {"sgd": 1, "sam": 2, "at": 1, "sam_at": 2}[mode] + (
        method["attack.steps"] if mode in ("at", "sam_at") else 0
    )


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) with the values."""
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": len(v),
        "values": v.tolist(),
    }


def paired_differences(
    runs: Sequence[dict[str, Any]], sgd: dict[int, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Per metric: the differences run - SGD over the seeds both have (``mean_std``), and
    ``higher``, the number of those seeds where the run is higher."""
    out = {}
    keys = dict.fromkeys(k for r in runs for k in r["metrics"])
    for k in keys:
        diffs = [
            r["metrics"][k] - sgd[s][k]
            for r in runs
            if (s := r["config"]["seed"]) in sgd and k in sgd[s] and k in r["metrics"]
        ]
        if diffs:
            out[k] = mean_std(diffs) | {"higher": sum(d > 0 for d in diffs)}
    return out


def group_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups runs that differ only in seed; adds stats, cost vs SGD, labels and order."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        method, base = identity(run["config"])
        key = json.dumps([method, base], sort_keys=True)
        g = groups.setdefault(key, {"method": method, "base": base, "runs": []})
        g["runs"].append(run)

    sgd_seconds: dict[str, dict[int, float]] = {}  # base config -> seed -> train seconds
    sgd_metrics: dict[str, dict[int, dict[str, float]]] = {}  # base -> seed -> metrics
    for g in groups.values():
        if g["method"]["mode"] == "sgd":
            base = json.dumps(g["base"], sort_keys=True)
            sgd_seconds[base] = {r["config"]["seed"]: r["train_seconds"] for r in g["runs"]}
            sgd_metrics[base] = {r["config"]["seed"]: r["metrics"] for r in g["runs"]}

    out = []
    for g in groups.values():
        label, family, param = describe(g["method"])
        runs_ = sorted(g["runs"], key=lambda r: r["config"]["seed"])
        metric_keys = list(dict.fromkeys(k for r in runs_ for k in r["metrics"]))
        timed = [r for r in runs_ if r["train_seconds"] > 0]  # 0: resumed when already done
        sgd = sgd_seconds.get(json.dumps(g["base"], sort_keys=True), {})
        ratios = [
            r["train_seconds"] / sgd[s]
            for r in timed
            if (s := r["config"]["seed"]) in sgd and sgd[s] > 0
        ]
        out.append(
            {
                "label": label,
                "family": family,
                "param": param,
                "dataset": g["base"].get("dataset"),
                "method": g["method"],
                "base": g["base"],
                "runs": [r["name"] for r in runs_],
                "seeds": [r["config"]["seed"] for r in runs_],
                "metrics": {
                    k: mean_std([r["metrics"][k] for r in runs_ if k in r["metrics"]])
                    for k in metric_keys
                },
                "train_seconds": mean_std([r["train_seconds"] for r in timed]) if timed else None,
                "cost_vs_sgd": mean_std(ratios) if ratios else None,
                "nominal_cost": nominal_cost(g["method"]),
                "vs_sgd": paired_differences(
                    runs_, sgd_metrics.get(json.dumps(g["base"], sort_keys=True), {})
                ),
            }
        )
    _disambiguate(out)
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    out.sort(
        key=lambda g: (
            str(g["dataset"]),
            family_rank.get(g["family"], len(FAMILIES)),
            g["param"] if g["param"] is not None else 0.0,
            g["label"],
        )
    )
    return out


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in all ``configs``."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _disambiguate(groups: list[dict[str, Any]]) -> None:
    """Appends the differing non-method keys to labels that two groups share in a dataset."""
    by_label: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for g in groups:
        by_label.setdefault((g["dataset"], g["label"]), []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        differing = differing_keys([g["base"] for g in same])
        for g in same:
            g["label"] += " (" + ", ".join(f"{k}={g['base'].get(k)}" for k in differing) + ")"


def format_stat(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    mean = f"{stat['mean'] * scale:.{digits}f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std'] * scale:.{digits}f}"


def markdown(
    groups: Sequence[dict[str, Any]],
    root: str,
    incomplete: Sequence[str],
    measured_cost: bool = True,
) -> str:
    """The Markdown report: one row per group, accuracies in %. Without ``measured_cost``
    the train seconds and their ratio to SGD's are left out (runs timed on a shared
    machine), only the nominal cost is shown."""
    keys = list(dict.fromkeys(k for g in groups for k in g["metrics"]))
    keys = sorted(keys, key=lambda k: (":" in k, k != "clean"))  # clean, main eval, eval_*
    n_runs = sum(len(g["runs"]) for g in groups)
    lines = [
        f"# Sweep report: {root}",
        "",
        f"{n_runs} finished runs in {len(groups)} groups. Accuracy in % (mean ± sample std "
        "over seeds); "
        + (
            "cost = train seconds / SGD's (same seed, same data and model settings), nominal "
            "cost in brackets."
            if measured_cost
            else "nominal cost = gradient computations per step / SGD's (the runs' train "
            "seconds are left out: they were not timed alike, see --no-measured_cost)."
        ),
    ]
    if incomplete:
        lines.append(f"Unfinished or unreadable (left out): {', '.join(incomplete)}.")
    cost_header = ["Train s", "Cost vs SGD"] if measured_cost else ["Nominal cost"]
    header = ["Method", "Dataset", "Seeds", *keys, *cost_header]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        row = [
            g["label"],
            str(g["dataset"]),
            str(len(g["runs"])),
            *(format_stat(g["metrics"].get(k), 100.0) for k in keys),
            *(
                [
                    format_stat(g["train_seconds"]),
                    f"{format_stat(g['cost_vs_sgd'], digits=2)} [{g['nominal_cost']}]",
                ]
                if measured_cost
                else [str(g["nominal_cost"])]
            ),
        ]
        lines.append("| " + " | ".join(row) + " |")
    paired = [g for g in groups if g["method"]["mode"] != "sgd" and g["vs_sgd"]]
    if paired:
        lines += [
            "",
            "## Paired comparison with SGD (same seed)",
            "",
            "Difference to the SGD run of the same seed, in accuracy points (mean ± sample std "
            "over seeds), and in how many of those seeds the method was higher.",
            "",
            "| " + " | ".join(["Method", "Dataset", *keys]) + " |",
            "|" + "---|" * (len(keys) + 2),
        ]
        for g in paired:
            cells = []
            for k in keys:
                d = g["vs_sgd"].get(k)
                cells.append(
                    "–"
                    if d is None
                    else f"{d['mean'] * 100:+.1f}"
                    + (f" ± {d['std'] * 100:.1f}" if d["n"] > 1 else "")
                    + f" ({d['higher']}/{d['n']})"
                )
            lines.append("| " + " | ".join([g["label"], str(g["dataset"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def clean_key(robust_key: str) -> str:
    """The clean accuracy measured on the same points as ``robust_key``: an ``eval_*``
    report's own (``autoattack_sub1000:clean`` on its evaluation subset for
    ``autoattack_sub1000:autoattack_linf_8/255``), else training's paper suite ``clean``."""
    suite, sep, _ = robust_key.rpartition(":")
    return f"{suite}:clean" if sep else "clean"


def tradeoff_series(
    here: Sequence[dict[str, Any]], robust_key: str
) -> dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]]:
    """(family, base settings) -> [(group, robust stat, clean stat on the same points)] for
    the groups that have ``robust_key``."""
    series: dict[tuple[str, str], list] = {}
    for g in here:
        m = g["metrics"]
        if robust_key in m:
            clean = m.get(clean_key(robust_key), m["clean"])
            key = (g["family"], json.dumps(g["base"], sort_keys=True))
            series.setdefault(key, []).append((g, m[robust_key], clean))
    return series


def _plot_tradeoff(ax_acc, here, robust_key: str, dataset: str, colors: dict) -> None:
    """One clean-vs-robust panel: curves over rho / eps, single methods as points."""
    bases = list(dict.fromkeys(json.dumps(g["base"], sort_keys=True) for g in here))
    differing = differing_keys([g["base"] for g in here])
    for (family, base), points in tradeoff_series(here, robust_key).items():
        curve = family in CURVE_PARAM and len(points) > 1
        label = f"{family} (over {CURVE_PARAM[family]})" if curve else family
        if differing:  # runs of other data/model settings: say which
            label += " [" + ", ".join(f"{k}={points[0][0]['base'].get(k)}" for k in differing)
            label += "]"
        rob = [r for _, r, _ in points]
        clean = [c for _, _, c in points]
        ax_acc.errorbar(
            [100 * s["mean"] for s in rob],
            [100 * s["mean"] for s in clean],
            xerr=[100 * s["std"] for s in rob],
            yerr=[100 * s["std"] for s in clean],
            fmt=("-" if curve else "") + MARKERS[bases.index(base) % len(MARKERS)],
            color=colors.get(family),
            capsize=3,
            markersize=6 if curve else 9,
            label=label,
        )
        if family in CURVE_PARAM:
            for g, r, c in points:
                ax_acc.annotate(
                    f"{g['param']:g}",
                    (100 * r["mean"], 100 * c["mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    ax_acc.set_xlabel(f"robust accuracy (%), {robust_key}")
    ax_acc.set_ylabel(f"clean accuracy (%), {clean_key(robust_key)}")
    ax_acc.set_title(f"{dataset}: clean vs robust (SAM labelled by rho, AT by eps x 255)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)


def plot(
    groups: Sequence[dict[str, Any]],
    robust_keys: Sequence[str],
    path: epath.Path,
    measured_cost: bool = True,
) -> None:
    """Per dataset: clean vs robust accuracy per key (curves over rho / eps) and, with
    ``measured_cost``, cost vs SGD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(g["dataset"] for g in groups))
    cols = len(robust_keys) + measured_cost
    fig, axes = plt.subplots(
        len(datasets), cols, figsize=(6.5 * cols, 5.5 * len(datasets)), squeeze=False
    )
    colors = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for row, dataset in zip(axes, datasets, strict=True):
        here = [g for g in groups if g["dataset"] == dataset]
        for ax_acc, robust_key in zip(row, robust_keys, strict=False):
            _plot_tradeoff(ax_acc, here, robust_key, dataset, colors)
        if not measured_cost:
            continue
        ax_cost = row[-1]
        ax_cost.set_title(f"{dataset}: training cost (mean over seeds)")
        costed = [g for g in here if g["cost_vs_sgd"] is not None]
        if not costed:
            ax_cost.text(0.5, 0.5, "no timed SGD run with the same settings", ha="center")
            ax_cost.set_axis_off()
            continue
        y = np.arange(len(costed))
        ax_cost.barh(
            y,
            [g["cost_vs_sgd"]["mean"] for g in costed],
            xerr=[g["cost_vs_sgd"]["std"] for g in costed],
            color=[colors.get(g["family"], "gray") for g in costed],
            capsize=3,
            label="measured train seconds / SGD's",
        )
        ax_cost.scatter(
            [g["nominal_cost"] for g in costed],
            y,
            marker="x",
            color="black",
            zorder=3,
            label="nominal (gradient computations)",
        )
        ax_cost.set_yticks(y, [g["label"] for g in costed], fontsize=7)
        ax_cost.invert_yaxis()
        ax_cost.set_xlabel("training cost relative to SGD")
        ax_cost.grid(axis="x", alpha=0.3)
        ax_cost.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(png.getvalue())


def report(
    root: str,
    out: str | None = None,
    robust_keys: Sequence[str] = (DEFAULT_ROBUST_KEY,),
    measured_cost: bool = True,
) -> dict:
    """Writes report.md, report.png and report.json to ``out`` (default ``root``);
    ``measured_cost=False`` leaves the runs' train seconds out of report.md and the plot."""
    out = out or root
    runs, incomplete = load_runs(root)
    if not runs:
        raise ValueError(f"No finished runs (results.json + config.json) under {root}")
    groups = group_runs(runs)
    available = sorted({k for g in groups for k in g["metrics"]})
    robust_keys = [k for k in robust_keys if any(k in g["metrics"] for g in groups)]
    if not robust_keys:
        raise ValueError(f"no --robust_key is in any run; available: {available}")
    out_dir = paths.path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"root": root, "robust_keys": robust_keys, "incomplete": incomplete, "groups": groups}
    (out_dir / "report.json").write_text(json.dumps(data, indent=2))
    (out_dir / "report.md").write_text(markdown(groups, root, incomplete, measured_cost))
    plot(groups, robust_keys, out_dir / "report.png", measured_cost)
    return data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (``argv``: default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", required=True, help="the sweep's directory (one workdir per run)")
    p.add_argument("--out", help="output directory (default: --root)")
    p.add_argument(
        "--robust_key",
        action="append",
        help=f"robust metric to plot against clean accuracy, repeatable (default "
        f"{DEFAULT_ROBUST_KEY}); keys in no run are skipped",
    )
    p.add_argument(
        "--measured_cost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show the runs' train seconds and their ratio to SGD's (--no-measured_cost: "
        "only the nominal cost, for runs that shared the machine unevenly)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = report(
            args.root, args.out, args.robust_key or [DEFAULT_ROBUST_KEY], args.measured_cost
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.root
    print(f"{len(data['groups'])} groups -> {out}/report.md, report.png, report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
