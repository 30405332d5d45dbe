"""Training losses: cross-entropy (optionally label-smoothed), TRADES and MART.

The attacks' losses (what PGD and AutoAttack maximise) live in :mod:`samrobust.attacks`;
these are what the train step minimises. Each takes logits (float32 is used inside) and
integer labels and returns a scalar, the batch mean.

- :func:`cross_entropy`: ``CE(z, y)`` against labels smoothed by ``label_smoothing``.
- :func:`trades`: TRADES (Zhang et al. 2019, arXiv 1901.08573):
  ``CE(z_clean, y) + beta * mean_i KL(p_clean_i || p_adv_i)``; gradients flow through both
  distributions, as in the reference code. Its inner attack maximises the KL
  (:func:`trades_attack_loss`).
- :func:`mart`: MART (Wang et al. 2020, ICLR): the boosted CE on adversarial logits,
  ``CE(z_adv, y) - log(1 - p_adv[y'])`` with ``y'`` the most likely wrong class, plus
  ``beta * mean_i KL(p_clean_i || p_adv_i) (1 - p_clean_i[y])``. Its inner attack is CE PGD.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

AT_LOSSES = ("ce", "trades", "mart")


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy against labels smoothed by ``label_smoothing`` (0: one-hot)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def kl_per_example(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """``KL(softmax(logits_p) || softmax(logits_q))`` per example."""
    logp = jax.nn.log_softmax(logits_p.astype(jnp.float32))
    logq = jax.nn.log_softmax(logits_q.astype(jnp.float32))
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def trades_attack_loss(logits_fn: Callable[[jax.Array], jax.Array], clean_logits: jax.Array):
    """TRADES' inner objective for :func:`samrobust.attacks.pgd`: ``loss_fn(x, y)`` is the
    batch sum of ``KL(p_clean || p(x))`` (``clean_logits`` held fixed; ``y`` unused)."""
    clean = jax.lax.stop_gradient(clean_logits)
    return lambda x, y: jnp.sum(kl_per_example(clean, logits_fn(x)))


def trades(
    clean_logits: jax.Array,
    adv_logits: jax.Array,
    labels: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """TRADES: natural CE plus ``beta`` times the mean clean-to-adversarial KL."""
    natural = cross_entropy(clean_logits, labels, label_smoothing)
    return natural + beta * jnp.mean(kl_per_example(clean_logits, adv_logits))


def mart(
    clean_logits: jax.Array,
    adv_logits: jax.Array,
    labels: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """MART: boosted adversarial CE plus ``beta`` times the KL weighted by ``1 - p_clean[y]``
    (the reference code's 1e-12 / 1.0001 guards kept)."""
    adv_probs = jax.nn.softmax(adv_logits.astype(jnp.float32))
    true = jax.nn.one_hot(labels, adv_logits.shape[-1], dtype=bool)
    wrong = jnp.argmax(jnp.where(true, -jnp.inf, adv_probs), axis=-1)
    p_wrong = jnp.take_along_axis(adv_probs, wrong[:, None], axis=1)[:, 0]
    boosted = cross_entropy(adv_logits, labels, label_smoothing) - jnp.mean(
        jnp.log(1.0001 - p_wrong + 1e-12)
    )
    clean_probs = jax.nn.softmax(clean_logits.astype(jnp.float32))
    p_true = jnp.sum(jnp.where(true, clean_probs, 0.0), axis=-1)
    kl = jnp.sum(clean_probs * (jnp.log(clean_probs + 1e-12) - jnp.log(adv_probs + 1e-12)), -1)
    return boosted + beta * jnp.mean(kl * (1.0000001 - p_true))
