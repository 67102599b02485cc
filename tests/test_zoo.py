"""Demo zoo: manifest/weights consistency, accuracies, tamper detection, reproducible training."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch

from zoocompiler import zoo
from zoocompiler.core.errors import CheckpointError, UnknownModelError
from zoocompiler.data import load_dataset
from zoocompiler.training import evaluate, random_shift, train
from zoocompiler.zoo import (
    VGGClassifier,
    ZooRecipe,
    build_model,
    build_zoo,
    get_entry,
    list_entries,
    load_zoo_model,
)

ENTRIES = list_entries()
FULL = tuple(range(10))


@pytest.fixture(scope="module")
def loaded_models():
    return {e.name: load_zoo_model(e.name) for e in ENTRIES}


def _manifest(folder):
    return {m["name"]: m for m in json.loads((folder / zoo.MANIFEST_NAME).read_text())["models"]}


def test_zoo_shape():
    assert len(ENTRIES) >= 6
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)
    assert sum(e.classes == FULL for e in ENTRIES) >= 4
    for e in ENTRIES:
        if e.collection == "sequence":  # row-by-row sequential MNIST: 28 steps of 28 features
            assert e.dataset == "mnist5k-rows" and e.input_shape == (28, 28)
        else:
            assert e.dataset == "mnist5k" and e.input_shape == (1, 28, 28)


def test_manifest_matches_shipped_files():
    manifest = _manifest(zoo.PACKAGE_WEIGHTS_DIR)
    assert set(manifest) == {e.name for e in ENTRIES}
    for e in ENTRIES:
        record = manifest[e.name]
        path = zoo.PACKAGE_WEIGHTS_DIR / record["file"]
        assert e.weights_file == path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"] == e.sha256
        assert tuple(record["classes"]) == e.classes and tuple(record["input_shape"]) == e.input_shape
        assert record["spec"] == e.spec and record["dataset"] == e.dataset
        assert record["params"] == e.params == sum(p.numel() for p in build_model(e.name).parameters())
        # small models keep the package small; the Learngene Pool ancestry must be the large one its pool distils
        limit = (4_000_000, 16 * 2**20) if e.collection == "pool" else (1_500_000, 6 * 2**20)
        assert e.params <= limit[0] and path.stat().st_size <= limit[1]


def test_every_model_loads_and_reproduces_its_accuracy(loaded_models):
    for e in ENTRIES:
        model = loaded_models[e.name]
        assert not model.training
        test = load_dataset(e.dataset, "test", classes=e.classes)
        out = model(test.x[:2])
        assert out.shape == (2, len(e.classes))
        assert evaluate(model, test) == pytest.approx(e.test_accuracy, abs=0.005), e.name


def test_full_task_models_reach_95_percent():
    full = [e for e in ENTRIES if e.classes == FULL]
    assert full and all(e.test_accuracy >= 0.95 for e in full), {e.name: e.test_accuracy for e in full}


def test_subset_models_are_disjoint_and_heterogeneous():
    subsets = [e for e in ENTRIES if e.classes != FULL]
    assert len(subsets) >= 2
    low = [e for e in subsets if e.classes == (0, 1, 2, 3, 4)]
    high = [e for e in subsets if e.classes == (5, 6, 7, 8, 9)]
    assert low and high
    assert not set(low[0].classes) & set(high[0].classes)
    assert type(build_model(low[0].name)) is not type(build_model(high[0].name))
    assert all(e.test_accuracy >= 0.95 for e in subsets)


def test_loading_the_whole_zoo_only_reads_the_shipped_weights(tmp_path, monkeypatch):
    """Why loading the zoo is fast (this used to be a wall-clock bound): every model is read from the shipped
    weights; nothing is trained (the zoo's build_zoo / train are never called) and nothing is written (the
    shipped files keep their mtime, an empty cache stays empty)."""
    zoo_module = sys.modules[load_zoo_model.__module__]
    calls = []
    monkeypatch.setattr(zoo_module, "build_zoo", lambda *a, **k: calls.append(("build_zoo", a)))
    monkeypatch.setattr(zoo_module, "train", lambda *a, **k: calls.append(("train", a)))
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZOOCOMPILER_CACHE", str(cache))
    shipped = {p: p.stat().st_mtime_ns for p in zoo.PACKAGE_WEIGHTS_DIR.iterdir()}
    for e in ENTRIES:
        assert e.weights_file.parent == zoo.PACKAGE_WEIGHTS_DIR
        assert not load_zoo_model(e.name).training
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in zoo.PACKAGE_WEIGHTS_DIR.iterdir()} == shipped
    assert not cache.exists() or not any(cache.rglob("*"))


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="did you mean resnet_s"):
        get_entry("resnet_")
    with pytest.raises(UnknownModelError, match="use one of"):
        load_zoo_model("xyzzy")


@pytest.fixture
def isolated_zoo(tmp_path, monkeypatch):
    """A copy of the shipped weights dir plus an empty cache, so tests can break them safely."""
    package = tmp_path / "package"
    shutil.copytree(zoo.PACKAGE_WEIGHTS_DIR, package)
    monkeypatch.setattr(zoo, "PACKAGE_WEIGHTS_DIR", package)
    monkeypatch.setenv("ZOOCOMPILER_CACHE", str(tmp_path / "cache"))
    return package


def test_tampered_weights_raise_checkpoint_error(isolated_zoo):
    name = ENTRIES[0].name
    path = isolated_zoo / f"{name}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="zoocompile zoo build --force"):
        load_zoo_model(name)


def test_weights_of_another_architecture_raise_checkpoint_error(isolated_zoo):
    a, b = ENTRIES[0].name, ENTRIES[1].name
    shutil.copy(isolated_zoo / f"{b}.safetensors", isolated_zoo / f"{a}.safetensors")
    manifest = json.loads((isolated_zoo / zoo.MANIFEST_NAME).read_text())
    for m in manifest["models"]:
        if m["name"] == a:
            m["sha256"] = hashlib.sha256((isolated_zoo / f"{a}.safetensors").read_bytes()).hexdigest()
    (isolated_zoo / zoo.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_zoo_model(a)


def test_unlisted_weights_file_raises_checkpoint_error(isolated_zoo):
    manifest = json.loads((isolated_zoo / zoo.MANIFEST_NAME).read_text())
    manifest["models"] = manifest["models"][1:]
    (isolated_zoo / zoo.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not listed"):
        load_zoo_model(ENTRIES[0].name)


def _tiny_net(num_classes: int) -> torch.nn.Module:
    return VGGClassifier((4, "M", 8, "M"), num_classes, hidden=16)


def test_training_is_reproducible():
    split = load_dataset("digits", "train", classes=[0, 1, 2])

    def run(seed):
        torch.manual_seed(123)  # same init; train() must reseed everything else itself
        model = _tiny_net(3)
        train(model, split, epochs=1, batch_size=32, seed=seed, max_steps=6, augment=True, progress=False)
        return model.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_random_shift_moves_images_by_at_most_two_pixels():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0
    shifted = random_shift(2)(x, torch.Generator().manual_seed(0))
    rows, cols = (
        shifted[:, 0].flatten(1).argmax(1).div(9, rounding_mode="floor"),
        shifted[:, 0].flatten(1).argmax(1) % 9,
    )
    assert shifted.shape == x.shape and torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(64))
    assert set(rows.tolist()) == set(range(2, 7)) and set(cols.tolist()) == set(range(2, 7))


def test_missing_weights_are_trained_into_the_cache_on_first_use(tmp_path, monkeypatch):
    package = tmp_path / "package"
    package.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setattr(zoo, "PACKAGE_WEIGHTS_DIR", package)
    monkeypatch.setenv("ZOOCOMPILER_CACHE", str(cache))
    tiny = ZooRecipe(
        "tiny",
        "test-only VGGClassifier",
        _tiny_net,
        classes=(0, 1, 2),
        dataset="digits",
        input_shape=(1, 8, 8),
        epochs=3,
        augment=False,
        lr=1e-2,
        batch_size=32,
    )
    monkeypatch.setattr(zoo, "_RECIPES", (tiny,))
    assert get_entry("tiny").test_accuracy is None

    model = load_zoo_model("tiny")
    entry = get_entry("tiny")
    assert entry.weights_file == cache / "zoo" / "tiny.safetensors" and entry.weights_file.exists()
    record = _manifest(cache / "zoo")["tiny"]
    assert record["sha256"] == hashlib.sha256(entry.weights_file.read_bytes()).hexdigest()
    test = load_dataset("digits", "test", classes=(0, 1, 2))
    assert evaluate(model, test) == pytest.approx(entry.test_accuracy, abs=1e-9)
    assert entry.test_accuracy > 0.8

    # Present and valid: build_zoo skips it; with force it retrains to the identical bytes.
    mtime = entry.weights_file.stat().st_mtime_ns
    build_zoo(["tiny"], out_dir=cache / "zoo", progress=False)
    assert entry.weights_file.stat().st_mtime_ns == mtime
    build_zoo(["tiny"], force=True, out_dir=cache / "zoo", progress=False)
    assert _manifest(cache / "zoo")["tiny"]["sha256"] == record["sha256"]
    assert not list((cache / "zoo").glob(".*.tmp"))


@pytest.mark.parametrize("collection", ["pack", "pack5"])
def test_pack_source_zoos_offer_every_class_once(collection):
    """S&P's source zoos: disjoint class sets covering the ten classes, at least three architectures."""
    entries = list_entries(collection)
    classes = [c for e in entries for c in e.classes]
    assert sorted(classes) == list(FULL)
    assert len({e.spec for e in entries}) >= 3
    assert all(e.collection == collection for e in entries)


def test_reassembly_demo_zoo_leaves_out_the_pack_sources():
    from zoocompiler.pipelines.zoo.members import zoo_specs

    assert zoo_specs("demo") == [f"zoo:{e.name}" for e in list_entries("demo")]
    assert not {f"zoo:{e.name}" for e in list_entries("pack") + list_entries("pack5")} & set(zoo_specs("demo"))
    assert not {f"zoo:{e.name}" for e in list_entries("sequence")} & set(zoo_specs("demo"))
