"""``zoocompile pool distill | finetune | build | list``: Learngene Pool end to end on a tiny 4-block ViT ancestry
(distilled into 2 blocks at d=64 and d'=16 for one epoch), JSON output, tables, fine-tuning in place and into
--out, every descendant exported for the elastic runtime, and one-line errors that write nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers.cli import (
    assert_help_documents_every_option,
    assert_nothing_written,
    assert_one_line_error,
    rendered,
    run_cli,
    run_json,
    strict_json,
)

from zoocompiler import cli
from zoocompiler.cli import pool as cli_pool
from zoocompiler.core.deploy import DeployOptions
from zoocompiler.pipelines.pool.config import PoolBuildConfig, PoolDistillConfig, PoolFinetuneConfig
from zoocompiler.pipelines.pool.store import POOL_FORMAT

SPEC = "timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,depth=4,embed_dim=64,num_heads=4"
QUICK = ("--blocks", "2", "--dim", "16", "--levels", "2", "--epochs", "1")
POOL_FILES = ["instances.safetensors", "pool.json", "transforms.safetensors"]
PARITY = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ancestry(tmp_path_factory) -> Path:
    """The tiny ancestry's checkpoint (random weights, seed 0); never changed by a test."""
    from zoocompiler.sources import load_model

    torch.manual_seed(0)
    model = load_model(SPEC)
    path = tmp_path_factory.mktemp("ancestry") / "anc.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pooled(ancestry, tmp_path_factory) -> tuple[Path, dict]:
    """One pool distilled from the tiny ancestry, shared by the file (never changed by a test)."""
    out = tmp_path_factory.mktemp("pool") / "pool"
    return out, run_json("pool", "distill", SPEC, "--checkpoint", ancestry, *QUICK, "--out", out)


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _copy(pooled, tmp_path: Path, name: str = "pool") -> Path:
    copy = tmp_path / name
    shutil.copytree(pooled[0], copy)
    return copy


def _text(out: str) -> str:
    return " ".join(out.split())


