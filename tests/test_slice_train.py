"""Slicing training and the trained-directory round trip (pipelines.slice_train / slice_export).

Training runs on ``digits`` with a tiny conv+dense net (python:models_for_tests:sliceable_mlp_cnn); a
directory trained from a ``python:`` spec is rebuilt with ``trust_code=True`` (tests/test_trusted_specs.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.executors import ReversedExecutor

from zoocompiler.core.errors import BudgetError, CheckpointError, DataError, ZooError
from zoocompiler.data import load_dataset
from zoocompiler.exports.elastic import ElasticModel
from zoocompiler.pipelines.slice.export import export_rates, parse_flops
from zoocompiler.pipelines.slice.train import (
    RECORD_FILE,
    WEIGHTS_FILE,
    SliceTrainConfig,
    build_sliceable,
    load_trained,
    read_record,
    train_sliceable,
    train_to_dir,
)
from zoocompiler.solvers.slice_rates import ProgressiveStaticScheduler, make_scheduler, valid_rates
from zoocompiler.training import evaluate

SPEC = "python:models_for_tests:sliceable_mlp_cnn"
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(groups: int = 4, **kw):
    return build_sliceable(SPEC, SHAPE, groups=groups, num_classes=10, **kw)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.gm.state_dict().items()}


def test_training_samples_only_scheduler_rates_and_is_seeded(digits):
    train, _ = digits
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _model()
        seen: list[float] = []
        sched = make_scheduler("normal", valid_rates(4, 0.5))
        train_sliceable(model, train, sched, epochs=1, batch_size=64, progress=False, seed=3, on_rate=seen.append)
        runs.append((seen, _weights(model)))
        assert model.rate == 1.0 and not model.training
    (seen_a, w_a), (seen_b, w_b) = runs
    assert seen_a == seen_b and set(seen_a) <= {0.5, 0.75, 1.0} and len(set(seen_a)) == 3
    assert len(seen_a) == len(train) // 64
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


class _Fixed:
    """A scheduler that always picks one rate."""

    def __init__(self, rate: float):
        self.rates = (rate,)

    def probabilities(self, progress: float) -> np.ndarray:
        return np.ones(1)

    def sample(self, progress: float, rng: np.random.Generator) -> float:
        return self.rates[0]


def test_low_rate_training_only_touches_the_subnet(digits):
    """With every batch at r = 0.25 only the 0.25-subnet's weights (and rate-independent ones) change."""
    train, _ = digits
    model = _model()
    before = _weights(model)
    sched = _Fixed(0.25)
    train_sliceable(model, train, sched, epochs=1, batch_size=128, weight_decay=0.0, progress=False)
    after = _weights(model)
    changed_outside = 0
    for name, inside in model.subnet_masks(0.25).items():
        if inside.all():
            continue
        changed_outside += int((before[name] != after[name])[~inside].sum())
        assert (before[name] != after[name])[inside].any(), name
    assert changed_outside == 0


def test_progressive_static_freezes_the_previous_stage(digits):
    train, _ = digits
    model = _model(groups=2)
    sched = ProgressiveStaticScheduler((0.5, 1.0))
    snapshot: dict[str, torch.Tensor] = {}

    def on_rate(r: float) -> None:
        if r == 1.0 and not snapshot:  # first step of stage 2: the frozen stage-1 weights
            snapshot.update(_weights(model))

    train_sliceable(model, train, sched, epochs=2, batch_size=128, progress=False, on_rate=on_rate)
    after = _weights(model)
    assert snapshot
    moved = 0
    for name, inside in model.subnet_masks(0.5).items():
        assert torch.equal(snapshot[name][inside], after[name][inside]), name
        moved += int((snapshot[name] != after[name]).sum())
    assert moved > 0  # stage 2 trained the rest


def test_views_and_masked_training_take_the_same_steps(digits):
    """A short run on subnet views (the default) and on the masked full-width graph ends with the same weights
    (AdamW, several rates; float order differs, so within 1e-4 of each tensor's scale)."""
    train, _ = digits
    weights = {}
    for execution in ("views", "masked"):
        torch.manual_seed(0)
        model = _model()
        sched = make_scheduler("uniform", valid_rates(4, 0.25))
        train_sliceable(model, train, sched, epochs=1, batch_size=128, progress=False, augment=False,
                        execution=execution)
        assert model.execution == "masked"  # restored after training
        weights[execution] = _weights(model)
    for name, w in weights["masked"].items():
        assert torch.allclose(weights["views"][name], w, atol=1e-4 * max(1.0, w.abs().max().item())), name


