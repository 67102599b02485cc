"""Exports: ONNX export with ONNX Runtime parity checks, ONNX Runtime latency measurement, and the
elastic runtime over per-slice-rate models (``ElasticModel``, ``cascade_rank``)."""

from __future__ import annotations

from .elastic import ElasticModel, cascade_rank
from .latency import LatencyReport, available_providers, has_fp16, measure_latency, ort_session, resolve_providers
from .onnx_export import ExportReport, ParityStats, export_onnx, first_tensor, onnx_parity, parity_stats

__all__ = [
    "ElasticModel",
    "ExportReport",
    "LatencyReport",
    "ParityStats",
    "available_providers",
    "cascade_rank",
    "export_onnx",
    "first_tensor",
    "has_fp16",
    "measure_latency",
    "onnx_parity",
    "ort_session",
    "parity_stats",
    "resolve_providers",
]
