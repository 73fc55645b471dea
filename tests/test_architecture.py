"""The code keeps the shape docs/architecture.md describes (the import layers themselves are
checked by lint-imports, which CI runs before the tests)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ddp_train"
MAX_CLASS_LINES = 450
MAX_MODULE_LINES = 600


def _python_files(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in root.rglob("*.py"))


def _outside_training() -> list[Path]:
    """Every Python file of the repository but the training package (and these tests)."""
    files = _python_files(PACKAGE, REPO / "benchmarks", REPO / "tests", REPO / "examples")
    return [path for path in files
            if PACKAGE / "training" not in path.parents and path != Path(__file__)]


def test_the_strategy_is_never_compared_by_name_outside_distributed() -> None:
    """Only the strategies know which one runs: the trainer and tools ask the Strategy object."""
    pattern = re.compile(r"strategy\b[^\n]*?(==|!=)\s*[\"']|[\"'](none|ddp|fsdp)[\"']\s*(==|!=)\s*\S*strategy")
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in _python_files(PACKAGE) if PACKAGE / "distributed" not in path.parents
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "\n".join(offenders)


def test_only_the_trainers_public_api_is_used_outside_training() -> None:
    """Benchmarks, tools and tests call public Trainer API only: no private attribute of a
    Trainer is read, called or replaced."""
    pattern = re.compile(r"\bTrainer\._|\btrainer\._|\._optimizer_step\b|\._epoch_batches\b")
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in _outside_training()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "\n".join(offenders)


def test_no_class_or_module_outgrows_a_reading() -> None:
    """Classes under ~450 lines and modules under ~600 in the package."""
    too_long = []
    for path in _python_files(PACKAGE):
        source = path.read_text()
        lines = source.count("\n") + 1
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{path.relative_to(REPO)}: class {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_the_project_cites_no_file_outside_the_repository() -> None:
    """Its documentation lives in the repository (README.md, docs/, the modules' docstrings)."""
    files = _python_files(PACKAGE, REPO / "benchmarks", REPO / "tests") + sorted(REPO.glob("*.md")) + \
        sorted((REPO / "docs").rglob("*.md")) + sorted((REPO / "benchmarks").glob("*.md"))
    offenders = [str(path.relative_to(REPO)) for path in files
                 if path != Path(__file__) and re.search(r"\bDESIGN\b", path.read_text())]
    assert not offenders, offenders


def test_every_file_write_in_the_package_goes_through_the_atomic_helper() -> None:
    """One atomic write (temporary file, fsync, rename, directory fsync) for every file the
    package writes, instead of several with different durability."""
    writes = re.compile(r"\.write_text\(|\.write_bytes\(|os\.replace\(|\.open\([\"']w")
    helper = PACKAGE / "checkpoint" / "atomic.py"
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in _python_files(PACKAGE) if path != helper
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if writes.search(line)]
    assert not offenders, "\n".join(offenders)


def test_the_code_map_names_every_module() -> None:
    """docs/architecture.md has a line for every module of the package."""
    code_map = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(path.relative_to(REPO)) for path in _python_files(PACKAGE)
               if path.name != "__init__.py" and str(path.relative_to(REPO)) not in code_map]
    assert not missing, missing