def test_sandwich_trains_every_batch_at_one_lb_and_random_rates(digits):
    """Each batch runs 1, lb and two drawn rates (their losses added); with --distill the smaller widths learn from
    the full width's predictions, which changes the weights."""
    train, _ = digits
    seen: list[float] = []
    runs = {}
    for distill in (False, True):
        torch.manual_seed(0)
        model = _model()
        sched = make_scheduler("sandwich", valid_rates(4, 0.25), random=2)
        train_sliceable(model, train, sched, epochs=1, batch_size=128, progress=False, distill=distill,
                        on_rate=seen.append if not distill else None)
        runs[distill] = _weights(model)
    steps = len(train) // 128
    assert len(seen) == 4 * steps
    batches = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert all(b[0] == 1.0 and b[1] == 0.25 and set(b[2:]) <= {0.5, 0.75} for b in batches)
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


def test_training_combinations_that_cannot_work_fail_before_training(digits, tmp_path):
    train, _ = digits
    model = _model()
    before = _weights(model)
    with pytest.raises(ZooError, match="in-place distillation needs the full width"):
        train_sliceable(model, train, make_scheduler("normal", valid_rates(4, 0.5)), epochs=1, distill=True)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    with pytest.raises(ZooError, match="unknown execution 'fast'"):
        train_to_dir(SliceTrainConfig(SPEC, data="digits", execution="fast"), tmp_path)
    with pytest.raises(ZooError, match="in-place distillation"):
        train_to_dir(SliceTrainConfig(SPEC, data="digits", scheduler="normal", distill=True), tmp_path)
    assert not any(tmp_path.iterdir())


def test_slicing_training_beats_conventional_at_half_width(digits):
    """The paper's claim in miniature: after equal training, the 0.5-subnet of a slicing-trained net is far
    better than the 0.5-slice of a conventionally trained one (lb = 1)."""
    train, test = digits
    acc = {}
    for lb in (0.5, 1.0):
        torch.manual_seed(0)
        model = _model()
        train_sliceable(model, train, make_scheduler("normal", valid_rates(4, lb)), epochs=15, batch_size=32,
                        lr=3e-3, augment=False, progress=False)
        acc[lb] = evaluate(model.slice(0.5).module, test)
    assert acc[0.5] > 0.7 and acc[0.5] > acc[1.0] + 0.2, acc


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sliced")
    config = SliceTrainConfig(SPEC, data="digits", lb=0.5, groups=4, epochs=2, batch_size=64, lr=1e-2, augment=False)
    record = train_to_dir(config, out, progress=False)
    return out, record


def test_trained_directory_round_trip(trained_dir, digits):
    out, record = trained_dir
    _, test = digits
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, RECORD_FILE, "accuracy.png"}
    assert read_record(out) == json.loads((out / RECORD_FILE).read_text())
    model, rec = load_trained(out, trust_code=True)
    rows = {r["rate"]: r for r in rec["rates"]}
    assert sorted(rows) == [0.25, 0.5, 0.75, 1.0]
    assert [rows[r]["trained"] for r in sorted(rows)] == [False, True, True, True]
    for r in (0.5, 1.0):
        sliced = model.slice(r)
        assert (sliced.params, sliced.macs) == (rows[r]["params"], rows[r]["macs"])
        assert evaluate(sliced.module, test) == rows[r]["accuracy"]


