"""Data sources: image folders (and tar archives of them) with their cache, torchvision's
CIFAR files, and the stratified train/validation subsets."""

import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from samrobust import input_pipeline
from tests.helpers import (
    CIFAR10_JPEG,
    REPO,
    image,
    run_module,
    seed_of,
    train_on_cifar10_slice,
    write_folder,
)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    return root, write_folder(root)


def load(root, tmp_path, **kw) -> input_pipeline.Dataset:
    return input_pipeline.load("image_folder", str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_image_folder_labels_pixels_and_statistics(folder, tmp_path):
    root, pixels = folder
    ds = load(root, tmp_path)
    assert ds.train_images.shape == (18, 8, 8, 3) and ds.test_images.shape == (6, 8, 8, 3)
    assert ds.train_images.dtype == np.float32 and ds.num_classes == 3
    # Class index = position of the folder name in sorted order; files in sorted order.
    np.testing.assert_array_equal(ds.train_labels, np.repeat([0, 1, 2], 6))
    np.testing.assert_array_equal(ds.test_labels, np.repeat([0, 1, 2], 2))
    # PNG is lossless: the exact pixels, scaled to [0, 1].
    np.testing.assert_array_equal(np.round(ds.train_images[6 + 2] * 255), pixels["train", "cat", 2])
    np.testing.assert_array_equal(np.round(ds.test_images[4] * 255), pixels["test", "dog", 0])
    # JPEG is lossy (and random pixels its worst case) but keeps each block's mean colour.
    written = image(seed_of("train", 1, 1)).astype(np.float32)
    assert np.abs(ds.train_images[1].mean((0, 1)) * 255 - written.mean((0, 1))).max() < 4
    train = ds.train_images.astype(np.float64)
    np.testing.assert_allclose(ds.mean, train.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(ds.std, train.std(axis=(0, 1, 2)), atol=1e-6)


def test_tar_gz_archive_equals_the_folder(folder, tmp_path):
    root, _ = folder
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    a, b = load(root, tmp_path), load(archive, tmp_path)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.mean == b.mean and a.num_classes == b.num_classes


def test_cache_is_used_then_invalidated_by_a_change(folder, tmp_path, monkeypatch):
    root, _ = folder
    first = load(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 1
    real_decode = input_pipeline._decode_folder

    def no_decode(path):
        raise AssertionError(f"decoded {path} again instead of using the cache")

    monkeypatch.setattr(input_pipeline, "_decode_folder", no_decode)
    cached = load(root, tmp_path)
    np.testing.assert_array_equal(cached.train_images, first.train_images)

    Image.fromarray(image(99)).save(root / "train" / "dog" / "999.png")  # a change
    with pytest.raises(AssertionError, match="decoded"):
        load(root, tmp_path)
    monkeypatch.setattr(input_pipeline, "_decode_folder", real_decode)
    changed = load(root, tmp_path)
    assert len(changed.train_labels) == 19
    np.testing.assert_array_equal(np.round(changed.train_images[-1] * 255), image(99))
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 1  # the old one went


def test_archive_cache_follows_content_not_path_or_mtime(folder, tmp_path, monkeypatch):
    root, _ = folder
    archive = tmp_path / "a" / "images.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    first = load(archive, tmp_path)
    real_decode = input_pipeline._decode_folder

    def no_decode(path):
        raise AssertionError(f"decoded {path} again instead of using the cache")

    monkeypatch.setattr(input_pipeline, "_decode_folder", no_decode)
    copy = tmp_path / "b" / "images.tar"  # a re-copy: another path, a newer mtime
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, ns=(archive.stat().st_mtime_ns + 10**9,) * 2)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load("b/images.tar", tmp_path).train_images, first.train_images)

    with tarfile.open(copy, "a") as tar:  # a change of content
        tar.add(root / "train" / "cat" / "000.png", arcname="train/cat/extra.png")
    with pytest.raises(AssertionError, match="decoded"):
        load(copy, tmp_path)
    monkeypatch.setattr(input_pipeline, "_decode_folder", real_decode)
    assert len(load(copy, tmp_path).train_labels) == 19
    # The changed copy's cache replaced nothing of the unchanged original's.
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 2
    monkeypatch.setattr(input_pipeline, "_decode_folder", no_decode)
    np.testing.assert_array_equal(load(archive, tmp_path).train_images, first.train_images)


def test_a_folder_by_relative_or_absolute_path_shares_one_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    load(root, tmp_path)
    monkeypatch.chdir(root.parent)
    load(root.name, tmp_path)
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 1


def break_layout(root, case: str) -> str:
    """Damages a folder as ``case`` says; returns a text the error must contain."""
    if case == "no_train":
        os.rename(root / "train", root / "training")
        return "no train/ folder"
    if case == "no_test":
        os.rename(root / "test", root / "testing")
        return "no test/ folder"
    if case == "empty_test":
        for f in (root / "test").rglob("*.*"):
            f.unlink()
        return "no images in test/"
    if case == "sizes":
        Image.fromarray(image(5, size=9)).save(root / "train" / "cat" / "100.png")
        return f"{root / 'train' / 'cat' / '100.png'} is 9x9"
    if case == "unreadable":
        (root / "test" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
        return f"cannot decode image {root / 'test' / 'dog' / 'bad.jpg'}"
    if case == "class_missing":
        (root / "test" / "horse").mkdir()
        Image.fromarray(image(6)).save(root / "test" / "horse" / "0.png")
        return "test classes ['horse'] have no folder in train/"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case", ["no_train", "no_test", "empty_test", "sizes", "unreadable", "class_missing"]
)
def test_bad_folders_fail_naming_the_path(folder, tmp_path, case):
    root, _ = folder
    expected = break_layout(root, case)
    with pytest.raises(input_pipeline.DatasetUnavailableError) as e:
        load(root, tmp_path)
    assert expected in str(e.value)
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing half-made is cached


def test_bad_folder_through_the_cli_is_one_line(folder, tmp_path):
    root, _ = folder
    expected = break_layout(root, "unreadable")
    proc = run_module(
        "samrobust.main",
        "--config=configs/sgd.py:digits",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=image_folder",
        f"--config.data_dir={root}",
        f"--config.cache_dir={tmp_path / 'cache'}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    assert "Traceback" not in proc.stderr


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
    ds = load(root, tmp_path)
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
    """1,000 train and 200 test images of the shared CIFAR-10 JPEG copy, width 8, 20 epochs."""
    results = train_on_cifar10_slice(
        tmp_path,
        "configs/sgd.py",
        "--config.width=8",
        "--config.num_epochs=20",
        "--config.batch_size=64",
        "--config.eval_batch_size=100",
        "--config.eval_pgd_steps=1",
        "--config.log_every_steps=100",
    )
    assert results["dataset"] == "image_folder" and results["train_examples"] == 1000
    assert results["test_examples"] == 200
    assert results["accuracy"]["clean"] > 0.25, results["accuracy"]  # chance: 0.10
