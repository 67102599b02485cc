"""The core architecture matrix shared by the tests and bench/core_matrix.py.

Each case names a model spec, a small input that the architecture accepts, and the module
types that form its residual / transformer blocks: every instance of those types must end
at a cut point, and ``blocks`` is how many instances the architecture has (checked, so a
renamed class cannot make the test vacuous).
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=4)
def traced(arch_id: str):
    """(model, example input, annotated GraphModule) for one case, cached per process."""
    import torch

    from zoocompiler.passes.analysis import trace
    from zoocompiler.sources import load_model

    case = ARCH_BY_ID[arch_id]
    torch.manual_seed(0)
    model = load_model(case.spec).eval()
    x = torch.randn(2, *case.input_shape)
    return model, x, trace(model, x)


def block_output_nodes(gm, type_names: tuple[str, ...]) -> dict[str, str]:
    """For every module instance whose class name is in ``type_names``: path → its last graph node."""
    last: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if getattr(cls, "__name__", str(cls)) in type_names:
                last[path] = node.name
    return last
