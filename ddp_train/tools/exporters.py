"""The export formats: each exporter writes its file from an :class:`ExportSubject` and returns
a callable that runs the file back, for the parity check.

``model.onnx`` (``torch.onnx.export(dynamo=True)``, run back with onnxruntime), ``model.pt2``
(``torch.export``) and ``model.ts`` (``torch.jit.trace``, legacy). What an exporter raises is
summed up in one line by :func:`describe_failure`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddp_train.errors import first_line
from ddp_train.tools.export_inputs import Axes, Inputs, Prediction

OUTPUT_NAME = "output"
TORCHSCRIPT_NOTE = ("legacy: torch.jit.trace is deprecated in PyTorch; prefer model.pt2 "
                    "(torch.export) or model.onnx. A trace records one path through the model: "
                    "Python control flow is frozen at what the example batch took.")


Runner = Callable[..., torch.Tensor]
"""Runs an exported file: input tensors (the layout's order) → the prediction."""
Exported = tuple[Runner, dict[str, Any]]


@dataclass
class ExportSubject:
    """What every format exports: the model's :class:`Prediction`, an example, the dynamic axes."""

    module: Prediction
    example: Inputs
    names: tuple[str, ...]
    axes: Axes
    _program: torch.export.ExportedProgram | None = None

    def program(self) -> torch.export.ExportedProgram:
        """The ``torch.export`` program (made once)."""
        if self._program is None:
            with _quiet():
                self._program = torch.export.export(self.module, self.example,
                                                    dynamic_shapes=self.axes.dynamic_shapes())
        return self._program

    def axis_limits(self) -> dict[str, int]:
        """What torch.export found bounds the dynamic axes; empty when it cannot capture the model
        (the formats report why: this is only a description)."""
        try:
            program = self.program()
        except Exception:  # noqa: BLE001 — the exporters' many kinds; the formats report them
            return {}
        return self.axes.limits(program)


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Swallow what a library prints (progress lines, advice, graph dumps) while it runs."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' progress prints, warnings and graph dumps off the console.

    What matters reaches the user through the exception (see :func:`describe_failure`).
    """
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_console():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def export_program(subject: ExportSubject, path: Path) -> Exported:
    """``model.pt2``: ``torch.export`` with the dynamic axes, saved and loaded back."""
    program = subject.program()
    with _quiet():
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()
    return loaded, {}


def export_onnx(subject: ExportSubject, path: Path) -> Exported:
    """``model.onnx``: ``torch.onnx.export(dynamo=True)``, run back with onnxruntime.

    One self-contained file (no external weights file), so models up to ONNX's 2 GB limit.
    """
    with _quiet():
        program = torch.onnx.export(subject.module, subject.example, dynamo=True,
                                    input_names=list(subject.names), output_names=[OUTPUT_NAME],
                                    dynamic_shapes=subject.axes.dynamic_shapes(),
                                    external_data=False, verbose=False)
        assert program is not None
        program.save(path)
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return onnx_runner(path, subject.names), {"opset": opset}


def onnx_runner(path: Path, names: tuple[str, ...]) -> Runner:
    """Run an ONNX file with onnxruntime on torch tensors (its inputs in ``names`` order)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: tensor.numpy() for name, tensor in zip(names, inputs)}
        return torch.from_numpy(session.run(None, feed)[0])
    return run


def export_torchscript(subject: ExportSubject, path: Path) -> Exported:
    """``model.ts``: ``torch.jit.trace`` (legacy), saved and loaded back.

    The tracer's warnings (a branch frozen, a Python value recorded as a constant) go
    to the manifest: they say where the trace may not generalise.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_console():
            traced = torch.jit.trace(subject.module, subject.example)
            traced.save(str(path))
            loaded = torch.jit.load(str(path))
    tracer_warnings = sorted({first_line(w.message) for w in caught
                              if issubclass(w.category, torch.jit.TracerWarning)})
    return loaded, {"note": TORCHSCRIPT_NOTE, "tracer_warnings": tracer_warnings}


EXPORTERS: dict[str, Callable[[ExportSubject, Path], Exported]] = {
    "onnx": export_onnx, "exported": export_program, "torchscript": export_torchscript}


def describe_failure(exc: BaseException) -> str:
    """One line on why an exporter failed: the operator or construct, and where in the model.

    The exporters' messages run to pages (graph dumps, links, advice); the useful parts
    are the missing ONNX operator, the first line of the innermost error, and the model
    code that raised it.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = "\n".join(str(item) for item in chain)
    operator = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'", text)
    if operator:
        name = operator.group(1) + ("" if operator.group(2) == "default" else f".{operator.group(2)}")
        return f"operator {name} has no ONNX translation in torch.onnx"
    root = chain[-1]
    first = re.sub(r"\x1b\[[0-9;]*m", "", first_line(root))
    construct = ""
    if "data-dependent" in text:
        construct = "data-dependent control flow or shape (Python code that reads tensor values): "
    elif "Constraints violated" in text or "specialized" in text:
        construct = ("the model fixes the length of an axis the validation batches vary (the batch, "
                     "or a padded sequence): ")
    return f"{construct}{type(root).__name__}: {first}{_model_frame(chain, text)}"


def _model_frame(chain: list[BaseException], text: str) -> str:
    """`` at FILE:LINE in FUNC: CODE`` for the model code that raised, when it can be found."""
    named = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)\s*\n\s*(.+)',
                      text)
    if named:
        return f" at {named.group(1)}:{named.group(2)} in {named.group(3)}: {named.group(4).strip()}"
    torch_dir = str(Path(torch.__file__).parent)
    for item in reversed(chain):
        frames = [f for f in traceback.extract_tb(item.__traceback__)
                  if not f.filename.startswith(torch_dir) and "site-packages" not in f.filename
                  and not f.filename.startswith(str(Path(__file__).parent))]
        if frames:
            frame = frames[-1]
            return f" at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return ""
