"""SAM + adversarial training, done right: SAM's ascent gradient is taken on the PGD
examples with fresh parameter gradients (the attack's gradients never leak into it, a
defect of the official code).

  python -m samrobust.main --config=configs/sam_at.py --workdir=/tmp/sam_at
  python -m samrobust.main --config=configs/sam_at.py:digits --workdir=/tmp/sam_at_digits
  # The fast recipe (fast_cifar network, 10 epochs) on the CIFAR-10 JPEG copy:
  python -m samrobust.main --config=configs/sam_at.py:fast --workdir=/tmp/sam_at_fast \
      --config.dataset=image_folder --config.data_dir=../shared/data/cifar10-jpeg.tar.gz
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "sam_at"
    return config
