"""Hyperparameter search: Optuna sweeps of real training runs, the LR range test, k-fold CV."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import clean_env, read_metrics, read_summary, require_modules, run_cli
from ddp_train.cli import main

require_modules("optuna")
import optuna  # noqa: E402

# A small user model on separable blobs: trials take a few steps, validating every 4.
TINY = ["model.name=user_components:tiny_mlp", "data.name=user_components:blobs",
        "data.batch_size=16", "optim.name=sgd", "train.max_steps=12", "eval.every_steps=4",
        "logging.system_metrics=false", "logging.progress=none"]
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _sweep_command(*extra: str) -> list[str]:
    # LRs over 7 decades: the low ones barely learn (pruned), the high ones blow up.
    return [sys.executable, "-m", "ddp_train", "sweep", "--space", "space.yaml", "--trials", "6",
            "--sampler", "random", "--startup-trials", "1", "--heartbeat", "2", *extra,
            *TINY, "run.name=sw"]


def _study(workdir: Path) -> Any:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(workdir / "runs" / "sw" / "optuna.journal")))
    return optuna.load_study(study_name="sw", storage=storage)


def _counted_finished(trial: Any) -> bool:
    """Finished and taking one of the study's places (a lost or surplus trial does not)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and trial.user_attrs.get("outcome") == "failed")


def test_a_lost_trials_place_stays_taken_until_its_retry_is_queued(tmp_path: Path) -> None:
    """Between failing a lost trial and queueing its retry, a second worker counting places
    must find them all taken; else it starts a trial in the lost one's place and the retry,
    asked later, is dropped as surplus (the lost parameters never run again)."""
    from ddp_train.tools.child_runs import StopRequests
    from ddp_train.tools.sweep import SweepSettings, SweepWorker, places_taken

    study = optuna.create_study()
    for value in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": value}, value=value,
                                                  distributions={"optim.lr": optuna.distributions.FloatDistribution(0.1, 10.0)}))
    lost = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.1, 10.0)})
    lost.set_user_attr("heartbeat", time.time() - 3600)  # its worker died long ago
    settings = SweepSettings(None, [], [], trials=4, nproc=1, metric="val/loss", maximize=False,
                             run_dir=tmp_path, heartbeat_s=1.0)
    worker = SweepWorker(optuna, study, settings, StopRequests())
    enqueue, seen = study.enqueue_trial, []

    def enqueue_and_count(*args: Any, **kwargs: Any) -> None:
        seen.append(places_taken(study.get_trials(), optuna))  # what a second worker sees now
        enqueue(*args, **kwargs)

    study.enqueue_trial = enqueue_and_count  # type: ignore[method-assign]
    worker.requeue_lost_trials()
    trials = study.get_trials()
    assert trials[lost.number].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING
    assert seen == [4], "the lost trial's place was free before its retry was queued"
    assert places_taken(trials, optuna) == 4
    assert places_taken(trials, optuna, among=lambda t: t.number < retry[0].number) == 3  # the retry fits


