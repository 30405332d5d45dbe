"""Datasets as in-memory numpy arrays, and deterministic per-host batch iterators.

Sources (``config.dataset``):
- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1,797 images, 10
  classes), offline, with a fixed stratified 80/20 train/test split. The default a new
  user runs first.
- ``image_folder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``, ``ROOT`` a
  directory or a tar archive of one, decoded once and cached (:mod:`samrobust.image_folder`).
- ``cifar10``, ``cifar100``, ``svhn_cropped``: tfds, imported only when asked for and
  first choice when prepared in ``data_dir``. ``cifar10``/``cifar100`` also read
  torchvision's download (``DATA_DIR/cifar-10-batches-py``, ``cifar-100-python``)
  without tensorflow. An unavailable dataset fails in seconds with the fixes.

``train_examples`` and ``val_examples`` (:func:`split_train`) take a fixed, class-stratified
validation split and train subset out of the train split, disjoint and independent of the
training seed. Evaluations of ``N`` test examples take :func:`eval_subset`: a fixed,
seeded, class-stratified subset (image folders come sorted by class), never the first ``N``.

Images are float32 in ``[0, 1]`` (NHWC); normalisation statistics travel with the dataset
to the model. The train order is a function of ``(seed, epoch)`` only, so a run resumed at
step ``s`` sees exactly the batches an uninterrupted run sees. Every host reads its own
slice of each global batch. Augmentation (random crop, flip) runs on the device, inside the
train step (``samrobust.train.augment``).
"""

import dataclasses
import hashlib
import importlib.util
import os
import pickle
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from samrobust import image_folder
from samrobust.errors import DatasetUnavailableError

TFDS_DATASETS = {
    # name: (num_classes, mean, std)
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (100, (0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
    "svhn_cropped": (10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
DATASETS = ("digits", "image_folder", *TFDS_DATASETS)
# torchvision's CIFAR downloads: name -> (folder, train files, test files, label key).
TORCHVISION_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in memory: images float32 in [0, 1], NHWC; labels int32.

    ``val_images``/``val_labels`` hold the validation split taken out of the train split
    (empty without ``val_examples``).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train_images.shape[1:]

    @property
    def num_val(self) -> int:
        return 0 if self.val_labels is None else len(self.val_labels)


def _sklearn_digits() -> np.ndarray:
    """The rows of scikit-learn's ``digits.csv.gz`` (64 pixels, then the label), the file
    ``sklearn.datasets.load_digits`` reads, read without importing scikit-learn (2 s of
    every digits process's start, for a 0.03 s read)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "scikit-learn is not installed, needed for --config.dataset=digits. "
            "Fix: pip install scikit-learn"
        )
    path = epath.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return np.loadtxt(str(path), delimiter=",")


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, split per class with a fixed seed (stratified)."""
    raw = _sklearn_digits()
    images = (raw[:, :-1].reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
    labels = raw[:, -1].astype(np.int32)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.concatenate(test_idx)] = True
    train_images = images[~test_mask]
    return Dataset(
        name="digits",
        train_images=train_images,
        train_labels=labels[~test_mask],
        test_images=images[test_mask],
        test_labels=labels[test_mask],
        num_classes=10,
        mean=(float(train_images.mean()),),
        std=(float(train_images.std()),),
    )


def _tfds_prepared(name: str, data_dir: str | None) -> bool:
    """Whether ``data_dir`` (tfds's default when None) holds a prepared ``name``, read from
    the directory layout (``NAME/VERSION/dataset_info.json``) without importing tfds."""
    root = epath.Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    root = root.expanduser()
    return (root / name).is_dir() and any((root / name).glob("*/dataset_info.json"))


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Loads a prepared tfds dataset fully into memory; fails fast if it is not prepared."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetUnavailableError(
            f"tensorflow-datasets is not installed, needed for --config.dataset={name}. Fixes: "
            "pip install 'samrobust[tfds]'"
            + (
                f"; or point --config.data_dir at a folder holding torchvision's "
                f"{TORCHVISION_CIFAR[name][0]}/"
                if name in TORCHVISION_CIFAR
                else ""
            )
        ) from e

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        torchvision = (
            f"; or put torchvision's {TORCHVISION_CIFAR[name][0]}/ in --config.data_dir"
            if name in TORCHVISION_CIFAR
            else ""
        )
        raise DatasetUnavailableError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir!r} and this machine "
            "cannot download it. Fixes: point --config.data_dir at a directory where it is "
            f"prepared; or run `tfds build {name} --data_dir=DIR` on a connected machine and "
            f"copy DIR here{torchvision}; or use the offline dataset: "
            "--config=configs/<name>.py:digits"
        )
    splits = {}
    for split in ("train", "test"):
        chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096)))
        images = np.concatenate([c["image"] for c in chunks])
        labels = np.concatenate([c["label"] for c in chunks])
        splits[split] = (images.astype(np.float32) / 255.0, labels.astype(np.int32))
    num_classes, mean, std = TFDS_DATASETS[name]
    return Dataset(name, *splits["train"], *splits["test"], num_classes, mean, std)


