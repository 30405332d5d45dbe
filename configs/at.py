"""Adversarial training (Madry et al.): train on PGD-5 examples, Linf eps 8/255, step 2/255.

  python -m samrobust.main --config=configs/at.py --workdir=/tmp/at
  python -m samrobust.main --config=configs/at.py:digits --workdir=/tmp/at_digits
  # The fast recipe (fast_cifar network, 10 epochs) on the CIFAR-10 JPEG copy:
  python -m samrobust.main --config=configs/at.py:fast --workdir=/tmp/at_fast \
      --config.dataset=image_folder --config.data_dir=../shared/data/cifar10-jpeg.tar.gz
  # TRADES (beta 6) or MART (beta 5) instead of Madry's loss, same PGD budget:
  python -m samrobust.main --config=configs/at.py --config.at_loss=trades --workdir=/tmp/trades
  python -m samrobust.main --config=configs/at.py --config.at_loss=mart --config.at_beta=5 \
      --workdir=/tmp/mart
  # L2 AT as in the paper's sweep:
  python -m samrobust.main --config=configs/at.py --config.attack.norm=l2 \
      --config.attack.eps=0.1255 --config.attack.step_size=0.0627 --workdir=/tmp/at_l2
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "at"
    return config
