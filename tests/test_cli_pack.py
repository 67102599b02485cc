"""``zoocompile pack slice | build | list``: Slice-and-Pack end to end on the pack source zoo (vgg_s_0to3 with
5 samples per class and 2 steps per stage, resnet_s_4to6 added to a copy), JSON output, tables, progress bars,
and one-line errors that write nothing and leave the store untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import onnx
import pytest
from helpers.cli import (
    assert_help_documents_every_option,
    assert_nothing_written,
    assert_one_line_error,
    rendered,
    run_cli,
    run_json,
    strict_json,
)
from helpers.executors import ReversedExecutor
from torch import nn

from zoocompiler import cli
from zoocompiler.cli import pack as cli_pack
from zoocompiler.data import load_dataset
from zoocompiler.pipelines.pack.config import PackBuildConfig, PackSliceConfig
from zoocompiler.pipelines.pack.store import STORE_FORMAT, read_store

SOURCE, ADDED = "vgg_s_0to3", "resnet_s_4to6"  # classes 0-3 and 4-6
QUICK = ("--k", "5", "--steps", "2")
BUILD = ("--steps", "20", "--runs", "2")
SOURCE_FILES = ["samples.npz"] + [f"class_{c}.{ext}" for c in range(4) for ext in ("onnx", "safetensors")]
PARITY = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    """One store holding vgg_s_0to3's four fragments, shared by the file (never changed by a test)."""
    out = tmp_path_factory.mktemp("pack") / "store"
    return out, run_json("pack", "slice", "--zoo", SOURCE, *QUICK, "--out", out)


@pytest.fixture(scope="module")
def extended(store, tmp_path_factory) -> dict:
    """A copy of the store with resnet_s_4to6 added in a second run (human output: tables and progress bars)."""
    copy = tmp_path_factory.mktemp("two_runs") / "store"
    shutil.copytree(store[0], copy)
    before = _snapshot(copy)
    code, out, err = run_cli("pack", "slice", "--zoo", ADDED, *QUICK, "--out", copy)
    assert code == 0, err
    return {"path": copy, "before": before, "stdout": out, "stderr": err}


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``root``: (sha256, mtime ns, inode)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns,
                                             p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _render(render, data: dict) -> str:
    return " ".join(rendered(render, data).split())


# ----------------------------------------------------------------------------- pack slice


def test_slice_writes_the_store(store):
    out, data = store
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "store.json", SOURCE]
    assert sorted(p.name for p in (out / SOURCE).iterdir()) == sorted(SOURCE_FILES)
    assert (data["store"], data["added_sources"], data["sources"]) == (str(out), [SOURCE], [SOURCE])
    assert (data["fragments_added"], data["fragments"]) == (4, 4)
    report = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("settings", "added", "sources")} == strict_json(report)
    settings = {"data": "mnist5k", "k": 5, "select": "threshold", "beta": 0.7, "alpha": 0.2, "gamma": 1.0,
                "steps": 2, "lr": 0.001, "seed": 0}  # fmt: skip
    assert data["settings"] == settings  # --beta left out: the selection's default
    doc = read_store(out).doc
    assert (doc["format"], doc["settings"], doc["input_shape"]) == (STORE_FORMAT, settings, [1, 28, 28])
    assert [row["class"] for row in data["added"]] == [0, 1, 2, 3]
    for row, fragment in zip(data["added"], doc["fragments"], strict=True):
        kept, total = map(int, row["units"].split("/"))
        assert 0 < kept < total and kept == fragment["kept_units"]
        assert row["feature_dim"] == len(fragment["features"]) > 0
        assert row["params"] < doc["sources"][0]["params"] and row["macs"] < doc["sources"][0]["macs"]
        assert fragment["onnx_max_abs_diff"] <= PARITY and fragment["latency_ms"] is None  # --runs 0: not timed


def test_slice_table(store):
    text = _render(cli_pack.render_pack_slice, store[1])
    assert f"pack slice: 4 fragment(s) added to {store[0]}" in text
    assert "units kept/total" in text and "feature dim" in text and "slice s" in text
    assert f"4 fragment(s) of 1 source(s): {SOURCE}" in text
    assert "select threshold, beta 0.7" in text


