"""ONNX Runtime sessions with pinned threading, and latency measurement on them.

Latency is measured, not estimated: warm-up runs, then ``runs`` timed ``session.run`` calls
on one fixed random input, summarised by median and 10th/90th percentiles. Sessions use a
fixed intra-op thread count, one inter-op thread, sequential execution and all graph
optimisations, so numbers are comparable between blocks and models on one machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..core.errors import InputShapeError, ZooError

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

# ONNX tensor element types a latency input can be generated for.
ORT_INPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers, in ONNX Runtime's priority order."""
    return list(ort.get_available_providers())


def cuda_device_present() -> bool:
    """Whether a CUDA device is visible (ONNX Runtime GPU builds list their providers without one)."""
    import torch

    return bool(torch.cuda.is_available())


def provider_usable(name: str) -> bool:
    """Whether execution provider ``name`` is in this onnxruntime build and, for GPU providers, has a device."""
    return name in available_providers() and (name not in GPU_PROVIDERS or cuda_device_present())


def why_unavailable(name: str) -> str | None:
    """Why execution provider ``name`` cannot run here (``None`` if it can)."""
    if name not in available_providers():
        return "onnxruntime-gpu not installed" if name in GPU_PROVIDERS else "not in this onnxruntime build"
    if name in GPU_PROVIDERS and not cuda_device_present():
        return "no CUDA device"
    return None


def resolve_providers(providers: list[str] | tuple[str, ...] | None) -> list[str]:
    """``providers`` (default: CPU) after checking each is available; a missing GPU provider names the extra,
    a GPU provider without a CUDA device says so."""
    requested = list(providers) if providers else list(DEFAULT_PROVIDERS)
    available = available_providers()
    for name in requested:
        if name in available:
            if name in GPU_PROVIDERS and not cuda_device_present():
                raise ZooError(
                    f"execution provider '{name}' is installed but this machine has no CUDA device",
                    "run on a machine with an NVIDIA GPU, or use the CPU provider (--provider cpu)",
                )
            continue
        if name in GPU_PROVIDERS:
            raise ZooError(
                f"execution provider '{name}' is not available in this onnxruntime build ({', '.join(available)})",
                "install the GPU runtime: pip install 'zoocompiler[gpu]'",
            )
        raise ZooError(f"unknown execution provider '{name}'", f"use one of: {', '.join(available)}")
    return requested


def has_fp16(model: onnx.ModelProto) -> bool:
    """Whether the graph holds fp16 data: an fp16 initializer, graph input, or Cast to fp16."""
    fp16 = onnx.TensorProto.FLOAT16
    graph = model.graph
    return (
        any(t.data_type == fp16 for t in graph.initializer)
        or any(v.type.tensor_type.elem_type == fp16 for v in graph.input)
        or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in graph.node)
    )


def _workaround_optimizers(model: str | os.PathLike[str] | bytes, providers: list[str]) -> list[str]:
    """Graph transformers to disable to avoid known ONNX Runtime crashes for this model.

    NchwcTransformer segfaults (null deref) on the CPU EP when a Transpose feeds an fp16 MatMul,
    which ORT wraps in Casts to fp32 (microsoft/onnxruntime#28392; seen in 1.31.1 on torchvision's
    ViT-B/16 fp16 export). It only re-lays-out fp32 convolutions into NCHWc blocks; fp32 models keep it.
    """
    if "CPUExecutionProvider" not in providers:
        return []
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        proto = onnx.load(str(model), load_external_data=False)
    return ["NchwcTransformer"] if has_fp16(proto) else []


def ort_session(
    model: str | os.PathLike[str] | bytes,
    threads: int = 1,
    providers: list[str] | tuple[str, ...] | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` on an ONNX file (or serialised bytes) with pinned threading.

    ``threads`` intra-op threads (0 = ONNX Runtime's default, all cores), one inter-op thread,
    sequential execution, all graph optimisations (except those listed by ``_workaround_optimizers``
    for fp16 graphs on CPU). ``providers`` defaults to CPU; a GPU provider missing from this build
    raises ``ZooError`` naming the ``gpu`` extra.
    """
    if threads < 0:
        raise ZooError(f"threads must be >= 0, got {threads}", "pass threads=1 (or 0 for ONNX Runtime's default)")
    resolved = resolve_providers(providers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(Path(model))
    disabled = _workaround_optimizers(model, resolved)
    return ort.InferenceSession(source, sess_options=options, providers=resolved, disabled_optimizers=disabled)


@dataclass
class LatencyReport:
    """Latency of one model on one input shape (milliseconds per ``session.run``)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    warmup: int
    threads: int
    provider: str
    batch: int
    input_shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def _check_shape(session: ort.InferenceSession, shape: tuple[int, ...]) -> None:
    declared = session.get_inputs()[0].shape
    fixed_mismatch = any(isinstance(d, int) and d != s for d, s in zip(declared, shape))
    if len(declared) != len(shape) or fixed_mismatch:
        raise InputShapeError(
            f"input shape {tuple(shape)} does not match the model's input {tuple(declared)}",
            "pass an input_shape with the model's rank and fixed dimensions (batch first)",
        )


def _input_dtype(session: ort.InferenceSession) -> type:
    onnx_type = session.get_inputs()[0].type
    if onnx_type not in ORT_INPUT_TYPES:
        raise InputShapeError(f"cannot generate inputs of type {onnx_type}", "pass dtype= explicitly")
    return ORT_INPUT_TYPES[onnx_type]


def measure_latency(
    onnx_path: str | os.PathLike[str] | bytes,
    input_shape: tuple[int, ...],
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    providers: list[str] | tuple[str, ...] | None = None,
    dtype: type | np.dtype | None = None,
) -> LatencyReport:
    """Median/p10/p90/mean latency of ``runs`` timed runs after ``warmup`` untimed ones.

    ``input_shape`` includes the batch dimension. ``dtype`` defaults to the model's declared
    input type (float32 for our fp32 and fp16 exports, which keep float32 I/O). The model must
    have a single input. On GPU providers the time includes host↔device copies.
    """
    if runs < 1 or warmup < 0:
        raise ZooError(
            f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}", "pass e.g. runs=50, warmup=10"
        )
    session = ort_session(onnx_path, threads=threads, providers=providers)
    if len(session.get_inputs()) != 1:
        raise InputShapeError(
            f"model has {len(session.get_inputs())} inputs; latency is measured for single-input models",
            "export the model with one input tensor",
        )
    shape = tuple(int(s) for s in input_shape)
    _check_shape(session, shape)
    np_dtype = np.dtype(dtype if dtype is not None else _input_dtype(session))
    rng = np.random.default_rng(0)
    feed = {session.get_inputs()[0].name: rng.standard_normal(shape).astype(np_dtype)}
    for _ in range(warmup):
        session.run(None, feed)
    times_ms = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        times_ms[i] = (time.perf_counter_ns() - start) / 1e6
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    return LatencyReport(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        mean_ms=float(times_ms.mean()),
        runs=runs,
        warmup=warmup,
        threads=threads,
        provider=session.get_providers()[0],
        batch=shape[0] if shape else 1,
        input_shape=shape,
        dtype=np_dtype.name,
    )
