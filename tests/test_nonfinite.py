"""Nothing is committed from a diverged run: a non-finite loss, weights or outputs stop training and evaluation
with ``TrainingError`` (epoch, step, likely cause), the CLI exits 2 with one line and no output directory, and
``export_onnx`` refuses non-finite weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import assert_one_line_error, run_cli
from models_for_tests import sliceable_mlp_cnn, tiny_cnn
from torch import nn

from zoocompiler.core.budget import Budget
from zoocompiler.core.errors import ExportError, TrainingError, ZooError
from zoocompiler.data import load_dataset
from zoocompiler.exports import export_onnx
from zoocompiler.pipelines.assemble.config import AssembleConfig
from zoocompiler.pipelines.assemble.pipeline import tune
from zoocompiler.training import check_finite_loss, check_finite_weights, evaluate, train

SPEC = "python:models_for_tests:sliceable_mlp_cnn"  # a tiny conv+dense net; 1 epoch of digits takes ~1 s


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def with_nan(split, rows=(5,)):
    x = split.x.clone()
    x[list(rows), 0, 3, 3] = float("nan")
    return dataclasses.replace(split, x=x)


# ----------------------------------------------------------------------------- training


def test_training_error_is_a_zoo_error():
    assert issubclass(TrainingError, ZooError)


def test_a_huge_learning_rate_stops_training_naming_epoch_step_and_cause(digits):
    train_split, _ = digits
    with pytest.raises(TrainingError) as info:
        train(sliceable_mlp_cnn(), train_split, epochs=2, lr=1e12, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "training diverged at epoch 1, step " in msg
    assert "learning rate 1e+12 is likely too high" in msg
    assert "lower learning rate" in msg


def test_nan_in_the_training_data_is_named_as_the_cause(digits):
    train_split, _ = digits
    with pytest.raises(TrainingError, match=r"training diverged at epoch 1, step \d+: the loss is nan; "
                       r"the training data has 2 non-finite values in 2 samples") as info:
        train(sliceable_mlp_cnn(), with_nan(train_split, rows=(5, 700)), epochs=1, progress=False)
    assert "remove or replace the NaN/inf values in the data" in str(info.value)


def test_a_custom_loss_fn_is_checked_too(digits):
    """``train_sliceable`` (slice train) trains through ``loss_fn``: the same check applies."""
    train_split, _ = digits
    steps = []

    def loss_fn(net, x, y):
        steps.append(1)
        loss = F.cross_entropy(net(x), y)
        return loss * math.inf if len(steps) == 4 else loss

    with pytest.raises(TrainingError, match="training diverged at epoch 1, step 4: the loss is inf"):
        train(sliceable_mlp_cnn(), train_split, epochs=1, loss_fn=loss_fn, progress=False)
    assert len(steps) == 4


def test_the_loss_check_runs_before_the_update():
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match="epoch 3, step 7"):
        check_finite_loss(torch.tensor(float("nan")), 3, 7, lr=0.1)
    assert check_finite_loss(torch.tensor(1.5), 1, 1) == 1.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_finite_weights_at_the_end_of_an_epoch_stop_training(digits):
    """Weights no step's loss depends on (a buffer, units outside a slice) are checked after each epoch."""
    train_split, _ = digits
    model = sliceable_mlp_cnn()
    model.register_buffer("spare", torch.zeros(3))

    def loss_fn(net, x, y):
        net.spare.fill_(float("nan"))
        return F.cross_entropy(net(x), y)

    with pytest.raises(TrainingError, match=r"training diverged in epoch 1: the weights became non-finite "
                       r"\(3 of [\d,]+ values, in 'spare'\)"):
        train(model, train_split, epochs=2, loss_fn=loss_fn, max_steps=2, progress=False)
    with pytest.raises(TrainingError, match="epoch 5"):
        check_finite_weights(model, 5)


