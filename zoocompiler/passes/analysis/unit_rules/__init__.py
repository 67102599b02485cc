"""Per-op rules of the unit-group analysis: how each op creates, carries, couples or pins units.

A *unit element* is an integer id for one unit position of one producer (a conv output channel,
a linear output feature, a model-input channel, an attention head). Every tensor value carries
a :class:`Table`: the dims that carry units and an integer array of element ids over them.
Rules create fresh elements (producers), carry them (identity-like ops, views), couple them
(:meth:`Store.union`: element-wise ops, norms, concat along other dims, attention heads) or pin
them (:meth:`Store.pin`: ops that are not understood or not prunable), and record where
parameters hold them (:meth:`Store.param`) -- the slices a prune pass edits.

Tensors computed from parameters alone (``get_attr`` nodes and views of them) carry a
:class:`ParamRef` instead: which parameter dim each of their dims is. When such a tensor meets a
unit table (``x + pos_embed``, ``x * gamma``, ``cat([cls_token, x])``) the parameter adopts the
units there. Anything the rules cannot follow fails closed: units it touches are pinned with a
reason naming the op and the node.

Layout: :mod:`.states` (values and store), :mod:`.context` (what a rule sees), :mod:`.tables` and
:mod:`.coupling` (shared operations), :mod:`.registry` (lookups and :func:`register_module_rule`),
and one module per rule family (:mod:`.elementwise`, :mod:`.shape_ops`, :mod:`.indexing`,
:mod:`.reductions`, :mod:`.spatial`, :mod:`.layers`, :mod:`.norms`, :mod:`.attention`,
:mod:`.recurrent`, :mod:`.vendor`), which register their rules with decorators when imported here.
"""

from __future__ import annotations

from . import attention, elementwise, indexing, layers, norms, recurrent, reductions, shape_ops, spatial, vendor  # noqa: F401
from .context import Cx, RuleFailure, leaf_input, norm_dim
from .coupling import (
    check_shape_scalars,
    couple,
    merge_shape_deps,
    pin_inputs,
    record_param,
    taint_all,
    unknown,
    unknown_module,
)
from .elementwise import is_pointwise
from .layers import conv_units, embedding_units, linear_units, simple_param
from .names import op_name
from .norms import batchnorm_units, groupnorm_units, layernorm_units
from .registry import (
    apply_rule,
    function_fallback,
    function_rule,
    module_rule,
    register_module_rule,
    rule_for_function,
    rule_for_module,
)
from .states import (
    APPROX_LAYERNORM,
    CONSUMER_ROLES,
    LAYERNORM_STREAMS,
    PRODUCER_ROLES,
    ParamRef,
    Place,
    ShapeDeps,
    Store,
    Table,
    TensorSpec,
)
from .tables import permute_state, project, reshape_paramref, reshape_table, shape_runs, table_or_none

__all__ = [
    "APPROX_LAYERNORM",
    "CONSUMER_ROLES",
    "LAYERNORM_STREAMS",
    "PRODUCER_ROLES",
    "Cx",
    "ParamRef",
    "Place",
    "RuleFailure",
    "ShapeDeps",
    "Store",
    "Table",
    "TensorSpec",
    "apply_rule",
    "batchnorm_units",
    "check_shape_scalars",
    "conv_units",
    "couple",
    "embedding_units",
    "function_fallback",
    "function_rule",
    "groupnorm_units",
    "is_pointwise",
    "layernorm_units",
    "leaf_input",
    "linear_units",
    "merge_shape_deps",
    "module_rule",
    "norm_dim",
    "op_name",
    "permute_state",
    "pin_inputs",
    "project",
    "record_param",
    "register_module_rule",
    "reshape_paramref",
    "reshape_table",
    "rule_for_function",
    "rule_for_module",
    "shape_runs",
    "simple_param",
    "table_or_none",
    "taint_all",
    "unknown",
    "unknown_module",
]
