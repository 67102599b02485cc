"""Run a benchmark script of ``bench/`` in its ``--quick`` mode, as a user would (a subprocess), or load it as a
module to test its functions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_quick_bench(name: str, tmp_path: Path, timeout: int = 1800) -> dict:
    """``python bench/<name>.py --quick --out tmp_path/<name>.json``: asserts exit 0 and the PNG beside the JSON,
    returns the JSON."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.with_suffix(".png").is_file()
    return json.loads(out.read_text())


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as the module ``bench_<name>``, with ``bench/`` on ``sys.path`` while it loads
    (the scripts import bench/_measured.py as a sibling)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module
