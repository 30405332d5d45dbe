"""Entry point: ``python -m samrobust.main --config=configs/sam.py:digits --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.rho=0.1 --config.attack.eps=0.0157``.
On a CPU, ``--cpu_devices=N`` (one per core) trains data-parallel over the cores, faster than
one device at CIFAR shapes. On several processes (TPU pods, or ``--num_processes`` with a
coordinator), JAX's distributed runtime is initialised first; every process runs this same
command.

Exit codes: 0 done; 2 a user error (one ``error: ...`` line on stderr: config, data,
checkpoint, a workdir held by another process); 143 / 130 stopped by SIGTERM / SIGINT after
saving a checkpoint at the current step (run the same command to resume); 1 a bug.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from samrobust import checkpoint, errors, parallel, train
from samrobust.preemption import PreemptedError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
parallel.define_runtime_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    checkpoint.quiet_orbax()
    parallel.initialize_runtime()
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except PreemptedError as e:
        logging.warning("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    errors.run(main)
