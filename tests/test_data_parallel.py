"""Data-parallel training with ``--workers N`` (Ray Train's TorchTrainer, DDP over gloo): 2 workers give the
weights of single-process training with the same global batch, the pipelines run on it, bad values are refused.

Tolerance: the weights of a 2-worker run and a 1-process run with the same global batches differ by at most 1e-5
of the model's largest weight (measured: 2.2e-7 absolute after 12 AdamW steps); the only difference is the order of
floating-point sums: a 1-process run that sums the gradient over the same two halves of each batch gives the
2-worker weights exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import assert_nothing_written, assert_one_line_error, run_cli, run_json
from torch import nn

from zoocompiler.core.errors import TrainingError, ZooError
from zoocompiler.data import DataSplit, load_dataset
from zoocompiler.pipelines import data_parallel
from zoocompiler.pipelines.data_parallel import check_workers, run_data_parallel
from zoocompiler.training import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHT_RTOL = 1e-5  # max |w2 - w1| / max |w1|, 2 workers vs 1 process


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |b - a| over every floating-point tensor, relative to the largest |a|."""
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    return max(float((a[k] - b[k]).abs().max()) for k in floats) / max(float(a[k].abs().max()) for k in floats)


def two_branch_net() -> nn.Module:
    """A conv trunk and two heads; ``forward(x, branch)`` runs one head (the other's parameters get no gradient).
    Defined in a function: Ray workers get the class by value (they cannot import this test module)."""

    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
            self.heads = nn.ModuleList([nn.Linear(8 * 64, 10),
                                        nn.Sequential(nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 10))])

        def forward(self, x: torch.Tensor, branch: int) -> torch.Tensor:
            return self.heads[branch](self.trunk(x))

    return TwoBranch()


def branch_sampling_loss(seed: int):
    """A ``loss_fn`` drawing the head from a seeded generator (as pool fine-tuning draws a path), reading
    ``net.heads`` through the DDP wrapper."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        branch = int(torch.randint(0, len(net.heads), (1,), generator=generator))
        return F.cross_entropy(net(x, branch), y)

    return loss_fn


def halves_loss(seed: int):
    """:func:`branch_sampling_loss` with each batch run as its two :meth:`Shard.take` halves, their losses weighted
    by their sizes: in one process, the gradient 2 DDP workers all-reduce."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        branch = int(torch.randint(0, len(net.heads), (1,), generator=generator))
        return sum(len(part_y) / len(y) * F.cross_entropy(net(part_x, branch), part_y)
                   for part_x, part_y in zip(x.tensor_split(2), y.tensor_split(2), strict=True))

    return loss_fn


# ----------------------------------------------------------------------------- options, no Ray needed


@pytest.mark.parametrize("workers", [0, -2, True, 1.5, "2"])
def test_bad_workers_are_refused(workers):
    with pytest.raises(ZooError, match="bad --workers") as err:
        check_workers(workers)
    assert "\n" not in str(err.value)


def test_more_workers_than_the_batch_are_refused():
    with pytest.raises(ZooError, match="--workers 9 is more than the batch size 8"):
        check_workers(9, batch_size=8)


