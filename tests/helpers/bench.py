"""Run a benchmark script of ``bench/`` in its ``--quick`` mode, as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
