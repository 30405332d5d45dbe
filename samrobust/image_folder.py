"""Image folders: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (jpg, jpeg, png;
class index = position in the sorted train folder names), ``ROOT`` a directory or a
``.tar``/``.tar.gz`` archive of one, local or remote.

Decoded with Pillow in threads; the uint8 arrays are cached (:func:`cache_directory`), keyed
by a local archive's content, else by the path and the files' names, sizes and modification
times: a changed folder or archive is decoded again (and its old cache deleted), a moved or
re-copied local archive is not. Normalisation statistics are computed on the whole train
split. The folder comes sorted by class: take evaluation points with
:func:`samrobust.input_pipeline.eval_subset`, never the first N.
"""

import concurrent.futures
import hashlib
import io
import os
import tarfile
import time

import numpy as np
from absl import logging
from etils import epath

from samrobust import paths
from samrobust.errors import DatasetUnavailableError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def cache_directory(cache_dir: str | None = None) -> epath.Path:
    """Where decoded image folders are cached: ``cache_dir``, else ``$SAMROBUST_CACHE``, else
    ``$XDG_CACHE_HOME/samrobust`` (``~/.cache/samrobust``)."""
    if cache_dir:
        return epath.Path(cache_dir)
    if os.environ.get("SAMROBUST_CACHE"):
        return epath.Path(os.environ["SAMROBUST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (epath.Path(xdg) if xdg else epath.Path("~/.cache").expanduser()) / "samrobust"


def _is_archive(root: epath.Path) -> bool:
    return root.name.endswith((".tar", ".tar.gz", ".tgz")) and not root.is_dir()


def _stat(path: epath.Path) -> tuple[int, int]:
    """(size, modification time): nanoseconds on local disks, the store's own unit remotely."""
    if not paths.is_local(path):
        st = path.stat()
        return st.length, st.mtime
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _folder_files(root: epath.Path) -> dict[str, list[tuple[str, int, int]]]:
    """``{split: [(relative path, size, mtime_ns)]}`` of the image files under ``root``."""
    files: dict[str, list[tuple[str, int, int]]] = {"train": [], "test": []}
    for split in files:
        if not (root / split).is_dir():
            continue
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir():
                continue
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files[split].append((f"{split}/{class_dir.name}/{f.name}", *_stat(f)))
    return files


def _fingerprint(root: epath.Path) -> str:
    """A hash of what the cache depends on. A local archive: its content (so a copy of it, or
    the same file under another path or mtime, hits the same cache). A remote archive: its
    path, size and mtime. A folder: its path and every image file's name, size and mtime."""
    h = hashlib.sha256(b"samrobust image_folder v2\0")
    if _is_archive(root) and paths.is_local(root):
        with root.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    elif _is_archive(root):
        h.update(os.fspath(root).encode())
        h.update("{} {}".format(*_stat(root)).encode())
    else:
        h.update(os.fspath(root).encode())
        for split, entries in _folder_files(root).items():
            for rel, size, mtime in entries:
                h.update(f"{split} {rel} {size} {mtime}\n".encode())
    return h.hexdigest()[:20]


def _cache_file(directory: epath.Path, root: epath.Path) -> epath.Path:
    """``image_folder-<source>-<state>.npz``: ``<source>`` hashes ``root``'s path,
    ``<state>`` is :func:`_fingerprint`. An existing cache of the same state under another
    source (the same archive content elsewhere) is used as it is."""
    state = _fingerprint(root)
    source = hashlib.sha256(os.fspath(root).encode()).hexdigest()[:8]
    cache = directory / f"image_folder-{source}-{state}.npz"
    if not cache.exists() and directory.is_dir():
        cache = next(iter(sorted(directory.glob(f"image_folder-*-{state}.npz"))), cache)
    return cache


def _remove_stale_caches(cache: epath.Path) -> None:
    """Deletes the caches of ``cache``'s source in other states (the folder or archive as it
    was before a change), so a changed dataset does not leave its old arrays behind."""
    source = cache.name.split("-")[1]
    for stale in cache.parent.glob(f"image_folder-{source}-*.npz"):
        if stale.name != cache.name:
            try:
                stale.unlink()
                logging.info("removed the stale cache %s", stale)
            except OSError as e:  # another process removed it, or a read-only cache
                logging.warning("cannot remove the stale cache %s (%s)", stale, e)


def _read_encoded(root: epath.Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """``{split: [(class name, path for messages, encoded bytes)]}`` from a folder or archive."""
    out: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    if _is_archive(root):
        try:
            with root.open("rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                for member in tar:
                    parts = member.name.lstrip("./").split("/")
                    if not member.isfile() or len(parts) < 3:
                        continue
                    # The layout may sit under a top folder: .../train/<class>/<file>.
                    split, cls, name = parts[-3:]
                    if split in out and name.lower().endswith(IMAGE_SUFFIXES):
                        data = tar.extractfile(member).read()
                        out[split].append((cls, f"{root}:{member.name}", data))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetUnavailableError(
                f"{root} is not a readable tar archive ({type(e).__name__}: {e}). Pass an "
                "image folder or a .tar/.tar.gz of one as --config.data_dir."
            ) from e
        return out
    for split, entries in _folder_files(root).items():
        for rel, _, _ in entries:
            path = root / rel
            out[split].append((rel.split("/")[1], os.fspath(path), path.read_bytes()))
    return out


def _decode(item: tuple[str, str, bytes]) -> np.ndarray:
    from PIL import Image

    _, where, data = item
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB"))
    except Exception as e:  # noqa: BLE001 - Pillow raises several types
        raise DatasetUnavailableError(
            f"cannot decode image {where} ({type(e).__name__}: {e}). Remove or replace that file."
        ) from e


def _decode_all(items: list[tuple[str, str, bytes]]) -> list[np.ndarray]:
    return [_decode(item) for item in items]


def _describe_shape(image: np.ndarray) -> str:
    channels = image.shape[2] if image.ndim == 3 else 1
    return f"{image.shape[1]}x{image.shape[0]} with {channels} channel(s)"


def _decode_folder(root: epath.Path) -> dict[str, np.ndarray | list[str]]:
    """Decodes every image of ``root`` with Pillow in threads; checks the layout."""
    hint = "expected ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg"
    encoded = _read_encoded(root)
    for split in ("train", "test"):
        if not encoded[split]:
            raise DatasetUnavailableError(
                f"{root}: no images in {split}/ ({hint}; jpg, jpeg or png). Fix --config.data_dir."
            )
    classes = sorted({cls for cls, _, _ in encoded["train"]})
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({cls for cls, _, _ in encoded["test"]} - set(classes))
    if missing:
        raise DatasetUnavailableError(
            f"{root}: test classes {missing} have no folder in train/ (class indices come from "
            "the sorted train folder names). Add them to train/ or remove them from test/."
        )
    arrays: dict[str, np.ndarray | list[str]] = {"classes": classes}
    first = _decode(encoded["train"][0])
    # Pillow releases the GIL while it decodes, but a 32x32 JPEG is mostly Python overhead:
    # measured on 2 cores, 2 threads take 1.5x the serial time at 32x32, 1.2x at 64x64 and
    # 0.7x at 128x128. Threads from 96x96 up.
    workers = (os.cpu_count() or 1) if first.shape[0] * first.shape[1] >= 96 * 96 else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for split in ("train", "test"):
            items = encoded[split]
            chunks = [items[i : i + 512] for i in range(0, len(items), 512)]
            images = [im for chunk in pool.map(_decode_all, chunks) for im in chunk]
            for item, im in zip(items, images, strict=True):
                if im.shape != first.shape:
                    raise DatasetUnavailableError(
                        f"{root}: images differ in size: {item[1]} is {_describe_shape(im)}, "
                        f"{encoded['train'][0][1]} {_describe_shape(first)}. Resize the "
                        "images to one size first."
                    )
            stacked = np.stack(images)
            arrays[f"{split}_images"] = stacked if stacked.ndim == 4 else stacked[..., None]
            arrays[f"{split}_labels"] = np.array([index[c] for c, _, _ in items], np.int32)
    return arrays


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 sums)."""
    x = images.reshape(-1, images.shape[-1])
    mean = x.mean(axis=0, dtype=np.float64)
    std = np.sqrt(np.mean([(x[:, c] - mean[c] * 1.0) ** 2 for c in range(x.shape[1])], axis=1))
    return mean / 255.0, std / 255.0


def read(data_dir: str | None, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """An image folder (or a tar archive of one) through the cache: uint8 ``train_images``
    and ``test_images`` (NHWC), int32 ``train_labels`` and ``test_labels``, ``classes`` (the
    folder names) and the train split's per-channel ``mean`` and ``std`` in [0, 1] units."""
    if not data_dir:
        raise DatasetUnavailableError(
            "--config.dataset=image_folder needs --config.data_dir=ROOT, a folder (or .tar/"
            ".tar.gz) holding train/<class>/*.jpg and test/<class>/*.jpg"
        )
    root = paths.path(epath.Path(data_dir).expanduser())
    if not root.exists():
        raise DatasetUnavailableError(
            f"--config.data_dir={data_dir} does not exist: pass a folder (or .tar/.tar.gz) "
            "holding train/<class>/* and test/<class>/*"
        )
    if not _is_archive(root):
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise DatasetUnavailableError(
                    f"{root} has no {split}/ folder: an image folder holds train/<class>/* "
                    "and test/<class>/*. Fix --config.data_dir."
                )
    start = time.perf_counter()
    cache = _cache_file(cache_directory(cache_dir), root)
    arrays: dict | None = None
    if cache.exists():
        try:
            with cache.open("rb") as f, np.load(f) as z:
                arrays = {k: z[k] for k in z.files}
            how = f"from the cache {cache}"
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt
            logging.warning("cache %s unreadable (%s); decoding %s again", cache, e, root)
    if arrays is None:
        arrays = _decode_folder(root)
        arrays["mean"], arrays["std"] = _channel_stats(arrays["train_images"])
        how = "decoded"
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
            with tmp.open("wb") as f:
                np.savez(f, **arrays)
            tmp.rename(cache)
            how += f", cached in {cache}"
            _remove_stale_caches(cache)
        except OSError as e:
            logging.warning(
                "cannot write the cache %s (%s); set --config.cache_dir to a writable folder",
                cache,
                e,
            )
    logging.info(
        "image_folder %s: %d train, %d test images of %s, %d classes (%s in %.1f s)",
        root,
        len(arrays["train_labels"]),
        len(arrays["test_labels"]),
        "x".join(map(str, arrays["train_images"].shape[1:])),
        len(arrays["classes"]),
        how,
        time.perf_counter() - start,
    )
    return arrays