def test_defaults_are_the_config_defaults():
    configs = {
        ("slice", "--out", "S"): PackSliceConfig,
        ("build", "S", "--classes", "1", "--out", "O"): PackBuildConfig,
    }
    for argv, config in configs.items():
        fields = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        parsed = vars(cli.build_parser().parse_args(["pack", *argv]))
        defaults = {k: v for k, v in parsed.items() if k in fields}
        assert len(defaults) >= 6, argv
        assert defaults == {k: fields[k] for k in defaults}, argv
    args = cli.build_parser().parse_args(["pack", "slice", "--out", "S"])
    assert cli_pack.slice_config(args) == PackSliceConfig()
    assert PackSliceConfig().zoo == "pack" and PackSliceConfig().beta is None
    args = cli.build_parser().parse_args(["pack", "build", "S", "--classes", "9,1,5", "--out", "O"])
    assert cli_pack.build_config(args) == PackBuildConfig(classes=[9, 1, 5])


def test_adding_a_source_leaves_existing_files_untouched(extended):
    path, before = extended["path"], extended["before"]
    after = _snapshot(path)
    kept = {name: entry for name, entry in before.items() if name.startswith(f"{SOURCE}/")}
    assert len(kept) == len(SOURCE_FILES)
    assert {name: after[name] for name in kept} == kept  # same bytes, same mtime, same inode (hard-linked)
    assert sorted(p.name for p in (path / ADDED).iterdir()) == sorted(
        ["samples.npz"] + [f"class_{c}.{ext}" for c in (4, 5, 6) for ext in ("onnx", "safetensors")])
    store = read_store(path)
    assert [f["class"] for f in store.doc["fragments"]] == list(range(7))
    assert [s["name"] for s in store.doc["sources"]] == [SOURCE, ADDED]


def test_slice_human_output_and_progress_bars(extended):
    text = " ".join(extended["stdout"].split())
    assert f"pack slice: 3 fragment(s) added to {extended['path']}" in text
    assert f"7 fragment(s) of 2 source(s): {SOURCE}, {ADDED}" in text
    err = extended["stderr"]
    assert f"· slicing {ADDED}, class 4: 13 layers" in err
    assert "classes: 100%" in err and "3/3" in err  # the bar over every (source, class)
    assert f"{ADDED} class 6 (13 layers)" in err  # a class's bar over its layers' two steps
    assert "Traceback" not in err and "error" not in err


def test_slice_bars_follow_the_pipeline():
    buffer = io.StringIO()
    bars = cli_pack.SliceBars(lambda: 2, file=buffer)
    bars.message("slicing 1 source(s) into S")
    for cls in (4, 5):
        bars.message(f"slicing src, class {cls}: 3 layers")
        assert bars.layers.total == 6 and bars.overall.total == 2
        for stage in ["adapt"] * 3 + ["combine"] * 3:
            bars.tick(stage, f"src class {cls}")
        assert bars.layers.n == 6
        bars.tick("class", f"src class {cls}")
    assert bars.overall.n == 2 and bars.layers is None
    bars.close()
    assert "· slicing 1 source(s) into S" in buffer.getvalue() and "2/2" in buffer.getvalue()


def test_a_store_built_in_two_runs_equals_one_built_at_once(extended, tmp_path):
    """Two CLI runs (one source each) equal one run of both sources under a reversed executor."""
    from zoocompiler.pipelines.pack.pipeline import slice_to_store

    once = tmp_path / "once"
    slice_to_store(PackSliceConfig(zoo=f"{SOURCE},{ADDED}", k=5, steps=2), once, executor=ReversedExecutor())
    two = extended["path"]
    files = sorted(name for name in _snapshot(two) if name not in ("store.json", "report.json"))
    assert files == sorted(name for name in _snapshot(once) if name not in ("store.json", "report.json"))
    assert len(files) == 2 + 2 * 7
    for name in files:  # weights, ONNX and samples, byte for byte
        assert (two / name).read_bytes() == (once / name).read_bytes(), name

    def untimed(path: Path) -> dict:
        doc = read_store(path).doc
        for fragment in doc["fragments"]:
            del fragment["slice_seconds"], fragment["latency_ms"]
        return doc

    assert untimed(two) == untimed(once)


# ----------------------------------------------------------------------------- pack list


