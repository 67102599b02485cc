"""Malformed files the tool reads back are one-line user errors naming the file (and the bad field), never
tracebacks: prune plans, slice.json, the slice-export and demo-zoo manifests, assembly plans, the latency
cache, npz datasets and checkpoints."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from safetensors.torch import save_file

from zoocompiler.core.cache import DiskCache
from zoocompiler.core.errors import CheckpointError, DataError, ExportError, PassError, ZooError
from zoocompiler.core.schema import NUMBER, ListOf, MapOf, OneOf, Where, check, load_json
from zoocompiler.data import load_dataset
from zoocompiler.exports.elastic import MANIFEST_FORMAT
from zoocompiler.exports.elastic import read_manifest as read_slice_manifest
from zoocompiler.passes.analysis.plans import Plan
from zoocompiler.pipelines.assemble.pipeline import read_plan, rebuild
from zoocompiler.pipelines.slice.train import RECORD_FILE, TRAINED_FORMAT, read_record
from zoocompiler.sources import read_state_dict
from zoocompiler.zoo import read_manifest as read_zoo_manifest

NOT_UTF8 = b'{"keep": {"a": [0]}, "meta": {"note": "\xff\xfe"}}'


def one_line(err: BaseException, *fragments: str) -> str:
    text = str(err)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def _err(*argv: object) -> tuple[int, str]:
    code, _, err = run_cli(*argv)
    return code, err


# ----------------------------------------------------------------------------- the checker itself


def test_checker_names_the_json_path_and_what_was_expected():
    schema = {"format": OneOf(("f/1",)), "rates": ListOf({"rate": NUMBER, "onnx": str}, 1), "m?": MapOf(int),
              "n?": Where(int, lambda n: n > 0, "a positive integer")}
    good = {"format": "f/1", "rates": [{"rate": 0.5, "onnx": "a"}]}
    assert check(good, schema, "x.json") is good
    cases = [
        ({**good, "format": "g/2"}, 'format must be "f/1", found "g/2"'),
        ({"format": "f/1"}, "rates must be a non-empty list, missing"),
        ({**good, "rates": []}, "rates must be a non-empty list, found a list"),
        ({**good, "rates": [{"rate": True, "onnx": "a"}]}, "rates[0].rate must be a number, found true"),
        ({**good, "rates": [{"rate": 1}]}, "rates[0].onnx must be a string, missing"),
        ({**good, "m": {"k": "v"}}, 'm["k"] must be an integer, found "v"'),
        ({**good, "n": 0}, "n must be a positive integer, found 0"),
        ([1], "(top level) must be an object, found a list"),
    ]
    for doc, message in cases:
        with pytest.raises(ZooError) as info:
            check(doc, schema, "x.json", what="thing")
        one_line(info.value, "thing x.json is malformed: ", message)


def test_load_json_refuses_non_utf8_invalid_json_and_directories(tmp_path):
    (tmp_path / "bytes.json").write_bytes(NOT_UTF8)
    (tmp_path / "broken.json").write_text("{")
    for name, message in (("bytes.json", "is not UTF-8"), ("broken.json", "is not valid JSON"),
                          ("missing.json", "does not exist"), ("", "is a directory")):
        with pytest.raises(DataError) as info:
            load_json(tmp_path / name, error=DataError)
        one_line(info.value, str(tmp_path / name), message)


# ----------------------------------------------------------------------------- prune plans


@pytest.mark.parametrize(
    "content, message",
    [
        (NOT_UTF8, "is not UTF-8 text"),
        (b'{"keep": {"a": [0]}, "meta": []}', "meta must be an object, found a list"),
        (b'{"keep": {"a": [0]}, "meta": "x"}', 'meta must be an object, found "x"'),
        (b"{}", "is empty"),
        (b'{"keep": {}, "producer_keep": {}}', "is empty"),
        (b'{"keep": {"a": [0.5]}}', 'keep["a"][0] must be an integer, found 0.5'),
        (b'{"format": "other/9", "keep": {"a": [0]}}', 'format must be "zoocompiler.plan/1"'),
        (b"[]", "(top level) must be an object"),
    ],
)
def test_malformed_prune_plans_are_one_line_pass_errors(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PassError) as info:
        Plan.load(path)
    one_line(info.value, str(path), message)


def test_a_plan_directory_is_named_as_such(tmp_path):
    with pytest.raises(PassError) as info:
        Plan.load(tmp_path)
    one_line(info.value, "is a directory")


@pytest.mark.parametrize("content, message", [(NOT_UTF8, "not UTF-8"), (b"{}", "is empty")])
def test_cli_prune_with_a_malformed_plan_exits_2_and_writes_nothing(tmp_path, content, message):
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    plan.write_bytes(content)
    code, err = _err("prune", "torchvision:resnet18", "--input-shape", "3,32,32", "--plan", plan,
                     "--out", out)
    assert code == 2
    assert_one_line_error(err, message)
    assert str(plan) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# ----------------------------------------------------------------------------- slice.json


def _record(**changes) -> dict:
    record = {
        "format": TRAINED_FORMAT,
        "config": {"spec": "timm:resnet10t", "data": "digits", "lb": 0.5, "groups": 4, "rescale": "dense"},
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "fingerprint": "0" * 16,
        "rates": [{"rate": r, "accuracy": 0.5, "trained": r >= 0.5} for r in (0.25, 0.5, 0.75, 1.0)],
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def _write_record(directory, record) -> None:
    directory.mkdir(exist_ok=True)
    text = json.dumps(record) if isinstance(record, dict) else record
    (directory / RECORD_FILE).write_bytes(text if isinstance(text, bytes) else text.encode())


def test_a_valid_record_reads_back(tmp_path):
    _write_record(tmp_path, _record())
    assert read_record(tmp_path) == _record()


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(config=None), "config must be an object, missing"),
        (_record(rates=None), "rates must be a list, missing"),
        (_record(input_shape=None), "input_shape must be a non-empty list, missing"),
        (_record(input_shape="1,8,8"), 'input_shape must be a non-empty list, found "1,8,8"'),
        (_record(rates={"0.5": 1}), "rates must be a list, found an object"),
        (_record(rates=[{"rate": 0.5, "trained": "yes"}]), 'rates[0].trained must be true or false, found "yes"'),
        (_record(config={**_record()["config"], "groups": 4.0}), "config.groups must be an integer >= 1"),
        (_record(config={**_record()["config"], "lb": "0.5"}), 'config.lb must be a rate in (0, 1], found "0.5"'),
        (_record(config={**_record()["config"], "lb": 0.0}), "config.lb must be a rate in (0, 1], found 0"),
        (_record(config={**_record()["config"], "lb": 0.25}), "config.lb 0.25 is below the lowest trained rate (0.5)"),
        (NOT_UTF8, "is not UTF-8 text"),
    ],
)
def test_malformed_slice_records_are_one_line_checkpoint_errors(tmp_path, record, message):
    _write_record(tmp_path, record)
    with pytest.raises(CheckpointError) as info:
        read_record(tmp_path)
    one_line(info.value, str(tmp_path / RECORD_FILE), message)


def test_cli_slice_export_with_a_malformed_record_exits_2_and_writes_nothing(tmp_path):
    trained = tmp_path / "trained"
    _write_record(trained, _record(config={**_record()["config"], "lb": 0.25}))
    code, err = _err("slice", "export", trained, "--out", tmp_path / "export")
    assert code == 2
    assert_one_line_error(err, "below the lowest trained rate")
    assert str(trained / RECORD_FILE) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained"]
    assert sorted(p.name for p in trained.iterdir()) == [RECORD_FILE]


# ----------------------------------------------------------------------------- slice-export manifest


@pytest.mark.parametrize(
    "content, message",
    [
        (NOT_UTF8, "is not UTF-8 text"),
        (json.dumps({"format": MANIFEST_FORMAT, "rates": [{"rate": 0.5, "onnx": 3}]}).encode(),
         "rates[0].onnx must be a string, found 3"),
        (json.dumps({"format": MANIFEST_FORMAT, "rates": {"0.5": "a.onnx"}}).encode(),
         "rates must be a non-empty list, found an object"),
        (json.dumps({"rates": [{"rate": 0.5, "onnx": "a.onnx"}]}).encode(), "format must be"),
    ],
)
def test_malformed_slice_manifests_are_one_line_export_errors(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ExportError) as info:
        read_slice_manifest(tmp_path)
    one_line(info.value, str(tmp_path / "manifest.json"), message)


# ----------------------------------------------------------------------------- demo-zoo manifest


def _zoo_manifest(**model_changes) -> dict:
    model = {"name": "resnet_s", "file": "resnet_s.safetensors", "sha256": "ab" * 32, "test_accuracy": 0.9}
    model.update(model_changes)
    return {"version": 1, "models": [{k: v for k, v in model.items() if v is not None}]}


@pytest.mark.parametrize(
    "content, message",
    [
        (NOT_UTF8, "is not UTF-8 text"),
        (json.dumps(_zoo_manifest(sha256=None)).encode(), "models[0].sha256 must be a string, missing"),
        (json.dumps(_zoo_manifest(test_accuracy="high")).encode(), 'models[0].test_accuracy must be a number'),
        (json.dumps({"version": 2, "models": []}).encode(), "version must be 1, found 2"),
        (json.dumps({"version": 1, "models": {}}).encode(), "models must be a list, found an object"),
    ],
)
def test_malformed_zoo_manifests_are_one_line_checkpoint_errors(tmp_path, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_zoo_manifest(tmp_path)
    one_line(info.value, str(tmp_path / "manifest.json"), message, "zoocompile zoo build --force")


def test_a_valid_zoo_manifest_reads_back(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(_zoo_manifest()))
    assert read_zoo_manifest(tmp_path) == {"resnet_s": _zoo_manifest()["models"][0]}


# ----------------------------------------------------------------------------- assembly plan.json


def _assembly_plan(**changes) -> dict:
    plan = {
        "version": 2,
        "zoo": [{"name": "a", "spec": "zoo:resnet_s", "weights_sha256": "0" * 16}],
        "data": "digits",
        "task": {"image_size": 28, "train_size": None, "val_fraction": 0.2},
        "num_classes": 10,
        "probe": {"fraction": 0.1, "seed": 0},
        "blocks": [{"model": "a", "stage": 0, "start": 0, "end": 2, "start_node": "x", "end_node": "y"}],
    }
    plan.update(changes)
    return {k: v for k, v in plan.items() if v is not None}


@pytest.mark.parametrize(
    "plan, message",
    [
        (_assembly_plan(probe=None), "probe must be an object, missing"),
        (_assembly_plan(probe={"fraction": 2, "seed": 0}), "probe.fraction must be a fraction in (0, 1], found 2"),
        (_assembly_plan(blocks=[{"model": "a"}]), "blocks[0].stage must be an integer >= 0, missing"),
        (_assembly_plan(zoo="zoo:resnet_s"), 'zoo must be a non-empty list, found "zoo:resnet_s"'),
        (_assembly_plan(version=1), "version must be 2, found 1"),
        (_assembly_plan(task={"image_size": 0, "train_size": None, "val_fraction": 0.2}),
         "task.image_size must be null or an integer >= 1, found 0"),
        (_assembly_plan(blocks=[{"model": "b", "stage": 0, "start": 0, "end": 2, "start_node": "x",
                                 "end_node": "y"}]), "blocks[0].model 'b' is not in its zoo"),
    ],
)
def test_malformed_assembly_plans_are_one_line_errors_before_anything_loads(monkeypatch, plan, message):
    monkeypatch.setattr("zoocompiler.pipelines.assemble.pipeline.load_task", _refuse)
    with pytest.raises(ZooError) as info:
        rebuild(plan, source="runs/plan.json")
    one_line(info.value, "runs/plan.json", message)


def _refuse(*args, **kwargs):
    raise AssertionError("loaded data before the plan was checked")


def test_read_plan_names_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ZooError) as info:
        read_plan(path)
    one_line(info.value, str(path), "not UTF-8")
    path.write_text(json.dumps(_assembly_plan(num_classes="10")))
    with pytest.raises(ZooError) as info:
        read_plan(path)
    one_line(info.value, str(path), 'num_classes must be an integer >= 2, found "10"')
    path.write_text(json.dumps(_assembly_plan()))
    assert read_plan(path) == _assembly_plan()


# ----------------------------------------------------------------------------- latency cache


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, "fast"])
def test_a_bad_latency_cache_is_warned_about_and_recomputed(tmp_path, caplog, value):
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps({"good": 1.5, "bad": value}))  # json writes NaN/Infinity
    with caplog.at_level(logging.WARNING, logger="zoocompiler.core.cache"):
        assert DiskCache(tmp_path).read_map("blocks.json", what="latency cache") == {}
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(path) in m and 'bad"]' in m and "measuring again" in m for m in messages), messages


def test_a_good_latency_cache_reads_back(tmp_path):
    (tmp_path / "blocks.json").write_text(json.dumps({"a": 0.0, "b": 2}))
    assert DiskCache(tmp_path).read_map("blocks.json") == {"a": 0.0, "b": 2.0}


# ----------------------------------------------------------------------------- npz datasets


def test_an_npz_path_holding_a_npy_payload_is_a_data_error(tmp_path):
    path = tmp_path / "data.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}", "train")
    one_line(info.value, str(path), "not an .npz archive")


def test_an_npz_path_holding_text_is_a_data_error(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}", "train")
    one_line(info.value, str(path), "not an .npz archive")


# ----------------------------------------------------------------------------- checkpoints


def _safetensors(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) // 2],  # truncated in the data
        lambda b: b[:12],  # truncated in the header
        lambda b: b"\xff" * 8 + b[8:],  # header length corrupted
        lambda b: b[:8] + b"[" + b[9:],  # header JSON corrupted
        lambda b: b"",  # empty
    ],
)
def test_a_truncated_or_corrupted_safetensors_checkpoint_is_one_line(tmp_path, mangle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mangle(_safetensors(tmp_path)))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    one_line(info.value, str(path), "file is corrupted or not a checkpoint")


def test_a_directory_passed_as_a_checkpoint_is_named_as_such(tmp_path):
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(folder)
    text = one_line(info.value, str(folder), "is a directory")
    assert "does not exist" not in text


def test_cli_inspect_with_a_directory_checkpoint_exits_2(tmp_path):
    code, err = _err("inspect", "torchvision:resnet18", "--input-shape", "3,32,32", "--checkpoint", tmp_path)
    assert code == 2
    assert_one_line_error(err, "is a directory")