def test_export_rates_and_serve(trained_dir, tmp_path):
    out, _ = trained_dir
    model, _ = load_trained(out, trust_code=True)
    budget = (model.macs_at(0.75) + model.macs_at(1.0)) / 2
    manifest = export_rates(out, tmp_path, rates=[0.5], flops=[budget], latency_batch=8, runs=5, trust_code=True)
    rows = {r["rate"]: r for r in manifest["rates"]}
    assert sorted(rows) == [0.5, 0.75] and rows[0.75]["budget_macs"] == budget
    assert rows[0.5]["macs"] == model.macs_at(0.5) and all(r["max_abs_diff"] < 1e-4 for r in rows.values())
    elastic = ElasticModel.from_manifest(tmp_path)
    x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
    result = elastic.run(x, rate=0.75)
    model.set_rate(0.75)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.outputs, ref, atol=1e-4, rtol=1e-4)


def test_export_does_not_depend_on_the_executor(trained_dir, tmp_path):
    """Rates exported last-to-first give the same ONNX files, costs and accuracies (latencies are measured)."""

    out, _ = trained_dir
    measured = {"latency_ms", "per_sample_ms"}
    docs = []
    for name, executor in (("local", None), ("reversed", ReversedExecutor())):
        (tmp_path / name).mkdir()
        doc = export_rates(
            out, tmp_path / name, rates=[0.5, 1.0], latency_batch=4, runs=5, executor=executor, trust_code=True
        )
        docs.append([{k: v for k, v in row.items() if k not in measured} for row in doc["rates"]])
        assert [r["rate"] for r in doc["rates"]] == [0.5, 1.0]
    assert docs[0] == docs[1]
    for row in docs[0]:
        assert (tmp_path / "local" / row["onnx"]).read_bytes() == (tmp_path / "reversed" / row["onnx"]).read_bytes()


def test_export_refuses_rates_below_lb_and_tiny_budgets(trained_dir, tmp_path):
    out, _ = trained_dir
    with pytest.raises(ZooError, match="below the lower bound 0.5"):
        export_rates(out, tmp_path, rates=[0.25], trust_code=True)
    with pytest.raises(BudgetError, match="below the smallest slice"):
        export_rates(out, tmp_path, flops=[10], trust_code=True)
    assert not any(tmp_path.iterdir())
    assert parse_flops("10M, 2.5k") == [10e6, 2.5e3]
    with pytest.raises(ZooError):
        parse_flops("ten")


def test_load_trained_rejects_foreign_or_damaged_directories(trained_dir, tmp_path):
    out, record = trained_dir
    with pytest.raises(CheckpointError, match="slice.json"):
        load_trained(tmp_path, trust_code=True)
    (tmp_path / RECORD_FILE).write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    with pytest.raises(CheckpointError, match="another structure"):
        load_trained(tmp_path, trust_code=True)
    (tmp_path / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_trained(tmp_path, trust_code=True)
    (tmp_path / RECORD_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_record(tmp_path)


def test_bad_configs_fail_before_training():
    for kwargs, match in [({"lb": 0.0}, "lower bound"), ({"lb": 1.5}, "lower bound"),
                          ({"scheduler": "cosine"}, "unknown scheduler"), ({"epochs": 0}, "positive")]:
        with pytest.raises(ZooError, match=match):
            SliceTrainConfig(SPEC, **kwargs).check()
    with pytest.raises(DataError, match="num_classes=10"):
        build_sliceable(f"{SPEC},num_classes=3", SHAPE, groups=4, num_classes=10)


def test_build_from_a_local_checkpoint(tmp_path):
    """Trained weights (the pretrained path) come in through a local checkpoint, loaded with weights_only."""
    from models_for_tests import sliceable_mlp_cnn

    torch.manual_seed(5)
    trained = sliceable_mlp_cnn()
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    model = build_sliceable(SPEC, SHAPE, groups=4, checkpoint=str(path), num_classes=10)
    for name in ("0.weight", "1.weight", "3.weight", "8.weight", "10.bias"):
        assert torch.equal(model.gm.get_parameter(name), trained.get_parameter(name)), name
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        build_sliceable(SPEC, SHAPE, groups=4, checkpoint=str(tmp_path / "bad.pt"))


def test_outputs_have_one_file_mode(trained_dir, tmp_path):
    """Every file of a trained directory has the mode any atomic write gets (the umask), weights included."""
    from zoocompiler.core.atomic import write_bytes_atomic

    out, _ = trained_dir
    reference = write_bytes_atomic(tmp_path / "probe.bin", b"x").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: reference for p in out.iterdir()}
