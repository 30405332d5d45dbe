"""Warnings that an AutoAttack evaluation may be unreliable: the reference's
``autoattack/checks.py``, one function per check (each returns a message or ``None``), and
:func:`sanity_checks` running them all."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samrobust.attacks import LogitsFn, dlr_loss
from samrobust.autoattack.cascade import STANDARD_ATTACKS, AutoAttackResult


def _forward(logits_fn: LogitsFn, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(logits_fn(jnp.asarray(x[i : i + batch_size])), np.float32)
            for i in range(0, len(x), batch_size)
        ]
    )


def check_logits(out: np.ndarray, tol: float = 1e-5) -> str | None:
    """The outputs look like probabilities (in ``[0, 1]``, rows summing to 1), not logits."""
    if out.max() < 1 + tol and out.min() > -tol and np.all(np.abs(out.sum(-1) - 1) < tol):
        return (
            "the outputs look like a probability distribution (in [0, 1], rows "
            "summing to 1): attacks need the logits"
        )
    return None


def check_randomized(outputs: Sequence[np.ndarray], y: np.ndarray, tol: float = 1e-4) -> str | None:
    """Repeated forward passes disagree: a randomised model."""
    unit = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs]
    n_correct = {int(np.sum(o.argmax(-1) == y)) for o in outputs}
    max_diff = max(
        (
            float(np.max(np.linalg.norm(a - b, axis=-1)))
            for i, a in enumerate(unit)
            for b in unit[i + 1 :]
        ),
        default=0.0,
    )
    if len(n_correct) > 1 or max_diff > tol:
        return (
            f"repeated forward passes disagree (max normalised difference "
            f"{max_diff:.2e}): the model looks randomised; the standard version "
            "assumes a deterministic model"
        )
    return None


def check_zero_gradients(
    logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, correct: np.ndarray, batch_size: int
) -> str | None:
    """Correctly classified points whose DLR loss has an all-zero input gradient (the
    attacked points only: DLR is constant where ``y`` ranks third)."""
    if isinstance(logits_fn, jax.tree_util.Partial):
        jitted = jax.jit(jax.grad(lambda f, xb, yb: jnp.sum(dlr_loss(f(xb), yb)), argnums=1))
        grad_fn = lambda xb, yb: jitted(logits_fn, xb, yb)  # noqa: E731
    else:
        grad_fn = jax.jit(jax.grad(lambda xb, yb: jnp.sum(dlr_loss(logits_fn(xb), yb))))
    zero = 0
    for i in range(0, len(x), batch_size):
        part = slice(i, i + batch_size)
        g = np.asarray(grad_fn(jnp.asarray(x[part]), jnp.asarray(y[part])))
        flat_zero = np.abs(g.reshape(g.shape[0], -1)).sum(-1) == 0
        zero += int(np.sum(flat_zero & correct[part]))
    if zero:
        return (
            f"there are {zero} correctly classified points with zero gradient (of "
            "the DLR loss): gradient-based attacks may be unreliable"
        )
    return None


def check_classes(n_cls: int, attacks: Sequence[str], n_target_classes: int) -> list[str]:
    """Too few classes for the DLR losses or for the number of target classes."""
    out = []
    if "apgd-t" in attacks:
        if n_cls <= 2:
            out.append(
                f"with only {n_cls} classes the DLR loss is not defined (falls back to the margin)"
            )
        elif n_cls == 3:
            out.append(
                f"with only {n_cls} classes the targeted DLR loss is not defined "
                "(falls back to a 3-class denominator)"
            )
    if ("apgd-t" in attacks or "fab-t" in attacks) and n_target_classes + 1 > n_cls:
        out.append(f"{n_target_classes} target classes requested but only {n_cls - 1} are possible")
    return out


def check_square(result: AutoAttackResult, tol: float = 0.002) -> str | None:
    """Square lowered the robust accuracy left by the gradient attacks: gradient masking."""
    accs = {k: float(np.mean(v)) for k, v in result.stages.items()}
    if "square" in accs and len(accs) > 1:
        before = min(v for k, v in accs.items() if k != "square")
        if accs["square"] < before - tol:
            return (
                f"Square Attack lowered the robust accuracy by "
                f"{before - accs['square']:.2%} after the gradient attacks: "
                "a sign of gradient masking; consider adaptive attacks"
            )
    return None


def check_clean_vs_robust(clean_acc: float, robust_acc: float, what: str) -> str | None:
    """A robust accuracy above the clean accuracy."""
    if clean_acc < robust_acc:
        return f"clean accuracy {clean_acc:.2%} is below the {what} {robust_acc:.2%}"
    return None


def sanity_checks(
    logits_fn: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    *,
    result: AutoAttackResult | None = None,
    robust_accuracy: float | None = None,
    n_target_classes: int = 9,
    attacks: Sequence[str] = STANDARD_ATTACKS,
    batch_size: int = 250,
    n_repeats: int = 5,
) -> list[str]:
    """Every check above (an empty list: no warning). The model is called eagerly
    ``n_repeats`` times; ``result`` (of the same points) adds the Square and accuracy
    checks, ``robust_accuracy`` (e.g. PGD's) is compared with the clean accuracy."""
    x = np.asarray(x)
    y = np.asarray(y)
    bs = max(1, min(batch_size, len(x)))
    outputs = [_forward(logits_fn, x, bs) for _ in range(max(n_repeats, 1))]
    out = outputs[0]
    correct = out.argmax(-1) == y
    clean_acc = float(np.mean(correct)) if len(x) else 0.0
    found = [
        check_logits(out),
        check_randomized(outputs, y),
        check_zero_gradients(logits_fn, x, y, correct, bs),
        *check_classes(out.shape[-1], attacks, n_target_classes),
    ]
    if result is not None:
        found.append(check_square(result))
        found.append(check_clean_vs_robust(clean_acc, result.robust_accuracy, "robust accuracy"))
    if robust_accuracy is not None:
        found.append(check_clean_vs_robust(clean_acc, robust_accuracy, "given robust accuracy"))
    return [w for w in found if w]
