"""``ddp-train export RUN_DIR``: a trained model as ONNX, ``torch.export`` and TorchScript files.

The model is rebuilt from the run's ``config.yaml`` as the Trainer builds it
(:class:`~ddp_train.components.parts.PartsBuilder`), loaded from ``model.pt``
(``weights_only``), and exported with a dynamic batch axis. Every file is then run on
real validation batches of several sizes (onnxruntime for ONNX) and compared with the
eager model: a difference over the tolerance fails the export (exit 1) and no manifest
is written, so an export directory with a ``manifest.json`` always holds files that
answer like the model.

Optional steps: ``--prune AMOUNT`` (L1 unstructured magnitude pruning of Linear/Conv
weights, made permanent, before exporting) and ``--quantize int8`` (onnxruntime's
dynamic int8 quantization of the ONNX file, the maintained path, rather than the
deprecated ``torch.ao.quantization``); both report the validation metrics before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import platform
import re
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from ddp_train.components.losses import LossFn
from ddp_train.components.parts import PartsBuilder
from ddp_train.config import TrainConfig, load_config
from ddp_train.errors import ExportFailed, UsageError, first_line
from ddp_train.extras import require
from ddp_train.tools.manifest import (BATCH_AXIS, FORMAT_FILES, FORMAT_VERSION, MANIFEST_NAME, sha256_of,
                                     write_manifest)
from ddp_train.training.metrics import MetricAccumulator
from ddp_train.training.rng import seed_everything
from ddp_train.version import __version__

FORMATS = ("onnx", "exported", "torchscript")
"""The formats ``--format all`` writes, in the order they are exported."""
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
"""What the ONNX format and int8 quantization need: the ``export`` extra."""
INPUT_NAME, OUTPUT_NAME = "input", "output"
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` ``--prune`` prunes."""
TORCHSCRIPT_NOTE = ("legacy: torch.jit.trace is deprecated in PyTorch; prefer model.pt2 "
                    "(torch.export) or model.onnx. A trace records one path through the model: "
                    "Python control flow is frozen at what the example batch took.")
QUANTIZATION_METHOD = ("onnxruntime.quantization.quantize_dynamic: int8 weights (per tensor), "
                       "activations quantized per batch at run time, in the operators onnxruntime "
                       "quantizes dynamically (MatMul/Gemm of Linear layers, Conv, ...)")
_METRIC_KEYS = ("val/loss", "val/accuracy", "val/f1_macro", "val/mse", "val/mae", "val/r2",
                "val/perplexity")
"""The validation metrics reported before and after quantization and pruning."""

log = logging.getLogger("ddp_train")


@dataclass
class ExportRequest:
    """What ``ddp-train export`` was asked for."""

    run_dir: Path
    out_dir: Path
    formats: tuple[str, ...] = FORMATS
    quantize: str | None = None
    prune: float | None = None
    tolerance: float = 1e-4
    batch_size: int | None = None


@dataclass
class RunModel:
    """A run's model in eval mode with its data, as the run's config describes them."""

    config: TrainConfig
    model: nn.Module
    train_dataset: Dataset
    val_dataset: Dataset
    val_is_train: bool
    task: str
    loss_fn: LossFn


def check_request(request: ExportRequest) -> None:
    """Usage errors (exit 2) before anything is loaded or written."""
    run_dir = request.run_dir
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            reason = "does not exist" if not run_dir.is_dir() else f"has no {name}"
            raise UsageError("RUN_DIR", f"expected a finished run directory (config.yaml and "
                                        f"model.pt), but {str(run_dir)!r} {reason}")
    if not request.formats:
        raise UsageError("--format", "expected at least one format")
    if request.quantize is not None and "onnx" not in request.formats:
        raise UsageError("--quantize", "int8 quantization works on the ONNX file: "
                                       "use --format onnx or --format all")
    if request.prune is not None and not 0 < request.prune < 1:
        raise UsageError("--prune", f"expected a fraction of weights in (0, 1), got {request.prune!r}")
    if not request.tolerance > 0:
        raise UsageError("--tolerance", f"expected a number > 0, got {request.tolerance!r}")
    if request.batch_size is not None and request.batch_size < 2:
        raise UsageError("--batch-size", f"expected at least 2 (a batch of 1 would fix the "
                                         f"batch axis), got {request.batch_size!r}")
    if "onnx" in request.formats:
        require(ONNX_MODULES, "export", "the ONNX format", "--format")


