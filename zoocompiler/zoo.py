"""The demo zoo: small timm/torchvision models trained on mnist5k, shipped as safetensors + a manifest.

Each model is a :class:`ZooRecipe` (architecture builder + training recipe). Trained weights live in
``zoocompiler/zoo_weights/<name>.safetensors``, described by ``zoo_weights/manifest.json``
(spec, classes, dataset, input shape, test accuracy, params, MACs, sha256). A model whose shipped
weights are missing is trained on first use into ``zoo/`` under the cache root (``core.cache.cache_dir()``:
``$ZOOCOMPILER_CACHE``, ``$XDG_CACHE_HOME/zoocompiler`` or ``~/.cache/zoocompiler``), so a fresh install never breaks.
"""

from __future__ import annotations

import difflib
import functools
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from timm.models.convnext import ConvNeXt
from timm.models.densenet import DenseNet
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.vgg import make_layers

from .core.atomic import write_bytes_atomic
from .core.cache import cache_dir, digest
from .core.errors import CheckpointError, UnknownModelError
from .core.modules import count_macs, count_params
from .core.schema import NUMBER, ListOf, OneOf, load_json
from .core.text import first_line
from .data import load_dataset
from .training import evaluate, train

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "zoo_weights"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_REBUILD_HINT = "run `zoocompile zoo build --force` to retrain it"


# --- architectures -------------------------------------------------------------------------------


class VGGClassifier(nn.Module):
    """A VGG-style plain CNN: ``torchvision.models.vgg.make_layers(cfg)`` + global pool + 2-layer head."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int, in_chans: int = 1, hidden: int = 128):
        super().__init__()
        widths = [c for c in cfg if c != "M"]
        self.features = make_layers(list(cfg), batch_norm=True)
        self.features[0] = nn.Conv2d(in_chans, int(widths[0]), kernel_size=3, padding=1)  # make_layers assumes RGB
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(1), nn.Linear(int(widths[-1]), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class RecurrentClassifier(nn.Module):
    """A sequence classifier: ``nn.LSTM``/``nn.GRU`` (batch_first) over N×T×F, linear head on the last step."""

    def __init__(self, num_classes: int, features: int = 28, hidden: int = 64, cell: str = "lstm"):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _resnet(num_classes: int) -> nn.Module:
    return ResNet(
        BasicBlock, (1, 1, 1, 1), num_classes=num_classes, in_chans=1, stem_width=16, channels=(16, 32, 64, 128)
    )


def _vgg(num_classes: int) -> nn.Module:
    return VGGClassifier((16, "M", 32, "M", 64, 64, "M"), num_classes)


def _vit(num_classes: int, embed_dim: int = 96, depth: int = 4, num_heads: int = 4) -> nn.Module:
    """A ViT for 1×28×28 inputs (7×7 patches, MLP ratio 2); the defaults are ``vit_t``'s."""
    return VisionTransformer(
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
    )


def _convnext(num_classes: int) -> nn.Module:
    # ls_init_value=1.0: timm's 1e-6 layer scale makes these 5 blocks near-identity and slow to train from scratch.
    return ConvNeXt(
        in_chans=1,
        num_classes=num_classes,
        depths=(1, 1, 2, 1),
        dims=(16, 32, 64, 128),
        patch_size=2,
        output_stride=16,
        ls_init_value=1.0,
    )


def _mobilenetv3(num_classes: int) -> nn.Module:
    return timm.create_model("mobilenetv3_small_050", pretrained=False, in_chans=1, num_classes=num_classes)


def _densenet(num_classes: int) -> nn.Module:
    return DenseNet(growth_rate=12, block_config=(3, 3, 3), num_classes=num_classes, in_chans=1)


def _regnet(num_classes: int) -> nn.Module:
    cfg = RegNetCfg(depth=6, w0=16, wa=16.0, wm=2.0, group_size=8, stem_width=16, se_ratio=0.25)
    return RegNet(cfg, in_chans=1, num_classes=num_classes)


# --- recipes and entries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooRecipe:
    """How one demo model is defined and trained (``build(num_classes)`` returns a random-init module)."""

    name: str
    spec: str
    build: Callable[[int], nn.Module]
    classes: tuple[int, ...] = tuple(range(10))
    dataset: str = "mnist5k"
    input_shape: tuple[int, ...] = (1, 28, 28)  # (C, H, W); (T, F) for a sequence task
    epochs: int = 8
    lr: float = 3e-3
    batch_size: int = 128
    augment: bool = True
    seed: int = 0
    collection: str = "demo"


