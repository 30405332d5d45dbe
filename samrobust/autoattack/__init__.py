"""AutoAttack "standard", "plus" and custom versions (Croce & Hein, ICML 2020, arXiv
2003.01690) in pure JAX, laid out as the reference code (github.com/fra31/auto-attack):
one module per attack.

- :mod:`~samrobust.autoattack.apgd`: APGD-CE and APGD-T (``autopgd_base.py``).
- :mod:`~samrobust.autoattack.fab`: FAB-T and untargeted FAB (``fab_pt.py``).
- :mod:`~samrobust.autoattack.square`: Square Attack (``square.py``).
- :mod:`~samrobust.autoattack.cascade`: :class:`Budget`, the stages and the one host-side
  cascade :func:`autoattack` (``autoattack.py``), with a pluggable runner
  (:mod:`~samrobust.autoattack.runners`) and a journal of finished batches
  (:mod:`~samrobust.autoattack.journal`).
- :mod:`~samrobust.autoattack.checks`: the reference's sanity checks (``checks.py``).
- :mod:`~samrobust.autoattack.base`: the per-example stage protocol the attacks share.

Deliberate differences from the reference are listed in each module's docstring;
the L1 versions are not implemented. A model random at test time is a
:class:`~samrobust.autoattack.base.RandomizedModel` (``fn(x, key)``), attacked by
``version="rand"``: APGD-CE and APGD-DLR with gradients averaged over 20 draws (EOT).

  result = autoattack(jax.tree_util.Partial(apply_fn, variables), x, y, key,
                      eps=8 / 255, norm="linf", version="plus")
"""

from samrobust.autoattack.apgd import apgd, apgd_targeted
from samrobust.autoattack.base import RandomizedModel
from samrobust.autoattack.cascade import (
    ATTACKS,
    PLUS_ATTACKS,
    PLUS_BUDGET,
    RAND_ATTACKS,
    RAND_BUDGET,
    STANDARD_ATTACKS,
    STANDARD_BUDGET,
    VERSIONS,
    AutoAttackResult,
    Budget,
    autoattack,
    budget_key,
    check_attacks,
    resolve_version,
    run_cascade,
    version_budget,
    version_of,
)
from samrobust.autoattack.checks import sanity_checks
from samrobust.autoattack.fab import fab, fab_targeted
from samrobust.autoattack.journal import Journal
from samrobust.autoattack.runners import Local, Sharded
from samrobust.autoattack.square import square_attack

__all__ = [
    "ATTACKS",
    "PLUS_ATTACKS",
    "PLUS_BUDGET",
    "RAND_ATTACKS",
    "RAND_BUDGET",
    "RandomizedModel",
    "STANDARD_ATTACKS",
    "STANDARD_BUDGET",
    "VERSIONS",
    "AutoAttackResult",
    "Budget",
    "Journal",
    "Local",
    "Sharded",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "budget_key",
    "check_attacks",
    "fab",
    "fab_targeted",
    "resolve_version",
    "run_cascade",
    "version_budget",
    "version_of",
    "sanity_checks",
    "square_attack",
]
