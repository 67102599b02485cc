"""Reassembly on a target task: the task split, auto pooling, pickable sets, candidates with whole models,
tuning that keeps the better head, the from-scratch twin, Kendall τ, the verdict and their bad input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from zoocompiler.cli import main
from zoocompiler.core.budget import Budget
from zoocompiler.core.errors import ZooError
from zoocompiler.data import DataError, hold_out, load_dataset
from zoocompiler.ir import Layout, TensorInfo
from zoocompiler.passes.analysis.activations import AUTO_MAX_FEATURES, POOL_MODES, pooled_features
from zoocompiler.passes.rewrite.compose import ProbeActivations
from zoocompiler.pipelines.assemble import config as config_module
from zoocompiler.pipelines.assemble.pipeline import (
    AssembleConfig,
    _tune_candidate,
    _verdict,
    analyse_zoo,
    member_probes,
    rank_candidates,
    solve,
)
from zoocompiler.pipelines.assemble.selection import from_scratch, kendall_tau, tune_kept
from zoocompiler.pipelines.assemble.task import load_task, task_image_size
from zoocompiler.solvers.assembly_ilp import fits
from zoocompiler.solvers.partition import BlockRef, Partition
from zoocompiler.training import evaluate

SMALL_ZOO = "resnet_s,vgg_s,mobilenetv3_s"


def small_config(tmp_path, **kw) -> AssembleConfig:
    base = dict(budget=Budget(macs=6e6, params=4e5), zoo=SMALL_ZOO, restarts=8, top=4, tune="none",
                naswot_batches=2, cache_dir=tmp_path / "cache", latency_runs=5, epochs=1)
    base.update(kw)
    return AssembleConfig(**base)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    return analyse_zoo(small_config(tmp_path_factory.mktemp("zoo")))


# --- the task -------------------------------------------------------------------------------------------------


def test_hold_out_is_a_stratified_disjoint_deterministic_split():
    train = load_dataset("digits", "train")
    rest, held = hold_out(train, 0.25)
    again_rest, again_held = hold_out(train, 0.25)
    assert torch.equal(held.x, again_held.x) and torch.equal(rest.y, again_rest.y)
    assert len(rest) + len(held) == len(train)
    rows = {tuple(r) for r in train.x.flatten(1).tolist()}
    assert {tuple(r) for r in held.x.flatten(1).tolist()} | {tuple(r) for r in rest.x.flatten(1).tolist()} == rows
    for c in range(10):  # every class on both sides, in proportion
        n = int((train.y == c).sum())
        assert int((held.y == c).sum()) == round(n * 0.25)
    assert len(hold_out(train, 300)[1]) == pytest.approx(300, abs=10)
    with pytest.raises(DataError, match="cannot hold out"):
        hold_out(train, 1.0)


def test_task_is_digits_at_the_zoos_input_size():
    assert task_image_size("digits", "demo", None) == 28  # the demo zoo declares 1×28×28; digits is 8×8
    assert task_image_size("mnist5k", "demo", None) is None  # already the zoo's size
    assert task_image_size("digits", "timm:resnet18,in_chans=1,timm:resnet10t,in_chans=1", None) is None
    assert task_image_size("digits", "demo", 16) == 16
    task = load_task("digits", image_size=28)
    assert task.input_shape == (1, 28, 28) and task.num_classes == 10
    assert len(task.val) == pytest.approx(0.2 * (len(task.fit) + len(task.val)), abs=10)
    assert len(task.test) == len(load_dataset("digits", "test"))
    assert load_task("digits").input_shape == (1, 8, 8)
    small = load_task("digits", train_size=300)
    assert len(small.fit) + len(small.val) == pytest.approx(300, abs=10)


def test_task_bad_input_is_one_line(tmp_path):
    with pytest.raises(ZooError, match=r"--train-size 5 is outside \[20, "):
        load_task("digits", train_size=5)
    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(root / "cat" / f"{i}.png")
    with pytest.raises(ZooError, match="has 1 class; a classifier needs at least 2"):
        load_task(f"imagefolder:{root}")


def test_cli_rgb_data_for_a_grey_zoo_is_one_line_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    out = tmp_path / "asm"
    argv = ["assemble", "--zoo", SMALL_ZOO, "--data", f"imagefolder:{root}", "--budget", "flops=4M", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: zoo model zoo:resnet_s takes inputs of shape (1, 28, 28) but the data has (3,")
    assert not out.exists()


# --- similarity pooling ----------------------------------------------------------------------------------------


def test_auto_pooling_flattens_small_values_and_grid_pools_large_maps():
    assert config_module.POOL_MODES == POOL_MODES  # the CLI's torch-free copy
    small = torch.randn(4, 8, 7, 7)
    info = TensorInfo((4, 8, 7, 7), "float32", Layout.MAP)
    assert torch.equal(pooled_features(small, info, "auto"), pooled_features(small, info, "flatten"))
    large = torch.randn(2, 64, 32, 32)
    feats = pooled_features(large, TensorInfo((2, 64, 32, 32), "float32", Layout.MAP), "auto")
    grid = int((AUTO_MAX_FEATURES / 64) ** 0.5)
    assert feats.shape == (2, 64 * grid * grid) and feats.shape[1] <= AUTO_MAX_FEATURES
    # each grid cell is the mean of its window (32 / 16 = 2×2 windows here)
    assert torch.allclose(feats.view(2, 64, grid, grid)[:, :, 0, 0], large[:, :, :2, :2].double().mean((2, 3)))
    tokens = torch.randn(2, 300, 192)
    token_info = TensorInfo((2, 300, 192), "float32", Layout.TOKENS)
    assert torch.allclose(pooled_features(tokens, token_info, "auto"), tokens.double().mean(1))


# --- pickable blocks ------------------------------------------------------------------------------------------


def _brute_pickable(part: Partition) -> set[BlockRef]:
    by_stage = [[b for b in part.blocks() if b.stage == k] for k in range(part.k)]
    out: set[BlockRef] = set()
    for combo in itertools.product(*by_stage):
        if len({part.set_of(b) for b in combo}) == part.k:
            out.update(combo)
    return out


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 4), models=st.integers(1, 4), data=st.data())
def test_pickable_blocks_equal_brute_force(k, models, data):
    sets = [tuple(data.draw(st.lists(st.integers(0, k - 1), min_size=k, max_size=k))) for _ in range(models)]
    part = Partition(k, 0.2, [tuple(range(k + 1))] * models, sets, [], 0.0, [], [], "dp", 0.0)
    assert set(part.pickable()) == _brute_pickable(part)


def test_demo_partition_reports_pickable_blocks(analysis):
    from zoocompiler.pipelines.assemble.pipeline import pickable_per_set

    rows = pickable_per_set(analysis.partition)
    assert [r["blocks"] for r in rows] == [3, 3, 3, 3]  # distinct sets (default): one block per model per set
    assert [r["pickable"] for r in rows] == [3, 3, 3, 3]


# --- candidates -----------------------------------------------------------------------------------------------


def test_zoo_probe_and_whole_model_candidates(analysis, tmp_path):
    """Every zoo model's probe is its held-out accuracy; whole models that fit join the ILP's candidates with that
    probe, costs as the ILP counts them, and the list is sorted by the proxy."""
    config = small_config(tmp_path)
    probes = ProbeActivations(analysis.members_by_name, analysis.probe)
    quality = member_probes(analysis, probes)
    assert set(quality) == {"resnet_s", "vgg_s", "mobilenetv3_s"} and all(0.5 < q <= 1 for q in quality.values())
    opts, assemblies, _ = solve(analysis, config, quality=quality)
    for o, b in zip(opts.options, opts.blocks, strict=True):
        assert o.quality == pytest.approx(quality[b.model] / 4)
    ranked = rank_candidates(analysis, opts, assemblies, config, probes, quality=quality)
    assert [c.probe for c in ranked] == sorted((c.probe for c in ranked), reverse=True)
    wholes = {c.blocks[0].model: c for c in ranked if c.source == "whole"}
    assert "mobilenetv3_s" not in wholes  # 578k params > 400k
    for name, path in opts.whole_models().items():
        a = opts.assembly(path)
        member = analysis.members_by_name[name]
        assert a.params == member.params_between(0, len(member.positions) - 1) + opts.heads[path[-1]].params
        if fits(a, config.budget):
            assert wholes[name].probe == quality[name]
            # the K-block path of a whole model is the model: its own build scores what member_probes measured
            net, result = _tune_candidate(wholes[name], analysis, probes, config)
            assert result.val == pytest.approx(quality[name], abs=1 / len(analysis.task.val))
    assert len(ranked) >= len(assemblies)


# --- tuning, scratch, tau, verdict ----------------------------------------------------------------------------


def _first_candidate(analysis, tmp_path):
    """The ILP's first assembly, built untuned (least-squares stitches and head)."""
    config = small_config(tmp_path)
    probes = ProbeActivations(analysis.members_by_name, analysis.probe)
    opts, assemblies, _ = solve(analysis, config)
    cand = rank_candidates(analysis, opts, assemblies[:1], config, probes)[0]
    net, _ = _tune_candidate(cand, analysis, probes, config, mode="none")
    return cand, net


