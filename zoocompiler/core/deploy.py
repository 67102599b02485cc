"""How an emitted ONNX model is deployed: its precision, I/O types, calibration, latency table and target.

Torch-free (the command line builds its option defaults from these dataclasses). ``DeployOptions.check()``
raises ``ZooError`` on any bad value before a pipeline does any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ZooError

PRECISIONS = ("fp32", "fp16", "int8")
IO_TYPES = ("fp32", "fp16")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# --round-to default per deployment target: GPU fp16 tensor cores want channel multiples of 8; ONNX Runtime's
# x86 CPU convolutions run in NCHWc blocks of 16 channels on AVX-512 (docs/bench_rewrite.md); "any": no rounding.
TARGET_ROUND_TO = {"gpu": 8, "cpu": 16, "any": None}
# the target a precision implies when --target is not given: fp16 is for GPUs, int8 for CPUs and edge devices,
# fp32 keeps exact ratios (no rounding), as before precisions existed
PRECISION_TARGET = {"fp32": "any", "fp16": "gpu", "int8": "cpu"}


@dataclass(frozen=True)
class DeployOptions:
    """The ``--precision`` family of options of every command that writes ONNX.

    ``precision``: the emitted file's precision. ``io_types``: fp16 only; "fp32" keeps float32 inputs/outputs
    (a Cast at each end). ``calibration_size``: int8 calibration rows, a seeded sample of the training split.
    ``latency_batch``: the second batch size of the latency table (the first is 1); ``latency_runs`` timed runs
    per cell (0: no latency table); ``latency_threads``: ONNX Runtime intra-op threads. ``provider``: where
    the emitted model's parity/accuracy is checked ("cpu", "cuda", "tensorrt"). ``seed``: calibration sample.
    ``int8_max_drop``: with evaluation data, an int8 model losing more accuracy points than this against fp32 is
    quantized again with its first and last weighted layers in float, and the better of the two is kept.
    """

    precision: str = "fp32"
    io_types: str = "fp32"
    calibration_size: int = 256
    latency_batch: int = 32
    latency_runs: int = 10
    latency_threads: int = 1
    provider: str = "cpu"
    seed: int = 0
    int8_max_drop: float = 1.0  # accuracy points int8 may lose before its stem and classifier stay float

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ZooError(f"unknown --precision {self.precision!r}", f"use one of: {', '.join(PRECISIONS)}")
        if self.io_types not in IO_TYPES:
            raise ZooError(f"unknown --io-types {self.io_types!r}", f"use one of: {', '.join(IO_TYPES)}")
        if self.io_types == "fp16" and self.precision != "fp16":
            raise ZooError(
                f"--io-types fp16 needs --precision fp16 (got --precision {self.precision})",
                "pass --precision fp16, or drop --io-types",
            )
        if not isinstance(self.int8_max_drop, int | float) or not self.int8_max_drop >= 0:
            raise ZooError(f"bad --int8-max-drop {self.int8_max_drop}", "pass accuracy points >= 0, e.g. 1.0")
        if self.provider not in PROVIDERS:
            raise ZooError(f"unknown --provider {self.provider!r}", f"use one of: {', '.join(PROVIDERS)}")
        for flag, value, minimum in (
            ("--calibration-size", self.calibration_size, 1),
            ("--latency-batch", self.latency_batch, 1),
            ("--latency-runs", self.latency_runs, 0),
            ("--latency-threads", self.latency_threads, 0),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ZooError(f"bad {flag} {value}", f"pass an integer >= {minimum}")

    @property
    def execution_provider(self) -> str:
        """The ONNX Runtime name of :attr:`provider`, e.g. ``CUDAExecutionProvider``."""
        return PROVIDERS[self.provider]


def round_to_for(precision: str, target: str | None, round_to: int | None) -> tuple[int | None, str]:
    """The channel multiple a plan rounds to, and why: ``--round-to`` if given, else the ``--target``'s
    (default: the one ``precision`` implies). Returns e.g. ``(8, "target gpu (fp16 tensor cores)")``."""
    if round_to is not None:
        return round_to, "--round-to"
    chosen = target or PRECISION_TARGET.get(precision, "any")
    if chosen not in TARGET_ROUND_TO:
        raise ZooError(f"unknown --target {chosen!r}", f"use one of: {', '.join(TARGET_ROUND_TO)}")
    why = {"gpu": "fp16 tensor cores", "cpu": "x86 NCHWc blocks", "any": "no rounding"}[chosen]
    implied = "" if target else f", implied by --precision {precision}"
    return TARGET_ROUND_TO[chosen], f"target {chosen} ({why}{implied})"
