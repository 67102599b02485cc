"""Errors keep their type through the analysis pass manager: a ``PassError`` raised inside an analysis
pass reaches the caller as itself and the CLI as a one-line error with exit code 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers.cli import assert_one_line_error

from zoocompiler.core.errors import PassError, TraceError
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.tracing import trace_graph


class ConstantOutput(nn.Module):
    """A model whose output does not depend on its input (the cut-point pass refuses it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.logits = nn.Parameter(torch.ones(1, 10))

    def forward(self, x):
        return self.logits.expand(x.shape[0], 10) * 2


class DataDependentControlFlow(nn.Module):
    """A model neither torch.fx nor torch.export can trace (its output width depends on the data)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y.flatten(1)[:, : int(y.abs().sum().item()) % 5 + 1]
        return y.flatten(1)


def constant_output() -> nn.Module:
    return ConstantOutput()


def untraceable() -> nn.Module:
    return DataDependentControlFlow()


def test_pass_error_keeps_its_type_through_run_analysis():
    gm = trace_graph(ConstantOutput(), torch.randn(2, 1, 8, 8))
    with pytest.raises(PassError, match="output does not depend on the input"):
        run_analysis(gm)
    with pytest.raises(PassError, match="output does not depend on the input"):
        trace(ConstantOutput(), torch.randn(2, 1, 8, 8))


def test_untraceable_model_is_a_trace_error():
    with pytest.raises(TraceError, match="cannot trace module"):
        trace(DataDependentControlFlow(), torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [("constant_output", "the output does not depend on the input"), ("untraceable", "cannot trace module")],
)
def test_cli_reports_pass_and_trace_errors_in_one_line(capsys, factory, fragment):
    from zoocompiler.cli import main

    code = main(["inspect", f"python:test_pass_errors:{factory}", "--input-shape", "1,8,8"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, fragment)
