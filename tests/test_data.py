"""Data layer tests: every format reader and dataset on tiny files generated in ``tmp_path`` (no real data)."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ddkit.data import DatasetSpec, Preprocess, RealData, get_dataset_spec, load_dataset
from ddkit.data import formats
from ddkit.errors import ConfigError, DataError, UnknownNameError
from ddkit.registry import DATASETS

ALL = ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder"]


# ---------------------------------------------------------------------------------------------------------------
# tiny file writers
# ---------------------------------------------------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist(root: Path, sub: str = "MNIST", n_train: int = 30, n_test: int = 10, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    raw = root / sub / "raw"
    raw.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    return raw


def cifar_batch(n: int, label_key: str, k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): [i % k for i in range(n)], b"filenames": [b"x.png"] * n}


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", cifar_batch(n, "labels", 10, i))
    dump(folder / "test_batch", cifar_batch(n, "labels", 10, 9), protocol=5)
    dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    return folder


def make_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "train", cifar_batch(200, "fine_labels", 100, 1))
    dump(folder / "test", cifar_batch(100, "fine_labels", 100, 2))
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return folder


def make_imagefolder(root: Path, sizes: dict[str, tuple[int, int]], colour: set[str] = frozenset()) -> Path:
    """Two classes per split; ``sizes`` maps 'train'/'test' to an image size; ``colour`` lists classes in RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, (h, w) in sizes.items():
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                if cls in colour:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# registry and specs
# ---------------------------------------------------------------------------------------------------------------
def test_all_datasets_registered_with_consistent_specs():
    assert set(ALL) <= set(DATASETS.names())
    for name in ALL:
        spec = get_dataset_spec(name)
        assert isinstance(spec, DatasetSpec) and spec.name == name
        assert callable(spec.load_raw)
        if spec.mean is not None:
            assert len(spec.mean) == len(spec.std) == spec.channels
    assert get_dataset_spec("cifar10").dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert get_dataset_spec("MNIST").dsa_strategy == "color_crop_cutout_scale_rotate"
    assert get_dataset_spec("svhn").dsa_strategy == "color_crop_cutout_scale_rotate"
    assert not get_dataset_spec("digits").needs_root and get_dataset_spec("mnist").needs_root


def test_unknown_dataset_suggests_close_match():
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        load_dataset("fashion_mnist")


# ---------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> RealData:
    return load_dataset("digits")


def test_digits_shapes_split_and_normalisation(digits):
    assert digits.train_images.shape == (1347, 1, 8, 8) and digits.test_images.shape == (450, 1, 8, 8)
    assert digits.train_labels.dtype == torch.int64 and digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert abs(float(digits.train_images.mean())) < 1e-3 and abs(float(digits.train_images.std()) - 1) < 1e-3
    # stratified: every class is ~25% test
    train_counts = torch.bincount(digits.train_labels, minlength=10).float()
    test_counts = torch.bincount(digits.test_labels, minlength=10).float()
    assert torch.all((test_counts / (train_counts + test_counts) - 0.25).abs() < 0.01)
    assert "random_state=0" in digits.info["split"]


def test_digits_split_is_deterministic(digits):
    again = load_dataset("digits", root="/ignored")
    assert torch.equal(again.train_labels, digits.train_labels)
    assert torch.equal(again.train_images, digits.train_images)


def test_check_ipc_rejects_more_than_smallest_class(digits):
    smallest = min(digits.class_counts())
    digits.check_ipc(smallest)
    with pytest.raises(ConfigError, match=f"ipc <= {smallest}"):
        digits.check_ipc(smallest + 1)


def test_digits_zca_decodes_back(digits):
    real = load_dataset("digits", zca=True)
    assert real.preprocess.uses_zca and real.info["zca"]["eps"] == 0.1
    raw = digits.preprocess.decode(digits.train_images[:64])
    back = real.preprocess.decode(real.preprocess.encode(raw))
    assert torch.allclose(back, raw, atol=1e-4)
    assert torch.allclose(real.preprocess.decode(real.train_images[:64]), raw, atol=1e-4)


def test_image_size_resizes(digits):
    real = load_dataset("digits", image_size=16)
    assert real.image_shape == (1, 16, 16) and real.info["resized_to"] == [16, 16]
    with pytest.raises(ConfigError):
        load_dataset("digits", image_size=0)


# ---------------------------------------------------------------------------------------------------------------
# idx / MNIST
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gzip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz)  # no .gz suffix: detected by magic bytes
    out = formats.read_idx(path, expect=formats.IDX_IMAGES)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_bad_magic_names_file_and_expectation(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(5))
    with pytest.raises(DataError, match=r"bad idx magic 0x00000801 in .*labels: expected 0x00000803 \(ubyte images\)"):
        formats.read_idx(path, expect=formats.IDX_IMAGES)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DataError, match="bad idx magic 0x12345678"):
        formats.read_idx(tmp_path / "junk")


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((6, 28, 28)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"short read in .*imgs: header says 6x28x28 = 4704 bytes, file has 4604"):
        formats.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = write_idx(tmp_path / "imgs.gz", np.zeros((6, 28, 28)), gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"corrupt gzip file .*imgs\.gz"):
        formats.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_from_root_or_subfolders(tmp_path, gz):
    raw = make_mnist(tmp_path, gz=gz)
    for root in (tmp_path, tmp_path / "MNIST", raw):
        real = load_dataset("mnist", root)
        assert real.train_images.shape == (30, 1, 28, 28) and real.test_images.shape == (10, 1, 28, 28)
        assert real.train_labels.tolist() == [i % 10 for i in range(30)]
        assert real.preprocess.mean == (0.1307,) and real.info["folder"] == str(raw)


