"""The AutoAttack cascade (the reference's ``autoattack/autoattack.py``): one host-side
driver, a pluggable runner (one device, or sharded over a mesh).

Standard: APGD-CE -> APGD-T -> FAB-T -> Square (:data:`STANDARD_ATTACKS`, budget
:class:`Budget`: 100 iterations, 9 target classes, 5000 queries, one run of each untargeted
attack). Plus: APGD-CE -> APGD-DLR -> FAB -> Square -> APGD-T -> FAB-T
(:data:`PLUS_ATTACKS`, :data:`PLUS_BUDGET`: 5 restarts of APGD-CE, APGD-DLR and FAB).
Each attack runs only on the points still robust; a point is robust only if it is correctly
classified and *every* attack failed.
Every returned point is accepted only by :func:`samrobust.attacks.is_adversarial`
(misclassified, within ``eps + VALID_TOL``, inside ``[0, 1]``, finite); refused ones are
counted. The largest accepted perturbation is verified at the end.

How the work is laid out (:func:`autoattack`):

- Every run of an attack (a restart or a target class) takes the points still robust,
  in batches of at most ``batch_size``; a batch's size is the device count times the
  smallest size of a ladder with four steps per octave (..., 128, 160, 192, 224, 256)
  that holds its points, so few shapes compile and at most a quarter of the rows are
  padding.
- Every ``stage.segment`` iterations the driver reads which points are fooled; when the
  points left fit half the batch, the fooled ones are harvested and the rest repacked
  (``compact=True``). Every field of an attack's state is per example and every random
  draw comes from the example's own key, so this changes no point's result:
  ``compact=False`` (fixed batches, every run to its end) returns the same robust set.
- On XLA:CPU the iterations are driven from Python, ``unroll`` steps per jitted call
  (XLA:CPU runs a convolution network's gradient several times slower inside a ``while``
  loop); elsewhere each segment is one ``lax.fori_loop`` (unrolled ``unroll`` times).
- A :class:`~samrobust.autoattack.journal.Journal` records every finished batch, so an
  interrupted evaluation resumes where it stopped and ends with the same result.
- The runners (:mod:`samrobust.autoattack.runners`) place the jitted pieces: one device,
  or sharded over a mesh.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from samrobust import preemption
from samrobust.attacks import (
    VALID_TOL,
    LogitsFn,
    check_norm,
    example_keys,
    is_adversarial,
    perturbation_norm,
)
from samrobust.autoattack.apgd import stage as apgd_stage
from samrobust.autoattack.base import RandomizedModel, Stage
from samrobust.autoattack.fab import stage as fab_stage
from samrobust.autoattack.journal import Journal
from samrobust.autoattack.runners import Local, Runner, Tree
from samrobust.autoattack.square import stage as square_stage

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
# AutoAttack "plus" (the reference's order; its budget is PLUS_BUDGET).
PLUS_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# AutoAttack "rand", for models random at test time (its budget is RAND_BUDGET).
RAND_ATTACKS = ("apgd-ce", "apgd-dlr")
# Every attack a cascade can run (a custom version: any of them, in any order).
ATTACKS = (*STANDARD_ATTACKS, "apgd-dlr", "fab")
VERSIONS = ("standard", "plus", "rand", "custom")


@dataclasses.dataclass(frozen=True)
class Budget:
    """AutoAttack's budget; the default is the standard protocol's."""

    n_iter: int = 100  # APGD and FAB iterations per run
    n_target_classes: int = 9  # APGD-T and FAB-T target classes
    n_queries: int = 5000  # Square queries
    n_restarts: int = 1  # runs of APGD-CE, APGD-DLR and untargeted FAB (plus: 5)
    eot_iter: int = 1  # model draws per APGD-CE/-DLR gradient (rand: 20; a RandomizedModel)

    def __post_init__(self):
        if min(self.n_iter, self.n_target_classes, self.n_restarts, self.eot_iter) < 1:
            raise ValueError(
                f"invalid AutoAttack budget {self}: n_iter, n_target_classes, n_restarts, "
                "eot_iter >= 1"
            )
        if self.n_queries < 0:
            raise ValueError(f"invalid AutoAttack budget {self}: n_queries >= 0")


STANDARD_BUDGET = Budget()
PLUS_BUDGET = Budget(n_restarts=5)
RAND_BUDGET = Budget(eot_iter=20)
# Each named version's attacks and full budget. Rand's attacks are also a plausible custom
# list, so only standard and plus are recognised by their attacks (version_of).
_NAMED = {
    "standard": (STANDARD_ATTACKS, STANDARD_BUDGET),
    "plus": (PLUS_ATTACKS, PLUS_BUDGET),
    "rand": (RAND_ATTACKS, RAND_BUDGET),
}


def version_of(attacks: Sequence[str]) -> str:
    """``"standard"`` or ``"plus"`` for their attack lists, else ``"custom"``."""
    named = {_NAMED[v][0]: v for v in ("standard", "plus")}
    return named.get(tuple(attacks), "custom")


def version_budget(attacks: Sequence[str]) -> Budget:
    """The full budget of ``attacks``' version (a custom version's: the standard one)."""
    return _NAMED.get(version_of(attacks), _NAMED["standard"])[1]


def budget_key(budget: Budget) -> dict[str, int]:
    """The budget's fields for a journal's or a comparison's settings, one restart and one
    draw left out (so that keys written before those fields existed stay valid)."""
    return {
        k: v
        for k, v in dataclasses.asdict(budget).items()
        if not (k in ("n_restarts", "eot_iter") and v == 1)
    }


def resolve_version(
    version: str | None, attacks: Sequence[str] | None, budget: Budget | None
) -> tuple[tuple[str, ...], Budget]:
    """``(attacks, budget)`` of a version: ``"standard"``, ``"plus"``, ``"rand"`` (their
    attacks; their full budget unless ``budget`` is given) or ``"custom"`` (``attacks``,
    required). With ``version=None``: custom if ``attacks`` are given, else standard."""
    if version is None:
        version = "standard" if attacks is None else "custom"
    if version not in VERSIONS:
        raise ValueError(f"Unknown AutoAttack version {version!r}: one of {VERSIONS}")
    if version == "custom":
        if attacks is None:
            raise ValueError("a custom AutoAttack version needs its list of attacks")
        check_attacks(attacks)
    else:
        named, full = _NAMED[version]
        if attacks is not None and tuple(attacks) != named:
            raise ValueError(f"version {version!r} runs {list(named)}; for others use 'custom'")
        return named, budget or full
    return tuple(attacks), budget or version_budget(attacks)


def check_attacks(names: Sequence[str]) -> None:
    """A ``ValueError`` unless ``names`` are distinct names of :data:`ATTACKS`, at least one."""
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names or len(set(names)) < len(names):
        what = f"Unknown attacks {unknown}" if unknown else f"attacks {list(names)}"
        raise ValueError(f"{what}: give distinct names of {ATTACKS}, at least one")


def make_stages(
    names: Sequence[str], *, eps: float, norm: str, budget: Budget, num_classes: int
) -> list[Stage]:
    """The named attacks (of :data:`ATTACKS`) as cascade stages."""
    check_attacks(names)
    n_t = min(budget.n_target_classes, num_classes - 1)
    if n_t < 1:
        raise ValueError(f"AutoAttack needs at least 2 classes; the model has {num_classes}")
    kw = dict(eps=eps, norm=norm, n_iter=budget.n_iter)
    restarts, eot = budget.n_restarts, budget.eot_iter
    make = {
        "apgd-ce": lambda: apgd_stage(**kw, loss="ce", n_restarts=restarts, eot_iter=eot),
        "apgd-dlr": lambda: apgd_stage(**kw, loss="dlr", n_restarts=restarts, eot_iter=eot),
        "apgd-t": lambda: apgd_stage(**kw, loss="dlr", n_target_classes=n_t),
        "fab": lambda: fab_stage(**kw, n_target_classes=0, n_restarts=restarts),
        "fab-t": lambda: fab_stage(**kw, n_target_classes=n_t),
        "square": lambda: square_stage(eps=eps, norm=norm, n_queries=budget.n_queries),
    }
    return [make[n]() for n in names]


@dataclasses.dataclass
class AutoAttackResult:
    """``x_adv``: the accepted adversarial of each fooled point, ``x`` for the others.
    ``robust`` / ``clean``: bool ``[N]``. ``stages``: attack -> robust mask after it (the
    last equals ``robust``). ``attacked``, ``seconds`` (wall, compilation included),
    ``rejected``: per attack. ``max_perturbation``: largest ``||x_adv - x||``."""

    x_adv: np.ndarray
    robust: np.ndarray
    clean: np.ndarray
    stages: dict[str, np.ndarray]
    max_perturbation: float
    attacked: dict[str, int]
    seconds: dict[str, float]
    rejected: dict[str, int]
    resumed: int = 0  # batches taken from a journal

    @property
    def robust_accuracy(self) -> float:
        return float(np.mean(self.robust))

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.clean))


def iterations_per_call() -> int:
    """Iterations per jitted call on CPU (measured: ``python -m experiments.bench
    --sections=autoattack``); the ``fori_loop`` unroll elsewhere."""
    return 2 if jax.default_backend() == "cpu" else 1


class _StageFns:
    """The jitted pieces of one stage, compiled on first use per batch shape."""

    def __init__(self, stage: Stage, runner: Runner, logits_fn: LogitsFn, eps, norm, unroll):
        self.stage, self.runner, self.logits_fn, self.unroll = stage, runner, logits_fn, unroll

        def init(lf, b, key_data, j):
            keys = example_keys(jax.random.wrap_key_data(key_data), b["ids"])
            return stage.init(lf, b["x"], b["y"], keys, j)

        def check(lf, s):
            ok = is_adversarial(lf(s["adv"]), s["y"], s["x"], s["adv"], eps=eps, norm=norm)
            return {"fooled": s["fooled"], "valid": ok}

        def loop(lf, s, i0, i1):
            body = lambda i, c: stage.step(lf, c, i)  # noqa: E731
            return jax.lax.fori_loop(i0, i1, body, s, unroll=unroll)

        self.init = runner.jit(init, logits_fn, 2)
        self.check = runner.jit(check, logits_fn, 0)
        self.loop = runner.jit(loop, logits_fn, 2)
        self.blocks: dict[int, Callable] = {}

    def block(self, k: int) -> Callable:
        if k not in self.blocks:

            def steps(lf, s, i0):
                for t in range(k):
                    s = self.stage.step(lf, s, i0 + t)
                return s

            self.blocks[k] = self.runner.jit(steps, self.logits_fn, 1)
        return self.blocks[k]

    def advance(self, s: Tree, i: int, stop: int, host_loop: bool) -> Tree:
        if not host_loop:
            return self.loop(s, jnp.int32(i), jnp.int32(stop))
        for i0 in range(i, stop, self.unroll):
            s = self.block(min(self.unroll, stop - i0))(s, jnp.int32(i0))
        return s


PROGRESS_SECONDS = 60.0  # the longest a batch runs without a log line


def _bucket(n: int, cap: int, multiple: int) -> int:
    """The batch size for ``n`` points: ``multiple`` times the smallest of 1..8, 10, 12, 14,
    16, 20, 24, 28, 32, 40... (four sizes per octave: at most 25% padding) that holds
    them, and at most ``cap``."""
    units = -(-n // multiple)
    if units > 8:
        step = 2 ** (units.bit_length() - 3)
        units = -(-units // step) * step
    return min(units * multiple, cap)


def _attack_batch(
    fns: _StageFns,
    x: np.ndarray,
    y: np.ndarray,
    chunk: np.ndarray,
    key_data: jax.Array,
    j: int,
    *,
    cap: int,
    compact: bool,
    host_loop: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One run of a stage on the points ``chunk``: (fooled points, their adversarials,
    refused count)."""
    st, runner = fns.stage, fns.runner
    size = _bucket(len(chunk), cap, runner.multiple) if compact else cap
    rows = np.resize(chunk, size)
    live = np.arange(size) < len(chunk)
    state = fns.init(
        runner.put({"x": x[rows], "y": y[rows], "ids": rows.astype(np.int32)}),
        key_data,
        jnp.int32(j),
    )
    fooled_pts, advs, refused, i = [], [], 0, 0
    t0 = last_log = time.perf_counter()
    while True:
        stop = min(i + st.segment, st.n_steps) if compact else st.n_steps
        state = fns.advance(state, i, stop, host_loop)
        i = stop
        flags = runner.get(fns.check(state))
        left = live & ~flags["fooled"]
        finished = i >= st.n_steps or not left.any()
        if not finished and time.perf_counter() - last_log >= PROGRESS_SECONDS:
            last_log = time.perf_counter()
            logging.info(
                "autoattack %s run %d: step %d/%d, %d of %d points still robust (%.0f s)",
                st.name,
                j + 1,
                i,
                st.n_steps,
                int(left.sum()),
                len(chunk),
                last_log - t0,
            )
        # Repack once the points left fit half the batch: each new size costs a compilation.
        if not (finished or _bucket(int(left.sum()), cap, runner.multiple) <= size // 2):
            continue
        done = live & flags["fooled"]
        if done.any():
            accept = done & flags["valid"]
            refused += int(np.sum(done & ~flags["valid"]))
            fooled_pts.append(rows[accept])
            advs.append(runner.get(state["adv"])[accept])
        if finished:
            break
        pos = np.flatnonzero(left)
        size = _bucket(len(pos), cap, runner.multiple)
        pos = np.resize(pos, size)
        state = runner.put({k: v[pos] for k, v in runner.get(state).items()})
        rows = rows[pos]
        live = np.arange(size) < int(left.sum())
    if not fooled_pts:
        return np.zeros(0, np.int64), x[:0], refused
    return np.concatenate(fooled_pts), np.concatenate(advs), refused


def autoattack(
    logits_fn: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    version: str | None = None,
    budget: Budget | None = None,
    attacks: Sequence[str] | None = None,
    **options: Any,
) -> AutoAttackResult:
    """AutoAttack on ``logits_fn(x) -> logits`` (see the module docstring): :func:`run_cascade`
    of a ``version``'s attacks at ``budget`` (:func:`resolve_version`: ``"standard"``,
    ``"plus"``, or ``"custom"``: ``attacks``, any of :data:`ATTACKS` in the given order).
    ``options``: those of :func:`run_cascade`.

    Pass a model with parameters as ``jax.tree_util.Partial(apply_fn, variables)``: they are
    then an argument of the jitted attacks, not constants baked into them.
    """
    check_norm(norm)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    x = np.asarray(x, np.float32)
    num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x[:1].shape, x.dtype)).shape[-1]
    attacks, budget = resolve_version(version, attacks, budget)
    if (budget.eot_iter > 1) != isinstance(logits_fn, RandomizedModel):
        raise ValueError(
            "expectation over draws (eot_iter > 1, the rand version) is for a RandomizedModel, "
            "and a RandomizedModel needs it: use version='rand' for a model random at test time"
        )
    stages = make_stages(attacks, eps=eps, norm=norm, budget=budget, num_classes=num_classes)
    return run_cascade(logits_fn, x, y, key, stages, eps=eps, norm=norm, **options)


