"""Config fuzzing: generated overrides through the CLI's entry point, in-process, end in exit 0,
or in exit 2 (a config error) or 1 (training failed) with exactly one line on stderr: never
a traceback.

Each example is one to three ``key=value`` overrides: known keys with values of every type
and range (NaN, infinities, huge and negative integers, wrong types, YAML syntax), unknown
and misspelt keys, free-form ``*.args`` entries, and path tricks (``..``, ``/``, a file in
the way, long and non-ASCII names). A config that loads is trained for at most a few steps
of a tiny model in a fresh directory; one that would write outside that directory or be
slow to run (``train.compile``, many loader workers) is checked with ``--print-config``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import tempfile
import time
import typing
import zlib
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddp_train.cli import main
from ddp_train.config import TrainConfig, config_from_dict, config_to_yaml, load_config, parse_yaml
from ddp_train.errors import ConfigError

EXAMPLES = 500
"""Generated examples, each one to three overrides (about 1000 in all)."""

BASE = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
        "data.args.n_train=32", "data.args.n_val=8", "data.batch_size=8", "train.epochs=1",
        "train.max_steps=1", "logging.progress=none", "logging.system_metrics=false",
        "checkpoint.every_epochs=0"]
"""Written before the fuzzed overrides, which win: a tiny model, 4 steps an epoch, 1 step."""


def _leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every dotted key of the config with its annotation, sections included."""
    keys: list[tuple[str, Any]] = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append((f"{prefix}{name}", hint))
        if dataclasses.is_dataclass(hint):
            keys += _leaf_keys(hint, f"{prefix}{name}.")
    return keys


KEYS = _leaf_keys(TrainConfig)

HUGE_INTS = [2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]
PATH_TRICKS = ["..", ".", "/", "./..", "../x", "a/../..", "afile", "afile/x", "afile/../y", "~",
               "-", " ", "a" * 255, "a" * 256, "/".join(["d" * 200] * 25), "\u00e4/\u00f6",
               "\U0001f680", "\u202e", "/dev/null", "/dev/null/x", "/proc/version", "x\ny",
               "\\..\\..", "a:b", ""]

INT_TEXT = st.one_of(st.integers(-3, 40), st.sampled_from(HUGE_INTS), st.integers()).map(str)
FLOAT_TEXT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from([".nan", ".inf", "-.inf", "1e308", "1e-320", "-0.0", "1e400", "0x10", "1_000"]))
SCALAR_TEXT = st.one_of(INT_TEXT, FLOAT_TEXT, st.sampled_from(["true", "false", "yes", "null", "~", ""]),
                        st.text(max_size=30).map(json.dumps), st.text(max_size=30))
VALUE_TEXT = st.one_of(
    SCALAR_TEXT,
    st.lists(SCALAR_TEXT, max_size=3).map(lambda items: f"[{', '.join(items)}]"),
    st.sampled_from(["{a: 1}", "[[1, 2], [3]]", "&a [*a]", "!!float abc", "2020-13-45", "!!binary x",
                     "[" * 200 + "]" * 200, "9" * 5000, "{", "'", "!!python/name:os.system", "{1: 2}"]),
    st.sampled_from(PATH_TRICKS).map(json.dumps),
)


