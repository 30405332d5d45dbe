"""Runs a grid of ``samrobust.main`` trainings (one subprocess and workdir per config and seed).

  python -m experiments.sweep --grid=digits --root=/tmp/digits --dry_run
  python -m experiments.sweep --grid=digits --root=/tmp/digits --seeds=3
  python -m experiments.sweep --grid=digits --root=/tmp/d --eval=autoattack --eval_flag=--unroll=1
  python -m experiments.sweep --grid=smoke --root=/tmp/s --eval=full --eval_flag=--num_examples=64
  python -m experiments.sweep --grid=paper_cifar10 --root=/data/c10 --override=data_dir=/data/tfds
  python -m experiments.sweep --grid=cifar10_cpu --root=R --seeds=2 --shard=$SLURM_ARRAY_TASK_ID/8
  python -m experiments.report --root=/tmp/digits

Grids are defined in ``experiments/grids.py`` (``paper_cifar10``, ``paper_cifar100``,
``cifar10_cpu``, ``cifar10_fast``, ``digits``, ``smoke``). Each run gets
``ROOT/<config>_s<seed>`` (e.g. ``sam_rho0.1_s0``) and its stdout/stderr go to
``ROOT/<run>/log.txt``. ``--root`` may be ``gs://bucket/dir`` (see ``samrobust.paths``); a
run's output then passes through the sweep, which appends it to ``log.txt`` every
``LOG_FLUSH_SECONDS`` and when the run ends. Runs are ordered seed by seed, so a
partial sweep already holds every config. A run with ``results.json`` is skipped (its
``config.json`` must match the grid's config); any other run is (re)started with the same
command, which resumes from its latest checkpoint. ``--eval=SUITE`` then runs
``python -m samrobust.evaluate --workdir=RUN --suite=SUITE`` on every trained run without
``RUN/eval_SUITE.json``. Before anything runs, every config is built exactly as
``samrobust.main`` builds it (``configs/<mode>.py`` + ``--config.*`` overrides through
ml_collections' config flags) and validated; ``--dry_run`` stops there and prints the
commands. Ctrl-C or SIGTERM (a scheduler's stop) is passed on to the current run, which saves a
checkpoint at its current step and exits; the sweep then exits with 128 + the signal. Re-run
the same command to continue. ``--shard=I/N`` runs only every N-th run of the grid starting at
the I-th (0-based), so that N machines or a SLURM array of N tasks share one grid and one
``--root``; each run's directory belongs to one shard.
"""

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, NoReturn

import ml_collections
from etils import epath

from experiments.grids import GRIDS, RunSpec
from samrobust import errors, paths
from samrobust.metrics import format_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FLUSH_SECONDS = 30.0  # how often a run's output is appended to a remote log.txt


