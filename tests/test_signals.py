"""Ctrl-C and SIGTERM leave nothing behind: the staging directory, partial files and temporary directories
are removed, the exit code is 130 / 143 with one line on stderr; leftovers of a SIGKILLed run are removed by
the next run on the same output, and a live run's files are never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zoocompiler.core.atomic import remove_leftovers, staged_dir, write_bytes_atomic
from zoocompiler.core.signals import Interrupted, Terminated, stop_signals_raise

TESTS_DIR = Path(__file__).parent
ROOT = TESTS_DIR.parent


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    out, dead, live = tmp_path / "out", _dead_pid(), os.getpid()
    (tmp_path / f".out.{dead}-0123456789ab.tmp").mkdir()
    (tmp_path / f".out.{dead}-0123456789ab.tmp" / "model.onnx").write_bytes(b"partial")
    (tmp_path / f".out.{live}-0123456789ab.tmp").mkdir()  # a run still going: not ours to remove
    (tmp_path / f".other.{dead}-0123456789ab.tmp").mkdir()  # another target's leftovers stay too
    with staged_dir(out, force=False) as staging:
        (staging / "report.json").write_text("{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".other.{dead}-0123456789ab.tmp", f".out.{live}-0123456789ab.tmp", "out"]
    assert [p.name for p in out.iterdir()] == ["report.json"]


def test_a_moved_aside_previous_output_is_restored(tmp_path):
    """A run killed between moving the old ``out`` aside and renaming its staging must not lose ``out``."""
    dead = _dead_pid()
    old = tmp_path / f".out.{dead}-0123456789ab.old"
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    assert remove_leftovers(tmp_path / "out") == [old]
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous output" and not old.exists()


def test_partial_files_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    partial = tmp_path / f".model.onnx.{dead}-0123456789ab.tmp"
    partial.write_bytes(b"x" * 1000)
    write_bytes_atomic(tmp_path / "model.onnx", b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
@pytest.mark.parametrize(("sig", "kind"), [(signal.SIGTERM, Terminated), (signal.SIGINT, Interrupted)])
def test_stop_signals_raise_and_the_handlers_are_restored(sig, kind):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(kind), stop_signals_raise():
        os.kill(os.getpid(), sig)
        for _ in range(100):  # the handler runs between bytecodes
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert issubclass(Interrupted, KeyboardInterrupt) and Interrupted is not KeyboardInterrupt


def _train_in_subprocess(out: Path) -> subprocess.Popen:
    """``zoocompile slice train`` long enough to be stopped midway (stderr captured)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS_DIR)])}
    argv = ["slice", "train", "zoo:vgg_s", "--from-scratch", "--groups", "4", "--data", "digits",
            "--epochs", "500", "--out", str(out)]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "zoocompiler", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_staging(parent: Path, proc: subprocess.Popen) -> Path:
    for _ in range(1200):  # up to ~2 min of 0.1 s polls (startup imports torch)
        found = [p for p in parent.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
        if found:
            time.sleep(1.0)  # let the run get into its work (data, model, training)
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it staged anything: {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run never created its staging directory")


@pytest.mark.parametrize(
    ("sig", "code", "message"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_stopped_run_leaves_nothing(tmp_path, sig, code, message):
    out = tmp_path / "out"
    proc = _train_in_subprocess(out)
    staging = _wait_for_staging(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == code, err
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not staging.exists() and list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
