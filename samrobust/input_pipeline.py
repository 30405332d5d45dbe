"""Datasets as in-memory numpy arrays, and deterministic per-host batch iterators.

Two sources:
- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1,797 images, 10
  classes), offline, with a fixed stratified 80/20 train/test split. The default a new
  user runs first.
- tfds: ``cifar10``, ``cifar100``, ``svhn_cropped``. tensorflow is imported only here, only
  when one of them is asked for. An unprepared dataset fails in seconds with the fixes
  (no network here: ``tfds.load`` would otherwise retry downloads for many minutes).

Images are float32 in ``[0, 1]`` (NHWC); normalisation statistics travel with the dataset
to the model. The train order is a function of ``(seed, epoch)`` only, so a run resumed at
step ``s`` sees exactly the batches an uninterrupted run sees. Every host reads its own
slice of each global batch. Augmentation (random crop, flip) runs on the device, inside the
train step (``samrobust.train.augment``).
"""

import dataclasses
import queue
import threading
from collections.abc import Iterator

import numpy as np

TFDS_DATASETS = {
    # name: (num_classes, mean, std)
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (100, (0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
    "svhn_cropped": (10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
DATASETS = ("digits", *TFDS_DATASETS)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in memory: images float32 in [0, 1], NHWC; labels int32."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train_images.shape[1:]


class DatasetUnavailableError(RuntimeError):
    """A tfds dataset is not prepared and cannot be downloaded here."""


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, split per class with a fixed seed (stratified)."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    images = (raw.images / 16.0).astype(np.float32)[..., None]
    labels = raw.target.astype(np.int32)
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


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Loads a prepared tfds dataset fully into memory; fails fast if it is not prepared."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetUnavailableError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir!r} and this machine "
            "cannot download it. Fixes: point --config.data_dir at a directory where it is "
            f"prepared; or run `tfds build {name} --data_dir=DIR` on a connected machine and "
            "copy DIR here; or use the offline dataset: --config=configs/<name>.py:digits"
        )
    splits = {}
    for split in ("train", "test"):
        chunks = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096)))
        images = np.concatenate([c["image"] for c in chunks])
        labels = np.concatenate([c["label"] for c in chunks])
        splits[split] = (images.astype(np.float32) / 255.0, labels.astype(np.int32))
    num_classes, mean, std = TFDS_DATASETS[name]
    return Dataset(name, *splits["train"], *splits["test"], num_classes, mean, std)


def load(name: str, data_dir: str | None = None) -> Dataset:
    """Loads ``digits`` or one of ``TFDS_DATASETS`` by name."""
    if name == "digits":
        return load_digits()
    if name in TFDS_DATASETS:
        return load_tfds(name, data_dir)
    raise ValueError(f"Unknown dataset {name!r}; set config.dataset to one of {DATASETS}")


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
