"""GPU check (issue 17): fp32 vs fp16 latency on CUDA (and TensorRT when it really loads) of the models the
benchmarks emit, with the fp16 parity measured on the GPU.

Usage (on a machine with an NVIDIA GPU; ~3-5 min on one H200 and 16 cores). ``onnxruntime`` (a dependency) and
``onnxruntime-gpu`` (the ``gpu`` extra) install the same module, so keep only the GPU one::

    pip install -e '.[gpu]' && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu
    python bench/gpu.py --json
    python bench/gpu.py                               # tables instead of JSON
    python bench/gpu.py --onnx out/pack out/pool/model.onnx   # plus the ONNX files of other commands
    python bench/gpu.py --models resnet50_pruned --runs 50
    python bench/gpu.py --cpu-check                   # the whole script on the CPU provider (no GPU needed)

Without a usable CUDA device (``provider_usable("CUDAExecutionProvider")``: the GPU build of onnxruntime and a
device) it prints ``no CUDA device: nothing measured`` and exits 0, writing nothing. With a device but a CUDA
provider that does not load (ONNX Runtime would fall back to the CPU and time that), it says why and exits 1.

Models (built here, on the CPU, like the benchmarks build them; random weights made realistic as
``bench/deploy.py`` does, except the assembly, which is trained):

* ``assembly``: the demo assembly (``assemble()`` on digits, flops=3M, as ``bench/deploy.py``), 1×28×28;
* ``resnet18_pruned``, ``resnet50_pruned``, ``vit_tiny_pruned``: pruned 50 % as ``zoocompile prune`` does
  (``round_to`` 8: the GPU target's, ``core.deploy.round_to_for("fp16")``), 3×224×224;
* ``resnet18_sliced``: torchvision resnet18 made sliceable (BatchNorm → GroupNorm, G = 16) and materialised at
  r = 0.5 (``SliceableModel.slice``), 3×224×224;
* ``--onnx PATH ...``: ONNX files (or every ``*.onnx`` under a folder) written by other commands, e.g.
  ``zoocompile modularize extract``/``reuse``, ``pack build``, ``pool distill``/``finetune``; their fp16 copy is
  made with ``exports.precision.to_fp16`` and compared with the fp32 file on the GPU (no PyTorch model).

Each built model goes through ``export_deployable(model, x, path, DeployOptions(precision="fp16",
provider="cuda", latency_batch=32, latency_runs=--runs, latency_threads=0))``: the fp16 parity is checked on the
CUDA execution provider (relative tolerance ``DEFAULT_ATOL_FP16`` of the output scale) and the latency table times
fp32 and fp16 at batch 1 and 32 on every provider (CPU rows with all cores, in the JSON; the tables show the GPU
rows). Times include host↔device copies (``measure_latency``). Writes ``bench/results/gpu.json`` (only when
something was measured).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from zoocompiler.core.atomic import write_json_atomic
from zoocompiler.core.deploy import DeployOptions, round_to_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy import assembly_case, make_realistic, prune_half  # noqa: E402 - bench/deploy.py, this folder

RESULTS = Path(__file__).resolve().parent / "results"
NO_CUDA = "no CUDA device: nothing measured"
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
MODELS = ("assembly", "resnet18_pruned", "resnet50_pruned", "vit_tiny_pruned", "resnet18_sliced")
SPECS = {"resnet18": "torchvision:resnet18", "resnet50": "torchvision:resnet50",
         "vit_tiny": "timm:vit_tiny_patch16_224"}
BN_ROWS = 64


def provider_loads(provider: str) -> tuple[bool, str]:
    """Whether a session asked for ``provider`` alone really runs on it, and why not: ONNX Runtime falls back
    (printing "EP Error ...") when the provider's libraries do not load, e.g. TensorRT listed by the GPU wheel
    without the TensorRT libraries, or a CUDA provider built for another CUDA major version."""
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
    except Exception as err:  # noqa: BLE001 - any failure means: not usable
        return False, _one_line(err)
    ran_on = session.get_providers()[0]
    why = " ".join(printed.getvalue().split())[:300] or f"ONNX Runtime ran the probe on {ran_on}"
    return ran_on == provider, "" if ran_on == provider else why


def _preload_gpu_libraries() -> None:
    """ONNX Runtime ≥ 1.21 can load CUDA/cuDNN from the nvidia-* wheels or torch before the first session."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload()


# ----------------------------------------------------------------------------- the models


