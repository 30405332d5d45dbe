"""SAM alone (no adversarial examples): the paper's main method, rho = 0.05.

  python -m samrobust.main --config=configs/sam.py --workdir=/tmp/sam
  python -m samrobust.main --config=configs/sam.py:digits --workdir=/tmp/sam_digits
  # The fast recipe (fast_cifar network, 10 epochs) on the CIFAR-10 JPEG copy:
  python -m samrobust.main --config=configs/sam.py:fast --workdir=/tmp/sam_fast \
      --config.dataset=image_folder --config.data_dir=../shared/data/cifar10-jpeg.tar.gz
  # Cheaper SAM: only in the last 30% of training, or on half of the steps at random:
  python -m samrobust.main --config=configs/sam.py --config.sam_start_fraction=0.7 \
      --workdir=/tmp/late_sam
  python -m samrobust.main --config=configs/sam.py --config.sam_probability=0.5 --workdir=/tmp/rsam
  # ASAM, larger radius, synchronised perturbation across devices:
  python -m samrobust.main --config=configs/sam.py --config.adaptive --config.rho=0.5 \
      --config.sam_sync --workdir=/tmp/asam
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "sam"
    return config
