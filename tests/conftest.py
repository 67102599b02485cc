"""Shared test set-up: deterministic seeds, one torch thread per xdist worker, relaxed hypothesis deadlines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).parent

# Tests build tiny models through the ``python:`` source (e.g. python:models_for_tests:tiny_cnn), and import
# their shared helpers as ``helpers.*`` (tests/helpers/; test modules never import one another).
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# `pytest -n 2` on 2 cores: one intra-op thread per worker avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The first call into a torch op can take far longer than later ones: no per-example deadline.
settings.register_profile("zoocompiler", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("zoocompiler")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models, also outside xdist: on 2 shared cores OpenMP's second
    thread only spins (up to 10× slower). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _shared_architecture_cases_unchanged():
    """The architecture matrix is built once per process and shared (helpers.architectures): at the end of the
    session, fail if a test changed a shared model or graph in place instead of a copy."""
    yield
    from helpers.architectures import shared_cases_changed

    changed = shared_cases_changed()
    assert not changed, f"a test changed shared architecture cases in place (deep-copy them first): {changed}"


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray instance with 2 CPUs for the whole session (started on first use, shut down at the end); yields
    a ``RayExecutor`` on it. Its workers can import the tests' ``python:`` model modules. Skipped where Ray is not
    installed."""
    ray = pytest.importorskip("ray")
    from zoocompiler.pipelines.executors import RayExecutor

    started = not ray.is_initialized()
    if started:
        path = os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield RayExecutor()
    if started:
        ray.shutdown()
