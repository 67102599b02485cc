"""The Ray executor behind ``Executor.map`` (issue 18 groundwork): same results as in-process, items in order,
failures named, a bad executor text or an unreachable cluster refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from zoocompiler.core.errors import ZooError
from zoocompiler.pipelines.base import LocalExecutor
from zoocompiler.pipelines.executors import RayExecutor, parse_executor

ray = pytest.importorskip("ray")


def _square_plus(offset: int):
    return lambda x: x * x + offset  # a closure: shipped to the workers by value


def _fails_on(bad: int):
    def check(x: int) -> int:  # nested: shipped by value (workers cannot import this test module)
        if x == bad:
            raise ValueError(f"{bad} is not allowed")
        return x

    return check


def _zoo_error():
    def fail(x: int) -> int:
        raise ZooError(f"item {x} is bad", "fix it")

    return fail


def test_map_keeps_item_order_and_equals_local(local_ray):
    items = list(range(12))[::-1]
    assert local_ray.map(_square_plus(5), items) == LocalExecutor().map(_square_plus(5), items)


def test_a_failing_item_is_named(local_ray):
    with pytest.raises(ZooError, match=r"item 4 of 5 \(3\) failed on a Ray worker: ValueError: 3 is not allowed"):
        local_ray.map(_fails_on(3), range(5))


def test_a_zoo_error_on_a_worker_keeps_its_message(local_ray):
    with pytest.raises(ZooError, match="item 0 is bad — fix it"):
        local_ray.map(_zoo_error(), [0])


def test_similarity_matrix_is_the_same_on_ray(local_ray, tmp_path):
    """The zoo similarity (one Ray task per member) equals the in-process one."""
    from zoocompiler.data import load_dataset
    from zoocompiler.pipelines.zoo.members import load_member
    from zoocompiler.pipelines.zoo.similarity import probe_batch, zoo_similarity

    split = load_dataset("mnist5k", "train")
    probe = probe_batch(split, 0.02, minimum=64)
    members = [load_member(spec, split.input_shape) for spec in ("zoo:resnet_s", "zoo:vgg_s", "zoo:vit_t")]
    graphs = {m.name: m.graph for m in members}
    sims = [zoo_similarity(graphs, probe, cache_dir=None, data_key="test", executor=executor).matrix
            for executor in (LocalExecutor(), local_ray)]
    assert sims[0].shape[0] > 3
    np.testing.assert_allclose(sims[1], sims[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("spark", "unknown --executor 'spark'"),
        ("ray=", "--executor ray= needs an address"),
        ("ray=nohost", "bad Ray address 'nohost'"),
    ],
)
def test_bad_executor_text(text, fragment):
    with pytest.raises(ZooError, match=fragment.replace("(", r"\(")):
        parse_executor(text)


def test_an_unreachable_cluster_is_one_line():
    """Ray itself would retry for minutes and then exit the process; the executor checks the port first."""
    with pytest.raises(ZooError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 \(") as err:
        RayExecutor(address="127.0.0.1:1").connect()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- faults


def _dies(marker_dir: str, bad: int, always: bool):
    def work(x: int) -> int:  # nested: shipped by value
        import os
        import signal
        from pathlib import Path

        marker = Path(marker_dir) / f"{x}.died"
        if x == bad and (always or not marker.exists()):
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-task, as a killed or OOM'd one does
        return x * 10

    return work


def test_a_killed_worker_is_retried_and_the_run_finishes_the_same(local_ray, tmp_path):
    assert local_ray.map(_dies(str(tmp_path), 2, always=False), range(4)) == [0, 10, 20, 30]
    assert (tmp_path / "2.died").exists()  # it did die once


def test_a_task_that_keeps_dying_is_one_line_and_nothing_is_written(local_ray, tmp_path):
    from types import SimpleNamespace

    from zoocompiler.pipelines.base import run_staged

    out = tmp_path / "out"

    def body(staging):
        (staging / "first.txt").write_text("written before the failure")
        return local_ray.map_writing(lambda x, folder: _dies(str(tmp_path), 1, always=True)(x), [0, 1, 2], staging)

    with pytest.raises(ZooError, match=r"item 2 of 3 \(1\): its Ray worker died 3 times") as err:
        run_staged(SimpleNamespace(check=lambda: None), out, False, body)
    assert "\n" not in str(err.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["1.died"]


def test_files_written_on_workers_come_back_to_the_folder(local_ray, tmp_path):
    def write(x: int, folder):
        (folder / "sub").mkdir()
        (folder / "sub" / f"{x}.bin").write_bytes(bytes([x]) * 3)
        return x

    assert local_ray.map_writing(write, [3, 1, 2], tmp_path) == [3, 1, 2]
    assert {p.name: p.read_bytes() for p in (tmp_path / "sub").iterdir()} == {f"{x}.bin": bytes([x]) * 3
                                                                               for x in (1, 2, 3)}


# ----------------------------------------------------------------------------- transport


def test_a_traced_graph_keeps_its_names_and_annotations():
    import torch

    from zoocompiler.pipelines.transport import seal, unseal
    from zoocompiler.pipelines.zoo.members import load_member

    graph = load_member("zoo:vit_t", (1, 28, 28)).graph
    back = unseal(seal(graph), "the graph")
    assert [n.name for n in back.graph.nodes] == [n.name for n in graph.graph.nodes]
    assert all(b.meta["zc"] == n.meta["zc"] for b, n in zip(back.graph.nodes, graph.graph.nodes, strict=True))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), graph(x), rtol=0, atol=0)


def test_a_corrupted_payload_is_refused():
    from dataclasses import replace

    from zoocompiler.pipelines.transport import seal, unseal

    sealed = seal({"rows": [1, 2, 3]})
    assert unseal(sealed, "x") == {"rows": [1, 2, 3]}
    broken = replace(sealed, blob=sealed.blob[:-1] + bytes([sealed.blob[-1] ^ 1]))
    with pytest.raises(ZooError, match="the result of item 1 failed its sha256 check"):
        unseal(broken, "the result of item 1")


def test_a_file_outside_the_folder_is_refused(tmp_path):
    from zoocompiler.pipelines.transport import place_files

    with pytest.raises(ZooError, match="outside the output folder"):
        place_files({"../escape.txt": b"x"}, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- versions and the latency node


def test_workers_with_another_version_are_refused():
    class OtherVersionRay:
        @staticmethod
        def remote(fn):
            return type("Task", (), {"remote": staticmethod(lambda: None)})

        @staticmethod
        def get(_ref):
            return {"zoocompiler": "0.0.1", "torch": "1.0"}

    with pytest.raises(ZooError, match=r"the Ray cluster's workers run .*0\.0\.1.*install the same zoocompiler"):
        RayExecutor._check_versions(OtherVersionRay)


def test_latency_runs_on_the_named_node(local_ray):
    import os

    from ray.util import get_node_ip_address

    pinned = RayExecutor(latency_node=get_node_ip_address())
    total, pid = pinned.at_target(lambda a, b=0: (a + b, os.getpid()), 2, b=3)
    assert total == 5 and pid != os.getpid()  # a task pinned to that node, not the driver
    assert local_ray.at_target(os.getpid) == os.getpid()  # no latency node: the driver itself
    with pytest.raises(ZooError, match=r"--latency-node 10\.255\.255\.1 is not a live node .*\(nodes: "):
        RayExecutor(latency_node="10.255.255.1").connect()


def test_latency_node_needs_a_ray_executor():
    with pytest.raises(ZooError, match="--latency-node needs --executor ray=ADDRESS"):
        parse_executor("local", latency_node="10.0.0.1")
