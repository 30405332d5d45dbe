"""Entry point: ``python -m samrobust.main --config=configs/sam.py:digits --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.rho=0.1 --config.attack.eps=0.0157``;
``--dry_run`` validates the config (every value, against the device count) and prints it
without loading data or training.
On a CPU, ``--cpu_devices=N`` (one per core) trains data-parallel over the cores, faster than
one device at CIFAR shapes. On several processes (TPU pods, or ``--num_processes`` with a
coordinator), JAX's distributed runtime is initialised first; every process runs this same
command.

Exit codes: 0 done; 2 a user error (one ``error: ...`` line on stderr: config, data,
checkpoint, a workdir held by another process); 143 / 130 stopped by SIGTERM / SIGINT after
saving a checkpoint at the current step (run the same command to resume); 1 a bug.
"""

import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from samrobust import checkpoint, config_check, errors, parallel, train
from samrobust.preemption import PreemptedError

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> None:
    """The command line's flags, on ``flag_values``; ``argv`` (default ``sys.argv``) names
    the config overrides to accept."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Training config file.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Directory for checkpoints, metrics and results.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "dry_run", False, "Validate and print the config; do not train.", flag_values=flag_values
    )
    parallel.define_runtime_flags(flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(argv):
    del argv
    checkpoint.quiet_orbax()
    parallel.initialize_runtime()
    if FLAGS.dry_run:
        config_check.validate_config(FLAGS.config, jax.device_count())
        print(FLAGS.config)
        logging.info("config valid for %d devices; --dry_run: not training", jax.device_count())
        return
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except PreemptedError as e:
        logging.warning("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    define_flags()
    errors.run(main)