def test_list(store):
    before = _snapshot(store[0])
    data = run_json("pack", "list", store[0])
    assert data["store"] == str(store[0]) and data["settings"] == store[1]["settings"]
    assert data["sources"] == [{"name": SOURCE, "classes": [0, 1, 2, 3], "params": data["sources"][0]["params"],
                                "macs": data["sources"][0]["macs"], "layers": 5}]  # fmt: skip
    assert [r["class"] for r in data["fragments"]] == [0, 1, 2, 3]
    assert data["fragments"] == store[1]["added"]
    samples = read_store(store[0]).sources[SOURCE]["samples_sha256"]
    assert {r["data_sha256"] for r in data["fragments"]} == {samples[:12]}
    code, out, err = run_cli("pack", "list", store[0])
    assert code == 0, err
    text = " ".join(out.split())
    assert "fragment store " in text and ": 1 source(s)" in text and "4 fragment(s)" in text  # paths: xdist-long
    assert samples[:12] in text and "data sha256" in text and "k 5" in text
    assert _snapshot(store[0]) == before


# ----------------------------------------------------------------------------- pack build


@pytest.fixture(scope="module")
def built(store, tmp_path_factory) -> tuple[Path, dict]:
    before = _snapshot(store[0])
    out = tmp_path_factory.mktemp("build") / "pack_13"
    data = run_json("pack", "build", store[0], "--classes", "3,1", *BUILD, "--out", out)
    assert _snapshot(store[0]) == before
    return out, data


def test_build_writes_a_verified_packed_model(store, built):
    out, data = built
    assert sorted(p.name for p in out.iterdir()) == ["packed.onnx", "report.json"]
    assert data["files"] == {name: str(out / name) for name in ("packed.onnx", "report.json")}
    report = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("out", "files")} == strict_json(report)
    assert (data["classes"], data["sources"], data["onnx"]) == ([3, 1], [SOURCE], "packed.onnx")
    assert data["onnx_max_abs_diff"] <= PARITY and data["latency_ms"] > 0
    assert 0 <= data["test_accuracy"] <= 1 and data["train_samples"] == 2 * 5 and data["test_samples"] > 0
    fragments = {r["class"]: r for r in store[1]["added"]}
    assert [f["class"] for f in data["fragments"]] == [3, 1]
    assert data["slice_seconds"] == pytest.approx(fragments[3]["slice_seconds"] + fragments[1]["slice_seconds"])
    assert data["params"] > fragments[3]["params"] + fragments[1]["params"]  # plus the encoder and head
    assert data["settings"]["steps"] == 20 and data["encoder_width"] == 64  # 32 per class


def test_build_table(built):
    text = _render(cli_pack.render_pack_build, built[1])
    assert "pack build: classes 3,1 from" in text and "→" in text  # the title's paths are truncated under xdist
    assert "test accuracy" in text and "latency b1" in text and "packing" in text and "slicing those fragments" in text
    assert f"{built[0] / 'packed.onnx'} (fp32; fp32 export max |ONNX − PyTorch|" in text
    assert "packed model: fp32 written to packed.onnx, int8 calibrated on 256 rows" in text
    assert "ONNX Runtime latency (median)" in text and "not available" in text


# ----------------------------------------------------------------------------- precision (issue 17)


FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def _initializer_types(path: Path) -> set[int]:
    return {i.data_type for i in onnx.load(path).graph.initializer if i.data_type in (FP16, FP32)}


