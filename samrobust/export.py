"""A training run for RobustBench, the command line::

  python -m samrobust.export --workdir=RUN --out=DIR [--checkpoint=latest|best|STEP]
      [--name=NAME] [--dataset=cifar10|cifar100] [--norm=linf|l2] [--eps=8/255]
      [--num_examples=N] [--weights_only]

writes ``DIR/NAME.pt``, the checkpoint's weights (the weight average where the run kept
one) as a PyTorch ``state_dict`` that RobustBench's own classes load
(:data:`samrobust.torch_weights.ROBUSTBENCH_CLASSES`: PreActResNet-18 at width 64 and the
WideResNets, trained with ``--config.padding=torch``; the input normalisation as their
``mu``/``sigma`` buffers), and ``DIR/model_info/<dataset>/<Linf|L2>/NAME.json``, the record
RobustBench's ``benchmark(..., to_disk=True)`` writes, filled from the run's AutoAttack
report of that checkpoint (``samrobust.evaluate --suite=autoattack``; ``--norm``/``--eps``
pick it, default Linf 8/255; ``--num_examples=N`` one on the N-point evaluation subset
instead of the whole test split). Without that report the export stops with the command
that writes it; ``--weights_only`` writes the weights alone. ``NAME`` defaults to the
workdir's name, ``--dataset`` (RobustBench's name of the data) to the run's when it is one
of RobustBench's. Nothing is written to the run's workdir.
"""

import json
from collections.abc import Sequence

from absl import flags, logging

from samrobust import attacks, errors, paths, reports, robustness, runs, torch_weights
from samrobust.checkpoint import quiet_orbax
from samrobust.errors import UserError

FLAGS = flags.FLAGS
DATASETS = {"cifar10": 10, "cifar100": 100}  # RobustBench's datasets: their classes


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The command line's flags, on ``flag_values``."""
    flags.DEFINE_string(
        "workdir", None, "Training run (of samrobust.main) to export.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "out", None, "Where NAME.pt and model_info/ go (local or gs://).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "checkpoint",
        "latest",
        "Which checkpoint: latest, best or a step number.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "name", None, "The model's name (default: the workdir's).", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "dataset",
        None,
        tuple(DATASETS),
        "RobustBench's name of the run's data (default: the run's dataset, if one of these).",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "norm", "linf", attacks.NORMS, "The AutoAttack report's norm.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "eps",
        None,
        "The AutoAttack report's radius (default: Linf 8/255, L2 0.5).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_examples",
        -1,
        "Take the AutoAttack report on the N-point evaluation subset (-1: the whole split).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "weights_only", False, "Write the weights without model_info.", flag_values=flag_values
    )
    flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def _report(workdir: str, checkpoint: str | int, eps: float) -> dict | None:
    """The run's standard AutoAttack report the flags name; ``None`` with --weights_only."""
    if FLAGS.weights_only:
        return None
    stem = reports.report_stem(
        "autoattack", checkpoint, FLAGS.norm, eps, num_examples=FLAGS.num_examples
    )
    path = paths.path(workdir) / f"{stem}.json"
    if not path.is_file():
        subset = "" if FLAGS.num_examples == -1 else f" --num_examples={FLAGS.num_examples}"
        raise UserError(
            f"{path} not found: model_info needs the checkpoint's AutoAttack report. Write it "
            f"with python -m samrobust.evaluate --workdir={workdir} --checkpoint="
            f"{FLAGS.checkpoint} --suite=autoattack --norm={FLAGS.norm} "
            f"--eps={attacks.format_eps(eps)}{subset}, or pass --weights_only"
        )
    return json.loads(path.read_text())


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    try:
        checkpoint = runs.parse_checkpoint(FLAGS.checkpoint)
        eps = (
            robustness.DEFAULT_EPS[FLAGS.norm]
            if FLAGS.eps is None
            else attacks.parse_eps(FLAGS.eps)
        )
    except ValueError as e:
        raise UserError(f"--checkpoint/--eps: {e}") from None
    try:
        import torch  # noqa: F401  (torch_weights.save writes the file with it)
    except ImportError:
        raise UserError("export writes a PyTorch file: pip install -e '.[reference]'") from None
    config = runs.run_config(FLAGS.workdir)
    problem = torch_weights.export_problem(config)
    if problem:
        raise UserError(f"--workdir={FLAGS.workdir} cannot go to RobustBench: {problem}")
    dataset = FLAGS.dataset or config["dataset"]
    if dataset not in DATASETS:
        raise UserError(
            f"--dataset: the run trained on {config['dataset']}; name RobustBench's dataset "
            f"it is ({', '.join(DATASETS)})"
        )
    report = _report(FLAGS.workdir, checkpoint, eps)
    quiet_orbax()
    run = runs.load_run(FLAGS.workdir, checkpoint=checkpoint)
    if run.dataset.num_classes != DATASETS[dataset]:
        raise UserError(
            f"--dataset={dataset} has {DATASETS[dataset]} classes, the run "
            f"{run.dataset.num_classes}"
        )
    if report is not None and report["run"]["step"] != run.step:
        raise UserError(
            f"the AutoAttack report is of step {report['run']['step']}, the checkpoint is step "
            f"{run.step}: evaluate this checkpoint again (samrobust.evaluate --suite=autoattack)"
        )
    name = FLAGS.name or paths.path(FLAGS.workdir).name
    out = paths.path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = torch_weights.to_state_dict(run.variables, run.dataset.mean, run.dataset.std)
    torch_weights.save(state_dict, out / f"{name}.pt")
    logging.info(
        "wrote %s: step %d (%s weights) for RobustBench's %s",
        out / f"{name}.pt",
        run.step,
        run.weights,
        torch_weights.ROBUSTBENCH_CLASSES[config["model"]][0],
    )
    if report is not None:
        threat = torch_weights.THREAT_MODELS[FLAGS.norm]
        info = out / "model_info" / dataset / threat / f"{name}.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps(torch_weights.model_info(report, name, dataset), indent=2))
        logging.info("wrote %s", info)


if __name__ == "__main__":
    define_flags()
    errors.run(main)
