"""The core architecture matrix shared by the tests and bench/core_matrix.py.

Each case names a model spec, a small input that the architecture accepts, and the module
types that form its residual / transformer blocks: every instance of those types must end
at a cut point, and ``blocks`` is how many instances the architecture has (checked, so a
renamed class cannot make the test vacuous).

The matrix is built lazily and at most once per process (so once per xdist worker): every
architecture's model, example input and analysed trace stay cached for the whole session.
``traced`` hands out those shared objects (read-only); ``fresh_model`` a private copy of the
model to mutate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchCase:
    id: str
    spec: str
    input_shape: tuple[int, int, int]
    block_types: tuple[str, ...]
    blocks: int


ARCHS: list[ArchCase] = [
    ArchCase("tv_resnet18", "torchvision:resnet18", (3, 32, 32), ("BasicBlock",), 8),
    ArchCase("tv_resnet50", "torchvision:resnet50", (3, 32, 32), ("Bottleneck",), 16),
    ArchCase("tv_mobilenet_v3_small", "torchvision:mobilenet_v3_small", (3, 32, 32), ("InvertedResidual",), 11),
    ArchCase("tv_densenet121", "torchvision:densenet121", (3, 32, 32), ("_DenseBlock", "_Transition"), 7),
    ArchCase("tv_shufflenet_v2_x0_5", "torchvision:shufflenet_v2_x0_5", (3, 32, 32), ("InvertedResidual",), 16),
    ArchCase("tv_efficientnet_b0", "torchvision:efficientnet_b0", (3, 32, 32), ("MBConv",), 16),
    ArchCase("tv_regnet_y_400mf", "torchvision:regnet_y_400mf", (3, 32, 32), ("ResBottleneckBlock",), 16),
    ArchCase("tv_vit_b_16", "torchvision:vit_b_16,image_size=32", (3, 32, 32), ("EncoderBlock",), 12),
    ArchCase("tv_swin_t", "torchvision:swin_t", (3, 64, 64), ("SwinTransformerBlock",), 12),
    ArchCase("tv_convnext_tiny", "torchvision:convnext_tiny", (3, 32, 32), ("CNBlock",), 18),
    ArchCase("timm_resnet18", "timm:resnet18", (3, 32, 32), ("BasicBlock",), 8),
    ArchCase(
        "timm_mobilenetv3_small_100",
        "timm:mobilenetv3_small_100",
        (3, 32, 32),
        ("DepthwiseSeparableConv", "InvertedResidual"),
        11,
    ),
    ArchCase("timm_vit_tiny", "timm:vit_tiny_patch16_224,img_size=32", (3, 32, 32), ("Block",), 12),
    ArchCase("timm_deit_tiny", "timm:deit_tiny_patch16_224,img_size=32", (3, 32, 32), ("Block",), 12),
    ArchCase("timm_convnext_atto", "timm:convnext_atto", (3, 32, 32), ("ConvNeXtBlock",), 12),
    ArchCase(
        "timm_efficientnet_b0",
        "timm:efficientnet_b0",
        (3, 32, 32),
        ("DepthwiseSeparableConv", "InvertedResidual"),
        16,
    ),
    ArchCase("timm_regnety_002", "timm:regnety_002", (3, 32, 32), ("Bottleneck",), 13),
]

ARCH_IDS = [a.id for a in ARCHS]
ARCH_BY_ID = {a.id: a for a in ARCHS}


@dataclass(frozen=True)
class _Built:
    model: object
    x: object
    rng_after_model: object  # torch RNG state right after building the model
    rng_after_input: object  # ... and after drawing ``x``
    digest: tuple  # of the model's state and mode, to notice a test that changed the shared model


_BUILT: dict[str, _Built] = {}
_TRACED: dict[str, tuple[object, tuple]] = {}  # arch id → (analysed GraphModule, its digest)


def _model_digest(model) -> tuple:
    """Every module's mode and, per tensor of the state, its identity and in-place version counter (bumped
    by every in-place write, ``torch.no_grad()`` or not): cheap, and any change of a weight shows."""
    return (
        tuple(m.training for m in model.modules()),
        tuple((k, id(v), v._version) for k, v in model.state_dict(keep_vars=True).items()),
    )


def _graph_digest(gm) -> tuple:
    """The generated code and the unit groups of an analysed graph."""
    from zoocompiler.ir import graph_info

    info = graph_info(gm)
    groups = tuple((g.gid, g.size, g.pinned, tuple(g.divisible_by), len(g.members)) for g in info.unit_groups)
    return gm.code, tuple(info.cut_points), groups


def _built(arch_id: str) -> _Built:
    """``torch.manual_seed(0)``, the model in eval mode, then ``torch.randn(2, *input_shape)``; once per process."""
    if arch_id not in _BUILT:
        import torch

        from zoocompiler.sources import load_model

        case = ARCH_BY_ID[arch_id]
        torch.manual_seed(0)
        model = load_model(case.spec).eval()
        rng_after_model = torch.get_rng_state()
        x = torch.randn(2, *case.input_shape)
        _BUILT[arch_id] = _Built(model, x, rng_after_model, torch.get_rng_state(), _model_digest(model))
    return _BUILT[arch_id]


def traced(arch_id: str):
    """(model, example input, annotated GraphModule) of one case, built once per process and shared.

    The three are shared by every test of the worker (the GraphModule shares the model's parameters):
    read them, or deep-copy before changing anything (``copy.deepcopy(gm)`` keeps the analysis);
    :func:`shared_cases_changed` (checked at the end of the test session) reports a case a test changed.
    The torch RNG is left as right after building the case (seed 0, model, input), on a cache hit too,
    so what a test draws next does not depend on which test built the case first.
    """
    import torch

    built = _built(arch_id)
    if arch_id not in _TRACED:
        from zoocompiler.passes.analysis import trace

        gm = trace(built.model, built.x)
        _TRACED[arch_id] = gm, _graph_digest(gm)
    torch.set_rng_state(built.rng_after_input)
    return built.model, built.x, _TRACED[arch_id][0]


def fresh_model(arch_id: str):
    """A private deep copy of the cached model of one case (the weights of ``torch.manual_seed(0)``,
    ``load_model(spec).eval()``), to mutate freely; nothing is traced. The torch RNG is left as right
    after building the model, so a following ``torch.randn(2, *input_shape)`` is the case's example input."""
    import copy

    import torch

    built = _built(arch_id)
    model = copy.deepcopy(built.model)
    torch.set_rng_state(built.rng_after_model)
    return model


def shared_cases_changed() -> list[str]:
    """The cached cases whose model (weights, buffers, modes) or traced graph (code, cut points, unit groups)
    differ from when they were built: a test changed a shared object instead of a copy."""
    changed = [a for a, b in _BUILT.items() if _model_digest(b.model) != b.digest]
    changed += [f"{a} (graph)" for a, (gm, digest) in _TRACED.items() if _graph_digest(gm) != digest]
    return changed


def block_output_nodes(gm, type_names: tuple[str, ...]) -> dict[str, str]:
    """For every module instance whose class name is in ``type_names``: path → its last graph node."""
    last: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if getattr(cls, "__name__", str(cls)) in type_names:
                last[path] = node.name
    return last
