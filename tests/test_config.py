"""Config loading, overrides, --print-config, and bad input → exit 2 with the key named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from ddp_train.cli import main
from ddp_train.config import TrainConfig, config_to_yaml, field_help, load_config, parse_yaml

FAST = ["train.max_steps=2", "logging.progress=none"]

# (arguments, text the message must contain: the key at fault and, where one exists, the fix)
BAD_INPUTS = [
    (["trian.epochs=3"], ["trian", "did you mean 'train'"]),
    (["optim.lrr=0.1"], ["optim.lrr", "did you mean 'optim.lr'"]),
    (["train.epochs=abc"], ["train.epochs", "expected an integer", "'abc'"]),
    (["data.batch_size=0"], ["data.batch_size", ">= 1", "0"]),
    (["data.batch_size=-4"], ["data.batch_size"]),
    (["optim.lr=-0.1"], ["optim.lr", ">= 0"]),
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


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("train:\n  epochs: [1, 2\n", "not valid YAML at line"),
    ("- just\n- a list\n", "mapping of sections"),
    ("train: 3\n", "train"),
    ("train:\n  epochz: 3\n", "did you mean 'train.epochs'"),
], ids=["missing", "malformed", "list-top-level", "section-not-mapping", "typo-in-file"])
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