def load_run_model(run_dir: Path) -> RunModel:
    """Rebuild the run's model and data from ``config.yaml`` and load ``model.pt`` into it."""
    config = load_config(run_dir / "config.yaml")
    builder = PartsBuilder(config)
    # As the Trainer does: a data factory that draws from the global RNG builds the same data.
    seed_everything(config.run.seed)
    parts = builder.build()
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding more than tensors
        raise UsageError("RUN_DIR", f"cannot load {run_dir / 'model.pt'} as a state dict "
                                    f"({first_line(exc)})") from None
    try:
        parts.model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError("RUN_DIR", f"{run_dir / 'model.pt'} does not fit the model config.yaml "
                                    f"describes ({first_line(exc)})") from None
    train_dataset, val_dataset = parts.train_dataset, parts.val_dataset
    val_is_train = val_dataset is None or len(val_dataset) == 0  # type: ignore[arg-type]
    if val_is_train:
        log.warning("the run has no validation data: parity and metrics use the training data")
    return RunModel(config, parts.model.eval(), train_dataset,
                    train_dataset if val_is_train else val_dataset,  # type: ignore[arg-type]
                    val_is_train, parts.task, parts.loss_fn)


# ---------------------------------------------------------------------------------------
# Data


def _inputs(batch: Any) -> torch.Tensor:
    """The input tensor of a collated ``(inputs, targets)`` batch."""
    inputs = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else None
    if not isinstance(inputs, torch.Tensor):
        raise ExportFailed(f"export handles models with one tensor input, but the data's items "
                           f"are not (tensor, target) pairs (a batch is a {type(batch).__name__}"
                           f"{'' if inputs is None else f' whose inputs are a {type(inputs).__name__}'})")
    return inputs


def _examples(dataset: Dataset, start: int, count: int) -> torch.Tensor:
    """Inputs ``start .. start+count`` of ``dataset`` as one batch (wrapping around)."""
    size = len(dataset)  # type: ignore[arg-type]
    return _inputs(default_collate([dataset[(start + i) % size] for i in range(count)]))


def check_batches(dataset: Dataset, batch_size: int) -> list[torch.Tensor]:
    """Real batches of three sizes: the example batch, a single example, and an odd size between."""
    size = len(dataset)  # type: ignore[arg-type]
    other = max(batch_size // 2 + 1, 3) if batch_size != 3 else 2
    return [_examples(dataset, 0, batch_size), _examples(dataset, batch_size % size, 1),
            _examples(dataset, (batch_size + 1) % size, other)]


def input_stats(dataset: Dataset) -> dict[str, Any]:
    """Mean and (population) standard deviation of every input feature over ``dataset``.

    Features are the elements of one flattened example; float64 sums keep the
    statistics exact enough for drift monitoring whatever the data set's size.
    """
    total = squares = None
    samples = 0
    for batch in DataLoader(dataset, batch_size=1024):
        flat = _inputs(batch).reshape(len(batch[0]), -1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        squares = (flat * flat).sum(0) if squares is None else squares + (flat * flat).sum(0)
        samples += len(flat)
    assert total is not None and squares is not None
    mean = total / samples
    std = (squares / samples - mean * mean).clamp(min=0).sqrt()
    return {"samples": samples, "mean": mean.tolist(), "std": std.tolist()}


def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], run: RunModel, batch_size: int
             ) -> dict[str, float]:
    """Validation metrics of ``predict`` (inputs → outputs) over the whole validation set.

    The same accumulator as training's validation, so the numbers compare with ``val/...``
    in the run's metrics.jsonl.
    """
    accumulator = MetricAccumulator(run.task, torch.device("cpu"))
    with torch.no_grad():
        for batch in DataLoader(run.val_dataset, batch_size=batch_size):
            inputs, targets = _inputs(batch), batch[1]
            outputs = predict(inputs)
            accumulator.update(outputs, targets, run.loss_fn(outputs, targets))
    metrics = accumulator.compute(lambda totals: totals)
    return {key: float(metrics[key]) for key in _METRIC_KEYS if key in metrics}


