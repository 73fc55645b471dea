"""System metrics for the training log: host and GPU use, peak memory, and MFU inputs.

MFU = ``training_flops_per_sample × samples/s ÷ (peak_flops × world size)``.

Everything here is cheap enough to call on every log step and never raises for a
missing GPU or a missing ``nvidia-ml-py``: what cannot be measured is left out of the
record. Sizes are in GiB (2**30 bytes), the unit of ``nvidia-smi`` and torch's memory
summaries, so that ``sys/gpu_mem_used_gb`` reads like the card's "80GB".
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import psutil
import torch

log = logging.getLogger("ddp_train")

GIB = float(2**30)

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s with fp32 accumulation, from the
# vendors' data sheets, keyed by a substring of torch.cuda.get_device_name(). The longest
# matching key wins, so "H100 PCIe" beats "H100" and "A100" beats "A10".
PEAK_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "A10G": 125e12,  # unpublished by NVIDIA; AWS and most tables quote the A10's figure
    "A10": 125e12,
    "A40": 150e12,
    "RTX A6000": 155e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "T4": 65e12,
    "V100": 125e12,  # fp16 only: Volta has no bf16
    "RTX 6000 Ada": 364e12,
    "RTX 4090": 165e12,  # GeForce: fp16 with fp32 accumulation runs at half the fp16-accumulate rate
    "RTX 3090": 71e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def lookup_peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of the GPU called ``device_name`` from :data:`PEAK_FLOPS`, or None if unknown."""
    name = device_name.lower()
    matches = [key for key in PEAK_FLOPS if key.lower() in name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one ``device`` for MFU: ``override`` if given, else the table's entry.

    None on a CPU (no meaningful peak) and on GPUs missing from the table; pass
    ``override`` (``logging.peak_flops``) for those.
    """
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device))


def training_flops_per_sample(num_params: int, tokens_per_sample: int) -> float:
    """Training FLOPs for one sample: the standard ``6 × parameters × tokens`` estimate.

    2 FLOPs per parameter per token for the forward pass and 4 for the backward pass.
    It is exact for dense layers (MLPs, transformers without the attention term) and an
    underestimate for convolutions, which reuse each weight at many positions.
    """
    return 6.0 * num_params * tokens_per_sample


class SystemMonitor:
    """Host (psutil) and GPU (NVML, when available) readings for one rank's ``device``.

    :meth:`read` returns ``sys/...`` keys; :meth:`peak_memory` the run's peak memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._process = psutil.Process()
        # cpu_percent(interval=None) measures since the previous call; the first call
        # only starts the clock, so make it here rather than log a meaningless 0.
        psutil.cpu_percent(interval=None)
        self._nvml: Any = None
        self._gpu: Any = None
        self._failed: set[str] = set()
        self._logged = False
        if device.type == "cuda" and not torch.version.hip:  # NVML knows NVIDIA GPUs only
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml  # optional extra: ddp_train[gpu] (nvidia-ml-py)
        except ImportError:
            log.debug("no GPU metrics: nvidia-ml-py is not installed (pip install \"ddp_train[gpu]\")")
            return
        try:
            pynvml.nvmlInit()  # reference-counted by NVML: one per monitor is fine
            # By UUID, not index: NVML numbers every GPU, CUDA only the visible ones.
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            self._gpu = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception as exc:  # telemetry must never stop training
            # NVML errors, but also a driver without NVML or a torch that cannot query
            # the device: all mean the same thing here, no GPU metrics.
            log.debug("no GPU metrics: NVML unavailable (%s)", exc)
            return
        self._nvml = pynvml

    def read(self) -> dict[str, float]:
        """The current readings; GPU keys only on CUDA with NVML, each left out if it fails."""
        memory = psutil.virtual_memory()
        # total - available is the memory that new allocations cannot have (psutil's
        # "used" is computed differently on each OS).
        metrics = {"sys/cpu_percent": float(psutil.cpu_percent(interval=None)),
                   "sys/ram_used_gb": (memory.total - memory.available) / GIB,
                   "sys/process_rss_gb": self._process.memory_info().rss / GIB}
        if self._gpu is not None:
            metrics.update(self._read_gpu())
        return metrics

    def _read_gpu(self) -> dict[str, float]:
        nvml, gpu = self._nvml, self._gpu
        readers = {
            "sys/gpu_util_percent": lambda: float(nvml.nvmlDeviceGetUtilizationRates(gpu).gpu),
            # The whole device, other processes included: what nvidia-smi shows.
            "sys/gpu_mem_used_gb": lambda: nvml.nvmlDeviceGetMemoryInfo(gpu).used / GIB,
            "sys/gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(gpu) / 1000.0,
            "sys/gpu_temp_c": lambda: float(nvml.nvmlDeviceGetTemperature(gpu, nvml.NVML_TEMPERATURE_GPU)),
        }
        metrics: dict[str, float] = {}
        for key, reader in readers.items():
            if key in self._failed:
                continue
            try:
                metrics[key] = reader()
            except nvml.NVMLError as exc:
                # Typically "not supported" (MIG slices, some boards): it will not start
                # working later, so stop asking, and say so once, quietly.
                self._failed.add(key)
                if not self._logged:
                    log.debug("GPU metric %s unavailable (%s); left out from now on", key, exc)
                    self._logged = True
        return metrics

    def peak_memory(self) -> dict[str, float]:
        """``train/peak_memory_gb``: peak allocated CUDA memory on a GPU, else the process's peak RSS.

        Both are peaks since the start of the process (or the last
        ``torch.cuda.reset_peak_memory_stats``).
        """
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _process_peak_rss_bytes()
        return {"train/peak_memory_gb": peak / GIB}


def _process_peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows: the peak working set is its equivalent
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS bytes, Linux KiB