def _noise(rows: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, *shape, generator=torch.Generator().manual_seed(seed))


def pruned(arch: str, size: int, log) -> tuple[nn.Module, torch.Tensor, dict]:
    from zoocompiler.sources import load_model

    spec = SPECS[arch] + (f",img_size={size}" if arch == "vit_tiny" and size != 224 else "")
    torch.manual_seed(0)
    images = _noise(BN_ROWS, (3, size, size))
    model = make_realistic(load_model(spec), images)
    x = images[:2].clone()
    round_to = round_to_for("fp16", None, None)[0]
    log(f"{arch}: pruning 50% (round_to {round_to})")
    module, facts = prune_half(model, x, 0.5, round_to)
    return module, x, {"spec": spec, "prune": facts}


def sliced(size: int, log) -> tuple[nn.Module, torch.Tensor, dict]:
    from zoocompiler.passes.analysis import trace
    from zoocompiler.passes.rewrite.slicing import make_sliceable
    from zoocompiler.sources import load_model

    torch.manual_seed(0)
    images = _noise(BN_ROWS, (3, size, size))
    model = make_realistic(load_model(SPECS["resnet18"]), images)
    x = images[:2].clone()
    log("resnet18: making it sliceable (G = 16) and slicing at r = 0.5")
    sub = make_sliceable(trace(model, x), groups=16).slice(0.5)
    return sub.module.eval(), x, {"spec": SPECS["resnet18"], "slice": {"groups": 16, **sub.to_dict()}}


def build(name: str, size: int, epochs: int, log) -> tuple[nn.Module, torch.Tensor, dict]:
    if name == "assembly":
        case = assembly_case(None, epochs, log)
        return case.module, case.example, case.facts
    if name == "resnet18_sliced":
        return sliced(size, log)
    return pruned(name.removesuffix("_pruned"), size, log)


# ----------------------------------------------------------------------------- measuring


def deploy_row(name: str, module: nn.Module, x: torch.Tensor, facts: dict, options: DeployOptions, tmp: Path,
               trt_real: bool, log) -> dict[str, Any]:
    from zoocompiler.exports.deploy import export_deployable

    t0 = time.perf_counter()
    report = export_deployable(module, x, tmp / f"{name}.onnx", options, progress=lambda t: log(f"{name}: {t}"))
    d = report.to_dict()
    fp16 = d["precisions"]["fp16"]
    row = {"model": name, "source": "export_deployable", "input": list(x.shape[1:]), **facts,
           "fp16_parity": {k: fp16.get(k) for k in ("max_abs_diff", "rel_diff", "tolerance", "provider")},
           "sizes": {p: r.get("file_bytes") for p, r in d["precisions"].items()},
           "export": {k: d["export"].get(k) for k in ("exporter", "max_abs_diff", "tolerance")},
           "latency": _relabel(d["latency"], trt_real), "seconds": round(time.perf_counter() - t0, 1)}
    return row


def _relabel(rows: list[dict], trt_real: bool) -> list[dict]:
    """TensorRT rows measured while TensorRT does not really load ran on CUDA: say so instead of a time."""
    if trt_real:
        return rows
    return [{k: v for k, v in r.items() if k not in ("median_ms", "p10_ms", "p90_ms")}
            | {"status": "not available (TensorRT libraries missing; ONNX Runtime falls back to CUDA)"}
            if r["provider"] == TENSORRT else r for r in rows]


def onnx_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(p.rglob("*.onnx")) if p.is_dir() else [p]
    return out


