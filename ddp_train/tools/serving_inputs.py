"""The model server's request bodies, parsed and checked against the export's manifest.

``{"inputs": [...]}`` for a model with one input, or ``{"inputs": {"input_ids": [...],
"attention_mask": [...]}}`` naming each input: one example or a batch, each input checked
for its type, shape (dynamic axes within their bounds, shared axes of one length across
inputs), range and finiteness, with an error that names the input and what was expected.
No torch: the onnxruntime server never loads it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ddp_train.tools.manifest import BATCH_AXIS


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a message naming what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InputSpec:
    """One input the manifest describes: its name, example shape, dtype and value range.

    The example shape holds numbers (fixed lengths) and names (dynamic axes, such as a
    padded ``sequence``; several inputs naming one axis must agree on its length).
    """

    def __init__(self, entry: dict[str, Any], limits: dict[str, int]) -> None:
        self.name: str = entry["name"]
        self.example_shape: tuple[int | str, ...] = tuple(
            size if isinstance(size, str) else int(size) for size in entry["shape"][1:])
        self.dtype = np.dtype(entry["dtype"])
        self.integers = self.dtype.kind in "iu"
        self.range: list[int] | None = None
        if self.integers:
            # Token ids index an embedding: outside its range the model itself would fail.
            info = np.iinfo(self.dtype)
            self.range = entry.get("range") or [int(info.min), int(info.max)]
        self.limits = {axis: limits[axis] for axis in self.example_shape if axis in limits}

    @property
    def dynamic(self) -> bool:
        """Whether an example's shape has a dynamic axis (its examples differ in length)."""
        return any(isinstance(size, str) for size in self.example_shape)

    def shape_text(self, max_batch: int) -> str:
        """The accepted shapes, for error messages."""
        one = [str(size) for size in self.example_shape]
        text = (f"[{', '.join(one)}] for one example or [N{''.join(', ' + d for d in one)}] "
                f"for a batch of N ≤ {max_batch}")
        bounds = [f"{axis}: any length ≥ 1" + (f" up to {self.limits[axis]}" if axis in self.limits else "")
                  for axis in self.example_shape if isinstance(axis, str)]
        return text + (f" ({'; '.join(bounds)})" if bounds else "")

    def values(self, value: Any, label: str, max_batch: int, booleans: bool) -> np.ndarray:
        """``value`` as an array of numbers of this input's kind, not yet converted.

        ``booleans``: whether the body holds a ``true``/``false`` token somewhere.
        """
        expected = f"{'integers' if self.integers else 'numbers'} ({self.dtype.name})"
        if not isinstance(value, list):
            raise BadRequest(422, f"{label}: expected a (nested) list of {expected} of shape "
                                  f"{self.shape_text(max_batch)}, got a JSON {_json_type(value)}")
        if not value:
            raise BadRequest(422, f"{label}: expected at least one example of shape "
                                  f"{list(self.example_shape)}, got an empty list")
        try:
            array = np.asarray(value)
        except (ValueError, RecursionError):
            pad = " (pad them to one length; attention_mask marks the padding)" if self.dynamic else ""
            raise BadRequest(422, f"{label}: expected a rectangular array of shape {self.shape_text(max_batch)}, "
                                  f"but its rows differ in length or depth{pad}") from None
        # numpy turns a mix of booleans and numbers into numbers without a word. In a body
        # whose only key is "inputs" and whose inputs hold no strings (else the dtype is not
        # numeric), a true/false token is exactly such a boolean: a regex finds it fast.
        if array.dtype.kind not in ("iu" if self.integers else "iuf") or booleans:
            bad = _first_non_number(value, integers=self.integers)
            if bad is not None:
                where, item = bad
                raise BadRequest(422, f"{label}: expected {expected}, got {_describe(item)} at {where}")
            if array.dtype.kind not in "iuf":  # every leaf a number, yet no numeric array
                raise BadRequest(422, f"{label}: expected {expected} that fit in {self.dtype.name}")
        return array

    def lengths(self, array: np.ndarray, label: str, max_batch: int) -> tuple[bool, dict[str, int]]:
        """Whether ``array`` is one example, and the length of each named axis (the batch's too)."""
        rank = len(self.example_shape)
        if array.ndim not in (rank, rank + 1):
            raise BadRequest(422, f"{label}: expected shape {self.shape_text(max_batch)}, got {list(array.shape)}")
        single = array.ndim == rank
        lengths = {BATCH_AXIS: 1 if single else len(array)}
        for expected, got in zip(self.example_shape, array.shape[0 if single else 1:]):
            if isinstance(expected, int):
                if got != expected:
                    raise BadRequest(422, f"{label}: expected shape {self.shape_text(max_batch)}, "
                                          f"got {list(array.shape)}")
                continue
            if got < 1 or got > self.limits.get(expected, got):
                raise BadRequest(422, f"{label}: its {expected} axis has length {got}; expected shape "
                                      f"{self.shape_text(max_batch)}")
            lengths[expected] = got
        return single, lengths

    def convert(self, array: np.ndarray, label: str, single: bool) -> np.ndarray:
        """``array`` as a batch of this input's dtype; 422 for values out of range or not finite."""
        batch = array[None] if single else array
        if self.range is not None:
            low, high = self.range
            outside = (array < low) | (array > high)
            if outside.any():
                where = [int(i) for i in np.argwhere(outside)[0]] if array.ndim else []
                raise BadRequest(422, f"{label}: expected integers in [{low}, {high}] (the model's input "
                                      f"range), got {int(array[tuple(where)])} at {where}")
            return batch.astype(self.dtype, copy=False)
        converted = batch.astype(self.dtype)
        if not np.isfinite(converted).all():
            where = [int(i) for i in np.argwhere(~np.isfinite(converted))[0]]
            if single:
                where = where[1:]
            value = float(array[tuple(where)])
            beyond = f" (beyond {self.dtype.name}'s range)" if np.isfinite(value) else ""
            raise BadRequest(422, f"{label}: expected finite {self.dtype.name} numbers, got "
                                  f"{value!r}{beyond} at {where}")
        return converted