def _without(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


# ----------------------------------------------------------------------------- pool distill


def test_distill_writes_the_pool(pooled, ancestry):
    out, data = pooled
    assert sorted(p.name for p in out.iterdir()) == POOL_FILES
    assert data["out"] == str(out) and data["files"] == {name: str(out / name) for name in POOL_FILES}
    doc = json.loads((out / "pool.json").read_text())
    assert _without(data, "out", "files") == strict_json(doc)
    assert data["format"] == POOL_FORMAT and data["finetune"] is None and data["init"] == "ls"
    anc = data["ancestry"]
    assert (anc["spec"], anc["checkpoint"]) == (SPEC, str(ancestry.resolve()))
    assert (anc["shape"]["depth"], anc["shape"]["embed_dim"], anc["shape"]["num_heads"]) == (4, 64, 4)
    small, large = data["rows"]["small"], data["rows"]["large"]
    assert (small["depth"], small["embed_dim"], small["num_heads"]) == (2, 16, 1)  # heads of 16, as the ancestry's
    assert (large["depth"], large["embed_dim"], large["num_heads"]) == (2, 64, 4)
    assert data["levels"] == {"large": [[2, 1], [4, 2]], "small": [[2, 1], [4, 2]]}  # wide: min(3, blocks)
    assert data["settings"]["epochs"] == 1 and data["data"] == "mnist5k" and data["input_shape"] == [1, 28, 28]
    rows = data["descendants"]
    assert [(r["low"], r["high"]) for r in rows] == [(2, 0), (1, 1), (0, 2)]  # smallest first
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"] < anc["params"]
    assert rows[0]["macs"] < rows[1]["macs"] < rows[2]["macs"] < anc["macs"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    storage = data["storage"]
    assert (storage["small"], storage["large"]) == (rows[0]["params"], rows[2]["params"])  # the two ends: the rows
    assert storage["stitches"] > 0 and storage["total"] == storage["small"] + storage["large"] + storage["stitches"]
    for entry in data["weights"].values():
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert data["distill"]["small"]["accuracy"] == rows[0]["accuracy"]
    assert data["distill"]["large"]["accuracy"] == rows[2]["accuracy"]


def test_distill_table(pooled):
    text = _text(rendered(cli_pool.render_pool_distill, pooled[1]))
    assert "pool distill: 3 descendants →" in text
    for column in ("low", "high", "params", "MACs", "accuracy", "small row", "large row", "stitches", "total"):
        assert column in text
    assert "of the ancestry's" in text and "2 blocks at d=16 (1 head(s) of 16" in text
    assert "4 blocks at d=64" in text and "not fine-tuned" in text and "stitch init" in text


def test_defaults_are_the_config_defaults():
    configs = {
        ("distill", "--out", "P"): PoolDistillConfig,
        ("finetune", "P"): PoolFinetuneConfig,
        ("build", "P", "--out", "O"): PoolBuildConfig,
    }
    for argv, config in configs.items():
        fields = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        parsed = vars(cli.build_parser().parse_args(["pool", *argv]))
        defaults = {k: v for k, v in parsed.items() if k in fields}
        assert len(defaults) >= 5, argv
        assert defaults == {k: fields[k] for k in defaults}, argv
    parser = cli.build_parser()
    assert cli_pool.distill_config(parser.parse_args(["pool", "distill", "--out", "P"])) == PoolDistillConfig()
    args = parser.parse_args(["pool", "distill", "--out", "P", "--json"])
    assert cli_pool.distill_config(args) == PoolDistillConfig(progress=False)  # --json: no bars
    args = parser.parse_args(["pool", "finetune", "P", "--no-kd", "--json"])
    assert cli_pool.finetune_config(args) == PoolFinetuneConfig(kd=False, progress=False)
    args = parser.parse_args(["pool", "build", "P", "--all", "--budget", "params=1M", "--out", "O"])
    # --runs and --threads also time the latency table of the deployment options (fp32 by default)
    assert cli_pool.build_config(args) == PoolBuildConfig(budget="params=1M", export_all=True,
                                                          deploy=DeployOptions(latency_runs=30, latency_threads=1))
    args = parser.parse_args(["pool", "build", "P", "--precision", "int8", "--runs", "3", "--out", "O"])
    assert cli_pool.build_config(args).deploy == DeployOptions(precision="int8", latency_runs=3)


# ----------------------------------------------------------------------------- pool list


def test_list_shows_the_pool(pooled):
    out, data = pooled
    before = _snapshot(out)
    listing = run_json("pool", "list", out)
    assert listing["pool"] == str(out) and listing["format"] == POOL_FORMAT
    assert listing["descendants"] == data["descendants"] and listing["descendants_before_finetune"] is None
    for key in ("ancestry", "rows", "levels", "init", "storage", "finetune"):
        assert listing[key] == data[key], key
    code, stdout, err = run_cli("pool", "list", out)
    assert code == 0, err
    text = _text(stdout)
    assert ": 3 descendants" in text and "accuracy" in text and "before fine-tuning" not in text
    assert "storage" in text and POOL_FORMAT in text and "not fine-tuned" in text
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- pool finetune


@pytest.fixture(scope="module")
def tuned(pooled, tmp_path_factory) -> tuple[Path, dict]:
    """The shared pool fine-tuned for one epoch into another directory (--out)."""
    before = _snapshot(pooled[0])
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    data = run_json("pool", "finetune", pooled[0], "--epochs", "1", "--out", out)
    assert _snapshot(pooled[0]) == before
    return out, data


def test_finetune_into_out(pooled, tuned):
    out, data = tuned
    assert sorted(p.name for p in out.iterdir()) == POOL_FILES
    assert (data["out"], data["in_place"]) == (str(out), False)
    doc = json.loads((out / "pool.json").read_text())
    assert _without(data, "out", "in_place", "files") == strict_json(doc)
    assert data["descendants_before_finetune"] == pooled[1]["descendants"]
    assert [(r["low"], r["params"], r["macs"]) for r in data["descendants"]] == [
        (r["low"], r["params"], r["macs"]) for r in pooled[1]["descendants"]]
    tune = data["finetune"]
    assert (tune["epochs"], tune["kd"], tune["tau"], tune["lr"]) == (1, True, 1.0, 5e-4)
    assert sorted(tune["paths_sampled"]) == ["0", "1", "2"] and sum(tune["paths_sampled"].values()) > 0
    assert data["weights"]["instances"]["sha256"] != pooled[1]["weights"]["instances"]["sha256"]
    assert data["weights"]["transforms"] == pooled[1]["weights"]["transforms"]  # the distillation's maps, kept
    assert (data["ancestry"], data["rows"], data["storage"]) == (
        pooled[1]["ancestry"], pooled[1]["rows"], pooled[1]["storage"])


def test_finetune_in_place_with_bars_and_tables(pooled, tmp_path):
    copy = _copy(pooled, tmp_path)
    code, stdout, err = run_cli("pool", "finetune", copy, "--epochs", "1", "--no-kd")
    assert code == 0, err
    text = _text(stdout)
    assert "pool finetune: 3 descendants in place" in text and "before fine-tuning" in text and "no KD" in text
    assert "· fine-tuning 3 paths for 1 epochs" in err and "finetune: 100%" in err  # stage line and training bar
    assert "Traceback" not in err and "error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]  # replaced atomically: no staging leftovers
    assert sorted(p.name for p in copy.iterdir()) == POOL_FILES
    first = json.loads((copy / "pool.json").read_text())
    assert first["descendants_before_finetune"] == pooled[1]["descendants"]
    assert first["finetune"]["kd"] is False and first["finetune"]["epochs"] == 1
    # a second round accumulates epochs and keeps the table from before the first one
    again = run_json("pool", "finetune", copy, "--epochs", "1", "--no-kd", "--seed", "1")
    assert (again["out"], again["in_place"], again["finetune"]["epochs"]) == (str(copy), True, 2)
    assert again["descendants_before_finetune"] == pooled[1]["descendants"]
    listing = run_json("pool", "list", copy)
    assert listing["descendants"] == again["descendants"]
    assert listing["descendants_before_finetune"] == pooled[1]["descendants"]
    code, stdout, err = run_cli("pool", "list", copy)
    assert code == 0, err
    assert "before fine-tuning" in stdout and "2 epoch(s) in all" in _text(stdout)


# ----------------------------------------------------------------------------- pool build


def _best_within(rows: list[dict], params: float, macs: float) -> dict:
    feasible = [r for r in rows if r["params"] <= params and r["macs"] <= macs]
    return max(feasible, key=lambda r: (r["accuracy"], -r["params"]))


@pytest.fixture(scope="module")
def built(tuned, tmp_path_factory) -> tuple[Path, dict, dict]:
    """The fine-tuned pool built within the middle descendant's params and MACs, every descendant kept (--all)."""
    before = _snapshot(tuned[0])
    middle = next(r for r in tuned[1]["descendants"] if r["low"] == 1)
    budget = {"params": middle["params"], "macs": middle["macs"]}
    out = tmp_path_factory.mktemp("build") / "built"
    data = run_json("pool", "build", tuned[0], "--budget", f"params={budget['params']},flops={budget['macs']}",
                    "--all", "--runs", "2", "--out", out)
    assert _snapshot(tuned[0]) == before
    return out, data, budget


def test_build_picks_the_most_accurate_descendant_within_the_budget(tuned, built):
    out, data, budget = built
    assert sorted(p.name for p in out.iterdir()) == ["descendant.onnx", "descendants", "descendants.png",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert _without(data, "out", "settings", "files") == strict_json(report)
    assert data["budget"] == {"params": budget["params"], "macs": budget["macs"]}
    assert data["settings"] == {"runs": 2, "batch": 1, "threads": 1, "all": True}
    assert (data["pool"], data["onnx"], data["all"]) == (str(tuned[0]), "descendant.onnx", "descendants")
    rows, chosen = data["descendants"], data["chosen"]
    assert [(r["low"], r["params"], r["macs"]) for r in rows] == [
        (r["low"], r["params"], r["macs"]) for r in tuned[1]["descendants"]]
    assert chosen["params"] <= budget["params"] and chosen["macs"] <= budget["macs"]
    assert chosen == _best_within(rows, budget["params"], budget["macs"])
    assert chosen["low"] in (1, 2)  # the full-width descendant is over the budget
    for row in rows:
        assert row["latency_ms"] > 0 and row["per_sample_ms"] == row["latency_ms"]
        assert row["onnx_max_abs_diff"] <= PARITY
        assert row["accuracy"] == pytest.approx(
            next(r["accuracy"] for r in tuned[1]["descendants"] if r["low"] == row["low"]))
    kept = out / "descendants" / f"low{chosen['low']}_high{chosen['high']}.onnx"
    assert (out / "descendant.onnx").read_bytes() == kept.read_bytes()
    # default precision fp32: every file as before, the chosen one's report compares the precisions side by side
    assert data["precision"] == "fp32" and all(r["precision"] == r["deploy"]["precision"] == "fp32" for r in rows)
    deploy = data["deploy"]
    assert (deploy["path"], deploy["precision"], deploy["file_bytes"]) == (
        "descendant.onnx", "fp32", (out / "descendant.onnx").stat().st_size)
    assert deploy["precisions"]["fp32"]["accuracy"] == pytest.approx(chosen["accuracy"], abs=0.002)
    cells = {(r["precision"], r["batch"]) for r in deploy["latency"] if r["status"] == "ok"}
    assert cells == {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 32)}  # --runs 2 serves the table


def test_build_all_serves_every_descendant(built):
    from zoocompiler.exports.elastic import ElasticModel

    out, data, _ = built
    folder = out / "descendants"
    names = sorted(f"low{r['low']}_high{r['high']}.onnx" for r in data["descendants"])
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "manifest.json"])
    model = ElasticModel.from_manifest(folder)
    top = max(r["macs"] for r in data["descendants"])
    assert model.rates == sorted(r["macs"] / top for r in data["descendants"])
    assert model.rates[-1] == 1.0
    for rate in model.rates:
        row = next(r for r in data["descendants"] if r["macs"] / top == rate)
        meta = model.metadata[rate]
        assert (meta["low"], meta["high"], meta["params"], meta["accuracy"]) == (
            row["low"], row["high"], row["params"], row["accuracy"])
        assert model.per_sample[rate] == pytest.approx(row["per_sample_ms"] / 1e3)
    assert model.choose_rate(1, 10.0) == 1.0  # a generous budget: the largest descendant
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    result = model.run(x, budget_s=10.0)
    assert result.rate == 1.0 and result.outputs.shape == (1, 10) and np.isfinite(result.outputs).all()
    smallest = model.run(x, rate=model.rates[0])
    assert smallest.outputs.shape == (1, 10)