@dataclass(frozen=True)
class ZooEntry:
    """A demo-zoo model as users see it: definition, classes, and (once built) accuracy and weights.

    ``test_accuracy`` is a fraction in [0, 1] on the dataset's fixed test split restricted to
    ``classes`` (labels remapped to 0..k-1 in that order); ``weights_file`` is the file
    ``load_zoo_model`` reads (it may not exist yet: it is then trained on first use).
    """

    name: str
    spec: str
    classes: tuple[int, ...]
    dataset: str
    input_shape: tuple[int, ...]
    test_accuracy: float | None
    params: int | None
    weights_file: Path
    macs: int | None = None
    sha256: str | None = None
    collection: str = "demo"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_RESNET_SPEC = "timm.models.resnet.ResNet(BasicBlock, layers=(1,1,1,1), channels=(16,32,64,128), stem_width=16)"
_VGG_SPEC = "torchvision.models.vgg.make_layers([16,M,32,M,64,64,M], batch_norm=True) + avgpool + MLP(64,128)"
_CONVNEXT_SPEC = ("timm.models.convnext.ConvNeXt(depths=(1,1,2,1), dims=(16,32,64,128), patch_size=2, "
                  "output_stride=16, ls_init_value=1.0)")
_RECIPES: tuple[ZooRecipe, ...] = (
    ZooRecipe("resnet_s", _RESNET_SPEC, _resnet, epochs=12),
    ZooRecipe("vgg_s", _VGG_SPEC, _vgg, epochs=10),
    ZooRecipe(
        "vit_t",
        "timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=7, embed_dim=96, depth=4, "
        "num_heads=4, mlp_ratio=2)",
        _vit,
        epochs=30,
        lr=1e-3,
        batch_size=32,
    ),
    ZooRecipe(
        "convnext_t",
        _CONVNEXT_SPEC,
        _convnext,
        epochs=15,
        lr=5e-3,
        batch_size=64,
    ),
    ZooRecipe("mobilenetv3_s", "timm:mobilenetv3_small_050", _mobilenetv3, epochs=25, lr=5e-3, batch_size=64),
    ZooRecipe(
        "densenet_s_0to4",
        "timm.models.densenet.DenseNet(growth_rate=12, block_config=(3,3,3))",
        _densenet,
        classes=(0, 1, 2, 3, 4),
        epochs=12,
        lr=5e-3,
        batch_size=64,
    ),
    ZooRecipe(
        "regnet_s_5to9",
        "timm.models.regnet.RegNet(RegNetCfg(depth=6, w0=16, wa=16, wm=2, group_size=8, stem_width=16, se_ratio=0.25))",
        _regnet,
        classes=(5, 6, 7, 8, 9),
        epochs=20,
        lr=5e-3,
        batch_size=64,
    ),
    # The Slice-and-Pack source zoo (`zoocompile pack`): three architectures with disjoint abilities.
    ZooRecipe("vgg_s_0to3", _VGG_SPEC, _vgg, classes=(0, 1, 2, 3), epochs=10, collection="pack"),
    ZooRecipe("resnet_s_4to6", _RESNET_SPEC, _resnet, classes=(4, 5, 6), epochs=12, collection="pack"),
    ZooRecipe("convnext_t_7to9", _CONVNEXT_SPEC, _convnext, classes=(7, 8, 9), epochs=30, lr=3e-3, batch_size=64,
              collection="pack"),
    # Five two-class sources (the benchmark's task spread over more models, like the paper's T2/T3).
    ZooRecipe("vgg_s_01", _VGG_SPEC, _vgg, classes=(0, 1), epochs=10, collection="pack5"),
    ZooRecipe("resnet_s_23", _RESNET_SPEC, _resnet, classes=(2, 3), epochs=12, collection="pack5"),
    ZooRecipe("convnext_t_45", _CONVNEXT_SPEC, _convnext, classes=(4, 5), epochs=30, lr=3e-3, batch_size=64,
              collection="pack5"),
    ZooRecipe("vgg_s_67", _VGG_SPEC, _vgg, classes=(6, 7), epochs=10, collection="pack5"),
    ZooRecipe("resnet_s_89", _RESNET_SPEC, _resnet, classes=(8, 9), epochs=12, collection="pack5"),
    # The Learngene Pool ancestry (`zoocompile pool`): 12 uniform transformer blocks at d=192.
    ZooRecipe(
        "vit_anc12",
        "timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=7, embed_dim=192, depth=12, "
        "num_heads=12, mlp_ratio=2)",
        functools.partial(_vit, embed_dim=192, depth=12, num_heads=12),
        epochs=40,
        lr=1e-3,
        batch_size=64,
        collection="pool",
    ),
    # A recurrent model on the row-by-row sequence task (28 steps of 28 pixels): prune/slice/export of LSTMs.
    ZooRecipe("lstm_rows", "RecurrentClassifier(nn.LSTM(28, 64, batch_first=True) + Linear(64, 10) on the last step)",
              RecurrentClassifier, dataset="mnist5k-rows", input_shape=(28, 28), epochs=15, lr=1e-2,
              batch_size=64, augment=False, collection="sequence"),
)
COLLECTIONS = ("demo", "pack", "pack5", "pool", "sequence")


