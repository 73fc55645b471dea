"""The two loops every comparison runs: a minimal hand-written DDP loop, and ddp_train's Trainer.

Both expose ``run(steps)`` (that many optimizer steps, data loading included) and a
:class:`~common.StepClock` that ticks at the start of every optimizer step, so they can be
interleaved block by block in one process and compared step by step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from common import StepClock, Workload, run_trainer_steps, trainer_overrides
from ddp_train import Trainer
from ddp_train.components.optimizers import WarmupSchedule
from ddp_train.config import DistConfig, load_config
from ddp_train.distributed.environment import DistEnv
from ddp_train.distributed.grad_norm import GradNorm
from ddp_train.distributed.preemption import PreemptionWatch
from ddp_train.training.loaders import EpochSampler

EXTRAS: dict[str, str] = {
    "grad_norm": "(a) global gradient norm (GradNorm: over DDP's flat buckets)",
    "finite_check": "(b) math.isfinite(norm.item()): the norm read on the host",
    "preempt_allreduce": "(c) PreemptionWatch.agreed(): async all-reduce of the stop flag "
                         "every ~0.2 s, read at the next agreement",
    "loss_accum": "(e) loss kept on the device, added into float64 running sums",
    "loss_div": "(f) backward of loss / grad_accum_steps (one more autograd node; only when > 1)",
}
"""ddp_train's per-step additions to a minimal loop, each one switchable in :class:`HandLoop`.
(d), ``scheduler.step()`` of ``LambdaLR(WarmupSchedule)``, is part of both loops; its cost
is measured by switching it off (``scheduler=False``)."""


class HandLoop:
    """What a user would write by hand: DistributedSampler + DataLoader, DDP, forward, loss,
    backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, ``scheduler.step()``.

    The model, data, AdamW settings and LR schedule (``LambdaLR`` of ddp_train's own cosine
    ``WarmupSchedule``, so the LR trajectory is the Trainer's) are those of the Trainer it is
    compared with. ``extras`` switches on ddp_train's per-step additions one by one (keys of
    :data:`EXTRAS`). With ``accum > 1`` each optimizer step takes ``accum`` micro-batches,
    the loss divided by ``accum``; ``no_sync`` then runs the first ``accum - 1`` of them
    (forward and backward) inside ``DDP.no_sync()``, else every micro-batch all-reduces.

    ``borrow``: drive that Trainer's own DDP model, optimizer, LR scheduler and DataLoader
    instead of building new ones (``accum`` 1 only). Every loop built so then steps the
    very same tensors, so what differs between them is the code path alone.
    """

    def __init__(self, workload: Workload, dataset: Dataset, device: torch.device, rank: int,
                 world_size: int, total_steps: int, extras: Collection[str] = (),
                 scheduler: bool = True, accum: int = 1, no_sync: bool = True,
                 borrow: Trainer | None = None) -> None:
        unknown = set(extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown extras {sorted(unknown)}")
        self.device = device
        if borrow is not None:
            if accum != 1 or not isinstance(borrow.model, DistributedDataParallel):
                raise ValueError("a borrowing HandLoop needs accum=1 and a Trainer that uses DDP")
            self.module, self.ddp = borrow.module, borrow.model
            self.loader, self.optimizer = borrow.train_data.loader, borrow.optimizer
            self.sampler = self.loader.sampler  # type: ignore[assignment]
            self.scheduler = borrow.scheduler
        else:
            self.module = workload.build_model().to(device)
            self.ddp = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=0, drop_last=True)
            self.loader = DataLoader(dataset, batch_size=workload.batch_size, sampler=self.sampler,
                                     drop_last=True, pin_memory=device.type == "cuda")
            self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=3e-3,
                                               weight_decay=0.0, betas=(0.9, 0.999))
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, WarmupSchedule("cosine", 10, total_steps, 0.0, 100, 0.1))
        self.params = list(self.module.parameters())
        self.gradient_norm = GradNorm(self.params)
        self.use_scheduler = scheduler
        self.accum, self.no_sync = accum, no_sync
        self.grad_norm, self.finite_check = "grad_norm" in extras, "finite_check" in extras
        self.preempt, self.loss_accum = "preempt_allreduce" in extras, "loss_accum" in extras
        # The Trainer divides only when it accumulates; "loss_div" forces it to measure the cost.
        self.loss_div = "loss_div" in extras or accum > 1
        self.env = DistEnv.setup(DistConfig(), device.type)  # the existing group; owns nothing
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else nullcontext())
        self.clock = StepClock()
        self._batches = self._forever()

    def _forever(self) -> Iterator[Any]:
        epoch = 0
        while True:
            if isinstance(self.sampler, EpochSampler):  # a borrowed one: whole epochs
                self.sampler.set_position(epoch, 0)
            else:
                self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def run(self, steps: int) -> None:
        """``steps`` optimizer steps, the clock marking the start and end of each."""
        with PreemptionWatch(self.env) if self.preempt else nullcontext() as watch:
            for _ in range(steps):
                self.clock.tick()
                self._step(watch)
                self.clock.done()
            if watch is not None:
                watch.drain()

    def step(self) -> None:
        """One optimizer step alone (without the preemption extra, which lives in ``run``)."""
        self._step(None)

    def forward_loss(self) -> torch.Tensor:
        """Load the next micro-batch, move it to the device, forward it; the loss."""
        inputs, targets = next(self._batches)
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with self.autocast:
            outputs = self.ddp(inputs)
            if outputs.dim() > 2:  # next-token logits (B, T, V), flattened as a GPT loop does
                outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
            return F.cross_entropy(outputs, targets)

    def _step(self, watch: PreemptionWatch | None) -> None:
        micro_losses = []
        for micro in range(self.accum):
            skip_sync = self.no_sync and micro < self.accum - 1
            with self.ddp.no_sync() if skip_sync else nullcontext():
                loss = self.forward_loss()
                (loss / self.accum if self.loss_div else loss).backward()
            if self.loss_accum:
                micro_losses.append(loss.detach())
        step_loss = None
        if self.loss_accum:
            step_loss = (micro_losses[0] if self.accum == 1
                         else torch.stack(micro_losses).double().sum())
        norm = None
        if self.grad_norm:
            norm = self.gradient_norm([p.grad for p in self.params if p.grad is not None])
        finite = True
        if self.finite_check:
            finite = math.isfinite((norm if norm is not None else loss).item())
        if finite:
            self.optimizer.step()
            if step_loss is not None:
                self.loss_sums += step_loss
        self.optimizer.zero_grad(set_to_none=True)
        if self.use_scheduler:
            self.scheduler.step()
        if watch is not None:
            watch.agreed()

    def close(self) -> None:
        """Release DDP's reducer (a borrowed one: this loop's reference) while the process
        group is alive."""
        del self.ddp


class TrainerLoop:
    """ddp_train's own training path: one ``Trainer`` whose ``fit()`` runs each block.

    The trainer gets the same model (same seed), data set and per-rank batch as the
    :class:`HandLoop` it is compared with, AdamW with the same settings and the same cosine
    warmup schedule over ``total_steps``; no validation set, checkpoints off, logging every
    10⁹ steps (see :func:`common.trainer_overrides`). ``run(steps)`` is one real
    ``fit()`` call that trains ``steps`` more optimizer steps.
    """

    def __init__(self, workload: Workload, dataset: Dataset, device: torch.device, output_dir: str,
                 name: str, total_steps: int, overrides: Sequence[str] = (),
                 loss_fn: Any = None) -> None:
        config = load_config(None, trainer_overrides(workload, output_dir, name, device, total_steps,
                                                     overrides))
        self.clock = StepClock()  # a callback: marks the start and end of fit()'s steps
        self.trainer = Trainer(config, model=workload.build_model(), train_dataset=dataset,
                               val_dataset=None, loss_fn=loss_fn, callbacks=[self.clock])
        self._batches: Iterator[Any] | None = None

    def run(self, steps: int) -> None:
        """``steps`` optimizer steps in one ``fit()`` call."""
        run_trainer_steps(self.trainer, steps)

    def step(self) -> None:
        """One optimizer step of the Trainer's own step (what ``fit()`` calls each step, its
        micro-batches loaded from ``step_batches()``) alone: ``fit()``'s per-step
        bookkeeping around it is not in it."""
        if self._batches is None:
            self.trainer.module.train()
            self._batches = self.trainer.step_batches()
        self.trainer.train_step(next(self._batches))

    def close(self) -> None:
        """``Trainer.close()``: drops DDP; the caller's process group stays."""
        self.trainer.close()
