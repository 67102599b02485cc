"""The scaling benchmark of issue 18 (``bench/scale.py``): its smallest run in-process (two local executors, no
Ray) times every stage and finds the same results under both; the projection follows its stated model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers.bench import BENCH, bench_module


def test_smallest_run_times_every_stage_and_agrees(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--quick", "--sizes", "3", "--executors", "local1,local",
         "--probe", "32", "--train-size", "200", "--top", "2", "--restarts", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.with_suffix(".png").is_file()
    doc = json.loads(out.read_text())
    scale = bench_module("scale")
    for run in doc["runs"]:
        zoo = run["zoos"]["3"]
        assert set(zoo["seconds"]) == set(scale.STAGES)
        assert all(v >= 0 for v in zoo["seconds"].values())
        assert {stage: zoo["maps"][stage]["items"] for stage in scale.PER_MEMBER} == dict.fromkeys(scale.PER_MEMBER, 3)
        assert zoo["ilp"]["assemblies"] == 2
    assert [r["driver_threads"] for r in doc["runs"]][0] == 1
    [row] = doc["agreement"]
    assert row["executor"] == "local" and row["size"] == 3
    assert row["similarity_max_abs_diff"] <= 1e-6
    assert row["same_partition"] and row["same_ilp"] and row["same_ranking"] and row["agree"]
    assert [t["met"] for t in doc["targets"]] == [None] * 3  # no ray run: nothing to judge
    assert "skipped" in doc["projection"]


def _zoo(seconds: dict, maps: dict) -> dict:
    return {"seconds": seconds, "maps": maps, "models": 10, "positions": 150}


def test_projection_follows_the_stated_model():
    scale = bench_module("scale")
    stage_bytes = {"fn": 1000, "item": 100, "result": 300}
    sized = {"bytes": stage_bytes, "seal_s": {k: v * 1e-6 for k, v in stage_bytes.items()},  # 1 µs per byte
             "unseal_s": {k: 2 * v * 1e-6 for k, v in stage_bytes.items()}}  # 2 µs per byte
    local_seconds = {"load": 1.0, "cka": 0.5, "partition": 2.0}
    doc = {
        "setup": {"sizes": [10], "projection": {"models": 1000, "nodes": 2, "cores_per_node": 4,
                                                "bandwidth_gbit": 8.0}},
        "seal": {"seal_per_byte_s": 1e-9, "unseal_per_byte_s": 1e-9},
        "runs": [
            {"executor": "local1", "zoos": {"10": _zoo(local_seconds, {"load": {"seconds": 1.0, "items": 10}})}},
            {"executor": "ray2", "overhead": {"noop_per_task_s": 0.002, "per_byte_round_trip_s": 6e-9},
             "zoos": {"10": _zoo({"load": 0.6, "cka": 0.5, "partition": 2.0},
                                 {"load": {"seconds": 0.6, "items": 10, **sized}})}},
        ],
    }
    derived = scale.derive(doc)
    p = derived["projection"]
    rows = {r["stage"]: r for r in p["rows"]}
    gamma = (6e-9 - 2 * (1e-9 + 1e-9)) / 2
    assert p["store_per_byte_s"] == pytest.approx(gamma)
    load = rows["load"]
    worker = 0.1 + 2e-3 + 2e-4 + 3e-4  # c + unseal(fn) + unseal(item) + seal(result)
    driver = 0.002 + 1e-4 + 6e-4 + 400 * gamma  # o + seal(item) + unseal(result) + (i + r)·γ
    network = (1000 * 400 + 2 * 1000) / 1e9  # 8 Gbit/s = 1e9 bytes/s
    assert load["worker_per_task_s"] == pytest.approx(worker)
    assert load["driver_per_task_s"] == pytest.approx(driver)
    assert load["cluster_s"] == pytest.approx(math.ceil(1000 / 8) * worker + 1000 * driver + network)
    assert load["local_s"] == pytest.approx(100.0)
    assert rows["cka"]["local_s"] == pytest.approx(0.5 * 100**2)  # α = 2
    assert rows["cka"]["cluster_s"] == pytest.approx(0.5 * 100**2 / 4)  # BLAS on the driver's 4 cores
    assert rows["partition"]["cluster_s"] == pytest.approx(2.0 * 100)  # α = 1 from one size
    [speedup] = [r for r in derived["speedups"] if r["stage"] == "load" and r["executor"] == "ray2"]
    assert speedup["vs_local1"] == pytest.approx(1.0 / 0.6)
    [load_target] = [t for t in derived["targets"] if t["target"].startswith("load")]
    assert load_target["value"] == pytest.approx(1.0 / 0.6) and load_target["met"] is False
