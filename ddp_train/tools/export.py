"""``ddp-train export RUN_DIR``: a trained model as ONNX, ``torch.export`` and TorchScript files.

The model is rebuilt from the run's ``config.yaml`` as the Trainer builds it
(:class:`~ddp_train.components.parts.PartsBuilder`: this imports and calls the factories
the config names, so a run directory is code), loaded from ``model.pt`` (``weights_only``),
and exported as a function of its named input tensors that returns its prediction: the
validation data, collated by the run's ``data.collate``, is split by the batch contract
(one tensor, several, or a mapping such as ``input_ids`` and ``attention_mask``), and the
batch axis and every axis the validation batches vary (a padded sequence) are dynamic.
Every file is then run on real validation batches of several sizes (onnxruntime for ONNX)
and compared with the eager model: a difference over the tolerance fails the export
(exit 1) and no manifest is written, so an export directory with a ``manifest.json``
always holds files that answer like the model.

Optional steps: ``--prune AMOUNT`` (L1 unstructured magnitude pruning of Linear/Conv
weights, made permanent, before exporting) and ``--quantize int8`` (onnxruntime's
dynamic int8 quantization of the ONNX file, the maintained path, rather than the
deprecated ``torch.ao.quantization``); both report the validation metrics before and after.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
from collections import Counter
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
from ddp_train.tools.export_inputs import (SCAN_FOR_SHAPES, Axes, InputLayout, Inputs, Prediction,
                                          check_batches, first_items, input_stats, is_empty)
from ddp_train.tools.exporters import (EXPORTERS, OUTPUT_NAME, ExportSubject, Runner, describe_failure,
                                       onnx_runner, quiet_console)
from ddp_train.tools.manifest import FORMAT_FILES, FORMAT_VERSION, MANIFEST_NAME, sha256_of, write_manifest
from ddp_train.training.batches import label_shift, samples_in, split_batch
from ddp_train.training.metrics import MetricAccumulator
from ddp_train.training.rng import seed_everything
from ddp_train.version import __version__

FORMATS = ("onnx", "exported", "torchscript")
"""The formats ``--format all`` writes, in the order they are exported."""
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
"""What the ONNX format and int8 quantization need: the ``export`` extra."""
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` ``--prune`` prunes."""
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
    collate: Callable[[list[Any]], Any]
    """data.collate, or torch's default: how the run turned items into batches."""
    label_shift: int
    """1 for a Hugging Face causal LM, whose prediction at position t is of label t+1."""

    def loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """``dataset`` in order, in batches as the run collated them (map-style or iterable)."""
        return DataLoader(dataset, batch_size=batch_size, collate_fn=self.collate)


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
    """Rebuild the run's model and data from ``config.yaml`` and load ``model.pt`` into it.

    This imports and calls the factories the config names (``package.module:attr``): a run
    directory is code, to be exported only when you trust where it came from.
    """
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
    val_is_train = val_dataset is None or is_empty(val_dataset)
    if val_is_train:
        log.warning("the run has no validation data: parity and metrics use the training data")
    return RunModel(config, parts.model.eval(), train_dataset,
                    train_dataset if val_is_train else val_dataset,  # type: ignore[arg-type]
                    val_is_train, parts.task, parts.loss_fn, parts.collate or default_collate,
                    label_shift(parts.model))


def evaluate(predict: Callable[..., torch.Tensor], run: RunModel, layout: InputLayout, batch_size: int
             ) -> dict[str, float]:
    """Validation metrics of ``predict`` (input tensors → prediction) over the whole validation set.

    The same accumulator as training's validation, so the numbers compare with ``val/...``
    in the run's metrics.jsonl; the loss is ``loss.name`` on the prediction (what a model
    that computes its own loss computes, for cross entropy). Empty when the batches carry
    no targets.
    """
    accumulator = MetricAccumulator(run.task, torch.device("cpu"), run.label_shift)
    with torch.no_grad():
        for batch in run.loader(run.val_dataset, batch_size):
            targets = split_batch(batch, layout.target_key).targets
            if not isinstance(targets, torch.Tensor):
                return {}
            prediction = predict(*layout.tensors(batch))
            shift = run.label_shift
            loss = (run.loss_fn(prediction[..., :-shift, :], targets[..., shift:]) if shift
                    else run.loss_fn(prediction, targets))
            accumulator.update(loss, prediction, targets, samples_in(batch))
    metrics = accumulator.compute(lambda totals: totals)
    return {key: float(metrics[key]) for key in _METRIC_KEYS if key in metrics}


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
        with quiet_console():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------------------------
# The command


def _file_entry(path: Path) -> dict[str, Any]:
    """The manifest's entry of an exported file: its name, SHA-256 and size."""
    return {"file": path.name, "sha256": sha256_of(path), "size_bytes": path.stat().st_size}