def test_tune_kept_restores_the_ridge_head_when_tuning_hurts(analysis, tmp_path):
    cand, net = _first_candidate(analysis, tmp_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def ruin(n, fit):
        with torch.no_grad():
            n.head.proj.weight.neg_()

    result = tune_kept(net, analysis.task, "full", ruin)
    assert result.kept == "ridge" and result.val_after < result.val_before == result.val
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    def nudge(n, fit):  # changes nothing the argmax sees: a tie keeps the tuned weights
        with torch.no_grad():
            n.head.proj.bias.add_(0.0)

    assert tune_kept(net, analysis.task, "full", nudge).kept == "tuned"


def test_from_scratch_twin_reinitialises_every_weight(analysis, tmp_path):
    cand, net = _first_candidate(analysis, tmp_path)
    last = cand.blocks[-1]
    features = analysis.members_by_name[last.model].positions[last.end].tensor
    twin, not_reset = from_scratch(net, features, analysis.task, seed=3)
    again, _ = from_scratch(net, features, analysis.task, seed=3)
    assert not_reset == 0
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in net.parameters())
    for (name, p), q in zip(twin.body.named_parameters(), net.body.parameters(), strict=True):
        if p.numel() > 1 and q.std() > 0:
            assert not torch.equal(p, q), name
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), again.state_dict().values(), strict=True))
    assert evaluate(twin, analysis.task.val) < evaluate(net, analysis.task.val)


