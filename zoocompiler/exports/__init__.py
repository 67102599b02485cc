"""Exports: ONNX export with ONNX Runtime parity checks, and ONNX Runtime latency measurement."""

from __future__ import annotations

from .latency import LatencyReport, available_providers, has_fp16, measure_latency, ort_session, resolve_providers
from .onnx_export import ExportReport, ParityStats, export_onnx, first_tensor, onnx_parity, parity_stats

__all__ = [
    "ExportReport",
    "LatencyReport",
    "ParityStats",
    "available_providers",
    "export_onnx",
    "first_tensor",
    "has_fp16",
    "measure_latency",
    "onnx_parity",
    "ort_session",
    "parity_stats",
    "resolve_providers",
]
