"""The model zoo's policy (docs/results.md): only the final checkpoint of each committed run,
each under 5 MB, all under 64 MB."""

import collections
import json
import os
import re
import subprocess

import pytest

from tests.helpers import REPO

CHECKPOINT_MB, ZOO_MB = 5, 64


def tracked_checkpoints() -> dict[str, dict[int, int]]:
    """Run directory -> {tracked checkpoint step: bytes}."""
    try:
        files = (
            subprocess.run(
                ["git", "ls-files", "-z", "experiments/results"],
                cwd=REPO,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    runs: dict[str, dict[int, int]] = collections.defaultdict(collections.Counter)
    for f in filter(None, files):
        m = re.match(r"(.*)/(checkpoints[^/]*)/([^/]+)/", f)
        if m:
            assert m.group(2) == "checkpoints", f"{f}: only the latest checkpoints are kept"
            assert m.group(3).isdigit(), f"{f}: a checkpoint step's directory only"
            runs[m.group(1)][int(m.group(3))] += os.path.getsize(os.path.join(REPO, f))
        assert "_journal/" not in f, f"{f}: evaluation journals are not kept"
    return runs


def test_zoo_keeps_only_final_checkpoints_within_its_size_budget():
    runs = tracked_checkpoints()
    assert runs, "the zoo is empty: the results pages name runs whose checkpoints are gone"
    for run, steps in runs.items():
        results = json.load(open(os.path.join(REPO, run, "results.json")))
        assert list(steps) == [results["total_steps"]], f"{run}: keep the final step only"
        assert sum(steps.values()) < CHECKPOINT_MB * 2**20, f"{run}: checkpoint over budget"
    total = sum(sum(s.values()) for s in runs.values())
    assert total < ZOO_MB * 2**20, f"the zoo is {total / 2**20:.1f} MB"
