"""The README's commands are the ones CI runs, and its example output is real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from ddp_train.cli import main


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.+?)\n```", section)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one() -> None:
    setup_and_train, setup_and_test = _quick_start_commands()
    assert "torchrun" in setup_and_train and "--nproc_per_node=2" in setup_and_train
    assert setup_and_test.endswith("lint-imports && python -m pytest")
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup_and_test in ci_lines, "CI must run the README's test command verbatim"


def test_readme_error_example_is_what_the_cli_prints(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    example = re.search(r"\$ python -m ddp_train optim.lrr=0.1\n(.+?)\.\.\.", readme)
    assert example is not None
    assert main(["optim.lrr=0.1"]) == 2
    assert capsys.readouterr().err.startswith(example.group(1))