class ModelInputs:
    """The model's inputs, and the parsing of request bodies against them.

    ``{"inputs": [...]}`` for a model with one input; ``{"inputs": {"input_ids": [...],
    "attention_mask": [...]}}`` names each input (any model).
    """

    def __init__(self, manifest: dict[str, Any], max_batch: int) -> None:
        limits = manifest.get("axis_limits") or {}
        self.specs = [InputSpec(entry, limits) for entry in manifest["inputs"]]
        self.max_batch = max_batch

    @property
    def names(self) -> list[str]:
        """The input names, in the order the model takes them."""
        return [spec.name for spec in self.specs]

    def warm_up_batch(self) -> dict[str, np.ndarray]:
        """A batch of one example, every dynamic axis of length 1, every value the lowest allowed."""
        return {spec.name: np.full((1, *(1 if isinstance(size, str) else size for size in spec.example_shape)),
                                   spec.range[0] if spec.range is not None else 0, dtype=spec.dtype)
                for spec in self.specs}

    def parse(self, body: bytes) -> tuple[dict[str, np.ndarray], bool]:
        """The batch a body carries, each input as the model's dtype, and whether it was one example."""
        if not body.strip():
            raise BadRequest(400, 'request body is empty; expected JSON {"inputs": [...]}')
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite as exc:
            raise BadRequest(422, f"inputs: expected finite numbers, got {exc}") from None
        except RecursionError:
            raise BadRequest(400, "request body is nested too deeply to parse") from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise BadRequest(400, f'request body is not valid JSON ({exc}); expected {{"inputs": [...]}}') from None
        if not isinstance(payload, dict) or "inputs" not in payload:
            got = "an object without 'inputs'" if isinstance(payload, dict) else f"a JSON {_json_type(payload)}"
            raise BadRequest(422, f'expected a JSON object {{"inputs": [...]}}, got {got}')
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise BadRequest(422, f"unexpected key {extra[0]!r}; the body holds only 'inputs'")
        named = self._named(payload["inputs"])
        # Errors name the input: "inputs" itself when it is the list of the only input.
        labels = {name: "inputs" if isinstance(payload["inputs"], list) else f"inputs.{name}" for name in named}
        booleans = _BOOLEAN.search(body) is not None
        arrays, shapes, lengths = {}, {}, {}
        for spec in self.specs:
            arrays[spec.name] = spec.values(named[spec.name], labels[spec.name], self.max_batch, booleans)
            shapes[spec.name], lengths[spec.name] = spec.lengths(arrays[spec.name], labels[spec.name],
                                                                 self.max_batch)
        single = self._agree(shapes, lengths)
        size = 1 if single else len(next(iter(arrays.values())))
        if size > self.max_batch:
            raise BadRequest(413, f"inputs: a batch of {size} examples is over this server's "
                                  f"limit of {self.max_batch} (--max-batch); split it")
        converted = {spec.name: spec.convert(arrays[spec.name], labels[spec.name], single) for spec in self.specs}
        return converted, single

    def _named(self, inputs: Any) -> dict[str, Any]:
        """``inputs`` by input name: a list is the one input; an object must name every input."""
        names = self.names
        if isinstance(inputs, dict):
            missing = [name for name in names if name not in inputs]
            unexpected = sorted(set(inputs) - set(names))
            if missing or unexpected:
                problem = (f"lacks {missing[0]!r}" if missing
                           else f"has {unexpected[0]!r}, which the model does not take")
                raise BadRequest(422, f"inputs: expected the model's inputs {names}, but the object {problem}")
            return inputs
        if len(names) == 1:
            return {names[0]: inputs}
        example = ", ".join(f'"{name}": [...]' for name in names)
        raise BadRequest(422, f"inputs: this model takes several inputs: expected an object "
                              f"{{{example}}}, got a JSON {_json_type(inputs)}")

    def _agree(self, shapes: dict[str, bool], lengths: dict[str, dict[str, int]]) -> bool:
        """Whether the request is one example; 422 unless every input is, or every input is a
        batch, and inputs that share an axis give it one length."""
        first = self.specs[0].name
        for name, single in shapes.items():
            if single != shapes[first]:
                kinds = {True: "one example", False: "a batch"}
                raise BadRequest(422, f"inputs: {first!r} is {kinds[shapes[first]]} but {name!r} is "
                                      f"{kinds[single]}: send all inputs alike")
        seen: dict[str, tuple[str, int]] = {}
        for name, axes in lengths.items():
            for axis, length in axes.items():
                other, known = seen.setdefault(axis, (name, length))
                if known != length:
                    raise BadRequest(422, f"inputs: {other!r} and {name!r} share the {axis} axis but have "
                                          f"lengths {known} and {length} along it")
        return shapes[first]


_BOOLEAN = re.compile(rb"\b(?:true|false)\b")


class _NonFinite(ValueError):
    """NaN or Infinity in the body (JSON has no such numbers; Python's parser accepts them)."""


def _reject_constant(name: str) -> Any:
    """``json.loads``' hook for NaN and ±Infinity: refuse them."""
    raise _NonFinite(name)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """A short description of a value that is not a valid input number, for error messages."""
    kind = _json_type(value)
    if isinstance(value, int) and kind == "number":
        return f"the integer {value} (out of range)"
    if kind == "number":
        return f"the non-integer {value!r}"
    text = json.dumps(value)
    return f"a {kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _first_non_number(value: Any, integers: bool) -> tuple[list[int], Any] | None:
    """The index path and value of the first leaf that is not a number (or not an integer).

    numpy would silently turn ``true`` into 1 and ``"1.5"`` into 1.5 in some mixes,
    hence the walk over the parsed JSON itself.
    """
    stack: list[tuple[list[int], Any]] = [([], value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, list):
            stack.extend((where + [i], child) for i, child in reversed(list(enumerate(item))))
        elif (type(item) is int and _INT64_MIN <= item <= _INT64_MAX) or (type(item) is float and not integers):
            continue
        else:
            return where, item
    return None
