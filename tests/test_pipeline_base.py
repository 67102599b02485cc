"""The pipeline base: config checked first, timed stages, all-or-nothing output, one report writer, and
executors that do not change results (in-process, reversed, threaded)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.executors import ReversedExecutor

from zoocompiler.core.errors import ZooError
from zoocompiler.pipelines.base import LocalExecutor, Stages, run_staged, write_report


class ThreadExecutor(LocalExecutor):
    """Runs the items on two threads (results gathered in item order)."""

    def map(self, fn, items):
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(fn, list(items)))


@dataclass
class _Config:
    bad: bool = False

    def check(self) -> None:
        if self.bad:
            raise ZooError("bad option", "pass a good one")


def test_local_executor_runs_in_order():
    seen = []
    assert LocalExecutor().map(lambda x: seen.append(x) or x * x, [3, 1, 2]) == [9, 1, 4]
    assert seen == [3, 1, 2]


def test_stages_time_each_named_stage_and_report_progress():
    said = []
    stages = Stages(said.append)
    with stages("a", "doing a"):
        pass
    with stages("b"):
        pass
    with stages("a"):
        pass
    assert set(stages.timings) == {"a_s", "b_s"}
    assert all(t >= 0 for t in stages.timings.values())
    assert said == ["doing a"]


def test_report_writer_sanitises_values(tmp_path):
    path = write_report(tmp_path, {"n": np.int64(3), "x": np.float32(0.5), "p": Path("a/b"), "t": (1, 2)})
    assert json.loads(path.read_text()) == {"n": 3, "x": 0.5, "p": "a/b", "t": [1, 2]}


def test_bad_config_fails_before_any_work_or_output(tmp_path):
    out, calls = tmp_path / "out", []
    with pytest.raises(ZooError, match="bad option"):
        run_staged(_Config(bad=True), out, False, calls.append)
    assert calls == [] and not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_work_and_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ZooError, match="already exists"):
        run_staged(_Config(), out, False, lambda d: pytest.fail("body ran"))
    result = run_staged(_Config(), out, True, lambda d: (d / "new.txt").write_text("new") and "done")
    assert result == "done" and sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_failing_body_leaves_no_output(tmp_path):
    out = tmp_path / "out"

    def body(staging: Path):
        (staging / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_staged(_Config(), out, False, body)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("executor", [ReversedExecutor(), ThreadExecutor()], ids=["reversed", "threads"])
def test_similarity_matrix_does_not_depend_on_the_executor(executor):
    from zoocompiler.passes.analysis import trace
    from zoocompiler.passes.analysis.activations import assembly_positions
    from zoocompiler.pipelines.zoo.similarity import compute_similarity_matrix
    from zoocompiler.zoo import load_zoo_model

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    graphs = {name: trace(load_zoo_model(name), x) for name in ("resnet_s", "vgg_s")}
    positions = {name: assembly_positions(gm) for name, gm in graphs.items()}
    probe = torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    local = compute_similarity_matrix(graphs, positions, probe, executor=LocalExecutor())
    other = compute_similarity_matrix(graphs, positions, probe, executor=executor)
    np.testing.assert_array_equal(local, other)