def torchvision_cifar_dir(name: str, data_dir: str | None) -> epath.Path | None:
    """The folder of torchvision's ``name`` download in ``data_dir`` (or ``data_dir`` itself
    when it is that folder), or None."""
    if data_dir is None or name not in TORCHVISION_CIFAR:
        return None
    folder, train_files, _, _ = TORCHVISION_CIFAR[name]
    for candidate in (epath.Path(data_dir) / folder, epath.Path(data_dir)):
        if (candidate / train_files[0]).is_file():
            return candidate
    return None


def load_torchvision_cifar(name: str, folder: epath.Path) -> Dataset:
    """CIFAR-10/100 from torchvision's pickled batches (``data``: N x 3072 uint8, CHW)."""
    _, train_files, test_files, label_key = TORCHVISION_CIFAR[name]
    splits = []
    for files in (train_files, test_files):
        images, labels = [], []
        for file in files:
            path = folder / file
            try:
                entry = pickle.loads(path.read_bytes(), encoding="bytes")
                data, targets = entry[b"data"], entry[label_key]
            except Exception as e:  # noqa: BLE001 - any damage: say which file
                raise DatasetUnavailableError(
                    f"{path} is not a readable torchvision CIFAR file ({type(e).__name__}: "
                    f"{e}). Download it again, or point --config.data_dir elsewhere."
                ) from e
            images.append(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(targets, np.int32))
        splits.append((np.concatenate(images), np.concatenate(labels)))
    num_classes, mean, std = TFDS_DATASETS[name]
    (train_x, train_y), (test_x, test_y) = splits
    return Dataset(
        name, _to_float(train_x), train_y, _to_float(test_x), test_y, num_classes, mean, std
    )


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


def load_image_folder(data_dir: str | None, cache_dir: str | None = None) -> Dataset:
    """An image folder (or a tar archive of one) as a :class:`Dataset`, through the cache
    (:mod:`samrobust.image_folder`)."""
    arrays = image_folder.read(data_dir, cache_dir)
    return Dataset(
        name="image_folder",
        train_images=_to_float(arrays["train_images"]),
        train_labels=arrays["train_labels"],
        test_images=_to_float(arrays["test_images"]),
        test_labels=arrays["test_labels"],
        num_classes=len(arrays["classes"]),
        mean=tuple(float(m) for m in arrays["mean"]),
        std=tuple(float(s) for s in arrays["std"]),
    )


# --------------------------------------------------------------------------------------------
# Train subsets and the validation split
# --------------------------------------------------------------------------------------------