def _typed_values(hint: Any) -> st.SearchStrategy[str]:
    """Values aimed at a key's own type: its options, near-misses and range edges."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Literal:
        return st.sampled_from([*args, *(a.upper() for a in args), *(a[:-1] for a in args)])
    if origin is not None and len(args) == 1:  # X | None, list[X]
        inner = _typed_values(args[0])
        return st.one_of(inner, inner.map(lambda v: f"[{v}]"), st.just("null"))
    if hint is int:
        return st.one_of(INT_TEXT, st.sampled_from(["1.0", "1.5", "-0"]))
    if hint is float:
        return st.one_of(FLOAT_TEXT, INT_TEXT)
    if hint is str:
        return st.one_of(st.sampled_from(PATH_TRICKS).map(json.dumps), st.text(max_size=40).map(json.dumps),
                         st.sampled_from(["user_components:nope", "nosuch_pkg.mod:fn", ":", "a:", ":b",
                                          "user_components:NOT_CALLABLE", "user_components:not_a_module",
                                          "val/nope", "val/mse", "val/perplexity", "val/accuracy", "auto",
                                          "never"]))
    return VALUE_TEXT


def _plausible_values(hint: Any) -> st.SearchStrategy[str]:
    """Values of a key's type in a small range, mostly valid: configs that get to train."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.sampled_from(["[]", "[0.9, 0.99]", "[Linear]"])
    if origin is not None and len(args) == 1:  # X | None
        return st.one_of(st.just("null"), _plausible_values(args[0]))
    if hint is bool:
        return st.sampled_from(["true", "false"])
    if hint is int:
        return st.integers(0, 6).map(str)
    if hint is float:
        return st.sampled_from(["0.0", "0.01", "0.1", "0.5", "0.9", "1.0", "2.0"])
    return st.sampled_from(['"run"', '"val/loss"', '"val/accuracy"', '"never"', '"auto"'])


