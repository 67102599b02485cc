"""Unit-group analysis: structural invariants over the architecture matrix, exact groups on small
hand-made models, and the numeric semantics the prune pass relies on (zeroing a unit at its
producers equals zeroing it at its consumers; an attention head is self-contained)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from helpers.architectures import ARCH_BY_ID, ARCH_IDS, fresh_model
from helpers.random_models import build_random_net, random_net_specs
from hypothesis import given, settings
from torch.fx.passes.shape_prop import ShapeProp

from zoocompiler.ir import UnitGroup, graph_info, node_info
from zoocompiler.passes.analysis import trace
from zoocompiler.passes.analysis.unit_groups import UnitGroupPass, find_unit_groups
from zoocompiler.passes.analysis.unit_rules import CONSUMER_ROLES, PRODUCER_ROLES

# ----------------------------------------------------------------------------- helpers


def opaque_op(x: torch.Tensor) -> torch.Tensor:
    """A function the analysis has no rule for (kept as one call_function node by fx.wrap)."""
    return x * torch.linspace(0.5, 1.5, x.shape[1]).view(1, -1, 1, 1)


fx.wrap("opaque_op")


def analyse(model: nn.Module, x: torch.Tensor, **kw) -> tuple[fx.GraphModule, list[UnitGroup]]:
    gm = trace(model.eval(), x, analyze=False, **kw)
    ShapeProp(gm).propagate(x)
    UnitGroupPass()(gm)
    return gm, graph_info(gm).unit_groups


def members(group: UnitGroup, *, node: str | None = None, param: str | None = None, role: str | None = None):
    return [
        m
        for m in group.members
        if (node is None or m.node == node) and (param is None or m.param == param) and (role is None or m.role == role)
    ]


def group_of(groups: list[UnitGroup], param: str, dim: int = 0) -> UnitGroup:
    found = [g for g in groups if any(m.param == param and m.dim == dim for m in g.members)]
    assert len(found) == 1, f"{param} dim {dim} is in {len(found)} groups"
    return found[0]


def param_member(group: UnitGroup, param: str, dim: int = 0):
    (m,) = [m for m in group.members if m.param == param and m.dim == dim]
    return m


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affines, and no near-zero parameters (zero-initialised heads,
    1e-6 layer scales), so a zeroed unit is not accidentally invisible at the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def tensor_of(gm: fx.GraphModule, name: str) -> torch.Tensor:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def zeroed(gm: fx.GraphModule, group: UnitGroup, unit: int, roles: tuple[str, ...]):
    """Context: zero unit ``unit`` of ``group`` in every parameter member whose role is in ``roles``."""

    class _Ctx:
        def __enter__(self):
            self.saved = []
            with torch.no_grad():
                for m in group.members:
                    if m.param is None or m.role not in roles:
                        continue
                    t = tensor_of(gm, m.param)
                    idx = torch.tensor(m.indices[unit])
                    self.saved.append((t, m.dim, idx, t.index_select(m.dim, idx).clone()))
                    t.index_fill_(m.dim, idx, 0.0)
            return self

        def __exit__(self, *exc):
            with torch.no_grad():
                for t, dim, idx, old in reversed(self.saved):
                    t.index_copy_(dim, idx, old)

    return _Ctx()


def node_values(gm: fx.GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """Values of the named nodes when running ``gm`` on ``x``."""
    out: dict[str, torch.Tensor] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n.name in names:
                out[n.name] = r.detach().clone()
            return r

    with torch.no_grad():
        _Rec(gm).run(x)
    return out


def check_invariants(gm: fx.GraphModule, groups: list[UnitGroup]) -> None:
    """Members well-formed; every conv/linear output dim and every unit-carrying value covered exactly once."""
    shapes = {n.name: tuple(tm.shape) for n in gm.graph.nodes if hasattr(tm := n.meta.get("tensor_meta"), "shape")}
    coverage: dict[tuple[str, str | None, int], list[int]] = {}
    output_side: set[tuple[str, str | None, int]] = set()
    for gid, g in enumerate(groups):
        assert g.gid == gid and g.size >= 1
        assert not g.pinned or g.reasons, f"group {gid} pinned without a reason"
        for m in g.members:
            assert len(m.indices) == g.size
            flat = [p for idx in m.indices for p in idx]
            assert all(idx for idx in m.indices), f"empty unit in {m}"
            assert len(flat) == len(set(flat)), f"overlapping units in {m.node}/{m.param}"
            size = tensor_of(gm, m.param).shape[m.dim] if m.param else shapes[m.node][m.dim]
            assert 0 <= min(flat) and max(flat) < size
            key = (m.node, m.param, m.dim)
            coverage.setdefault(key, []).extend(flat)
            if m.param is None or m.role in ("conv_out", "conv_dw", "linear_out"):
                output_side.add(key)
    for key in output_side:  # values and layer outputs: every position in exactly one unit of one group
        node, param, dim = key
        size = tensor_of(gm, param).shape[dim] if param else shapes[node][dim]
        assert sorted(coverage[key]) == list(range(size)), f"{node}/{param} dim {dim} not covered exactly once"
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear)):
            assert (n.name, f"{n.target}.weight", 0) in output_side, f"{n.target} output is in no group"
        info = node_info(n)
        if info.unit_groups is not None:
            assert len(info.unit_groups) == shapes[n.name][info.unit_dim]
            assert all(0 <= g < len(groups) for g in info.unit_groups)
    check_concat_offsets(gm, groups)


def check_concat_offsets(gm: fx.GraphModule, groups: list[UnitGroup]) -> None:
    """For a concat along its unit dim, each operand's units sit in the output at the operand's offset."""
    where: dict[str, dict[int, tuple[int, int]]] = {}  # node -> position -> (group, unit)
    for g in groups:
        for m in g.members:
            if m.param is None:
                for u, idx in enumerate(m.indices):
                    for p in idx:
                        where.setdefault(m.node, {})[p] = (g.gid, u)
    for n in gm.graph.nodes:
        if n.target not in (torch.cat,) or n.name not in where:
            continue
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) % len(n.meta["tensor_meta"].shape)
        if node_info(n).unit_dim != dim:
            continue
        offset = 0
        for t in n.args[0]:
            size = t.meta["tensor_meta"].shape[dim]
            if t.name in where and node_info(t).unit_dim == dim:
                for p in range(size):
                    assert where[n.name][offset + p] == where[t.name][p], f"{n.name}: offset of {t.name} broken"
            offset += size
        assert offset == n.meta["tensor_meta"].shape[dim] == len(where[n.name])


def _contracted_operands(gm: fx.GraphModule) -> set[tuple[str, int]]:
    """(node, dim) pairs contracted by a parameter-free matmul: such units are consumed by the matmul
    itself, so zeroing consumer *parameters* is not the masked model there."""
    out: set[tuple[str, int]] = set()
    for n in gm.graph.nodes:
        if n.target in (torch.matmul, operator.matmul, "matmul", torch.bmm, F.scaled_dot_product_attention):
            a, b = n.args[0], n.args[1]
            ra, rb = len(a.meta["tensor_meta"].shape), len(b.meta["tensor_meta"].shape)
            out |= {(a.name, ra - 1), (b.name, rb - 1 if n.target is F.scaled_dot_product_attention else rb - 2)}
    return out


def check_masking(gm: fx.GraphModule, groups: list[UnitGroup], x: torch.Tensor, max_groups: int = 6) -> int:
    """Zeroing a unit at its producers == zeroing it at its consumers, for sampled prunable groups.

    Returns how many of the sampled groups changed the model output (the check is not vacuous).
    """
    contracted = _contracted_operands(gm)
    candidates = [
        g
        for g in groups
        if g.prunable
        and any(m.role in PRODUCER_ROLES for m in g.members)
        and any(m.role in CONSUMER_ROLES for m in g.members)
        and not any((m.node, m.dim) in contracted for m in g.members if m.param is None)
    ]
    step = max(1, len(candidates) // max_groups)
    changed = 0
    with torch.no_grad():
        ref = gm(x)
        for g in candidates[::step][:max_groups]:
            unit = g.size // 2
            with zeroed(gm, g, unit, PRODUCER_ROLES):
                at_producers = gm(x)
            with zeroed(gm, g, unit, CONSUMER_ROLES):
                at_consumers = gm(x)
            scale = ref.abs().max().item() + 1e-6
            assert torch.allclose(at_producers, at_consumers, atol=1e-5 * scale, rtol=1e-4), (
                f"group {g.gid} ({g.kind}, {g.size} units) leaks: producer- and consumer-side zeroing differ"
            )
            changed += int(not torch.allclose(at_producers, ref, atol=1e-6 * scale, rtol=0))
    return changed


# ----------------------------------------------------------------------------- architecture matrix


@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_architecture_invariants_and_masking(arch_id):
    case = ARCH_BY_ID[arch_id]
    model = fresh_model(arch_id)  # torch.manual_seed(0); load_model(case.spec).eval(), a private copy
    randomize_norms(model)
    x = torch.randn(2, *case.input_shape)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    reasons = [r for g in groups for r in g.reasons]
    assert not [r for r in reasons if "could not be analysed" in r or "unknown" in r], reasons
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder")
    in_groups = set(node_info(inp).unit_groups)
    assert all(groups[g].pinned and "model input" in groups[g].reasons for g in in_groups)
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert all(groups[g].pinned and "model output" in groups[g].reasons for g in set(node_info(out_node).unit_groups))
    assert sum(g.prunable for g in groups) >= 2
    assert check_masking(gm, groups, x) >= 1


def test_resnet18_groups_are_exact():
    gm, groups = analyse(fresh_model("tv_resnet18"), torch.randn(1, 3, 32, 32))  # torchvision:resnet18
    # stem + layer1 residual stream; one group per block's inner conv; one residual stream per stage.
    assert [g.size for g in groups] == [3, 64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512, 1000]
    stem = group_of(groups, "conv1.weight")
    assert group_of(groups, "layer1.1.conv2.weight") is stem and group_of(groups, "layer1.0.bn2.weight") is stem
    stage2 = group_of(groups, "layer2.0.downsample.0.weight")
    assert group_of(groups, "layer2.0.conv2.weight") is stage2 and group_of(groups, "layer2.1.conv2.weight") is stage2
    assert param_member(stage2, "layer3.0.conv1.weight", 1).role == "conv_in"
    assert [g.pinned for g in groups].count(True) == 2


def test_vit_heads_are_units():
    model = fresh_model("timm_vit_tiny")  # timm:vit_tiny_patch16_224,img_size=32
    gm, groups = analyse(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 12
    for b, g in enumerate(heads):
        assert g.size == 3 and g.prunable
        qkv = param_member(g, f"blocks.{b}.attn.qkv.weight", 0)
        assert qkv.role == "linear_out"
        for h in range(3):  # rows of head h: its q, k and v slices
            assert qkv.indices[h] == [s * 192 + h * 64 + i for s in range(3) for i in range(64)]
        proj = param_member(g, f"blocks.{b}.attn.proj.weight", 1)
        assert proj.role == "linear_in" and proj.indices == [list(range(h * 64, h * 64 + 64)) for h in range(3)]
        hidden = group_of(groups, f"blocks.{b}.mlp.fc1.weight")
        assert hidden.prunable and hidden.size == 768 and param_member(hidden, f"blocks.{b}.mlp.fc2.weight", 1)
    stream = group_of(groups, "blocks.0.attn.proj.weight")
    assert stream.pinned and any("LayerNorm" in r for r in stream.reasons)
    assert param_member(stream, "pos_embed", 2).role == "param" and param_member(stream, "cls_token", 2)


def test_vit_zeroing_a_head_changes_only_that_head():
    model = fresh_model("timm_vit_tiny")  # timm:vit_tiny_patch16_224,img_size=32, eval mode
    x = torch.randn(2, 3, 32, 32)
    gm, groups = analyse(model, x)
    g = [g for g in groups if g.kind == "head"][0]
    proj_in = next(
        m
        for m in g.members
        if m.param is None and m.node.startswith("reshape") and m.dim == 2 and len(m.indices[0]) == 64
    )
    before = node_values(gm, x, {proj_in.node})[proj_in.node]
    with zeroed(gm, g, 1, ("linear_out",)):  # q, k, v rows (+ bias) of head 1
        after = node_values(gm, x, {proj_in.node})[proj_in.node]
    cols = proj_in.indices[1]
    others = [c for c in range(192) if c not in cols]
    assert torch.equal(after[..., others], before[..., others])
    assert torch.count_nonzero(after[..., cols]) == 0 and torch.count_nonzero(before[..., cols]) > 0


def test_torchvision_mha_heads_prunable():
    gm, groups = analyse(fresh_model("tv_vit_b_16"), torch.randn(1, 3, 32, 32))  # torchvision:vit_b_16
    heads = [g for g in groups if g.kind == "head"]
    assert len(heads) == 12 and all(g.size == 12 and not g.pinned for g in heads)
    rows = param_member(heads[0], "encoder.layers.encoder_layer_0.self_attention.in_proj_weight", 0)
    assert rows.indices[0] == [s * 768 + i for s in range(3) for i in range(64)]


def test_export_graph_matches_fx_groups():
    model = fresh_model("tv_resnet18")  # torchvision:resnet18, eval mode
    x = torch.randn(1, 3, 32, 32)
    _, fx_groups = analyse(model, x)
    from zoocompiler.tracing import _export_trace

    gm = _export_trace(model, x)
    graph_info(gm).example_input = x
    groups = find_unit_groups(gm)
    check_invariants(gm, groups)
    assert [g.size for g in groups] == [g.size for g in fx_groups]
    assert [g.pinned for g in groups] == [g.pinned for g in fx_groups]


# ----------------------------------------------------------------------------- hand-made models


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_plain_cnn_each_conv_is_a_group_and_flatten_expands():
    model = PlainCNN()
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    assert [(g.size, g.pinned) for g in groups] == [(3, True), (8, False), (16, False), (10, True)]
    g1, g2 = groups[1], groups[2]
    assert {(m.param, m.role) for m in g1.members if m.param} == {
        ("conv1.weight", "conv_out"),
        ("conv1.bias", "conv_out"),
        ("bn1.weight", "norm"),
        ("bn1.bias", "norm"),
        ("bn1.running_mean", "norm"),
        ("bn1.running_var", "norm"),
        ("conv2.weight", "conv_in"),
    }
    fc_in = param_member(g2, "fc.weight", 1)
    assert fc_in.role == "linear_in" and fc_in.indices == [list(range(c * 16, c * 16 + 16)) for c in range(16)]
    assert node_info(next(n for n in gm.graph.nodes if n.name == "conv2")).unit_groups == [2] * 16
    randomize_norms(model)
    assert check_masking(gm, groups, x) == 2


def test_plain_cnn_physical_prune_equals_zeroing():
    """Slicing every parameter member of a unit gives the model with that unit zeroed at its producers."""
    model = PlainCNN().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    for g in (groups[1], groups[2]):
        drop = 3
        with torch.no_grad(), zeroed(gm, g, drop, PRODUCER_ROLES):
            expected = gm(x)
        pruned = copy.deepcopy(gm)
        for m in g.members:
            if m.param is None:
                continue
            owner, _, attr = m.param.rpartition(".")
            mod = pruned.get_submodule(owner)
            t = getattr(mod, attr)
            keep = torch.tensor(sorted(set(range(t.shape[m.dim])) - set(m.indices[drop])))
            sliced = t.detach().index_select(m.dim, keep)
            if isinstance(t, nn.Parameter):
                setattr(mod, attr, nn.Parameter(sliced))
            else:
                mod.register_buffer(attr, sliced)
        with torch.no_grad():
            assert torch.allclose(pruned(x), expected, atol=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.b(F.relu(self.a(y)))
        return self.head(y).mean((2, 3))


def test_residual_add_couples_producers():
    model = Residual()
    x = torch.randn(2, 3, 8, 8)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    stream = group_of(groups, "stem.weight")
    assert group_of(groups, "b.weight") is stream and stream.size == 8 and stream.prunable
    assert param_member(stream, "b.weight", 0).indices == [[i] for i in range(8)]
    assert group_of(groups, "a.weight").size == 4 and group_of(groups, "a.weight") is not stream
    assert {m.param for m in stream.members if m.role == "conv_in"} == {"a.weight", "head.weight"}
    randomize_norms(model)
    assert check_masking(gm, groups, x) == 2


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2, self.b3 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.out = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.out(torch.cat([self.b1(x), self.b2(x), F.relu(self.b3(x))], dim=1))


def test_concat_offsets():
    model = Inception()
    x = torch.randn(2, 3, 6, 6)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    offsets = {"b1": 0, "b2": 4, "b3": 10}
    for name, off in offsets.items():
        g = group_of(groups, f"{name}.weight")
        size = g.size
        assert members(g, node="cat")[0].indices == [[off + i] for i in range(size)]
        assert param_member(g, "out.weight", 1).indices == [[off + i] for i in range(size)]
    assert check_masking(gm, groups, x) == 3


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv_s = nn.Conv2d(3, 8, 1)
        self.left, self.right = nn.Conv2d(3, 2, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        s1, s2 = torch.split(self.conv_s(x), [3, 5], dim=1)
        return torch.cat([a * torch.sigmoid(b), self.left(s1), self.right(s2)], 1)


def test_split_and_chunk_slice_units():
    gm, groups = analyse(SplitChunk(), torch.randn(2, 3, 4, 4))
    check_invariants(gm, groups)
    g = group_of(groups, "conv.weight")  # a * sigmoid(b) couples channel i with channel 4 + i
    assert g.size == 4 and param_member(g, "conv.weight").indices == [[i, 4 + i] for i in range(4)]
    first, second = group_of(groups, "left.weight", 1), group_of(groups, "right.weight", 1)
    assert first is not second and (first.size, second.size) == (3, 5)
    assert param_member(first, "conv_s.weight").indices == [[i] for i in range(3)]
    assert param_member(second, "conv_s.weight").indices == [[3 + i] for i in range(5)]
    assert param_member(second, "right.weight", 1).indices == [[i] for i in range(5)]


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2
        self.grouped = nn.Conv2d(16, 8, 1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.grouped(F.relu(self.dw2(F.relu(self.dw(self.pw(x))))))))


def test_depthwise_and_grouped_convs():
    model = DepthwiseGrouped()
    x = torch.randn(2, 3, 6, 6)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    g = group_of(groups, "pw.weight")
    # depthwise: out channel i is in channel i; multiplier 2: in channel i feeds out 2i, 2i+1;
    # grouped (2 groups of 8): in channel i is pruned with i + 8, so unit i spans dw2 outs {2i, 2i+1, 2i+8, 2i+9}.
    assert g is group_of(groups, "dw.weight") and g is group_of(groups, "dw2.weight")
    assert g.size == 4 and g.prunable
    assert param_member(g, "pw.weight").indices == [[i, i + 4] for i in range(4)]
    assert param_member(g, "dw.weight").role == "conv_dw"
    assert param_member(g, "dw2.weight").indices == [[2 * i, 2 * i + 1, 2 * i + 8, 2 * i + 9] for i in range(4)]
    assert param_member(g, "grouped.weight", 1).indices == [[2 * i, 2 * i + 1] for i in range(4)]
    out = group_of(groups, "grouped.weight")  # 2 groups of 4 outputs: unit k = outputs {k, k + 4}
    assert out.size == 4 and param_member(out, "grouped.weight").indices == [[k, k + 4] for k in range(4)]
    randomize_norms(model)
    assert check_masking(gm, groups, x) == 2


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.head((y * s).mean((2, 3)))


def test_squeeze_excitation_gate_is_coupled():
    model = SE()
    x = torch.randn(2, 3, 6, 6)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    g = group_of(groups, "conv.weight")
    assert g is group_of(groups, "expand.weight") and g.size == 8
    assert param_member(g, "reduce.weight", 1).role == "conv_in" and param_member(g, "head.weight", 1)
    assert group_of(groups, "reduce.weight").size == 2
    assert check_masking(gm, groups, x) == 2


class GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.head = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.conv(x))))


def test_groupnorm_units_are_norm_groups():
    model = GNNet()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 5, 5)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    g = group_of(groups, "conv.weight")
    assert g.size == 4 and param_member(g, "gn.weight").indices == [[2 * i, 2 * i + 1] for i in range(4)]
    assert check_masking(gm, groups, x) == 1


class TokenMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: B, N, 6
        x = self.embed(x)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def test_layernorm_pins_the_residual_stream():
    model = TokenMixer()
    x = torch.randn(2, 5, 6)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    stream = group_of(groups, "embed.weight")
    assert stream is group_of(groups, "fc2.weight") and stream.pinned
    assert stream.reasons == ["LayerNorm over the unit dim couples all its units (node norm)"]
    hidden = group_of(groups, "fc1.weight")
    assert hidden.prunable and hidden.kind == "feature" and hidden.size == 16
    assert check_masking(gm, groups, x) == 1


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.head(y)


@pytest.mark.parametrize("functional", [False, True])
def test_channel_shuffle_keeps_groups_balanced(functional):
    model = Shuffle()
    if functional:
        model.forward = lambda x: model.head(F.channel_shuffle(model.conv(x), 2))
    x = torch.randn(2, 3, 4, 4)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    g = group_of(groups, "conv.weight")
    assert g.size == 4 and param_member(g, "conv.weight").indices == [[j, j + 4] for j in range(4)]
    assert param_member(g, "head.weight", 1).indices == [[2 * j, 2 * j + 1] for j in range(4)]
    assert g.prunable and check_masking(gm, groups, x) == 1


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = opaque_op(self.c1(x))
        return self.c3(torch.roll(self.c2(y), 1, dims=1))


def test_unknown_op_and_channel_roll_pin_with_reasons():
    gm, groups = analyse(Unknown(), torch.randn(1, 3, 4, 4))
    check_invariants(gm, groups)
    g1, g2 = group_of(groups, "c1.weight"), group_of(groups, "c2.weight")
    assert g1.pinned and g1.reasons == [f"unknown op {__name__}.opaque_op at node opaque_op"]
    assert g2.pinned and g2.reasons == ["roll at node roll rolls along a unit dim"]
    assert not any(m.param == "c2.weight" and m.dim == 1 for g in groups for m in g.members)


class SpatialRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(torch.roll(self.c1(x), shifts=(1, 1), dims=(2, 3)))


def test_spatial_roll_carries_units():
    gm, groups = analyse(SpatialRoll(), torch.randn(1, 3, 4, 4))
    assert group_of(groups, "c1.weight").prunable and param_member(group_of(groups, "c1.weight"), "c2.weight", 1)


def test_pass_is_idempotent_and_annotates_nodes():
    model = Inception()
    gm, groups = analyse(model, torch.randn(1, 3, 6, 6))
    again = UnitGroupPass()(gm).graph_module
    assert graph_info(again).unit_groups == groups
    cat = next(n for n in gm.graph.nodes if n.name == "cat")
    assert node_info(cat).unit_dim == 1
    assert node_info(cat).unit_groups == [
        groups.index(group_of(groups, f"{b}.weight")) for b, k in (("b1", 4), ("b2", 6), ("b3", 2)) for _ in range(k)
    ]


@settings(max_examples=12)
@given(random_net_specs())
def test_random_nets_invariants_and_masking(spec):
    kwargs, shape = spec
    model = build_random_net(kwargs)
    x = torch.randn(2, *shape)
    gm, groups = analyse(model, x)
    check_invariants(gm, groups)
    assert not [r for g in groups for r in g.reasons if "could not be analysed" in r or "unknown" in r]
    check_masking(gm, groups, x, max_groups=50)