def test_workers_without_ray_name_the_install(monkeypatch):
    find_spec = data_parallel.importlib.util.find_spec
    monkeypatch.setattr(data_parallel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(ZooError, match=r"--workers 2 trains on Ray Train, which is not installed .*"
                                       r"pip install 'zoocompiler\[ray\]'"):
        check_workers(2)
    assert check_workers(1) == 1  # in-process training needs no Ray


def test_one_worker_trains_in_process(monkeypatch):
    monkeypatch.setattr(data_parallel, "_connect", lambda workers: pytest.fail("Ray was started for --workers 1"))
    model = nn.Linear(4, 2)
    calls = []
    assert run_data_parallel(model, lambda: calls.append(model) or "done", 1) == "done"
    assert calls == [model]


def test_a_workers_zoo_error_is_the_runs_error():
    """Ray Train v2 reports each rank's exception: the lowest rank's ``ZooError`` is raised as it is."""

    class WorkerGroupError(Exception):
        worker_failures = {1: TrainingError("training diverged at epoch 1, step 3: the loss is nan", "lower --lr"),
                           0: RuntimeError("peer closed")}

    assert data_parallel._failure(WorkerGroupError("2 workers failed"), 2) is WorkerGroupError.worker_failures[1]
    other = data_parallel._failure(RuntimeError("Traceback ...\nActorDiedError: the actor died"), 2)
    assert str(other).startswith("data-parallel training on 2 Ray workers failed: RuntimeError: ActorDiedError")
    assert "\n" not in str(other)


@pytest.mark.parametrize(
    "argv",
    [
        ["slice", "train", "zoo:vgg_s", "--workers", "0"],
        ["modularize", "train", "zoo:vgg_s", "--workers", "-1"],
        ["pool", "finetune", "no_such_pool", "--workers", "0"],
    ],
    ids=lambda argv: argv[0],
)
def test_cli_bad_workers_is_a_one_line_error_before_any_work(argv, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(*argv, "--out", out)
    assert code == 2
    assert_one_line_error(err, "bad --workers")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------- 2 Ray Train workers


def test_two_workers_equal_single_process_training(local_ray):
    """Same global batches (33: uneven 17/16 slices), same augmentation, same head drawn per step on every
    worker; the head off the step's path gets no gradient and no AdamW update, as in one process. Against the
    one-process run on whole batches: within :data:`WEIGHT_RTOL`; against one process summing the gradient over the
    two halves of each batch (what the all-reduce computes): equal up to rounding (measured: identical)."""
    split = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = two_branch_net()
    single, halves = copy.deepcopy(model), copy.deepcopy(model)
    options = dict(epochs=1, batch_size=33, lr=3e-3, weight_decay=0.05, augment=True, max_steps=12, progress=False,
                   seed=3)
    expected = train(single, split, loss_fn=branch_sampling_loss(7), **options)
    train(halves, split, loss_fn=halves_loss(7), **options)
    loss_fn = branch_sampling_loss(7)  # made here: the workers cannot import this module's functions
    history = run_data_parallel(model, lambda: train(model, split, loss_fn=loss_fn, **options), 2)
    assert max_relative_difference(single.state_dict(), model.state_dict()) <= WEIGHT_RTOL
    assert max_relative_difference(halves.state_dict(), model.state_dict()) <= 1e-7
    assert not model.training  # train() leaves the model in eval mode; so does the driver's copy
    assert math.isclose(history.final_loss, expected.final_loss, rel_tol=1e-6)


@pytest.mark.slow
def test_a_nonfinite_loss_stops_every_worker(local_ray):
    """One NaN sample lands in one worker's slice: the all-reduced loss is NaN on both, both stop at that step."""
    split = load_dataset("digits", "train")
    split = replace(split, x=split.x[:64].clone(), y=split.y[:64])
    split.x[5, 0, 3, 3] = math.nan
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(TrainingError, match=r"training diverged at epoch 1, step \d: the loss is nan; "
                                            r"the training data has 1 non-finite value in 1 sample") as err:
        run_data_parallel(model, lambda: train(model, split, epochs=1, batch_size=16, progress=False), 2)
    assert "\n" not in str(err.value)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "sliceable.safetensors"))


def global_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||b - a|| / ||a|| over every floating-point tensor together."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a if a[k].is_floating_point())
    return math.sqrt(num / sum(float((a[k] ** 2).sum()) for k in a if a[k].is_floating_point()))