def _io_types(path: Path) -> tuple[int, int]:
    graph = onnx.load(path).graph
    return graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_build_default_is_fp32_with_the_latency_table(built):
    """Default: packed.onnx is the fp32 export as before; the latency table has every precision (its cells timed
    --runs times), int8 calibrated on the packed classes' training split, CUDA "not available" (no GPU)."""
    out, data = built
    assert data["precision"] == "fp32" and _initializer_types(out / "packed.onnx") == {FP32}
    assert "QuantizeLinear" not in _ops(out / "packed.onnx")
    written = data["onnx_precision"]
    assert written["precision"] == "fp32" and written["file_bytes"] == (out / "packed.onnx").stat().st_size
    assert written["accuracy"] == pytest.approx(data["test_accuracy"], abs=1e-6)  # ONNX fp32 = PyTorch
    deploy = data["deploy"]
    assert (deploy["path"], deploy["precision"], list(deploy["precisions"])) == (
        "packed.onnx", "fp32", ["fp32", "fp16", "int8"])
    fp16, int8 = deploy["precisions"]["fp16"], deploy["precisions"]["int8"]
    assert fp16["max_abs_diff"] <= fp16["tolerance"] and fp16["file_bytes"] < written["file_bytes"]
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy"] - deploy["precisions"]["fp32"]["accuracy"])
    train = load_dataset("mnist5k", "train", classes=[3, 1])
    assert deploy["calibration"] == {"rows": 256, "seed": 0, "method": "minmax", "of_rows": len(train)}
    cpu = {(r["precision"], r["batch"]): r for r in deploy["latency"] if r["provider"] == "CPUExecutionProvider"}
    assert set(cpu) == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 32)}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in cpu.values())
    cuda = [r for r in deploy["latency"] if r["provider"] == "CUDAExecutionProvider"]
    assert len(cuda) == 6 and {r["status"] for r in cuda} == {"not available"}
    assert data["settings"]["deploy"]["latency_runs"] == data["settings"]["runs"] == 2  # --runs times the cells


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_at_a_precision(store, precision, tmp_path):
    """fp16 (here with fp16 inputs and outputs): half weights, parity within the fp16 bound. int8: QDQ, calibrated,
    with its accuracy change on the test split against fp32 (the latency table builds fp32 too)."""
    out = tmp_path / precision
    extra = ["--io-types", "fp16"] if precision == "fp16" else []
    data = run_json("pack", "build", store[0], "--classes", "3,1", *BUILD, "--precision", precision, *extra,
                    "--latency-batch", "4", "--out", out)
    path = out / "packed.onnx"
    written = data["onnx_precision"]
    assert data["precision"] == written["precision"] == precision and data["latency_ms"] > 0
    assert data["onnx_max_abs_diff"] <= PARITY  # the fp32 export it derives from
    fp32 = data["deploy"]["precisions"]["fp32"]
    assert written["accuracy_change"] == pytest.approx(written["accuracy"] - fp32["accuracy"])
    if precision == "fp16":
        assert FP16 in _initializer_types(path) and _io_types(path) == (FP16, FP16)
        assert written["max_abs_diff"] <= written["tolerance"] and abs(written["accuracy_change"]) <= 0.02
    else:
        ops = _ops(path)
        assert ops.count("QuantizeLinear") >= 2 and "DequantizeLinear" in ops
        assert written["notes"]["quantize_nodes"] == ops.count("QuantizeLinear")
        assert data["deploy"]["calibration"]["rows"] == 256
    text = _render(cli_pack.render_pack_build, data)
    assert f"packed model: {precision} written to packed.onnx" in text and f"({precision} ONNX Runtime" in text


def test_slice_int8_fragments(tmp_path):
    """pack slice --precision int8: every fragment's ONNX is QDQ, calibrated on its source's training split; the
    store records it (weights stay fp32: pack build rebuilds fragments from them)."""
    out = tmp_path / "store"
    data = run_json("pack", "slice", "--zoo", "vgg_s_01", *QUICK, "--precision", "int8", "--out", out)
    assert data["precision"] == "int8"
    assert [(r["class"], r["precision"]) for r in data["added"]] == [(0, "int8"), (1, "int8")]
    store = read_store(out)
    for fragment in store.doc["fragments"]:
        ops = _ops(out / fragment["onnx"])
        assert ops.count("QuantizeLinear") >= 2 and "DequantizeLinear" in ops
        written = fragment["onnx_precision"]
        assert (fragment["precision"], written["precision"]) == ("int8", "int8")
        assert written["accuracy"] is None  # a fragment returns features: no accuracy to compare
        assert written["file_bytes"] == (out / fragment["onnx"]).stat().st_size
        assert fragment["onnx_max_abs_diff"] <= PARITY  # the fp32 export the int8 model derives from
    store.check_files()  # the recorded sha256 are the int8 files'
    text = _render(cli_pack.render_pack_slice, data)
    assert "ONNX" in text and "int8" in text


# ----------------------------------------------------------------------------- errors


def _assert_user_error(argv, fragment: str, out: Path | None = None, *, as_json: bool = True) -> None:
    """Exit 2, one line on stderr naming the cause, nothing on stdout, nothing written at ``out``."""
    code, stdout, err = run_cli(*argv, *(["--json"] if as_json else []))
    assert (code, stdout) == (2, ""), err
    assert_one_line_error(err, fragment)
    if out is not None:
        assert_nothing_written(out)


