"""The pipelines on Ray (issue 18): the same results as in-process for the same seeds — the similarity matrix
(≤ 1e-6), the partition and the ILP's choice, the exported rates, the modules and the fragments, byte for byte
where they are files — through the commands' ``--executor ray``, on a local Ray instance (``local_ray``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.cli import run_cli, run_json

from zoocompiler.core.budget import Budget
from zoocompiler.passes.rewrite.compose import ProbeActivations
from zoocompiler.pipelines.assemble.config import AssembleConfig
from zoocompiler.pipelines.assemble.pipeline import analyse_zoo, member_probes, solve
from zoocompiler.pipelines.base import LocalExecutor

pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEASURED = {"latency_ms", "per_sample_ms", "seconds", "slice_seconds", "timings", "latency", "median_ms", "p10_ms",
            "p90_ms", "out", "files", "source", "store", "pool",
            "file_bytes"}  # an ONNX file's size: the exporter's symbolic-shape names may differ between processes


def untimed(value):
    """``value`` without what is measured, names a folder or counts metadata bytes."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".onnx", ".safetensors", ".npz")}


def same_graph(a: bytes, b: bytes) -> bool:
    """Two ONNX models with the same nodes (op types, inputs, outputs) and the same initializers."""
    import onnx
    from onnx import numpy_helper

    ga, gb = onnx.load_from_string(a).graph, onnx.load_from_string(b).graph
    nodes = [[(n.op_type, list(n.input), list(n.output)) for n in g.node] for g in (ga, gb)]
    weights = [{t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (ga, gb)]
    return nodes[0] == nodes[1] and weights[0].keys() == weights[1].keys() and all(
        np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_assemble_analysis_probes_and_ilp_are_the_same_on_ray(local_ray, tmp_path):
    """Members loaded and traced on workers (annotations sent with the graphs), per-member Grams, probes: same
    similarity matrix, partition, zoo probe accuracies and ILP candidates."""
    config = AssembleConfig(budget=Budget(macs=6e6), zoo="resnet_s,vgg_s,mobilenetv3_s", restarts=8, top=4,
                            tune="none", probe_fraction=0.05, cache_dir=None)
    runs = {}
    for name, executor in (("local", LocalExecutor()), ("ray", local_ray)):
        analysis = analyse_zoo(config, executor=executor)
        probes = ProbeActivations(analysis.members_by_name, analysis.probe)
        quality = member_probes(analysis, probes, executor)
        _, assemblies, _ = solve(analysis, config, quality=quality, executor=executor)
        runs[name] = analysis, quality, assemblies
    (local, local_quality, local_ilp), (ray, ray_quality, ray_ilp) = runs["local"], runs["ray"]
    np.testing.assert_allclose(ray.similarity.matrix, local.similarity.matrix, atol=1e-6, rtol=0)
    assert untimed(ray.partition.to_dict()) == untimed(local.partition.to_dict())
    assert ray_quality == local_quality and len(local_quality) == 3
    assert [a.blocks for a in ray_ilp] == [a.blocks for a in local_ilp] and len(local_ilp) >= 2
    assert all("zc" in n.meta for m in ray.members for n in m.graph.graph.nodes)  # annotations came back


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slice") / "vgg_sliced"
    run_json("slice", "train", "zoo:vgg_s", "--from-scratch", "--groups", "4", "--epochs", "1", "--lb", "0.375",
             "--scheduler", "normal", "--out", out)  # one width per batch: the cheapest training to export from
    return out


def test_slice_export_is_the_same_on_ray(sliced, local_ray, tmp_path):
    """`slice export --executor ray`: each rate exported on a worker, its file placed by the driver, latency timed
    on the driver: the same files and manifest as in-process."""
    docs = {name: run_json("slice", "export", sliced, "--rates", "0.5,1", "--runs", "2", "--latency-batch", "4",
                           "--executor", name, "--out", tmp_path / name) for name in ("local", "ray")}
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 2
    assert untimed(docs["ray"]) == untimed(docs["local"])
    assert all(row["latency_ms"] > 0 for row in docs["ray"]["rates"])


def test_pack_slice_fragments_are_the_same_on_ray(local_ray, tmp_path):
    """`pack slice --executor ray`: one task per class; the same fragment files (weights, ONNX) and store."""
    docs = {name: run_json("pack", "slice", "--zoo", "vgg_s_0to3", "--k", "5", "--steps", "2", "--runs", "0",
                           "--executor", name, "--out", tmp_path / name) for name in ("local", "ray")}
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 9
    assert untimed(docs["ray"]) == untimed(docs["local"])


def test_modularize_extract_modules_are_the_same_on_ray(local_ray, tmp_path):
    """`modularize extract --executor ray`: one task per class; the same modules and files (2 classes)."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 40)
    np.savez(tmp_path / "two.npz", x=rng.integers(0, 256, size=(len(labels), 8, 8), dtype=np.uint8), y=labels)
    trained = tmp_path / "trained"
    run_json("modularize", "train", "python:models_for_tests:sliceable_mlp_cnn,num_classes=2", "--data",
             f"npz:{tmp_path / 'two.npz'}", "--epochs", "1", "--batch-size", "32", "--no-standard", "--out", trained)
    docs = {name: run_json("modularize", "extract", trained, "--trust-code", "--latency-runs", "2", "--executor", name,
                           "--out", tmp_path / name) for name in ("local", "ray")}
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 2
    assert untimed(docs["ray"]) == untimed(docs["local"])
    assert docs["ray"]["deploy"]["latency"]  # the latency table, timed on the driver


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("--executor", "ray=127.0.0.1:1"), "cannot reach the Ray cluster at 127.0.0.1:1"),
        (("--latency-node", "10.0.0.1"), "--latency-node needs --executor ray=ADDRESS"),
        (("--executor", "spark"), "unknown --executor 'spark'"),
    ],
)
def test_bad_executor_options_fail_before_any_work(sliced, tmp_path, argv, fragment):
    out = tmp_path / "never"
    code, stdout, stderr = run_cli("slice", "export", sliced, "--rates", "1", *argv, "--out", out)
    assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


@pytest.mark.slow  # ~90 s: two distillations and two builds
def test_pool_distill_and_build_are_the_same_on_ray(local_ray, tmp_path):
    """`pool distill --executor ray` (one task per auxiliary model) and `pool build --executor ray` (one per
    descendant, timed on the driver): the same pool weights, descendants and files."""
    import torch

    from zoocompiler.sources import load_model

    spec = ("timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,num_classes=10,depth=4,embed_dim=64,"
            "num_heads=4")
    torch.manual_seed(0)
    torch.save(load_model(spec).state_dict(), tmp_path / "anc.pt")
    docs = {}
    for name in ("local", "ray"):
        pool = tmp_path / f"pool_{name}"
        distilled = run_json("pool", "distill", spec, "--checkpoint", tmp_path / "anc.pt", "--blocks", "2", "--dim",
                             "16", "--levels", "2", "--epochs", "1", "--executor", name, "--out", pool)
        built = run_json("pool", "build", pool, "--budget", "params=1G", "--all", "--runs", "2", "--executor", name,
                         "--out", tmp_path / f"built_{name}")
        docs[name] = [distilled, built]
    assert files(tmp_path / "pool_ray") == files(tmp_path / "pool_local")
    ray_files, local_files = files(tmp_path / "built_ray"), files(tmp_path / "built_local")
    assert ray_files.keys() == local_files.keys()
    for name in local_files:  # the exporter's symbolic-shape names may differ between processes: the graphs may not
        assert same_graph(ray_files[name], local_files[name]), name
    assert len(files(tmp_path / "built_local")) >= 3

    assert untimed(docs["ray"]) == untimed(docs["local"])
