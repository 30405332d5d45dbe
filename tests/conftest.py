"""Test setup: 8 fake CPU devices for the data-parallel tests.

XLA reads ``XLA_FLAGS`` once, when the backend starts, so this must run before anything
imports jax. pytest imports this file before the test modules. The backend starts on
jax's first operation, not on import, so the shared fixtures below may import jax once the
flag is set.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()

from samrobust import parallel  # noqa: E402

parallel.set_xla_cpu_defaults()  # the CPU settings the command lines use

from tests.toy_models import linear5, mlp  # noqa: E402, F401  (fixtures of the attack tests)
