"""zoocompiler: a model-zoo graph compiler (torch.fx IR → analysis passes → solvers → rewrites → ONNX).

The public API is small and imported lazily, so ``import zoocompiler`` does not import torch::

    import zoocompiler as zc

    model = zc.load_model("torchvision:resnet18,num_classes=10")
    gm = zc.trace(model, torch.randn(1, 3, 32, 32))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "zoocompiler.sources",
    "trace": "zoocompiler.passes.analysis",
    "run_analysis": "zoocompiler.passes.analysis",
    "extract_block": "zoocompiler.passes.rewrite.blocks",
    "export_onnx": "zoocompiler.exports.onnx_export",
    "export_deployable": "zoocompiler.exports.deploy",
    "DeployOptions": "zoocompiler.core.deploy",
    "measure_latency": "zoocompiler.exports.latency",
    "load_dataset": "zoocompiler.data",
    "register_module_rule": "zoocompiler.passes.analysis.unit_rules",
    "ZooError": "zoocompiler.core.errors",
}

__all__ = [
    "DeployOptions",
    "ZooError",
    "__version__",
    "export_deployable",
    "export_onnx",
    "extract_block",
    "load_dataset",
    "load_model",
    "measure_latency",
    "register_module_rule",
    "run_analysis",
    "trace",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from zoocompiler.passes.analysis import trace

    from .core.deploy import DeployOptions
    from .core.errors import ZooError
    from .data import load_dataset
    from .exports.deploy import export_deployable
    from .exports.latency import measure_latency
    from .exports.onnx_export import export_onnx
    from .passes.analysis import run_analysis
    from .passes.analysis.unit_rules import register_module_rule
    from .passes.rewrite.blocks import extract_block
    from .sources import load_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zoocompiler' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
