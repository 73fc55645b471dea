"""The global gradient norm each optimizer step measures, in as few reductions as possible."""

from __future__ import annotations

from typing import Sequence

import torch


def _flat_buckets(grads: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D views of the storages the gradients live in, when they tile them exactly and some
    storage holds several of them (DDP's ``gradient_as_bucket_view`` buckets); else None."""
    groups: dict[int, list[torch.Tensor]] = {}
    for grad in grads:
        if not grad.is_contiguous() or grad.layout != torch.strided:
            return None
        groups.setdefault(grad.untyped_storage().data_ptr(), []).append(grad)
    if len(groups) == len(grads):  # every gradient has a storage of its own: nothing to gain
        return None
    flats = []
    for members in groups.values():
        members.sort(key=lambda grad: grad.storage_offset())
        storage, dtype = members[0].untyped_storage(), members[0].dtype
        offset = 0
        for grad in members:  # back to back from the start, one dtype, no gaps or overlaps
            if grad.dtype != dtype or grad.storage_offset() != offset:
                return None
            offset += grad.numel()
        if offset * members[0].element_size() != storage.nbytes():
            return None  # the storage holds more (a parameter without a gradient this step)
        flats.append(torch.empty(0, dtype=dtype, device=members[0].device).set_(storage))
    return flats


class GradNorm:
    """The global 2-norm of a step's gradients (not for FSDP's sharded ones).

    Under DDP with ``gradient_as_bucket_view`` the gradients are views into a few flat
    all-reduce buckets: when a step's gradients tile their buckets exactly, the norm is
    taken over the buckets, one reduction each instead of one per tensor (on a small model
    that halves what the per-step health check costs). Otherwise it is
    ``get_total_norm``'s own ``_foreach_norm`` + ``vector_norm`` when all gradients share a
    device and dtype, else ``get_total_norm`` itself. The buckets found are kept while the
    gradients' addresses stay the same; holding them also keeps those addresses from being
    reused by other storage.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        self._one_device_dtype = len({(p.device, p.dtype) for p in parameters}) == 1
        self._addresses: list[int] | None = None
        self._flats: list[torch.Tensor] | None = None

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 2-norm over all of ``grads`` (a 0-d tensor on their device)."""
        addresses = [grad.data_ptr() for grad in grads]
        if addresses != self._addresses:
            self._addresses, self._flats = addresses, _flat_buckets(grads)
        if self._flats is not None:
            if len(self._flats) == 1:
                return torch.linalg.vector_norm(self._flats[0])
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._flats)))
        if self._one_device_dtype:
            # get_total_norm's own two ops, without its per-call grouping of the tensors by
            # device and dtype (Python that ran every step).
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
        return torch.nn.utils.get_total_norm(grads)
