"""The reference AutoAttack (fra31/auto-attack) against samrobust's, on the same network.

  python -m experiments.aa_reference --workdir=RUN_DIR [--checkpoint=latest|best|STEP] \\
      --norm=linf --eps=8/255 --num_examples=500 --batch_size=250 \\
      [--out=experiments/results/aa_reference/NAME.json] [--version=standard|plus] \\
      [--budget=standard|reduced] [--attacks=apgd-ce,apgd-t] [--n_iter=N] \\
      [--n_target_classes=N] [--n_queries=N] [--n_restarts=N] [--seed=0]

Needs ``pip install -e '.[reference]'`` (torch CPU + ``pyautoattack``, the reference code
packaged; it imports as ``pyautoattack``, not ``autoattack``). Loads a ``samrobust.main``
run's checkpoint, copies its weights into the torch PreActResNet of
:mod:`experiments.torch_preact`, and stops (exit 1) unless the two models' logits agree to
``--tol`` (1e-4 max abs) on every evaluated point. Then, on the same N test points (the
fixed class-stratified subset of :func:`samrobust.input_pipeline.eval_subset`, recorded as
``subset`` in the output):

- ours: ``samrobust.autoattack.autoattack`` on ``Partial(run.logits_fn, run.variables)``
  (wall time with compilation; compilation alone from ``jax.monitoring``'s trace, lowering
  and XLA compile spans, merged);
- the reference: ``pyautoattack.AutoAttack(version=...)`` (``--version``: standard, or plus:
  APGD-CE, APGD-DLR and FAB with 5 restarts, Square, APGD-T, FAB-T), its attack objects
  run as its ``run_standard_evaluation`` cascade does (same calls, seeds and order, on the
  points still robust, in batches of ``--batch_size``), so the robust mask after every stage
  is kept; the input checks of ``run_standard_evaluation`` are not run. As in the reference,
  a point counts as fooled when the torch model misclassifies the returned point (ours also
  requires it inside the ball and ``[0, 1]``); with logits ~1e-5 apart, only points within
  that margin of the decision boundary can be judged differently by the two models.

The two run one after the other (ours first) in one process; both use all cores (torch:
``--torch_threads``). Per-stage times: the reference's measured here, ours from the
result's ``seconds`` (compilation included).

Writes ``--out`` (JSON), the same path with ``.md`` (table) and ``_masks.npz`` (per-point
masks: ``clean_ours``, ``ours_<stage>``, ``reference_<stage>``...): robust accuracy after each
stage for both, final robust accuracies, per-point agreement of the robust masks (and the
indices robust under only one), wall times and their ratio, N, norm, eps, model, checkpoint
step, machine, versions, date and the command. ``--budget=reduced`` (10 iterations, 3 target
classes, 100 queries), ``--attacks`` or any ``--n_*`` flag is a quick look: the output then
says NON-STANDARD everywhere. Default ``--out``:
``experiments/results/aa_reference/<dataset>_<run folder>_<checkpoint>_<norm><eps>_sub<N>.json``
(``..._plus.json`` for plus).

Resumable (an adversarially trained model keeps the reference busy for hours on 2 cores):
``<out stem>_journal/`` holds our finished result and every finished batch of the
reference, each with its wall time; the same command continues from there (a journal made
under other settings is refused) and deletes it once the report is written. A resumed
comparison's reference time is the sum of its batches' recorded times, and says so.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
from absl import logging

import samrobust.autoattack as samrobust_aa
from experiments.torch_preact import from_flax, nhwc_to_nchw, torch_logits
from samrobust import input_pipeline, parallel
from samrobust.attacks import parse_eps
from samrobust.runs import Run, load_run

REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}
RESULTS_DIR = os.path.join("experiments", "results", "aa_reference")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What both sides run: the attacks in order (a version's, or custom) and the library's
    :class:`samrobust.autoattack.Budget`."""

    attacks: tuple[str, ...] = samrobust_aa.STANDARD_ATTACKS
    budget: samrobust_aa.Budget = samrobust_aa.STANDARD_BUDGET

    @property
    def version(self) -> str:
        return samrobust_aa.version_of(self.attacks)

    @property
    def full(self) -> bool:
        """A version's own protocol (standard or plus at its budget), not a quick look."""
        return self.version != "custom" and self.budget == samrobust_aa.version_budget(self.attacks)

    def asdict(self) -> dict[str, Any]:
        """The budget's fields and the attacks (one restart left out, as in the reports and
        journals written before restarts could be set)."""
        return samrobust_aa.budget_key(self.budget) | {"attacks": list(self.attacks)}

    def describe(self) -> str:
        b = self.budget
        text = (
            f"{'+'.join(self.attacks)}; n_iter={b.n_iter}, n_target_classes="
            f"{b.n_target_classes}, n_queries={b.n_queries}, n_restarts={b.n_restarts}"
        )
        return f"{self.version}: {text}" if self.full else f"NON-STANDARD ({text})"