def onnx_row(path: Path, providers: list[str], batch: int, runs: int, log) -> dict[str, Any]:
    """fp32 file as written vs its ``to_fp16`` copy: parity on the first GPU provider, latency on each."""
    from zoocompiler.exports.latency import ORT_INPUT_TYPES, measure_latency, ort_session
    from zoocompiler.exports.precision import to_fp16

    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    row: dict[str, Any] = {"model": str(path), "source": "--onnx", "input": shape[1:]}
    if len(proto.graph.input) != 1 or any(s is None for s in shape[1:]):
        return {**row, "error": "needs one input with fixed non-batch dimensions"}
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer):
        return {**row, "error": "already fp16: pass the fp32 file"}
    fp32 = proto.SerializeToString()
    fp16 = to_fp16(proto).SerializeToString()
    row["sizes"] = {"fp32": len(fp32), "fp16": len(fp16)}
    session32, session16 = (ort_session(m, threads=0, providers=[providers[0]]) for m in (fp32, fp16))
    name = session32.get_inputs()[0].name
    dtype = ORT_INPUT_TYPES.get(session32.get_inputs()[0].type, np.float32)
    feed = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(dtype)
    ref = np.asarray(session32.run(None, {name: feed})[0], dtype=np.float64)
    got = np.asarray(session16.run(None, {name: feed.astype(ORT_INPUT_TYPES.get(
        session16.get_inputs()[0].type, np.float32))})[0], dtype=np.float64)
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    row["fp16_parity"] = {"max_abs_diff": diff, "rel_diff": diff / scale, "tolerance": None, "provider": providers[0]}
    row["latency"] = []
    for provider in providers:
        for precision, data in (("fp32", fp32), ("fp16", fp16)):
            for b in sorted({1, batch}):
                log(f"{path.name}: {precision} on {provider.removesuffix('ExecutionProvider')}, batch {b}")
                lat = measure_latency(data, (b, *shape[1:]), runs=runs, warmup=max(1, runs // 5), threads=0,
                                      providers=[provider])
                row["latency"].append({"precision": precision, "provider": provider, "batch": b, "status": "ok",
                                       "median_ms": lat.median_ms, "p10_ms": lat.p10_ms, "p90_ms": lat.p90_ms,
                                       "ran_on": lat.provider})
    return row


# ----------------------------------------------------------------------------- tables


def _cell(rows: list[dict], precision: str, provider: str, batch: int) -> dict | None:
    return next((r for r in rows if (r["precision"], r["provider"], r["batch"]) == (precision, provider, batch)),
                None)


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    batches = doc["setup"]["batches"]
    header = ["model", "input", "provider", "fp16 parity (rel / tol)"]
    for b in batches:
        header += [f"b{b} fp32 ms", f"b{b} fp16 ms", f"b{b} fp16/fp32"]
    cells = []
    for r in doc["rows"]:
        shape = "×".join(map(str, r.get("input", [])))
        if "error" in r:
            cells.append([r["model"], shape, "-", f"failed: {r['error'][:100]}"] + ["-"] * (len(header) - 4))
            continue
        parity = r["fp16_parity"]
        text = "-" if parity.get("rel_diff") is None else f"{parity['rel_diff']:.1e}"
        if parity.get("tolerance") is not None and parity.get("max_abs_diff"):
            text += f" / {parity['tolerance'] * parity['rel_diff'] / parity['max_abs_diff']:.0e}"
        shown = dict.fromkeys(x["provider"] for x in r["latency"])
        providers = [p for p in shown if p != CPU or doc["setup"]["cpu_check"]]
        for i, provider in enumerate(providers):
            line = [r["model"] if i == 0 else "", shape if i == 0 else "", provider.removesuffix("ExecutionProvider"),
                    text if i == 0 else ""]
            for b in batches:
                a, h = _cell(r["latency"], "fp32", provider, b), _cell(r["latency"], "fp16", provider, b)
                ok = a and h and a.get("status") == "ok" and h.get("status") == "ok"
                if not ok:
                    status = next((c.get("status") for c in (a, h) if c and c.get("status") != "ok"), "-")
                    line += [str(status)[:40], "", ""]
                    continue
                line += [f"{a['median_ms']:.3f}", f"{h['median_ms']:.3f}", f"{h['median_ms'] / a['median_ms']:.2f}"]
            cells.append(line)
    return header, cells


def render(doc: dict, console: Console) -> None:
    s = doc["setup"]
    header, cells = table_rows(doc)
    table = Table(title=f"GPU check: {s['device']}; onnxruntime {s['onnxruntime']}; median of {s['runs']} runs; "
                  f"fp16 = fp16 weights/compute, fp32 I/O; times include host↔device copies", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in ("model", "provider") else "right")
    for c in cells:
        table.add_row(*c)
    console.print(table)
    console.print(f"measured in {doc['seconds']:.0f} s; TensorRT: {s['tensorrt']}")


def markdown(doc: dict) -> str:
    header, cells = table_rows(doc)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h in ("model", "provider") else "---:"
                                                          for h in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--onnx", nargs="+", type=Path, default=[], metavar="PATH",
                        help="also measure these ONNX files (folders: every *.onnx under them)")
    parser.add_argument("--size", type=int, default=224, help="input side of the torchvision/timm models")
    parser.add_argument("--batch", type=int, default=32, help="the large batch (and 1)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency cell")
    parser.add_argument("--assembly-epochs", type=int, default=3, help="full-tuning epochs of the assemble() run")
    parser.add_argument("--no-tensorrt", action="store_true",
                        help="leave TensorRT out even when it loads (its engine builds take minutes)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run everything on the CPU provider (checks the script on a machine without a GPU)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--out", type=Path, help="JSON results path (default bench/results/gpu.json; with "
                        "--cpu-check nothing is written unless given)")
    parser.add_argument("--render-only", action="store_true", help="re-render the table from --out")
    parser.add_argument("--markdown", action="store_true", help="with --render-only: the table as markdown")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; use some of: {', '.join(MODELS)}")
    if args.out is None and (args.render_only or not args.cpu_check):
        args.out = RESULTS / "gpu.json"
    missing = [str(p) for p in args.onnx if not p.exists()]
    if missing:
        parser.error(f"--onnx paths not found: {', '.join(missing)}")
    return args


