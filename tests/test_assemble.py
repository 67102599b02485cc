"""Deep Model Reassembly pipeline: zoo loading, building, cost accounting, end-to-end outputs, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers.executors import ReversedExecutor

from zoocompiler.cli import main
from zoocompiler.core.budget import Budget
from zoocompiler.core.errors import InputShapeError, ZooError
from zoocompiler.passes.rewrite.compose import ChosenBlock, ProbeActivations, build_body
from zoocompiler.pipelines.assemble.pipeline import AssembleConfig, analyse_zoo, assemble, model_macs, rebuild, solve
from zoocompiler.pipelines.zoo.members import load_member, split_zoo_spec, zoo_specs
from zoocompiler.solvers.assembly_ilp import InfeasibleBudgetError

SMALL_ZOO = "resnet_s,vgg_s,mobilenetv3_s"


def small_config(tmp_path, **kw) -> AssembleConfig:
    base = dict(
        budget=Budget(macs=6e6),
        zoo=SMALL_ZOO,
        restarts=8,
        top=4,
        tune="none",
        probe_fraction=0.05,
        naswot_batches=2,
        cache_dir=tmp_path / "cache",
        latency_runs=5,
    )
    base.update(kw)
    return AssembleConfig(**base)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    return analyse_zoo(small_config(tmp_path_factory.mktemp("zoo")))


def test_zoo_spec_grammar():
    assert split_zoo_spec("zoo:a,timm:b,k=1,j=2, c") == ["zoo:a", "timm:b,k=1,j=2", "zoo:c"]
    assert split_zoo_spec("timm:vit,img_size=(64,64),zoo:a") == ["timm:vit,img_size=(64,64)", "zoo:a"]
    assert len(zoo_specs("demo")) == 7
    with pytest.raises(ZooError, match="at least two models"):
        zoo_specs("resnet_s")
    with pytest.raises(ZooError, match="twice"):
        zoo_specs("resnet_s,resnet_s")


def test_data_with_another_input_shape_fails_closed():
    with pytest.raises(InputShapeError, match=r"takes inputs of shape \(1, 28, 28\) but the data has \(1, 8, 8\)"):
        load_member("zoo:resnet_s", (1, 8, 8))


def test_contiguous_blocks_of_one_model_rebuild_its_features(analysis):
    """Blocks that continue each other in one model join without stitches and equal the model's prefix."""
    member = analysis.members[0]
    probes = ProbeActivations({member.name: member}, analysis.probe[:16])
    last = len(member.positions) - 1
    cuts = [0, 2, last // 2, last - 1, last]
    blocks = [ChosenBlock(member.name, k, a, b) for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]
    body = torch.nn.Sequential(build_body(blocks, {member.name: member}, probes))
    assert not any(name.startswith("stitch") for name, _ in body.named_children())
    x = analysis.probe[:16]
    want = probes.at(member.name, last)
    torch.testing.assert_close(body.eval()(x), want, rtol=0, atol=1e-6)


def test_partition_covers_every_model(analysis):
    part = analysis.partition
    assert len(part.boundaries) == len(analysis.members)
    for m, bounds in zip(analysis.members, part.boundaries, strict=True):
        assert bounds[0] == 0 and bounds[-1] == len(m.positions) - 1
        assert list(bounds) == sorted(set(bounds)) and len(bounds) == part.k + 1


def test_ilp_costs_equal_the_built_networks(analysis, tmp_path):
    """Params and MACs the ILP adds up (blocks + stitches + head) are exactly those of the built network."""
    from zoocompiler.passes.rewrite.compose import build_assembly

    config = small_config(tmp_path)
    opts, assemblies, _ = solve(analysis, config)
    assert assemblies
    members = {m.name: m for m in analysis.members}
    probes = ProbeActivations(members, analysis.probe)
    shape = tuple(analysis.train.input_shape)
    for a in assemblies[:3]:
        blocks = [opts.blocks[i] for i in a.blocks]
        assert [b.stage for b in blocks] == list(range(config.k))
        net = build_assembly(blocks, members, probes, analysis.train.x[:200], analysis.train.y[:200], 10)
        assert sum(p.numel() for p in net.parameters()) == a.params
        assert model_macs(net, shape) == a.macs
        assert a.macs <= config.budget.macs


def test_candidate_ranking_does_not_depend_on_the_executor(analysis, tmp_path):
    """NASWOT re-rank through an executor that runs candidates last-to-first gives the same ranking and scores."""
    from zoocompiler.pipelines.assemble.pipeline import rank_candidates
    from zoocompiler.pipelines.base import LocalExecutor

    config = small_config(tmp_path)
    opts, assemblies, _ = solve(analysis, config)
    local = rank_candidates(analysis, opts, assemblies, config, executor=LocalExecutor())
    other = rank_candidates(analysis, opts, assemblies, config, executor=ReversedExecutor())
    assert [c.to_dict() for c in local] == [c.to_dict() for c in other]
    assert len(local) == len(assemblies) >= 2


def test_infeasible_budget_names_the_cheapest(analysis, tmp_path):
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(analysis, small_config(tmp_path, budget=Budget(params=10)))
    assert info.value.minimum["params"] > 10
    assert "params=" in str(info.value)


def test_assemble_end_to_end(tmp_path):
    config = small_config(tmp_path, budget=Budget(macs=6e6, params=4e5))
    out = tmp_path / "out"
    out.mkdir()
    report = assemble(config, out)
    names = {p.name for p in out.iterdir()}
    files = {"model.onnx", "report.json", "plan.json", "assembly.safetensors", "similarity.png", "candidates.png",
             "baselines.png"}
    assert files <= names
    assert report["macs"] <= 6e6 and report["params"] <= 4e5
    assert len(report["chosen"]) == config.k
    assert report["export"]["max_abs_diff"] <= 1e-4
    # default precision: fp32, the same verified export as before, the other precisions only measured beside it
    deploy = report["deploy"]
    assert (report["precision"], deploy["precision"], deploy["path"], report["export"]["path"]) == (
        "fp32", "fp32", "model.onnx", "model.onnx")
    assert deploy["file_bytes"] == (out / "model.onnx").stat().st_size
    assert deploy["precisions"]["fp32"]["accuracy"] == pytest.approx(report["accuracy"], abs=0.01)
    assert {r["precision"] for r in deploy["latency"]} == {"fp32", "fp16", "int8"}
    # without tuning the chosen one is the best held-out probe among the tuned (= the best candidate)
    assert report["probe"] == report["val_accuracy"] == max(c["probe"] for c in report["candidates"])
    assert report["kept_head"] == "ridge" and report["accuracy"] == report["accuracy_before_tuning"]
    assert report["task"]["data"] == "digits" and report["task"]["input_shape"] == [1, 28, 28]
    assert [r["pickable"] for r in report["sets"]] == [3] * config.k  # distinct sets: every block can be picked
    single, scratch = report["baselines"]["single"], report["baselines"]["scratch"]
    assert single["params"] <= 4e5 and single["macs"] <= 6e6
    fitting = ("resnet_s", "vgg_s")  # mobilenetv3_s has 578k params
    assert single["probe"] == max(report["zoo_probe"][m] for m in fitting) == report["zoo_probe"][single["model"]]
    assert scratch["params"] == report["params"] and scratch["tune"] == "none"
    assert report["verdict"]["vs_single"] == pytest.approx(report["accuracy"] - single["test"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and 0.0 <= report["accuracy"] <= 1.0
    # the plan rebuilds the untuned assembly exactly, and ONNX Runtime agrees with it
    net = rebuild(json.loads((out / "plan.json").read_text()))
    x = torch.randn(3, 1, 28, 28)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), onnx_out, atol=1e-4, rtol=0)


def test_cli_infeasible_budget_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "asm"
    argv = ["assemble", "--zoo", SMALL_ZOO, "--budget", "params=10", "--restarts", "4", "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress lines come first
    assert last.startswith("error: no assembly fits the budget params=10")
    assert "smallest for this zoo is params=" in last
    assert not out.exists() and not list(tmp_path.glob(".asm*"))


def test_cli_partition_json(tmp_path, capsys):
    argv = ["partition", "--zoo", SMALL_ZOO, "-K", "3", "--restarts", "4", "--json"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["k"] == 3 and data["restarts"] == 4
    assert len(data["sets"]) == 3 * 3  # K blocks for each of the 3 models
    assert sum(r["anchor"] for r in data["sets"]) == 3


def test_cli_partition_distinct_sets(tmp_path, capsys):
    """--distinct-sets: every set holds exactly one block of every model."""
    argv = ["partition", "--zoo", SMALL_ZOO, "-K", "3", "--restarts", "4", "--distinct-sets", "--json"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["distinct_sets"] is True
    for j in range(3):
        models = [r["model"] for r in data["sets"] if r["set"] == j]
        assert len(models) == len(set(models)) == 3
