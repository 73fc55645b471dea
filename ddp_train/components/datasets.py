"""Built-in data sets: small, deterministic, held in memory, no downloads.

Factories are registered in :data:`DATASETS` under the names used by ``data.name`` and
return ``(train_dataset, val_dataset)``. Their datasets say what task they pose and which
model sizes fit them (:class:`TensorPairDataset`), so ``python -m ddp_train`` needs no
model arguments.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import importlib.util
import inspect
import io
from pathlib import Path
from typing import Any

import numpy
import torch
from torch.utils.data import Dataset

from ddp_train.errors import ConfigError
from ddp_train.components.registry import Registry

DATASETS = Registry("data set", "data.name")

# Standard-library modules whose docstrings make up the ``chars`` corpus (about 120k
# characters on CPython 3.11). Fixed and sorted so every rank builds the same text.
CHARS_MODULES = (
    "argparse", "calendar", "collections", "csv", "dataclasses", "difflib", "fractions",
    "functools", "heapq", "inspect", "itertools", "json", "logging", "pathlib", "pickle",
    "pprint", "random", "re", "shlex", "statistics", "string", "textwrap", "unittest", "zipfile",
)


class TensorPairDataset(Dataset):
    """``(inputs[i], targets[i])`` pairs from two tensors with the same first dimension.

    ``task`` ("classification", "regression" or "language_model", or None when unknown)
    and ``model_hints`` (keyword arguments that make the built-in model factories fit the
    data, e.g. ``in_features``) are read by the trainer.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, task: str | None = None,
                 model_hints: dict[str, int] | None = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.task = task
        self.model_hints = dict(model_hints or {})

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def _check(ok: bool, arg: str, message: str) -> None:
    """Raise a ConfigError for ``data.args.<arg>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"data.args.{arg}", message)


def _val_size(n_samples: int, val_fraction: float, samples_arg: str) -> int:
    """Validation set size; both sets must be non-empty."""
    _check(0 < val_fraction < 1, "val_fraction", f"expected a number in (0, 1), got {val_fraction!r}")
    n_val = round(n_samples * val_fraction)
    _check(0 < n_val < n_samples, samples_arg,
           f"{n_samples} samples cannot be split into non-empty train and validation sets "
           f"with val_fraction={val_fraction}")
    return n_val


def _split(inputs: torch.Tensor, targets: torch.Tensor, n_val: int, task: str,
           model_hints: dict[str, int]) -> tuple[TensorPairDataset, TensorPairDataset]:
    """The last ``n_val`` samples for validation, the rest for training."""
    n_train = len(inputs) - n_val
    return (TensorPairDataset(inputs[:n_train], targets[:n_train], task, model_hints),
            TensorPairDataset(inputs[n_train:], targets[n_train:], task, model_hints))


def _digits_table() -> tuple[Any, Any]:
    """The digits' pixels (0-16) and labels, as ``sklearn.datasets.load_digits`` returns them.

    Read straight from the CSV that scikit-learn ships: importing scikit-learn takes over a
    second, which every default run (and every rank) would pay at start-up. Falls back to
    ``load_digits`` if a scikit-learn version keeps the file elsewhere.
    """
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = numpy.loadtxt(path, delimiter=",")  # what load_digits itself does
            return table[:, :-1], table[:, -1].astype(numpy.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


@DATASETS.register("digits")
def digits(val_fraction: float = 0.2, split_seed: int = 0) -> tuple[TensorPairDataset, TensorPairDataset]:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes), pixels in [0, 1]."""
    pixels, labels = _digits_table()
    inputs = torch.tensor(pixels, dtype=torch.float32) / 16.0
    targets = torch.tensor(labels, dtype=torch.int64)
    n_val = _val_size(len(inputs), val_fraction, "val_fraction")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(split_seed))
    hints = {"in_features": 64, "out_features": 10, "num_classes": 10, "in_channels": 1, "image_size": 8}
    return _split(inputs[order], targets[order], n_val, "classification", hints)


