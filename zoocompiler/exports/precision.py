"""fp16 and int8 ONNX models derived from a verified fp32 ONNX model.

* **fp16**: ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``) casts weights and compute to
  half precision. The ops in :data:`FP32_OPS` (norm statistics, softmax accumulations, squares summed into a
  variance) stay float32, with Casts around them; float32 graph inputs/outputs are kept unless
  ``io_types="fp16"``. The converter appends its input Casts at the end of the node list, so the graph is
  topologically re-sorted (``onnx_ir``) before it is checked. A float initializer beyond fp16's range is refused
  (the converter would clamp it silently).
* **int8**: ONNX Runtime static quantization in QDQ format (``quantize_static``): per-channel int8 weights,
  uint8 activations (U8S8: ONNX Runtime's x86 int8 kernels take uint8 activations; S8S8 measured 3.8× slower
  than U8S8 on ResNet-18 here, no faster than fp32), ranges calibrated (MinMax) on a sample of the task's data,
  after ORT's quantization pre-processing (shape inference, graph optimisation). ``keep_ends_float`` leaves the
  first and the last weighted op (Conv/MatMul/Gemm: the stem and the classifier) in float, the usual remedy when
  full int8 loses accuracy (the caller decides: ``exports.deploy``'s accuracy guard). On an x86 CPU without VNNI,
  weights use 7 bits (``reduce_range``): the AVX2 U8S8 kernels can saturate otherwise.
* :func:`fp16_overflow` finds the first node whose float32 values exceed fp16's range on given inputs: the
  node to name when an fp16 model's outputs overflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import ExportError
from ..core.logs import LIBRARY_LOGGERS, captured_logs
from ..core.text import first_line

FP16_MAX = 65504.0
# kept in float32 inside an fp16 graph: statistics of normalisations, softmax, and the squares/means a
# decomposed norm computes its variance from (fp16 squares overflow from |x| > 256)
FP32_OPS = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "RMSNormalization",
    "LpNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Pow",
)
CALIBRATION_BATCH = 32
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ONNX Runtime's converter and quantizer log through the root logger (e.g. "Axis 1 is out-of-range for weight"
# on per-channel biases): kept off the terminal while they run
_QUIET = (*LIBRARY_LOGGERS, "onnxruntime", "root")


def _fp16_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted({*DEFAULT_OP_BLOCK_LIST, *FP32_OPS})


def _check_fp16_range(proto: onnx.ModelProto) -> None:
    """Refuse float initializers whose values overflow fp16 (the converter would clamp them to ±65504)."""
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        values = onnx.numpy_helper.to_array(init)
        peak = float(np.abs(values).max(initial=0.0))
        if peak > FP16_MAX:
            raise ExportError(
                f"weight '{init.name}' holds {peak:.3g}, beyond fp16's range (±{FP16_MAX:g})",
                "export in fp32 or int8 (--precision fp32|int8), or rescale that layer",
            )


def to_fp16(fp32: onnx.ModelProto, *, io_types: str = "fp32") -> onnx.ModelProto:
    """An fp16 copy of ``fp32`` (unchanged); :data:`FP32_OPS` stay float32; ``io_types`` "fp32" keeps float32 I/O."""
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _check_fp16_range(fp32)
    with captured_logs(_QUIET, warnings_too=True):  # the converter warns about clamped tiny values: intended
        half = convert_float_to_float16(
            fp32, keep_io_types=io_types == "fp32", op_block_list=_fp16_block_list(), disable_shape_infer=False
        )
    model = onnx_ir.from_proto(half)
    model.graph.sort()
    sorted_proto = onnx_ir.to_proto(model)
    # the exporter's value_info keeps float32 types for values the converter made float16: drop it and infer again
    del sorted_proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(sorted_proto, strict_mode=True)
        onnx.checker.check_model(inferred, full_check=True)
        return inferred
    except onnx.shape_inference.InferenceError:  # as for fp32 exports: some graphs pass the basic check only
        onnx.checker.check_model(sorted_proto)
        return sorted_proto


@dataclass(frozen=True)
class Overflow:
    """The first node (graph order) whose float32 output leaves fp16's range on the inputs tried."""

    node: str
    op_type: str
    output: str
    peak: float

    def text(self) -> str:
        return f"node '{self.node}' ({self.op_type}) reaches {self.peak:.3g} in its output '{self.output}'"