def recipes() -> dict[str, ZooRecipe]:
    """The demo-zoo recipes by name, in zoo order."""
    return {r.name: r for r in _RECIPES}


def zoo_cache_dir() -> Path:
    """Where models missing from the package are trained on first use."""
    return cache_dir() / "zoo"


def list_entries(collection: str | None = None) -> list[ZooEntry]:
    """Every zoo model (of ``collection`` when given: ``demo`` for reassembly, ``pack`` the
    Slice-and-Pack sources), in zoo order."""
    return [_entry(r) for r in _RECIPES if collection is None or r.collection == collection]


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``; unknown names raise ``UnknownModelError`` suggesting close matches."""
    return _entry(_recipe(name))


def build_model(name: str) -> nn.Module:
    """The architecture of zoo model ``name`` with random weights (initialised from the recipe's seed, train mode)."""
    recipe = _recipe(name)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(recipe.seed)
        return recipe.build(len(recipe.classes))


def load_zoo_model(name: str) -> nn.Module:
    """Zoo model ``name`` in eval mode with its weights, verified against the manifest's sha256.

    Shipped weights are used when valid, else the cache's; if neither folder has the file the model
    is trained now (progress bar on stderr) into the cache. A file that exists but fails its check
    (unlisted, hash or key mismatch) raises ``CheckpointError`` unless the other folder has a valid one.
    """
    recipe = _recipe(name)
    candidates = _candidates(recipe.name)
    if not candidates:
        print(f"zoocompiler: zoo model {name!r} has no weights; training it into {zoo_cache_dir()}", file=sys.stderr)
        build_zoo([name], force=True, out_dir=zoo_cache_dir())
        candidates = _candidates(recipe.name)
    errors: list[CheckpointError] = []
    for path, record in candidates:
        try:
            return _load_verified(recipe, path, record)
        except CheckpointError as err:
            errors.append(err)
    if not errors:  # pragma: no cover - build_zoo just wrote the file
        raise CheckpointError(f"training zoo model {name!r} left no weights", _REBUILD_HINT)
    raise errors[0]


def build_zoo(
    names: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    out_dir: Path | None = None,
    jobs: int = 1,
) -> list[ZooEntry]:
    """Train the named zoo models (all by default) that ``out_dir`` lacks, or all of them with ``force``.

    ``out_dir`` defaults to the package's ``zoo_weights`` when writable, else the cache. ``jobs > 1``
    trains that many models at once in worker processes (one thread each; same weights as ``jobs=1``).
    Each model's weights and the manifest are written atomically as soon as it is trained. Returns the
    entries as recorded in ``out_dir``.
    """
    target = Path(out_dir) if out_dir is not None else _default_out_dir()
    selected = [_recipe(n) for n in names] if names is not None else list(_RECIPES)
    todo = [r for r in selected if force or not _is_built(target, r.name)]
    if jobs > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context) as pool:
            futures = [pool.submit(_train_named, r.name) for r in todo]
            for future in as_completed(futures):
                record, data = future.result()
                _store(target, record, data)
                if progress:
                    print(f"zoocompiler: trained {record['name']} ({record['test_accuracy']:.1%})", file=sys.stderr)
    else:
        for recipe in todo:
            _store(target, *_train_recipe(recipe, progress))
    manifest = read_manifest(target)
    return [_make_entry(r, target / _file_name(r.name), manifest.get(r.name, {})) for r in selected]


# --- internals -------------------------------------------------------------------------------------


def _recipe(name: str) -> ZooRecipe:
    table = recipes()
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"use one of: {', '.join(table)}"
    raise UnknownModelError(f"unknown zoo model {name!r}", hint)


def _file_name(name: str) -> str:
    return f"{name}.safetensors"


def _default_out_dir() -> Path:
    if PACKAGE_WEIGHTS_DIR.is_dir() and os.access(PACKAGE_WEIGHTS_DIR, os.W_OK):
        return PACKAGE_WEIGHTS_DIR
    return zoo_cache_dir()


def _candidates(name: str) -> list[tuple[Path, dict[str, Any] | None]]:
    """Existing weights files for ``name`` with their manifest records (None if unlisted): package, then cache."""
    found = []
    for folder in (PACKAGE_WEIGHTS_DIR, zoo_cache_dir()):
        path = folder / _file_name(name)
        if path.exists():
            found.append((path, read_manifest(folder).get(name)))
    return found


def _entry(recipe: ZooRecipe) -> ZooEntry:
    listed = [(path, record) for path, record in _candidates(recipe.name) if record is not None]
    path, record = listed[0] if listed else (zoo_cache_dir() / _file_name(recipe.name), {})
    return _make_entry(recipe, path, record)


