"""The global gradient norm each optimizer step measures, the same whatever holds the gradients."""

from __future__ import annotations

from typing import Sequence

import torch


class GradNorm:
    """The global 2-norm of a step's gradients (not for FSDP's sharded ones).

    Per-tensor norms in the parameters' order, then the norm of those: the sum's grouping
    depends on the model alone. (Summing over DDP's flat gradient buckets instead saves
    reductions, but DDP regroups its buckets after its first iteration, so a restarted run's
    first step would measure — and clip by — a norm that differs in the last bits from the
    uninterrupted run's, and resume would no longer be exact.) When all gradients share a
    device and dtype this is ``get_total_norm``'s own ``_foreach_norm`` + ``vector_norm``,
    without its per-call grouping; else ``get_total_norm`` itself.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        self._one_device_dtype = len({(p.device, p.dtype) for p in parameters}) == 1

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 2-norm over all of ``grads`` (a 0-d tensor on their device)."""
        if self._one_device_dtype:
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
        return torch.nn.utils.get_total_norm(grads)
