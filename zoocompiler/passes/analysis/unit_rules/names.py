"""Canonical op names: the keys function rules are registered under (one name for torch, method and ATen)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

OPERATOR_NAMES = {
    "truediv": "div",
    "floordiv": "floor_divide",
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "itruediv": "div",
    "and_": "bitwise_and",
    "or_": "bitwise_or",
    "xor": "bitwise_xor",
    "invert": "bitwise_not",
    "pos": "positive",
    "ifloordiv": "floor_divide",
    "getattr": "getattr",
}


def op_name(node: fx.Node) -> str:
    """Canonical op name: method/ATen/torch names bare (in-place ``_`` dropped), others qualified.

    ``torch.cat``, ``x.cat`` and ``aten.cat.default`` are all ``"cat"``; ``operator.truediv`` is
    ``"div"``; a function outside torch is ``"<module>.<name>"`` (e.g. torchvision, timm helpers).
    """
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", repr(target))
        if target in (operator.getitem,):
            return "getitem"
        if mod in ("_operator", "operator"):
            return OPERATOR_NAMES.get(name, name)
        if target is getattr:
            return "getattr"
        if not (mod.startswith("torch") and not mod.startswith("torchvision")):
            return f"{mod}.{name}"
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        name = name[:-1]
    return name