def _correctly_classified(
    runner: Runner, logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, cap: int
) -> np.ndarray:
    """Which points the model classifies correctly, in batches of ``cap``."""
    predict = runner.jit(lambda lf, b: jnp.argmax(lf(b["x"]), axis=-1) == b["y"], logits_fn, 0)
    clean = np.zeros(len(x), bool)
    for start in range(0, len(x), cap):
        idx = np.resize(np.arange(start, min(start + cap, len(x))), cap)
        clean[idx] = runner.get(predict(runner.put({"x": x[idx], "y": y[idx]})))
    return clean


def _replay(
    records: Sequence[dict[str, np.ndarray]],
    stage: str,
    robust: np.ndarray,
    x_adv: np.ndarray,
    result: AutoAttackResult,
) -> np.ndarray:
    """Applies a run's journaled batches to ``robust``, ``x_adv`` and ``result`` (in place);
    returns the indices that run has yet to attack."""
    todo = np.flatnonzero(robust)
    for rec in records:
        todo = np.setdiff1d(todo, rec["attacked"])
        robust[rec["fooled"]] = False
        x_adv[rec["fooled"]] = rec["adv"]
        result.rejected[stage] += int(rec["refused"])
    result.resumed += len(records)
    return todo


def run_cascade(
    logits_fn: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    stages: Sequence[Stage],
    *,
    eps: float,
    norm: str,
    batch_size: int = 250,
    runner: Runner | None = None,
    unroll: int | None = None,
    compact: bool = True,
    journal: Journal | None = None,
) -> AutoAttackResult:
    """The cascade of ``stages`` on the host; each stage attacks the points still robust.

    ``runner``: :class:`Local` (default) or :class:`Sharded`; ``batch_size`` must divide by
    its device count. ``unroll``: iterations per jitted call on CPU, the ``fori_loop``
    unroll elsewhere (default :func:`iterations_per_call`). ``compact=False`` keeps fixed batches
    and runs every run to its end (for comparison). ``journal``: records finished batches
    and resumes from them.
    """
    runner = runner or Local()
    if batch_size < 1 or batch_size % runner.multiple:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the device count "
            f"{runner.multiple}"
        )
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = len(x)
    if n != len(y):
        raise ValueError(f"need as many labels as images; got {len(y)} and {n}")
    unroll = iterations_per_call() if unroll is None else unroll
    host_loop = jax.default_backend() == "cpu"
    cap = min(batch_size, _bucket(n, batch_size, runner.multiple))

    clean = _correctly_classified(runner, logits_fn, x, y, cap)
    robust, x_adv = clean.copy(), x.copy()
    result = AutoAttackResult(x_adv, robust, clean, {}, 0.0, {}, {}, {})
    for si, st in enumerate(stages):
        fns = _StageFns(st, runner, logits_fn, eps, norm, unroll)
        result.attacked[st.name] = int(robust.sum())
        result.rejected[st.name] = 0
        t0 = time.perf_counter()
        for j in range(st.n_runs):
            records = journal.load(st.name, j) if journal else []
            todo = _replay(records, st.name, robust, x_adv, result)
            run_key = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, si), j))
            n_batches = -(-len(todo) // cap)
            for bi in range(n_batches):
                preemption.exit_if_signalled()
                chunk = todo[bi * cap : (bi + 1) * cap]
                fooled, adv, refused = _attack_batch(
                    fns, x, y, chunk, run_key, j, cap=cap, compact=compact, host_loop=host_loop
                )
                robust[fooled] = False
                x_adv[fooled] = adv
                result.rejected[st.name] += refused
                if journal:
                    journal.record(
                        st.name,
                        j,
                        len(records) + bi,
                        attacked=chunk,
                        fooled=fooled,
                        adv=adv,
                        refused=np.int64(refused),
                    )
                logging.info(
                    "autoattack %s run %d/%d batch %d/%d: fooled %d of %d; robust accuracy "
                    "%.4f (%.0f s)",
                    st.name,
                    j + 1,
                    st.n_runs,
                    bi + 1,
                    n_batches,
                    len(fooled),
                    len(chunk),
                    robust.mean(),
                    time.perf_counter() - t0,
                )
        result.seconds[st.name] = time.perf_counter() - t0
        result.stages[st.name] = robust.copy()
        logging.info(
            "autoattack after %-7s robust accuracy %.4f (%d points attacked in %.1f s)",
            st.name,
            robust.mean(),
            result.attacked[st.name],
            result.seconds[st.name],
        )
    dist = np.asarray(perturbation_norm(jnp.asarray(x_adv - x), norm)) if n else np.zeros(1)
    result.max_perturbation = float(dist.max())
    if not (result.max_perturbation <= eps + VALID_TOL and np.all((x_adv >= 0) & (x_adv <= 1))):
        raise RuntimeError(f"AutoAttack accepted an invalid point (max {result.max_perturbation})")
    return result
