"""Config loading, overrides, --print-config, and bad input → exit 2 with the key named."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from ddp_train.cli import main
from ddp_train.config import TrainConfig, config_to_yaml, field_help, load_config, parse_yaml
from ddp_train.errors import ConfigError
from ddp_train.training.early_stopping import watchable_metrics
from ddp_train.training.metrics import MetricAccumulator

FAST = ["train.max_steps=2", "logging.progress=none"]

# (arguments, text the message must contain: the key at fault and, where one exists, the fix)
BAD_INPUTS = [
    (["trian.epochs=3"], ["trian", "did you mean 'train'"]),
    (["optim.lrr=0.1"], ["optim.lrr", "did you mean 'optim.lr'"]),
    (["train.epochs=abc"], ["train.epochs", "expected an integer", "'abc'"]),
    (["data.batch_size=0"], ["data.batch_size", "an integer in [1, 2147483647]", "got 0"]),
    (["data.batch_size=-4"], ["data.batch_size"]),
    (["optim.lr=-0.1"], ["optim.lr", "> 0"]),
    (["optim.lr=0"], ["optim.lr", "a finite number > 0", "0.0"]),
    (["train.grad_accum_steps=0"], ["train.grad_accum_steps"]),
    (["train.precision=fp8"], ["train.precision", "fp32, bf16, fp16", "'fp8'"]),
    (["train.strategy=dpp"], ["train.strategy", "did you mean 'ddp'"]),
    (["optim.name=adamx"], ["optim.name", "did you mean 'adam"]),
    (["schedule.name=cosin"], ["schedule.name", "did you mean 'cosine'"]),
    (["loss.name=xent"], ["loss.name", "unknown loss 'xent'"]),
    (["model.name=mpl"], ["model.name", "did you mean 'mlp'"]),
    (["data.name=digit"], ["data.name", "did you mean 'digits'"]),
    (["model.name=no_such_pkg.models:net"], ["model.name", "cannot import module 'no_such_pkg"]),
    (["model.name=user_components:nope"], ["model.name", "has no attribute 'nope'"]),
    (["model.name=user_components"], ["model.name", "package.module:factory"]),
    (["data.name=user_components:NOT_CALLABLE"], ["data.name", "not callable"]),
    (["model.name=user_components:not_a_module"], ["model.name", "nn.Module", "int"]),
    (["model.args.no_such_arg=1"], ["model.args", "no_such_arg"]),
    (["data.args.val_fraction=2"], ["data.args.val_fraction"]),
    (["train.precision=fp16"], ["train.precision", "CUDA"]),
    (["dist.backend=nccl"], ["dist.backend", "CUDA"]),
    (["train.early_stopping.metric=loss"], ["train.early_stopping.metric", "val/"]),
    (["train.max_steps=0"], ["train.max_steps"]),
    (["train.strategy=fsdp", "train.precision=fp16"], ["train.precision", "fsdp"]),
    (["train.strategy=fsdp", "checkpoint.async_save=true"], ["checkpoint.async_save", "fsdp"]),
    (["train.strategy=fsdp", "train.fsdp.shard_modules=[Linear, Nope]"],
     ["train.fsdp.shard_modules", "'Nope'", "Linear"]),
    (["train.fsdp.shard_modules=[my.Block]"], ["train.fsdp.shard_modules[0]", "class name"]),
    (["train.fsdp.reduce_dtype=fp16"], ["train.fsdp.reduce_dtype", "fp32, bf16"]),
    (["eval.task=segmentation"], ["eval.task", "classification"]),
    (["train.clip_grad_norm=-1"], ["train.clip_grad_norm", "> 0"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["data.batch_size=100000"], ["data.batch_size", "training samples"]),
    (["train.epochs=1", "no_equals_sign"], ["no_equals_sign", "dotted.key=value"]),
    (["model=3"], ["model", "mapping"]),
    (["model.args.activation=swish"], ["model.args", "swish"]),
    (["model.name=gpt", "data.name=chars", "model.args.n_head=3"], ["model.args", "divisible"]),
    # Each of these escaped as a traceback (exit 1) or was silently accepted.
    (["run.name=.."], ["run.name", "not empty, '.' or '..'", "got '..'"]),
    (["run.name=."], ["run.name", "got '.'"]),
    (["run.seed=18446744073709551616"], ["run.seed", "an integer in [0, 4294967295]"]),
    (["run.seed=-1"], ["run.seed", "an integer in [0, 4294967295]", "got -1"]),
    (["dist.timeout_s=.inf"], ["dist.timeout_s", "(0, 604800] seconds (at most 7 days)", "got inf"]),
    (["dist.timeout_s=1e12"], ["dist.timeout_s", "(0, 604800]"]),
    (["dist.timeout_s=.nan"], ["dist.timeout_s", "got nan"]),
    (["data.num_workers=100000"], ["data.num_workers", "[0, 256]", "worker processes per rank"]),
    (["model.args.hidden_sizes=[-3]"],
     ["model.args", "rejected by mlp (RuntimeError at ", "negative dimension -3"]),
    (["model.args.hidden_sizes=[2.5]"], ["model.args", "rejected by mlp (TypeError at "]),
    (["model.args.when=2020-13-45"], ["model.args.when", "is not valid YAML", "month must be in 1..12"]),
    (["model.args.nested=&a [*a]"], ["model.args", "YAML alias"]),
    (["model.args.not-a-name=1"], ["model.args", "keyword argument names", "'not-a-name'"]),
    (["model.name=.relative:net"], ["model.name", "Python identifiers", "'.relative:net'"]),
    (["train.step_fn=user_components:1fn"], ["train.step_fn", "'package.module:fn'"]),
    (["optim.betas=[0.9, .nan]"], ["optim.betas[1]", "[0, 1)", "nan"]),
    (["schedule.gamma=0"], ["schedule.gamma", "(0, 1]"]),
    (["debug.grad_norm_low=5", "debug.grad_norm_high=1"], ["debug.grad_norm_low", "[0, 1)"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUTS, ids=[a[-1] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_key(args: list[str], expected: list[str], workdir: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    assert main([*args, "logging.progress=none"]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err
    assert not (workdir / "runs").exists(), "a bad config must not create or touch a run dir"


def _numeric_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, type]]:
    """Every int and float key of the config (optional ones and lists of numbers included)."""
    keys: list[tuple[str, type]] = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _numeric_keys(hint, f"{prefix}{name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        number = hint if hint in (int, float) else args[0] if args in ([int], [float]) else None
        if number is not None:
            keys.append((f"{prefix}{name}", number))
    return keys


@pytest.mark.parametrize(("key", "kind"), _numeric_keys(), ids=[key for key, _ in _numeric_keys()])
def test_every_numeric_key_rejects_non_finite_and_out_of_range_values(key: str, kind: type) -> None:
    """No number is unchecked: NaN, infinities and floats beyond range for float keys; for
    integer keys values below 0 and beyond 64 bits (every count has an upper bound)."""
    bad = [".nan", ".inf", "-.inf", str(10**400)] if kind is float else [str(-2**31), str(2**63)]
    for value in bad:
        override = f"{key}=[0.5, {value}]" if key == "optim.betas" else f"{key}={value}"
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert info.value.key.startswith(key), (override, info.value)
        assert "\n" not in str(info.value)


def test_a_run_directory_through_a_file_is_a_config_error(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A file where the run directory or one of its parents should be: one line naming the
    key and the file, before anything is written (this was a NotADirectoryError)."""
    monkeypatch.chdir(workdir)
    (workdir / "afile").write_text("not a directory\n")
    for args, key in [(["run.output_dir=afile"], "run.output_dir"),
                      (["run.output_dir=afile/deeper"], "run.output_dir"),
                      (["run.output_dir=.", "run.name=afile"], "run.name")]:
        assert main([*args, *FAST]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ddp-train: config error: {key}: expected a directory"), err
        assert err.count("\n") == 1 and f"{workdir / 'afile'}' is not a directory" in err
    assert [path.name for path in workdir.iterdir()] == ["afile"]


def test_a_bug_in_a_user_factory_is_one_line_naming_it(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only ValueError: whatever a user's factory raises is one line naming the key, the
    factory, the error and the line that raised it (this was a traceback, exit 1)."""
    (workdir / "buggy_models.py").write_text("def net(width: int = 4):\n    return undefined_name\n")
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.chdir(workdir)
    assert main(["model.name=buggy_models:net", *FAST]) == 2
    err = capsys.readouterr().err
    assert err == ("ddp-train: config error: model.args: rejected by net (NameError at buggy_models.py:2: "
                   "name 'undefined_name' is not defined)\n")


@pytest.mark.parametrize(("args", "available"), [
    (["train.early_stopping.metric=val/nope"],
     "task 'classification' (val/loss, val/accuracy, val/precision_macro, val/recall_macro, val/f1_macro)"),
    (["train.early_stopping.metric=val/mse", "train.early_stopping.enabled=true"], "task 'classification'"),
    (["train.early_stopping.metric=val/accuracy", "data.name=synthetic_regression", "loss.name=mse"],
     "task 'regression' (val/loss, val/mse, val/mae, val/r2)"),
    (["train.early_stopping.metric=val/confusion_matrix"], "task 'classification'"),
], ids=["unknown", "enabled", "other-task", "not-a-number"])
def test_an_early_stopping_metric_the_task_cannot_report_fails_before_training(
        args: list[str], available: str, workdir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found at startup, naming the metrics there are (this was found at the first
    validation, after a whole epoch of training)."""
    monkeypatch.chdir(workdir)
    assert main([*args, "train.max_steps=50", "logging.progress=none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddp-train: config error: train.early_stopping.metric: expected a metric "
                          f"that validation reports for {available}"), err
    assert err.count("\n") == 1
    assert not list(workdir.rglob("metrics.jsonl")) and not list(workdir.rglob("*.pt")), "it trained"


@pytest.mark.parametrize("task", ["classification", "language_model", "regression", "none"])
def test_watchable_metrics_are_the_ones_validation_reports(task: str) -> None:
    """The table early stopping checks against is what the metrics code computes: every
    scalar it reports but val/samples, with a model's predictions and without (step_fn)."""
    samples, classes = 6, 3
    targets = torch.randint(0, classes, (samples,)) if task != "regression" else torch.randn(samples, 1)
    prediction = torch.randn(samples, classes if task != "regression" else 1)
    if task == "language_model":
        targets, prediction = targets.reshape(2, 3), prediction.reshape(2, 3, classes)
    for custom_step in (False, True):
        accumulator = MetricAccumulator(task, torch.device("cpu"))
        accumulator.update(torch.tensor(1.0), None if custom_step else prediction, targets, samples)
        reported = accumulator.compute(lambda totals: totals)
        scalars = {name for name, value in reported.items() if isinstance(value, float)}
        assert set(watchable_metrics(task, custom_step)) == scalars, (custom_step, reported)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("train:\n  epochs: [1, 2\n", "not valid YAML at line"),
    ("- just\n- a list\n", "mapping of sections"),
    ("train: 3\n", "train"),
    ("train:\n  epochz: 3\n", "did you mean 'train.epochs'"),
    ("model:\n  args: {when: 2020-13-45}\n", "not valid YAML: month must be in 1..12"),
    ("model:\n  args: {deep: " + "[" * 5000 + "]" * 5000 + "}\n", "not valid YAML: maximum recursion depth"),
], ids=["missing", "malformed", "list-top-level", "section-not-mapping", "typo-in-file", "bad-date",
        "too-deep"])
def test_bad_config_files(content: str | None, expected: str, workdir: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path = workdir / "my.yaml"
    if content is not None:
        _write(path, content)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_bad_input_in_real_processes(workdir: Path) -> None:
    """The exit code and the clean message hold for a real process, also under torchrun."""
    single = run_cli(["optim.lrr=1"], cwd=workdir)
    assert single.returncode == 2
    assert "optim.lrr" in single.stderr and "Traceback" not in single.stderr
    two_ranks = run_cli(["model.name=user_components:nope", *FAST], cwd=workdir, nproc=2)
    assert two_ranks.returncode != 0
    assert two_ranks.stderr.count("has no attribute 'nope'") == 1  # rank 0 speaks for all
    # torchrun reports the failed workers with its own traceback; ours print none.
    assert "ddp_train/" not in two_ranks.stderr, two_ranks.stderr
    assert not (workdir / "runs").exists()


def test_precedence_defaults_file_overrides(workdir: Path) -> None:
    path = _write(workdir / "c.yaml", "optim:\n  lr: 1e-3\n  name: sgd\ntrain:\n  epochs: 4\n")
    config = load_config(path, ["train.epochs=7", "model.args.hidden_sizes=[8, 8]"])
    assert config.optim.lr == pytest.approx(1e-3)  # YAML 1.1 would read "1e-3" as a string
    assert config.optim.name == "sgd"  # file over default
    assert config.train.epochs == 7  # override over file
    assert config.model.args == {"hidden_sizes": [8, 8]}  # into a free-form mapping
    assert config.data.batch_size == TrainConfig().data.batch_size  # default kept


def test_print_config_round_trips_and_documents_every_key(workdir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-config", "optim.lr=0.5", "run.name=x"]) == 0
    text = capsys.readouterr().out
    reloaded = load_config(_write(workdir / "p.yaml", text))
    assert reloaded == load_config(None, ["optim.lr=0.5", "run.name=x"])
    # Every key has a description, shown as a comment.
    def walk(section: object) -> None:
        for f in dataclasses.fields(section):  # type: ignore[arg-type]
            assert field_help(type(section), f.name), f"{type(section).__name__}.{f.name}"
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
    walk(TrainConfig())
    assert "# Peak learning rate." in text
    assert isinstance(parse_yaml(config_to_yaml(TrainConfig())), dict)
    assert yaml.safe_load(text)["optim"]["lr"] == 0.5


def test_help_and_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "--print-config" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
