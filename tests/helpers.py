"""Shared test helpers: running ``samrobust.main`` in a subprocess and reading its outputs."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps of a tiny PreActResNet on digits: seconds per run.
TINY = [
    "--config.width=4",
    "--config.num_epochs=1",
    "--config.batch_size=64",
    "--config.eval_batch_size=64",
    "--config.eval_num_examples=64",
    "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=5",
    "--config.attack.steps=2",
    "--config.eval_pgd_steps=2",
]


def main_command(config: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "samrobust.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]


def subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_main(
    config: str,
    workdir: str,
    *overrides: str,
    devices: int = 1,
    check: bool = True,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        main_command(config, workdir, *overrides),
        cwd=REPO,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_main(config: str, workdir: str, *overrides: str, stderr=subprocess.DEVNULL):
    """``samrobust.main`` started in the background (1 device); stdout discarded."""
    return subprocess.Popen(
        main_command(config, workdir, *overrides),
        cwd=REPO,
        env=subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def run_module(
    module: str, *args: str, devices: int = 1, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, output captured (no check)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(command: list[str], timeout: float = 600) -> None:
    """``command`` as processes 0 and 1 of a 2-process JAX job on 127.0.0.1; both must
    succeed."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *command,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=subprocess_env(1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-4000:]


def read_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def load_checkpoint(workdir: str, step: int | None = None) -> dict:
    """The saved train state at ``step`` (default: latest) as a dict of numpy arrays."""
    import jax

    from samrobust.checkpoint import read_state

    _, state = read_state(workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]), step)
    return jax.tree.map(np.asarray, state)