def test_a_nan_model_gets_no_accuracy(digits):
    train_split, test_split = digits
    model = sliceable_mlp_cnn()
    assert 0.0 <= evaluate(model, test_split) <= 1.0
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"outputs on 'digits' are non-finite for 359 of 359 samples: "
                       r"the model has non-finite weights \(1 of [\d,]+ values, in '0.weight'\)"):
        evaluate(model, test_split)
    with pytest.raises(TrainingError, match="the data has 1 non-finite value in 1 sample"):
        evaluate(sliceable_mlp_cnn(), with_nan(test_split))
    with pytest.raises(TrainingError, match=r"cannot train: the model has non-finite weights before training"):
        train(model, train_split, epochs=1, progress=False)


def test_the_per_epoch_evaluation_is_checked(digits):
    train_split, test_split = digits
    model = sliceable_mlp_cnn()
    with pytest.raises(TrainingError, match="outputs on 'digits' are non-finite"):
        train(nn.Sequential(model, Log()), train_split, epochs=1, max_steps=1, eval_split=test_split,
              loss_fn=lambda net, x, y: F.cross_entropy(net[0](x), y), progress=False)


class Log(nn.Module):
    """-inf logits for every sample (log of zeros) whatever the weights."""

    def forward(self, x):
        return torch.log(x * 0)


def test_a_nan_loss_at_the_first_step_does_not_blame_the_learning_rate(digits):
    train_split, _ = digits
    with pytest.raises(TrainingError, match="step 1: the loss is nan before any update") as info:
        train(nn.Sequential(sliceable_mlp_cnn(), Log(), nn.Identity()), train_split, epochs=1, progress=False)
    assert "learning rate" not in str(info.value)


def test_dery_tuning_stops_on_divergence(digits):
    """The DeRy pipeline tunes the assembly with ``train``: a diverging tune raises instead of reporting NaN."""
    train_split, _ = digits
    config = AssembleConfig(budget=Budget(), tune="full", epochs=1, lr=1e12)
    with pytest.raises(TrainingError, match="training diverged at epoch 1"):
        tune(sliceable_mlp_cnn(), train_split, config)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["table", "json"])
def test_cli_slice_train_diverging_exits_2_and_commits_nothing(tmp_path, json_flag):
    out = tmp_path / "sliced"
    code, stdout, err = run_cli("slice", "train", SPEC, "--data", "digits", "--lr", "1e12", "--epochs", "1",
                                "--out", out, *json_flag)
    assert code == 2, (stdout, err)
    visible = err.rsplit("\r", 1)[-1]  # what a terminal shows: the progress bar (stderr) is erased by \r
    assert_one_line_error(visible, "training diverged at epoch 1, step ")
    assert "learning rate" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .sliced.*.tmp staging left
    if json_flag:
        assert stdout == ""  # no record: a diverged run is not a result


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_export_refuses_non_finite_weights(tmp_path, fp16, check):
    model = tiny_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[0].weight[1, 0, 0, 0] = float("inf")
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(model, torch.randn(2, 3, 16, 16), path, fp16=fp16, check=check)
    msg = str(info.value)
    assert msg.startswith("model has non-finite weights (2 of "), msg
    assert "in '0.weight'" in msg and "lower learning rate" in msg
    assert "export-unsafe" not in msg
    assert list(tmp_path.iterdir()) == []


def test_export_names_a_non_finite_buffer(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 1, 8, 8))
    model[1].running_var[2] = float("nan")
    with pytest.raises(ExportError, match=r"non-finite weights \(1 of [\d,]+ values, in '1.running_var'\)"):
        export_onnx(model.eval(), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_weights_that_overflow_fp16(tmp_path):
    model = tiny_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ExportError, match=r"model weights overflow fp16 \(1 of .* in 'model.0.weight'.*fp16=False"):
        export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", fp16=True)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_finite_reference_output(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="PyTorch output on the example input has .* non-finite.*without NaN/inf"):
        export_onnx(tiny_cnn(), x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
