"""SAM alone (no adversarial examples): the paper's main method, rho = 0.05.

  python -m samrobust.main --config=configs/sam.py --workdir=/tmp/sam
  python -m samrobust.main --config=configs/sam.py:digits --workdir=/tmp/sam_digits
  # ASAM, larger radius, synchronised perturbation across devices:
  python -m samrobust.main --config=configs/sam.py --config.adaptive --config.rho=0.5 \
      --config.sam_sync --workdir=/tmp/asam
"""

from configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.mode = "sam"
    return config
