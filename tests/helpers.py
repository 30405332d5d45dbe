"""Shared test helpers: running ``samrobust.main`` in a subprocess and reading its outputs."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable

import numpy as np
from filelock import FileLock
from PIL import Image

from experiments.gcs_emulator import free_port

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
# For tests of training itself, where the final evaluation is not what is tested: PGD with 0
# steps (clean and random-start accuracies) compiles no attack, a quarter of a tiny run.
TINY_TRAIN = [*TINY, "--config.eval_pgd_steps=0"]
# The shared tiny run (``conftest.tiny_run``): 22 steps, a checkpoint every 5 and at 22, all kept.
TINY_RUN = [*TINY, "--config.keep_checkpoints=20"]


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


def run_two_processes(command: list[str], timeout: float = 600) -> str:
    """``command`` as processes 0 and 1 of a 2-process JAX job on 127.0.0.1; both must
    succeed. Returns process 0's stderr."""
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
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-4000:]
        errs.append(err)
    return errs[0]


def read_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def load_checkpoint(workdir: str, step: int | None = None) -> dict:
    """The saved train state at ``step`` (default: latest) as a dict of numpy arrays."""
    import jax

    from samrobust.checkpoint import read_state

    _, state = read_state(workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]), step)
    return jax.tree.map(np.asarray, state)


# --- image folders -----------------------------------------------------------------------

CLASSES = ("cat", "airplane", "dog")  # sorted: airplane=0, cat=1, dog=2


def image(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def seed_of(split: str, c: int, i: int) -> int:
    return 1000 * (split == "test") + 100 * c + i


def write_folder(root, per_class=(6, 2), size: int = 8) -> dict:
    """A tiny image folder, PNG for even and JPEG for odd files; returns the PNG pixels by
    (split, class, index)."""
    pixels = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                array = image(seed_of(split, c, i), size)
                if i % 2 == 0:
                    Image.fromarray(array).save(folder / f"{i:03d}.png")
                    pixels[split, cls, i] = array
                else:
                    Image.fromarray(array).save(folder / f"{i:03d}.jpg", quality=95)
    return pixels


CIFAR10_JPEG = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")


def extract_slice(archive: str, root, per_class: dict[str, int]) -> None:
    """The first ``per_class[split]`` images of every class of ``archive`` into ``root``."""
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.lstrip("./").split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls, name = parts[-3:]
            if taken.get((split, cls), 0) < per_class.get(split, 0):
                taken[split, cls] = taken.get((split, cls), 0) + 1
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                (root / split / cls / name).write_bytes(tar.extractfile(member).read())


def train_on_cifar10_slice(tmp_path, config: str, *overrides: str) -> dict:
    """``samrobust.main --config=CONFIG`` on 100 train and 20 test images per class of the
    shared CIFAR-10 JPEG copy (``CIFAR10_JPEG``), extracted under ``tmp_path``; its results."""
    root = tmp_path / "cifar10_slice"
    extract_slice(CIFAR10_JPEG, root, {"train": 100, "test": 20})
    workdir = str(tmp_path / "run")
    data = ["--config.dataset=image_folder", f"--config.data_dir={root}"]
    run_main(config, workdir, *data, f"--config.cache_dir={tmp_path / 'cache'}", *overrides)
    return read_results(workdir)


def load_folder(root, tmp_path, **kw):
    """``input_pipeline.load`` of the image folder ``root``, cached under ``tmp_path``."""
    from samrobust import input_pipeline

    return input_pipeline.load("image_folder", str(root), cache_dir=str(tmp_path / "cache"), **kw)


def digits_config(module=None, **overrides):
    """A small digits config of ``module`` (default ``configs/sgd.py``) with overrides by
    dotted key."""
    from configs import sgd as sgd_config

    config = (module or sgd_config).get_config("digits")
    config.width = 4
    config.num_epochs = 1
    config.batch_size = 64
    config.eval_batch_size = 64
    config.eval_num_examples = 64
    config.eval_pgd_steps = 1
    config.attack.steps = 1
    for k, v in overrides.items():
        target = config
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return config


def built_once(tmp_path_factory, name: str, build: Callable[[str], None]) -> str:
    """``<dir>/run``, built by ``build(path)`` once per test session, across pytest-xdist's
    workers too: the first worker to ask builds it under a file lock, the others wait and
    share it (read-only: copy it before changing it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's, shared by its workers
    folder = root / f"built-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(str(folder / "run"))
            (folder / "done").touch()
    return str(folder / "run")
