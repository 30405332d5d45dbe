"""Standard training (SGD with momentum), the baseline.

python -m samrobust.main --config=configs/sgd.py --workdir=/tmp/sgd
python -m samrobust.main --config=configs/sgd.py:digits --workdir=/tmp/sgd_digits
# The fast recipe (fast_cifar network, 10 epochs) on the CIFAR-10 JPEG copy:
python -m samrobust.main --config=configs/sgd.py:fast --workdir=/tmp/sgd_fast \
    --config.dataset=image_folder --config.data_dir=../shared/data/cifar10-jpeg.tar.gz
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "sgd"
    return config
