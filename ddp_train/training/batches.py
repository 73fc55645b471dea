"""The batch contract: how a batch becomes a model call, and what a model's output means.

A batch is a pair ``(inputs, targets)`` — ``inputs`` a tensor (``model(inputs)``), a
tuple/list (``model(*inputs)``) or a mapping (``model(**inputs)``) — or a mapping, passed
whole as ``model(**batch)`` with the targets under ``data.target_key`` (the Hugging Face
convention). A model returns a tensor (the prediction), a tuple/list (its first element is
the prediction) or a mapping/object with ``loss`` and/or ``logits`` (a Hugging Face
``ModelOutput``). Anything else is a :class:`~ddp_train.errors.BatchError`: one line naming
what was received, exit 2.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ddp_train.errors import BatchError

IGNORE_INDEX = -100
"""Targets with this value are not trained or counted (PyTorch's and Hugging Face's convention)."""


@dataclass(slots=True)
class ModelCall:
    """One batch as a model call: ``model(*args, **kwargs)``, and the targets (None when absent)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Any

    def run(self, model: Callable[..., Any]) -> Any:
        """The model's raw output for this batch."""
        return model(*self.args, **self.kwargs)


@dataclass(slots=True)
class ModelOutput:
    """What a model returned: the prediction and the model's own loss, each None when absent."""

    prediction: torch.Tensor | None
    loss: torch.Tensor | None


def split_batch(batch: Any, target_key: str = "labels") -> ModelCall:
    """``batch`` as a :class:`ModelCall`; BatchError for a form outside the contract."""
    if isinstance(batch, Mapping):
        return ModelCall((), dict(batch), batch.get(target_key))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, torch.Tensor):
            return ModelCall((inputs,), {}, targets)
        if isinstance(inputs, Mapping):
            return ModelCall((), dict(inputs), targets)
        if isinstance(inputs, (tuple, list)):
            return ModelCall(tuple(inputs), {}, targets)
        raise BatchError(f"expected the inputs of an (inputs, targets) batch to be a tensor, a "
                         f"tuple/list or a mapping of tensors, got {describe(inputs)}")
    raise BatchError(f"expected a batch (inputs, targets) or a mapping such as "
                     f"{{'input_ids': ..., 'labels': ...}}, got {describe(batch)}")


def check_batch(call: ModelCall) -> None:
    """BatchError unless the model call carries a tensor and every value is one a model can take.

    Called on the first batches only: a batch of strings (a text column left in, a missing
    tokenizer) fails here with its structure instead of deep inside the model.
    """
    values = [*call.args, *call.kwargs.values()]
    if not any(_holds_tensor(value) for value in values):
        raise BatchError(f"expected the model's inputs to hold at least one tensor, got "
                         f"{describe(call.kwargs or call.args)}; tokenize or convert the data "
                         f"(data.collate names a collate function)")
    for name, value in [*enumerate(call.args), *call.kwargs.items()]:
        if _holds_text(value):
            where = f"entry {name!r}" if isinstance(name, str) else f"input {name}"
            raise BatchError(f"the model's {where} is {describe(value)}: a model takes tensors; "
                             f"tokenize it in the data set or in data.collate, or drop it")


def check_signature(model: Callable[..., Any], call: ModelCall) -> None:
    """BatchError when the model's ``forward`` cannot take the call's arguments (first batch only).

    Looks through wrappers (DDP's ``module``, torch.compile's ``_orig_mod``) to the user's model.
    """
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module  # type: ignore[attr-defined]
    try:
        signature = inspect.signature(model.forward if isinstance(model, nn.Module) else model)
    except (TypeError, ValueError):
        return  # no introspectable signature: the call itself decides
    try:
        signature.bind(*call.args, **call.kwargs)
    except TypeError as exc:
        given = describe(call.kwargs) if call.kwargs else describe(call.args)
        raise BatchError(f"the model's forward{signature} does not take the batch's inputs {given} "
                         f"({exc})") from None


def read_output(output: Any) -> ModelOutput:
    """The prediction and loss in a model's ``output``; BatchError when it holds neither."""
    if isinstance(output, torch.Tensor):
        return ModelOutput(output, None)
    if isinstance(output, Mapping):
        loss, logits = output.get("loss"), output.get("logits")
    elif hasattr(output, "loss") or hasattr(output, "logits"):
        loss, logits = getattr(output, "loss", None), getattr(output, "logits", None)
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return ModelOutput(output[0], None)
    else:
        loss = logits = None
    if isinstance(loss, torch.Tensor) or isinstance(logits, torch.Tensor):
        return ModelOutput(logits if isinstance(logits, torch.Tensor) else None,
                           loss if isinstance(loss, torch.Tensor) else None)
    raise BatchError(f"expected the model to return a tensor, a tuple/list starting with one, or "
                     f"a mapping/object with 'loss' or 'logits', got {describe(output)}", "model")


def samples_in(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    tensor = _first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise BatchError(f"cannot tell how many samples the batch holds: {describe(batch)}")
    return int(tensor.shape[0])


def label_shift(model: nn.Module) -> int:
    """1 for a Hugging Face causal LM, which predicts token t+1 at position t of ``labels``; else 0.

    Such a model shifts the labels inside its loss; the token counts and the accuracy must
    shift them alike. Other models' predictions line up with their targets.
    """
    if not type(model).__module__.startswith("transformers."):
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return int(type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


def counted_targets(targets: torch.Tensor, shift: int) -> torch.Tensor:
    """How many target elements a token-averaged loss averages over (a tensor, no host sync)."""
    if shift:
        targets = targets[..., shift:]
    return (targets != IGNORE_INDEX).sum()


def describe(value: Any, depth: int = 0) -> str:
    """A short description of a value's type and structure, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if depth >= 2:
        return type(value).__name__
    if isinstance(value, Mapping):
        items = ", ".join(f"{key!r}: {describe(item, depth + 1)}" for key, item in list(value.items())[:6])
        more = ", ..." if len(value) > 6 else ""
        return f"{type(value).__name__} {{{items}{more}}}"
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(item, str) for item in value):
            return f"{type(value).__name__} of {len(value)} str"
        items = ", ".join(describe(item, depth + 1) for item in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__} of {len(value)} [{items}{more}]"
    if isinstance(value, str):
        return f"str {value[:20]!r}" + ("..." if len(value) > 20 else "")
    return type(value).__name__


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _holds_tensor(value: Any) -> bool:
    return _first_tensor(value) is not None


def _holds_text(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, Mapping):
        return any(_holds_text(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_text(item) for item in value)
    return False