SLICE_ERRORS = {
    "beta zero": (["--beta", "0"], "beta 0.0 is outside (0, 1] — pass --beta in (0, 1]"),
    "beta above one": (["--beta", "1.5", "--select", "rate"], "beta 1.5 is outside (0, 1]"),
    "selection": (["--select", "bogus"], "unknown selection 'bogus' — use one of: threshold, rate"),
    "k zero": (["--k", "0"], "k must be a positive integer, got 0"),
    "k above the samples": (["--k", "100000"], f"source '{SOURCE}' has"),
    "steps": (["--steps", "0"], "steps must be a positive integer, got 0"),
    "alpha": (["--alpha", "-1"], "alpha must be a finite number >= 0, got -1.0"),
    "lr": (["--lr", "0"], "lr must be a positive number, got 0.0"),
    "runs": (["--runs", "-1"], "bad --runs -1"),
    "seed": (["--seed", "-1"], "bad --seed -1"),
    "cuda without a GPU": (["--provider", "cuda"], "execution provider 'CUDAExecutionProvider'"),
    "io types": (["--io-types", "fp16"], "--io-types fp16 needs --precision fp16"),
    "unknown zoo model": (["--zoo", "vgg_s_0to"], "unknown zoo model 'vgg_s_0to' — did you mean vgg_s_0to3"),
    "classes offered twice": (["--zoo", f"{SOURCE},vgg_s"], f"class 0 of vgg_s is already offered by {SOURCE}"),
    "a source twice": (["--zoo", f"{SOURCE},{SOURCE}"], "names a model twice"),
    "data": (["--data", "digits"], "takes (1, 28, 28) inputs but --data digits has (1, 8, 8)"),
}


@pytest.mark.parametrize("case", list(SLICE_ERRORS))
def test_slice_user_errors_write_nothing(case, tmp_path):
    argv, fragment = SLICE_ERRORS[case]
    out = tmp_path / "store"
    zoo = [] if "--zoo" in argv else ["--zoo", SOURCE]
    _assert_user_error(["pack", "slice", *zoo, "--k", "5", *argv, "--out", out], fragment, out)


def test_k_above_the_samples_names_the_fix_without_json(tmp_path):
    """Without --json (progress bars on): still one line, before anything is sliced."""
    out = tmp_path / "store"
    _assert_user_error(["pack", "slice", "--zoo", SOURCE, "--k", "100000", "--out", out],
                       "fewer than k=100000 — pass --k", out, as_json=False)  # fmt: skip


def test_slice_refuses_a_source_without_prunable_layers(monkeypatch, tmp_path):
    """No zoo model lacks prunable layers: a source traced as Flatten → Linear stands in for one."""
    from zoocompiler.passes.analysis import trace
    from zoocompiler.pipelines.pack import pipeline
    from zoocompiler.pipelines.zoo.trainable import example_input

    def linear_only(_name, shape, weights=True):
        return trace(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4)).eval(), example_input(shape))

    monkeypatch.setattr(pipeline, "_source_graph", linear_only)
    out = tmp_path / "store"
    _assert_user_error(["pack", "slice", "--zoo", SOURCE, *QUICK, "--out", out],
                       f"zoo model {SOURCE} cannot be sliced: the model has no prunable conv/linear group", out)


def test_slice_refuses_an_out_that_is_not_a_store(tmp_path):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _assert_user_error(["pack", "slice", "--zoo", SOURCE, *QUICK, "--out", out], "is not a fragment store")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


STORE_ERRORS = {
    "every source already in": ([SOURCE, *QUICK], "every source is already in store"),
    "mismatched settings": ([ADDED, "--k", "6", "--steps", "2"], "was sliced with k=5, not 6 — pass the store's"),
    "mismatched beta": ([ADDED, *QUICK, "--beta", "0.5"], "was sliced with beta=0.7, not 0.5"),
    "class in the store": (["vgg_s", *QUICK], f"class 0 of vgg_s is already offered by {SOURCE}"),
}


@pytest.mark.parametrize("case", list(STORE_ERRORS))
def test_adding_to_a_store_refuses_and_leaves_it_untouched(case, store):
    (zoo, *argv), fragment = STORE_ERRORS[case]
    before = _snapshot(store[0])
    _assert_user_error(["pack", "slice", "--zoo", zoo, *argv, "--out", store[0]], fragment)
    assert _snapshot(store[0]) == before
    assert not [p for p in store[0].parent.iterdir() if p.name.startswith(".store.")]


def _other_version(root: Path) -> str:
    doc = json.loads((root / "store.json").read_text())
    (root / "store.json").write_text(json.dumps({**doc, "format": "zoocompiler.pack-store/0"}))
    return 'format must be "zoocompiler.pack-store/1", found "zoocompiler.pack-store/0"'


def _edited_weights(root: Path) -> str:
    path = root / SOURCE / "class_1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return "class_1.safetensors does not match its sha256 in store.json (corrupted or edited)"


