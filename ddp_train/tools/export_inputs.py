"""What ``ddp-train export`` exports: a run's batches as named input tensors, and the model as
a function of them.

A batch of the batch contract (:func:`~ddp_train.training.batches.split_batch`) becomes the
exported graph's inputs: one tensor is ``input``; several positional ones are named after
the model's ``forward`` parameters; a mapping's entries keep their keys, without the targets.
:class:`Prediction` wraps the model so that every format takes those tensors and returns
the prediction. :class:`Axes` says which axes are dynamic: the batch, and every axis the
check batches vary (a padded sequence, shared by the inputs that have it).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ddp_train.errors import ExportFailed
from ddp_train.tools.manifest import BATCH_AXIS, SEQUENCE_AXIS
from ddp_train.training.batches import ModelCall, describe, read_output, split_batch

INPUT_NAME = "input"
"""The name of a model's only input when it takes one tensor."""
Inputs = tuple[torch.Tensor, ...]
"""One batch's input tensors, in the layout's order."""
SCAN_FOR_SHAPES = 64
"""Validation items searched for a single example whose shape differs from the example batch's."""


class InputLayout:
    """How a batch becomes the exported graph's named input tensors, and those a model call.

    The batch is split as training splits it (:func:`~ddp_train.training.batches.split_batch`):
    one input tensor is named ``input``; several positional ones are named after the model's
    ``forward`` parameters; a mapping's entries keep their keys, without the targets
    (``data.target_key``), which a served model is not given.
    """

    def __init__(self, model: nn.Module, target_key: str, example: Any) -> None:
        self.target_key = target_key
        call = split_batch(example, target_key)
        self.positional = len(call.args)
        if self.positional == 1:
            positional_names: list[str] = [INPUT_NAME]
        else:
            positional_names = _parameter_names(model, self.positional)
        self.names = (*positional_names, *self._keyword_inputs(call, example))

    def _keyword_inputs(self, call: ModelCall, batch: Any) -> dict[str, Any]:
        """The call's keyword inputs, without the targets a mapping batch carries."""
        return {key: value for key, value in call.kwargs.items()
                if not (key == self.target_key and isinstance(batch, Mapping))}

    def tensors(self, batch: Any) -> Inputs:
        """``batch``'s inputs in :attr:`names` order; ExportFailed for one that is not a tensor."""
        call = split_batch(batch, self.target_key)
        named = {**dict(zip(self.names, call.args)), **self._keyword_inputs(call, batch)}
        if len(call.args) != self.positional or set(named) != set(self.names):
            raise ExportFailed(f"the validation batches differ in their inputs: expected "
                               f"{list(self.names)}, got {describe(batch)}")
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                raise ExportFailed(f"export takes tensor inputs, but the batch's {name!r} is "
                                   f"{describe(value)}")
        return tuple(named[name] for name in self.names)


