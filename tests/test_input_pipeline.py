"""Data sources (torchvision's CIFAR files), the stratified train/validation subsets and
the evaluation subset."""

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from samrobust import input_pipeline, train
from tests.helpers import (
    CIFAR10_JPEG,
    REPO,
    digits_config,
    load_folder,
    train_on_cifar10_slice,
    write_folder,
)


def write_torchvision_cifar(root, name: str) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's pickled CIFAR batches (bytes keys, ``data`` N x 3072 uint8 in CHW order);
    returns the train images (NHWC) and labels written."""
    folder, train_files, test_files, label_key = input_pipeline.TORCHVISION_CIFAR[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    num_classes = 10 if name == "cifar10" else 100
    all_images, all_labels = [], []
    for i, file in enumerate((*train_files, *test_files)):
        chw = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, num_classes, 4)]
        entry = {b"batch_label": b"batch", b"data": chw.reshape(4, 3072), b"filenames": []}
        entry[label_key] = labels
        if name == "cifar100":
            entry[b"coarse_labels"] = [x // 5 for x in labels]
        with open(root / folder / file, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if i < len(train_files):
            all_images.append(chw.transpose(0, 2, 3, 1))
            all_labels += labels
    return np.concatenate(all_images), np.array(all_labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_cifar_files_load_with_their_labels(tmp_path, name):
    images, labels = write_torchvision_cifar(tmp_path, name)
    ds = input_pipeline.load(name, str(tmp_path))
    # Read without tfds: in a fresh interpreter (other tests may have imported tensorflow).
    check = (
        "import sys; from samrobust import input_pipeline; "
        f"input_pipeline.load({name!r}, {str(tmp_path)!r}); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(ds.train_labels, labels)
    np.testing.assert_array_equal(np.round(ds.train_images * 255), images)
    assert ds.test_images.shape == (4, 32, 32, 3)
    assert ds.num_classes == (10 if name == "cifar10" else 100)
    assert ds.mean == input_pipeline.TFDS_DATASETS[name][1]


def indexed_dataset(n_per_class=(50, 30, 20)) -> input_pipeline.Dataset:
    """Labels in shuffled order; every image holds its own index as its one pixel."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    labels = np.random.default_rng(1).permutation(labels).astype(np.int32)
    images = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1)
    return input_pipeline.Dataset(
        "indexed", images, labels, images[:5], labels[:5], len(n_per_class), (0.0,), (1.0,)
    )


def test_train_and_val_subsets_are_stratified_disjoint_and_fixed():
    ds = indexed_dataset()
    a = input_pipeline.split_train(ds, train_examples=40, val_examples=20)
    b = input_pipeline.split_train(ds, train_examples=40, val_examples=20)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.val_images, b.val_images)
    train_ids = a.train_images.ravel().astype(int)
    val_ids = a.val_images.ravel().astype(int)
    assert len(train_ids) == 40 and len(val_ids) == 20
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(ds.train_labels[train_ids], a.train_labels)  # labels follow
    np.testing.assert_array_equal(np.bincount(a.train_labels), [20, 12, 8])  # 50:30:20
    np.testing.assert_array_equal(np.bincount(a.val_labels), [10, 6, 4])
    # The validation split does not depend on the train subset's size.
    c = input_pipeline.split_train(ds, train_examples=-1, val_examples=20)
    np.testing.assert_array_equal(c.val_images, a.val_images)
    assert len(c.train_labels) == 80 and set(a.train_images.ravel()) <= set(c.train_images.ravel())
    assert input_pipeline.split_train(ds) is ds


def test_subset_sizes_that_do_not_fit_are_config_errors():
    ds = indexed_dataset()
    with pytest.raises(ValueError, match="config.val_examples = 100"):
        input_pipeline.split_train(ds, val_examples=100)
    with pytest.raises(ValueError, match=r"config.train_examples = 90: .*\[1, 80\]"):
        input_pipeline.split_train(ds, train_examples=90, val_examples=20)