def _stratified_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts summing to ``n``, proportional to the class sizes (largest
    remainders get the rounding)."""
    sizes = np.bincount(labels)
    exact = sizes * n / len(labels)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def split_train(
    ds: Dataset, train_examples: int = -1, val_examples: int = 0, split_seed: int = 0
) -> Dataset:
    """A fixed, class-stratified validation split and train subset of ``ds``'s train split.

    The validation split (``val_examples``, 0 = none) is drawn first, the train subset
    (``train_examples``, -1 = all the rest) from what remains: disjoint, and the same for
    every training seed and every ``train_examples``.
    """
    n = len(ds.train_labels)
    if val_examples < 0 or val_examples >= n:
        raise ValueError(
            f"config.val_examples = {val_examples}: must be in [0, {n}) for the {ds.name} train "
            "split (e.g. --config.val_examples=1000)"
        )
    if train_examples == 0 or train_examples < -1 or train_examples > n - val_examples:
        raise ValueError(
            f"config.train_examples = {train_examples}: must be -1 (all) or in [1, "
            f"{n - val_examples}] ({n} train images, {val_examples} held out for validation; "
            "e.g. --config.train_examples=10000)"
        )
    if train_examples == -1 and val_examples == 0:
        return ds
    rng = np.random.default_rng(split_seed)
    perms = [rng.permutation(np.flatnonzero(ds.train_labels == c)) for c in range(ds.num_classes)]
    val_counts = _stratified_counts(ds.train_labels, val_examples)
    val_idx = np.concatenate([p[:k] for p, k in zip(perms, val_counts, strict=False)])
    rest = [p[k:] for p, k in zip(perms, val_counts, strict=False)]
    if train_examples == -1:
        train_idx = np.concatenate(rest)
    else:
        rest_labels = np.concatenate([np.full(len(r), c) for c, r in enumerate(rest)])
        counts = _stratified_counts(rest_labels, train_examples)
        train_idx = np.concatenate([r[:k] for r, k in zip(rest, counts, strict=False)])
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[train_idx],
        train_labels=ds.train_labels[train_idx],
        val_images=ds.train_images[val_idx],
        val_labels=ds.train_labels[val_idx],
    )


# The rule for "N examples of a split" everywhere an evaluation takes fewer than all.
EVAL_SUBSET_RULE = "class-stratified, seed 0"


def eval_subset(labels: np.ndarray, n: int = -1) -> np.ndarray:
    """Indices (ascending) of the evaluation subset of ``n`` points of a split with
    ``labels``: a fixed, seeded (:data:`EVAL_SUBSET_RULE`), class-stratified draw, the same
    for every model and run, so evaluations of ``n`` points are paired; each class gets its
    share of ``n`` (within one). ``n = -1`` or ``n >= len(labels)``: every index.

    Never "the first ``n``": image folders come sorted by class.
    """
    total = len(labels)
    if n == 0 or n < -1:
        raise ValueError(f"the evaluation subset needs n > 0, or -1 for all; got {n}")
    if n == -1 or n >= total:
        return np.arange(total)
    rng = np.random.default_rng(0)
    classes = np.unique(labels)
    counts = _stratified_counts(np.searchsorted(classes, labels), n)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, counts, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def describe_subset(indices: np.ndarray, total: int) -> dict[str, Any]:
    """What a report records of its points: the rule, ``num_examples`` of ``total`` and a
    sha256 of the indices (equal hashes: the same points)."""
    digest = hashlib.sha256(np.ascontiguousarray(indices, np.int64).tobytes()).hexdigest()
    return {
        "rule": "all" if len(indices) == total else EVAL_SUBSET_RULE,
        "num_examples": len(indices),
        "of": total,
        "indices_sha256": digest,
    }


def evaluation_points(ds: Dataset, n: int = -1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``ds``'s test images and labels at :func:`eval_subset` ``(n)``, and
    :func:`describe_subset` of them."""
    idx = eval_subset(ds.test_labels, n)
    return ds.test_images[idx], ds.test_labels[idx], describe_subset(idx, len(ds.test_labels))


def load(
    name: str,
    data_dir: str | None = None,
    *,
    train_examples: int = -1,
    val_examples: int = 0,
    cache_dir: str | None = None,
) -> Dataset:
    """Loads a dataset by name (one of ``DATASETS``), then :func:`split_train`."""
    if name == "digits":
        ds = load_digits()
    elif name == "image_folder":
        ds = load_image_folder(data_dir, cache_dir)
    elif name in TFDS_DATASETS:
        folder = torchvision_cifar_dir(name, data_dir)
        if folder is not None and not _tfds_prepared(name, data_dir):
            ds = load_torchvision_cifar(name, folder)
        else:
            ds = load_tfds(name, data_dir)
    else:
        raise ValueError(f"Unknown dataset {name!r}; set config.dataset to one of {DATASETS}")
    return split_train(ds, train_examples, val_examples)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled train batches, this host's slice of each global batch.

    Epoch ``e`` uses the permutation drawn from ``(seed, e)``; the incomplete last batch
    of an epoch is dropped. Starts at global step ``start_step``.
    """
    steps_per_epoch = len(images) // global_batch
    per_host = global_batch // process_count
    lo = process_index * per_host
    step = start_step
    while True:
        epoch, i = divmod(step, steps_per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(len(images))
        idx = perm[i * global_batch : (i + 1) * global_batch][lo : lo + per_host]
        yield images[idx], labels[idx]
        step += 1


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole split in order, padded to full batches: ``(images, labels, mask)``.

    ``mask`` is 1 for real examples and 0 for padding. Yields this host's slice.
    """
    n = len(images)
    per_host = global_batch // process_count
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        sl = slice(process_index * per_host, (process_index + 1) * per_host)
        yield images[idx][sl], labels[idx][sl], mask[sl]


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs ``iterator`` in a background thread, ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        finally:
            q.put(sentinel)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not sentinel:
        yield item