def test_fashion_mnist_and_wrong_folder_hint(tmp_path):
    make_mnist(tmp_path, sub="FashionMNIST")
    real = load_dataset("fashion-mnist", tmp_path)
    assert real.class_names[0] == "T-shirt/top" and real.preprocess.std == (0.3530,)
    with pytest.raises(DataError, match="looks like a FashionMNIST folder"):
        load_dataset("mnist", tmp_path / "FashionMNIST" / "raw")  # same file names: must not load silently


def test_mnist_missing_files_message(tmp_path):
    raw = make_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert f"not found in {raw}" in msg and "missing t10k-labels-idx1-ubyte[.gz]" in msg
    assert "train-images" not in msg.split("missing")[1].split(".")[0]  # only the missing file is listed
    assert "<root>/MNIST/raw/train-images-idx3-ubyte.gz" in msg


def test_mnist_image_label_count_mismatch(tmp_path):
    raw = make_mnist(tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(29) % 10, gz=True)
    with pytest.raises(DataError, match="30 images but 29 labels"):
        load_dataset("mnist", tmp_path)


def test_root_required_and_must_exist(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist.*--data-root"):
        load_dataset("cifar10", tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------------------
def test_cifar10_tiny(tmp_path):
    make_cifar10(tmp_path)
    real = load_dataset("cifar10", tmp_path)
    assert real.train_images.shape == (20, 3, 32, 32) and real.test_images.shape == (4, 3, 32, 32)
    assert real.class_names == [f"c{i}" for i in range(10)] and real.train_labels.dtype == torch.int64
    batch = formats.read_cifar_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    raw = torch.from_numpy(batch["data"].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.allclose(real.preprocess.decode(real.train_images[:4]), raw, atol=1e-5)


def test_cifar100_tiny_fine_labels(tmp_path):
    make_cifar100(tmp_path)
    real = load_dataset("cifar100", tmp_path / "cifar-100-python")  # the folder itself is accepted too
    assert real.num_classes == 100 and len(real.class_names) == 100 and real.class_names[5] == "f5"
    assert real.train_labels.max() == 99 and real.train_images.shape == (200, 3, 32, 32)


def test_cifar_truncated_pickle(tmp_path):
    folder = make_cifar10(tmp_path)
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="data_batch_3.*truncated or corrupt"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar10(tmp_path)
    dump(folder / "test_batch", {b"data": _Evil(), b"labels": [0]})
    with pytest.raises(DataError, match="refusing to load .*test_batch.*system"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_cifar_missing_and_bad_shape(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"not found in .*cifar-10-batches-py.*missing batches\.meta"):
        load_dataset("cifar10", tmp_path)
    bad = cifar_batch(4, "labels", 10, 0)
    bad[b"labels"] = [0, 1, 2]
    dump(folder / "data_batch_2", bad)
    with pytest.raises(DataError, match="data_batch_2 holds 4 images but 3 labels"):
        formats.cifar_batch_arrays(formats.read_cifar_pickle(folder / "data_batch_2"), folder / "data_batch_2",
                                   "labels")


# ---------------------------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------------------------
def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # 1..10, 10 meaning digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    real = load_dataset("svhn", tmp_path)
    assert real.train_images.shape == (12, 3, 32, 32) and real.test_images.shape == (5, 3, 32, 32)
    assert real.train_labels.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    x0 = torch.from_numpy(x[:, :, :, 0].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.allclose(real.preprocess.decode(real.test_images[:1])[0], x0, atol=1e-5)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------------------------
def test_imagefolder_grey(tmp_path):
    make_imagefolder(tmp_path, {"train": (10, 12), "test": (10, 12)})
    real = load_dataset("imagefolder", tmp_path)
    assert real.class_names == ["cat", "dog"] and real.num_classes == 2
    assert real.train_images.shape == (6, 1, 10, 12) and real.info["mode"] == "L"
    assert abs(float(real.train_images.mean())) < 1e-4  # mean/std computed from the training split


def test_imagefolder_mixed_colour_and_sizes(tmp_path):
    make_imagefolder(tmp_path, {"train": (10, 10), "test": (20, 20)}, colour={"dog"})
    real = load_dataset("imagefolder", tmp_path)
    assert real.info["mode"] == "RGB" and real.train_images.shape == (6, 3, 10, 10)
    assert real.test_images.shape == (6, 3, 10, 10) and "resized" in real.info
    real = load_dataset("imagefolder", tmp_path, image_size=8)
    assert real.image_shape == (3, 8, 8) and real.test_images.shape == (6, 3, 8, 8)


def test_imagefolder_class_mismatch(tmp_path):
    make_imagefolder(tmp_path, {"train": (8, 8), "test": (8, 8)})
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "cow")
    with pytest.raises(DataError, match=r"missing in test: \['dog'\], not in train: \['cow'\]"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_unreadable_image(tmp_path):
    make_imagefolder(tmp_path, {"train": (8, 8), "test": (8, 8)})
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_dataset("imagefolder", tmp_path)


def test_preprocess_is_a_plain_normaliser_without_zca(digits):
    assert isinstance(digits.preprocess, Preprocess) and not digits.preprocess.uses_zca
