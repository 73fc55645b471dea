"""``ddp-train cv``: k-fold cross-validation, one ordinary training run per fold.

The configured data set's *training* set is split into K folds (scikit-learn's ``KFold``,
or ``StratifiedKFold`` with ``--stratified``, shuffled with ``run.seed``): every sample is
in exactly one validation fold. Its own validation set is left aside (keep it as the
final test set). Fold k trains in ``<run_dir>/folds/<k>/`` on the other folds and
validates on fold k; the split is written to ``<run_dir>/folds/<k>/split.json`` and the
run reads it through the data factory :func:`fold`, so each fold is an ordinary run
(``data.name: ddp_train.tools.cross_validation:fold``) that resumes, and can be re-run, alone.

``<run_dir>/cv_summary.json`` holds each fold's sizes and final validation metrics, and
their mean and standard deviation (population, as scikit-learn's ``cross_val_score(...).std()``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset, Subset

from ddp_train.checkpoint.atomic import atomic_write, atomic_write_json, json_text
from ddp_train.components.datasets import DATASETS
from ddp_train.components.parts import PartsBuilder, build_datasets
from ddp_train.config import format_override, load_config
from ddp_train.errors import ConfigError, TrainingFailed, UsageError
from ddp_train.tools.child_runs import POLL_S, ChildRun, StopRequests
from ddp_train.training.rng import seed_everything

log = logging.getLogger("ddp_train")

FACTORY = "ddp_train.tools.cross_validation:fold"
"""The ``data.name`` of every fold run: :func:`fold` of this module."""


class FoldSubset(Subset):
    """A subset that keeps what the trainer reads from its data set (task, model size hints)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, indices)
        self.task = getattr(dataset, "task", None)
        self.model_hints = dict(getattr(dataset, "model_hints", {}))


def class_labels(dataset: Dataset) -> list[int]:
    """Every sample's integer class label (for stratification)."""
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "tensors"):  # torch's TensorDataset
        targets = dataset.tensors[1]
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    labels = []
    for target in targets:
        value = target.item() if hasattr(target, "item") and getattr(target, "numel", lambda: 1)() == 1 else target
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError("--stratified", f"needs one integer class label per sample, got "
                                             f"{type(target).__name__} {str(target)[:60]}")
        labels.append(value)
    return labels


