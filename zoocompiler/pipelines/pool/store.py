"""The pool directory: a learngene pool on disk, read back as data only.

Layout::

    DIR/pool.json               format, ancestry (spec, checkpoint, weights digest, shape), the two row
                                shapes, distilled levels, settings, stitch init, fine-tuning, storage,
                                the descendant table, and the sha256 of each weights file
    DIR/instances.safetensors   the pool's weights: rows ``small.*`` and ``large.*``, ``stitches.*``
    DIR/transforms.safetensors  the distillation's maps W, M of the narrow row (the ``tm`` stitch init)

Reading checks the format (a pool from another version is refused), every field's type and each
weights file's sha256; the rows are rebuilt from their recorded shapes with timm's
``VisionTransformer`` (never from code a file names) and the weights load strictly. The ancestry's
spec goes through ``sources.check_spec_from_file``: a ``python:`` spec is refused unless trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from zoocompiler.core.atomic import write_bytes_atomic
from zoocompiler.core.cache import digest, read_verified
from zoocompiler.core.errors import CheckpointError
from zoocompiler.core.schema import NUMBER, ListOf, MapOf, OneOf, Where, load_json
from zoocompiler.sources import check_state_dict

from .ancestry import VitShape, build_vit
from .distill import Transforms
from .pool import LearngenePool, example_batch

POOL_FORMAT = "zoocompiler.learngene-pool/1"
POOL_FILE = "pool.json"
INSTANCES_FILE = "instances.safetensors"
TRANSFORMS_FILE = "transforms.safetensors"
_FIX = "distil the pool again with `zoocompile pool distill --out DIR`"

POSITIVE = Where(int, lambda v: v >= 1, "an integer >= 1")
COUNT = Where(int, lambda v: v >= 0, "an integer >= 0")
SECONDS = Where(NUMBER, lambda v: v >= 0, "a number >= 0")
SHAPE_SCHEMA = Where(
    {"img_size": ListOf(POSITIVE, 2), "patch_size": ListOf(POSITIVE, 2), "in_chans": POSITIVE,
     "num_classes": POSITIVE, "embed_dim": POSITIVE, "depth": POSITIVE, "num_heads": POSITIVE,
     "mlp_ratio": Where(NUMBER, lambda v: v > 0, "a number > 0"),
     "qkv_bias": bool, "qk_norm": bool, "class_token": bool, "reg_tokens": COUNT, "no_embed_class": bool,
     "global_pool": OneOf(("token", "avg", "max", "avgmax", "map", "")), "pre_norm": bool, "fc_norm": bool,
     "init_values?": NUMBER},
    lambda shape: shape["embed_dim"] % shape["num_heads"] == 0, "a shape whose width divides into its heads")
FILE_SCHEMA = {"file": str, "sha256": str}
DESCENDANT_SCHEMA = {"low": COUNT, "high": COUNT, "params": COUNT, "macs": COUNT, "accuracy?": NUMBER}
LEVELS_SCHEMA = ListOf(ListOf(POSITIVE, 2), 1)
FINETUNE_SCHEMA = Where((dict, type(None)), lambda v: v is None or all(
    isinstance(v.get(k), t) and not isinstance(v.get(k), bool)
    for k, t in (("epochs", int), ("lr", NUMBER), ("batch_size", int), ("tau", NUMBER), ("seconds", NUMBER))
) and isinstance(v.get("kd"), bool), "null, or an object with epochs, lr, batch_size, kd, tau and seconds")
POOL_SCHEMA = {
    "format": OneOf((POOL_FORMAT,)),
    "ancestry": {"spec": str, "checkpoint?": (str, type(None)), "weights_sha256": str, "shape": SHAPE_SCHEMA,
                 "params?": POSITIVE, "macs?": COUNT, "accuracy?": NUMBER},
    "rows": {"small": SHAPE_SCHEMA, "large": SHAPE_SCHEMA},
    "input_shape": ListOf(POSITIVE, 3),
    "data": str,
    "init": str,
    "weights": {"instances": FILE_SCHEMA, "transforms": FILE_SCHEMA},
    "descendants": ListOf(DESCENDANT_SCHEMA, 1),
    "descendants_before_finetune?": ListOf(DESCENDANT_SCHEMA, 1),
    "levels?": {"small": LEVELS_SCHEMA, "large": LEVELS_SCHEMA},
    "distill?": MapOf({"seconds": SECONDS, "accuracy?": NUMBER}),
    "storage?": {"small": COUNT, "large": COUNT, "stitches": COUNT, "total": COUNT},
    "finetune?": FINETUNE_SCHEMA,
}


@dataclass
class PoolDir:
    """A read pool directory: its root and ``pool.json``."""

    root: Path
    doc: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.doc["input_shape"])

    @property
    def rows(self) -> dict[str, VitShape]:
        return {row: VitShape.from_dict(self.doc["rows"][row]) for row in ("small", "large")}

    def _weights(self, key: str) -> dict[str, torch.Tensor]:
        entry = self.doc["weights"][key]
        path = self.root / entry["file"]
        if Path(entry["file"]).name != entry["file"]:
            raise CheckpointError(f"{self.root / POOL_FILE} names a weights file outside the pool: {entry['file']!r}",
                                  _FIX)
        data = read_verified(path, entry["sha256"], "pool file", POOL_FILE, _FIX)
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as err:
            raise CheckpointError(f"pool file {path} is not a safetensors file ({err})", _FIX) from None

    def check_weights(self) -> None:
        """Every weights file ``pool.json`` names is present, matches its sha256 and reads as safetensors."""
        for key in ("instances", "transforms"):
            self._weights(key)

    def load_pool(self) -> LearngenePool:
        """The pool with its stored weights (eval mode)."""
        rows = self.rows
        pool = LearngenePool(build_vit(rows["small"]), build_vit(rows["large"]), example_batch(self.input_shape))
        state = self._weights("instances")
        check_state_dict(pool, state, label=f"the pool in {self.root}")
        pool.load_state_dict(state)
        return pool.eval()

    def load_transforms(self) -> Transforms:
        rows = self.rows
        state = self._weights("transforms")
        levels = sum(1 for k in state if k.startswith("block."))
        transforms = Transforms(rows["large"].embed_dim, rows["small"].embed_dim, levels)
        check_state_dict(transforms, state, label=f"the transformation matrices in {self.root}")
        transforms.load_state_dict(state)
        return transforms.eval()


def read_pool(root: Path) -> PoolDir:
    """The pool directory at ``root`` (format and fields checked; weights are checked when loaded)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"pool directory {root} does not exist", _FIX)
    doc = load_json(root / POOL_FILE, POOL_SCHEMA, what="pool file", error=CheckpointError,
                    fix=f"point to a directory written by `zoocompile pool distill` ({POOL_FORMAT})")
    small, large = (VitShape.from_dict(doc["rows"][row]) for row in ("small", "large"))
    if small.embed_dim >= large.embed_dim or small != large.at_width(small.embed_dim):
        raise CheckpointError(f"{root / POOL_FILE} is malformed: rows.small must be rows.large at a narrower width "
                              "(same depth and options)", _FIX)
    return PoolDir(root, doc)


def write_weights(directory: Path, pool: LearngenePool, transforms: Transforms) -> dict[str, dict[str, str]]:
    """Write both weights files into ``directory``; their ``weights`` entries for ``pool.json``."""
    entries = {}
    for key, name, module in (("instances", INSTANCES_FILE, pool), ("transforms", TRANSFORMS_FILE, transforms)):
        tensors = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        data = save_safetensors(tensors)
        write_bytes_atomic(directory / name, data)
        entries[key] = {"file": name, "sha256": digest(data)}
    return entries