def _max_abs_diff(runner: Runner, reference: list[torch.Tensor], batches: list[Inputs]) -> float:
    """Largest absolute difference between ``runner`` and the eager outputs over ``batches``."""
    worst = 0.0
    with torch.no_grad():
        for inputs, expected in zip(batches, reference):
            got = runner(*inputs)
            if got.shape != expected.shape:
                raise ExportFailed(f"answers inputs of shapes {[list(t.shape) for t in inputs]} with "
                                   f"shape {list(got.shape)}, the model with {list(expected.shape)}")
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
    wanted = max(request.batch_size or eval_batch, 2)
    items = first_items(run.val_dataset, wanted + SCAN_FOR_SHAPES + 1)
    batch_size = max(min(wanted, len(items)), 2)
    check = check_batches(items, batch_size, run.collate)
    layout = InputLayout(run.model, config.data.target_key, check[0])
    batches = [layout.tensors(batch) for batch in check]
    model = Prediction(run.model, layout).eval()

    pruning = None
    if request.prune is not None:
        before = evaluate(model, run, layout, eval_batch)
        pruning = prune_model(model, request.prune)
        pruning.update(metrics_before=before, metrics_after=evaluate(model, run, layout, eval_batch))
        log.info("pruned %.0f%% of the weights: %s", 100 * pruning["weight_sparsity"],
                 _compare(before, pruning["metrics_after"]))

    with torch.no_grad():
        reference = [model(*inputs) for inputs in batches]
    axes = Axes.of(batches, reference)
    subject = ExportSubject(model, batches[0], layout.names, axes)
    output = reference[0]
    sizes = [len(inputs[0]) for inputs in batches]
    formats: dict[str, Any] = {}
    runners: dict[str, Runner] = {}
    for fmt in FORMATS:
        if fmt not in request.formats:
            continue
        path = out / FORMAT_FILES[fmt]
        try:
            runners[fmt], details = EXPORTERS[fmt](subject, path)
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
        quantized = onnx_runner(path, layout.names)
        formats["onnx_int8"] = {**_file_entry(path),
                                "max_abs_diff": _max_abs_diff(quantized, reference, batches),
                                "checked_batch_sizes": sizes,
                                "note": "quantized: differs from the model by design, see quantization"}
        before = evaluate(runners["onnx"], run, layout, eval_batch)
        after = evaluate(quantized, run, layout, eval_batch)
        quantization = {"method": QUANTIZATION_METHOD, "dtype": request.quantize,
                        "fp32_size_bytes": formats["onnx"]["size_bytes"],
                        "int8_size_bytes": formats["onnx_int8"]["size_bytes"],
                        "size_ratio": formats["onnx_int8"]["size_bytes"] / formats["onnx"]["size_bytes"],
                        "metrics_before": before, "metrics_after": after}
        log.info("int8: %.2fx the fp32 size; %s", quantization["size_ratio"], _compare(before, after))

    stats, extremes = input_stats(run.loader(run.train_dataset, 1024), layout, axes)
    ranges = _integer_ranges(run, layout, extremes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run_dir": str(request.run_dir.resolve()), "model_file": "model.pt",
                   "model_sha256": sha256_of(request.run_dir / "model.pt"),
                   "model": {"name": config.model.name, "args": config.model.args},
                   "data": {"name": config.data.name, "args": config.data.args,
                            "collate": config.data.collate},
                   "parity_data": "training set (the run has no validation set)" if run.val_is_train
                   else "validation set"},
        "task": run.task,
        "num_classes": int(output.shape[-1]) if run.task in ("classification", "language_model") else None,
        "inputs": [{"name": name, "shape": shape, "dtype": _dtype_name(tensor),
                    **({"range": ranges[name]} if name in ranges else {})}
                   for name, shape, tensor in zip(layout.names, axes.inputs, batches[0])],
        "axis_limits": subject.axis_limits(),
        "output": {"name": OUTPUT_NAME, "shape": axes.output, "dtype": _dtype_name(output)},
        "input_stats": stats,
        "example_batch_size": batch_size,
        "parity_tolerance": request.tolerance,
        "formats": formats,
        "quantization": quantization,
        "pruning": pruning,
        "versions": _versions(),
    }
    write_manifest(out, manifest)
    return manifest


def _dtype_name(tensor: torch.Tensor) -> str:
    """``float32``, ``int64``, ...: the numpy name of a tensor's dtype."""
    return str(tensor.dtype).removeprefix("torch.")


def _integer_ranges(run: RunModel, layout: InputLayout, extremes: dict[str, list[int]]) -> dict[str, list[int]]:
    """``[low, high]`` per integer input: the values the server accepts.

    Token ids (the only input, or ``input_ids``) index an embedding: ``[0, vocab_size - 1]``
    from the data set's ``vocab_size`` hint or a Hugging Face model's config. Other integer
    inputs (an attention mask) keep to the training data's extremes.
    """
    vocab = (getattr(run.train_dataset, "model_hints", {}).get("vocab_size")
             or getattr(getattr(run.model, "config", None), "vocab_size", None))
    token_ids = layout.names[0] if len(layout.names) == 1 else "input_ids"
    return {name: ([0, int(vocab) - 1] if vocab is not None and name == token_ids else extremes[name])
            for name in layout.names if name in extremes}


def _compare(before: dict[str, float], after: dict[str, float]) -> str:
    """``key before -> after`` of each metric in both, for the log."""
    return ", ".join(f"{key} {before[key]:.4g} -> {after[key]:.4g}" for key in before if key in after)


def _parser(prog: str) -> argparse.ArgumentParser:
    """The ``export`` command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} export", description="Export a finished run's model (config.yaml + model.pt) "
        "with its named inputs (one tensor, or e.g. input_ids and attention_mask) and dynamic batch "
        "and sequence axes, check every file against the model on real validation batches "
        "(a difference over the tolerance fails, exit 1), and write manifest.json: input/output "
        "names, shapes and dtypes, checksums, the differences, the task and the training inputs' "
        "mean/std for drift monitoring. ONNX needs: pip install \"ddp_train[export]\". "
        "Trust: this imports and runs the package.module:attr factories (model, data, collate, "
        "loss) that RUN_DIR/config.yaml names, so export only run directories you made or trust; "
        "model.pt itself is loaded with weights_only=True.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="a finished run directory (its config.yaml is code: see Trust above)")
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
