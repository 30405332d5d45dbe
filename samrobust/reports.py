"""Evaluation reports: their file names (stems), Markdown tables and masks.

:func:`report_stem` names a report by what it measured (suite, AutoAttack radius and budget,
evaluation subset, checkpoint), so that reports of different measurements never overwrite
each other; :func:`write_report` writes ``<stem>.json``, ``<stem>.md`` and
``<stem>_masks.npz``.
"""

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from samrobust import autoattack as aa
from samrobust import paths
from samrobust.attacks import format_eps
from samrobust.robustness import AUTOATTACK_SUITES, autoattack_name


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, with the run, the AutoAttack details and warnings."""
    lines = [f"# Robustness evaluation: `{report['suite']}` suite", ""]
    run = report.get("run")
    if run and "torch_checkpoint" in run:
        lines.append(
            f"PyTorch checkpoint `{run['torch_checkpoint']}` (sha256 "
            f"{run['torch_sha256'][:12]}): {run['model']} on {run['dataset']}."
        )
    elif run:
        lines.append(
            f"Run `{run['workdir']}` (checkpoint step {run['step']}): {run['mode']}, "
            f"{run['model']} (width {run['width']}) on {run['dataset']}."
        )
    lines += [
        f"{report['num_examples']} test examples, batch {report['batch_size']}, seed "
        f"{report['seed']}, {report['devices']} devices. PGD images/s exclude compilation, "
        "AutoAttack's include it.",
        "",
        "| attack | norm | eps | accuracy | img/s |",
        "|:--|:--|--:|--:|--:|",
    ]
    for name, acc in report["accuracy"].items():
        a = report["attacks"][name]
        rate = report["images_per_s"][name]
        rate = f"{rate:.0f}" if rate else "-"
        if name == "clean":
            what, norm, eps = "clean", "", ""
        elif a["attack"] == "AutoAttack":
            version = a.get("version", "standard")
            if version == "custom":
                version = f"custom ({', '.join(a['attacks'])})"
            restarts = a.get("n_restarts", 1)
            what = f"AutoAttack {version} (n_iter {a['n_iter']}, n_queries {a['n_queries']}" + (
                f", n_restarts {restarts})" if restarts != 1 else ")"
            )
            norm, eps = a["norm"], format_eps(a["eps"])
        else:
            what = f"{a['attack']} {a['loss'].upper()}, step {format_eps(a['step_size'])}"
            norm, eps = a["norm"], format_eps(a["eps"])
        lines.append(f"| {what} | {norm} | {eps} | {100 * acc:.2f}% | {rate} |")
        if name == report.get("autoattack", {}).get("name"):
            details = report["autoattack"]
            for stage, stage_acc in details["stages"].items():
                stage_rate = details["images_per_s"][stage]
                stage_rate = f"{stage_rate:.0f}" if stage_rate else "-"
                lines.append(
                    f"| &nbsp;&nbsp;after {stage} | {norm} | {eps} | "
                    f"{100 * stage_acc:.2f}% | {stage_rate} |"
                )
    if "autoattack" in report:
        lines += [
            "",
            f"Largest AutoAttack perturbation: {report['autoattack']['max_perturbation']:.6g} "
            f"({report['attacks'][report['autoattack']['name']]['norm']}); all adversarials "
            "checked against eps and [0, 1].",
        ]
    lines += ["", "Warnings:" if report["warnings"] else "No sanity-check warnings."]
    lines += [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def report_stem(
    suite: str,
    checkpoint: str | int = "latest",
    norm: str | None = None,
    eps: float | None = None,
    budget: aa.Budget | None = None,
    num_examples: int = -1,
    attacks: tuple[str, ...] = aa.STANDARD_ATTACKS,
) -> str:
    """``eval_<suite>``, with the AutoAttack radius for the ``autoattack`` and ``full``
    suites (``eval_autoattack_linf_8_255``, so radii do not overwrite each other; a custom
    version's attacks too: ``eval_autoattack-apgd-ce+apgd-t_linf_8_255``) and
    :func:`budget_suffix`, then ``_sub<N>`` when ``num_examples`` asks for the evaluation
    subset of N points (:func:`samrobust.input_pipeline.eval_subset`; reports of other
    point sets never share a stem), then ``_best`` for the best checkpoint or ``_step<N>``
    for step N."""
    stem = f"eval_{suite}"
    if suite in AUTOATTACK_SUITES:
        name = autoattack_name(norm, eps, attacks).removeprefix("autoattack")
        stem += name.replace("/", "_")
        stem += budget_suffix(budget or aa.version_budget(attacks), attacks)
    if num_examples != -1:
        stem += f"_sub{num_examples}"
    return stem + checkpoint_suffix(checkpoint)


def subset_suffix(subset: Mapping[str, Any] | None) -> str:
    """How a report's metrics name its points
    (:func:`samrobust.input_pipeline.describe_subset`): ``""`` for a whole split (or no
    record), ``_sub<N>`` for the evaluation subset of N points."""
    if not subset or subset["rule"] == "all":
        return ""
    return f"_sub{subset['num_examples']}"


def budget_suffix(budget: aa.Budget, attacks: Sequence[str] = aa.STANDARD_ATTACKS) -> str:
    """``""`` for the full budget of the ``attacks``' version, else
    ``_it<n_iter>_tc<targets>_q<queries>``, with ``_r<restarts>`` if those differ from the
    version's (a quick look never overwrites, nor is reported as, the version's protocol)."""
    full = aa.version_budget(attacks)
    if budget == full:
        return ""
    restarts = "" if budget.n_restarts == full.n_restarts else f"_r{budget.n_restarts}"
    return f"_it{budget.n_iter}_tc{budget.n_target_classes}_q{budget.n_queries}{restarts}"


def checkpoint_suffix(checkpoint: str | int) -> str:
    """How a report names its checkpoint: ``""`` (latest), ``_best`` or ``_step<N>``."""
    if checkpoint == "latest":
        return ""
    return "_best" if checkpoint == "best" else f"_step{checkpoint}"


def save_masks(path: str | epath.Path, masks: Mapping[str, np.ndarray]) -> None:
    """Per-example masks as ``.npz``, keyed by metric name with ``/`` written as ``_``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k.replace("/", "_"): v for k, v in masks.items()})
    paths.path(path).write_bytes(buf.getvalue())


def write_report(workdir: str, report: dict[str, Any], stem: str) -> list[str]:
    """Writes ``<stem>.json``, ``.md`` and ``_masks.npz`` (:func:`report_stem`) to
    ``workdir``; their paths."""
    stem = paths.path(workdir) / stem
    files = [stem.with_name(stem.name + s) for s in (".json", ".md", "_masks.npz")]
    files[0].write_text(json.dumps({k: v for k, v in report.items() if k != "masks"}, indent=2))
    files[1].write_text(markdown(report))
    save_masks(files[2], report["masks"])
    return [str(p) for p in files]