def flag_value(value: Any) -> str:
    """A config value as a command-line flag value (floats round-trip exactly)."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Run:
    """One (config, seed) of a grid and its workdir."""

    spec: RunSpec
    seed: int
    root: str
    extra_overrides: tuple[str, ...] = ()  # "key=value" for every run

    @property
    def name(self) -> str:
        return f"{self.spec.name}_s{self.seed}"

    @property
    def path(self) -> epath.Path:
        return paths.path(self.root) / self.name

    @property
    def workdir(self) -> str:
        return os.fspath(self.path)

    def train_command(self) -> list[str]:
        """``python -m samrobust.main ...``, to run from the repository root."""
        overrides = [f"{k}={flag_value(v)}" for k, v in self.spec.overrides]
        overrides += [*self.extra_overrides, f"seed={self.seed}"]
        return [
            sys.executable,
            "-m",
            "samrobust.main",
            f"--config={self.spec.config}",
            f"--workdir={self.workdir}",
            *(f"--config.{o}" for o in overrides),
        ]

    def eval_command(self, suite: str, flags: Sequence[str] = ()) -> list[str]:
        return [
            sys.executable,
            "-m",
            "samrobust.evaluate",
            f"--workdir={self.workdir}",
            f"--suite={suite}",
            *flags,
        ]

    def trained(self) -> bool:
        return (self.path / "results.json").exists()

    def evaluated(self, suite: str, flags: Sequence[str] = ()) -> bool:
        return (self.path / f"{eval_stem(suite, flags)}.json").exists()

    def status(self) -> str:
        if self.trained():
            return "done"
        checkpoints = self.path / "checkpoints"
        has_step = checkpoints.is_dir() and any(d.name.isdigit() for d in checkpoints.iterdir())
        return "resume" if has_step else "new"


def expand(grid: str, root: str, seeds: int, extra_overrides: Sequence[str] = ()) -> list[Run]:
    """The runs of ``grid`` for seeds ``0..seeds-1`` (fewer for a spec that caps its
    ``seeds``), seed-major."""
    root = os.fspath(paths.path(root))
    return [
        Run(spec, seed, root, tuple(extra_overrides))
        for seed in range(seeds)
        for spec in GRIDS[grid]
        if spec.seeds is None or seed < spec.seeds
    ]


def run_name(command: Sequence[str]) -> str:
    """The run a ``samrobust.main`` command trains, named by its ``--workdir``."""
    workdir = next((a.split("=", 1)[1] for a in command if a.startswith("--workdir=")), "?")
    return f"run {epath.Path(workdir).name}"


def build_config(command: Sequence[str]) -> ml_collections.ConfigDict:
    """The config a ``samrobust.main`` command line trains, parsed as main parses it, validated.

    Raises ``ValueError`` naming the problem (unknown key, bad value, invalid config).
    """
    from absl import flags
    from ml_collections import config_flags

    from samrobust import config_check

    argv = [  # config files are relative to the repository root, as in the subprocess
        f"--config={os.path.join(REPO, a.split('=', 1)[1])}" if a.startswith("--config=") else a
        for a in command[2:]
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    try:
        flag_values(argv)
        config = flag_values.config
        config_check.validate_config(config, num_devices=1)
    except (KeyError, AttributeError) as e:  # ConfigDict's error for an unknown key
        raise ValueError(f"{run_name(command)}: {errors.unknown_key_message(e, argv)}") from e
    except (flags.Error, ValueError) as e:
        raise ValueError(f"{run_name(command)}: {errors.one_line(str(e))}") from e
    return config


def check_finished_config(run: Run, config: ml_collections.ConfigDict) -> list[str]:
    """Differences between a finished run's ``config.json`` and the grid's config."""
    from samrobust.checkpoint import config_mismatch

    path = run.path / "config.json"
    if not path.exists():
        return [f"{path} is missing"]
    return config_mismatch(json.loads(path.read_text()), config.to_dict())


class StoppedError(Exception):
    """The sweep got SIGTERM or SIGINT; the run it was running has stopped cleanly."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def copy_output(stream: IO[bytes], log: IO[bytes]) -> None:
    """Copies ``stream`` to ``log`` until it ends, flushing every ``LOG_FLUSH_SECONDS``."""
    flushed = time.monotonic()
    for line in stream:
        log.write(line)
        if time.monotonic() - flushed > LOG_FLUSH_SECONDS:
            log.flush()
            flushed = time.monotonic()
    log.flush()


def run_logged(command: Sequence[str], log_path: epath.Path) -> int:
    """Runs ``command`` from the repository root, appending its output to ``log_path``
    (local: the run writes to it; remote: through :func:`copy_output`).

    SIGTERM and SIGINT sent to the sweep are passed on to the run once (it saves a
    checkpoint at its current step and exits); then ``StoppedError`` is raised.
    """
    received: list[int] = []
    local = paths.is_local(log_path)
    with paths.open_append(log_path) as log:
        header = f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n"
        log.write(header.encode())
        log.flush()
        # Its own session: a terminal's Ctrl-C reaches only the sweep, which forwards it.
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log if local else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def forward(signum: int, frame: Any) -> None:
            del frame
            if not received:
                received.append(signum)
                print(f"received {signal.Signals(signum).name}: stopping the current run")
                proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not local:
                copy_output(proc.stdout, log)
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if received:
        raise StoppedError(received[0])
    return rc