def test_build_table(built):
    text = _text(rendered(cli_pool.render_pool_build, built[1]))
    assert "pool build: 3 descendants of" in text and "latency b1 (ms)" in text and "◀ chosen" in text
    assert f"low={built[1]['chosen']['low']}, high={built[1]['chosen']['high']}" in text
    assert "ElasticModel.from_manifest(" in text and "median of 2 runs at batch 1" in text
    assert "small row" in text and "stitches" in text
    assert "(fp32 ONNX)" in text and "chosen descendant (low=" in text and "ONNX Runtime latency" in text


@pytest.mark.slow  # ~30 s: every descendant exported, quantized and scored, the chosen one with the latency table
def test_build_int8_every_descendant_served(tuned, tmp_path):
    from zoocompiler.exports.elastic import ElasticModel

    out = tmp_path / "int8"
    data = run_json("pool", "build", tuned[0], "--all", "--precision", "int8", "--runs", "2", "--latency-batch", "4",
                    "--out", out)
    folder = out / "descendants"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (data["precision"], manifest["precision"], data["deploy"]["precision"]) == ("int8", "int8", "int8")
    for row in data["descendants"]:
        path = folder / f"low{row['low']}_high{row['high']}.onnx"
        assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(path)).graph.node}
        written = row["deploy"]
        assert row["precision"] == written["precision"] == "int8" and row["onnx_max_abs_diff"] <= PARITY
        assert written["accuracy_change"] == pytest.approx(written["accuracy"] - row["accuracy"], abs=0.002)
    assert (out / "descendant.onnx").read_bytes() == (folder / f"low{data['chosen']['low']}_high"
                                                                f"{data['chosen']['high']}.onnx").read_bytes()
    latency = {(r["precision"], r["provider"], r["batch"]): r for r in data["deploy"]["latency"]}
    for precision in ("fp32", "fp16", "int8"):
        assert latency[(precision, "CPUExecutionProvider", 4)]["median_ms"] > 0
        assert latency[(precision, "CUDAExecutionProvider", 1)]["status"] == "not available"
    model = ElasticModel.from_manifest(folder)
    assert all(model.metadata[r]["precision"] == "int8" for r in model.rates)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    result = model.run(x, rate=model.rates[0])
    assert result.outputs.shape == (2, 10) and np.isfinite(result.outputs).all()
    text = _text(rendered(cli_pool.render_pool_build, data))
    assert "int8 accuracy" in text and "vs fp32" in text and "(int8 ONNX)" in text