def _make_entry(recipe: ZooRecipe, path: Path, record: dict[str, Any]) -> ZooEntry:
    return ZooEntry(
        name=recipe.name,
        spec=recipe.spec,
        classes=recipe.classes,
        dataset=recipe.dataset,
        input_shape=recipe.input_shape,
        test_accuracy=record.get("test_accuracy"),
        params=record.get("params"),
        weights_file=path,
        macs=record.get("macs"),
        sha256=record.get("sha256"),
        collection=recipe.collection,
    )


def _load_verified(recipe: ZooRecipe, path: Path, record: dict[str, Any] | None) -> nn.Module:
    if record is None:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST_NAME}", _REBUILD_HINT)
    data = path.read_bytes()
    if digest(data) != record.get("sha256"):
        raise CheckpointError(f"weights {path} do not match the manifest's sha256 (corrupted or edited)", _REBUILD_HINT)
    try:
        state = load_safetensors(data)
    except SafetensorError as err:
        raise CheckpointError(f"cannot read {path} as safetensors ({err})", _REBUILD_HINT) from err
    model = recipe.build(len(recipe.classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = first_line(err)
        raise CheckpointError(
            f"weights {path} do not fit the {recipe.name} architecture ({first})", _REBUILD_HINT
        ) from err
    return model.eval()


def _is_built(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds ``name``'s weights with the sha256 its manifest records."""
    record = read_manifest(folder).get(name)
    path = folder / _file_name(name)
    return record is not None and path.exists() and digest(path.read_bytes()) == record["sha256"]


def _store(folder: Path, record: dict[str, Any], data: bytes) -> None:
    """Write one model's weights, then its manifest record (both atomically)."""
    write_bytes_atomic(folder / record["file"], data)
    manifest = read_manifest(folder)  # re-read: another process may have added models meanwhile
    manifest[record["name"]] = record
    _write_manifest(folder, manifest)


def _train_named(name: str) -> tuple[dict[str, Any], bytes]:
    """Worker-process entry point for ``build_zoo(jobs>1)``."""
    return _train_recipe(_recipe(name), progress=False)


def _train_recipe(recipe: ZooRecipe, progress: bool) -> tuple[dict[str, Any], bytes]:
    """Train ``recipe`` from its seed; returns its manifest record and the safetensors bytes."""
    train_split = load_dataset(recipe.dataset, "train", classes=recipe.classes)
    test_split = load_dataset(recipe.dataset, "test", classes=recipe.classes)
    model = build_model(recipe.name)
    history = train(
        model,
        train_split,
        epochs=recipe.epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        augment=recipe.augment,
        progress=progress,
        desc=recipe.name,
    )
    accuracy = evaluate(model, test_split)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes a multi-key metadata map in hash order, which would make the bytes
    # (and the manifest's sha256) differ between identical trainings.
    meta = json.dumps({"name": recipe.name, "spec": recipe.spec}, sort_keys=True)
    data = save_safetensors(tensors, metadata={"zoocompiler": meta})
    return {
        "name": recipe.name,
        "spec": recipe.spec,
        "classes": list(recipe.classes),
        "dataset": recipe.dataset,
        "input_shape": list(recipe.input_shape),
        "test_accuracy": accuracy,
        "params": count_params(model),
        "macs": count_macs(model, recipe.input_shape, eval=True),
        "file": _file_name(recipe.name),
        "sha256": digest(data),
        "train_seconds": round(history.seconds, 1),
        "recipe": {
            "epochs": recipe.epochs,
            "lr": recipe.lr,
            "batch_size": recipe.batch_size,
            "augment": recipe.augment,
            "seed": recipe.seed,
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }, data


MANIFEST_SCHEMA = {
    "version": OneOf((MANIFEST_VERSION,)),
    "models": ListOf({"name": str, "file": str, "sha256": str, "test_accuracy?": NUMBER, "params?": int,
                      "macs?": int}),
}


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest records in ``folder`` by model name (empty when there is no manifest); a malformed
    manifest (not UTF-8 JSON, or not :data:`MANIFEST_SCHEMA`) is a ``CheckpointError`` naming the field."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return {}
    content = load_json(path, MANIFEST_SCHEMA, what="zoo manifest", error=CheckpointError, fix=_REBUILD_HINT)
    return {m["name"]: m for m in content["models"]}


def _write_manifest(folder: Path, records: dict[str, dict[str, Any]]) -> None:
    order = {r.name: i for i, r in enumerate(_RECIPES)}
    models = sorted(records.values(), key=lambda m: (order.get(m["name"], len(order)), m["name"]))
    text = json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=2) + "\n"
    write_bytes_atomic(folder / MANIFEST_NAME, text.encode())
