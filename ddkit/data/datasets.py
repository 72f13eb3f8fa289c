"""Dataset specs (one registered :class:`DatasetSpec` per dataset) and :func:`load_dataset`.

A spec holds the facts about a dataset that later stages need (shape, classes, normalisation, DSA strategy) and a
raw loader that reads the files as stored.  :func:`load_dataset` is the one place that turns raw pixels into the
model space, so every dataset is scaled, resized, normalised or ZCA-whitened in exactly the same way.

Normalisation constants are those of the official DC/DSA/DM code (``VICO-UoE/DatasetCondensation``,
``utils.get_dataset``) so that results are comparable with the papers; DSA strategies follow the DSA README
(no flip for digit datasets, where flipping changes the class).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, DataError, DDKitWarning
from ..registry import DATASETS
from . import formats
from .preprocess import DEFAULT_ZCA_EPS, Preprocess
from .realdata import RealData

DSA_WITH_FLIP = "color_crop_cutout_flip_scale_rotate"
DSA_NO_FLIP = "color_crop_cutout_scale_rotate"  # digits: a flipped 2 or 5 is not a 2 or 5

DIGIT_NAMES = [str(d) for d in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]  # torchvision's FashionMNIST.classes


class RawSplits(NamedTuple):
    """What a raw loader returns: images as stored (``uint8`` 0..255 or float in [0, 1]), ``[N, C, H, W]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    info: dict[str, Any]