def test_kendall_tau():
    assert kendall_tau([1.0], [0.5]) is None
    assert kendall_tau([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) is None
    assert kendall_tau([1, 2, 3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    assert kendall_tau([3, 2, 1, 0], [0.1, 0.2, 0.4, 0.3]) == pytest.approx(-2 / 3)


def test_verdict_says_when_the_assembly_loses():
    base = {"single": {"test": 0.9}, "scratch": {"test": 0.7}}
    v = _verdict(0.85, base)
    assert v["loses"] == ["single"] and v["vs_single"] == pytest.approx(-0.05)
    assert "LOSES TO the best single zoo model (85.0% vs 90.0%)" in v["message"]
    assert "beats the from-scratch twin" in v["message"]
    same = _verdict(0.9, {"single": {"test": 0.9, "model": "vgg_s"}, "scratch": {"test": 0.7}}, whole="vgg_s")
    assert same["message"].startswith("the chosen network is the best single zoo model (vgg_s, kept whole")
    assert same["loses"] == [] and same["vs_single"] == 0.0
    none_fits = _verdict(0.85, {"single": None, "scratch": {"test": 0.9}})
    assert "the best single zoo model: none fits the budget" in none_fits["message"]
    assert none_fits["loses"] == ["scratch"]


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_assemble_prints_the_baselines(tmp_path, capsys):
    out = tmp_path / "asm"
    argv = ["assemble", "--zoo", SMALL_ZOO, "--budget", "flops=6M,params=400k", "--restarts", "4", "--top", "3",
            "--tune", "none", "--tune-top", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "against the baselines" in text and "best single: " in text and "from scratch" in text
    assert "pickable blocks per equivalence set: set 0 3/3" in text
    assert "the chosen network " in text
    report = json.loads((out / "report.json").read_text())
    assert len(report["tuned"]) == 2 and report["baselines"]["scratch"]["tune"] == "none"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--proxy", "grad"], "invalid choice: 'grad'"),
        (["--tune-top", "0"], "bad --tune-top 0"),
        (["--train-size", "0"], "bad --train-size 0"),
        (["--image-size", "0"], "bad --image-size 0"),
        (["--val-fraction", "1"], "--val-fraction must be in (0, 1), got 1.0"),
        (["--pool", "max"], "invalid choice: 'max'"),
    ],
)
def test_cli_assemble_bad_options(tmp_path, capsys, extra, message):
    out = tmp_path / "asm"
    argv = ["assemble", "--zoo", SMALL_ZOO, "--budget", "flops=4M", "--out", str(out), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_config_rejects_unknown_proxy(tmp_path):
    with pytest.raises(ZooError, match="unknown --proxy 'x'"):
        small_config(tmp_path, proxy="x").check()


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    """`bench/assemble.py --quick` runs every part end to end and writes its JSON (targets included) and plot."""
    from helpers.bench import run_quick_bench

    doc = run_quick_bench("assemble", tmp_path)
    runs = doc["budgets"]["runs"]
    assert len(runs) == 2 and all("error" not in r for r in runs)  # flops=2M, frozen and full, seed 0
    assert {"single", "scratch"} <= set(doc["budgets"]["targets"])
    assert [r["variant"] for r in doc["ablation"]["runs"]] == ["default", "distinct_sets=False", "pool=mean"]
    assert set(doc["tau"]["tau"]["full"]) == {"surrogate", "probe", "naswot"}