def _parameter_names(model: nn.Module, count: int) -> list[str]:
    """The names of the first ``count`` positional parameters of ``model.forward``.

    ``input_0``, ``input_1``, ... when ``forward`` takes ``*args`` or cannot be inspected.
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters[:count] if p.kind in kinds]
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


class Prediction(nn.Module):
    """The model as a function of its named input tensors that returns its prediction.

    This is what every format exports: positional tensors in the layout's order, rebuilt
    into the model's call, and the prediction read out of whatever the model returns
    (a tensor, a tuple, a Hugging Face ``ModelOutput``).
    """

    def __init__(self, model: nn.Module, layout: InputLayout) -> None:
        super().__init__()
        self.model = model
        self.positional = layout.positional
        self.keywords = layout.names[layout.positional:]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(*inputs[:self.positional], **dict(zip(self.keywords, inputs[self.positional:])))
        prediction = read_output(output).prediction
        if prediction is None:
            raise ExportFailed("the model returns only a loss when given no labels: export needs "
                               "a prediction (a tensor, or 'logits')")
        return prediction


def is_empty(dataset: Dataset) -> bool:
    """Whether a map-style or iterable data set yields no item."""
    return not first_items(dataset, 1)


def first_items(dataset: Dataset, count: int) -> list[Any]:
    """The first ``count`` items of a map-style or iterable data set (fewer if it has fewer)."""
    if isinstance(dataset, IterableDataset):
        return list(itertools.islice(iter(dataset), count))
    return [dataset[i] for i in range(min(count, len(dataset)))]  # type: ignore[arg-type]


def check_batches(items: list[Any], batch_size: int, collate: Callable[[list[Any]], Any]) -> list[Any]:
    """Real batches of three sizes: the example batch, a single example, and an odd size between.

    The single example is the first after the example batch whose collated shapes differ from
    the example batch's (a padding collator pads to the longest item): an axis is exported
    as dynamic only when these batches vary it, so every dynamic axis is checked.
    """
    def batch(start: int, count: int) -> Any:
        return collate([items[(start + i) % len(items)] for i in range(count)])

    example = batch(0, batch_size)
    shapes = _shapes(example)
    single = next((candidate for candidate in (batch(batch_size + i, 1) for i in range(SCAN_FOR_SHAPES))
                   if [s[1:] for s in _shapes(candidate)] != [s[1:] for s in shapes]),
                  batch(batch_size, 1))
    other = max(batch_size // 2 + 1, 3) if batch_size != 3 else 2
    return [example, single, batch(batch_size + 1, other)]


def _shapes(batch: Any) -> list[tuple[int, ...]]:
    """The shapes of the tensors in a batch, in order (for comparing batches)."""
    if isinstance(batch, torch.Tensor):
        return [tuple(batch.shape)]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return [shape for value in values for shape in _shapes(value)]


@dataclass
class Axes:
    """Which axes of each input (and of the output) are dynamic, and their names.

    Axis 0 is the batch. Another axis is dynamic when the check batches vary its length;
    dynamic axes whose lengths agree in every check batch are one axis (a padded
    sequence in ``input_ids`` and ``attention_mask``) with one name.
    """

    inputs: list[list[int | str]]
    output: list[int | str]

    @classmethod
    def of(cls, batches: list[Inputs], outputs: list[torch.Tensor]) -> Axes:
        groups: dict[tuple[int, ...], str] = {}

        def shape(lengths: list[torch.Size], new_names: bool) -> list[int | str]:
            named: list[int | str] = [BATCH_AXIS]
            for axis in range(1, len(lengths[0])):
                sizes = tuple(int(size[axis]) for size in lengths)
                if len(set(sizes)) == 1:
                    named.append(sizes[0])
                    continue
                if sizes not in groups and new_names:
                    groups[sizes] = SEQUENCE_AXIS if not groups else f"{SEQUENCE_AXIS}_{len(groups) + 1}"
                named.append(groups.get(sizes, "dynamic"))
            return named

        inputs = [shape([batch[i].shape for batch in batches], True) for i in range(len(batches[0]))]
        return cls(inputs, shape([output.shape for output in outputs], False))

    def dynamic_shapes(self) -> tuple[tuple[dict[int, Any], ...]]:
        """``dynamic_shapes`` for :class:`Prediction`'s ``*inputs``: every named axis dynamic.

        ``Dim.DYNAMIC`` lets torch.export find each axis' range and the equalities between
        inputs itself (a Hugging Face model's position table bounds its sequence length).
        """
        return (tuple({axis: torch.export.Dim.DYNAMIC for axis, size in enumerate(shape)
                       if isinstance(size, str)} for shape in self.inputs),)

    def limits(self, program: torch.export.ExportedProgram) -> dict[str, int]:
        """The largest length of each named non-batch axis that ``program`` accepts, where bounded."""
        placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
        limits: dict[str, int] = {}
        for name, shape in zip(program.graph_signature.user_inputs, self.inputs):
            dims = placeholders[name].meta["val"].shape
            for axis, size in enumerate(shape):
                if not isinstance(size, str) or size == BATCH_AXIS or not isinstance(dims[axis], torch.SymInt):
                    continue
                bounds = program.range_constraints.get(dims[axis].node.expr)
                if bounds is not None and bounds.upper.is_Integer:  # not torch's int_oo
                    limits[size] = min(int(bounds.upper), limits.get(size, int(bounds.upper)))
        return limits


def input_stats(batches: Iterable[Any], layout: InputLayout, axes: Axes
                ) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Per input, the mean and (population) std of every feature over ``batches`` (the
    training data); and per integer input, its smallest and largest value.

    Features are the elements of one flattened example, for the inputs whose examples all
    have one shape (no dynamic axis besides the batch); float64 sums keep the statistics
    exact enough for drift monitoring whatever the data set's size.
    """
    sums: dict[str, list[Any]] = {}  # name -> [Σx, Σx², samples]
    extremes: dict[str, list[int]] = {}
    for batch in batches:
        for name, tensor, shape in zip(layout.names, layout.tensors(batch), axes.inputs):
            if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
                low, high = extremes.get(name, [int(tensor.min()), int(tensor.max())])
                extremes[name] = [min(low, int(tensor.min())), max(high, int(tensor.max()))]
            if all(isinstance(size, int) for size in shape[1:]):
                flat = tensor.reshape(len(tensor), -1).double()
                total = sums.setdefault(name, [0.0, 0.0, 0])
                total[0] = total[0] + flat.sum(0)
                total[1] = total[1] + (flat * flat).sum(0)
                total[2] += len(flat)
    stats = {}
    for name, (total, squares, samples) in sums.items():
        mean = total / samples
        std = (squares / samples - mean * mean).clamp(min=0).sqrt()
        stats[name] = {"samples": samples, "mean": mean.tolist(), "std": std.tolist()}
    return stats, extremes
