"""Elastic runtime: the T/2 rate rule, manifests, running per-rate ONNX models, cascade ranking.

The per-rate models are small torch MLPs whose hidden width is proportional to the rate, exported
to ONNX here. The cascade uses "scorer" models that output one exact integer score per item
(integer inputs, integer weights), so every keep and ranking is checked against plain Python.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from zoocompiler.core.errors import BudgetError, ExportError, InputShapeError, ZooError
from zoocompiler.exports import available_providers, export_onnx
from zoocompiler.exports.elastic import (
    MANIFEST_FORMAT,
    ElasticModel,
    LatencyBudgetError,
    UnknownRateError,
    cascade_rank,
    max_softmax_score,
    read_manifest,
    write_manifest,
)

FEATURES = 8
CLASSES = 5
RATES = (0.25, 0.5, 1.0)
FULL_WIDTH = 16


def mlp(rate: float, seed: int) -> nn.Module:
    """An MLP whose hidden width is rate · FULL_WIDTH."""
    torch.manual_seed(seed)
    width = max(1, round(rate * FULL_WIDTH))
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, CLASSES)).eval()


def export(model: nn.Module, path: Path, dynamic_batch: bool = True, batch: int = 4) -> Path:
    export_onnx(model, torch.randn(batch, FEATURES), path, exporters=("torchscript",), dynamic_batch=dynamic_batch)
    return path


def scorer(weights: list[int]) -> nn.Module:
    """A linear model with one output: the exact integer score x · weights for integer-valued x."""
    model = nn.Linear(FEATURES, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights], dtype=torch.float32))
    return model.eval()


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory) -> Path:
    """A directory with rate_<r>.onnx for each of RATES (``mlp(r, seed=index of r)``)."""
    root = tmp_path_factory.mktemp("elastic_mlps")
    for i, r in enumerate(RATES):
        export(mlp(r, seed=i), root / f"rate_{r:.3f}.onnx")
    return root


@pytest.fixture(scope="module")
def mlp_paths(mlp_dir) -> dict[float, Path]:
    return {r: mlp_dir / f"rate_{r:.3f}.onnx" for r in RATES}


@pytest.fixture
def elastic(mlp_paths) -> ElasticModel:
    return ElasticModel(mlp_paths)


SCORER_WEIGHTS = {0.25: [1, 0, 0, 0, 0, 0, 0, 0], 0.5: [1, 2, 0, 0, 0, 0, 0, 0], 1.0: [0, 1, 0, 0, 3, 0, -1, 0]}


@pytest.fixture(scope="module")
def scorer_paths(tmp_path_factory) -> dict[float, Path]:
    root = tmp_path_factory.mktemp("elastic_scorers")
    return {r: export(scorer(w), root / f"scorer_{r:.3f}.onnx") for r, w in SCORER_WEIGHTS.items()}


@pytest.fixture
def scorer_model(scorer_paths) -> ElasticModel:
    return ElasticModel(scorer_paths)


def integer_items(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-20, 21, size=(n, FEATURES)).astype(np.float32)


# -- construction and lookup -----------------------------------------------------------------------


def test_rates_are_sorted_and_sessions_found_within_tolerance(mlp_paths):
    model = ElasticModel({1.0: mlp_paths[1.0], 0.25: mlp_paths[0.25], 0.5: mlp_paths[0.5]})
    assert model.rates == [0.25, 0.5, 1.0]
    assert model.session(0.5 + 1e-12) is model.session(0.5)
    assert model.session(0.5) is not model.session(1.0)
    assert model.input_shape[1] == FEATURES and model.input_dtype == np.float32
    with pytest.raises(UnknownRateError, match=r"0\.3.*use one of: 0\.25, 0\.5, 1"):
        model.session(0.3)


def test_construction_errors(mlp_paths, tmp_path):
    with pytest.raises(ExportError, match="not found"):
        ElasticModel({0.5: tmp_path / "missing.onnx"})
    with pytest.raises(ExportError, match="no slice-rate models"):
        ElasticModel({})
    with pytest.raises(ExportError, match="given twice"):
        ElasticModel({0.5: mlp_paths[0.5], 0.5 + 1e-12: mlp_paths[1.0]})
    for bad in (0.0, 1.5, -0.25):
        with pytest.raises(ZooError, match=r"outside \(0, 1\]"):
            ElasticModel({bad: mlp_paths[0.5]})
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(ExportError, match="cannot load the rate-0.5 model"):
        ElasticModel({0.5: garbage})


def test_models_with_different_inputs_are_rejected(mlp_paths, tmp_path):
    other = nn.Sequential(nn.Linear(FEATURES + 1, 3)).eval()
    export_onnx(other, torch.randn(2, FEATURES + 1), tmp_path / "other.onnx", exporters=("torchscript",))
    with pytest.raises(ExportError, match=r"rate 1 takes tensor\(float\) \['batch', 9\].*same input shape"):
        ElasticModel({0.5: mlp_paths[0.5], 1.0: tmp_path / "other.onnx"})


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="this build has CUDA")
def test_unavailable_gpu_provider_names_the_extra(mlp_paths):
    with pytest.raises(ZooError, match=r"zoocompiler\[gpu\]"):
        ElasticModel(mlp_paths, providers=["CUDAExecutionProvider"])


# -- the rate rule -----------------------------------------------------------------------------------


def test_choose_rate_takes_the_largest_rate_within_half_the_budget(elastic):
    t = {0.25: 2.0**-10, 0.5: 2.0**-8, 1.0: 2.0**-6}  # exact in binary: n·t == T/2 is an exact tie
    elastic.per_sample = t
    n = 16
    assert elastic.choose_rate(n, 2 * n * t[1.0]) == 1.0  # n·t(1) == T/2 exactly: allowed
    assert elastic.choose_rate(n, math.nextafter(2 * n * t[1.0], 0)) == 0.5
    assert elastic.choose_rate(n, 2 * n * t[0.5]) == 0.5
    assert elastic.choose_rate(n, 2 * n * t[0.5] * 0.999) == 0.25
    assert elastic.choose_rate(n, 2 * n * t[0.25]) == 0.25
    assert elastic.choose_rate(1, 10.0) == 1.0
    assert elastic.choose_rate(n, math.inf) == 1.0


def test_choose_rate_boundary_survives_decimal_rounding(elastic):
    elastic.per_sample = {0.25: 0.001, 0.5: 0.004, 1.0: 0.016}
    assert elastic.choose_rate(10, 0.08) == 0.5  # 10 · 0.004 == 0.08 / 2, in decimal
    assert elastic.choose_rate(10, 0.0799) == 0.25
    assert elastic.choose_rate(10, 0.32) == 1.0
    assert elastic.choose_rate(3, 0.006) == 0.25


def test_choose_rate_does_not_assume_monotone_times(elastic):
    elastic.per_sample = {0.25: 0.002, 0.5: 0.001, 1.0: 0.01}
    assert elastic.choose_rate(10, 0.03) == 0.5  # 0.25 does not fit (0.02 > 0.015), 0.5 does


def test_infeasible_budget_names_the_smallest_budget_that_works(elastic):
    elastic.per_sample = {0.25: 0.001, 0.5: 0.004, 1.0: 0.016}
    with pytest.raises(LatencyBudgetError) as info:
        elastic.choose_rate(100, 0.1)
    err = info.value
    assert isinstance(err, BudgetError)
    assert "at least 0.2 s for 100 samples" in str(err)
    assert "at most 50 samples per batch" in str(err)
    assert err.needed_s == pytest.approx(0.2, rel=1e-12)
    assert err.max_samples == 50
    assert elastic.choose_rate(100, 0.2) == 0.25
    assert elastic.choose_rate(50, 0.1) == 0.25


def test_stated_budget_is_rounded_up_and_feasible(elastic):
    elastic.per_sample = {0.25: 0.0012345678, 0.5: 0.01, 1.0: 0.1}
    with pytest.raises(LatencyBudgetError, match=r"at least 0\.01729 s for 7 samples") as info:
        elastic.choose_rate(7, 0.01)
    stated = 0.01729
    assert info.value.needed_s <= stated < info.value.needed_s * 1.001
    assert elastic.choose_rate(7, stated) == 0.25
    with pytest.raises(LatencyBudgetError) as tiny:
        elastic.choose_rate(1, 1e-9)
    assert tiny.value.max_samples == 0 and "per batch" not in str(tiny.value)


@pytest.mark.parametrize(
    "n, budget", [(0, 1.0), (-3, 1.0), (2.5, 1.0), (True, 1.0), (4, 0.0), (4, -1.0), (4, math.nan)]
)
def test_choose_rate_rejects_bad_arguments(elastic, n, budget):
    elastic.per_sample = {0.25: 0.001, 0.5: 0.002, 1.0: 0.004}
    with pytest.raises(ZooError):
        elastic.choose_rate(n, budget)


def test_choose_rate_needs_per_sample_times(elastic):
    assert elastic.per_sample is None
    with pytest.raises(ZooError, match=r"unknown.*measure\(\)"):
        elastic.choose_rate(4, 1.0)


def test_per_sample_setter_validates(elastic):
    with pytest.raises(ZooError, match="no per-sample time for rates 1"):
        elastic.per_sample = {0.25: 0.001, 0.5: 0.002}
    with pytest.raises(UnknownRateError):
        elastic.per_sample = {0.25: 0.001, 0.5: 0.002, 1.0: 0.004, 0.75: 0.003}
    with pytest.raises(ZooError, match="not a positive number"):
        elastic.per_sample = {0.25: 0.0, 0.5: 0.002, 1.0: 0.004}
    elastic.per_sample = {0.25 + 1e-12: 0.001, 0.5: 0.002, 1.0: 0.004}
    assert elastic.per_sample == {0.25: 0.001, 0.5: 0.002, 1.0: 0.004}
    assert elastic.predicted_seconds(10, 0.5) == pytest.approx(0.02)


def test_measure_stores_positive_per_sample_times(elastic):
    times = elastic.measure(batch=4, repeats=3, warmup=1)
    assert sorted(times) == list(RATES)
    assert all(math.isfinite(t) and t > 0 for t in times.values())
    assert elastic.per_sample == times
    assert elastic.choose_rate(1, 2 * times[1.0] * 1.0001) == 1.0


def test_measure_rejects_a_batch_the_models_cannot_take(tmp_path):
    fixed = export(mlp(1.0, seed=0), tmp_path / "fixed.onnx", dynamic_batch=False, batch=2)
    model = ElasticModel({1.0: fixed})
    with pytest.raises(InputShapeError, match="fixed batch of 2.*pass batch=2"):
        model.measure(batch=32)
    assert model.measure(batch=2, repeats=2, warmup=0)[1.0] > 0


# -- running ---------------------------------------------------------------------------------------------


def test_run_outputs_equal_the_chosen_rate_session(elastic, mlp_paths):
    elastic.per_sample = {0.25: 0.001, 0.5: 0.004, 1.0: 0.016}
    x = np.random.default_rng(1).standard_normal((10, FEATURES)).astype(np.float32)
    result = elastic.run(x, budget_s=0.08)
    assert result.rate == 0.5
    assert result.predicted_s == pytest.approx(0.04)
    assert result.seconds > 0
    session_out = elastic.session(0.5).run(None, {"input": x})[0]
    np.testing.assert_array_equal(result.outputs, session_out)
    plain = ort.InferenceSession(str(mlp_paths[0.5]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(result.outputs, plain, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch_out = mlp(0.5, seed=1)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.outputs, torch_out, rtol=0, atol=1e-5)
    other = elastic.session(1.0).run(None, {"input": x})[0]
    assert np.abs(result.outputs - other).max() > 1e-3  # the rates really are different models


def test_run_with_a_fixed_rate_or_none(elastic):
    x = np.random.default_rng(2).standard_normal((3, FEATURES)).astype(np.float32)
    fixed = elastic.run(x, rate=0.25)
    assert fixed.rate == 0.25 and fixed.predicted_s is None
    np.testing.assert_array_equal(fixed.outputs, elastic.session(0.25).run(None, {"input": x})[0])
    full = elastic.run(x)
    assert full.rate == 1.0
    np.testing.assert_array_equal(full.outputs, elastic.session(1.0).run(None, {"input": x})[0])
    with pytest.raises(ZooError, match="both budget_s and rate"):
        elastic.run(x, budget_s=1.0, rate=0.5)
    with pytest.raises(UnknownRateError):
        elastic.run(x, rate=0.3)


def test_run_raises_the_budget_error_for_a_batch_too_large(elastic):
    elastic.per_sample = {0.25: 0.001, 0.5: 0.004, 1.0: 0.016}
    x = np.zeros((100, FEATURES), dtype=np.float32)
    with pytest.raises(LatencyBudgetError, match="at least 0.2 s for 100 samples"):
        elastic.run(x, budget_s=0.1)


@pytest.mark.parametrize(
    "x, pattern",
    [
        (np.zeros((4, FEATURES), dtype=np.float64), r"dtype mismatch: expected float32 \['batch', 8\], got float64"),
        (
            np.zeros((4, FEATURES + 1), dtype=np.float32),
            r"shape mismatch: expected float32 \['batch', 8\], got.* \[4, 9\]",
        ),
        (np.zeros((4, 2, FEATURES), dtype=np.float32), r"shape mismatch: .*got float32 \[4, 2, 8\]"),
        (np.zeros((0, FEATURES), dtype=np.float32), r"empty batch"),
        ([[0.0] * FEATURES], r"expected a numpy array"),
    ],
)
def test_run_rejects_inputs_the_models_do_not_take(elastic, x, pattern):
    with pytest.raises(InputShapeError, match=pattern):
        elastic.run(x, rate=1.0)


# -- manifests ----------------------------------------------------------------------------------------------


def manifest_entries(with_times: bool = True) -> list[dict]:
    entries = []
    for r in RATES:
        entry = {"rate": r, "onnx": f"rate_{r:.3f}.onnx", "params": int(1000 * r), "macs": int(4000 * r * r)}
        if with_times:
            entry |= {"latency_ms": 32 * r * r, "per_sample_ms": r * r, "accuracy": 0.5 + 0.4 * r}
        entries.append(entry)
    return entries


def test_manifest_round_trip_with_relative_paths(mlp_dir, tmp_path):
    src = tmp_path / "slices"
    shutil.copytree(mlp_dir, src)
    written = write_manifest(src, manifest_entries()[::-1], extra={"model": "mlp", "groups": 4})
    doc = json.loads(written.read_text())
    assert doc["format"] == MANIFEST_FORMAT and doc["model"] == "mlp"
    assert [e["rate"] for e in doc["rates"]] == list(RATES)
    moved = tmp_path / "elsewhere" / "slices"
    shutil.move(src, moved)  # relative paths: the directory can move
    model = ElasticModel.from_manifest(moved)
    assert model.rates == list(RATES)
    assert model.paths[0.5] == moved / "rate_0.500.onnx"
    assert model.per_sample == {r: r * r / 1e3 for r in RATES}
    assert model.metadata[0.5]["accuracy"] == pytest.approx(0.7) and model.metadata[1.0]["macs"] == 4000
    assert model.choose_rate(10, 2 * 10 * 0.25 / 1e3) == 0.5
    x = np.ones((2, FEATURES), dtype=np.float32)
    np.testing.assert_array_equal(
        model.run(x, rate=0.25).outputs, ElasticModel({0.25: moved / "rate_0.250.onnx"}).run(x).outputs
    )


def test_manifest_without_times_is_measured(mlp_dir, tmp_path):
    root = tmp_path / "slices"
    shutil.copytree(mlp_dir, root)
    write_manifest(root, manifest_entries(with_times=False))
    model = ElasticModel.from_manifest(root, batch=4, repeats=2)
    assert sorted(model.per_sample) == list(RATES) and all(t > 0 for t in model.per_sample.values())
    write_manifest(root, manifest_entries(with_times=True))
    remeasured = ElasticModel.from_manifest(root, measure=True, batch=4, repeats=2)
    assert remeasured.per_sample != {r: r * r / 1e3 for r in RATES}


def write_raw_manifest(root: Path, doc: object) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize(
    "doc, pattern",
    [
        ("{not json", "is not valid JSON"),
        ({"format": "other/1", "rates": []}, 'format must be .*, found "other/1"'),
        ([1, 2], r"\(top level\) must be an object, found a list"),
        ({"format": MANIFEST_FORMAT, "rates": []}, "non-empty list"),
        ({"format": MANIFEST_FORMAT, "rates": [{"rate": 0.5}]}, r"rates\[0\]\.onnx must be a string, missing"),
        (
            {"format": MANIFEST_FORMAT, "rates": [{"rate": "half", "onnx": "a.onnx"}]},
            r'rates\[0\]\.rate must be a number, found "half"',
        ),
        ({"format": MANIFEST_FORMAT, "rates": [{"rate": 1.5, "onnx": "a.onnx"}]}, r"outside \(0, 1\]"),
    ],
)
def test_malformed_manifests_raise_export_errors(tmp_path, doc, pattern):
    write_raw_manifest(tmp_path, doc)
    with pytest.raises(ExportError, match=pattern):
        ElasticModel.from_manifest(tmp_path)


def test_manifest_missing_or_naming_a_missing_file(mlp_dir, tmp_path):
    with pytest.raises(ExportError, match="no manifest.json in"):
        ElasticModel.from_manifest(tmp_path / "nowhere")
    write_raw_manifest(tmp_path, {"format": MANIFEST_FORMAT, "rates": [{"rate": 0.5, "onnx": "gone.onnx"}]})
    assert read_manifest(tmp_path) == [{"rate": 0.5, "onnx": "gone.onnx"}]
    with pytest.raises(ExportError, match="rate 0.5 not found: .*gone.onnx"):
        ElasticModel.from_manifest(tmp_path)
    with pytest.raises(ExportError, match="gone.onnx not found"):
        write_manifest(tmp_path, [{"rate": 0.5, "onnx": "gone.onnx"}])
    shutil.copy(mlp_dir / "rate_0.500.onnx", tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="reserved"):
        write_manifest(tmp_path, [{"rate": 0.5, "onnx": "a.onnx"}], extra={"format": "x"})
    assert json.loads((tmp_path / "manifest.json").read_text())["rates"][0]["onnx"] == "gone.onnx"  # untouched


# -- cascade ranking -----------------------------------------------------------------------------------------


def expected_cascade(items: np.ndarray, stages: list[tuple[float, int]]) -> tuple[list[int], list[int]]:
    """Survivors of each stage and the final ranking, computed in plain Python from SCORER_WEIGHTS."""
    alive = list(range(len(items)))
    kept_counts = []
    for rate, keep in stages:
        score = {i: int(np.dot(items[i].astype(np.int64), SCORER_WEIGHTS[rate])) for i in alive}
        alive = sorted(alive, key=lambda i: (-score[i], i))[:keep]
        kept_counts.append(len(alive))
    return alive, kept_counts


def test_cascade_keeps_exact_counts_and_ranks_by_the_last_stage(scorer_model):
    items = integer_items(200)
    stages = [(0.25, 60), (0.5, 20), (1.0, 5)]
    result = cascade_rank(scorer_model, items, stages)
    ranking, kept = expected_cascade(items, stages)
    assert [(s.rate, s.n_in, s.n_kept) for s in result.stages] == [(0.25, 200, 60), (0.5, 60, 20), (1.0, 20, 5)]
    assert kept == [60, 20, 5]
    assert result.ranking.tolist() == ranking
    last = items[result.ranking].astype(np.int64) @ np.array(SCORER_WEIGHTS[1.0])
    np.testing.assert_array_equal(result.scores, last)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert all(s.seconds > 0 for s in result.stages)
    assert result.predicted_s is None and result.macs is None


def test_cascade_breaks_ties_by_item_index_and_keeps_all_of_a_short_list(scorer_model):
    base = integer_items(6, seed=3)
    items = np.concatenate([base, base])  # every score appears twice: index i and i + 6
    result = cascade_rank(scorer_model, items, [(0.25, 8), (1.0, 8)])
    ranking, _ = expected_cascade(items, [(0.25, 8), (1.0, 8)])
    assert result.ranking.tolist() == ranking
    short = cascade_rank(scorer_model, items[:3], [(0.5, 10), (1.0, 2)])
    assert [(s.n_in, s.n_kept) for s in short.stages] == [(3, 3), (3, 2)]


def test_cascade_batched_equals_unbatched(scorer_model):
    items = integer_items(57, seed=4)
    stages = [(0.25, 30), (1.0, 10)]
    whole = cascade_rank(scorer_model, items, stages)
    batched = cascade_rank(scorer_model, items, stages, batch_size=8)
    np.testing.assert_array_equal(whole.ranking, batched.ranking)
    np.testing.assert_array_equal(whole.scores, batched.scores)


def test_cascade_predicted_cost_against_the_last_rate_on_everything(scorer_model):
    scorer_model.per_sample = {0.25: 0.001, 0.5: 0.004, 1.0: 0.016}
    result = cascade_rank(scorer_model, integer_items(100), [(0.25, 40), (0.5, 10), (1.0, 3)])
    assert [s.predicted_s for s in result.stages] == pytest.approx([0.1, 0.16, 0.16])
    assert result.predicted_s == pytest.approx(0.42)
    assert result.baseline_s == pytest.approx(1.6)
    scorer_model.metadata.update({0.25: {"macs": 10}, 0.5: {"macs": 40}, 1.0: {"macs": 160}})
    costed = cascade_rank(scorer_model, integer_items(100), [(0.25, 40), (1.0, 3)])
    assert costed.macs == 100 * 10 + 40 * 160 and costed.baseline_macs == 100 * 160


def test_cascade_default_score_is_max_softmax_probability(elastic):
    items = np.random.default_rng(5).standard_normal((30, FEATURES)).astype(np.float32)
    result = cascade_rank(elastic, items, [(0.5, 12), (1.0, 4)])
    logits_half = elastic.session(0.5).run(None, {"input": items})[0].astype(np.float64)
    prob_half = torch.softmax(torch.from_numpy(logits_half), dim=1).max(dim=1).values.numpy()
    survivors = sorted(range(30), key=lambda i: (-prob_half[i], i))[:12]
    logits_full = elastic.session(1.0).run(None, {"input": items[survivors]})[0].astype(np.float64)
    prob_full = torch.softmax(torch.from_numpy(logits_full), dim=1).max(dim=1).values.numpy()
    expected = [survivors[j] for j in sorted(range(12), key=lambda j: (-prob_full[j], survivors[j]))[:4]]
    assert result.ranking.tolist() == expected
    np.testing.assert_allclose(result.scores, sorted(prob_full, reverse=True)[:4], rtol=1e-12)
    np.testing.assert_array_equal(max_softmax_score(np.array([[3.0], [1.0]])), [3.0, 1.0])


def test_cascade_custom_score(scorer_model):
    items = integer_items(40, seed=6)
    result = cascade_rank(scorer_model, items, [(0.25, 10), (1.0, 3)], score=lambda out: -out[:, 0])
    alive = sorted(range(40), key=lambda i: (items[i, 0], i))[:10]  # lowest x0 first
    w = np.array(SCORER_WEIGHTS[1.0])
    expected = sorted(alive, key=lambda i: (int(items[i].astype(np.int64) @ w), i))[:3]
    assert result.ranking.tolist() == expected


@pytest.mark.parametrize(
    "stages, pattern",
    [
        ([], "no stages"),
        ([(0.5, 10), (0.25, 5)], "does not increase"),
        ([(0.5, 10), (0.5, 5)], "does not increase"),
        ([(0.25, 5), (0.5, 10)], "passes on only 5"),
        ([(0.25, 0)], "integer >= 1"),
        ([(0.25, 2.5)], "integer >= 1"),
        ([(0.25,)], "not \\(rate, keep\\)"),
        ([(0.3, 5)], "use one of"),
    ],
)
def test_cascade_rejects_bad_stages(scorer_model, stages, pattern):
    with pytest.raises(ZooError, match=pattern):
        cascade_rank(scorer_model, integer_items(20), stages)


def test_cascade_rejects_bad_scores(scorer_model):
    items = integer_items(10)
    with pytest.raises(ZooError, match=r"shape \(1,\) for 10 items"):
        cascade_rank(scorer_model, items, [(0.25, 5)], score=lambda out: out[:1, 0])
    with pytest.raises(ZooError, match="NaN or inf"):
        cascade_rank(scorer_model, items, [(0.25, 5)], score=lambda out: np.full(len(out), np.nan))
