"""Rule lookups: function rules by canonical op name, module rules by class, and user module rules.

Rule files register themselves with decorators when the package is imported::

    @function_rule("cat", "concat", "concatenate", "stack")
    def rule_cat(cx: Cx) -> Any: ...

    @module_rule(nn.Linear)
    def linear_module(cx: Cx, m: nn.Linear) -> Any: ...

Dispatch (:func:`apply_rule`): a ``call_module`` node uses the rule of the most specific class in
its module's MRO that has one (at each class a user rule from :func:`register_module_rule` wins
over the built-in one; ``exact=True`` built-ins match that class only, not subclasses); other
nodes use the rule registered for :func:`~.names.op_name` of the node, else the first matching
fallback predicate (e.g. ATen pointwise tags). No rule: :func:`~.coupling.unknown` pins the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.nn as nn

from zoocompiler.core.errors import ZooError

from .context import Cx
from .coupling import unknown, unknown_module

FunctionRule = Callable[[Cx], Any]
ModuleRule = Callable[[Cx, Any], Any]
ModuleKey = type | str  # a class, or "package.module.QualName" for classes of optional packages (timm)
R = TypeVar("R", bound=Callable[..., Any])

_FUNCTIONS: dict[str, FunctionRule] = {}
_FALLBACKS: list[tuple[Callable[[str], bool], FunctionRule]] = []
_MODULES: dict[ModuleKey, tuple[ModuleRule, bool]] = {}  # built-in: key -> (rule, exact)
_USER_MODULES: dict[type, ModuleRule] = {}


def function_rule(*names: str) -> Callable[[R], R]:
    """Decorator: the rule ``rule(cx) -> state`` handles the ops with these canonical names."""

    def register(rule: R) -> R:
        for name in names:
            if name in _FUNCTIONS:
                raise ValueError(f"op '{name}' already has the rule {_FUNCTIONS[name].__qualname__}")
            _FUNCTIONS[name] = rule
        return rule

    return register


def function_fallback(predicate: Callable[[str], bool]) -> Callable[[R], R]:
    """Decorator: the rule handles every op name without a named rule for which ``predicate`` is true."""

    def register(rule: R) -> R:
        _FALLBACKS.append((predicate, rule))
        return rule

    return register


def module_rule(*keys: ModuleKey, exact: bool = False) -> Callable[[R], R]:
    """Decorator: the built-in rule ``rule(cx, module) -> state`` handles leaf modules of these classes.

    Subclasses match too (nearest class in the MRO wins) unless ``exact``. A string key names a
    class by ``"module.QualName"`` so optional packages need not be imported.
    """

    def register(rule: R) -> R:
        for key in keys:
            if key in _MODULES:
                raise ValueError(f"module class {key} already has the rule {_MODULES[key][0].__qualname__}")
            _MODULES[key] = (rule, exact)
        return rule

    return register


def register_module_rule(cls: type[nn.Module], rule: ModuleRule) -> Callable[[], None]:
    """Teach the unit-group analysis a leaf module class; returns a callable that undoes it.

    ``rule(cx, module)`` is called for every ``call_module`` node whose module is an instance of
    ``cls`` (or of a subclass, unless a subclass has a rule of its own), in place of any built-in
    rule. It receives ``cx`` (:class:`~.context.Cx`: ``cx.this()`` is the input node,
    ``cx.st(node)`` its state, ``cx.shape(node)`` its shape, ``cx.param_name("conv.weight")`` a
    parameter's graph-wide name, ``cx.store`` the element store) and the module. It must return the
    output's state: a :class:`~.states.Table` with the units on the output, None (no units) or a
    list (one per output of a tuple-returning module), and record every parameter slice that holds
    units (``cx.store.param`` or helpers such as :func:`~.layers.conv_units`,
    :func:`~.layers.linear_units`, :func:`~.norms.batchnorm_units`). A rule that raises fails
    closed: the node's inputs are pinned with the error as reason. Example (a conv whose output is
    scaled by a constant: its units are the inner conv's, see tests/test_unit_rule_registry.py)::

        from zoocompiler.passes.analysis.unit_rules import conv_units

        def scaled_conv_rule(cx, m):
            conv = m.conv
            return conv_units(cx, cx.this(), cx.param_name("conv.weight"), cx.param_name("conv.bias"),
                              conv.groups, conv.in_channels, conv.out_channels)

        undo = zc.register_module_rule(ScaledConv, scaled_conv_rule)
        gm = zc.trace(model, x, extra_leaf_modules=(ScaledConv,))  # ScaledConv groups are prunable
        undo()

    Registering ``cls`` again replaces its rule until that registration is undone. Raises
    ``ZooError`` when ``cls`` is not an ``nn.Module`` subclass or ``rule`` is not callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        got = f"class {cls.__qualname__}" if isinstance(cls, type) else f"a {type(cls).__name__} object"
        raise ZooError(f"register_module_rule needs an nn.Module subclass, got {got}", "pass the module class itself")
    if not callable(rule):
        got = f"a {type(rule).__name__} object"
        raise ZooError(f"register_module_rule needs a callable rule, got {got}", "pass a function rule(cx, module)")
    previous = _USER_MODULES.get(cls)
    _USER_MODULES[cls] = rule

    def unregister() -> None:
        if _USER_MODULES.get(cls) is rule:
            if previous is None:
                del _USER_MODULES[cls]
            else:
                _USER_MODULES[cls] = previous

    return unregister


def rule_for_function(name: str) -> FunctionRule | None:
    """The rule for a call_function / call_method op name, or None (unknown op)."""
    rule = _FUNCTIONS.get(name)
    if rule is not None:
        return rule
    for predicate, fallback in _FALLBACKS:
        if predicate(name):
            return fallback
    return None


def rule_for_module(cls: type) -> ModuleRule | None:
    """The rule for leaf modules of class ``cls``, or None (unknown module)."""
    for i, klass in enumerate(cls.__mro__):
        user = _USER_MODULES.get(klass)
        if user is not None:
            return user
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            entry = _MODULES.get(key)
            if entry is not None and (i == 0 or not entry[1]):
                return entry[0]
    return None


def apply_rule(cx: Cx) -> Any:
    """Apply the rule for ``cx.node`` (call_function / call_method / call_module); no rule: unknown."""
    if cx.node.op == "call_module":
        module = cx.module
        mrule = rule_for_module(type(module))
        return unknown_module(cx) if mrule is None else mrule(cx, module)
    frule = rule_for_function(cx.op)
    return unknown(cx) if frule is None else frule(cx)