REDUCED = samrobust_aa.Budget(n_iter=10, n_target_classes=3, n_queries=100)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# samrobust's side: the run and our AutoAttack (the only calls into samrobust's API)
# --------------------------------------------------------------------------------------------


def load(workdir: str, checkpoint: str) -> Run:
    """The training run (config, step, logits_fn, variables, dataset) at ``latest``,
    ``best`` or a step number."""
    return load_run(workdir, checkpoint=int(checkpoint) if checkpoint.isdigit() else checkpoint)


def run_ours(
    run: Run,
    x: np.ndarray,
    y: np.ndarray,
    *,
    norm: str,
    eps: float,
    seed: int,
    batch_size: int,
    protocol: Protocol,
) -> samrobust_aa.AutoAttackResult:
    """samrobust's AutoAttack cascade (``clean``, ``robust``, ``stages``: attack -> robust
    mask after it, ``seconds``: attack -> wall time, ``max_perturbation``)."""
    return samrobust_aa.autoattack(
        jax.tree_util.Partial(run.logits_fn, run.variables),
        x,
        y,
        jax.random.key(seed),
        eps=eps,
        norm=norm,
        budget=protocol.budget,
        attacks=protocol.attacks,
        batch_size=batch_size,
    )


def ours_logits(run: Run, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The Flax model's eval-mode logits on NHWC ``x``."""
    fn = jax.jit(run.logits_fn)
    out = [
        np.asarray(fn(run.variables, x[i : i + batch_size])) for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


class CompileTimer:
    """Wall time JAX spends tracing, lowering and compiling (``jax.monitoring`` time spans,
    overlaps merged) while active."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def _listener(self, event: str, start: float, end: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.spans.append((start, end))

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_time_span_listener(self._listener)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_time_span_listener(self._listener)

    @property
    def seconds(self) -> float:
        total, end = 0.0, -np.inf
        for s, e in sorted(self.spans):
            if e > end:
                total += e - max(s, end)
                end = e
        return total


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def make_reference(
    net: torch.nn.Module, *, norm: str, eps: float, seed: int, protocol: Protocol
) -> Any:
    """``pyautoattack.AutoAttack`` on ``net`` (its plus version for plus, else standard),
    with the protocol's budget applied."""
    from pyautoattack import AutoAttack

    version = "plus" if protocol.version == "plus" else "standard"
    adversary = AutoAttack(
        net, norm=REFERENCE_NORMS[norm], eps=eps, version=version, seed=seed, device="cpu"
    )
    budget = protocol.budget
    adversary.apgd.n_restarts = adversary.fab.n_restarts = budget.n_restarts
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter = apgd.n_iter_orig = budget.n_iter
        # The step-size checkpoints are set from n_iter in APGDAttack.__init__.
        apgd.n_iter_2 = max(int(0.22 * budget.n_iter), 1)
        apgd.n_iter_min = max(int(0.06 * budget.n_iter), 1)
        apgd.size_decr = max(int(0.03 * budget.n_iter), 1)
    adversary.apgd_targeted.n_target_classes = budget.n_target_classes
    adversary.fab.n_iter = budget.n_iter
    adversary.fab.n_target_classes = budget.n_target_classes
    adversary.square.n_queries = budget.n_queries
    return adversary


def _reference_attack(adversary: Any, name: str) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The reference's call for ``name``, as in ``AutoAttack.run_standard_evaluation``."""

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name in ("apgd-ce", "apgd-dlr"):
            adversary.apgd.loss = name.removeprefix("apgd-")
            adversary.apgd.seed = adversary.get_seed()
            return adversary.apgd.perturb(x, y)
        if name == "fab":
            adversary.fab.targeted = False
            adversary.fab.seed = adversary.get_seed()
            return adversary.fab.perturb(x, y)
        if name == "apgd-t":
            adversary.apgd_targeted.seed = adversary.get_seed()
            return adversary.apgd_targeted.perturb(x, y)
        if name == "fab-t":
            adversary.fab.targeted = True
            adversary.fab.n_restarts = 1
            adversary.fab.seed = adversary.get_seed()
            return adversary.fab.perturb(x, y)
        if name == "square":
            adversary.square.seed = adversary.get_seed()
            return adversary.square.perturb(x, y)
        raise ValueError(f"unknown attack {name!r}")

    return attack


def run_reference(
    adversary: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    attacks: Sequence[str],
    journal: str | None = None,
) -> dict[str, Any]:
    """The reference cascade on NHWC ``x``: clean and per-stage robust masks, stage times,
    the largest perturbation of the points it counted as fooled.

    ``journal``: a folder recording every finished (stage, batch) with its wall time; a run
    stopped part-way continues from it (the reference reseeds every ``perturb`` call, so a
    batch gives the same result either way) and its stage times are the recorded sums.
    """
    xt, yt = nhwc_to_nchw(x), torch.from_numpy(np.asarray(y, np.int64))
    n = len(y)
    if journal:
        os.makedirs(journal, exist_ok=True)
    with torch.no_grad():
        clean = np.concatenate(
            [
                (adversary.get_logits(xt[i : i + batch_size]).argmax(1) == yt[i : i + batch_size])
                .numpy()
                .astype(bool)
                for i in range(0, n, batch_size)
            ]
        )
        robust, x_adv = clean.copy(), xt.clone()
        stages, times, resumed = {}, {}, 0
        for name in attacks:
            attack, times[name] = _reference_attack(adversary, name), 0.0
            idx = np.flatnonzero(robust)
            n_batches = -(-len(idx) // batch_size)
            for b in range(n_batches):
                chunk = idx[b * batch_size : (b + 1) * batch_size]
                ci = torch.from_numpy(chunk)
                record = os.path.join(journal, f"{name}_{b}.npz") if journal else None
                loaded = bool(record and os.path.exists(record))
                if loaded:
                    with np.load(record) as r:
                        if not np.array_equal(r["chunk"], chunk):
                            raise SystemExit(
                                f"error: {record} was recorded on other points: this journal "
                                "is not this comparison's; delete it or pass another --out"
                            )
                        fooled, adv, seconds = r["fooled"], torch.from_numpy(r["adv"]), r["s"]
                    resumed += 1
                else:
                    start = time.perf_counter()
                    xb, yb = xt[ci].clone(), yt[ci].clone()
                    adv_all = attack(xb, yb)
                    fooled = (adversary.get_logits(adv_all).argmax(1) != yb).numpy()
                    adv = adv_all[torch.from_numpy(fooled)]
                    seconds = time.perf_counter() - start
                    if record:
                        np.savez(record, chunk=chunk, fooled=fooled, adv=adv.numpy(), s=seconds)
                robust[chunk[fooled]] = False
                x_adv[ci[torch.from_numpy(fooled)]] = adv
                times[name] += float(seconds)
                when = ", recorded earlier" if loaded else ""
                log(
                    f"reference {name} batch {b + 1}/{n_batches}: {int(fooled.sum())} of "
                    f"{len(chunk)} fooled ({times[name]:.1f} s{when})"
                )
            stages[name] = robust.copy()
            log(f"reference after {name}: robust {robust.mean():.4f} ({times[name]:.1f} s)")
    delta = (x_adv - xt).reshape(n, -1)
    pert = delta.abs().amax(1) if adversary.norm == "Linf" else delta.square().sum(1).sqrt()
    return {
        "clean": clean,
        "robust": robust,
        "stages": stages,
        "stage_seconds": times,
        "max_perturbation": float(pert.max()) if n else 0.0,
        "resumed_batches": resumed,
    }


# --------------------------------------------------------------------------------------------
# Comparison and report
# --------------------------------------------------------------------------------------------


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def compare(ours: dict[str, Any], ref: dict[str, Any], attacks: Sequence[str]) -> dict[str, Any]:
    """Per-stage robust accuracies and mask agreements, final ones, disagreeing indices."""
    stages = {
        name: {
            "ours": float(ours["stages"][name].mean()),
            "reference": float(ref["stages"][name].mean()),
            "agreement": _agree(ours["stages"][name], ref["stages"][name]),
        }
        for name in attacks
    }
    return {
        "clean": {
            "ours": float(ours["clean"].mean()),
            "reference": float(ref["clean"].mean()),
            "agreement": _agree(ours["clean"], ref["clean"]),
        },
        "stages": stages,
        "final": {
            "ours": float(ours["robust"].mean()),
            "reference": float(ref["robust"].mean()),
            "ours_minus_reference": float(ours["robust"].mean() - ref["robust"].mean()),
            "agreement": _agree(ours["robust"], ref["robust"]),
            "robust_only_ours": np.flatnonzero(ours["robust"] & ~ref["robust"]).tolist(),
            "robust_only_reference": np.flatnonzero(ref["robust"] & ~ours["robust"]).tolist(),
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table plus the settings."""
    r, t, m = report["results"], report["time_s"], report["model"]
    lines = []
    if not report["standard"]:
        lines += [f"**{report['budget']['text']}: not an AutoAttack protocol**", ""]
    sub = report.get("subset") or {}
    points = (
        f"the {report['n']}-point class-stratified evaluation subset"
        if sub.get("rule", "all") != "all"
        else f"the first {report['n']} test points"
    )
    lines += [
        f"AutoAttack {report.get('version', 'standard')} {report['norm']} "
        f"eps={report['eps_text']} on {points} of {m['dataset']} ({m['model']} width "
        f"{m['width']}, mode {m['mode']}, checkpoint {report['checkpoint']} step "
        f"{report['step']}); logits agree to "
        f"{report['logit_check']['max_abs_diff']:.2e} (max abs).",
        "",
        "| stage | ours robust acc | reference robust acc | mask agreement |",
        "| --- | --- | --- | --- |",
    ]
    c = r["clean"]
    lines.append(f"| clean | {c['ours']:.4f} | {c['reference']:.4f} | {c['agreement']:.4f} |")
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['ours']:.4f} | {s['reference']:.4f} | {s['agreement']:.4f} |")
    f = r["final"]
    ratio = t["ratio_reference_over_ours"]
    lines += [
        f"| **final** | **{f['ours']:.4f}** | **{f['reference']:.4f}** | "
        f"**{f['agreement']:.4f}** |",
        "",
        f"- robust under ours only: {len(f['robust_only_ours'])} points; under the reference "
        f"only: {len(f['robust_only_reference'])}",
        f"- wall time: ours {t['ours_total']:.1f} s (compilation {t['ours_compile']:.1f} s), "
        f"reference {t['reference_total']:.1f} s; reference / ours = {ratio:.2f}x"
        + (
            f" (the run was resumed: the reference's time sums its batches' recorded times, "
            f"{t['reference_resumed_batches']} of them measured before the interruption)"
            if t.get("reference_resumed_batches")
            else ""
        )
        + (
            f"; the reference's figures are those measured {report['reference_from']['measured']}"
            f" ({report['reference_from']['report']}): it is seeded, so only ours ran again"
            if report.get("reference_from")
            else ""
        ),
        "- per stage (s): reference "
        + ", ".join(f"{k} {v:.1f}" for k, v in t["reference_stages"].items())
        + "; ours (compilation included) "
        + (", ".join(f"{k} {v:.1f}" for k, v in t["ours_stages"].items()) or "not reported"),
        f"- budget: {report['budget']['text']}; batch size {report['batch_size']}; "
        f"seed {report['seed']}",
        f"- machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs "
        f"(torch threads {report['machine']['torch_threads']}); "
        f"XLA_FLAGS={report['machine'].get('xla_flags', '(not recorded)')!r}; {report['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def model_info(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's model and training method (rho for SAM, the PGD budget for AT)."""
    info = {k: cfg.get(k) for k in ("model", "width", "mode", "dataset", "half_precision")}
    modes = str(cfg.get("mode", "")).split("_")
    if "sam" in modes:
        info["rho"] = cfg.get("rho")
    if "at" in modes:
        info["attack"] = cfg.get("attack")
    return info


def _git_commit() -> str | None:
    """HEAD's commit, ``+dirty`` when the work tree differs from it."""
    try:
        git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {name: version(name) for name in ("jax", "flax", "torch", "pyautoattack")}
    out["samrobust_commit"] = _git_commit() or "unknown"
    return out


def default_out(run: Run, args: argparse.Namespace, protocol: Protocol) -> str:
    """``RESULTS_DIR/<dataset>_<run folder>_<checkpoint>_<norm><eps>_sub<N>.json``
    (``_plus`` for plus, ``_nonstandard`` for a quick look)."""
    eps = args.eps.replace("/", "_")
    suffix = "_nonstandard" if not protocol.full else {"plus": "_plus"}.get(protocol.version, "")
    run_name = os.path.basename(os.path.normpath(args.workdir))
    name = (
        f"{run.config['dataset']}_{run_name}_{args.checkpoint}_{args.norm}{eps}"
        f"_sub{args.num_examples}{suffix}.json"
    )
    return os.path.join(RESULTS_DIR, name)


def open_journal(path: str, settings: dict[str, Any]) -> str:
    """The folder where a comparison records what it finished (``settings.json``: what it
    compares); refuses one left by another comparison."""
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "settings.json")
    if os.path.exists(file):
        with open(file) as f:
            recorded = json.load(f)
        if recorded != json.loads(json.dumps(settings)):
            diff = sorted(k for k in settings if recorded.get(k) != settings[k])
            raise SystemExit(
                f"error: {path} holds a comparison with other settings ({', '.join(diff)}); "
                "delete it to start over, or pass another --out"
            )
        log(f"resuming from {path}")
    else:
        with open(file, "w") as f:
            json.dump(settings, f, indent=1)
    return path


def earlier_reference(
    path: str, settings: dict[str, Any], n: int, attacks: Sequence[str]
) -> tuple[dict[str, Any], float]:
    """(the reference's result, its wall time) from an earlier report of the same
    comparison (``path``, with its ``_masks.npz``: same run, step, first ``n`` points,
    budget, seed and batch size); exits if it compared anything else."""
    with open(path) as f:
        earlier = json.load(f)
    budget = {k: v for k, v in earlier.get("budget", {}).items() if k != "text"}
    same = {k: earlier.get(k) for k in ("workdir", "step", "norm", "eps", "seed", "batch_size")}
    if (
        same != {k: settings[k] for k in same}
        or budget != json.loads(json.dumps(settings["budget"]))
        or earlier.get("n") != n
    ):
        raise SystemExit(
            f"error: --reference_from={path} is not a report of this comparison (other run, "
            "points, budget, seed or batch size); run the reference again without it"
        )
    stem = path[:-5] if path.endswith(".json") else path
    with np.load(stem + "_masks.npz") as m:
        stages = {a: m[f"reference_{a.replace('-', '_')}"] for a in attacks}
        clean = m["clean_reference"]
    times = earlier["time_s"]
    ref = {
        "clean": clean,
        "robust": stages[attacks[-1]],
        "stages": stages,
        "stage_seconds": times["reference_stages"],
        "max_perturbation": earlier["max_perturbation"]["reference"],
        "resumed_batches": times.get("reference_resumed_batches", 0),
        "measured": earlier["date"],
    }
    return ref, times["reference_total"]


def save_ours(path: str, ours: dict[str, Any]) -> None:
    """Our finished cascade (masks, times) as ``.npz``, for a resumed comparison."""
    scalars = {k: v for k, v in ours.items() if k not in ("clean", "robust", "stages")}
    stages = {f"stage:{k}": v for k, v in ours["stages"].items()}
    np.savez(path, clean=ours["clean"], robust=ours["robust"], meta=json.dumps(scalars), **stages)


def load_ours(path: str) -> dict[str, Any]:
    with np.load(path) as f:
        stages = {k.removeprefix("stage:"): f[k] for k in f.files if k.startswith("stage:")}
        return {"clean": f["clean"], "robust": f["robust"], "stages": stages} | json.loads(
            str(f["meta"])
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a samrobust.main run")
    p.add_argument("--checkpoint", default="latest", help="latest, best or a step")
    p.add_argument("--norm", default="linf", choices=sorted(REFERENCE_NORMS))
    p.add_argument("--eps", default="8/255", help="e.g. 8/255 or 0.5")
    p.add_argument(
        "--num_examples",
        type=int,
        default=500,
        help="N test points (the class-stratified evaluation subset)",
    )
    p.add_argument("--batch_size", type=int, default=250, help="both cascades' batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"JSON path (default: under {RESULTS_DIR})")
    p.add_argument("--version", default="standard", choices=("standard", "plus"))
    p.add_argument("--budget", default="standard", choices=("standard", "reduced"))
    p.add_argument("--attacks", default=None, help="comma-separated attacks (custom version)")
    p.add_argument("--n_iter", type=int, default=None)
    p.add_argument("--n_target_classes", type=int, default=None)
    p.add_argument("--n_queries", type=int, default=None)
    p.add_argument("--n_restarts", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference")
    p.add_argument("--torch_threads", type=int, default=None, help="default: torch's")
    p.add_argument(
        "--reference_from",
        default=None,
        help="an earlier report (JSON) of this comparison: reuse its reference figures "
        "(the reference is seeded, so only ours is run again)",
    )
    return p.parse_args(argv)


def protocol_from(args: argparse.Namespace) -> Protocol:
    """The flags' protocol: ``--version``'s attacks (``--attacks``: a custom list) and its
    budget, ``--budget=reduced`` and any ``--n_*`` flag applied; a one-line error exit."""
    version = "custom" if args.attacks else args.version
    names = tuple(a.strip() for a in args.attacks.split(",")) if args.attacks else None
    keys = ("n_iter", "n_target_classes", "n_queries", "n_restarts")
    try:
        attacks, budget = samrobust_aa.resolve_version(version, names, None)
        if args.budget == "reduced":
            budget = dataclasses.replace(REDUCED, n_restarts=budget.n_restarts)
        changes = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        return Protocol(attacks, dataclasses.replace(budget, **changes))
    except ValueError as e:
        raise SystemExit(f"error: --version/--attacks/--budget/--n_*: {e}") from None


def check_torch_copy(run: Run, x: np.ndarray, batch_size: int, tol: float) -> tuple[Any, dict]:
    """The run's network copied into torch, and the logit check (exits unless the two
    models' logits agree to ``tol`` on every point)."""
    net = from_flax(
        run.variables,
        mean=run.dataset.mean,
        std=run.dataset.std,
        padding=run.config.get("padding", "same"),
    )
    flax_out, torch_out = ours_logits(run, x, batch_size), torch_logits(net, x, batch_size)
    diff = np.abs(flax_out - torch_out)
    max_diff = float(diff.max())
    log(f"logit check: max abs diff {max_diff:.3e} (tol {tol:g})")
    if not max_diff <= tol:
        raise SystemExit(
            f"error: the torch copy's logits differ from the Flax model's by {max_diff:.3e} "
            f"(> --tol={tol:g}, worst point {int(diff.max(1).argmax())}): the "
            "comparison would not be on the same network."
        )
    check = {
        "max_abs_diff": max_diff,
        "tol": tol,
        "argmax_agreement": _agree(flax_out.argmax(1), torch_out.argmax(1)),
    }
    return net, check


def ours_result(
    run: Run, x: np.ndarray, y: np.ndarray, journal: str, **kwargs: Any
) -> dict[str, Any]:
    """Our cascade's masks and times (``kwargs``: :func:`run_ours`'s), from the journal if an
    earlier try finished it."""
    ours_file = os.path.join(journal, "ours.npz")
    if os.path.exists(ours_file):
        ours = load_ours(ours_file)
        log(f"ours: measured earlier, read from {ours_file}")
    else:
        log("ours: samrobust.autoattack (wall time includes compilation)")
        logging.set_verbosity(logging.INFO)  # its per-batch and progress lines (not orbax's)
        start = time.perf_counter()
        with CompileTimer() as compile_timer:
            res = run_ours(run, x, y.astype(np.int32), **kwargs)
        ours = {
            "clean": np.asarray(res.clean, bool),
            "robust": np.asarray(res.robust, bool),
            "stages": {k: np.asarray(v, bool) for k, v in res.stages.items()},
            "stage_seconds": {k: float(v) for k, v in res.seconds.items()},
            "max_perturbation": float(res.max_perturbation),
            "seconds": time.perf_counter() - start,
            "compile_seconds": compile_timer.seconds,
        }
        save_ours(ours_file, ours)
    log(
        f"ours: robust {ours['robust'].mean():.4f} "
        + " ".join(f"{k}={v.mean():.4f}" for k, v in ours["stages"].items())
        + f" ({ours['seconds']:.1f} s, compilation {ours['compile_seconds']:.1f} s)"
    )
    return ours


def reference_result(
    args: argparse.Namespace,
    net: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    protocol: Protocol,
    journal: str,
    settings: dict[str, Any],
) -> tuple[dict[str, Any], float]:
    """(the reference cascade's masks and times, its wall time): run now (resuming from the
    journal), or read from ``--reference_from``."""
    if args.reference_from:
        ref, ref_s = earlier_reference(args.reference_from, settings, len(y), protocol.attacks)
        log(f"reference: measured earlier, read from {args.reference_from}")
        return ref, ref_s
    log("reference: pyautoattack (fra31/auto-attack)")
    adversary = make_reference(net, norm=args.norm, eps=eps, seed=args.seed, protocol=protocol)
    start = time.perf_counter()
    ref = run_reference(
        adversary,
        x,
        y,
        batch_size=args.batch_size,
        attacks=protocol.attacks,
        journal=os.path.join(journal, "reference"),
    )
    # Resumed: the batches' recorded times (each measured whole, in whichever session).
    if ref["resumed_batches"]:
        return ref, sum(ref["stage_seconds"].values())
    return ref, time.perf_counter() - start


def write_outputs(
    out: str, report: dict[str, Any], ours: dict[str, Any], ref: dict[str, Any]
) -> None:
    """``out`` (JSON), its ``.md`` and ``_masks.npz``; prints the table."""
    stem = out[:-5] if out.endswith(".json") else out
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    masks = {"clean_ours": ours["clean"], "clean_reference": ref["clean"]}
    for who, res in (("ours", ours), ("reference", ref)):
        masks.update({f"{who}_{k.replace('-', '_')}": v for k, v in res["stages"].items()})
    np.savez_compressed(stem + "_masks.npz", **masks)
    print(markdown(report), flush=True)
    log(f"wrote {out}, {stem}.md, {stem}_masks.npz")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parallel.set_xla_cpu_defaults()
    protocol, eps = protocol_from(args), parse_eps(args.eps)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    log(f"AutoAttack {protocol.describe()}")

    run = load(args.workdir, args.checkpoint)
    cfg = run.config
    if cfg.get("half_precision"):
        raise SystemExit(
            "error: the run computes in bfloat16 (half_precision); the torch copy is float32, "
            "so the two models' logits cannot agree to --tol. Compare a float32 run."
        )
    x, y, subset = input_pipeline.evaluation_points(run.dataset, args.num_examples)
    x, y, n = np.asarray(x, np.float32), np.asarray(y, np.int64), len(y)
    log(
        f"run {args.workdir} step {run.step} ({cfg['model']} width {cfg['width']}, "
        f"mode {cfg['mode']}, {cfg['dataset']}): {n} points {x.shape[1:]}"
    )
    net, logit_check = check_torch_copy(run, x, args.batch_size, args.tol)

    out = args.out or default_out(run, args, protocol)
    stem = out[:-5] if out.endswith(".json") else out
    settings = {
        "workdir": os.path.abspath(args.workdir),
        "step": int(run.step),
        "norm": args.norm,
        "eps": eps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "budget": protocol.asdict(),
        "points": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest(),
    }
    journal = open_journal(stem + "_journal", settings)
    kw = dict(norm=args.norm, eps=eps, seed=args.seed, batch_size=args.batch_size)
    ours = ours_result(run, x, y, journal, **kw, protocol=protocol)
    ref, ref_s = reference_result(
        args, net, x, y, eps=eps, protocol=protocol, journal=journal, settings=settings
    )
    ours_s = ours["seconds"]
    report = {
        "standard": protocol.full,  # a version's own protocol (see "version")
        "version": protocol.version,
        "budget": {**protocol.asdict(), "text": protocol.describe()},
        "reference_from": args.reference_from
        and {"report": args.reference_from, "measured": ref["measured"]},
        "n": n,
        "subset": subset,
        "norm": args.norm,
        "eps": eps,
        "eps_text": args.eps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "workdir": os.path.abspath(args.workdir),
        "checkpoint": args.checkpoint,
        "step": int(run.step),
        "model": model_info(cfg),
        "logit_check": logit_check,
        "results": compare(ours, ref, protocol.attacks),
        "max_perturbation": {
            "ours": ours["max_perturbation"],
            "reference": ref["max_perturbation"],
        },
        "time_s": {
            "ours_total": ours_s,
            "ours_compile": ours["compile_seconds"],
            "ours_stages": ours["stage_seconds"],
            "reference_total": ref_s,
            "reference_stages": ref["stage_seconds"],
            "ratio_reference_over_ours": ref_s / ours_s,
            "reference_resumed_batches": ref["resumed_batches"],
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "experiments.aa_reference", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    write_outputs(out, report, ours, ref)
    shutil.rmtree(journal)  # the report holds everything it recorded
    return report


if __name__ == "__main__":
    main()