def device_name(cpu_check: bool) -> str:
    if not cpu_check and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU only ({os.cpu_count()} cores; --cpu-check)"


def run(args: argparse.Namespace, log) -> dict:
    import onnxruntime

    import zoocompiler.exports.deploy as deploy_module
    from zoocompiler.exports.latency import provider_usable

    trt_real = not args.cpu_check and provider_usable(TENSORRT) and provider_loads(TENSORRT)[0]
    if trt_real and args.no_tensorrt:  # bench-only switch: the deploy module's latency table reads this tuple
        deploy_module.GPU_PROVIDERS = (CUDA,)
    provider = "cpu" if args.cpu_check else "cuda"
    options = DeployOptions(precision="fp16", provider=provider, latency_batch=args.batch, latency_runs=args.runs,
                            latency_threads=0)
    gpu_providers = [CPU] if args.cpu_check else [CUDA] + ([TENSORRT] if trt_real and not args.no_tensorrt else [])
    started = time.perf_counter()
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="zc_bench_gpu_"))
    try:
        for name in args.models:
            try:
                module, x, facts = build(name, args.size, args.assembly_epochs, log)
                rows.append(deploy_row(name, module, x, facts, options, tmp, trt_real, log))
            except Exception as err:  # noqa: BLE001 - a failing model is a row, not a lost run
                log(f"{name}: failed: {_one_line(err)}")
                rows.append({"model": name, "error": _one_line(err)})
        for path in onnx_files(args.onnx):
            try:
                rows.append(onnx_row(path, gpu_providers, args.batch, args.runs, log))
            except Exception as err:  # noqa: BLE001
                log(f"{path}: failed: {_one_line(err)}")
                rows.append({"model": str(path), "source": "--onnx", "error": _one_line(err)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tensorrt = ("left out (--no-tensorrt)" if args.no_tensorrt and trt_real else
                "measured" if trt_real else "not available (not installed, or its libraries do not load)")
    setup = {"device": device_name(args.cpu_check), "cpu_check": args.cpu_check, "batches": sorted({1, args.batch}),
             "runs": args.runs, "size": args.size, "tensorrt": tensorrt, "onnxruntime": onnxruntime.__version__,
             "torch": torch.__version__, "cuda": torch.version.cuda}
    return {"measured": True, "setup": setup, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.render_only:
        doc = json.loads(args.out.read_text())
        if args.markdown:
            print(markdown(doc))
            return 0
    else:
        from zoocompiler.exports.latency import provider_usable

        if not args.cpu_check and not provider_usable(CUDA):
            print(json.dumps({"measured": False, "reason": NO_CUDA}) if args.json else NO_CUDA)
            return 0
        if not args.cpu_check:
            _preload_gpu_libraries()
            loads, why = provider_loads(CUDA)
            if not loads:  # a device, but ONNX Runtime would silently measure the CPU: refuse
                reason = (f"CUDA device present but ONNX Runtime's {CUDA} does not load: nothing measured ({why}); "
                          "install onnxruntime-gpu alone for this CUDA: pip uninstall -y onnxruntime && "
                          "pip install --force-reinstall --no-deps onnxruntime-gpu")
                print(json.dumps({"measured": False, "reason": reason}) if args.json else reason)
                return 1
        torch.set_num_threads(os.cpu_count() or 1)
        log_console = Console(stderr=True)
        with contextlib.redirect_stdout(sys.stderr):  # ONNX Runtime's fallback prints: keep stdout for the results
            doc = run(args, lambda text: log_console.log(text))
        if args.out is not None:
            write_json_atomic(args.out, doc)
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        render(doc, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
