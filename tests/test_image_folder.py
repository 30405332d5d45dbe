"""Image folders (and tar archives of them) with their cache, read as a new user's data."""

import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from samrobust import image_folder
from samrobust.errors import DatasetUnavailableError
from tests.helpers import image, load_folder, run_module, seed_of, write_folder


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    return root, write_folder(root)


def test_image_folder_labels_pixels_and_statistics(folder, tmp_path):
    root, pixels = folder
    ds = load_folder(root, tmp_path)
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
    a, b = load_folder(root, tmp_path), load_folder(archive, tmp_path)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.mean == b.mean and a.num_classes == b.num_classes


def test_cache_is_used_then_invalidated_by_a_change(folder, tmp_path, monkeypatch):
    root, _ = folder
    first = load_folder(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 1
    real_decode = image_folder._decode_folder

    def no_decode(path):
        raise AssertionError(f"decoded {path} again instead of using the cache")

    monkeypatch.setattr(image_folder, "_decode_folder", no_decode)
    cached = load_folder(root, tmp_path)
    np.testing.assert_array_equal(cached.train_images, first.train_images)

    Image.fromarray(image(99)).save(root / "train" / "dog" / "999.png")  # a change
    with pytest.raises(AssertionError, match="decoded"):
        load_folder(root, tmp_path)
    monkeypatch.setattr(image_folder, "_decode_folder", real_decode)
    changed = load_folder(root, tmp_path)
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
    first = load_folder(archive, tmp_path)
    real_decode = image_folder._decode_folder

    def no_decode(path):
        raise AssertionError(f"decoded {path} again instead of using the cache")

    monkeypatch.setattr(image_folder, "_decode_folder", no_decode)
    copy = tmp_path / "b" / "images.tar"  # a re-copy: another path, a newer mtime
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, ns=(archive.stat().st_mtime_ns + 10**9,) * 2)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(
        load_folder("b/images.tar", tmp_path).train_images, first.train_images
    )

    with tarfile.open(copy, "a") as tar:  # a change of content
        tar.add(root / "train" / "cat" / "000.png", arcname="train/cat/extra.png")
    with pytest.raises(AssertionError, match="decoded"):
        load_folder(copy, tmp_path)
    monkeypatch.setattr(image_folder, "_decode_folder", real_decode)
    assert len(load_folder(copy, tmp_path).train_labels) == 19
    # The changed copy's cache replaced nothing of the unchanged original's.
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 2
    monkeypatch.setattr(image_folder, "_decode_folder", no_decode)
    np.testing.assert_array_equal(load_folder(archive, tmp_path).train_images, first.train_images)


def test_a_folder_by_relative_or_absolute_path_shares_one_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    load_folder(root, tmp_path)
    monkeypatch.chdir(root.parent)
    load_folder(root.name, tmp_path)
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
    with pytest.raises(DatasetUnavailableError) as e:
        load_folder(root, tmp_path)
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