@DATASETS.register("synthetic_classification")
def synthetic_classification(n_samples: int = 1024, n_features: int = 16, n_classes: int = 4,
                             val_fraction: float = 0.2, noise: float = 1.0, seed: int = 0
                             ) -> tuple[TensorPairDataset, TensorPairDataset]:
    """Gaussian blobs around random class centres; ``noise`` is the blobs' standard deviation."""
    _check(n_features >= 1, "n_features", f"expected at least 1, got {n_features!r}")
    _check(n_classes >= 2, "n_classes", f"expected at least 2, got {n_classes!r}")
    _check(noise >= 0, "noise", f"expected a number >= 0, got {noise!r}")
    n_val = _val_size(n_samples, val_fraction, "n_samples")
    generator = torch.Generator().manual_seed(seed)
    # Centres about 4 apart whatever n_features: at noise 1 a linear model gets ~90%
    # right, so there is something to learn and room to see it learned.
    centres = torch.randn(n_classes, n_features, generator=generator) * (3.0 / n_features ** 0.5)
    targets = torch.randint(n_classes, (n_samples,), generator=generator)
    inputs = centres[targets] + noise * torch.randn(n_samples, n_features, generator=generator)
    hints = {"in_features": n_features, "out_features": n_classes, "num_classes": n_classes}
    return _split(inputs, targets, n_val, "classification", hints)


@DATASETS.register("synthetic_regression")
def synthetic_regression(n_samples: int = 1024, n_features: int = 16, n_targets: int = 1,
                         val_fraction: float = 0.2, noise: float = 0.1, seed: int = 0
                         ) -> tuple[TensorPairDataset, TensorPairDataset]:
    """A random linear map plus Gaussian noise: ``y = X @ W + b + noise * e``, targets ``(N, n_targets)``."""
    _check(n_features >= 1, "n_features", f"expected at least 1, got {n_features!r}")
    _check(n_targets >= 1, "n_targets", f"expected at least 1, got {n_targets!r}")
    _check(noise >= 0, "noise", f"expected a number >= 0, got {noise!r}")
    n_val = _val_size(n_samples, val_fraction, "n_samples")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_samples, n_features, generator=generator)
    # Scaled so the targets have unit variance whatever n_features.
    weight = torch.randn(n_features, n_targets, generator=generator) / n_features ** 0.5
    bias = torch.randn(n_targets, generator=generator)
    targets = inputs @ weight + bias + noise * torch.randn(n_samples, n_targets, generator=generator)
    hints = {"in_features": n_features, "out_features": n_targets}
    return _split(inputs, targets, n_val, "regression", hints)


def chars_corpus() -> str:
    """The ``chars`` text: the Zen of Python and docstrings of :data:`CHARS_MODULES`.

    Only text that ships with Python, so nothing is downloaded. Under ``python -OO``
    docstrings are gone and the corpus shrinks to the Zen.
    """
    # Importing ``this`` prints the Zen; the text is wanted, the print is not.
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    parts = [codecs.decode(this.s, "rot13")]
    for name in CHARS_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr, obj in sorted(vars(module).items()):
            # Public classes and functions defined in the module itself, not re-exports.
            if (not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                    and obj.__module__ == name and obj.__doc__):
                parts.append(inspect.cleandoc(obj.__doc__))
    return "\n\n".join(part for part in parts if part)


def _windows(ids: torch.Tensor, block_size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``ids[i:i+T]`` and next-token targets ``ids[i+1:i+T+1]`` for i = 0, stride, ..."""
    windows = ids.unfold(0, block_size + 1, stride)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@DATASETS.register("chars")
def chars(block_size: int = 64, val_fraction: float = 0.1, max_chars: int | None = None
          ) -> tuple[TensorPairDataset, TensorPairDataset]:
    """Character-level language modelling on :func:`chars_corpus` (the first ``max_chars`` of it).

    Items are ``(x, y)`` windows of ``block_size`` token ids, ``y`` being ``x`` shifted by
    one. Training windows start every ``block_size // 2`` characters of the first
    ``1 - val_fraction`` of the text, validation windows every ``block_size`` of the rest.
    """
    _check(block_size >= 2, "block_size", f"expected at least 2, got {block_size!r}")
    _check(max_chars is None or max_chars >= 1, "max_chars",
           f"expected at least 1 or null, got {max_chars!r}")
    _check(0 < val_fraction < 1, "val_fraction", f"expected a number in (0, 1), got {val_fraction!r}")
    text = chars_corpus()[:max_chars]
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    ids = torch.tensor([index[char] for char in text], dtype=torch.int64)
    n_val = round(len(ids) * val_fraction)
    # Each split needs one window of block_size inputs plus the shifted last target.
    _check(min(n_val, len(ids) - n_val) > block_size, "block_size",
           f"block_size {block_size} is too long for a corpus of {len(ids)} characters split "
           f"{len(ids) - n_val}/{n_val} (val_fraction={val_fraction})")
    hints = {"vocab_size": len(vocab), "block_size": block_size}
    train = TensorPairDataset(*_windows(ids[:-n_val], block_size, block_size // 2),
                              "language_model", hints)
    val = TensorPairDataset(*_windows(ids[-n_val:], block_size, block_size), "language_model", hints)
    return train, val
