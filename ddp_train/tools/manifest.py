"""``manifest.json`` of an export directory: what ``ddp-train export`` wrote and checked.

The exporter writes it (last, and atomically: a directory with a manifest holds a
complete export whose files matched the model); the model server reads it to know the
input it must validate, the task, which file to load, and the training statistics that
input drift is measured against. This module does not import torch, so the onnxruntime
server starts without it.

Layout (``FORMAT_VERSION`` 2)::

    inputs           [{"name", "shape": ["batch", "sequence", d2, ...], "dtype", "range"?}, ...]
                     in the order the exported graph takes them; a string in a shape names a
                     dynamic axis (several inputs naming one axis share its length), a number
                     is fixed; "range": [low, high] for integer inputs (token ids)
    axis_limits      {"sequence": 512, ...}  the largest length torch.export found a dynamic
                     axis may take (absent: no limit found)
    output           {"name", "shape", "dtype"}
    task, num_classes
    input_stats      {input name: {"samples", "mean": [...], "std": [...]}}  per feature of a
                     flattened example, for the inputs without a dynamic axis besides the batch
    formats          {"onnx" | "exported" | "torchscript" | "onnx_int8":
                      {"file", "sha256", "size_bytes", "max_abs_diff", "checked_batch_sizes", ...}}
    parity_tolerance, example_batch_size, quantization, pruning, source, versions, created_utc
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ddp_train.checkpoint.atomic import atomic_write_json
from ddp_train.errors import UsageError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
BATCH_AXIS = "batch"
"""The name of the dynamic first dimension in the manifest's shapes."""
SEQUENCE_AXIS = "sequence"
"""The name of the first other dynamic axis (a padded sequence); further ones are numbered."""
FORMAT_FILES = {"onnx": "model.onnx", "exported": "model.pt2", "torchscript": "model.ts",
                "onnx_int8": "model.int8.onnx"}
"""The file each format is written to inside the export directory."""
_REQUIRED = ("format_version", "inputs", "output", "task", "input_stats", "formats")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees half of it)."""
    path = directory / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def is_unexported_run(path: Path) -> bool:
    """Whether ``path`` is a finished run directory with no export in it or in its ``export/``."""
    return ((path / "model.pt").is_file() and not (path / MANIFEST_NAME).is_file()
            and not (path / "export" / MANIFEST_NAME).is_file())


def find_export_dir(path: Path) -> Path:
    """The export directory ``path`` names: itself, or a run directory's ``export/``."""
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / "export" / MANIFEST_NAME).is_file():
        return path / "export"
    if is_unexported_run(path):
        raise UsageError("PATH", f"{str(path)!r} is a run directory that has not been exported "
                                 f"yet: run 'ddp-train export {path}' first")
    reason = "does not exist" if not path.exists() else f"holds no {MANIFEST_NAME}"
    raise UsageError("PATH", f"expected an export directory (with {MANIFEST_NAME}) or an "
                             f"exported run directory, but {str(path)!r} {reason}")


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an export directory, checked for the keys the server relies on."""
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError("PATH", f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise UsageError("PATH", f"{path} holds a {type(manifest).__name__}, expected an object")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise UsageError("PATH", f"{path} lacks {', '.join(missing)}: re-export the run")
    if manifest["format_version"] != FORMAT_VERSION:
        raise UsageError("PATH", f"{path} has format version {manifest['format_version']!r}; "
                                 f"this ddp_train reads version {FORMAT_VERSION}: re-export the run")
    return manifest


def format_file(directory: Path, manifest: dict[str, Any], fmt: str, option: str) -> Path:
    """The file of format ``fmt``, present and matching the manifest's SHA-256.

    ``option`` names the command-line choice that asked for the format, for the message.
    """
    entry = manifest["formats"].get(fmt)
    if entry is None:
        exported = ", ".join(manifest["formats"]) or "none"
        raise UsageError(option, f"expected the export in {directory} to hold the {fmt!r} format "
                                 f"(it has: {exported}); export it with 'ddp-train export'")
    path = directory / entry["file"]
    if not path.is_file():
        raise UsageError(option, f"{path} is missing although {MANIFEST_NAME} lists it: re-export the run")
    if sha256_of(path) != entry["sha256"]:
        raise UsageError(option, f"{path} does not match the SHA-256 in {MANIFEST_NAME} "
                                 f"(changed after export?): re-export the run")
    return path
