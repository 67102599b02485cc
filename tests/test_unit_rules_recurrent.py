"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in the unit-group analysis: hidden units prune exactly (pruned == masked),
export with parity and slice with Model Slicing's per-input re-scaling (paper 003 §3.3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers.pruning import assert_close, expected_params, random_plan, randomized

from zoocompiler.core.modules import count_params
from zoocompiler.ir import graph_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.plans import Plan, graph_fingerprint, group_keys
from zoocompiler.passes.rewrite.prune import masked_reference, prune
from zoocompiler.passes.rewrite.slicing import kept_units, make_sliceable

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class SeqNet(nn.Module):
    """Linear embedding -> recurrent layer -> linear head on the last step (``last``), on every step
    (``seq``) or on the last layer's final state ``h_n[-1]`` (``state``)."""

    def __init__(self, cell: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 head: str = "last", proj: int = 0):
        super().__init__()
        self.embed = nn.Linear(6, 10)
        extra = {"proj_size": proj} if proj else {}
        self.rnn = CELLS[cell](10, 12, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                               **extra)
        self.batch_first, self.mode, self.cell = batch_first, head, cell
        self.head = nn.Linear((proj or 12) * (1 if head == "state" else 1 + bidirectional), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, state = self.rnn(self.embed(x))
        if self.mode == "seq":
            return self.head(y)
        if self.mode == "state":
            h = state[0] if self.cell == "lstm" else state
            return self.head(h[-1])
        return self.head(y[:, -1] if self.batch_first else y[-1])


CASES = [
    pytest.param(cell, dict(layers=layers, bidirectional=bidir, batch_first=bf, head=head), id=f"{cell}-{tag}")
    for cell in CELLS
    for tag, layers, bidir, bf, head in [
        ("l1-last", 1, False, True, "last"),
        ("l2-bidir-last", 2, True, True, "last"),
        ("l2-seqfirst-seq", 2, False, False, "seq"),
        ("l1-bidir-seqfirst-seq", 1, True, False, "seq"),
        ("l2-state", 2, False, True, "state"),
    ]
] + [pytest.param("lstm", dict(layers=2, proj=5), id="lstm-l2-proj")]


def _input(kw: dict) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 7, 6) if kw.get("batch_first", True) else torch.randn(7, 2, 6)


def _rnn_groups(gm):
    return [g for g in graph_info(gm).unit_groups if any(m.param and m.param.startswith("rnn.") and m.dim == 0
                                                         for m in g.members)]


@pytest.mark.parametrize("cell,kw", CASES)
def test_recurrent_hidden_units_prune_exactly(cell, kw):
    x = _input(kw)
    gm = randomized(trace(SeqNet(cell, **kw).eval(), x))
    groups = _rnn_groups(gm)
    assert groups and all(g.prunable for g in groups), [g.reasons for g in groups]
    plan = random_plan(gm, seed=3)
    assert any(k.startswith("rnn.") for k in plan.keep)
    result = prune(gm, plan, strategy_macs=False)
    with torch.no_grad():
        ref = gm(x)
        masked = masked_reference(gm, plan)(x)
        assert_close(result.module(x), masked, float(ref.abs().max()))
        assert (masked - ref).abs().max() > 1e-4  # the plan removes units that matter
    assert count_params(result.module) == expected_params(gm, plan) < count_params(gm)
    assert result.module.rnn.hidden_size < 12 or kw.get("proj")


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_hidden_unit_spans_its_gate_rows_and_recurrent_columns(cell):
    """Unit j: row g*H + j of every gate block, column j of weight_hh, column j / H + j of the next layer."""
    gm = trace(SeqNet(cell, layers=2, bidirectional=True).eval(), _input({}))
    (group,) = _rnn_groups(gm)
    assert group.size == 12
    by = {(m.param, m.dim): m.indices for m in group.members if m.param}
    gates = GATES[cell]
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l1_reverse", "rnn.bias_hh_l0"):
        assert by[(name, 0)][5] == [g * 12 + 5 for g in range(gates)], name
    assert by[("rnn.weight_hh_l0", 1)][5] == [5]
    assert by[("rnn.weight_ih_l1", 1)][5] == [5, 17] and by[("rnn.weight_ih_l1_reverse", 1)][5] == [5, 17]
    assert by[("head.weight", 1)][5] == [5, 17]
    assert ("rnn.weight_ih_l0", 1) not in by  # layer 0 consumes the embedding's units, another group


@pytest.mark.parametrize("cell", list(CELLS))
def test_zeroed_gate_rows_give_an_exactly_zero_hidden_unit(cell):
    """Why pruned == masked: from a zero state, a unit whose gate rows and biases are 0 stays exactly 0 (LSTM
    g = tanh(0) = 0 keeps c = 0; GRU n = tanh(0) = 0 and h = h/2; RNN tanh(0) = 0), whatever the others do."""
    torch.manual_seed(1)
    rnn = CELLS[cell](5, 8, num_layers=2, batch_first=True)
    with torch.no_grad():
        for k in range(2):
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{p}_l{k}")[[g * 8 + 3 for g in range(GATES[cell])]] = 0.0
        y, h = rnn(torch.randn(4, 9, 5) * 3)
    h = h[0] if cell == "lstm" else h
    assert torch.equal(y[..., 3], torch.zeros_like(y[..., 3])) and torch.equal(h[..., 3], torch.zeros_like(h[..., 3]))
    assert y[..., 2].abs().min() > 0


