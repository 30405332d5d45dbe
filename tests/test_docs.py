"""The README and docs/ cannot rot: every command they show runs (as a dry run, or at tiny
scale) and every Python example executes.

A fenced ``bash`` block's lines (``\\`` continuations joined, ``&&`` chains split) are
checked by what they call, and so is every inline ``python -m ...`` that is not a
synopsis (``[--flag]``, ``=RUN``): ``samrobust.main`` with ``--dry_run`` (the config file, every
override and the validation, against the device count), ``samrobust.evaluate`` through its
own flag parsing and checks, ``experiments.sweep --dry_run`` for real and the other
experiment scripts through their argument parsers, shell scripts with ``bash -n``.
Fenced ``python`` blocks run in this process (a failure raises). Install lines (venv, pip)
are CI's business; the README's test command must be the one ``.ci/run`` runs.
"""

import glob
import importlib
import os
import re
import shlex
import subprocess

import pytest
from absl import flags

from samrobust import evaluate, export, main, robustness
from tests.helpers import REPO

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
SKIPPED = (
    "python3 -m venv",
    "pip ",
    ". .venv/bin/activate",
    "ruff ",
    "python -m pytest",
    "tensorboard ",
)


def blocks(language: str) -> list[tuple[str, str]]:
    """(document, code) of every fenced block in ``language``, indented ones included."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(REPO, doc)).read()
        for m in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", text, re.M | re.S):
            code = "\n".join(line[len(m.group(1)) :] for line in m.group(2).splitlines())
            found.append((doc, code))
    return found


def synopsis(command: str) -> bool:
    """Whether an inline command is a synopsis (``[--flag]``, ``=RUN``, ``...``) or a bare
    mention of a script rather than a command to run."""
    return bool(re.search(r"\[|\.\.\.|=[A-Z]+\b|\bNAME\b", command)) or len(command.split()) < 4


def commands() -> list[tuple[str, str]]:
    """(document, command) of every command line in the docs' bash blocks, and of every
    inline ``python -m ...`` that is not a synopsis."""
    found = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", open(os.path.join(REPO, doc)).read(), flags=re.S)
        for m in re.finditer(r"`(python -m [^`]+)`", text.replace("\n", " ")):
            if not synopsis(m.group(1)) and not m.group(1).startswith(SKIPPED):
                found.append((doc, " ".join(m.group(1).split())))
    for doc, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split(" && "):
                if not part.startswith(SKIPPED):
                    found.append((doc, part.strip()))
    return found


def check_main(argv: list[str]) -> None:
    fv = flags.FlagValues()
    argv = ["samrobust.main", *argv, "--dry_run"]
    main.define_flags(fv, argv)
    fv(argv)
    from samrobust import config_check

    config_check.validate_config(fv.config, fv.cpu_devices or 1)


def check_evaluate(argv: list[str]) -> None:
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["samrobust.evaluate", *argv])
    s = evaluate.settings(fv)
    robustness.check_settings(
        fv.suite, s.eps, fv.norm, fv.batch_size or 256, fv.cpu_devices or 1, s.attacks
    )


def check(command: str) -> None:
    tokens = shlex.split(os.path.expandvars(command))
    if tokens[0] == "bash":
        subprocess.run(["bash", "-n", tokens[1]], cwd=REPO, check=True)
        return
    assert tokens[:2] == ["python", "-m"], f"not a command the docs test knows: {command}"
    module, argv = tokens[2], tokens[3:]
    if module == "samrobust.main":
        check_main(argv)
    elif module == "samrobust.evaluate":
        check_evaluate(argv)
    elif module == "samrobust.export":
        fv = flags.FlagValues()
        export.define_flags(fv)
        fv(["samrobust.export", *argv])
    elif module == "experiments.sweep" and "--dry_run" in argv:
        from experiments import sweep

        assert sweep.main(argv) == 0
    else:
        importlib.import_module(module).parse_args(argv)


@pytest.mark.parametrize("doc, command", commands(), ids=lambda x: x[:60])
def test_every_command_in_the_docs_runs(doc, command, monkeypatch):
    monkeypatch.chdir(REPO)  # config files are relative to the repository root
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # the SLURM example's array index
    check(command)


def test_the_readme_test_command_is_what_ci_runs():
    ci = open(os.path.join(REPO, ".ci/run")).read().strip().splitlines()[-1]
    assert ci in [code.strip() for doc, code in blocks("bash") if doc == "README.md"]


@pytest.mark.parametrize("doc, code", blocks("python"), ids=lambda x: x[:40])
def test_every_python_example_in_the_docs_runs(doc, code, monkeypatch):
    monkeypatch.chdir(REPO)
    exec(compile(code, doc, "exec"), {"__name__": "__docs__"})  # raises if the example fails
