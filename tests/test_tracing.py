"""Tracing, layouts, cut points and blocks on hand-made and randomly generated models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers.architectures import traced
from helpers.random_models import RandomNet, build_random_net, random_net_specs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoocompiler.core.errors import InputShapeError, PassError, TraceError
from zoocompiler.ir import Layout, graph_info, node_info
from zoocompiler.passes.analysis import run_analysis, trace
from zoocompiler.passes.analysis.costs import total_cost
from zoocompiler.passes.rewrite.blocks import extract_block, partition_blocks


class ShapeBranch(nn.Module):
    """Python control flow on a shape: plain symbolic tracing fails, torch.export does not."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c1(x).relu()
        if y.shape[-1] > 8:
            y = nn.functional.avg_pool2d(y, 2)
        y = self.c2(y) + y
        return self.fc(y.mean((2, 3)))


class DataBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class HasDataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataBranch()

    def forward(self, x):
        return self.gate(self.conv(x))


def _chain(gm, bounds, x):
    for block in partition_blocks(gm, bounds):
        x = block(x)
    return x


def test_export_fallback_for_shape_dependent_control_flow():
    model = ShapeBranch().eval()
    gm = trace(model, torch.randn(2, 3, 16, 16))
    assert graph_info(gm).tracer == "export"
    cuts = graph_info(gm).cut_points
    assert len(cuts) >= 5
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(_chain(gm, [0, 2, len(cuts) - 1], x), model(x), atol=1e-6)
    assert total_cost(gm).params == sum(p.numel() for p in model.parameters())


def test_untraceable_model_names_module_and_fix():
    with pytest.raises(TraceError) as err:
        trace(HasDataBranch(), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "'gate'" in message and "control flow" in message and "extra_leaf_modules" in message
    assert "\n" not in message


def test_leaf_module_makes_it_traceable():
    gm = trace(HasDataBranch(), torch.randn(1, 3, 8, 8), extra_leaf_modules=(DataBranch,))
    assert graph_info(gm).tracer == "fx"
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_wrong_input_shape_is_a_one_line_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(InputShapeError) as err:
        trace(model, torch.randn(1, 1, 8, 8))
    assert "(1, 1, 8, 8)" in str(err.value) and "\n" not in str(err.value)


def test_layouts_of_a_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2)
    gm = trace(model, torch.randn(2, 3, 32, 32))
    layouts = {}
    for n in gm.graph.nodes:
        t = node_info(n).tensor
        if t is not None and node_info(n).cut_index is not None:
            layouts[n.name] = t
    assert layouts["x"].layout == Layout.MAP
    tokens = [t for t in layouts.values() if t.layout == Layout.TOKENS and t.shape[1] == 6]
    assert tokens and all(t.prefix_tokens == 2 for t in tokens)  # class + distillation token
    assert [t.layout for t in layouts.values()][-1] in (Layout.FLAT,)


def test_layouts_of_swin_are_channels_last():
    pytest.importorskip("torchvision")
    _, _, gm = traced("tv_swin_t")  # torchvision swin_t on 2×3×64×64, the shared trace
    kinds = {node_info(n).tensor.layout for n in gm.graph.nodes if node_info(n).cut_index is not None}
    assert Layout.MAP_NHWC in kinds


def test_analysis_is_idempotent():
    model = build_random_net(dict(in_ch=3, stem=8, blocks=[("residual", None), ("se", 2)], head="pool",
                                  classes=3, size=6))
    gm = trace(model, torch.randn(2, 3, 6, 6))
    before = (list(graph_info(gm).cut_points), total_cost(gm), len(graph_info(gm).unit_groups))
    run_analysis(gm)
    after = (list(graph_info(gm).cut_points), total_cost(gm), len(graph_info(gm).unit_groups))
    assert before == after


def test_extract_block_rejects_bad_boundaries():
    model = build_random_net(dict(in_ch=3, stem=8, blocks=[("residual", None)], head="pool", classes=3, size=6))
    gm = trace(model, torch.randn(2, 3, 6, 6))
    residual_inner = next(n.name for n in gm.graph.nodes if n.name.startswith("blocks_0_conv1"))
    with pytest.raises(PassError, match="not a cut point"):
        extract_block(gm, 0, residual_inner)
    with pytest.raises(PassError, match="not before"):
        extract_block(gm, 3, 1)


def _top_level_block_outputs(gm) -> set[str]:
    last: dict[str, str] = {}
    for n in gm.graph.nodes:
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        if len(stack) >= 2 and stack[0][0] == "blocks":
            last[stack[1][0]] = n.name
    return set(last.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=random_net_specs(), data=st.data())
def test_random_models_cut_and_chain(spec, data):
    kwargs, shape = spec
    model: RandomNet = build_random_net(kwargs)
    gm = trace(model, torch.randn(2, *shape))
    cuts = graph_info(gm).cut_points
    assert _top_level_block_outputs(gm) <= set(cuts)
    inner = data.draw(st.sets(st.integers(1, len(cuts) - 2), max_size=4)) if len(cuts) > 2 else set()
    bounds = [0, *sorted(inner), len(cuts) - 1]
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert (_chain(gm, bounds, x) - model(x)).abs().max().item() <= 1e-5
    assert total_cost(gm).params == sum(p.numel() for p in model.parameters())