@pytest.mark.slow
def test_slice_train_on_two_workers_matches_one(local_ray, tmp_path, monkeypatch):
    """``slice train --workers 2`` writes exactly the weights of a one-process run whose model sees each batch as
    its two halves (the gradient summed over them, as DDP's all-reduce does), and weights close to plain
    ``--workers 1``: slicing training (random rates, AdamW) amplifies float summation-order noise
    (measured after 1 epoch: 1.5% relative L2, final loss within 0.2%)."""
    from zoocompiler.passes.rewrite.slicing import SliceableModel

    base = ("slice", "train", "zoo:vgg_s", "--from-scratch", "--groups", "4", "--epochs", "1", "--lb", "0.375")
    args = (*base, "--scheduler", "normal")  # one width per batch: the halves run sums gradients in DDP's order
    two = run_json(*args, "--workers", "2", "--out", tmp_path / "two")
    one = run_json(*args, "--out", tmp_path / "one")
    forward = SliceableModel.forward
    with monkeypatch.context() as patch:
        patch.setattr(SliceableModel, "forward", lambda self, x: torch.cat([forward(self, h) for h in x.chunk(2)]))
        halves = run_json(*args, "--out", tmp_path / "halves")
    assert (one["workers"], two["workers"], halves["workers"]) == (1, 2, 1)
    assert max_relative_difference(_weights(tmp_path / "halves"), _weights(tmp_path / "two")) <= 1e-6
    assert [r["accuracy"] for r in two["rates"]] == [r["accuracy"] for r in halves["rates"]]
    assert global_relative_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) <= 0.05
    assert math.isclose(one["history"][-1]["loss"], two["history"][-1]["loss"], rel_tol=0.01)
    # the default sandwich rule: four widths in one forward call, one DDP reduction per batch. Its gradient sums
    # eight terms in another order than one process does, so it is close, not equal.
    sandwich_two = run_json(*base, "--workers", "2", "--out", tmp_path / "sandwich_two")
    sandwich_one = run_json(*base, "--out", tmp_path / "sandwich_one")
    assert sandwich_two["config"]["scheduler"] == "sandwich"
    assert global_relative_difference(_weights(tmp_path / "sandwich_one"), _weights(tmp_path / "sandwich_two")) <= 0.05
    assert math.isclose(sandwich_one["history"][-1]["loss"], sandwich_two["history"][-1]["loss"], rel_tol=0.01)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow
def test_modularize_train_on_two_workers(local_ray, tmp_path):
    """``modularize train --workers 2`` (BatchNorm and pairwise losses per slice: close, not equal) completes,
    records its workers and tracks the whole batch (train accuracy from every worker's slice)."""
    args = ("modularize", "train", "zoo:vgg_s", "--from-scratch", "--epochs", "1", "--no-standard")
    one = run_json(*args, "--out", tmp_path / "one")
    two = run_json(*args, "--workers", "2", "--out", tmp_path / "two")
    assert (one["workers"], two["workers"]) == (1, 2)
    assert (tmp_path / "two" / "modular.safetensors").is_file()
    first, second = one["modular"]["history"][0], two["modular"]["history"][0]
    assert abs(first["accuracy"] - second["accuracy"]) <= 0.05
    assert abs(first["train_accuracy"] - second["train_accuracy"]) <= 0.05
    assert abs(first["kernel_rate"] - second["kernel_rate"]) <= 0.05


def _tiny_pool():
    from zoocompiler.pipelines.pool.ancestry import VitShape, build_vit
    from zoocompiler.pipelines.pool.pool import LearngenePool, example_batch

    ancestry = VitShape(img_size=(28, 28), patch_size=(7, 7), in_chans=1, num_classes=10, embed_dim=32, depth=4,
                        num_heads=2, mlp_ratio=2.0)
    torch.manual_seed(0)
    small, large = build_vit(ancestry.derive(3, 16)), build_vit(ancestry.derive(3, 32))
    return LearngenePool(small, large, example_batch((1, 28, 28))).eval()


def without_key_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the key third of every attention's qkv bias left out: softmax ignores a constant added to a
    row of logits, so that bias has no gradient but float noise, which AdamW scales up to steps of ~lr in a
    direction that depends on the order of the sums (a one-process run and a 2-worker run differ there)."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[name] = torch.cat([q, v])
    return out


@pytest.mark.slow
def test_pool_finetune_on_two_workers_equals_one(local_ray):
    """Pool fine-tuning (one sampled path per step; LayerNorm only): 2 workers give 1 process's weights (the
    attention key biases aside) and outputs."""
    from zoocompiler.pipelines.pool.pool import finetune

    split: DataSplit = load_dataset("mnist5k", "train")
    split = replace(split, x=split.x[:512], y=split.y[:512])
    pool = _tiny_pool()
    single = copy.deepcopy(pool)
    options = dict(ancestry=None, epochs=1, lr=1e-3, batch_size=32, seed=0, max_steps=10)
    _, counts = finetune(single, split, **options)
    _, counts2 = run_data_parallel(pool, lambda: finetune(pool, split, **options), 2)
    assert counts2 == counts
    assert max_relative_difference(without_key_biases(single.state_dict()),
                                   without_key_biases(pool.state_dict())) <= WEIGHT_RTOL
    x = split.x[:64]
    with torch.no_grad():
        for low in range(pool.depth + 1):
            expected = single(x, low)
            assert float((pool(x, low) - expected).abs().max() / expected.abs().max()) <= 1e-4
