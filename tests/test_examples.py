"""Every example runs exactly as examples/README.md says, and learns what it is there to learn."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, clean_env, read_metrics, read_summary, require_modules

require_modules("transformers", "datasets", "tokenizers", "PIL")

EXAMPLES = REPO / "examples"


def readme_commands() -> dict[str, str]:
    """The command of each example in examples/README.md, by the example's directory."""
    readme = (EXAMPLES / "README.md").read_text()
    commands: dict[str, str] = {}
    for command in re.findall(r"```\n(torchrun .+?)\n```", readme):
        example = re.search(r"--config examples/(\w+)/config\.yaml", command)
        assert example is not None, f"a README command that runs no example's config: {command}"
        assert example.group(1) not in commands, f"two commands for {example.group(1)}"
        commands[example.group(1)] = command
    return commands


def test_every_example_has_one_readme_command() -> None:
    examples = {path.parent.name for path in EXAMPLES.glob("*/config.yaml")}
    assert examples == set(readme_commands()) == {"gpt2_chars", "bert_jsonl", "image_folder", "contrastive"}


def _argv(command: str) -> list[str]:
    """The README command as this interpreter runs it (``torchrun`` is ``python -m torch.distributed.run``)."""
    argv = shlex.split(command)
    assert argv[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every README command, run side by side, each in a directory of its own that looks like
    the repository root (its ``examples`` is the repository's): ``(result, run directory)``.

    Without PYTHONPATH: the examples must import from the working directory, as the README says.
    """
    env = clean_env()
    del env["PYTHONPATH"]
    started: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    for example, command in readme_commands().items():
        root = tmp_path_factory.mktemp(example)
        (root / "examples").symlink_to(EXAMPLES, target_is_directory=True)
        started[example] = (subprocess.Popen(_argv(command), cwd=root, env=env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL), root / "runs" / example)
    deadline = time.monotonic() + 240
    results = {}
    try:
        for example, (proc, run_dir) in started.items():
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results[example] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                                 run_dir)
    finally:
        for proc, _ in started.values():  # a timeout: no orphans
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _finished(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]], example: str
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The example's summary and metrics, after checking it exited 0 and completed."""
    result, run_dir = runs[example]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    return summary, read_metrics(run_dir)


def _series(metrics: list[dict[str, Any]], key: str) -> list[float]:
    return [record[key] for record in metrics if key in record]


@pytest.mark.timeout(300)
def test_gpt2_chars_perplexity_falls(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]) -> None:
    summary, metrics = _finished(runs, "gpt2_chars")
    perplexity = _series(metrics, "val/perplexity")
    # A uniform guess over the 384 tokens has perplexity 384; the first validation (step 10)
    # is well below it already, and training goes on lowering it.
    assert len(perplexity) == 4 and perplexity[-1] < 0.85 * perplexity[0] < 0.85 * 384 / 2, perplexity
    assert summary["final"]["val/perplexity"] == perplexity[-1]


@pytest.mark.timeout(300)
def test_bert_jsonl_reaches_90_percent(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]) -> None:
    summary, _ = _finished(runs, "bert_jsonl")
    assert summary["final"]["val/accuracy"] >= 0.9, summary["final"]
    assert summary["final"]["val/samples"] == 400


@pytest.mark.timeout(300)
def test_image_folder_learns_the_shapes(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]) -> None:
    summary, _ = _finished(runs, "image_folder")
    # Four classes: chance is 0.25.
    assert summary["final"]["val/accuracy"] >= 0.6, summary["final"]
    assert summary["final"]["val/samples"] == 100


@pytest.mark.timeout(300)
def test_contrastive_step_fn_learns_to_pair_views(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
                                                   ) -> None:
    _, metrics = _finished(runs, "contrastive")
    loss, pair_accuracy = _series(metrics, "train/loss"), _series(metrics, "train/pair_accuracy")
    assert len(loss) == len(pair_accuracy) >= 5 and len(_series(metrics, "train/align")) == len(loss)
    assert loss[-1] < loss[0] and pair_accuracy[-1] > pair_accuracy[0], (loss, pair_accuracy)
