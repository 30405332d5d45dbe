"""User errors through the real command lines: one ``error: ...`` line, exit code 2, no
traceback, and nothing lost."""

import os
import shutil
import subprocess

import pytest

from samrobust import errors
from tests.helpers import run_module


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == proc.stderr.strip().splitlines()[-1]  # the last thing said
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("errors") / "run")
    shutil.copytree(tiny_run, workdir)
    return workdir


def test_main_user_errors(tmp_path, finished):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    run = str(tmp_path / "run")
    cases = [
        (["--config.rhoo=0.1"], ["--config.rhoo: unknown config key 'rhoo'", 'Did you mean "rho"']),
        (["--config.rho=-1"], ["config.rho = -1.0: must be >= 0", "--config.rho=0.05"]),
        (["--config.attack.eps=nan"], ["config.attack.eps = nan: must be a finite number"]),
        (["--config.rho=abc"], ["--config.rho=abc", "could not convert"]),
        (
            ["--config.dataset=image_folder", f"--config.data_dir={tmp_path / 'none'}"],
            [f"--config.data_dir={tmp_path / 'none'} does not exist"],
        ),
    ]
    for flags, expected in cases:
        proc = run_module(
            "samrobust.main", "--config=configs/sam.py:digits", f"--workdir={run}", *flags
        )
        assert_one_line_error(proc, *expected)
    assert not os.path.exists(os.path.join(run, "checkpoints"))  # nothing was started

    proc = run_module("samrobust.main", "--config=configs/nope.py", f"--workdir={run}")
    assert_one_line_error(proc, "--config:", "No such file", "configs/nope.py")
    proc = run_module("samrobust.main", "--config=configs/sgd.py:digits", f"--workdir={a_file}")
    assert_one_line_error(proc, f"--workdir={a_file} is a file")
    assert a_file.read_text() == "not a directory"

    # A checkpoint of another config: named, kept, and the config mismatch in one line.
    before = sorted(os.listdir(os.path.join(finished, "checkpoints")))
    proc = run_module(
        "samrobust.main",
        "--config=configs/sgd.py:digits",
        f"--workdir={finished}",
        "--config.width=8",
    )
    assert_one_line_error(proc, "different config", "width: checkpoint 4 vs now 8", "new --workdir")
    assert sorted(os.listdir(os.path.join(finished, "checkpoints"))) == before


def test_evaluate_user_errors(tmp_path, finished):
    cases = [
        ([f"--workdir={tmp_path / 'missing'}"], ["does not exist"]),
        ([f"--workdir={finished}", "--checkpoint=newest"], ["--checkpoint: 'newest' is not"]),
        ([f"--workdir={finished}", "--checkpoint=best"], ["No best checkpoint", "eval_every"]),
        ([f"--workdir={finished}", "--checkpoint=3"], ["no checkpoint of step 3"]),
        ([f"--workdir={finished}", "--suite=autoattack", "--eps=8/0"], ["--eps"]),
        ([f"--workdir={finished}", "--suite=strong"], ["--suite", "paper"]),
        (
            [f"--workdir={finished}", "--suite=autoattack", "--attacks=apgd-ce,pgd"],
            ["--attacks", "distinct names of"],
        ),
        (
            [f"--workdir={finished}", "--suite=autoattack", "--version=plus", "--attacks=fab"],
            ["--version/--attacks", "version 'plus' runs", "use 'custom'"],
        ),
        ([f"--workdir={tmp_path / 'rb'}", "--torch_checkpoint=m.pt"], ["needs --dataset"]),
        (
            [
                f"--workdir={tmp_path / 'rb'}",
                f"--torch_checkpoint={tmp_path / 'm.pt'}",
                "--dataset=digits",
            ],
            ["--torch_checkpoint=", "does not exist"],
        ),
    ]
    for flags, expected in cases:
        assert_one_line_error(run_module("samrobust.evaluate", *flags), *expected)


def test_sweep_user_error_through_the_run_module(tmp_path):
    proc = run_module(
        "experiments.sweep", "--grid=smoke", f"--root={tmp_path}", "--dry_run", "--override=rh=1"
    )
    assert_one_line_error(proc, "unknown config key 'rh'")
    assert_one_line_error(
        run_module("experiments.sweep", "--grid=nope", f"--root={tmp_path}"), "--grid"
    )


def test_one_line_joins_lines():
    assert errors.one_line("a\n  b\n\nc") == "a; b; c"
