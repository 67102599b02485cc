"""The Ray executor behind ``Executor.map`` (issue 18 groundwork): same results as in-process, items in order,
failures named, a bad executor text or an unreachable cluster refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from zoocompiler.core.errors import ZooError
from zoocompiler.pipelines.base import LocalExecutor
from zoocompiler.pipelines.executors import RayExecutor, parse_executor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for this module's tests, shut down after them."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield RayExecutor()
    ray.shutdown()


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
