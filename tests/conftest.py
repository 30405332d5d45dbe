"""Test setup: 8 fake CPU devices for the data-parallel tests, and one JAX compilation
cache for the whole session.

XLA reads ``XLA_FLAGS`` once, when the backend starts, so this must run before anything
imports jax. pytest imports this file before the test modules. The backend starts on
jax's first operation, not on import, so the shared fixtures below may import jax once the
flag is set.

Most of a tiny ``samrobust.main`` run is XLA compilation (``model.init`` alone ~25 s on
CPU), and the end-to-end tests start dozens of them with the same shapes: a persistent
compilation cache (``JAX_COMPILATION_CACHE_DIR``, inherited by every subprocess) compiles
each program once per session. The cache starts empty and is removed at the session's
end: nothing compiled by an earlier session (or another jax) is ever loaded.
"""

import os
import shutil
import tempfile

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()

_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")

from samrobust import parallel  # noqa: E402

parallel.set_xla_cpu_defaults()  # the CPU settings the command lines use

import pytest  # noqa: E402

from tests.helpers import TINY_RUN, built_once, run_main  # noqa: E402
from tests.toy_models import linear5, mlp  # noqa: E402, F401  (fixtures of the attack tests)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """One finished tiny SGD digits run (``TINY_RUN``: 22 steps, every checkpoint kept) for
    every module that only reads one: copy it before changing it."""
    return built_once(
        tmp_path_factory, "tiny", lambda w: run_main("configs/sgd.py:digits", w, *TINY_RUN)
    )


def pytest_collection_modifyitems(session, config, items):
    """Every worker starts on the slow tests and ends on the quick ones: pytest-xdist's
    worksteal hands each worker a contiguous share of this order, and an idle worker steals
    from the end of another's share. Here share w is the w-th n-th of the slow tests, then the
    w-th n-th of the quick ones (contiguous, so tests that share a module fixture mostly stay
    on one worker), and no worker is left alone with a five-minute test at the end."""
    n = getattr(config, "workerinput", {}).get("workercount", 1)
    slow = [item for item in items if item.get_closest_marker("slow")]
    quick = [item for item in items if not item.get_closest_marker("slow")]

    def part(tests: list, w: int) -> list:
        return tests[w * len(tests) // n : (w + 1) * len(tests) // n]

    items[:] = [item for w in range(n) for item in (*part(slow, w), *part(quick, w))]


def pytest_sessionfinish(session, exitstatus):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