def test_the_evaluation_subset_of_a_class_sorted_folder_covers_every_class(tmp_path):
    """An image folder reads class by class (test labels sorted): N points of it are a
    stratified draw, never the first N (one class), and the same N points in every process."""
    root = tmp_path / "images"
    write_folder(root, per_class=(1, 30))
    ds = load_folder(root, tmp_path)
    assert np.all(np.diff(ds.test_labels) >= 0)  # the folder's order: sorted by class
    for n in (7, 12, 29):
        idx = input_pipeline.eval_subset(ds.test_labels, n)
        counts = np.bincount(ds.test_labels[idx], minlength=3)
        assert len(set(idx)) == n and counts.sum() == n
        assert np.all(np.abs(counts - n / 3) <= 1), (n, counts)
    np.testing.assert_array_equal(input_pipeline.eval_subset(ds.test_labels, 90), np.arange(90))
    np.testing.assert_array_equal(input_pipeline.eval_subset(ds.test_labels, -1), np.arange(90))
    with pytest.raises(ValueError, match="n > 0"):
        input_pipeline.eval_subset(ds.test_labels, 0)

    code = (
        "import numpy as np; from samrobust import input_pipeline as ip; "
        "print(ip.eval_subset(np.repeat(np.arange(3), 30), 12).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert other.returncode == 0, other.stderr[-2000:]
    here = input_pipeline.eval_subset(ds.test_labels, 12)
    assert json.loads(other.stdout) == here.tolist()
    images, labels, subset = input_pipeline.evaluation_points(ds, 12)
    np.testing.assert_array_equal(images, ds.test_images[here])
    assert subset["rule"] == input_pipeline.EVAL_SUBSET_RULE and subset["num_examples"] == 12
    assert subset == input_pipeline.describe_subset(here, 90)
    assert input_pipeline.evaluation_points(ds)[2]["rule"] == "all"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CIFAR10_JPEG), reason="../shared/data not beside the repo")
def test_training_on_a_slice_of_real_cifar10_beats_chance(tmp_path):
    """1,000 train and 200 test images of the shared CIFAR-10 JPEG copy, width 8, 10 epochs
    (0.415 clean when written, 0.42 at 20)."""
    results = train_on_cifar10_slice(
        tmp_path,
        "configs/sgd.py",
        "--config.width=8",
        "--config.num_epochs=10",
        "--config.batch_size=64",
        "--config.eval_batch_size=100",
        "--config.eval_pgd_steps=0",
        "--config.log_every_steps=100",
    )
    assert results["dataset"] == "image_folder" and results["train_examples"] == 1000
    assert results["test_examples"] == 200
    assert results["accuracy"]["clean"] > 0.25, results["accuracy"]  # chance: 0.10


def test_missing_tfds_dataset_fails_fast_with_the_fixes(tmp_path):
    config = digits_config(dataset="cifar10", data_dir=str(tmp_path / "no_data"))
    start = time.perf_counter()
    with pytest.raises(input_pipeline.DatasetUnavailableError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 60  # not the minutes of download retries
    for fix in ("--config.data_dir", "tfds build cifar10", ":digits"):
        assert fix in str(e.value)


def test_digits_split_is_fixed_and_stratified():
    a, b = input_pipeline.load_digits(), input_pipeline.load_digits()
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert len(a.train_images) + len(a.test_images) == 1797
    assert a.image_shape == (8, 8, 1) and a.train_images.max() <= 1.0
    counts = np.bincount(a.test_labels, minlength=10) / np.bincount(
        np.concatenate([a.train_labels, a.test_labels]), minlength=10
    )
    np.testing.assert_allclose(counts, 0.2, atol=0.01)
    # The file read directly is what scikit-learn's loader returns, row for row.
    from sklearn.datasets import load_digits

    raw, rows = load_digits(), input_pipeline._sklearn_digits()
    np.testing.assert_array_equal(rows[:, :-1].reshape(-1, 8, 8), raw.images)
    np.testing.assert_array_equal(rows[:, -1], raw.target)


def test_train_batches_resume_and_host_slices():
    images = np.arange(100, dtype=np.float32)[:, None]
    labels = np.arange(100, dtype=np.int32)
    full = input_pipeline.train_batches(images, labels, 20, seed=3)
    seq = [next(full)[1] for _ in range(12)]
    resumed = input_pipeline.train_batches(images, labels, 20, seed=3, start_step=7)
    for s in range(7, 12):
        np.testing.assert_array_equal(next(resumed)[1], seq[s])
    # An epoch (5 steps) covers every example once; epochs differ in order.
    assert sorted(np.concatenate(seq[:5])) == list(range(100))
    assert not np.array_equal(np.concatenate(seq[:5]), np.concatenate(seq[5:10]))
    hosts = [
        next(
            input_pipeline.train_batches(
                images, labels, 20, seed=3, process_index=i, process_count=2
            )
        )[1]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.sort(np.concatenate(hosts)), np.sort(seq[0]))


def test_tfds_path_converts_images_and_labels(monkeypatch):
    """load_tfds on tfds's own mock data (its testing utility; no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=12):
        ds = input_pipeline.load("cifar10")
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.float32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    assert ds.train_images.max() > 0.5  # scaled from uint8, not left in [0, 255] or [0, 1/255]
    assert ds.test_labels.dtype == np.int32 and ds.test_labels.max() < 10
    assert (ds.num_classes, ds.mean) == (10, (0.4914, 0.4822, 0.4465))