def eval_stem(suite: str, flags: Sequence[str]) -> str:
    """The report stem ``samrobust.evaluate --suite=SUITE FLAGS`` writes, e.g.
    ``eval_autoattack_linf_2_255_sub1000`` (ValueError for a bad --eps, --checkpoint, budget or
    --num_examples)."""
    from samrobust import attacks, reports, runs
    from samrobust.autoattack import Budget

    opts = dict(f.removeprefix("--").partition("=")[::2] for f in flags)
    checkpoint = runs.parse_checkpoint(opts.get("checkpoint", "latest"))
    eps = attacks.parse_eps(opts["eps"]) if opts.get("eps") else None
    budget_opts = {k: opts[k] for k in ("n_iter", "n_target_classes", "n_queries") if k in opts}
    for k, v in budget_opts.items():
        if not v.isdigit():
            raise ValueError(f"--{k}={v}: expected a whole number, e.g. --{k}=10")
    budget = Budget(**{k: int(v) for k, v in budget_opts.items()})
    num_examples = opts.get("num_examples", "-1")
    if not num_examples.lstrip("-").isdigit():
        raise ValueError(f"--num_examples={num_examples}: expected a whole number, e.g. 1000")
    return reports.report_stem(
        suite, checkpoint, opts.get("norm") or None, eps, budget, int(num_examples)
    )