# ---------------------------------------------------------------------------------------
# Exporters: each writes its file and returns a callable that runs the file, and what
# the manifest should say about the file besides its checks.

Runner = Callable[[torch.Tensor], torch.Tensor]
Exported = tuple[Runner, dict[str, Any]]


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
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
        with warnings.catch_warnings(), _quiet_console():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for one input whose first dimension is the batch (1 or more)."""
    return ({0: torch.export.Dim(BATCH_AXIS, min=1)},)


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Exported:
    """``model.pt2``: ``torch.export`` with a dynamic batch axis, saved and loaded back."""
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()
    return loaded, {}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Exported:
    """``model.onnx``: ``torch.onnx.export(dynamo=True)``, run back with onnxruntime.

    One self-contained file (no external weights file), so models up to ONNX's 2 GB limit.
    """
    with _quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_batch(),
                                    external_data=False, verbose=False)
        assert program is not None
        program.save(path)
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return onnx_runner(path), {"opset": opset}


def onnx_runner(path: Path) -> Runner:
    """Run an ONNX file with onnxruntime on torch tensors."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: torch.from_numpy(session.run(None, {INPUT_NAME: inputs.numpy()})[0])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Exported:
    """``model.ts``: ``torch.jit.trace`` (legacy), saved and loaded back.

    The tracer's warnings (a branch frozen, a Python value recorded as a constant) go
    to the manifest: they say where the trace may not generalise.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_console():
            traced = torch.jit.trace(model, example)
            traced.save(str(path))
            loaded = torch.jit.load(str(path))
    tracer_warnings = sorted({first_line(w.message) for w in caught
                              if issubclass(w.category, torch.jit.TracerWarning)})
    return loaded, {"note": TORCHSCRIPT_NOTE, "tracer_warnings": tracer_warnings}


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Exported]] = {
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
        construct = "the model fixes the batch size (a dynamic batch axis is required): "
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


# ---------------------------------------------------------------------------------------
# Pruning and quantization


def prune_model(model: nn.Module, amount: float) -> dict[str, Any]:
    """L1 unstructured pruning of each Linear/Conv weight in place, made permanent.

    A weight shared with another module (GPT's tied lm_head) is left alone: pruning
    replaces the parameter and would untie it.
    """
    owners = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, PRUNABLE) and owners[id(module.weight)] == 1]
    if not layers:
        raise UsageError("--prune", "the model has no Linear or Conv layer to prune")
    for _, module in layers:
        torch_prune.l1_unstructured(module, "weight", amount=amount)
        torch_prune.remove(module, "weight")  # permanent: a plain weight with zeros in it
    zeros = sum(int((module.weight == 0).sum()) for _, module in layers)
    total = sum(module.weight.numel() for _, module in layers)
    return {"method": "torch.nn.utils.prune.l1_unstructured per layer, made permanent "
                      "(prune.remove); files stay dense, so their size does not shrink",
            "amount": amount, "layers": [name for name, _ in layers],
            "weight_sparsity": zeros / total}


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of an ONNX file with onnxruntime's tools."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger
    try:
        with _quiet_console():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------
# The command


def _file_entry(path: Path) -> dict[str, Any]:
    """The manifest's entry of an exported file: its name, SHA-256 and size."""
    return {"file": path.name, "sha256": sha256_of(path), "size_bytes": path.stat().st_size}


def _max_abs_diff(runner: Runner, reference: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """Largest absolute difference between ``runner`` and the eager outputs over ``batches``."""
    worst = 0.0
    with torch.no_grad():
        for inputs, expected in zip(batches, reference):
            got = runner(inputs)
            if got.shape != expected.shape:
                raise ExportFailed(f"answers a batch of {len(inputs)} with shape "
                                   f"{tuple(got.shape)}, the model with {tuple(expected.shape)}")
            worst = max(worst, float((got.double() - expected.double()).abs().max()))
    return worst


def _versions() -> dict[str, str]:
    """The versions of ddp_train and the libraries that wrote and checked the export."""
    versions = {"ddp_train": __version__, "torch": str(torch.__version__),
                "python": platform.python_version(), "numpy": np.__version__}
    for name in ONNX_MODULES:
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def export_run(request: ExportRequest) -> dict[str, Any]:
    """Export, check and describe a run's model; returns the manifest written to ``out_dir``.

    Raises :class:`ExportFailed` (exit 1) when a format cannot be exported or answers
    differently from the model, :class:`UsageError` (exit 2) for a bad request and
    :class:`~ddp_train.errors.ConfigError` (exit 2) for a run config that no longer builds.
    """
    check_request(request)
    run = load_run_model(request.run_dir)
    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # A failed export must not leave an older manifest vouching for newer files.
    for name in (MANIFEST_NAME, *FORMAT_FILES.values()):
        (out / name).unlink(missing_ok=True)

    config = run.config
    eval_batch = config.eval.batch_size or config.data.batch_size
    batch_size = min(request.batch_size or eval_batch, max(len(run.val_dataset), 2))  # type: ignore[arg-type]
    batch_size = max(batch_size, 2)
    batches = check_batches(run.val_dataset, batch_size)
    model = run.model

    pruning = None
    if request.prune is not None:
        before = evaluate(model, run, eval_batch)
        pruning = prune_model(model, request.prune)
        pruning.update(metrics_before=before, metrics_after=evaluate(model, run, eval_batch))
        log.info("pruned %.0f%% of the weights: %s", 100 * pruning["weight_sparsity"],
                 _compare(before, pruning["metrics_after"]))

    with torch.no_grad():
        reference = [model(inputs) for inputs in batches]
    example, output = batches[0], reference[0]
    sizes = [len(inputs) for inputs in batches]
    formats: dict[str, Any] = {}
    runners: dict[str, Runner] = {}
    for fmt in FORMATS:
        if fmt not in request.formats:
            continue
        path = out / FORMAT_FILES[fmt]
        try:
            runners[fmt], details = EXPORTERS[fmt](model, example, path)
            diff = _max_abs_diff(runners[fmt], reference, batches)
        except ExportFailed as exc:
            raise ExportFailed(f"{path.name}: {exc}") from None
        except Exception as exc:  # the exporters raise many kinds; all mean "cannot export"
            raise ExportFailed(f"{path.name}: cannot export the model: {describe_failure(exc)}") from None
        if not diff <= request.tolerance:
            raise ExportFailed(f"{path.name} answers differently from the model: max abs "
                               f"difference {diff:.3g} > tolerance {request.tolerance:g} on "
                               f"validation batches of sizes {sizes}")
        formats[fmt] = {**_file_entry(path), "max_abs_diff": diff, "checked_batch_sizes": sizes,
                        **details}
        log.info("%s: max abs difference %.2g on batches of %s, %d bytes", path.name, diff,
                 sizes, formats[fmt]["size_bytes"])

    quantization = None
    if request.quantize is not None:
        path = out / FORMAT_FILES["onnx_int8"]
        quantize_int8(out / FORMAT_FILES["onnx"], path)
        quantized = onnx_runner(path)
        formats["onnx_int8"] = {**_file_entry(path),
                                "max_abs_diff": _max_abs_diff(quantized, reference, batches),
                                "checked_batch_sizes": sizes,
                                "note": "quantized: differs from the model by design, see quantization"}
        before = evaluate(runners["onnx"], run, eval_batch)
        after = evaluate(quantized, run, eval_batch)
        quantization = {"method": QUANTIZATION_METHOD, "dtype": request.quantize,
                        "fp32_size_bytes": formats["onnx"]["size_bytes"],
                        "int8_size_bytes": formats["onnx_int8"]["size_bytes"],
                        "size_ratio": formats["onnx_int8"]["size_bytes"] / formats["onnx"]["size_bytes"],
                        "metrics_before": before, "metrics_after": after}
        log.info("int8: %.2fx the fp32 size; %s", quantization["size_ratio"], _compare(before, after))

    manifest = {
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run_dir": str(request.run_dir.resolve()), "model_file": "model.pt",
                   "model_sha256": sha256_of(request.run_dir / "model.pt"),
                   "model": {"name": config.model.name, "args": config.model.args},
                   "data": {"name": config.data.name, "args": config.data.args},
                   "parity_data": "training set (the run has no validation set)" if run.val_is_train
                   else "validation set"},
        "task": run.task,
        "num_classes": int(output.shape[-1]) if run.task in ("classification", "language_model") else None,
        "input": {"name": INPUT_NAME, "shape": [BATCH_AXIS, *example.shape[1:]],
                  "dtype": str(example.dtype).removeprefix("torch."), **_integer_range(run, example)},
        "output": {"name": OUTPUT_NAME, "shape": [BATCH_AXIS, *output.shape[1:]],
                   "dtype": str(output.dtype).removeprefix("torch.")},
        "input_stats": input_stats(run.train_dataset),
        "example_batch_size": batch_size,
        "parity_tolerance": request.tolerance,
        "formats": formats,
        "quantization": quantization,
        "pruning": pruning,
        "versions": _versions(),
    }
    write_manifest(out, manifest)
    return manifest


def _integer_range(run: RunModel, example: torch.Tensor) -> dict[str, list[int]]:
    """``{"range": [low, high]}`` for integer inputs (token ids), which index an embedding.

    The data set's ``vocab_size`` hint when it gives one, else the training data's extremes.
    """
    if example.dtype.is_floating_point or example.dtype.is_complex:
        return {}
    vocab = getattr(run.train_dataset, "model_hints", {}).get("vocab_size")
    if vocab is not None:
        return {"range": [0, int(vocab) - 1]}
    low = high = None
    for batch in DataLoader(run.train_dataset, batch_size=1024):
        inputs = _inputs(batch)
        low = int(inputs.min()) if low is None else min(low, int(inputs.min()))
        high = int(inputs.max()) if high is None else max(high, int(inputs.max()))
    return {"range": [low, high]}


def _compare(before: dict[str, float], after: dict[str, float]) -> str:
    """``key before -> after`` of each metric in both, for the log."""
    return ", ".join(f"{key} {before[key]:.4g} -> {after[key]:.4g}" for key in before if key in after)


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``export`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} export", description="Export a finished run's model (config.yaml + model.pt) "
        "with a dynamic batch axis, check every file against the model on real validation batches "
        "(a difference over the tolerance fails, exit 1), and write manifest.json: input/output "
        "names, shapes and dtypes, checksums, the differences, the task and the training inputs' "
        "mean/std for drift monitoring. ONNX needs: pip install \"ddp_train[export]\".")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a finished run directory")
    parser.add_argument("--format", default="all", choices=("onnx", "exported", "torchscript", "all"),
                        help="model.onnx (torch.onnx, dynamo), model.pt2 (torch.export), model.ts "
                             "(torch.jit.trace, legacy) or all three (default)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="also write model.int8.onnx (onnxruntime dynamic quantization) and "
                             "report its size and validation metrics against fp32")
    parser.add_argument("--prune", type=float, metavar="AMOUNT",
                        help="first zero this fraction of each Linear/Conv weight (L1 unstructured, "
                             "permanent) and report validation metrics before and after")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default RUN_DIR/export)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference from the model allowed (default 1e-4)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="example batch size (default: the run's validation batch size)")
    return parser


def command(argv: list[str], prog: str) -> int:
    """``export``: export, check and describe a run's model, then print the output directory."""
    args = _parser(prog).parse_args(argv)
    request = ExportRequest(args.run_dir, args.out or args.run_dir / "export",
                            FORMATS if args.format == "all" else (args.format,), args.quantize,
                            args.prune, args.tolerance, args.batch_size)
    export_run(request)
    print(request.out_dir)
    return 0
