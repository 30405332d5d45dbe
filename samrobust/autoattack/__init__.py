"""AutoAttack "standard" (Croce & Hein, ICML 2020, arXiv 2003.01690) in pure JAX, laid out
as the reference code (github.com/fra31/auto-attack): one module per attack.

- :mod:`~samrobust.autoattack.apgd`: APGD-CE and APGD-T (``autopgd_base.py``).
- :mod:`~samrobust.autoattack.fab`: FAB-T (``fab_pt.py``).
- :mod:`~samrobust.autoattack.square`: Square Attack (``square.py``).
- :mod:`~samrobust.autoattack.cascade`: :class:`Budget`, the stages and the one host-side
  cascade :func:`autoattack` (``autoattack.py``), with a pluggable runner
  (:mod:`~samrobust.autoattack.runners`) and a journal of finished batches
  (:mod:`~samrobust.autoattack.journal`).
- :mod:`~samrobust.autoattack.checks`: the reference's sanity checks (``checks.py``).
- :mod:`~samrobust.autoattack.base`: the per-example stage protocol the attacks share.

Deliberate differences from the reference are listed in each module's docstring;
randomised models (``version="rand"``, EOT) and the L1 versions are not implemented.
"""

from samrobust.autoattack.apgd import apgd, apgd_targeted
from samrobust.autoattack.cascade import (
    ATTACKS,
    STANDARD_ATTACKS,
    STANDARD_BUDGET,
    AutoAttackResult,
    Budget,
    autoattack,
    check_attacks,
    run_cascade,
)
from samrobust.autoattack.checks import sanity_checks
from samrobust.autoattack.fab import fab_targeted
from samrobust.autoattack.journal import Journal
from samrobust.autoattack.runners import Local, Sharded
from samrobust.autoattack.square import square_attack

__all__ = [
    "ATTACKS",
    "STANDARD_ATTACKS",
    "STANDARD_BUDGET",
    "AutoAttackResult",
    "Budget",
    "Journal",
    "Local",
    "Sharded",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "check_attacks",
    "run_cascade",
    "fab_targeted",
    "sanity_checks",
    "square_attack",
]
