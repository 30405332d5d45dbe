"""Defaults: the paper's CIFAR-10 recipe (PreActResNet-18, 100 epochs, SGD, lr 0.1).

The mode configs (sgd.py, sam.py, at.py, sam_at.py) import this and set the method.
`get_config("digits")` scales everything to the offline 8x8 digits dataset;
`get_config("fast")` is the fast CIFAR-10 recipe (minutes on a CPU, seconds on a GPU).
Run one of the mode configs, not this file, e.g.:

  python -m samrobust.main --config=configs/sam.py:digits --workdir=/tmp/sam_digits
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the default config; ``arg="digits"`` selects the offline dataset, ``"fast"``
    the fast CIFAR-10 recipe (``fast_cifar`` network, 10 epochs)."""
    config = ml_collections.ConfigDict()
    config.mode = "sgd"  # sgd | sam | at | sam_at

    # Data: digits (offline), image_folder (data_dir = a folder or .tar/.tar.gz holding
    # train/<class>/* and test/<class>/*), or cifar10 / cifar100 / svhn_cropped (tfds when
    # prepared in data_dir; cifar10/100 also from torchvision's files in data_dir).
    config.dataset = "cifar10"
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.cache_dir = ml_collections.config_dict.placeholder(str)  # decoded image folders
    config.train_examples = -1  # a fixed class-stratified train subset (-1 = all)
    config.val_examples = 0  # held out from train, stratified, for validation (0 = none)
    config.crop_padding = 4  # reflect-pad then random crop (0 disables)
    config.flip = True  # random horizontal flip

    # Model.
    config.model = "preact_resnet18"  # preact_resnet18 | wrn28_10 | wrn34_10 | fast_cifar
    config.width = 64  # PreActResNet base width (64 = the paper's); fast_cifar: first group
    config.half_precision = False  # bf16 compute, f32 master weights
    # Stride-2 convs pad like XLA ("same") or like PyTorch ("torch": RobustBench's classes,
    # which samrobust.torch_weights maps).
    config.padding = "same"

    # Optimisation: the paper's recipe.
    config.num_epochs = 100
    config.batch_size = 128  # global, split over all devices
    config.learning_rate = 0.1
    config.lr_schedule = "piecewise"  # piecewise (x0.1 at 75% and 90%) | cosine | triangle
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.seed = 0
    # Recipe pieces of the fast recipe (configs/*.py:fast), off in the paper's recipe.
    config.nesterov = False
    config.label_smoothing = 0.0
    config.lr_triangle = (0.2, 0.23, 0.07)  # lr_schedule=triangle: start, peak at, end
    config.norm_bias_lr_scale = 1.0  # BatchNorm biases: lr x s, weight decay / s

    # SAM (modes sam, sam_at).
    config.rho = 0.05
    config.adaptive = False  # ASAM
    config.sam_sync = False  # False: per-device perturbation (m-sharpness); True: synchronised
    # Examples per perturbation (the m of m-sharpness) within a device; -1: the per-device
    # batch (one perturbation per device).
    config.sam_group_size = -1
    # Cheaper SAM: plain steps before this fraction of training; SAM on a random fraction
    # of the steps (the second pass is skipped on the others).
    config.sam_start_fraction = 0.0
    config.sam_probability = 1.0

    # Adversarial training (modes at, sam_at): PGD inner maximisation.
    config.attack = ml_collections.ConfigDict()
    config.attack.norm = "linf"  # linf | l2
    config.attack.eps = 8 / 255
    config.attack.step_size = 2 / 255
    config.attack.steps = 5
    # The random start's radius in units of eps, and whether every step is projected onto
    # the eps ball. N-FGSM (de Jorge et al. 2022): steps 1, step_size = eps, start_scale 2,
    # project False.
    config.attack.start_scale = 1.0
    config.attack.project = True
    # The AT modes' loss: ce (Madry: CE on the PGD examples), trades (CE on clean + at_beta
    # x KL(clean || adversarial), attack maximising the KL) or mart (samrobust.losses).
    config.at_loss = "ce"
    config.at_beta = 6.0
    # AWP (samrobust.sam.awp): adversarial weight perturbation of the AT loss, layer-wise
    # relative radius gamma (0.005 in AT-AWP, 0 = off); mode at only (sam_at perturbs the
    # weights already).
    config.awp_gamma = 0.0
    # Weight averaging: an exponential moving average of the weights (and BatchNorm
    # statistics), ema <- d * ema + (1 - d) * w after every step (0 = off; e.g. 0.999). It
    # is checkpointed, and validation, the best checkpoint, the final evaluation and
    # samrobust.evaluate use it.
    config.ema_decay = 0.0

    # Evaluation during training: every N epochs (0 = off) clean and PGD accuracy on the
    # validation split (the test split when val_examples = 0); keeps the best checkpoint by
    # robust accuracy. val_attack fields left None take the run's own AT budget in at/sam_at
    # modes, else Linf 2/255, step 0.5/255, PGD-10.
    config.eval_every_epochs = 0
    # Catastrophic-overfitting guard (fast AT, e.g. FGSM with a random start:
    # --config.attack.steps=1 --config.attack.step_size=0.0392): stop training when the
    # validation robust accuracy falls more than this below its best (0 = off; 0.2 is the
    # fast-AT reference's early stop) and evaluate the best checkpoint. Needs
    # eval_every_epochs.
    config.stop_on_collapse = 0.0
    config.val_attack = ml_collections.ConfigDict()
    config.val_attack.norm = ml_collections.config_dict.placeholder(str)
    config.val_attack.eps = ml_collections.config_dict.placeholder(float)
    config.val_attack.step_size = ml_collections.config_dict.placeholder(float)
    config.val_attack.steps = ml_collections.config_dict.placeholder(int)

    # Final evaluation (the paper's PGD-10 suite) on eval_num_examples test images: -1 = the
    # whole test split, N = the fixed class-stratified subset of N (input_pipeline.eval_subset).
    config.eval_batch_size = 256
    config.eval_pgd_steps = 10  # the paper's PGD-10
    config.eval_num_examples = -1

    # Logging and checkpoints.
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    # The workdir lock is a lease: taken over once its heartbeat is this old (samrobust.workdir).
    config.lock_stale_after_s = 600.0

    if arg == "digits":
        config.dataset = "digits"
        config.crop_padding = 1
        config.flip = False
        config.width = 16
        config.num_epochs = 30
        config.batch_size = 64
        config.learning_rate = 0.05
        config.log_every_steps = 50
        config.checkpoint_every_steps = 200
        config.eval_batch_size = 120
    elif arg == "fast":
        # The fast CIFAR-10 recipe (airbench94's network and optimiser, written from its
        # description; experiments/results/cifar10_fast/RECIPE.md has what it reached on the
        # CPU): no test-time augmentation and no lookahead. Batch 512; learning rate and
        # weight decay are airbench's per-example values for a mean loss (lr 11.5 / (1024
        # (1 + 1/(1 - 0.85))) x 512, weight decay 0.0153 x 1024 / 11.5 / 1024).
        config.model = "fast_cifar"
        config.width = 32
        config.num_epochs = 10
        config.batch_size = 512
        config.learning_rate = 0.75
        config.lr_schedule = "triangle"
        config.momentum = 0.85
        config.nesterov = True
        config.weight_decay = 0.00133
        config.label_smoothing = 0.2
        config.norm_bias_lr_scale = 64.0
        config.crop_padding = 2
        config.sam_group_size = 128  # the paper's SAM: one perturbation per 128 examples
        config.eval_batch_size = 500
        config.log_every_steps = 20
        config.checkpoint_every_steps = 200
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; use none, 'digits' or 'fast'")
    return config
