"""Assembly positions, cut-point activations, pooling, and the cached zoo-wide CKA matrix (demo-zoo models)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoocompiler as zc
from zoocompiler.core.cache import weights_hash
from zoocompiler.core.errors import InputShapeError, PassError, SolverError, ZooError
from zoocompiler.data import load_dataset
from zoocompiler.ir import Layout, TensorInfo
from zoocompiler.passes.analysis.activations import (
    STITCHABLE,
    assembly_positions,
    cut_point_activations,
    pooled_features,
)
from zoocompiler.passes.analysis.cut_points import cut_point_table
from zoocompiler.passes.rewrite.blocks import extract_block
from zoocompiler.pipelines.zoo import similarity as sim
from zoocompiler.pipelines.zoo.similarity import probe_batch, probe_data_key, zoo_similarity
from zoocompiler.solvers.cka import linear_cka
from zoocompiler.zoo import load_zoo_model

NAMES = ("resnet_s", "vgg_s", "vit_t")


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    return zc.trace(model, torch.randn(2, 1, 28, 28))


@pytest.fixture(scope="module")
def graphs():
    return {name: _trace(load_zoo_model(name)) for name in NAMES}


@pytest.fixture(scope="module")
def split():
    return load_dataset("mnist5k", split="train")


@pytest.fixture(scope="module")
def probe(split):
    return probe_batch(split, fraction=0.01, minimum=48, seed=0)


@pytest.fixture(scope="module")
def reference(graphs, probe):
    """The uncached result every cache test compares against."""
    return zoo_similarity(graphs, probe, cache_dir=None, data_key="probe-a")


# --- positions and activations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NAMES, "regnet_s_5to9"])
def test_assembly_positions(graphs, name):
    gm = graphs[name] if name in graphs else _trace(load_zoo_model(name))
    table = cut_point_table(gm)
    positions = assembly_positions(gm)
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert positions[0].index == 0 and positions[0].node == placeholder
    assert all(p.tensor.layout in STITCHABLE for p in positions)
    assert [p.index for p in positions] == sorted({p.index for p in positions})
    # Everything after the features position is the head: its first cut adds the classifier's params,
    # and nothing after that first cut adds params.
    head = table[positions[-1].index + 1 :]
    assert head[0].cum_params > positions[-1].cum_params
    assert all(row.cum_params == table[-1].cum_params for row in head)
    # Every stitchable cut point before the features is a position.
    expected = [r.index for r in table[1 : positions[-1].index + 1] if r.tensor.layout in STITCHABLE]
    assert [p.index for p in positions[1:]] == expected


def test_assembly_positions_of_known_models(graphs):
    assert [p.node for p in assembly_positions(graphs["resnet_s"])][-2:] == ["global_pool_pool", "global_pool_flatten"]
    assert cut_point_table(graphs["resnet_s"])[-1].node == "fc"
    vit = assembly_positions(graphs["vit_t"])
    assert "flatten" not in [p.node for p in vit]  # the (other-layout) B×C×N patch flatten is no position
    assert vit[-1].node == "head_drop" and vit[1].tensor.layout == Layout.MAP
    # regnet's classifier is followed by an Identity (head.flatten): the features stay before head.fc.
    regnet = assembly_positions(_trace(load_zoo_model("regnet_s_5to9")))
    assert regnet[-1].node == "head_drop"


def test_assembly_positions_needs_two():
    gm = zc.trace(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
    with pytest.raises(PassError, match="position"):
        assembly_positions(gm)


@pytest.mark.parametrize("name", NAMES)
def test_cut_point_activations_equal_block_prefixes(graphs, probe, name):
    gm = graphs[name]
    positions = assembly_positions(gm)
    x = probe[:20]
    acts = cut_point_activations(gm, x, [p.node for p in positions], batch_size=7)
    assert list(acts) == [p.node for p in positions]
    torch.testing.assert_close(acts[positions[0].node], x, rtol=0, atol=0)
    with torch.no_grad():
        for p in positions[1:]:
            expected = extract_block(gm, 0, p.index)(x)
            got = acts[p.node]
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_recorded_values_survive_inplace_ops_and_modes_are_restored(graphs, probe):
    gm = graphs["resnet_s"]  # bn1 is followed by ReLU(inplace=True)
    gm.train()
    try:
        acts = cut_point_activations(gm, probe[:8], ["bn1", "act1"])
        assert gm.training and gm.get_submodule("bn1").training
    finally:
        gm.eval()
    assert (acts["bn1"] < 0).any()
    torch.testing.assert_close(acts["act1"], acts["bn1"].clamp_min(0))
    with torch.no_grad():
        torch.testing.assert_close(acts["bn1"], extract_block(gm, 0, "bn1")(probe[:8]))  # eval-mode BN


def test_cut_point_activations_unknown_node(graphs, probe):
    with pytest.raises(PassError, match="no node named 'nope'"):
        cut_point_activations(graphs["vgg_s"], probe[:2], ["nope"])


def test_pooled_features():
    t = torch.randn(5, 3, 4, 6)
    info = TensorInfo((5, 3, 4, 6), "torch.float32", Layout.MAP)
    pooled = pooled_features(t, info)
    assert pooled.dtype == torch.float64 and pooled.shape == (5, 3)
    torch.testing.assert_close(pooled, t.double().mean(dim=(2, 3)))
    nhwc = pooled_features(t.permute(0, 2, 3, 1), TensorInfo((5, 4, 6, 3), "torch.float32", Layout.MAP_NHWC))
    torch.testing.assert_close(nhwc, pooled)
    tokens = torch.randn(5, 17, 8)
    tok_info = TensorInfo((5, 17, 8), "torch.float32", Layout.TOKENS, prefix_tokens=1)
    torch.testing.assert_close(pooled_features(tokens, tok_info), tokens.double().mean(dim=1))
    flat = torch.randn(5, 9)
    torch.testing.assert_close(pooled_features(flat, TensorInfo((5, 9), "torch.float32", Layout.FLAT)), flat.double())
    torch.testing.assert_close(pooled_features(t, info, mode="flatten"), t.double().reshape(5, 72))
    with pytest.raises(ZooError, match="unknown pooling mode 'max'"):
        pooled_features(t, info, mode="max")
    with pytest.raises(PassError, match="layout"):
        pooled_features(t, TensorInfo((5, 3, 4, 6), "torch.float32", Layout.OTHER))


# --- the zoo matrix -------------------------------------------------------------------------------------------------


def test_matrix_properties(graphs, probe, reference):
    s = reference
    sizes = [len(assembly_positions(graphs[n])) for n in NAMES]
    assert [m.name for m in s.models] == list(NAMES)
    assert [m.offset for m in s.models] == [0, sizes[0], sizes[0] + sizes[1]]
    assert s.matrix.shape == (sum(sizes), sum(sizes)) and s.matrix.dtype == np.float64
    np.testing.assert_array_equal(s.matrix, s.matrix.T)
    np.testing.assert_array_equal(np.diag(s.matrix), 1.0)
    assert s.matrix.min() >= 0.0 and s.matrix.max() <= 1.0
    for a in NAMES:
        for b in NAMES:
            assert s.similarity(a, 0, b, 0) == pytest.approx(1.0, abs=1e-12)  # same images
    assert s.options == {
        "pool": "mean",
        "unbiased": False,
        "probe_size": len(probe),
        "data_key": "probe-a",
        "version": sim.CODE_VERSION,
    }


def test_matrix_entries_match_independent_computation(graphs, probe, reference):
    """Features of resnet's and vit's last positions via extract_block, pooled by hand, then CKA."""

    def features(name: str) -> np.ndarray:
        last = assembly_positions(graphs[name])[-1]
        with torch.no_grad():
            out = extract_block(graphs[name], 0, last.index)(probe)
        return out.double().reshape(len(probe), -1).numpy()  # flat features: pooling is the identity

    l_res = reference.model("resnet_s").features_position
    l_vit = reference.model("vit_t").features_position
    expected = linear_cka(features("resnet_s"), features("vit_t"))
    assert reference.similarity("resnet_s", l_res, "vit_t", l_vit) == pytest.approx(expected, abs=1e-6)


def test_lookup_errors_and_summary(reference):
    with pytest.raises(SolverError, match="'mobilenet' is not in the similarity matrix"):
        reference.index("mobilenet", 0)
    last = reference.model("vgg_s").features_position
    with pytest.raises(SolverError, match=f"0..{last}"):
        reference.similarity("vgg_s", last + 1, "resnet_s", 0)
    assert reference.index("vgg_s", 2) == reference.model("vgg_s").offset + 2
    summary = json.loads(json.dumps(reference.to_dict()))
    assert "matrix" not in summary and summary["size"] == reference.matrix.shape[0]
    assert [len(m["positions"]) for m in summary["models"]] == [len(m.positions) for m in reference.models]


def test_unbiased_and_flatten_options(graphs, probe, reference):
    two = {n: graphs[n] for n in NAMES[:2]}
    unbiased = zoo_similarity(two, probe, unbiased=True, cache_dir=None, data_key="probe-a")
    flat = zoo_similarity(two, probe, pool="flatten", cache_dir=None, data_key="probe-a")
    size = unbiased.matrix.shape[0]
    for other in (unbiased.matrix, flat.matrix):
        np.testing.assert_array_equal(np.diag(other), 1.0)
        assert not np.allclose(other, reference.matrix[:size, :size], atol=1e-3)
    assert unbiased.key != flat.key != reference.key


def test_wrong_input_shape(graphs):
    with pytest.raises(InputShapeError, match=r"'resnet_s' takes inputs of shape \(1, 28, 28\).*\(3, 32, 32\)"):
        zoo_similarity(graphs, torch.randn(8, 3, 32, 32), cache_dir=None, data_key="x")


def test_progress_reports_each_model(graphs, probe):
    seen = []
    zoo_similarity(graphs, probe[:8], cache_dir=None, data_key="x", progress=seen.append)
    assert seen == list(NAMES)


# --- cache ----------------------------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise AssertionError("similarity was recomputed")


def test_cache_roundtrip(graphs, probe, reference, tmp_path, monkeypatch):
    first = zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    assert first.key == reference.key
    np.testing.assert_array_equal(first.matrix, reference.matrix)
    assert [p.name for p in tmp_path.iterdir()] == [f"similarity-{first.key[:16]}.npz"]  # no temp files left
    monkeypatch.setattr(sim, "compute_similarity_matrix", _fail)
    second = zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    np.testing.assert_array_equal(second.matrix, reference.matrix)
    assert second.key == first.key and second.options == first.options
    assert [m.name for m in second.models] == list(NAMES)
    with pytest.raises(AssertionError, match="recomputed"):  # a different pool is a different entry
        zoo_similarity(graphs, probe, pool="flatten", cache_dir=tmp_path, data_key="probe-a")


def _stub(graphs, positions, probe, **kwargs):
    size = sum(len(p) for p in positions.values())
    return np.eye(size)


def test_key_changes_with_weights_pool_data_and_order(graphs, probe, monkeypatch):
    monkeypatch.setattr(sim, "compute_similarity_matrix", _stub)
    two = {n: graphs[n] for n in NAMES[:2]}

    def key(g=two, **kw):
        return zoo_similarity(g, probe, cache_dir=None, **{"data_key": "d", **kw}).key

    base = key()
    assert key() == base
    assert key(pool="flatten") != base
    assert key(unbiased=True) != base
    assert key(data_key="other") != base
    assert key(g=dict(reversed(list(two.items())))) != base
    fresh = _trace(load_zoo_model("vgg_s"))
    assert key(g={"resnet_s": graphs["resnet_s"], "vgg_s": fresh}) == base
    with torch.no_grad():
        fresh.get_parameter("features.0.weight")[0, 0, 0, 0] += 1e-3
    assert key(g={"resnet_s": graphs["resnet_s"], "vgg_s": fresh}) != base


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_cache_is_recomputed(graphs, probe, reference, tmp_path, caplog, monkeypatch, damage):
    zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        middle = len(data) // 2  # inside the matrix array
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="zoocompiler.pipelines.zoo.similarity"):
        again = zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    assert any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    np.testing.assert_array_equal(again.matrix, reference.matrix)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(sim, "compute_similarity_matrix", _fail)  # the rewritten file is intact
    np.testing.assert_array_equal(
        zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a").matrix, reference.matrix
    )


def test_cache_with_tampered_content_hash_is_recomputed(graphs, probe, reference, tmp_path, caplog):
    zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    (path,) = tmp_path.iterdir()
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["matrix"] = arrays["matrix"] * 0.5  # a well-formed file whose content no longer matches its hash
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with caplog.at_level(logging.WARNING, logger="zoocompiler.pipelines.zoo.similarity"):
        again = zoo_similarity(graphs, probe, cache_dir=tmp_path, data_key="probe-a")
    assert any("content hash" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.matrix, reference.matrix)


# --- probe and weights hash -----------------------------------------------------------------------------------------


def test_probe_batch(split):
    probe = probe_batch(split, fraction=0.05, minimum=128, seed=0)
    assert probe.shape == (round(0.05 * len(split)), 1, 28, 28)
    assert torch.equal(probe, probe_batch(split, seed=0))
    assert not torch.equal(probe, probe_batch(split, seed=1))
    assert probe_batch(split, fraction=0.001, minimum=64).shape[0] == 64
    # rows are distinct samples of the split, in split order, class counts proportional (±1)
    rows = {hashlib.sha1(r.numpy().tobytes()).hexdigest(): i for i, r in enumerate(split.x)}
    index = [rows[hashlib.sha1(r.numpy().tobytes()).hexdigest()] for r in probe]
    assert index == sorted(set(index))
    counts = np.bincount(split.y[index].numpy(), minlength=10)
    share = np.bincount(split.y.numpy(), minlength=10) * len(index) / len(split)
    assert np.all(np.abs(counts - share) <= 1)
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"minimum": 0}):
        with pytest.raises(ZooError, match="probe"):
            probe_batch(split, **bad)


def test_weights_hash():
    a, b = load_zoo_model("vgg_s"), load_zoo_model("vgg_s")
    assert weights_hash(a) == weights_hash(b) == weights_hash(_trace(b))  # the traced graph holds the same weights
    with torch.no_grad():
        b.features[0].bias[0] += 1e-6
    assert weights_hash(a) != weights_hash(b)
    assert weights_hash(a) != weights_hash(copy.deepcopy(a).double())  # dtype is part of the hash
    assert weights_hash(a) == weights_hash(load_zoo_model("vgg_s"))


def test_probe_data_key(probe):
    key = probe_data_key(probe, "mnist5k:train")
    assert key == probe_data_key(probe.clone(), "mnist5k:train")
    assert key != probe_data_key(probe, "digits:train")
    assert key != probe_data_key(probe[:-1], "mnist5k:train")
    changed = probe.clone()
    changed[0, 0, 0, 0] += 1.0
    assert key != probe_data_key(changed, "mnist5k:train")
