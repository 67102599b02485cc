"""The deployment benchmarks of issue 17: ``bench/deploy.py`` (fp32/fp16/int8 on the CPU, targets) and
``bench/gpu.py`` (CUDA fp32 vs fp16; a one-line no-op without a CUDA device)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.bench import BENCH, bench_module

from zoocompiler.exports.latency import provider_usable

CUDA_USABLE = provider_usable("CUDAExecutionProvider")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _row(model: str, kind: str, fp32_b32: float, int8_b32: float, int8_change: float | None) -> dict:
    latency = [{"precision": p, "provider": "CPUExecutionProvider", "batch": b, "status": "ok", "median_ms": ms,
                "p10_ms": 0.9 * ms, "p90_ms": 1.1 * ms}
               for p, b, ms in (("fp32", 1, 1.0), ("fp32", 32, fp32_b32), ("int8", 1, 0.5), ("int8", 32, int8_b32))]
    latency.append({"precision": "fp32", "provider": "CUDAExecutionProvider", "batch": 1, "status": "not available"})
    precisions = {"fp32": {"file_bytes": 400, "accuracy_change": 0.0},
                  "int8": {"file_bytes": 100, "accuracy_change": int8_change}}
    return {"model": model, "variant": "original", "kind": kind, "precisions": precisions, "latency": latency}


def test_deploy_targets_and_ratios():
    deploy = bench_module("deploy")
    rows = [deploy.with_ratios(r) for r in (
        _row("resnet18", "architecture", 100.0, 60.0, None),  # exactly 0.6×: met
        _row("resnet50", "architecture", 100.0, 61.0, None),  # missed
        _row("vit_tiny", "architecture", 100.0, 200.0, None),  # no latency target on the ViT
        _row("zoo:vgg_s", "task", 10.0, 20.0, -0.01),  # exactly one point lost: met
        _row("assembly", "task", 10.0, 5.0, -0.0125),  # missed
    )]
    assert rows[0]["latency_ratio"]["int8"] == {"1": 0.5, "32": 0.6}
    assert rows[0]["latency_ratio_p10"]["int8"] == pytest.approx({"1": 0.5, "32": 0.6})
    assert rows[0]["size_ratio"] == {"fp32": 1.0, "int8": 0.25}
    assert rows[0]["cuda"] == ["not available"]
    verdicts = {(t["model"], t["target"].split()[1]): t["met"] for t in deploy.targets(rows, "32")}
    assert verdicts == {("resnet18", "latency"): True, ("resnet50", "latency"): False,
                        ("zoo:vgg_s", "accuracy"): True, ("assembly", "accuracy"): False}


@pytest.mark.skipif(CUDA_USABLE, reason="checks the no-GPU path")
def test_gpu_bench_without_cuda_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    plain = _run(BENCH / "gpu.py", "--out", out)
    assert plain.returncode == 0 and plain.stdout == "no CUDA device: nothing measured\n"
    as_json = _run(BENCH / "gpu.py", "--json", "--out", out)
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {"measured": False, "reason": "no CUDA device: nothing measured"}
    assert not out.exists()


@pytest.mark.slow
def test_deploy_bench_quick_runs(tmp_path):
    """`bench/deploy.py --quick`: mobilenet_v3_small (original + pruned) and zoo:resnet_s, every precision built,
    measured and scored, the targets judged."""
    from helpers.bench import run_quick_bench

    doc = run_quick_bench("deploy", tmp_path)
    rows = {(r["model"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {("mobilenet_v3_small", "original"), ("mobilenet_v3_small", "pruned 50%"),
                         ("zoo:resnet_s", "original")}
    for row in rows.values():
        assert "error" not in row and list(row["precisions"]) == ["fp32", "fp16", "int8"]
        sizes = [row["precisions"][p]["file_bytes"] for p in ("fp32", "fp16", "int8")]
        assert sizes[0] > sizes[1] > sizes[2]
        assert set(row["latency_ms"]) == {"fp32", "fp16", "int8"}
        assert all(set(per) == {"1", "32"} for per in row["latency_ms"].values())
        assert row["precisions"]["fp16"]["rel_diff"] <= 1e-2
        assert row["int8_kernels"]["int8"] > 0
    task = rows[("zoo:resnet_s", "original")]["precisions"]
    assert task["fp32"]["accuracy"] > 0.9 and task["int8"]["accuracy_change"] is not None
    assert {(t["model"], t["variant"]) for t in doc["targets"]} == set(rows)
    assert all(t["met"] in (True, False) for t in doc["targets"])


@pytest.mark.slow
def test_gpu_bench_cpu_check_runs_built_and_onnx_models(tmp_path):
    """`bench/gpu.py --cpu-check`: the GPU script's whole path on the CPU provider, a built model (sliced) and an
    ONNX file given with --onnx."""
    import torch

    from zoocompiler.exports.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 14 * 14, 10)).eval()
    export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "given.onnx")
    out = tmp_path / "gpu.json"
    proc = _run(BENCH / "gpu.py", "--cpu-check", "--models", "resnet18_sliced", "--size", "32", "--runs", "1",
                "--batch", "4", "--onnx", tmp_path / "given.onnx", "--json", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["measured"] and doc["setup"]["cpu_check"] and json.loads(proc.stdout) == doc
    sliced, given = doc["rows"]
    assert sliced["model"] == "resnet18_sliced" and sliced["slice"]["rate"] == 0.5
    assert given["source"] == "--onnx" and given["sizes"]["fp16"] < given["sizes"]["fp32"]
    for row in (sliced, given):
        assert row["fp16_parity"]["rel_diff"] <= 1e-2
        cpu = {(r["precision"], r["batch"]) for r in row["latency"]
               if r["provider"] == "CPUExecutionProvider" and r["status"] == "ok"}
        assert cpu == {("fp32", 1), ("fp32", 4), ("fp16", 1), ("fp16", 4)}