def test_build_without_all_human_output(pooled, tmp_path):
    out = tmp_path / "one"
    code, stdout, err = run_cli("pool", "build", pooled[0], "--runs", "1", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["descendant.onnx", "descendants.png", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["budget"] == {} and report["all"] is None
    assert report["chosen"] == max(report["descendants"], key=lambda r: (r["accuracy"], -r["params"]))
    text = _text(stdout)
    assert "◀ chosen" in text and "unconstrained" in text
    assert "· exporting and timing 3 descendants" in err


# ----------------------------------------------------------------------------- errors


def _assert_user_error(argv, fragment: str, out: Path | None = None, *, as_json: bool = True) -> None:
    """Exit 2, one line on stderr naming the cause, nothing on stdout, nothing written at ``out``. Without
    ``--json`` the stage lines printed before the failing stage may precede it: the error is the last line."""
    code, stdout, err = run_cli(*argv, *(["--json"] if as_json else []))
    assert (code, stdout) == (2, ""), err
    if as_json:
        assert_one_line_error(err, fragment)
    else:
        lines = err.rstrip("\n").split("\n")
        assert_one_line_error(lines[-1] + "\n", fragment)
        assert "Traceback" not in err and [line for line in lines if line.startswith("error")] == [lines[-1]]
        assert "%|" not in err  # no training bar: it failed before any training
    if out is not None:
        assert_nothing_written(out)


DISTILL_ERRORS = {
    "not a block stack": (["timm:resnet18,in_chans=1,num_classes=10"],
                          "ResNet is not a uniform stack of transformer blocks: it is not a timm VisionTransformer "
                          "— use an ancestry that qualifies: timm VisionTransformer models"),
    "blocks at the depth": ([SPEC, "--blocks", "4"], "needs fewer blocks than the ancestry's 4, got 4 — pass --blocks "
                                                     "in 1..3"),
    "dim of partial heads": ([SPEC, "--dim", "24"], "width 24 does not divide into whole heads of 16"),
    "dim above the width": ([SPEC, "--dim", "128"], "--dim 128 is not below the ancestry's width 64"),
    "dim at the width": ([SPEC, "--dim", "64"], "--dim 64 is not below the ancestry's width 64: the narrow row must "
                                                "be narrower (Algorithm 1, d' < d) — pass --dim as a multiple of 16 "
                                                "below 64, e.g. 16"),
    "levels above blocks": ([SPEC, "--blocks", "2", "--levels", "3"], "--levels 3 exceeds the auxiliary models' 2"),
    "data": ([SPEC, "--levels", "2", "--data", "digits"],
             "takes (1, 28, 28) inputs and 10 classes but --data digits has (1, 8, 8)"),
    "negative epochs": ([SPEC, "--epochs", "-1"], "epochs must be an integer >= 1, got -1"),
    "unknown init": ([SPEC, "--init", "bogus"], "unknown stitch init 'bogus' — use tm"),
    "alpha": ([SPEC, "--alpha", "2"], "alpha must be a number in [0.0, 1.0], got 2.0"),
    "tau": ([SPEC, "--tau", "0"], "tau must be a number in (0.0, 100.0], got 0.0"),
    "batch size": ([SPEC, "--batch-size", "1"], "batch_size must be an integer >= 2, got 1"),
    "blocks zero": ([SPEC, "--blocks", "0"], "blocks must be an integer >= 1, got 0"),
    "seed": ([SPEC, "--seed", "-1"], "bad --seed -1"),
}


@pytest.mark.parametrize("case", list(DISTILL_ERRORS))
def test_distill_user_errors_write_nothing(case, ancestry, tmp_path):
    argv, fragment = DISTILL_ERRORS[case]
    checkpoint = [] if "resnet" in argv[0] else ["--checkpoint", ancestry]
    out = tmp_path / "pool"
    _assert_user_error(["pool", "distill", *argv, *checkpoint, "--out", out], fragment, out)


def test_distill_error_without_json(ancestry, tmp_path):
    """Without --json (stage lines on): still a one-line error, before any training."""
    out = tmp_path / "pool"
    _assert_user_error(["pool", "distill", SPEC, "--checkpoint", ancestry, "--blocks", "5", "--out", out],
                       "pass --blocks in 1..3", out, as_json=False)  # fmt: skip


def test_distill_existing_out_needs_force(pooled, ancestry):
    before = _snapshot(pooled[0])
    _assert_user_error(["pool", "distill", SPEC, "--checkpoint", ancestry, *QUICK, "--out", pooled[0]],
                       "already exists — pass --force")  # fmt: skip
    assert _snapshot(pooled[0]) == before


def test_build_budget_no_descendant_meets(pooled, tmp_path):
    smallest = pooled[1]["descendants"][0]
    out = tmp_path / "out"
    _assert_user_error(["pool", "build", pooled[0], "--budget", "params=1k", "--runs", "1", "--out", out],
                       f"no descendant meets params=1k: the smallest (low={smallest['low']}, high=0) has params=",
                       out, as_json=False)  # fmt: skip
    # known before any export: no stage line was printed
    code, _, err = run_cli("pool", "build", pooled[0], "--budget", "flops=1k,latency=1ms", "--out", out)
    assert code == 2 and err.startswith("error: no descendant meets flops=1k,latency=1ms") and err.count("\n") == 1


BUILD_ERRORS = {
    "malformed budget": (["--budget", "junk"], "cannot read budget item 'junk'"),
    "unknown budget key": (["--budget", "depth=3"], "unknown budget key 'depth'"),
    "zero budget": (["--budget", "params=0"], "budget params=0.0 is not a positive number"),
    "runs": (["--runs", "0"], "runs must be an integer >= 1, got 0"),
    "batch": (["--batch", "0"], "batch must be an integer >= 1, got 0"),
    "threads": (["--threads", "-2"], "threads must be an integer >= 1, got -2"),
    "fp16 io without fp16": (["--io-types", "fp16"], "--io-types fp16 needs --precision fp16"),
    "calibration size": (["--precision", "int8", "--calibration-size", "0"], "bad --calibration-size 0"),
}


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_build_user_errors_write_nothing(case, pooled, tmp_path):
    argv, fragment = BUILD_ERRORS[case]
    out = tmp_path / "out"
    _assert_user_error(["pool", "build", pooled[0], *argv, "--out", out], fragment, out)


FINETUNE_ERRORS = {
    "negative epochs": (["--epochs", "-1"], "epochs must be an integer >= 1, got -1"),
    "lr": (["--lr", "0"], "lr must be a number in (0.0, 10.0], got 0.0"),
    "batch size": (["--batch-size", "0"], "batch_size must be an integer >= 2, got 0"),
    "seed": (["--seed", "-3"], "bad --seed -3"),
}


@pytest.mark.parametrize("case", list(FINETUNE_ERRORS))
def test_finetune_user_errors_write_nothing(case, pooled, tmp_path):
    argv, fragment = FINETUNE_ERRORS[case]
    before = _snapshot(pooled[0])
    out = tmp_path / "out"
    _assert_user_error(["pool", "finetune", pooled[0], *argv, "--out", out], fragment, out)
    _assert_user_error(["pool", "finetune", pooled[0], *argv], fragment)  # in place
    assert _snapshot(pooled[0]) == before


def _other_version(root: Path) -> str:
    doc = json.loads((root / "pool.json").read_text())
    (root / "pool.json").write_text(json.dumps({**doc, "format": "zoocompiler.learngene-pool/0"}))
    return 'format must be "zoocompiler.learngene-pool/1", found "zoocompiler.learngene-pool/0"'


def _tampered_instances(root: Path) -> str:
    path = root / "instances.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return "instances.safetensors does not match its sha256 in pool.json (corrupted or edited)"


def _missing_transforms(root: Path) -> str:
    (root / "transforms.safetensors").unlink()
    return "transforms.safetensors is missing or unreadable"


def _junk_index(root: Path) -> str:
    (root / "pool.json").write_text("{junk")
    return "pool.json is not valid JSON"


BAD_POOLS = {"other version": _other_version, "tampered instances": _tampered_instances,
             "missing transforms": _missing_transforms, "junk index": _junk_index}  # fmt: skip


BAD_POOL_COMMANDS = [(case, command) for case in BAD_POOLS
                     for command in ("list", "build", "finetune", "finetune in place")
                     if (case, command) != ("missing transforms", "build")]  # build does not need the maps


@pytest.mark.parametrize(("case", "command"), BAD_POOL_COMMANDS)
def test_a_bad_pool_is_refused(case, command, pooled, tmp_path):
    bad = _copy(pooled, tmp_path, "bad")
    fragment = BAD_POOLS[case](bad)
    before = _snapshot(bad)
    out = tmp_path / "out"
    argv = {"list": ["list", bad], "build": ["build", bad, "--runs", "1", "--out", out],
            "finetune": ["finetune", bad, "--epochs", "1", "--out", out],
            "finetune in place": ["finetune", bad, "--epochs", "1"]}[command]  # fmt: skip
    _assert_user_error(["pool", *argv], fragment, out)
    assert _snapshot(bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_missing_pool_is_refused(tmp_path):
    nowhere = tmp_path / "nowhere"
    for argv in (["list", nowhere], ["build", nowhere, "--out", tmp_path / "out"],
                 ["finetune", nowhere], ["finetune", nowhere, "--out", tmp_path / "out"]):  # fmt: skip
        _assert_user_error(["pool", *argv], f"pool directory {nowhere} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_finetune_refuses_a_changed_ancestry(pooled, ancestry, tmp_path):
    """The ancestry's checkpoint was re-saved with other weights after distillation."""
    checkpoint = tmp_path / "anc.pt"
    shutil.copyfile(ancestry, checkpoint)
    bad = _copy(pooled, tmp_path, "bad")
    doc = json.loads((bad / "pool.json").read_text())
    doc["ancestry"]["checkpoint"] = str(checkpoint)
    (bad / "pool.json").write_text(json.dumps(doc))
    state = torch.load(checkpoint, weights_only=True)
    state["head.bias"] = state["head.bias"] + 1
    torch.save(state, checkpoint)
    before = _snapshot(bad)
    out = tmp_path / "out"
    fragment = f"the ancestry {SPEC} no longer has the weights pool {bad} was distilled from — restore its checkpoint"
    _assert_user_error(["pool", "finetune", bad, "--epochs", "1", "--out", out], fragment, out)
    _assert_user_error(["pool", "finetune", bad, "--epochs", "1"], fragment, as_json=False)
    assert _snapshot(bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anc.pt", "bad"]


def test_existing_out_needs_force(pooled, tuned, tmp_path):
    before, tuned_before = _snapshot(pooled[0]), _snapshot(tuned[0])
    _assert_user_error(["pool", "finetune", pooled[0], "--epochs", "1", "--out", tuned[0]], "already exists")
    _assert_user_error(["pool", "build", pooled[0], "--runs", "1", "--out", tuned[0]], "already exists")
    assert _snapshot(pooled[0]) == before and _snapshot(tuned[0]) == tuned_before


def test_out_never_replaces_the_pool(pooled, tmp_path):
    copy = _copy(pooled, tmp_path / "parent")
    before = _snapshot(tmp_path)
    for out in (copy, copy.parent):
        _assert_user_error(["pool", "build", copy, "--runs", "1", "--out", out, "--force"],
                           "would replace the pool directory")  # fmt: skip
    _assert_user_error(["pool", "finetune", copy, "--epochs", "1", "--out", copy.parent, "--force"],
                       "would replace the pool directory")  # fmt: skip
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- help


COMMANDS = [["pool"], ["pool", "distill"], ["pool", "finetune"], ["pool", "build"], ["pool", "list"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_documents_every_option(command):
    assert_help_documents_every_option(command)


def test_finetune_refuses_a_python_ancestry_spec(pooled, tmp_path):
    """A pool.json whose ancestry spec would import code is refused without --trust-code (data only)."""
    bad = _copy(pooled, tmp_path, "bad")
    doc = json.loads((bad / "pool.json").read_text())
    doc["ancestry"]["spec"] = "python:os:getcwd"
    (bad / "pool.json").write_text(json.dumps(doc))
    before = _snapshot(bad)
    out = tmp_path / "out"
    _assert_user_error(["pool", "finetune", bad, "--epochs", "1", "--out", out], "python:", out)
    assert _snapshot(bad) == before
