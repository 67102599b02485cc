"""Datasets: shapes, normalisation, the fixed stratified split, class subsets, file sources, errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from zoocompiler.core.errors import DataError, ZooError
from zoocompiler.data import DataSplit, dataset_names, load_dataset, split_indices


def test_builtin_names():
    assert dataset_names() == ["digits", "mnist5k"]


def test_mnist5k_shapes_dtypes_and_normalisation():
    train = load_dataset("mnist5k", "train")
    test = load_dataset("mnist5k", "test")
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.input_shape == (1, 28, 28)
    assert train.num_classes == 10 and train.classes == tuple(range(10))
    full = torch.cat([train.x, test.x])
    # Fixed MNIST constants (0.1307/0.3081) on mnist5k (0.1313/0.3086): close to, not exactly, 0/1.
    assert abs(float(full.mean())) < 0.01 and abs(float(full.std()) - 1) < 0.01
    assert float(full.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert float(full.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


def test_digits_and_resize():
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert train.x.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert abs(float(torch.cat([train.x, test.x]).mean())) < 0.01
    big = load_dataset("digits", "train", image_size=28)
    assert big.x.shape == (len(train), 1, 28, 28)
    assert torch.equal(big.y, train.y)
    # Resizing is bilinear of the same images: constant per-image means are kept approximately.
    assert torch.allclose(big.x.mean(dim=(1, 2, 3)), train.x.mean(dim=(1, 2, 3)), atol=0.15)


@pytest.mark.parametrize("spec", ["digits", "mnist5k"])
def test_split_is_fixed_disjoint_and_stratified(spec):
    all_y = load_dataset(spec, "all").y.numpy()
    test_idx = split_indices(all_y)
    assert np.array_equal(test_idx, split_indices(all_y.copy()))
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    full = load_dataset(spec, "all")
    assert len(train) + len(test) == len(full)
    # Disjoint: every sample appears exactly once across the two splits.
    rows = {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in full.x}
    split_rows = [hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in torch.cat([train.x, test.x])]
    assert len(split_rows) == len(full) and set(split_rows) <= rows
    assert torch.equal(test.x, full.x[torch.from_numpy(test_idx)])
    # Stratified: each class has round(20%) of its samples in test.
    counts_all = np.bincount(all_y)
    counts_test = np.bincount(test.y.numpy(), minlength=len(counts_all))
    assert np.array_equal(counts_test, np.round(counts_all * 0.2).astype(int))


def test_mnist5k_split_never_changes():
    """Pinned fingerprint of the test indices: a change here silently invalidates every shipped accuracy."""
    test_idx = split_indices(load_dataset("mnist5k", "all").y.numpy())
    assert len(test_idx) == 1000
    assert hashlib.sha256(test_idx.astype(np.int64).tobytes()).hexdigest()[:16] == MNIST5K_TEST_FINGERPRINT


MNIST5K_TEST_FINGERPRINT = "45579736574882cc"


def test_class_subset_remaps_labels_in_given_order():
    full = load_dataset("mnist5k", "test")
    sub = load_dataset("mnist5k", "test", classes=[7, 2, 9])
    assert sub.classes == (7, 2, 9) and sub.num_classes == 3
    assert len(sub) == int(((full.y == 7) | (full.y == 2) | (full.y == 9)).sum())
    assert torch.equal(sub.x[sub.y == 0], full.x[full.y == 7])
    assert torch.equal(sub.x[sub.y == 1], full.x[full.y == 2])
    assert torch.equal(sub.x[sub.y == 2], full.x[full.y == 9])


def test_loader_is_seeded():
    split = load_dataset("digits", "test")
    first = [y for _, y in split.loader(32, shuffle=True, seed=3)]
    again = [y for _, y in split.loader(32, shuffle=True, seed=3)]
    other = [y for _, y in split.loader(32, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert sorted(torch.cat(first).tolist()) == sorted(split.y.tolist())


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 12, 12), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    train = load_dataset(f"npz:{path}", "train")
    test = load_dataset(f"npz:{path}", "test")
    assert isinstance(train, DataSplit)
    assert train.x.shape == (40, 1, 12, 12) and test.x.shape == (10, 1, 12, 12)
    assert np.array_equal(np.bincount(test.y.numpy()), [2] * 5)
    full = load_dataset(f"npz:{path}", "all")
    assert abs(float(full.x.mean())) < 1e-5 and float(full.x.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    # Same pixels: undo the per-file normalisation and compare with the raw array.
    raw = torch.from_numpy(x).float() / 255
    restored = full.x[:, 0] * raw.std(unbiased=False) + raw.mean()
    assert torch.allclose(restored, raw, atol=1e-5)
    assert torch.equal(full.y, torch.from_numpy(y))


def test_npz_errors(tmp_path):
    bad_keys = tmp_path / "keys.npz"
    np.savez(bad_keys, images=np.zeros((4, 8, 8)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="not 'x' and 'y'"):
        load_dataset(f"npz:{bad_keys}")
    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, x=np.zeros((4, 8)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="N×C×H×W"):
        load_dataset(f"npz:{bad_shape}")
    bad_len = tmp_path / "len.npz"
    np.savez(bad_len, x=np.zeros((4, 8, 8)), y=np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="one integer label per image"):
        load_dataset(f"npz:{bad_len}")
    not_npz = tmp_path / "garbage.npz"
    not_npz.write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{not_npz}")


def _write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_imagefolder_gray_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for cls in ("cat", "dog"):
        for i in range(5):
            arr = rng.integers(0, 256, size=(10, 10), dtype=np.uint8)
            images[(cls, i)] = arr
            _write_png(tmp_path / cls / f"{i}.png", arr, "L")
    full = load_dataset(f"imagefolder:{tmp_path}", "all")
    assert full.x.shape == (10, 1, 10, 10)
    assert full.class_names == ("cat", "dog") and full.classes == (0, 1)
    raw = torch.stack([torch.from_numpy(images[(c, i)]) for c in ("cat", "dog") for i in range(5)]).float() / 255
    restored = full.x[:, 0] * raw.std(unbiased=False) + raw.mean()
    assert torch.allclose(restored, raw, atol=1e-5)
    assert full.y.tolist() == [0] * 5 + [1] * 5
    train, test = load_dataset(f"imagefolder:{tmp_path}", "train"), load_dataset(f"imagefolder:{tmp_path}", "test")
    assert np.array_equal(np.bincount(test.y.numpy()), [1, 1]) and len(train) == 8
    resized = load_dataset(f"imagefolder:{tmp_path}", "all", image_size=6)
    assert resized.x.shape == (10, 1, 6, 6)
    dogs = load_dataset(f"imagefolder:{tmp_path}", "all", classes=[1])
    assert dogs.class_names == ("dog",) and dogs.y.tolist() == [0] * 5


def test_imagefolder_rgb_and_explicit_split(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b", "c"):
            for i in range(n):
                _write_png(tmp_path / split / cls / f"{i}.png", rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), "RGB")
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    test = load_dataset(f"imagefolder:{tmp_path}", "test")
    assert train.x.shape == (12, 3, 7, 9) and test.x.shape == (6, 3, 7, 9)
    assert test.y.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _write_png(tmp_path / "a" / "0.png", np.zeros((5, 5), np.uint8), "L")
    _write_png(tmp_path / "b" / "0.png", np.zeros((6, 6), np.uint8), "L")
    with pytest.raises(DataError, match="image_size"):
        load_dataset(f"imagefolder:{tmp_path}", "all")
    assert load_dataset(f"imagefolder:{tmp_path}", "all", image_size=4).x.shape == (2, 1, 4, 4)


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("mnist", {}, "use one of: digits, mnist5k"),
        ("", {}, "use one of"),
        ("npz:", {}, "npz:PATH"),
        ("npz:/no/such/file.npz", {}, "does not exist"),
        ("imagefolder:/no/such/dir", {}, "does not exist"),
        ("digits", {"split": "val"}, "train, test, all"),
        ("digits", {"classes": []}, "empty class selection"),
        ("digits", {"classes": [3, 3]}, "duplicate"),
        ("digits", {"classes": [11]}, "not in dataset"),
        ("digits", {"image_size": 0}, "positive integer"),
    ],
)
def test_bad_specs_raise_one_line_data_error(spec, kwargs, match):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(spec, **kwargs)
    assert isinstance(info.value, ZooError) and "\n" not in str(info.value) and info.value.fix


def test_empty_imagefolder(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_rows_task_reads_the_images_row_by_row():
    images, rows = load_dataset("digits", "test"), load_dataset("digits-rows", "test", classes=None)
    assert rows.x.shape == (len(images), 8, 8) and rows.input_shape == (8, 8) and rows.name == "digits-rows"
    assert torch.equal(rows.x, images.x[:, 0]) and torch.equal(rows.y, images.y)
    assert load_dataset("mnist5k-rows", "test").x.shape[1:] == (28, 28)
    assert load_dataset("digits-rows", "train", classes=[3, 1]).num_classes == 2
