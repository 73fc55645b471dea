"""The model server's torch backend (``serve --backend torch``): a ``torch.export`` program.

Its own module, loaded only for that backend, so that the rest of the server never
imports torch. A ``.pt2`` archive is loaded with ``torch.export.load``, which may
unpickle parts of it: serve only exports you made or trust.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TorchBackend:
    """A ``torch.export`` program (``model.pt2``) run eagerly with torch."""

    def __init__(self, path: Path, input_names: list[str], threads: int) -> None:
        torch.set_num_threads(threads)
        self.module = torch.export.load(path).module()
        self.input_names = input_names

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The model's output for ``batch``: the program takes the inputs positionally, in order."""
        with torch.inference_mode():
            return self.module(*(torch.from_numpy(batch[name]) for name in self.input_names)).numpy()
