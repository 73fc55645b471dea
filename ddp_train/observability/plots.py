"""``ddp-train plot RUN_DIR``: charts of a run's metrics.jsonl as PNGs under RUN_DIR/plots.

Needs matplotlib (``pip install "ddp_train[plot]"``). Figures are drawn on their own
Agg canvas (:func:`new_chart`, which ``ddp-train lr-find`` draws with too), not through
pyplot, so plotting from a notebook or a script leaves the caller's matplotlib backend
and figures alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ddp_train.checkpoint.atomic import atomic_write
from ddp_train.errors import ConfigError, UsageError

# The task's headline validation metric, the first one present, and whether higher is better.
TASK_METRICS = (("val/accuracy", True), ("val/r2", True), ("val/perplexity", False))

Series = tuple[list[int], list[float]]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line torn by a kill is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> Series:
    """(steps, values) of ``key``; JSON nulls (non-finite values) are left out."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _best(series: Series, higher_is_better: bool) -> tuple[int, float]:
    """(step, value) of the series' best point."""
    steps, values = series
    pick = max if higher_is_better else min
    index = pick(range(len(values)), key=values.__getitem__)
    return steps[index], values[index]


def new_chart(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """``(figure, axes)``: an 8 × 4.5 in chart at 120 dpi on its own Agg canvas, gridded.

    Raises ImportError without matplotlib. Not through pyplot, so the caller's backend
    and figures are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def save_chart(figure: Any, axes: Any, path: Path) -> Path:
    """Write a :func:`new_chart` as a PNG file (atomically), with a legend when a line is labelled."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    atomic_write(path, lambda file: figure.savefig(file, format="png"))
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """Draw the run's charts into ``run_dir/plots``; returns the PNG files written.

    ``loss.png`` (train and validation loss, best validation step marked), ``metric.png``
    (accuracy, R² or perplexity), ``lr.png``, ``throughput.png`` and ``grad_norm.png``,
    each only when its metrics were logged.
    """
    if not run_dir.is_dir():
        raise UsageError("RUN_DIR", f"expected a run directory, got {str(run_dir)!r} (no such directory)")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UsageError("RUN_DIR", f"expected a run directory with a metrics.jsonl, got "
                                    f"{str(run_dir)!r} (it has none)")
    try:
        import matplotlib.backends.backend_agg  # noqa: F401 - before anything is drawn or written
    except ImportError:
        raise ConfigError("", 'plot needs matplotlib: pip install "ddp_train[plot]"') from None

    records = read_metrics(metrics_path)
    out_dir = run_dir / "plots"
    name = run_dir.name
    written: list[Path] = []

    def chart(title: str, ylabel: str) -> tuple[Any, Any]:
        """A chart over optimizer steps, titled with the run's name."""
        return new_chart(f"{title} — {name}", "optimizer step", ylabel)

    def save(figure: Any, axes: Any, filename: str) -> None:
        """Write the chart under ``plots/`` and record its path."""
        out_dir.mkdir(exist_ok=True)
        written.append(save_chart(figure, axes, out_dir / filename))

    train_loss, val_loss = _series(records, "train/loss"), _series(records, "val/loss")
    if train_loss[0] or val_loss[0]:
        figure, axes = chart("Loss: train vs validation", "loss")
        if train_loss[0]:
            axes.plot(*train_loss, label="train/loss", color="tab:blue", alpha=0.8)
        if val_loss[0]:
            axes.plot(*val_loss, label="val/loss", color="tab:orange", marker="o", markersize=4)
            _mark_best(axes, val_loss, higher_is_better=False, label="val/loss")
        _log_scale_if_wide(axes, train_loss[1] + val_loss[1])
        save(figure, axes, "loss.png")

    for key, higher_is_better in TASK_METRICS:
        series = _series(records, key)
        if series[0]:
            figure, axes = chart(f"Validation {key.split('/', 1)[1]}", key)
            axes.plot(*series, label=key, color="tab:green", marker="o", markersize=4)
            _mark_best(axes, series, higher_is_better, label=key)
            save(figure, axes, "metric.png")
            break

    for key, title, ylabel, filename, log_scale in (
            ("train/lr", "Learning rate", "learning rate", "lr.png", False),
            ("train/samples_per_s", "Throughput", "samples / s (all ranks)", "throughput.png", False),
            ("train/grad_norm", "Gradient norm (global, before clipping)", "grad norm", "grad_norm.png", True)):
        series = _series(records, key)
        if series[0]:
            figure, axes = chart(title, ylabel)
            axes.plot(*series, label=key, color="tab:purple")
            if log_scale:  # one spike would otherwise flatten everything else
                _log_scale_if_wide(axes, series[1])
            save(figure, axes, filename)

    if not written:
        raise UsageError("RUN_DIR", f"expected train/ or val/ metrics in {metrics_path}, found none "
                                    f"(was anything logged yet?)")
    return written


def _mark_best(axes: Any, series: Series, higher_is_better: bool, label: str) -> None:
    """A dashed line and a star at the series' best point, with its value in the legend."""
    step, value = _best(series, higher_is_better)
    axes.axvline(step, color="gray", linestyle="--", linewidth=1)
    axes.plot([step], [value], marker="*", markersize=14, color="red", linestyle="none",
              label=f"best {label} {value:.4g} at step {step}")


def _log_scale_if_wide(axes: Any, values: list[float]) -> None:
    """A log y-axis when positive values span more than 20×: early and late training both readable."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axes.set_yscale("log")