@pytest.mark.timeout(240)
def test_sweep_resumes_after_a_kill_with_two_workers_at_two_ranks(workdir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """6 trials: the first worker is SIGKILLed (with its running trial) after 3 finished trials;
    two workers started at once on the same storage, at 2 ranks per trial, finish the study.

    Proves: pruning of bad LRs, no trial finished twice, the lost trial run again, no trial
    number used twice, the total as asked, trials at world size 2, the best value read back
    from the best run's own metrics.jsonl, and best.yaml training as is."""
    (workdir / "space.yaml").write_text("optim.lr: {type: float, low: 1.0e-5, high: 100.0, log: true}\n")
    env = clean_env()
    first = subprocess.Popen(_sweep_command("--seed", "3"), cwd=workdir, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:  # kill once 3 trials have finished and a 4th is running
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        trials = []
        if (workdir / "runs" / "sw" / "optuna.journal").exists():
            try:
                trials = _study(workdir).get_trials()
            except KeyError:  # the worker has not created the study yet
                pass
        if (sum(t.state.name in FINISHED for t in trials) >= 3
                and any(t.state.name == "RUNNING" for t in trials)):
            break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its trial, as a lost node would
    first.wait(timeout=30)
    before = {t.number: t for t in _study(workdir).get_trials() if t.state.name in FINISHED}
    lost = [t.number for t in _study(workdir).get_trials() if t.state.name == "RUNNING"]
    assert len(before) == 3 and len(lost) == 1
    summaries_before = {n: (workdir / "runs/sw/trials" / str(n) / "summary.json").read_bytes()
                        for n in before}

    workers = [subprocess.Popen(_sweep_command("--seed", str(seed), "--nproc", "2"), cwd=workdir,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for seed in (10, 20)]
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output

    sweep_dir = workdir / "runs" / "sw"
    trials = _study(workdir).get_trials()
    finished = [t for t in trials if _counted_finished(t)]
    # The total as asked, and no trial finished twice: the first three are untouched and
    # every finished trial has parameters of its own.
    assert len(finished) == 6
    assert not any(t.state.name in ("RUNNING", "WAITING") for t in trials)
    assert {t.number for t in finished} >= set(before)
    for number, content in summaries_before.items():
        assert (sweep_dir / "trials" / str(number) / "summary.json").read_bytes() == content
    assert len({t.params["optim.lr"] for t in finished}) == 6
    # The trial that was running when its worker died was failed and run again, once.
    assert trials[lost[0]].state.name == "FAIL" and "outcome" not in trials[lost[0]].user_attrs
    retries = [t for t in finished if t.user_attrs.get("retry_of") == lost[0]]
    assert len(retries) == 1 and retries[0].params == trials[lost[0]].params
    # Two workers at once: both ran trials, each in a directory of its own, at 2 ranks.
    later = [t for t in finished if t.number not in before]
    assert len({t.user_attrs["worker"] for t in later}) == 2
    for trial in finished:
        config = yaml.safe_load((sweep_dir / "trials" / str(trial.number) / "config.yaml").read_text())
        assert config["run"]["name"] == str(trial.number)
        assert config["optim"]["lr"] == trial.params["optim.lr"]
    for trial in later:  # every run writes summary.json, even one stopped while finishing
        assert read_summary(sweep_dir / "trials" / str(trial.number))["world_size"] == 2
    # Bad learning rates fail clearly: some pruned (their runs were stopped by a signal).
    states = [t.state.name for t in finished]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2

    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["metric"] == "val/loss" and summary["direction"] == "minimize"
    assert summary["status"] == "completed" and summary["trials_done"] == 6
    best = min((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_params"] == best.params
    own_metrics = read_metrics(sweep_dir / "trials" / str(best.number))
    assert summary["best_value"] == min(r["val/loss"] for r in own_metrics if "val/loss" in r)
    assert {t["number"] for t in summary["trials"]} == {t.number for t in trials}
    assert (sweep_dir / "optimization_history.png").stat().st_size > 0
    assert (sweep_dir / "param_importances.png").stat().st_size > 0

    # best.yaml trains as is, with the best LR, into the sweep's directory.
    monkeypatch.chdir(workdir)
    assert main(["--config", str(sweep_dir / "best.yaml")]) == 0
    best_run = read_summary(sweep_dir / "best")
    assert best_run["status"] == "completed"
    best_config = yaml.safe_load((sweep_dir / "best" / "config.yaml").read_text())
    assert best_config["optim"]["lr"] == best.params["optim.lr"]


@pytest.mark.parametrize("space, named", [
    ("optim.lrr: {type: float, low: 0.001, high: 0.1}", "optim.lrr: unknown key; did you mean 'optim.lr'"),
    ("optim.lr: {type: float, low: 0.1, high: 0.001}", "optim.lr: low (0.1) is greater than high (0.001)"),
    ("optim.lr: {type: flaot, low: 0.001, high: 0.1}", "optim.lr.type: unknown type 'flaot'; did you mean 'float'"),
    ("data.batch_size: {type: float, low: 8, high: 64}", "data.batch_size: expected an integer"),
])
def test_bad_space_file_is_a_config_error_naming_it(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                     space: str, named: str) -> None:
    (workdir / "space.yaml").write_text(space + "\n")
    code = main(["sweep", "--space", str(workdir / "space.yaml"), "--trials", "2",
                 f"run.output_dir={workdir / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--space {workdir / 'space.yaml'}: {named}" in err and "Traceback" not in err
    assert not (workdir / "runs").exists()  # nothing started, nothing written


def test_sweep_without_optuna_says_how_to_install_it(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without it imports
    (workdir / "space.yaml").write_text("optim.lr: {type: float, low: 0.001, high: 0.1}\n")
    assert main(["sweep", "--space", str(workdir / "space.yaml"), "--trials", "2"]) == 2
    assert 'pip install "ddp_train[sweep]"' in capsys.readouterr().err


# Least squares on one-hot targets with a linear model: convex, and plain SGD diverges
# above a fixed LR, so "too large" is unambiguous.
CONVEX = ["model.name=user_components:linear", "data.name=user_components:blobs",
          "loss.name=user_components:onehot_mse", "eval.task=classification", "optim.name=sgd",
          "optim.momentum=0.0", "logging.system_metrics=false", "logging.progress=none",
          "checkpoint.every_epochs=0"]


def test_lr_range_test_suggests_an_lr_that_trains_where_100x_diverges(
        workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    assert main(["lr-find", "--start-lr", "1e-4", "--end-lr", "10", "--num-steps", "60",
                 *CONVEX, "run.name=lrf"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((workdir / "runs/lrf/lr_find.json").read_text())
    suggested = result["suggested_lr"]
    assert f"optim.lr={float(f'{suggested:.3g}')}" in printed
    assert (workdir / "runs/lrf/lr_find.png").stat().st_size > 0
    assert len(result["lrs"]) == len(result["losses"]) < 60  # stopped on divergence
    assert result["diverged_at_lr"] is not None and suggested < result["diverged_at_lr"]
    assert all(b > a for a, b in zip(result["lrs"], result["lrs"][1:]))  # exponential sweep up
    assert not (workdir / "runs/lrf/metrics.jsonl").exists()  # the probe's run files are thrown away

    # At 2 ranks with the same global batch (DDP, the loss averaged over ranks): the same test.
    result2 = run_cli(["lr-find", "--start-lr", "1e-4", "--end-lr", "10", "--num-steps", "60",
                       *CONVEX, "data.batch_size=16", "run.name=lrf2"], cwd=workdir, nproc=2)
    assert result2.returncode == 0, result2.stderr
    two_ranks = json.loads((workdir / "runs/lrf2/lr_find.json").read_text())
    assert two_ranks["world_size"] == 2
    common = min(len(two_ranks["losses"]), len(result["losses"]))
    assert two_ranks["losses"][:common] == pytest.approx(result["losses"][:common], rel=1e-4)
    step_ratio = (10 / 1e-4) ** (1 / 59)  # one step of the LR sweep
    assert abs(math.log(two_ranks["suggested_lr"] / suggested)) <= math.log(step_ratio) * 1.01

    assert main([*CONVEX, "run.name=good", f"optim.lr={suggested}", "train.epochs=5"]) == 0
    assert read_summary(workdir / "runs/good")["final"]["val/accuracy"] >= 0.95
    assert main([*CONVEX, "run.name=bad", f"optim.lr={100 * suggested}", "train.epochs=5"]) == 1
    assert read_summary(workdir / "runs/bad")["status"] == "failed"  # non-finite: it diverged


def test_five_fold_cv_validates_every_sample_exactly_once(workdir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("PYTHONPATH", clean_env()["PYTHONPATH"])  # the fold runs import tests/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["cv", "--folds", "5", *TINY, "data.args.n_train=100", "run.name=cv"]) == 0
    cv_dir = workdir / "runs" / "cv"
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    folds = summary["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4]
    assert sum(f["n_val"] for f in folds) == 100
    assert all(f["n_train"] + f["n_val"] == 100 and f["status"] == "completed" for f in folds)
    seen: set[int] = set()
    for fold in folds:
        split = json.loads((cv_dir / "folds" / str(fold["fold"]) / "split.json").read_text())
        val, train = set(split["val_indices"]), set(split["train_indices"])
        assert not val & seen and not val & train and len(val) == fold["n_val"]
        seen |= val
        # The run validated on exactly that fold (val/samples counts each sample once).
        validations = [r for r in read_metrics(cv_dir / "folds" / str(fold["fold"])) if "val/loss" in r]
        assert validations and all(r["val/samples"] == fold["n_val"] for r in validations)
        assert fold["final"] == {k: v for k, v in validations[-1].items()
                                 if k.startswith("val/") and isinstance(v, (int, float))}
    assert seen == set(range(100))
    for key in ("val/loss", "val/accuracy"):
        values = [f["final"][key] for f in folds]
        mean = sum(values) / 5
        assert summary["mean"][key] == pytest.approx(mean)
        assert summary["std"][key] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 5))


def test_stratified_folds_keep_class_shares() -> None:
    from ddp_train.tools.cross_validation import make_folds

    labels = [0] * 50 + [1] * 30 + [2] * 20
    folds = make_folds(len(labels), 5, seed=0, labels=labels)
    assert sorted(i for _, val in folds for i in val) == list(range(100))
    for _, val in folds:
        assert [sum(labels[i] == c for i in val) for c in range(3)] == [10, 6, 4]
