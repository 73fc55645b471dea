"""The model server's torch backend (``serve --backend torch``): a ``torch.export`` program.

Its own module, loaded only for that backend, so that the rest of the server never
imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TorchBackend:
    """A ``torch.export`` program (``model.pt2``) run eagerly with torch."""

    def __init__(self, path: Path, threads: int) -> None:
        torch.set_num_threads(threads)
        self.module = torch.export.load(path).module()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's output for ``batch``."""
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).numpy()