def _missing_weights(root: Path) -> str:
    (root / SOURCE / "class_3.safetensors").unlink()
    return "class_3.safetensors is missing or unreadable"


def _missing_samples(root: Path) -> str:
    (root / SOURCE / "samples.npz").unlink()
    return "samples.npz is missing or unreadable"


def _junk_index(root: Path) -> str:
    (root / "store.json").write_text("{junk")
    return "store.json is not valid JSON"


def _orphan_fragment(root: Path) -> str:
    doc = json.loads((root / "store.json").read_text())
    doc["fragments"][0]["source"] = "elsewhere"
    (root / "store.json").write_text(json.dumps(doc))
    return "its fragment of class 0 names source 'elsewhere', which it lacks"


BAD_STORES = {"other version": _other_version, "edited weights": _edited_weights,
              "missing weights": _missing_weights, "missing samples": _missing_samples, "junk index": _junk_index,
              "orphan fragment": _orphan_fragment}  # fmt: skip


@pytest.mark.parametrize("command", ["build", "list", "slice"])
@pytest.mark.parametrize("case", list(BAD_STORES))
def test_a_bad_store_is_refused(case, command, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store[0], bad)
    fragment = BAD_STORES[case](bad)
    before = _snapshot(bad)
    out = tmp_path / "out"
    argv = {"build": ["build", bad, "--classes", "1,3", *BUILD, "--out", out], "list": ["list", bad],
            "slice": ["slice", "--zoo", ADDED, *QUICK, "--out", bad]}[command]  # fmt: skip
    _assert_user_error(["pack", *argv], fragment, out)
    assert _snapshot(bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_not_a_store_is_refused(tmp_path):
    for argv in (["list"], ["build", "--classes", "1", "--out", tmp_path / "out"]):
        _assert_user_error(["pack", argv[0], tmp_path / "nowhere", *argv[1:]],
                           "does not exist or is not a directory — pass a directory written by `zoocompile pack slice")


BUILD_ERRORS = {
    "class not offered": (["--classes", "1,7"], "class 7 is not offered by any source in"),
    "class repeated": (["--classes", "1,1"], "class 1 is listed twice"),
    "class not an integer": (["--classes", "1,x"], "bad class list '1,x'"),
    "delta": (["--classes", "1", "--delta", "-1"], "delta must be a finite number >= 0, got -1.0"),
    "runs": (["--classes", "1", "--runs", "0"], "steps and runs positive"),
    "lr": (["--classes", "1", "--lr", "0"], "lr must be a positive number"),
    "seed": (["--classes", "1", "--seed", "-1"], "bad --seed -1"),
    "negative runs": (["--classes", "1", "--runs", "-1"], "bad --runs -1"),
    "cuda without a GPU": (["--classes", "1", "--provider", "cuda"], "execution provider 'CUDAExecutionProvider'"),
    "calibration size": (["--classes", "1", "--precision", "int8", "--calibration-size", "0"],
                         "bad --calibration-size 0"),
}


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_build_user_errors_write_nothing(case, store, tmp_path):
    argv, fragment = BUILD_ERRORS[case]
    before = _snapshot(store[0])
    out = tmp_path / "out"
    _assert_user_error(["pack", "build", store[0], *argv, "--out", out], fragment, out)
    assert _snapshot(store[0]) == before


def test_build_class_not_offered_names_the_fix(store, tmp_path):
    _assert_user_error(["pack", "build", store[0], "--classes", "9", "--out", tmp_path / "out"],
                       "pack classes the store offers: 0, 1, 2, 3", tmp_path / "out")  # fmt: skip


def test_build_out_never_replaces_the_store(store):
    before = _snapshot(store[0])
    for out in (store[0], store[0].parent):
        _assert_user_error(["pack", "build", store[0], "--classes", "1", "--out", out, "--force"],
                           "would replace the fragment store")
    assert _snapshot(store[0]) == before


def test_build_existing_out_needs_force(store, built):
    _assert_user_error(["pack", "build", store[0], "--classes", "1", "--out", built[0]], "already exists")
    assert sorted(p.name for p in built[0].iterdir()) == ["packed.onnx", "report.json"]


# ----------------------------------------------------------------------------- help


COMMANDS = [["pack"], ["pack", "slice"], ["pack", "build"], ["pack", "list"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_documents_every_option(command):
    assert_help_documents_every_option(command)
