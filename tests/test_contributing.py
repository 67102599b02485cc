"""docs/contributing.md stays true: every Python block of the page runs, section by section."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def _sections() -> dict[str, str]:
    """``{"Add a pass": "<the section's python code>", ...}`` for every ``##`` section with code."""
    out: dict[str, str] = {}
    for part in re.split(r"^## ", PAGE.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        code = "\n".join(re.findall(r"```python\n(.*?)```", body, flags=re.S))
        if code:
            out[title.strip()] = code
    return out


SECTIONS = _sections()


def test_the_page_has_the_four_recipes():
    assert {"Add a pass", "Add a unit rule", "Add a pipeline", "Add a CLI command"} <= set(SECTIONS)


@pytest.mark.parametrize("title", ["Add a pass", "Add a unit rule", "Add a pipeline"])
def test_example_runs(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("contributing." + title.lower().replace(" ", "_"))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(SECTIONS[title], f"{PAGE.name}: {title}", "exec"), module.__dict__)


def test_cli_command_example_registers_and_runs(monkeypatch, capsys):
    import zoocompiler.cli as cli

    module = types.ModuleType("contributing.hello_command")  # a dotted name: imported as is
    exec(compile(SECTIONS["Add a CLI command"], f"{PAGE.name}: Add a CLI command", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, module.__name__))
    assert cli.main(["hello", "--times", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"greetings": ["hello", "hello"]}
    assert cli.main(["hello", "--times", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --times must be >= 1") and err.count("\n") == 1