def test_zeroing_producers_equals_zeroing_consumers():
    """The analysis' guarantee on a recurrent group: producer-side masking == consumer-side masking."""
    x = _input({})
    gm = randomized(trace(SeqNet("lstm", layers=2, bidirectional=True).eval(), x))
    (group,) = _rnn_groups(gm)
    gone = [0, 4, 7]
    outs = []
    for roles in (("linear_out",), ("linear_in",)):
        ref = copy.deepcopy(gm)
        with torch.no_grad():
            for m in group.members:
                if m.param and m.role in roles:
                    pos = torch.tensor([p for u in gone for p in m.indices[u]])
                    ref.get_parameter(m.param).index_fill_(m.dim, pos, 0.0)
            outs.append(ref(x))
    assert_close(outs[0], outs[1], float(outs[0].abs().max()))


def test_explicit_initial_state_pins_with_a_reason():
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(6, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h0 = torch.ones(1, x.shape[0], 8)
            return self.head(self.rnn(x, h0)[0][:, -1])

    gm = trace(WithState().eval(), _input({}))
    assert not any(g.prunable for g in graph_info(gm).unit_groups)
    reasons = [r for g in graph_info(gm).unit_groups for r in g.reasons]
    assert any("explicit initial state" in r for r in reasons), reasons


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_pruned_recurrent_model_exports_with_parity(cell, tmp_path):
    from zoocompiler.exports import export_onnx

    x = _input({})
    gm = randomized(trace(SeqNet(cell, layers=2, bidirectional=True).eval(), x))
    result = prune(gm, random_plan(gm, seed=3), strategy_macs=False)
    report = export_onnx(result.module, x, tmp_path / f"{cell}.onnx")
    assert report.max_abs_diff <= report.tolerance


def _rescaled_reference(gm, x_rate_plan: Plan, rate: float):
    """Masked copy of ``gm`` with each kept input column of a sliced linear / recurrent weight scaled by
    width / kept (paper 003 §3.3, §3.5.1): input-to-hidden and hidden-to-hidden contributions separately."""
    ref = masked_reference(gm, x_rate_plan)
    H = gm.rnn.hidden_size
    k = kept_units(H, rate)
    with torch.no_grad():
        for name in ("rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l1", "head.weight"):
            ref.get_parameter(name).mul_(H / k)
        E = gm.embed.out_features
        ref.get_parameter("rnn.weight_ih_l0").mul_(E / kept_units(E, rate))
    return ref


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sliced_recurrent_layers_rescale_each_input(cell):
    x = _input({})
    gm = randomized(trace(SeqNet(cell, layers=2).eval(), x))
    model = make_sliceable(gm, groups=4).eval()
    with torch.no_grad():
        full = model(x)
        for rate in (0.5, 0.75):
            model.set_rate(rate)
            at_rate = model(x)
            plan = model.prefix_plan(rate)
            assert set(plan.keep) == set(group_keys(model.gm).values()) - {
                key for g, key in zip(graph_info(model.gm).unit_groups, group_keys(model.gm).values()) if g.pinned}
            assert plan.meta["fingerprint"] == graph_fingerprint(model.gm)
            ref = _rescaled_reference(model.gm, plan, rate)(x)
            assert_close(at_rate, ref, float(full.abs().max()))
            sliced = model.slice(rate)
            assert sliced.module.rnn.hidden_size == kept_units(12, rate)
            assert_close(sliced.module(x), at_rate, float(full.abs().max()))
            assert (at_rate - full).abs().max() > 1e-4


def test_zoo_lstm_slices_and_keeps_its_accuracy_at_rate_one():
    """The shipped sequence model (row-by-row mnist5k): sliceable, r-subnets equal the sliceable model."""
    from zoocompiler.data import load_dataset
    from zoocompiler.training import evaluate
    from zoocompiler.zoo import get_entry, load_zoo_model

    entry = get_entry("lstm_rows")
    test = load_dataset(entry.dataset, "test")
    assert test.x.shape[1:] == entry.input_shape == (28, 28)
    model = make_sliceable(trace(load_zoo_model("lstm_rows"), test.x[:2]), groups=4, sort_by="l1").eval()
    assert evaluate(model, test) == pytest.approx(entry.test_accuracy, abs=0.005)  # sorting is exact
    x = test.x[:16]
    with torch.no_grad():
        model.set_rate(0.5)
        sliced = model.slice(0.5)
        assert sliced.module.rnn.hidden_size == 32
        assert_close(sliced.module(x), model(x), float(model(x).abs().max()))


def test_lstm_state_pair_returned_whole_pins_the_units():
    class ReturnsState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 8, batch_first=True, proj_size=4)

        def forward(self, x):
            return self.rnn(x)[1]

    gm = trace(ReturnsState().eval(), _input({}))
    assert not any(g.prunable for g in graph_info(gm).unit_groups)