def log_tail(log_path: epath.Path, lines: int = 15) -> str:
    return "".join(log_path.read_text().splitlines(keepends=True)[-lines:])


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error: ...`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        errors.fail(f"{message} (see python -m experiments.sweep --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", required=True, choices=sorted(GRIDS))
    p.add_argument("--root", required=True, help="directory holding one workdir per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every config")
    p.add_argument("--dry_run", action="store_true", help="build and validate; train nothing")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/N: run only the I-th (0-based) of N interleaved slices of the grid, e.g. "
        "--shard=$SLURM_ARRAY_TASK_ID/8 in a SLURM array of 8",
    )
    p.add_argument("--eval", help="after training: samrobust.evaluate --suite=EVAL per run")
    p.add_argument(
        "--eval_flag",
        action="append",
        default=[],
        help="extra flag for samrobust.evaluate, repeatable (e.g. --eval_flag=--num_examples=100)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="KEY=VALUE: --config.KEY=VALUE for every run, repeatable (e.g. data_dir=/data)",
    )
    args = p.parse_args(argv)
    if args.eval:
        try:
            eval_stem(args.eval, args.eval_flag)
        except ValueError as e:
            p.error(f"--eval_flag: {e}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    for o in args.override:
        if "=" not in o:
            p.error(f"--override={o}: expected KEY=VALUE")
    try:
        args.shard_index, args.shard_count = (int(x) for x in args.shard.split("/"))
    except ValueError:
        p.error(f"--shard={args.shard}: expected I/N, e.g. --shard=0/4")
    if not 0 <= args.shard_index < args.shard_count:
        p.error(f"--shard={args.shard}: I must be in [0, N), e.g. --shard=0/{args.shard_count}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs (or with ``--dry_run`` prints) the sweep; returns the exit status."""
    args = parse_args(argv)
    runs = expand(args.grid, args.root, args.seeds, args.override)
    runs = runs[args.shard_index :: args.shard_count]
    if not runs:
        print(f"--shard={args.shard}: this slice of grid {args.grid!r} has no runs; nothing to do")
        return 0
    n = len(runs)
    try:
        configs = [build_config(run.train_command()) for run in runs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_USER_ERROR
    mismatched = {
        run.name: diff
        for run, config in zip(runs, configs, strict=True)
        if run.trained() and (diff := check_finished_config(run, config))
    }
    if mismatched:
        name, diff = next(iter(mismatched.items()))
        print(
            f"error: {len(mismatched)} finished runs in {args.root} were made under another "
            f"config (first: {name}: {'; '.join(diff)}); use another --root, or the grid and "
            "--override values those runs were made with",
            file=sys.stderr,
        )
        return errors.EXIT_USER_ERROR

    if args.dry_run:
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{n}] {run.name} ({run.status()})\n  {shlex.join(run.train_command())}")
            if args.eval:
                print(f"  {shlex.join(run.eval_command(args.eval, args.eval_flag))}")
        counts = {s: sum(r.status() == s for r in runs) for s in ("done", "resume", "new")}
        print(
            f"{n} runs of grid {args.grid!r} built and validated: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
        )
        return 0

    return execute(runs, args.grid, args.eval, args.eval_flag)


def execute(runs: Sequence[Run], grid: str, suite: str | None, eval_flags: Sequence[str]) -> int:
    """Trains (and evaluates) every unfinished run in order, one subprocess at a time.

    The ETA charges each remaining run the time its config took for an earlier seed, or
    else the mean time per run so far.
    """

    def pending(run: Run) -> bool:
        return not run.trained() or bool(suite and not run.evaluated(suite, eval_flags))

    n = len(runs)
    paths.path(runs[0].root).mkdir(parents=True, exist_ok=True)
    todo = sum(map(pending, runs))
    print(f"Sweep {grid!r}: {n} runs in {runs[0].root}, {todo} to run, {n - todo} done")
    start, worked, failed = time.perf_counter(), 0, []
    seconds: dict[str, float] = {}  # config name -> time of its latest run
    try:
        for i, run in enumerate(runs, 1):
            if not pending(run):
                print(f"[{i}/{n}] {run.name}: done, skipped")
                continue
            t0 = time.perf_counter()
            if not run_one(run, f"[{i}/{n}]", suite, eval_flags):
                failed.append(run.name)
            worked += 1
            seconds[run.spec.name] = time.perf_counter() - t0
            elapsed = time.perf_counter() - start
            eta = sum(seconds.get(r.spec.name, elapsed / worked) for r in runs[i:] if pending(r))
            print(
                f"[{i}/{n}] {run.name}: took {format_seconds(seconds[run.spec.name])} | "
                f"elapsed {format_seconds(elapsed)} | ETA {format_seconds(eta)}",
                flush=True,
            )
    except KeyboardInterrupt:
        print("Interrupted. Re-run the same command to resume.")
        return 130
    except StoppedError as e:
        print(f"Stopped by {e}; the run saved a checkpoint. Re-run the same command to resume.")
        return e.exit_code
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}. Re-run the same command to retry.")
        return 1
    print(f"Sweep {grid!r} complete in {format_seconds(time.perf_counter() - start)}.")
    return 0


def run_one(run: Run, tag: str, suite: str | None, eval_flags: Sequence[str]) -> bool:
    """Trains ``run`` unless finished, then evaluates it unless evaluated; False on failure."""
    run.path.mkdir(parents=True, exist_ok=True)
    log = run.path / "log.txt"
    steps = []
    if not run.trained():
        steps.append(("training" if run.status() == "new" else "resuming", run.train_command()))
    if suite and not run.evaluated(suite, eval_flags):
        steps.append((f"eval {suite}", run.eval_command(suite, eval_flags)))
    for what, command in steps:
        print(f"{tag} {run.name}: {what} (log: {log})", flush=True)
        rc = run_logged(command, log)
        if rc:
            print(f"{tag} {run.name}: {what} FAILED (exit {rc}); end of log:")
            print(log_tail(log), end="")
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
