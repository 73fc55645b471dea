"""``ddp-train sweep``: hyperparameter search with Optuna, each trial an ordinary training run.

A trial is a child run (:mod:`ddp_train.tools.child_runs`) in ``<run_dir>/trials/<number>/``
on ``--nproc`` ranks. This process, the worker, follows the trial's metrics.jsonl, reports
every validation of the objective metric to Optuna, and stops a trial the pruner gives
up on with SIGTERM (the trial ends as a preempted run). Only the worker knows Optuna, so
pruning works the same at every world size.

Several workers (a Slurm job array, several machines) share one study through
``--storage``; they run ``--trials`` trials between them:

* a trial counts once it is running, queued for a retry, or finished (completed,
  pruned, or failed because its run failed); a worker starts a trial only while fewer
  than ``--trials`` count, and a trial asked for beyond that (two workers asking at the
  same moment) is given up before it runs;
* a worker writes a heartbeat into its running trial; a running trial without one for
  three heartbeat intervals belongs to a worker that died: another worker marks it
  failed and queues its parameters again, and a worker with nothing left to start waits
  for the trials running elsewhere so that it can take such a retry over;
* a worker that receives SIGTERM/SIGINT/SIGUSR1/SIGUSR2 stops its trial cleanly and
  queues it again, so running the same command again finishes the study without
  running any finished trial twice.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ddp_train.checkpoint.atomic import atomic_write, atomic_write_json
from ddp_train.config import config_to_yaml, format_override, load_config
from ddp_train.errors import ConfigError, UsageError
from ddp_train.extras import require
from ddp_train.tools.child_runs import POLL_S, ChildRun, MetricsFollower, StopRequests
from ddp_train.tools.sweep_space import Parameter, read_space

log = logging.getLogger("ddp_train")

# Trials are short-lived by design: no periodic checkpoints unless KEY=VALUE asks for them.
TRIAL_DEFAULTS = ("checkpoint.every_epochs=0", "checkpoint.every_steps=0")
# A running trial whose worker has not written a heartbeat for this many intervals is lost.
LOST_AFTER_HEARTBEATS = 3

# The outcome a worker records on every trial it ends (user attribute "outcome").
COUNTED_FAILURE = "failed"  # the training run failed: the trial used up its place


def require_optuna() -> Any:
    """The optuna module, or a ConfigError (exit 2) saying how to install it."""
    require(("optuna",), "sweep", "ddp-train sweep")
    import optuna

    return optuna


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``sweep`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} sweep",
        description="Hyperparameter search with Optuna: every trial is a training run in "
                    "<run_dir>/trials/<number>/ (torchrun when --nproc > 1), pruned trials are "
                    "stopped cleanly, and running the same command again continues the study. "
                    "Writes <run_dir>/sweep_summary.json, best.yaml and plots. "
                    'Needs: pip install "ddp_train[sweep]".',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="space file (YAML), dotted config keys to distributions:\n"
               "  optim.lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}\n"
               "  data.batch_size: {type: categorical, choices: [16, 32, 64]}\n"
               "  model.args.hidden: {type: int, low: 16, high: 128, step: 16}\n"
               "KEY=VALUE overrides apply to every trial (and to best.yaml).")
    parser.add_argument("--config", metavar="FILE", help="base YAML config of every trial")
    parser.add_argument("--space", metavar="FILE", required=True, type=Path,
                        help="YAML search space (see below)")
    parser.add_argument("--trials", type=int, required=True, metavar="N",
                        help="trials in the study, all workers together")
    parser.add_argument("--nproc", type=int, default=1, metavar="K",
                        help="ranks per trial (torchrun --standalone when > 1; default 1)")
    parser.add_argument("--storage", metavar="URL_OR_FILE",
                        help="an RDB URL (sqlite:///sweep.db, postgresql://...) or a journal file "
                             "shared by several workers (default: <run_dir>/optuna.journal)")
    parser.add_argument("--study", metavar="NAME", help="study name (default: run.name)")
    parser.add_argument("--metric", help="validation metric to optimise "
                                         "(default: train.early_stopping.metric)")
    parser.add_argument("--direction", choices=("min", "max", "minimize", "maximize"),
                        help="whether smaller or larger is better (default: train.early_stopping.mode)")
    parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                        help="stops trials that do worse than others at the same step (default: median)")
    parser.add_argument("--startup-trials", type=int, default=2, metavar="N",
                        help="median pruner: finished trials before it prunes any (default: 2)")
    parser.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe",
                        help="how parameters are chosen (default: tpe)")
    parser.add_argument("--seed", type=int,
                        help="sampler seed, offset by the trials the study already has (default: "
                             "random; give concurrent workers different seeds)")
    parser.add_argument("--heartbeat", type=float, default=30.0, metavar="S",
                        help="seconds between a worker's heartbeats; a trial silent for 3 of them "
                             "is taken as lost and run again (default: 30)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


@dataclass
class SweepSettings:
    """What the sweep was asked to do, checked."""

    config_path: str | None
    overrides: list[str]
    parameters: list[Parameter]
    trials: int
    nproc: int
    metric: str
    maximize: bool
    run_dir: Path
    heartbeat_s: float


def command(argv: list[str], prog: str) -> int:
    """``sweep``: run (a worker's share of) an Optuna study of training runs."""
    args = _parser(prog).parse_args(argv)
    optuna = require_optuna()
    config = load_config(args.config, args.overrides)
    for name, value, low in (("--trials", args.trials, 1), ("--nproc", args.nproc, 1),
                             ("--startup-trials", args.startup_trials, 0)):
        if value < low:
            raise UsageError(name, f"expected an integer >= {low}, got {value}")
    if not (args.heartbeat > 0 and math.isfinite(args.heartbeat)):
        raise UsageError("--heartbeat", f"expected a number of seconds > 0, got {args.heartbeat}")
    metric = args.metric or config.train.early_stopping.metric
    if not metric.startswith("val/"):
        raise UsageError("--metric", f"expected a validation metric such as 'val/loss', got {metric!r}")
    direction = args.direction or config.train.early_stopping.mode
    settings = SweepSettings(
        config_path=args.config, overrides=list(args.overrides),
        parameters=read_space(args.space, args.config, list(args.overrides)), trials=args.trials,
        nproc=args.nproc, metric=metric, maximize=direction in ("max", "maximize"),
        run_dir=config.run_dir, heartbeat_s=args.heartbeat)

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(
        storage=_storage(optuna, args.storage, settings.run_dir),
        study_name=args.study or config.run.name, load_if_exists=True,
        direction="maximize" if settings.maximize else "minimize",
        sampler=_sampler(optuna, args.sampler, args.seed, settings.parameters, args.trials),
        pruner=_pruner(optuna, args.pruner, args.startup_trials))
    if args.seed is not None and study.trials:
        # Continuing a study: the seed's first draws were made already, by the first start.
        study.sampler = _sampler(optuna, args.sampler, args.seed + len(study.trials),
                                 settings.parameters, args.trials)
    wanted = optuna.study.StudyDirection.MAXIMIZE if settings.maximize else optuna.study.StudyDirection.MINIMIZE
    if study.direction != wanted:
        raise UsageError("--direction", f"study {study.study_name!r} in this storage "
                                        f"{study.direction.name.lower()}s its objective; it cannot "
                                        f"continue with {direction}")
    log.info("sweep %s: %d trials of %s (%s) on %d rank(s) each | %s | %s", study.study_name,
             settings.trials, metric, "max" if settings.maximize else "min", settings.nproc,
             ", ".join(p.key for p in settings.parameters), settings.run_dir)

    with StopRequests() as stop:
        status = SweepWorker(optuna, study, settings, stop).run()
    summary = write_outputs(optuna, study, settings, status)
    if status == "interrupted":
        log.info("sweep interrupted: %d of %d trials done; run the same command again to continue",
                 summary["trials_done"], settings.trials)
    elif summary["best_value"] is not None:
        params = " ".join(format_override(k, v) for k, v in summary["best_params"].items())
        log.info("best %s %.6g (trial %d): %s | %s", metric, summary["best_value"],
                 summary["best_trial"], params, settings.run_dir / "best.yaml")
    else:
        log.warning("no trial completed; see %s", settings.run_dir / "sweep_summary.json")
    return 0


def _storage(optuna: Any, storage: str | None, run_dir: Path) -> Any:
    """An RDB URL as is; anything else is a journal file (the default: <run_dir>/optuna.journal)."""
    if storage is not None and "://" in storage:
        return storage
    path = Path(storage) if storage is not None else run_dir / "optuna.journal"
    if path.is_dir():
        raise UsageError("--storage", f"expected an RDB URL or a journal file, got the directory {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    # File locks make one journal safe for several processes, also over NFS.
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _sampler(optuna: Any, name: str, seed: int | None, parameters: list[Parameter], trials: int) -> Any:
    """The ``--sampler``; the grid must have a point for each of the ``trials``."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {parameter.key: parameter.grid() for parameter in parameters}
        points = math.prod(len(values) for values in grid.values())
        if trials > points:
            raise UsageError("--trials", f"the grid has {points} points, fewer than the {trials} "
                                         f"trials asked for")
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(optuna: Any, name: str, startup_trials: int) -> Any:
    """The ``--pruner``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "hyperband":
        # Resources are optimizer steps; the largest is learned from the first finished trial.
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def places_taken(trials: list[Any], optuna: Any, among: Callable[[Any], bool] = lambda trial: True
                 ) -> int:
    """How many of the study's ``--trials`` places the trials of ``trials`` that pass ``among`` take.

    Running, queued and finished trials take one (a failed one only when its run failed).
    A trial taken for lost (failed by another worker: the one failed trial without an
    ``outcome``) keeps its place until its retry is queued, which then takes it over: a
    worker starting a trial in between must not find the place free and take it, which
    would leave the retry surplus.
    """
    TrialState = optuna.trial.TrialState
    retried = {t.user_attrs.get("retry_of") for t in trials}
    taken = 0
    for trial in filter(among, trials):
        state, attrs = trial.state, trial.user_attrs
        if state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
            taken += 1
        elif state == TrialState.FAIL:
            outcome = attrs.get("outcome")
            taken += outcome == COUNTED_FAILURE or (outcome is None and trial.number not in retried)
    return taken


class SweepWorker:
    """Asks the study for trials and runs them until ``--trials`` are done (all workers together)."""

    def __init__(self, optuna: Any, study: Any, settings: SweepSettings, stop: StopRequests) -> None:
        self.optuna = optuna
        self.study = study
        self.settings = settings
        self.stop = stop
        self.distributions = {p.key: p.distribution() for p in settings.parameters}

    def run(self) -> str:
        """``completed`` when the study has all its trials, ``interrupted`` after a stop signal."""
        TrialState = self.optuna.trial.TrialState
        while self.stop.signal_name is None:
            self.requeue_lost_trials()
            trials = self.study.get_trials(deepcopy=False)
            queued = any(t.state == TrialState.WAITING for t in trials)  # ask() takes these first
            if places_taken(trials, self.optuna) >= self.settings.trials and not queued:
                if not any(t.state == TrialState.RUNNING for t in trials):
                    return "completed"
                time.sleep(min(1.0, self.settings.heartbeat_s))  # running elsewhere: wait
                continue
            trial = self.study.ask(self.distributions)
            ahead = places_taken(self.study.get_trials(deepcopy=False), self.optuna,
                                 among=lambda other: other.number < trial.number)
            if ahead >= self.settings.trials:  # another worker took the last place first
                trial.set_user_attr("outcome", "surplus")
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            self._run_trial(trial)
        return "interrupted"

    def requeue_lost_trials(self) -> None:
        """Fail running trials whose worker stopped beating, and queue their parameters again."""
        TrialState = self.optuna.trial.TrialState
        now = time.time()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.user_attrs.get("heartbeat")
            if last is None:
                last = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - last <= LOST_AFTER_HEARTBEATS * self.settings.heartbeat_s:
                continue
            try:
                # Failed without an outcome: until its retry is queued, it keeps its place.
                self.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, self.optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker got there first (or it just finished)
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            log.warning("trial %d: its worker stopped sending heartbeats (%.0f s ago); running its "
                        "parameters again", trial.number, now - last)

    def _run_trial(self, trial: Any) -> None:
        """Run ``trial`` as a child run, follow it to its end and tell the study how it ended."""
        settings, TrialState = self.settings, self.optuna.trial.TrialState
        trials_dir = settings.run_dir / "trials"
        run_dir = trials_dir / str(trial.number)
        if run_dir.exists():
            trial.set_user_attr("outcome", "refused")
            self.study.tell(trial, state=TrialState.FAIL)
            raise UsageError("--study", f"{run_dir} already exists, from another study in the same "
                                        f"run directory; choose another run.name (or remove "
                                        f"{settings.run_dir} to start over)")
        params = " ".join(format_override(k, v) for k, v in trial.params.items())
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        args = ([] if settings.config_path is None else ["--config", settings.config_path])
        args += [*TRIAL_DEFAULTS, *settings.overrides,
                 *(format_override(k, v) for k, v in trial.params.items()),
                 format_override("run.output_dir", str(trials_dir)),
                 format_override("run.name", str(trial.number))]
        log.info("trial %d: %s", trial.number, params)
        heartbeat = _Heartbeat(trial, settings.heartbeat_s)
        with heartbeat:
            child = ChildRun(args, settings.nproc, run_dir / "train.log")
            values, pruned_at = self._follow(trial, child)
        code = child.poll()

        # A run that finished before the stop signal reached it is not run again.
        interrupted = (self.stop.signal_name is not None and pruned_at is None
                       and _run_status(run_dir) not in ("completed", "early_stopped"))
        best = (max if settings.maximize else min)(values) if values else None
        if interrupted:
            if self._finish(trial, "interrupted", state=TrialState.FAIL):
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                log.info("trial %d: stopped by %s; its parameters are queued to run again",
                         trial.number, self.stop.signal_name)
        elif pruned_at is not None:
            # A pruned trial is never resumed: its preemption checkpoint is of no use.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            if self._finish(trial, "pruned", state=TrialState.PRUNED):
                log.info("trial %d: pruned at step %d (%s %.6g)", trial.number, pruned_at,
                         settings.metric, values[-1])
        elif code == 0 and best is not None:
            if self._finish(trial, "completed", value=best):
                log.info("trial %d: best %s %.6g", trial.number, settings.metric, best)
        else:
            reason = (f"exit code {code}: {child.last_lines(1)}" if code != 0 else
                      f"it logged no finite {settings.metric}")
            if self._finish(trial, COUNTED_FAILURE, state=TrialState.FAIL, reason=reason):
                log.warning("trial %d failed (%s); log: %s", trial.number, reason, child.log_path)
            if code == 2 and not self._any_finished():
                raise ConfigError("", f"the first trial stopped with a config error, so every trial "
                                      f"would: {child.last_lines(1)} (log: {child.log_path})")
            if code == 0 and not self._any_finished():
                raise UsageError("--metric", f"trial {trial.number} logged no finite "
                                             f"{settings.metric!r} (see {run_dir / 'metrics.jsonl'}); "
                                             f"does the data have a validation set with that metric?")

    def _finish(self, trial: Any, outcome: str, state: Any = None, value: float | None = None,
                reason: str | None = None) -> bool:
        """Record how the trial ended; False when another worker took it for lost meanwhile."""
        try:
            trial.set_user_attr("outcome", outcome)
            if reason is not None:
                trial.set_user_attr("reason", reason)
            self.study.tell(trial, value, state=state)
        except (ValueError, self.optuna.exceptions.UpdateFinishedTrialError):
            log.warning("trial %d was taken for lost by another worker (no heartbeat for %.0f s) "
                        "and runs again there; this result is dropped", trial.number,
                        LOST_AFTER_HEARTBEATS * self.settings.heartbeat_s)
            return False
        return True

    def _follow(self, trial: Any, child: ChildRun) -> tuple[list[float], int | None]:
        """Report each validation to Optuna until the run ends; returns (values, step pruned at)."""
        metric = self.settings.metric
        follower = MetricsFollower(self.settings.run_dir / "trials" / str(trial.number) / "metrics.jsonl")
        values: list[float] = []
        pruned_at: int | None = None
        while True:
            code = child.poll()  # before reading, so that the last read sees every record
            for record in follower.new_records():
                value, step = record.get(metric), record.get("step")
                if not (isinstance(value, (int, float)) and math.isfinite(value) and isinstance(step, int)):
                    continue
                values.append(float(value))
                if pruned_at is not None or child.stopped:
                    continue
                trial.report(float(value), step)
                if trial.should_prune():
                    pruned_at = step
                    child.stop()
            if code is not None:
                return values, pruned_at
            if self.stop.signal_name is not None:
                child.stop()
            time.sleep(POLL_S)

    def _any_finished(self) -> bool:
        """Whether any trial of the study completed or was pruned (by any worker)."""
        TrialState = self.optuna.trial.TrialState
        return any(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in self.study.get_trials(deepcopy=False))


def _run_status(run_dir: Path) -> str | None:
    """The status in a run's summary.json, None when there is none (yet)."""
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


class _Heartbeat:
    """Writes the time into the trial's ``heartbeat`` attribute every ``interval_s`` while active."""

    def __init__(self, trial: Any, interval_s: float) -> None:
        self.trial = trial
        self.interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def _beat(self) -> None:
        """The thread's loop: a heartbeat now, then every interval until the trial ends."""
        while True:
            self.trial.set_user_attr("heartbeat", time.time())
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> _Heartbeat:
        self.trial.set_user_attr("heartbeat", time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def write_outputs(optuna: Any, study: Any, settings: SweepSettings, status: str) -> dict[str, Any]:
    """sweep_summary.json, best.yaml (when a trial completed) and the plots; returns the summary."""
    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    summary: dict[str, Any] = {
        "study": study.study_name, "status": status, "metric": settings.metric,
        "direction": "maximize" if settings.maximize else "minimize",
        "trials_asked": settings.trials,
        "trials_done": places_taken(trials, optuna, among=lambda trial: trial.state.is_finished()),
        "best_value": best.value if best else None, "best_params": best.params if best else {},
        "best_trial": best.number if best else None,
        "best_run_dir": best.user_attrs.get("run_dir") if best else None,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                    "params": t.params,
                    **{key: t.user_attrs[key] for key in ("outcome", "reason", "retry_of", "run_dir")
                       if key in t.user_attrs}}
                   for t in trials],
    }
    run_dir = settings.run_dir
    atomic_write_json(run_dir / "sweep_summary.json", summary)
    if best is not None:
        config = load_config(settings.config_path, [
            *settings.overrides, *(format_override(k, v) for k, v in best.params.items()),
            format_override("run.output_dir", str(run_dir)), format_override("run.name", "best")])
        header = (f"# The sweep's base config with the best parameters of study {study.study_name!r}\n"
                  f"# (trial {best.number}, {settings.metric} {best.value:.6g}). Train with:\n"
                  f"#   ddp-train --config {run_dir / 'best.yaml'}\n")
        atomic_write(run_dir / "best.yaml", (header + config_to_yaml(config)).encode())
    _plot(optuna, study, run_dir, len(completed))
    return summary


def _plot(optuna: Any, study: Any, run_dir: Path, completed: int) -> None:
    """optimization_history.png and (with 2+ completed trials) param_importances.png.

    Optuna draws through pyplot and takes no axes to draw on. The backend is left as the
    user has it (no ``matplotlib.use``): without a display pyplot picks Agg by itself,
    and every figure is closed once written, so none is ever shown.
    """
    try:
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        log.warning('plots skipped: they need matplotlib (pip install "ddp_train[sweep]")')
        return
    charts = [("optimization_history.png", optuna_plots.plot_optimization_history)]
    if completed >= 2:
        charts.append(("param_importances.png", optuna_plots.plot_param_importances))
    for filename, draw in charts:
        try:
            axes = draw(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of values that never vary
            log.warning("%s skipped: %s", filename, exc)
            continue
        figure = axes.figure
        try:
            figure.set_size_inches(8, 4.5)
            figure.tight_layout()
            atomic_write(run_dir / filename, functools.partial(figure.savefig, format="png", dpi=120))
        finally:
            plt.close(figure)
