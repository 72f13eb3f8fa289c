"""Small readers for the on-disk formats of the standard datasets, one job each.

Every reader turns a bad file into a :class:`~ddkit.errors.DataError` that names the file and says what was
expected, because these messages reach the user through the CLI without a traceback.  Readers return numpy
arrays as stored (``uint8`` pixels); conversion to float and normalisation belong to ``datasets.py``.
"""
from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
IDX_LABELS = 0x00000801  # ubyte, 1 dimension
IDX_IMAGES = 0x00000803  # ubyte, 3 dimensions
_IDX_KINDS = {IDX_LABELS: "ubyte labels", IDX_IMAGES: "ubyte images"}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------------------
# files and folders
# --------------------------------------------------------------------------------------------------------------
def find_file(folder: Path, name: str, allow_gz: bool = False) -> Path | None:
    """``folder/name`` or, when ``allow_gz``, ``folder/name.gz``; ``None`` when neither exists.

    The plain file wins, so an unpacked copy next to its archive is read without decompressing.
    """
    for candidate in (name, name + ".gz") if allow_gz else (name,):
        path = folder / candidate
        if path.is_file():
            return path
    return None


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (the suffix alone is not trusted)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"corrupt gzip file {path}: {e}; delete it and download it again") from e


# --------------------------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------------
def _idx_expectation(expect: int | None) -> str:
    if expect is not None:
        return f"0x{expect:08x} ({_IDX_KINDS[expect]})"
    return " or ".join(f"0x{m:08x} ({k})" for m, k in _IDX_KINDS.items())


def read_idx(path: str | Path, expect: int | None = None) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzipped or not, as a ``uint8`` array of the header's shape.

    Only the unsigned-byte variants MNIST-style datasets use are accepted: magic ``0x00000801`` (labels) and
    ``0x00000803`` (images).  ``expect`` pins one of them, so that swapped image/label files are caught here
    rather than as a confusing shape error later.  The payload must be exactly as long as the header says:
    a truncated download otherwise yields silently wrong images.
    """
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4:
        raise DataError(f"short read in {path}: {len(data)} bytes, too short for an idx header")
    magic = int.from_bytes(data[:4], "big")
    allowed = (expect,) if expect is not None else tuple(_IDX_KINDS)
    if magic not in allowed:
        raise DataError(f"bad idx magic 0x{magic:08x} in {path}: expected {_idx_expectation(expect)}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"short read in {path}: header needs {header} bytes, file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header
    if payload != expected:
        what = "short read" if payload < expected else "unexpected trailing bytes"
        shape = "x".join(str(d) for d in dims)
        raise DataError(
            f"{what} in {path}: header says {shape} = {expected} bytes, file has {payload} (after the header)"
        )
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


# --------------------------------------------------------------------------------------------------------------
# CIFAR python batches (pickles)
# --------------------------------------------------------------------------------------------------------------
def _numpy_core(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2) or ``numpy.core.<name>`` (numpy 1), without deprecation warnings."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{name}")


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """The only globals a CIFAR pickle may reference: what numpy needs to rebuild a plain array.

    The original files (Python 2, protocol 2) use ``numpy.core.multiarray._reconstruct``; files re-pickled by
    numpy 2 name ``numpy._core``; protocol 5 uses ``numeric._frombuffer`` and protocol 2 from Python 3 wraps
    bytes in ``_codecs.encode``.  None of these can run arbitrary code.
    """
    import codecs

    reconstruct = lambda: _numpy_core("multiarray")._reconstruct  # noqa: E731
    frombuffer = lambda: _numpy_core("numeric")._frombuffer  # noqa: E731
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
    }


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, lists, dicts, strings and numbers, and nothing else.

    ``pickle.load`` on a downloaded file executes whatever the file asks for; a dataset file never needs more
    than the globals in :func:`_allowed_globals`.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        getter = self._allowed.get((module, name))
        if getter is None:
            raise DataError(
                f"refusing to load {self._path}: the pickle references {module}.{name}, which a CIFAR batch "
                f"never needs (only numpy arrays are allowed); the file is not a genuine CIFAR batch"
            )
        return getter()


def _str_keys(obj: Any) -> Any:
    """Decode the bytes keys (and bytes-in-list values such as label names) that ``encoding='bytes'`` yields."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in obj]
    return obj


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Read one CIFAR python file (a data batch or the meta file) with the restricted unpickler.

    Keys come back as ``str`` and lists of bytes (label names) as lists of ``str``; ``data`` stays a numpy array.
    """
    path = Path(path)
    raw = read_bytes(path)
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled pickles raise a zoo of types (EOFError, UnpicklingError, ...)
        raise DataError(f"cannot unpickle {path} ({type(e).__name__}: {e}); the file is truncated or corrupt") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR file: expected a pickled dict, found {type(obj).__name__}")
    return _str_keys(obj)


def cifar_batch_arrays(batch: dict[str, Any], path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,3,32,32], labels int64 [N])`` from a CIFAR batch dict, checking shapes and counts."""
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(f"{path} has no {key!r} entry (keys: {sorted(batch)}); is it the right CIFAR variant?")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"bad 'data' in {path}: expected uint8 [N, 3072] (3x32x32 images), found {found}")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"bad {label_key!r} in {path}: expected a list of integer labels, found {labels.dtype} "
                        f"{labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path} holds {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# SVHN (.mat)
# --------------------------------------------------------------------------------------------------------------
def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,3,32,32], labels int64 [N])`` from an SVHN cropped-digits ``.mat`` file.

    The file stores ``X`` as ``[H, W, C, N]`` and the digit 0 as label 10 (remapped to 0 here).
    """
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except Exception as e:  # scipy raises ValueError/TypeError/OSError/MatReadError for bad files
        raise DataError(f"cannot read {path} as a MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} has no 'X'/'y' variables; expected SVHN format 2 (cropped digits, *_32x32.mat)")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"bad 'X' in {path}: expected uint8 [32, 32, 3, N], found {x.dtype} {list(x.shape)}")
    if len(y) != x.shape[3]:
        raise DataError(f"{path} holds {x.shape[3]} images but {len(y)} labels")
    y = y.astype(np.int64)
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


# --------------------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------------------
def list_image_folder(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted subfolder names) and each class's image files (sorted, so the order is stable)."""
    if not split_dir.is_dir():
        raise DataError(f"image folder split not found: {split_dir} (expected <root>/train/<class>/*.png and "
                        f"<root>/test/<class>/*.png)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class subfolders in {split_dir} (expected {split_dir}/<class>/*.png)")
    files = []
    for name in classes:
        found = sorted(p for p in (split_dir / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not found:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files.append(found)
    return classes, files


def read_image(path: Path) -> Any:
    """Open and fully decode one image with Pillow (a ``PIL.Image.Image``); unreadable files name the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