def make_folds(n_samples: int, folds: int, seed: int, labels: list[int] | None = None
               ) -> list[tuple[list[int], list[int]]]:
    """(train indices, validation indices) of each fold; stratified when ``labels`` are given."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if labels is None:
        splitter: Any = KFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(range(n_samples))
    else:
        smallest = min(labels.count(label) for label in set(labels))
        if smallest < folds:
            raise UsageError("--stratified", f"a class has only {smallest} samples, fewer than "
                                             f"the {folds} folds")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(range(n_samples), labels)
    return [(sorted(map(int, train)), sorted(map(int, val))) for train, val in splits]


def fold(data: str, split: str, args: dict[str, Any] | None = None) -> tuple[FoldSubset, FoldSubset]:
    """Data factory of a fold run: data set ``data`` (with ``args``), split by the file ``split``.

    Returns (the training set without fold k, fold k) as subsets of ``data``'s training set.
    """
    key = "data.args.data"
    train, _ = build_datasets(DATASETS.resolve(data, key), data, dict(args or {}), key)
    path = Path(split)
    try:
        indices = json.loads(path.read_text(encoding="utf-8"))
        train_indices, val_indices = indices["train_indices"], indices["val_indices"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("data.args.split", f"cannot read the fold split {split!r}: {exc}") from None
    n_samples = len(train)  # type: ignore[arg-type]
    if any(not 0 <= i < n_samples for i in (*train_indices, *val_indices)):
        raise ConfigError("data.args.split", f"{split!r} does not fit {data!r}: it has indices "
                                             f"beyond its {n_samples} training samples")
    return FoldSubset(train, train_indices), FoldSubset(train, val_indices)


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``cv`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} cv",
        description="K-fold cross-validation on the configured data set's training set: one "
                    "training run per fold in <run_dir>/folds/<k>/ (torchrun when --nproc > 1), "
                    "then <run_dir>/cv_summary.json with each fold's final validation metrics and "
                    "their mean and std. Running the same command again resumes unfinished folds.",
        epilog="KEY=VALUE overrides use dotted keys, as for training.")
    parser.add_argument("--folds", type=int, required=True, metavar="K", help="number of folds (>= 2)")
    parser.add_argument("--stratified", action="store_true",
                        help="keep each class's share equal across folds (needs class labels)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N", help="ranks per fold run (default 1)")
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def command(argv: list[str], prog: str) -> int:
    """``cv``: train every fold, then summarise."""
    args = _parser(prog).parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.folds < 2:
        raise UsageError("--folds", f"expected an integer >= 2, got {args.folds}")
    if args.nproc < 1:
        raise UsageError("--nproc", f"expected an integer >= 1, got {args.nproc}")
    builder = PartsBuilder(config)
    # Seeded as each fold run's Trainer seeds before building its data, so a data set drawn
    # from the global RNG has the same samples (and labels) here as in every fold.
    seed_everything(config.run.seed)
    train = builder.datasets()[0]
    n_samples = len(train)  # type: ignore[arg-type]
    if n_samples < args.folds:
        raise UsageError("--folds", f"{args.folds} folds need at least as many training samples; "
                                    f"the data has {n_samples}")
    labels = class_labels(train) if args.stratified else None
    splits = make_folds(n_samples, args.folds, config.run.seed, labels)

    run_dir = config.run_dir
    folds_dir = run_dir / "folds"
    fold_args = []
    for k, (train_indices, val_indices) in enumerate(splits):
        split_path = folds_dir / str(k) / "split.json"
        split = {"fold": k, "folds": args.folds, "stratified": args.stratified,
                 "seed": config.run.seed, "train_indices": train_indices, "val_indices": val_indices}
        _write_split(split_path, split)
        overrides = [*args.overrides, format_override("data.name", FACTORY),
                     format_override("data.args", {"data": config.data.name, "args": config.data.args,
                                                   "split": str(split_path)}),
                     format_override("run.output_dir", str(folds_dir)),
                     format_override("run.name", str(k))]
        load_config(args.config, overrides)  # a bad fold config fails here, before any run
        fold_args.append(([] if args.config is None else ["--config", args.config]) + overrides)

    log.info("cv: %d%s folds of %d training samples | %s", args.folds,
             " stratified" if args.stratified else "", n_samples, run_dir)
    results = []
    with StopRequests() as stop:
        for k, child_args in enumerate(fold_args):
            if stop.signal_name is not None:
                break
            results.append(_run_fold(k, child_args, args.nproc, folds_dir / str(k), splits[k], stop))
    interrupted = stop.signal_name is not None
    summary = _summary(results, args.folds, args.stratified, config.run.seed,
                       "interrupted" if interrupted else "completed")
    atomic_write_json(run_dir / "cv_summary.json", summary)
    if interrupted:
        log.info("cv interrupted after %d of %d folds; run the same command again to continue",
                 sum(r["status"] in ("completed", "early_stopped") for r in results), args.folds)
        return 0
    failed = [r["fold"] for r in results if r["status"] not in ("completed", "early_stopped")]
    for key, mean in summary["mean"].items():
        log.info("%s: %.4g ± %.4g", key, mean, summary["std"][key])
    log.info("cv summary: %s", run_dir / "cv_summary.json")
    if failed:
        raise TrainingFailed(f"fold(s) {', '.join(map(str, failed))} failed; see their train.log "
                             f"under {folds_dir}")
    return 0


def _write_split(path: Path, split: dict[str, Any]) -> None:
    """Write a fold's split; a different split already there (another cv in this run dir) is an error."""
    if path.exists():
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == split
        except ValueError:
            same = False
        if not same:
            raise ConfigError("run.name", f"{path.parent} holds a fold of a different split (other "
                                          f"--folds, --stratified, run.seed or data); choose another "
                                          f"run.name or remove {path.parent.parent}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json_text(split) + "\n").encode())


def _run_fold(k: int, child_args: list[str], nproc: int, fold_dir: Path,
              split: tuple[list[int], list[int]], stop: StopRequests) -> dict[str, Any]:
    """Train fold ``k`` to the end (or until a stop signal); its row of the summary."""
    log.info("fold %d: %d train, %d validation samples", k, len(split[0]), len(split[1]))
    child = ChildRun(child_args, nproc, fold_dir / "train.log")
    while child.poll() is None:
        if stop.signal_name is not None:
            child.stop()
        time.sleep(POLL_S)
    code = child.poll()
    try:
        summary = json.loads((fold_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if code == 2:
        raise ConfigError("", f"fold {k}: {child.last_lines(1)} (log: {child.log_path})")
    status = summary.get("status", "failed") if code == 0 else "failed"
    if status == "failed":
        log.warning("fold %d failed (exit code %s): %s", k, code, child.last_lines(1))
    final = {key: value for key, value in summary.get("final", {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"fold": k, "n_train": len(split[0]), "n_val": len(split[1]), "status": status,
            "run_dir": str(fold_dir), "final": final}


def _summary(results: list[dict[str, Any]], folds: int, stratified: bool, seed: int, status: str
             ) -> dict[str, Any]:
    """Per-fold rows plus mean and std of every final metric the finished folds share."""
    finished = [r for r in results if r["status"] in ("completed", "early_stopped")]
    keys = sorted(set.intersection(*(set(r["final"]) for r in finished))) if finished else []
    mean, std = {}, {}
    for key in keys:
        values = [float(r["final"][key]) for r in finished]
        mean[key] = sum(values) / len(values)
        std[key] = math.sqrt(sum((v - mean[key]) ** 2 for v in values) / len(values))
    return {"status": status, "folds": folds, "stratified": stratified, "seed": seed,
            "folds_finished": len(finished), "per_fold": results, "mean": mean, "std": std}
