"""Start-up cost: time to the first optimizer step, relative to ``import torch``.

What is measured, each in a fresh subprocess, from just before the parent starts it
(``time.monotonic()``, one clock for every process on the machine) to a mark the child
prints:

* ``python_s``: ``python -c "import time; print(time.monotonic())"``: the interpreter alone;
* ``import_torch_s``: the same after ``import torch``;
* ``plain_first_step_s``: a plain torch script's first step on the same MLP (64-128-128-10,
  AdamW, a random batch of 32): what any training script pays (``import torch``, and
  ``torch._dynamo``, which constructing a torch optimizer imports);
* ``first_step_s``: ``python -m ddp_train`` with the default config (the newcomer's run:
  the built-in MLP on scikit-learn's digits, world size 1), ``train.max_steps=1``, up to
  the end of its first optimizer step: imports, config, data set, model, run directory,
  DataLoader, the step. The child is the real entry point; its optimizer is
  ``optim.name=startup_mark:MarkingAdamW``, torch's AdamW that prints the mark after its
  first ``step()`` (what follows, validation and the run's files, is not counted);
* ``first_step_torchrun2_s`` (optional): the same under
  ``torchrun --standalone --nproc_per_node=2``: the agent, 2 workers, the rendezvous, the
  process group, DDP; the mark is rank 0's.

The kinds alternate within every repetition, so drift hits them alike.
``startup_ratio`` = median ``first_step_s`` / median ``import_torch_s``;
``startup_vs_plain`` = median ``first_step_s`` / median ``plain_first_step_s``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import median, summarize

MARK = "BENCH_MARK "

_PLAIN = f"""\
import time
import torch
import torch.nn.functional as F
from torch import nn
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
inputs, targets = torch.randn(32, 64), torch.randint(0, 10, (32,))
F.cross_entropy(model(inputs), targets).backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)
print("{MARK}" + repr(time.monotonic()), flush=True)
"""

_MARKING_OPTIMIZER = f"""\
import os, time

import torch


class MarkingAdamW(torch.optim.AdamW):
    \"\"\"torch's AdamW that prints the mark (on rank 0) when its first step is done.\"\"\"

    marked = False

    def step(self, closure=None):
        result = super().step(closure)
        if not MarkingAdamW.marked and os.environ.get("RANK", "0") == "0":
            MarkingAdamW.marked = True
            print("{MARK}" + repr(time.monotonic()), flush=True)
        return result
"""


def _environment(cwd: str) -> dict[str, str]:
    """The parent's environment without launcher variables; ddp_train and ``cwd`` (which
    holds the marking optimizer's module) importable."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_",
            "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, cwd, env.get("PYTHONPATH")]))
    return env


def _until_mark(cmd: list[str], cwd: str, timeout: float) -> float:
    """Seconds from starting ``cmd`` to its first mark line; the child then runs to its end."""
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=cwd, env=_environment(cwd), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            return float(line[len(MARK):]) - start
    raise RuntimeError(f"no mark from {' '.join(cmd)} (exit {result.returncode}): "
                       f"{result.stderr.strip()[-2000:]}")


def run(repeats: int, torchrun: bool) -> dict[str, Any]:
    """Alternate the kinds ``repeats`` times; samples, medians and the ratio."""
    python = sys.executable
    train_args = ["train.max_steps=1", "logging.progress=none", "checkpoint.every_epochs=0",
                  "optim.name=startup_mark:MarkingAdamW"]
    samples: dict[str, list[float]] = {"python_s": [], "import_torch_s": [], "plain_first_step_s": [],
                                       "first_step_s": []}
    if torchrun:
        samples["first_step_torchrun2_s"] = []
    with tempfile.TemporaryDirectory(prefix="ddp_bench_startup_") as tmp:
        (Path(tmp) / "startup_mark.py").write_text(_MARKING_OPTIMIZER)
        commands = {
            "python_s": [python, "-c", f"import time; print({MARK!r} + repr(time.monotonic()))"],
            "import_torch_s": [python, "-c", f"import time, torch; print({MARK!r} + "
                                             f"repr(time.monotonic()))"],
            "plain_first_step_s": [python, "-c", _PLAIN],
            "first_step_s": [python, "-m", "ddp_train", *train_args],
            "first_step_torchrun2_s": [python, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", "-m", "ddp_train", *train_args],
        }
        _until_mark(commands["first_step_s"], tmp, timeout=120)  # warms the page cache
        for _ in range(repeats):
            for kind in samples:
                samples[kind].append(_until_mark(commands[kind], tmp, timeout=120))
    medians = {kind: median(values) for kind, values in samples.items()}
    results: dict[str, Any] = {
        "repeats": repeats, "samples_s": samples,
        "summary_s": {kind: summarize(values) for kind, values in samples.items()},
        "startup_ratio": medians["first_step_s"] / medians["import_torch_s"],
        "startup_vs_plain": medians["first_step_s"] / medians["plain_first_step_s"],
        "config": "python -m ddp_train " + " ".join(train_args) + " (default: mlp on digits)",
    }
    if torchrun:
        results["startup_ratio_torchrun2"] = (medians["first_step_torchrun2_s"]
                                              / medians["import_torch_s"])
    return results