RawLoader = Callable[..., RawSplits]  # load_raw(root: Path | None, *, image_size: int | None = None)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset plus its raw loader.

    ``image_size`` and ``num_classes`` are ``None`` when they depend on the files (image folders); ``mean`` and
    ``std`` are ``None`` when they are computed from the training split (digits, image folders).
    """

    name: str
    channels: int | None
    image_size: tuple[int, int] | None
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    dsa_strategy: str
    description: str
    needs_root: bool
    load_raw: RawLoader = field(repr=False, compare=False)


# --------------------------------------------------------------------------------------------------------------
# helpers shared by the loaders
# --------------------------------------------------------------------------------------------------------------
def _missing_files_error(dataset: str, folder: Path, missing: list[str], layout: str, others: list[Path],
                         hint: str = "") -> DataError:
    looked = f" (also looked in {', '.join(str(p) for p in others)})" if others else ""
    return DataError(
        f"{dataset} files not found in {folder}{looked}: missing {', '.join(missing)}. Expected {layout}"
        + (f". {hint}" if hint else "")
    )


def _locate(dataset: str, candidates: list[Path], names: list[str], layout: str, allow_gz: bool = False,
            hint: str = "") -> tuple[Path, dict[str, Path]]:
    """The first candidate folder holding every file in ``names``, with the path of each file.

    When none does, the error reports the candidate with the most files present, i.e. the folder the user most
    likely meant, with exactly which files are missing there.
    """
    best: tuple[int, Path, list[str]] | None = None
    for folder in candidates:
        found = {n: formats.find_file(folder, n, allow_gz) for n in names}
        missing = [n + ("[.gz]" if allow_gz else "") for n, p in found.items() if p is None]
        if not missing:
            return folder, {n: p for n, p in found.items() if p is not None}
        score = (len(names) - len(missing)) * 2 + folder.is_dir()
        if best is None or score > best[0]:
            best = (score, folder, missing)
    assert best is not None
    others = [c for c in candidates if c != best[1] and c.is_dir()]
    raise _missing_files_error(dataset, best[1], best[2], layout, others, hint)


def _require_root(root: Path | None, dataset: str) -> Path:
    """Raw loaders may be called directly (not through ``load_dataset``), so they check their root too."""
    if root is None:
        raise DataError(f"{dataset} is read from local files: pass --data-root (root=...) pointing at them")
    return Path(root)


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")


# --------------------------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# --------------------------------------------------------------------------------------------------------------
DIGITS_SPLIT = "sklearn train_test_split(test_size=0.25, stratify=y, random_state=0)"


def load_digits_raw(root: Path | None = None, *, image_size: int | None = None) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16, scaled here to [0, 1]).

    There is no official split, so a fixed stratified one is used: ``train_test_split(test_size=0.25,
    stratify=y, random_state=0)`` gives 1,347 training and 450 test images with the class proportions of the
    whole set, identical on every machine.  ``root`` is ignored: the data ship with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return RawSplits(x_tr, y_tr, x_te, y_te, list(DIGIT_NAMES), {"split": DIGITS_SPLIT, "source": "sklearn"})


# --------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx files, torchvision layout)
# --------------------------------------------------------------------------------------------------------------
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_MNIST_DIRS = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST")


def _idx_candidates(root: Path, subdir: str) -> list[Path]:
    """Where the idx files may be: ``root/<subdir>/raw`` (torchvision), ``root/<subdir>``, ``root/raw``, ``root``.

    The last two are skipped when the path names another torchvision dataset (``.../MNIST/raw`` when
    Fashion-MNIST was asked for): the files have identical names, so the folder is the only guard.
    """
    candidates = [root / subdir / "raw", root / subdir]
    if not _other_mnist_dirs(root, subdir):
        candidates += [root / "raw", root]
    return candidates


def _other_mnist_dirs(root: Path, subdir: str) -> list[str]:
    return [d for d in _TORCHVISION_MNIST_DIRS if d != subdir and d in root.parts]


def _idx_loader(dataset: str, subdir: str, class_names: list[str]) -> RawLoader:
    """A raw loader for an MNIST-format dataset stored as torchvision does (``<root>/<subdir>/raw/*-ubyte[.gz]``)."""
    layout = f"torchvision layout: <root>/{subdir}/raw/" + ", ".join(n + ".gz" for n in IDX_FILES.values()) + \
             f" (gzipped or not; <root> is what --data-root points at, or <root>/{subdir} or its raw folder)"

    def load_raw(root: Path | None, *, image_size: int | None = None) -> RawSplits:
        root = _require_root(root, dataset)
        wrong = _other_mnist_dirs(root, subdir)
        hint = (f"{root} looks like a {wrong[0]} folder, not {subdir}; "
                f"point --data-root at the folder that holds {subdir}/") if wrong else ""
        folder, paths = _locate(dataset, _idx_candidates(root, subdir), list(IDX_FILES.values()), layout,
                                allow_gz=True, hint=hint)
        p = {key: paths[name] for key, name in IDX_FILES.items()}
        arrays = {}
        for split in ("train", "test"):
            images = formats.read_idx(p[f"{split}_images"], expect=formats.IDX_IMAGES)
            labels = formats.read_idx(p[f"{split}_labels"], expect=formats.IDX_LABELS)
            _check_pair(images, labels, f"{p[f'{split}_images']} and {p[f'{split}_labels']}")
            arrays[split] = (images[:, None], labels.astype(np.int64))
        info = {"folder": str(folder), "files": [str(v) for v in p.values()], "split": "official train/test"}
        return RawSplits(*arrays["train"], *arrays["test"], list(class_names), info)

    return load_raw


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)
# --------------------------------------------------------------------------------------------------------------
def load_cifar10_raw(root: Path | None, *, image_size: int | None = None) -> RawSplits:
    """CIFAR-10 python version: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""
    root = _require_root(root, "CIFAR-10")
    sub = "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    names = train_names + ["test_batch", "batches.meta"]
    layout = f"layout: <root>/{sub}/" + ", ".join(names) + " (the python version, cifar-10-python.tar.gz, extracted)"
    folder, paths = _locate("CIFAR-10", [root / sub, root], names, layout)
    train = [formats.cifar_batch_arrays(formats.read_cifar_pickle(paths[n]), paths[n], "labels")
             for n in train_names]
    test_x, test_y = formats.cifar_batch_arrays(formats.read_cifar_pickle(paths["test_batch"]),
                                                paths["test_batch"], "labels")
    class_names = _meta_names(paths["batches.meta"], "label_names", 10)
    info = {"folder": str(folder), "files": [str(paths[n]) for n in names], "split": "official train/test"}
    return RawSplits(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                     test_x, test_y, class_names, info)


def load_cifar100_raw(root: Path | None, *, image_size: int | None = None) -> RawSplits:
    """CIFAR-100 python version: ``<root>/cifar-100-python/{train, test, meta}``, fine labels (100 classes)."""
    root = _require_root(root, "CIFAR-100")
    sub = "cifar-100-python"
    names = ["train", "test", "meta"]
    layout = f"layout: <root>/{sub}/train, test, meta (the python version, cifar-100-python.tar.gz, extracted)"
    folder, paths = _locate("CIFAR-100", [root / sub, root], names, layout)
    splits = [formats.cifar_batch_arrays(formats.read_cifar_pickle(paths[n]), paths[n], "fine_labels")
              for n in ("train", "test")]
    class_names = _meta_names(paths["meta"], "fine_label_names", 100)
    info = {"folder": str(folder), "files": [str(paths[n]) for n in names], "split": "official train/test",
            "labels": "fine"}
    return RawSplits(*splits[0], *splits[1], class_names, info)


def _meta_names(path: Path, key: str, count: int) -> list[str]:
    meta = formats.read_cifar_pickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"{path}: expected {count} class names under {key!r}, found {names!r:.80}")
    return [str(n) for n in names]


# --------------------------------------------------------------------------------------------------------------
# SVHN (.mat)
# --------------------------------------------------------------------------------------------------------------
def load_svhn_raw(root: Path | None, *, image_size: int | None = None) -> RawSplits:
    """SVHN cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` in ``<root>`` (as torchvision) or
    ``<root>/svhn``; the extra split is not used (as in DC/DSA/DM/MTT)."""
    root = _require_root(root, "SVHN")
    names = ["train_32x32.mat", "test_32x32.mat"]
    layout = ("layout: <root>/train_32x32.mat and <root>/test_32x32.mat (or in <root>/svhn), "
              "from ufldl.stanford.edu/housenumbers")
    folder, paths = _locate("SVHN", [root, root / "svhn", root / "SVHN"], names, layout)
    train = formats.read_svhn_mat(paths[names[0]])
    test = formats.read_svhn_mat(paths[names[1]])
    info = {"folder": str(folder), "files": [str(paths[n]) for n in names], "split": "official train/test"}
    return RawSplits(*train, *test, list(DIGIT_NAMES), info)


# --------------------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------------------
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _read_split_images(files: list[list[Path]]) -> tuple[list[Any], np.ndarray]:
    images, labels = [], []
    for label, class_files in enumerate(files):
        images += [formats.read_image(p) for p in class_files]
        labels += [label] * len(class_files)
    return images, np.asarray(labels, dtype=np.int64)


def _to_array(img: Any, mode: str) -> np.ndarray:
    """``[C, H, W]`` uint8 from a PIL image converted to ``mode`` (``"L"`` or ``"RGB"``)."""
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _resize_each(arrays: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Stack images of mixed sizes as float [0, 1], resizing those not already ``size`` (bilinear, antialiased)."""
    out = np.empty((len(arrays), arrays[0].shape[0], *size), dtype=np.float32)
    for i, a in enumerate(arrays):
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
        if tuple(a.shape[1:]) != size:
            x = _resize(x[None], size)[0]
        out[i] = x.numpy()
    return out


def load_imagefolder_raw(root: Path | None, *, image_size: int | None = None) -> RawSplits:
    """Images in ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (PNG, JPEG, ... via Pillow).

    Class names are the sorted train subfolder names and the test split must have exactly the same ones.  All
    images are converted to one mode: RGB if any image is in colour, else greyscale.  When sizes differ they are
    resized to ``image_size`` or, without it, to the median training size (recorded in ``info``).
    """
    root = _require_root(root, "imagefolder")
    classes, train_files = formats.list_image_folder(root / "train")
    test_classes, test_files = formats.list_image_folder(root / "test")
    if test_classes != classes:
        missing = sorted(set(classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(classes))
        raise DataError(f"{root / 'test'} must have the same class folders as {root / 'train'}: "
                        f"missing in test: {missing}, not in train: {extra}")
    train_imgs, train_y = _read_split_images(train_files)
    test_imgs, test_y = _read_split_images(test_files)
    colour = any(img.mode not in _GREY_MODES for img in train_imgs + test_imgs)
    mode = "RGB" if colour else "L"
    train_arr = [_to_array(img, mode) for img in train_imgs]
    test_arr = [_to_array(img, mode) for img in test_imgs]
    info: dict[str, Any] = {"folder": str(root), "files": [str(root / "train"), str(root / "test")],
                            "num_files": len(train_arr) + len(test_arr), "mode": mode,
                            "split": "train/ and test/ folders"}
    sizes = {a.shape[1:] for a in train_arr + test_arr}
    if len(sizes) == 1:
        return RawSplits(np.stack(train_arr), train_y, np.stack(test_arr), test_y, classes, info)
    if image_size is not None:
        target = (image_size, image_size)
    else:
        # one square side, so that every model (and the set's own evaluation) sees one shape: the median over the
        # training images of sqrt(h * w), the side of a square with the image's pixel count
        hw = np.array([a.shape[1:] for a in train_arr], dtype=np.float64)
        side = max(1, int(round(float(np.median(np.sqrt(hw[:, 0] * hw[:, 1]))))))
        target = (side, side)
        info["resized"] = f"{len(sizes)} different image sizes; all resized to {side}x{side}, the median training " \
                          f"image's side sqrt(h*w) (set data.image_size to choose)"
    return RawSplits(_resize_each(train_arr, target), train_y, _resize_each(test_arr, target), test_y, classes,
                     info)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------
SPECS = [
    DatasetSpec("digits", 1, (8, 8), 10, None, None, DSA_NO_FLIP,
                "scikit-learn 8x8 digits (bundled; fixed stratified 75/25 split)", False, load_digits_raw),
    DatasetSpec("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), DSA_NO_FLIP,
                "MNIST handwritten digits, 60k/10k, torchvision layout", True,
                _idx_loader("MNIST", "MNIST", DIGIT_NAMES)),
    DatasetSpec("fashion-mnist", 1, (28, 28), 10, (0.2861,), (0.3530,), DSA_WITH_FLIP,
                "Fashion-MNIST, 60k/10k, torchvision layout", True,
                _idx_loader("Fashion-MNIST", "FashionMNIST", FASHION_NAMES)),
    DatasetSpec("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), DSA_WITH_FLIP,
                "CIFAR-10, 50k/10k, python version", True, load_cifar10_raw),
    DatasetSpec("cifar100", 3, (32, 32), 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), DSA_WITH_FLIP,
                "CIFAR-100 fine labels, 50k/10k, python version", True, load_cifar100_raw),
    DatasetSpec("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DSA_NO_FLIP,
                "SVHN cropped digits, 73k/26k (no extra split), .mat files", True, load_svhn_raw),
    DatasetSpec("imagefolder", None, None, None, None, None, DSA_WITH_FLIP,
                "your own images: <root>/train/<class>/* and <root>/test/<class>/*", True, load_imagefolder_raw),
]
for _spec in SPECS:
    DATASETS.register(_spec.name, _spec)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered spec for ``name`` (case-insensitive); unknown names raise with close matches."""
    return DATASETS.get(name)


# --------------------------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------------------------
def _resolve_root(spec: DatasetSpec, root: str | Path | None) -> Path | None:
    if not spec.needs_root:
        if root is not None:
            warnings.warn(f"dataset {spec.name!r} ships with its library and reads no files: --data-root {root} is "
                          f"ignored", DDKitWarning, stacklevel=3)
        return None
    if root is None:
        raise DataError(f"dataset {spec.name!r} is read from local files: pass --data-root (root=...) pointing at "
                        f"the folder that holds them (nothing is downloaded)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root {path} does not exist or is not a folder; pass --data-root pointing at the "
                        f"folder that holds the {spec.name} files")
    return path


def _to_float01(x: np.ndarray, where: str) -> Tensor:
    """``uint8`` 0..255 or float [0, 1] numpy images as a new float32 tensor in [0, 1]."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.multiply(x, np.float32(1.0 / 255.0), dtype=np.float32))  # one pass
    if x.dtype.kind == "f":
        out = torch.from_numpy(np.array(x, dtype=np.float32))
        if out.numel() and (out.min() < 0 or out.max() > 1):
            raise DataError(f"{where}: float images must lie in [0, 1], found [{out.min():.3g}, {out.max():.3g}]")
        return out
    raise DataError(f"{where}: images must be uint8 or float in [0, 1], found {x.dtype}")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of ``[N, C, H, W]`` (antialias matters when shrinking, e.g. 64 -> 32)."""
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def _check_raw(spec: DatasetSpec, raw: RawSplits) -> None:
    """Images and labels agree in count and shape with each other and with the spec, labels are in range."""
    k = spec.num_classes or len(raw.class_names)
    for split, x, y in (("train", raw.train_images, raw.train_labels), ("test", raw.test_images, raw.test_labels)):
        where = f"{spec.name} {split} split"
        if x.ndim != 4:
            raise DataError(f"{where}: expected images [N, C, H, W], found shape {list(x.shape)}")
        _check_pair(x, y, where)
        if len(y) == 0:
            raise DataError(f"{where} is empty")
        expected = (spec.channels, *spec.image_size) if spec.image_size else None
        if expected and tuple(x.shape[1:]) != expected:
            raise DataError(f"{where}: expected images of shape {expected}, found {tuple(x.shape[1:])}")
        if y.min() < 0 or y.max() >= k:
            raise DataError(f"{where}: labels must lie in 0..{k - 1}, found {int(y.min())}..{int(y.max())}")
    if raw.train_images.shape[1:] != raw.test_images.shape[1:]:
        raise DataError(f"{spec.name}: train images {raw.train_images.shape[1:]} and test images "
                        f"{raw.test_images.shape[1:]} differ in shape")


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images, in float64 for large sets.

    A constant channel gets std 1 instead of 0, so normalisation never divides by zero.
    """
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_dataset(name: str, root: str | Path | None = None, *, zca: bool = False, zca_eps: float = DEFAULT_ZCA_EPS,
                 image_size: int | None = None) -> RealData:
    """Load a registered dataset into model space.

    Raw pixels are scaled to [0, 1], optionally resized to ``image_size`` x ``image_size`` (bilinear,
    antialiased), then either normalised with the dataset's mean/std or, with ``zca=True``, whitened by
    regularised ZCA fitted on the raw training pixels (as MTT does, without mean/std normalisation first).
    The returned :class:`RealData` carries the :class:`Preprocess` that did this, so that synthetic sets and
    evaluation apply and undo exactly the same transform.
    """
    spec = get_dataset_spec(name)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    folder = _resolve_root(spec, root)
    raw = spec.load_raw(folder, image_size=image_size)
    _check_raw(spec, raw)
    train = _to_float01(raw.train_images, f"{spec.name} train split")
    test = _to_float01(raw.test_images, f"{spec.name} test split")
    info: dict[str, Any] = {"dataset": spec.name, "root": str(folder) if folder else None, **raw.info,
                            "raw_image_size": list(train.shape[2:])}
    if image_size is not None and tuple(train.shape[2:]) != (image_size, image_size):
        train, test = _resize(train, (image_size, image_size)), _resize(test, (image_size, image_size))
        info["resized_to"] = [image_size, image_size]
    if zca:
        preprocess = Preprocess.fit_zca(train, eps=zca_eps)
        info["zca"] = {"eps": zca_eps, "fitted_on": "raw train pixels in [0, 1]"}
    else:
        mean, std = (spec.mean, spec.std) if spec.mean is not None else channel_stats(train)
        preprocess = Preprocess(mean=tuple(mean), std=tuple(std))
    return RealData(
        name=spec.name,
        train_images=preprocess.encode(train),
        train_labels=torch.from_numpy(np.array(raw.train_labels, dtype=np.int64)),
        test_images=preprocess.encode(test),
        test_labels=torch.from_numpy(np.array(raw.test_labels, dtype=np.int64)),
        num_classes=spec.num_classes or len(raw.class_names),
        class_names=list(raw.class_names),
        preprocess=preprocess,
        info=info,
    )
