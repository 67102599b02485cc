"""No code from data files: a ``python:`` spec read back from a file is refused unless the caller trusts it.

Every reader that takes a model spec from a file (``slice.json`` via ``load_trained`` / ``export_rates`` /
``zoocompile slice export``, an assembly ``plan.json`` via ``rebuild``) is fed a crafted spec whose
"factory" is ``os.mkdir`` of a marker directory: refused, the marker must not exist, the error is one
line naming the trust flag. With the flag, a legitimate ``python:`` spec (tests/models_for_tests.py) works.
Files whose ``spec`` field is only informative (the demo-zoo manifest, the slice-export manifest) never
resolve it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli

from zoocompiler.core.cache import weights_hash
from zoocompiler.core.errors import UnknownModelError, ZooError
from zoocompiler.exports.elastic import MANIFEST_NAME, ElasticModel
from zoocompiler.pipelines.assemble.pipeline import PLAN_VERSION, rebuild
from zoocompiler.pipelines.slice.export import export_rates
from zoocompiler.pipelines.slice.train import RECORD_FILE, TRAINED_FORMAT, load_trained, read_record
from zoocompiler.pipelines.zoo.members import load_member
from zoocompiler.sources import check_spec_from_file, parse_spec

SPEC = "python:models_for_tests:sliceable_mlp_cnn"  # a legitimate python: factory (the trusted case)
SEEDED = "python:models_for_tests:seeded_mlp_cnn"  # same weights on every build (a plan's hash check)
FAST_TIMING = ("--runs", "3", "--latency-batch", "4")


def evil_spec(marker: Path) -> str:
    """A python: spec whose 'factory' creates ``marker``: importing and calling it is the attack."""
    return f"python:os:mkdir,path={str(marker)!r}"


def assert_refused(err: BaseException, flag: str = "--trust-code") -> None:
    text = str(err)
    assert "\n" not in text and "may not import" in text and flag in text, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A directory trained by ``zoocompile slice train`` from a python: spec (1 epoch of digits)."""
    out = tmp_path_factory.mktemp("trusted") / "sliced"
    code, _, err = run_cli(
        "slice", "train", SPEC, "--data", "digits", "--groups", "4", "--lb", "0.5", "--epochs", "1",
        "--batch-size", "64", "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err  # the command line's own spec is trusted: no flag needed to train
    return out


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A trained-directory look-alike whose slice.json names the marker-creating spec."""
    directory, marker = tmp_path / "crafted", tmp_path / "pwned"
    directory.mkdir()
    record = {
        "format": TRAINED_FORMAT,
        "config": {"spec": evil_spec(marker), "data": "digits", "groups": 4, "lb": 0.5, "rescale": "dense"},
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "fingerprint": "0" * 16,
        "rates": [],
    }
    (directory / RECORD_FILE).write_text(json.dumps(record))
    return directory, marker


# ----------------------------------------------------------------------------- the policy (sources.py)


def test_check_spec_from_file_refuses_code_specs_only():
    for spec in ("torchvision:resnet18,num_classes=10", "timm:resnet18,in_chans=1", "zoo:vgg_s"):
        assert check_spec_from_file(spec, "f.json") == parse_spec(spec)  # data: no flag needed
    for spec in (SPEC, "  PYTHON:os:system,command='touch x'", "Python:os:mkdir,path='x'"):
        with pytest.raises(ZooError) as info:
            check_spec_from_file(spec, "f.json (config.spec)")
        assert_refused(info.value)
        assert str(info.value).startswith("f.json (config.spec) names the code spec")
        assert check_spec_from_file(spec, "f.json", trust_code=True).source == "python"
    with pytest.raises(UnknownModelError, match="not a model spec"):
        check_spec_from_file(["python:os:mkdir"], "f.json")


def test_a_crafted_spec_stays_one_short_line():
    spec = "python:os:system,command='touch a\nrm -rf b" + "x" * 500 + "'"
    with pytest.raises(ZooError) as info:
        check_spec_from_file(spec, "f.json")
    assert_refused(info.value)
    assert len(str(info.value)) < 400


# ----------------------------------------------------------------------------- slice.json


def test_load_trained_refuses_a_crafted_slice_json(crafted):
    directory, marker = crafted
    with pytest.raises(ZooError) as info:
        load_trained(directory)
    assert_refused(info.value)
    assert f"{directory / RECORD_FILE} (config.spec)" in str(info.value)
    assert not marker.exists()


def test_export_rates_refuses_a_crafted_slice_json(crafted, tmp_path):
    directory, marker = crafted
    out = tmp_path / "staging"
    out.mkdir()
    with pytest.raises(ZooError) as info:
        export_rates(directory, out, rates=[1.0])
    assert_refused(info.value)
    assert not marker.exists() and not any(out.iterdir())


def test_cli_slice_export_refuses_a_crafted_slice_json(crafted, tmp_path):
    directory, marker = crafted
    out = tmp_path / "out"
    code, stdout, err = run_cli("slice", "export", directory, "--out", out)
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "--trust-code")
    assert "may not import" in err
    assert not marker.exists()
    assert not out.exists() and not (directory / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted"]  # no staging leftovers either


def test_a_directory_trained_from_a_python_spec_needs_the_flag(trained, tmp_path):
    assert read_record(trained)["config"]["spec"] == SPEC  # reading the record is fine: it imports nothing
    with pytest.raises(ZooError) as info:
        load_trained(trained)
    assert_refused(info.value)
    assert "trained that directory yourself" in str(info.value)
    model, record = load_trained(trained, trust_code=True)
    assert record["config"]["spec"] == SPEC and model.groups == 4


def test_cli_slice_export_with_trust_code(trained, tmp_path):
    out = tmp_path / "rates"
    code, _, err = run_cli("slice", "export", trained, "--rates", "1", *FAST_TIMING, "--out", out)
    assert code == 2
    assert_one_line_error(err, "--trust-code")
    assert not out.exists()
    code, stdout, err = run_cli("slice", "export", trained, "--trust-code", "--rates", "1", *FAST_TIMING,
                                "--out", out, "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["spec"] == SPEC and [r["rate"] for r in doc["rates"]] == [1.0]
    assert (out / MANIFEST_NAME).is_file()


def test_the_export_manifest_spec_is_never_resolved(trained, tmp_path):
    """``manifest.json`` records the spec for people; serving it reads rates and ONNX files only."""
    out, marker = tmp_path / "rates", tmp_path / "pwned"
    out.mkdir()
    doc = export_rates(trained, out, rates=[1.0], latency_batch=4, runs=3, trust_code=True)
    (out / MANIFEST_NAME).write_text(json.dumps({**doc, "spec": evil_spec(marker)}))
    elastic = ElasticModel.from_manifest(out)
    assert elastic.run(torch.zeros(2, 1, 8, 8).numpy(), rate=1.0).outputs.shape == (2, 10)
    assert not marker.exists()


# ----------------------------------------------------------------------------- assembly plan.json


def _plan(specs: list[str]) -> dict:
    """A hand-made two-block plan: model 0's positions 0..3, a stitch, model 1's positions 3..end."""
    members = [load_member(spec, (1, 8, 8)) for spec in specs]
    spans = [(0, 3), (3, len(members[1].positions) - 1)]
    return {
        "version": PLAN_VERSION,
        "zoo": [{"name": m.name, "spec": m.spec, "weights_sha256": weights_hash(m.module)} for m in members],
        "data": "digits",
        "task": {"image_size": None, "train_size": None, "val_fraction": 0.2},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "probe": {"fraction": 0.1, "seed": 0},
        "blocks": [
            {"model": m.name, "stage": stage, "start": start, "end": end,
             "start_node": m.positions[start].node, "end_node": m.positions[end].node}
            for stage, (m, (start, end)) in enumerate(zip(members, spans, strict=True))
        ],
    }  # fmt: skip


def test_rebuild_refuses_a_crafted_plan_and_rebuilds_a_trusted_one(tmp_path):
    plan = _plan([SEEDED, f"{SEEDED},width=8"])
    with pytest.raises(ZooError) as info:
        rebuild(plan)
    assert_refused(info.value, flag="trust_code=True")
    assert "plan.json zoo[0].spec" in str(info.value)
    net = rebuild(plan, trust_code=True)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    marker = tmp_path / "pwned"
    crafted = {**plan, "zoo": [{**plan["zoo"][0], "spec": evil_spec(marker)}, plan["zoo"][1]]}
    with pytest.raises(ZooError) as info:
        rebuild(crafted)
    assert_refused(info.value, flag="trust_code=True")
    assert "os:mkdir" in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the demo-zoo manifest


def test_the_zoo_manifest_spec_is_never_resolved(monkeypatch, tmp_path):
    """The demo zoo's models are recipes (code in zoo.py); the manifest's ``spec`` is documentation only."""
    from zoocompiler import zoo

    marker = tmp_path / "pwned"
    real = zoo.read_manifest
    monkeypatch.setattr(
        zoo, "read_manifest", lambda folder: {k: {**v, "spec": evil_spec(marker)} for k, v in real(folder).items()}
    )
    assert zoo.get_entry("vgg_s").spec == zoo.recipes()["vgg_s"].spec
    assert zoo.load_zoo_model("vgg_s") is not None
    assert not marker.exists()
