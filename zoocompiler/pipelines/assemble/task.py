"""The target task of a reassembly: the data split three ways, at the zoo's input size.

* ``fit`` — the training data the stitches, heads and tuning see (optionally limited to ``train_size``
  samples, stratified, fixed seed: a small labelled set is the setting where reuse pays, DeRy §4);
* ``val`` — a held-out, stratified part of the training data: the linear-probe proxy, the ILP's per-model
  quality and every selection (candidate, head, baseline) are decided on it, never on ``test``;
* ``test`` — the dataset's own test split, used only to report accuracies.

Images are resized (bilinear) to the zoo's declared input size when every model declares one and the
data's channels match (``digits`` is 8×8, the demo zoo takes 28×28); ``image_size`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoocompiler.core.errors import ZooError
from zoocompiler.data import DataSplit, hold_out, load_dataset

from ..zoo.members import declared_input_shape


@dataclass
class TargetTask:
    """The three parts of the target data (see the module docstring)."""

    fit: DataSplit
    val: DataSplit
    test: DataSplit

    @property
    def num_classes(self) -> int:
        return self.fit.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.fit.input_shape

    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit), "val": len(self.val), "test": len(self.test)}


def task_image_size(data: str, zoo: str, image_size: int | None) -> int | None:
    """The side every image is resized to: ``image_size``, else the zoo's declared one when it differs from
    the data's and the channels agree (a channel mismatch is left to the zoo loader's error), else None."""
    if image_size is not None:
        return image_size
    declared = declared_input_shape(zoo)
    if declared is None or declared[1] != declared[2]:
        return None
    native = load_dataset(data, "test").input_shape
    return declared[1] if native[0] == declared[0] and native[1:] != declared[1:] else None


def load_task(
    data: str, *, image_size: int | None = None, train_size: int | None = None, val_fraction: float = 0.2
) -> TargetTask:
    """The target task of ``data`` with images resized to ``image_size`` (None: as they are; see
    :func:`task_image_size`); ``ZooError`` for a task with fewer than two classes or a ``train_size`` that leaves
    too little to hold out."""
    train = load_dataset(data, "train", image_size=image_size)
    test = load_dataset(data, "test", image_size=image_size)
    if train.num_classes < 2:
        raise ZooError(
            f"the task {data!r} has {train.num_classes} class; a classifier needs at least 2",
            "use data with two or more classes (imagefolder: one sub-folder per class)",
        )
    if train_size is not None:
        if not 2 * train.num_classes <= train_size < len(train):
            raise ZooError(
                f"--train-size {train_size} is outside [{2 * train.num_classes}, {len(train) - 1}] for {data!r} "
                f"({len(train)} training samples, {train.num_classes} classes)",
                "pass a smaller --train-size, or leave it out to use the whole training split",
            )
        _, train = hold_out(train, train_size)
    fit, val = hold_out(train, val_fraction)
    return TargetTask(fit, val, test)
