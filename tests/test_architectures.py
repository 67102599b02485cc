"""Core passes over real architectures: trace, cut points, block chaining, FLOPs, ONNX parity."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.architectures import ARCH_BY_ID, ARCH_IDS, block_output_nodes, traced
from torch.utils.flop_counter import FlopCounterMode

from zoocompiler.core.modules import countable_attention
from zoocompiler.ir import graph_info, node_info
from zoocompiler.passes.analysis.costs import total_cost
from zoocompiler.passes.rewrite.blocks import extract_block, partition_blocks


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_block_boundaries_are_cut_points(arch_id):
    case = ARCH_BY_ID[arch_id]
    _, _, gm = traced(arch_id)
    cuts = set(graph_info(gm).cut_points)
    outputs = block_output_nodes(gm, case.block_types)
    assert len(outputs) == case.blocks, f"architecture has {len(outputs)} {case.block_types} modules"
    missing = {path: node for path, node in outputs.items() if node not in cuts}
    assert not missing, f"block outputs that are not cut points: {missing}"
    # cut points are ordered input → output and carry tensor layouts
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    cut_list = graph_info(gm).cut_points
    assert [order[c] for c in cut_list] == sorted(order[c] for c in cut_list)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes[cut_list[0]].op == "placeholder"
    for c in cut_list:
        assert node_info(nodes[c]).tensor is not None
        assert node_info(nodes[c]).cut_index == cut_list.index(c)


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_chained_blocks_reproduce_the_model(arch_id):
    model, x, gm = traced(arch_id)
    cuts = graph_info(gm).cut_points
    rng = random.Random(arch_id)
    x3 = torch.randn(3, *x.shape[1:])  # a batch size the graph was not traced with
    with torch.no_grad():
        reference = model(x3)
        for _ in range(3):
            k = rng.randint(2, min(6, len(cuts) - 1))
            bounds = [0, *sorted(rng.sample(range(1, len(cuts) - 1), k - 1)), len(cuts) - 1]
            y = x3
            for block in partition_blocks(gm, bounds):
                y = block(y)
            assert (y - reference).abs().max().item() <= 1e-5, f"partition {bounds}"


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_block_costs_add_up(arch_id):
    _, _, gm = traced(arch_id)
    cuts = graph_info(gm).cut_points
    mid = len(cuts) // 2
    first, second = extract_block(gm, 0, mid), extract_block(gm, mid, len(cuts) - 1)
    total = total_cost(gm)
    assert first.cost.macs + second.cost.macs == total.macs
    assert first.cost.params + second.cost.params == total.params
    assert first.output == second.input


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_flops_agree_with_flop_counter(arch_id):
    model, x, gm = traced(arch_id)
    # nn.MultiheadAttention's fused fast path has no flop formula: the reference counts its slow path too
    with torch.no_grad(), countable_attention(), FlopCounterMode(display=False) as counter:
        model(x)
    reference = counter.get_total_flops()
    ours = total_cost(gm).flops
    assert reference > 0
    assert abs(ours - reference) <= 0.01 * reference
    assert total_cost(gm).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_onnx_parity(arch_id, tmp_path):
    from zoocompiler.exports.onnx_export import export_onnx

    _, x, gm = traced(arch_id)
    report = export_onnx(gm, x, tmp_path / "model.onnx")
    assert report.max_abs_diff <= 1e-4
    assert (tmp_path / "model.onnx").exists()
