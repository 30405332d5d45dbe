"""The reference's sanity checks (samrobust.autoattack.checks)."""

import jax
import jax.numpy as jnp
import numpy as np

from samrobust import autoattack as aa
from tests.toy_models import linear_model


def test_sanity_checks_fire_on_softmax_and_randomised_models(linear5):
    w, x, y = linear5
    f = linear_model(w)
    assert aa.sanity_checks(f, x, y, n_target_classes=4) == []

    probs = aa.sanity_checks(lambda xb: jax.nn.softmax(f(xb)), x, y, n_target_classes=4)
    assert len(probs) == 1 and "probability" in probs[0]

    rng = np.random.default_rng(0)

    def noisy(xb):  # eager calls draw fresh noise: a randomised defence
        return f(xb) + jnp.asarray(rng.normal(0, 0.5, (xb.shape[0], 5)), jnp.float32)

    rand = aa.sanity_checks(noisy, x, y, n_target_classes=4)
    assert any("disagree" in m for m in rand)

    few = aa.sanity_checks(f, x, y)  # 9 targets requested, 4 possible
    assert any("target classes" in m for m in few)

    # A result claiming more robust than clean points (e.g. evaluated on another model).
    ones = np.ones(16, bool)
    fake = aa.AutoAttackResult(x, ones, ones, {"apgd-ce": ones}, 0.0, {}, {}, {})
    wrong = aa.sanity_checks(
        lambda xb: -f(xb), x, y, result=fake, n_target_classes=4, robust_accuracy=0.9
    )
    assert sum("below" in m for m in wrong) == 2