def fp16_overflow(fp32: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> Overflow | None:
    """Run ``fp32`` with every float node output exposed; the first beyond ±65504 (or ``None``)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    inferred = onnx.shape_inference.infer_shapes(probe)
    floats = {
        v.name
        for v in (*inferred.graph.value_info, *inferred.graph.output)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    existing = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name in floats and name not in existing:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named value
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {}
    for x in inputs:
        for name, value in zip(names, session.run(None, {session.get_inputs()[0].name: x})):
            finite = np.abs(value[np.isfinite(value)]) if np.issubdtype(value.dtype, np.floating) else value
            peaks[name] = max(peaks.get(name, 0.0), float(np.abs(finite).max(initial=0.0)))
    for node in probe.graph.node:
        for name in node.output:
            if peaks.get(name, 0.0) > FP16_MAX:
                return Overflow(node.name or name, node.op_type, name, peaks[name])
    return None


class _Batches:
    """An ONNX Runtime ``CalibrationDataReader`` over fixed float32 batches."""

    def __init__(self, input_name: str, sample: np.ndarray, batch: int):
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: sample[i : i + batch]} for i in range(0, len(sample), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@dataclass(frozen=True)
class Int8Model:
    """A quantized model and how it was made."""

    data: bytes
    calibration_rows: int
    preprocessed: bool  # ORT's quant_pre_process ran (False: it failed and the raw fp32 graph was quantized)
    quantized_nodes: int  # QuantizeLinear nodes in the graph
    reduce_range: bool  # 7-bit weights (an x86 CPU without VNNI)
    float_nodes: tuple[str, ...] = ()  # weighted nodes left in float: the first and the last


def _x86_without_vnni() -> bool:
    """An x86 CPU whose flags (``/proc/cpuinfo``) lack VNNI: U8S8 products can saturate its AVX2 kernels."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def float_ends(model: onnx.ModelProto) -> list[str]:
    """Names of the first and the last weighted node (graph order): the ones int8 leaves in float."""
    weighted = [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name]
    return list(dict.fromkeys(weighted[:1] + weighted[-1:]))


def quantize_int8(fp32: bytes, calibration: np.ndarray, *, keep_ends_float: bool = False) -> Int8Model:
    """Static QDQ int8 quantization of the serialised fp32 model, calibrated on ``calibration`` (N×…, float32);
    with ``keep_ends_float``, the first and the last weighted node stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("int8 calibration sample is empty", "pass --data with a non-empty training split")
    proto = onnx.load_from_string(fp32)
    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="zc-int8-") as tmp, captured_logs(_QUIET, warnings_too=True):
        raw, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        raw.write_bytes(fp32)
        try:
            quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
            source, preprocessed = pre, True
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph instead
            source, preprocessed = raw, False
        try:
            quantize_static(
                str(source),
                str(out),
                _Batches(input_name, np.ascontiguousarray(calibration, dtype=np.float32), CALIBRATION_BATCH),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=_x86_without_vnni(),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=(kept := float_ends(onnx.load(str(source))) if keep_ends_float else []),
            )
        except Exception as err:  # noqa: BLE001 - ORT's quantizer raises untyped errors
            raise ExportError(
                f"int8 quantization failed ({first_line(err, limit=300)})", "export in fp32 or fp16 instead"
            ) from err
        data = out.read_bytes()
    quantized = sum(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(data).graph.node)
    return Int8Model(data, len(calibration), preprocessed, quantized, _x86_without_vnni(), tuple(kept))
