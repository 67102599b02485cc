"""Bad command-line options are one-line errors (exit 2), never silent no-ops; `--debug` works anywhere;
help shows every default; a fix never names a flag the command lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_nothing_written, assert_one_line_error, run_cli, subparsers

from zoocompiler import cli
from zoocompiler.core.errors import ZooError
from zoocompiler.solvers.slice_rates import parse_rates

TINY = "python:models_for_tests:tiny_cnn"  # two conv groups of 8 units
TESTS = Path(__file__).resolve().parent


def assert_user_error(argv: list, fragment: str, out_dir: Path | None = None) -> None:
    code, out, err = run_cli(*argv)
    assert (code, out) == (2, ""), err
    assert_one_line_error(err, fragment)
    if out_dir is not None:
        assert_nothing_written(out_dir)


def _never(*_args, **_kwargs):
    raise AssertionError("a bad option reached the pipeline")


# ----------------------------------------------------------------------------- prune: a plan that prunes nothing


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--round-to", "1000"], "--round-to 1000 is not smaller than any prunable group (the largest has 8 units)"),
        (["--round-to", "8"], "--round-to 8 is not smaller than any prunable group"),
        (["--ratio", "0.01"], "--ratio 0.01 removes no unit from any group: the plan prunes nothing"),
    ],
)
def test_prune_plan_that_prunes_nothing(tmp_path, extra, fragment):
    ratio = [] if "--ratio" in extra else ["--ratio", "0.5"]
    out = tmp_path / "pruned"
    assert_user_error(["prune", TINY, *ratio, *extra, "--out", out], fragment, out)


def test_prune_round_to_that_still_prunes_is_fine(tmp_path):
    code, _, err = run_cli("prune", TINY, "--ratio", "0.5", "--round-to", "4", "--out", tmp_path / "p", "--json")
    assert code == 0, err


# ----------------------------------------------------------------------------- slice export: rates on the grid


def test_parse_rates_strict_rejects_off_grid_rates():
    with pytest.raises(ZooError, match=r"slice rate '0\.6' in '0\.6' is not a valid rate .* e\.g\. 0\.5 or 0\.75"):
        parse_rates("0.6", 4, strict=True)
    with pytest.raises(ZooError, match=r"'0\.4' .* e\.g\. 1/3 or 2/3$"):
        parse_rates("0.4", 3, strict=True)
    with pytest.raises(ZooError, match=r"'0\.333' .* e\.g\. 1/3$"):  # typed short of 1/3: only 1/3 is near
        parse_rates("0.333", 3, strict=True)
    with pytest.raises(ZooError, match=r"e\.g\. 0\.5$"):  # only rates >= lb are named
        parse_rates("0.3", 4, lb=0.375, strict=True)
    assert parse_rates("1/3,1", 3, strict=True) == [1 / 3, 1.0]
    assert parse_rates("0.25,0.5,1", 4, strict=True) == [0.25, 0.5, 1.0]
    assert parse_rates("0.6", 4) == [0.5]  # the library default still snaps (internal callers)


@pytest.fixture
def fake_trained(monkeypatch, tmp_path):
    """A ``slice train`` directory on a 1/4 grid (lb 0.375): record reading stubbed, export must not run."""
    directory = tmp_path / "sliced"
    directory.mkdir()
    record = {"config": {"groups": 4, "lb": 0.375, "spec": "zoo:vgg_s"}, "rates": []}
    monkeypatch.setattr("zoocompiler.pipelines.slice.train.read_record", lambda _d: record)
    monkeypatch.setattr("zoocompiler.pipelines.slice.train.record_spec", lambda *_a, **_k: "zoo:vgg_s")
    monkeypatch.setattr("zoocompiler.pipelines.slice.export.export_rates", _never)
    return directory


def test_slice_export_off_grid_rate_is_an_error(fake_trained):
    out = fake_trained.parent / "rates"
    assert_user_error(
        ["slice", "export", fake_trained, "--rates", "0.6", "--out", out],
        "slice rate '0.6' in '0.6' is not a valid rate (multiples of 1/4) — pass a rate on the grid, e.g. 0.5 or 0.75",
        out,
    )
    assert_user_error(["slice", "export", fake_trained, "--rates", "0.5,0.9", "--out", out], "'0.9'", out)


# ----------------------------------------------------------------------------- numeric options below their range


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["assemble", "--budget", "flops=5M", "-K", "0"], "bad -K 0 — pass -K >= 1"),
        (["assemble", "--budget", "flops=5M", "--restarts", "-1"], "bad --restarts -1"),
        (["assemble", "--budget", "flops=5M", "--eps", "-0.5"], "bad --eps -0.5 — pass --eps a number >= 0"),
        (["assemble", "--budget", "flops=5M", "--seed", "-1"], "bad --seed -1"),
        (["assemble", "--budget", "flops=5M", "--top", "-3"], "bad --top -3"),
        (["partition", "--restarts", "0"], "bad --restarts 0"),
        (["partition", "-K", "-2"], "bad -K -2"),
    ],
)
def test_negative_assemble_options(monkeypatch, tmp_path, argv, fragment):
    monkeypatch.setattr("zoocompiler.pipelines.assemble.pipeline.analyse_zoo", _never)
    monkeypatch.setattr("zoocompiler.pipelines.assemble.pipeline.assemble", _never)
    out = tmp_path / "asm"
    assert_user_error([*argv, *(["--out", out] if argv[0] == "assemble" else [])], fragment, out)


def test_negative_slice_train_seed(monkeypatch, tmp_path):
    monkeypatch.setattr("zoocompiler.pipelines.slice.train.train_to_dir", _never)
    out = tmp_path / "sliced"
    assert_user_error(["slice", "train", "zoo:vgg_s", "--seed", "-1", "--out", out], "bad --seed -1", out)


# ----------------------------------------------------------------------------- --debug anywhere


def test_debug_after_the_command():
    code, out, err = run_cli("inspect", "timm:resnet1800", "--debug")
    assert (code, out) == (2, "")
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: unknown timm model")


def test_debug_after_the_command_on_internal_errors(monkeypatch, tmp_path):
    monkeypatch.setattr("zoocompiler.pipelines.slice.export.export_rates", _never)
    monkeypatch.setattr("zoocompiler.pipelines.slice.train.read_record", _never)
    code, _, err = run_cli("slice", "export", tmp_path, "--debug")
    assert code == 1
    assert "Traceback" in err and "rerun with --debug" not in err
    code, _, err = run_cli("slice", "export", tmp_path)
    assert code == 1
    assert err.endswith("(rerun with --debug)\n") and "Traceback" not in err


def test_every_command_accepts_debug():
    parser = cli.build_parser()
    stack = list(subparsers(parser).items())
    while stack:
        name, sub = stack.pop()
        children = subparsers(sub)
        stack += [(f"{name} {child}", p) for child, p in children.items()]
        if not children:
            assert "--debug" in sub.format_help(), name


# ----------------------------------------------------------------------------- help and fixes


def _help(*command: str) -> str:
    parser = cli.build_parser()
    for name in command:
        parser = subparsers(parser)[name]
    return " ".join(parser.format_help().split())


def test_help_shows_zero_defaults():
    assert "--seed N seed for --importance random (default: 0)" in _help("prune")
    assert "--seed N seed for data order and slice rates (default: 0)" in _help("slice", "train")
    assert "(default: 0) (default: 0)" not in _help("slice", "train")
    assert "--seed N seed for probes, restarts, tuning (default: 0)" in _help("assemble")


def test_fixes_name_flags_the_command_has():
    """Every command that takes --checkpoint (whose errors say "pass --allow-pickle") has --allow-pickle."""
    parser = cli.build_parser()
    stack = list(subparsers(parser).items())
    seen = []
    while stack:
        name, sub = stack.pop()
        stack += [(f"{name} {c}", p) for c, p in subparsers(sub).items()]
        options = {s for a in sub._actions for s in a.option_strings}
        if "--checkpoint" in options:
            seen.append(name)
            assert "--allow-pickle" in options, name
    assert "slice train" in seen


def test_slice_train_allow_pickle_reaches_the_model_loader(monkeypatch, tmp_path):
    """``slice train --allow-pickle`` (which the checkpoint error's fix names) reaches ``load_model``."""
    from zoocompiler.cli import slice as cli_slice
    from zoocompiler.pipelines.slice import train as slice_train
    from zoocompiler.pipelines.zoo import trainable

    args = cli.build_parser().parse_args(["slice", "train", "zoo:vgg_s", "--allow-pickle", "--out", str(tmp_path)])
    config = cli_slice.train_config(args)
    assert config.allow_pickle is True
    seen = {}

    def load_model(spec, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(trainable, "load_model", load_model)
    with pytest.raises(_Stop):
        slice_train.build_sliceable("zoo:vgg_s", (1, 28, 28), allow_pickle=config.allow_pickle)
    assert seen["allow_pickle"] is True


class _Stop(Exception):
    """Raised by a stub once it has seen what it needed."""


# ----------------------------------------------------------------------------- the real entry point


def test_real_entry_point_behaves_the_same(tmp_path):
    out = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    argv = ["prune", TINY, "--ratio", "0.5", "--round-to", "1000", "--out", str(out), "--debug"]
    proc = subprocess.run(
        [sys.executable, "-m", "zoocompiler", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --round-to 1000 is not smaller than any")
    assert "Traceback" in proc.stderr  # --debug after the command is honoured
    assert not out.exists()