def _key_and_value(values: Callable[[Any], st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """``key=value`` for a known key, the value drawn from ``values(annotation)``."""
    return st.sampled_from(KEYS).flatmap(
        lambda item: values(item[1]).map(lambda value: f"{item[0]}={value}"))


PLAUSIBLE = _key_and_value(_plausible_values)
KNOWN_KEY = _key_and_value(lambda hint: st.one_of(_typed_values(hint), VALUE_TEXT))
UNKNOWN_KEY = st.one_of(
    st.tuples(st.sampled_from([k for k, _ in KEYS]), st.text(min_size=1, max_size=12))
    .map(lambda pair: f"{pair[0]}.{pair[1]}"),  # below a leaf, or an unknown key of a section
    # Anything at all, but not an option: argparse owns '-x' (its usage errors take two lines).
    st.text(min_size=1, max_size=20).filter(lambda key: not key.startswith("-")),
    st.sampled_from(["trian.epochs", "optim.lrr", "a..b", ".x", "x.", "=1", "run..name"]),
).flatmap(lambda key: VALUE_TEXT.map(lambda value: f"{key}={value}"))
ARGS_ENTRY = st.tuples(
    st.sampled_from(["model.args", "data.args", "loss.args", "optim.args"]),
    # Not in_features, out_features or classes: a model that does not fit the data fails at
    # its first forward, in the training step, not as a config error; nor label_smoothing,
    # which the built-in loss takes unchecked and torch rejects only at the first step.
    st.one_of(st.sampled_from(["hidden", "n_train", "n_val", "seed", "eps", "nesterov",
                               "hidden_sizes", "activation", "val_fraction"]),
              st.text(min_size=1, max_size=10)),
    st.one_of(st.integers(-4, 64).map(str), FLOAT_TEXT,
              st.sampled_from(["true", "null", '"x"', "[1, -1]", "{}"])),
).map(lambda t: f"{t[0]}.{t[1]}={t[2]}")
HOSTILE = st.lists(st.one_of(KNOWN_KEY, KNOWN_KEY, UNKNOWN_KEY, ARGS_ENTRY), min_size=1, max_size=3)
OVERRIDES = st.one_of(HOSTILE, HOSTILE, st.lists(PLAUSIBLE, min_size=1, max_size=3))


def _safe_to_train(overrides: list[str], root: Path) -> bool:
    """Whether to train the config these overrides make: one that fails to load, or half of
    those that load (chosen by their text, so that a replay chooses alike: a run takes about
    0.2 s), if it writes only under ``root`` and trains in well under a second. The others
    are validated only (``--print-config``)."""
    try:
        config = load_config(None, [*BASE, *overrides])
    except ConfigError:
        return True  # fails before anything runs or is written
    if zlib.crc32("\n".join(overrides).encode("utf-8", "surrogatepass")) % 2:
        return False
    inside = Path(os.path.realpath(config.run_dir)).is_relative_to(root)
    resume = config.checkpoint.resume
    reads_inside = resume in ("auto", "never") or Path(os.path.realpath(resume)).is_relative_to(root)
    # A data set or model sized by the fuzzer could take gigabytes: keep the built-in tiny ones.
    sizes = [v for args in (config.model.args, config.data.args) for v in args.values()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    # eval.task forced onto data it does not fit (regression on class labels) fails in the
    # metrics with a shape error, not a config error: such configs are validated only.
    return (inside and reads_inside and not config.train.compile and config.data.num_workers <= 1
            and not config.logging.tensorboard and all(abs(v) <= 512 for v in sizes)
            and config.eval.task in ("auto", "classification"))


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stderr captured; torch's global determinism flag put back afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return code, err.getvalue()


@pytest.mark.timeout(300)
def test_fuzzed_overrides_end_in_exit_0_1_or_2_with_one_line() -> None:
    """Every generated example through ``main()``: no traceback, and a failure is one line."""
    counts = {"examples": 0, "overrides": 0, "trained": 0, "training_s": 0.0, 0: 0, 1: 0, 2: 0}
    start = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(OVERRIDES)
    def check(overrides: list[str]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(os.path.realpath(directory))
            (root / "afile").write_text("a file where a directory is expected\n")
            previous = os.getcwd()
            os.chdir(root)
            try:
                train = _safe_to_train(overrides, root)
                started = time.monotonic()
                code, err = _run_in_process([*BASE, *overrides] if train else
                                            ["--print-config", *BASE, *overrides])
            finally:
                os.chdir(previous)
        assert "Traceback" not in err, (overrides, err)
        lines = err.strip().split("\n")
        if code != 0:
            assert code in (1, 2) and len(lines) == 1 and "\r" not in err, (overrides, code, err)
            assert lines[0].startswith("ddp-train: config error: " if code == 2 else
                                       "ddp-train: training failed: "), (overrides, err)
        counts["examples"] += 1
        counts["overrides"] += len(overrides)
        if train and code == 0:
            counts["trained"] += 1
            counts["training_s"] += time.monotonic() - started
        counts[code] += 1

    # Trainer.close() collects garbage; the objects of this process so far (torch, hypothesis)
    # need no collecting, and frozen they cost each run 0.05 s instead of 0.5 s. One thread:
    # a tiny model's step is faster without the pool (2 cores, shared with other tests).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    try:
        check()
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    elapsed = time.monotonic() - start
    print(f"\nfuzzed {counts['examples']} examples ({counts['overrides']} overrides) in "
          f"{elapsed:.1f} s: exit 0 x{counts[0]} ({counts['trained']} trained, "
          f"{counts['training_s']:.1f} s), exit 1 x{counts[1]}, exit 2 x{counts[2]}")
    assert counts["overrides"] >= 500
    assert counts[2] > counts["examples"] / 2, "most generated configs must be bad ones"
    assert counts[0] > 10, "some generated configs must be valid and run"


@pytest.mark.timeout(120)
def test_every_config_that_loads_prints_as_yaml_that_loads_back_the_same() -> None:
    """``config.yaml`` (and ``--print-config``) of any config that loads is YAML that loads
    back to the same config: ``export`` and a resume read it again."""
    loaded = 0

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(OVERRIDES)
    def check(overrides: list[str]) -> None:
        nonlocal loaded
        try:
            config = load_config(None, overrides)
        except ConfigError:
            return
        text = config_to_yaml(config)
        # Compared as text: NaN in a free-form argument is not equal to itself.
        assert config_to_yaml(config_from_dict(parse_yaml(text))) == text, overrides
        loaded += 1

    with tempfile.TemporaryDirectory() as directory:
        previous = os.getcwd()
        os.chdir(directory)  # the run directory is checked relative to the working directory
        try:
            check()
        finally:
            os.chdir(previous)
    assert loaded > 30
