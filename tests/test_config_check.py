"""Config validation (``samrobust.config_check``) and the configs' defaults."""

import numpy as np
import pytest

from configs import at as at_config
from configs import sam_at as sam_at_config
from samrobust import config_check
from tests.helpers import digits_config


def test_at_config_defaults_are_the_papers():
    config = at_config.get_config()
    assert (config.dataset, config.model, config.width) == ("cifar10", "preact_resnet18", 64)
    assert (config.num_epochs, config.batch_size, config.learning_rate) == (100, 128, 0.1)
    assert (config.momentum, config.weight_decay) == (0.9, 5e-4)
    assert config.attack.norm == "linf" and config.attack.steps == 5
    np.testing.assert_allclose([config.attack.eps, config.attack.step_size], [8 / 255, 2 / 255])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"sam_group_size": 5}, "config.sam_group_size = 5: must be -1"),
        ({"sam_group_size": 32, "sam_sync": True}, "drop --config.sam_sync"),
        ({"label_smoothing": 1.0}, "config.label_smoothing = 1.0"),
        ({"norm_bias_lr_scale": 0.0}, "config.norm_bias_lr_scale = 0.0"),
        ({"lr_triangle": (0.2, 1.5, 0.1)}, "config.lr_triangle"),
        ({"at_loss": "trades"}, "trades needs an adversarial mode"),
        ({"sam_start_fraction": 1.0}, "config.sam_start_fraction = 1.0"),
        ({"sam_probability": 0.0}, "config.sam_probability = 0.0"),
        ({"at_loss": "hinge"}, "config.at_loss = 'hinge'"),
        ({"lock_stale_after_s": 0.0}, "config.lock_stale_after_s = 0.0"),
        ({"ema_decay": 1.0}, "config.ema_decay = 1.0: must be in"),
        ({"awp_gamma": -0.01}, "config.awp_gamma = -0.01: must be >= 0"),
        ({"awp_gamma": 0.005}, "AWP perturbs the weights of adversarial training"),
        ({"attack.start_scale": -1.0}, "config.attack.start_scale = -1.0: must be >= 0"),
        ({"padding": "valid"}, "config.padding = 'valid': must be one of"),
    ],
)
def test_invalid_recipe_fields_are_config_errors(overrides, message):
    config = digits_config(sam_at_config, mode="sam", **overrides)
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate_config(config, 1)
