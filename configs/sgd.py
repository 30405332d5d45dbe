"""Standard training (SGD with momentum), the baseline.

python -m samrobust.main --config=configs/sgd.py --workdir=/tmp/sgd
python -m samrobust.main --config=configs/sgd.py:digits --workdir=/tmp/sgd_digits
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "sgd"
    return config
