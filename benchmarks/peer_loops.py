"""The workload of ``peers.py`` and the training loops it compares, one function per framework.

Every contender trains the same thing: a Hugging Face causal LM (``GPT2LMHeadModel``, 2
layers, width 128, 0.45 M parameters, built from a config with random weights and the same
seed) on the same byte-level text (the UTF-8 bytes of ddp_train's built-in ``chars``
corpus, cut into sequences of 32 to 128 bytes at seeded random places), in micro-batches of
:data:`BATCH_SIZE` per rank, with AdamW (lr :data:`LR`, no weight decay, a constant LR, no
gradient clipping), in fp32, one optimizer step per micro-batch, DDP over 2 gloo ranks.
The model computes its own loss from the ``labels`` in the batch (the Hugging Face
convention), so every contender's step is ``model(**batch).loss``, backward, optimizer step.

:func:`pad_collate` pads every batch to the block size, pads masked out and labelled −100:
the lengths vary, the work does not. The contenders' samplers draw different orders (each
framework shards its data its own way), and padding each batch only to its longest
sequence would hand them different amounts of work per step.

The clock (:class:`Pacer`) is the same for every contender: a forward pre-hook on the
``GPT2LMHeadModel`` itself, which every framework calls exactly once per optimizer step
however it wraps the model. The time between two consecutive forward starts is one whole
step of that framework's own loop: loading and collating the batch, forward, backward, the
gradient all-reduce, the optimizer step and the framework's bookkeeping. The hook reads
the wall clock and the process's CPU time; a global optimizer hook marks the end of each
optimizer step, which splits a step into the step itself and the loop's work between steps.

All contenders run in the same pair of processes, each in a thread of its own that runs
its framework's real loop (``Trainer.train()``, ``Trainer.fit()``, a hand-written ``for``)
from start to end; the :class:`Baton` lets one run at a time, a few steps per turn, in an
order every rank shares. Neighbouring turns share the state of the machine, which on this
VM drifts between fast and slow for seconds to minutes at a time and differs from one
process to the next by up to 20%.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

BLOCK_SIZE = 128
"""Longest sequence, and the length every batch is padded to."""
MIN_LENGTH = 32
"""Shortest sequence."""
PAD_ID = 256
"""The padding token: one past the 256 byte values."""
VOCAB_SIZE = 257
BATCH_SIZE = 8
"""Sequences per rank per optimizer step."""
LR = 1e-3
SEED = 0
EVAL_SEQUENCES = 32
"""Held-out sequences whose loss, before and after training, shows that a contender trained."""


class ByteSequences(Dataset):
    """``count`` byte sequences of :data:`MIN_LENGTH` to :data:`BLOCK_SIZE` bytes of ``data``.

    Each item is ``{"input_ids": LongTensor}``; starts and lengths are drawn with ``seed``,
    so every process builds the very same items.
    """

    def __init__(self, data: torch.Tensor, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(MIN_LENGTH, BLOCK_SIZE + 1, (count,), generator=generator)
        starts = torch.randint(0, len(data) - BLOCK_SIZE, (count,), generator=generator)
        self.items = [data[start:start + length].clone() for start, length in
                      zip(starts.tolist(), lengths.tolist())]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[index]}


@functools.cache
def corpus_bytes() -> torch.Tensor:
    """The ``chars`` corpus as a tensor of its UTF-8 bytes (0-255)."""
    from ddp_train.components.datasets import chars_corpus
    return torch.frombuffer(bytearray(chars_corpus().encode()), dtype=torch.uint8).long()


def train_sequences(steps: int, world_size: int) -> ByteSequences:
    """Enough sequences for ``steps`` optimizer steps of every rank in one epoch (plus spare
    batches), so that no contender reaches an epoch end while it is timed."""
    return ByteSequences(corpus_bytes(), (steps + 4) * BATCH_SIZE * world_size, SEED)


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Items of ``{"input_ids"}`` → ``input_ids``, ``attention_mask`` and ``labels``, each
    ``(batch, BLOCK_SIZE)``: pads are :data:`PAD_ID`, masked out, and labelled −100 (ignored by
    the loss)."""
    input_ids = torch.full((len(items), BLOCK_SIZE), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(items), BLOCK_SIZE), dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        input_ids[row, :length] = item["input_ids"]
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_model() -> nn.Module:
    """The causal LM, from the shared seed: the same initial weights in every contender.

    Dropout is off, so the held-out loss after training depends on the data order alone.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes about the unused default loss_type
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=BLOCK_SIZE, n_embd=128, n_layer=2,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID)
    return GPT2LMHeadModel(config)


def adamw(params: Any) -> torch.optim.Optimizer:
    """The optimizer every contender steps: torch's AdamW with the same settings."""
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def held_out_loss(model: nn.Module) -> float:
    """The model's mean loss on :data:`EVAL_SEQUENCES` held-out sequences (no gradients)."""
    batch = pad_collate(list(ByteSequences(corpus_bytes(), EVAL_SEQUENCES, SEED + 1)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train(was_training)
    return loss


class ContenderAborted(RuntimeError):
    """Raised in a waiting contender's thread when another contender failed."""


class Baton:
    """Lets the contenders' threads of one process run one at a time, turn by turn.

    ``turns`` names whose turn comes next, the same list on every rank, so that the
    collectives the frameworks issue (DDP's broadcasts and all-reduces, barriers) come in the
    same order on every rank and pair up. A thread waits with :meth:`wait_for` and ends its
    turn with :meth:`pass_on`; a failed contender calls :meth:`fail`, which stops every
    waiting thread.
    """

    def __init__(self, turns: list[str]) -> None:
        self.turns = turns
        self._index = 0
        self._condition = threading.Condition()
        self.failure: BaseException | None = None

    def wait_for(self, name: str) -> None:
        """Block until it is ``name``'s turn (ContenderAborted if a contender failed)."""
        with self._condition:
            self._condition.wait_for(lambda: self.failure is not None or self._current() == name)
            if self.failure is not None:
                raise ContenderAborted(f"{name}: stopped, another contender failed")

    def _current(self) -> str | None:
        return self.turns[self._index] if self._index < len(self.turns) else None

    def pass_on(self) -> None:
        """End the current turn."""
        with self._condition:
            self._index += 1
            self._condition.notify_all()

    def fail(self, failure: BaseException) -> None:
        """Record the first failure and wake every waiting thread."""
        with self._condition:
            if self.failure is None:
                self.failure = failure
            self._condition.notify_all()


class Pacer:
    """A forward pre-hook on one contender's model: its clock, and its turns on the :class:`Baton`.

    Every forward start is marked with the wall clock and the process's CPU time (all its
    threads), and every end of an optimizer step (:meth:`optimizer_stepped`, called by a
    global optimizer hook) with the wall clock. A turn is ``steps_per_turn[i]`` steps (the
    last turn has no bound): at the forward that would start the next step, the pacer passes
    the baton on and waits for its next turn, then marks anew. So each turn's marks are
    ``steps + 1`` forward starts of consecutive steps of the framework's own loop, never
    spanning a pause. The cost (three clock reads and appends and a length check per step,
    about 3 µs, plus the hook dispatch of one module) is paid alike by every contender.
    """

    def __init__(self, name: str, model: nn.Module, baton: Baton, steps_per_turn: list[int]) -> None:
        self.name, self.baton, self.steps_per_turn = name, baton, steps_per_turn
        self.wall: list[list[float]] = [[]]
        """The wall-clock marks of each turn's forward starts."""
        self.cpu: list[list[float]] = [[]]
        """The CPU-time marks of each turn's forward starts."""
        self.optimizer_ends: list[list[float]] = [[]]
        """The wall-clock marks of each turn's optimizer step ends."""
        self._handle = model.register_forward_pre_hook(self._on_forward)

    def _mark(self) -> None:
        self.wall[-1].append(time.perf_counter())
        self.cpu[-1].append(time.process_time())

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._mark()
        turn = len(self.wall) - 1
        if turn < len(self.steps_per_turn) and len(self.wall[-1]) > self.steps_per_turn[turn]:
            self.baton.pass_on()
            self.baton.wait_for(self.name)
            for marks in (self.wall, self.cpu, self.optimizer_ends):
                marks.append([])
            self._mark()

    def optimizer_stepped(self) -> None:
        """Mark the end of an optimizer step (of the optimizer or of a wrapper around it)."""
        self.optimizer_ends[-1].append(time.perf_counter())

    def between_steps(self, turn: int) -> list[float]:
        """Per step of ``turn``: from the end of its last optimizer step to the next forward
        start, the loop's work between two steps (zero_grad, LR schedule, callbacks, logging
        checks, the next batch: loading, collating, moving)."""
        starts, ends = self.wall[turn], self.optimizer_ends[turn]
        gaps = []
        for start, following in itertools.pairwise(starts):
            inside = [end for end in ends if start < end < following]
            if not inside:
                raise RuntimeError(f"{self.name}: a step without an optimizer step")
            gaps.append(following - inside[-1])
        return gaps

    def remove(self) -> None:
        """Stop marking."""
        self._handle.remove()


@dataclass
class Setup:
    """What every contender is given: the model (clock attached), the data, the step count."""

    model: nn.Module
    dataset: Dataset
    steps: int
    rank: int
    world_size: int
    work_dir: str


def train_hand(setup: Setup) -> dict[str, Any]:
    """What a user writes by hand: DistributedSampler, DataLoader, DDP, forward, backward,
    ``optimizer.step()``, ``zero_grad(set_to_none=True)``."""
    model = DistributedDataParallel(setup.model)
    sampler = DistributedSampler(setup.dataset, num_replicas=setup.world_size, rank=setup.rank,
                                 shuffle=True, seed=SEED, drop_last=True)
    loader = DataLoader(setup.dataset, batch_size=BATCH_SIZE, sampler=sampler,
                        collate_fn=pad_collate, drop_last=True)
    optimizer = adamw(setup.model.parameters())
    for batch in islice(loader, setup.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {}


def train_ddp_train(setup: Setup) -> dict[str, Any]:
    """ddp_train's ``Trainer.fit()`` with the model, data set and collate function given to it
    (``data.collate=peer_loops:pad_collate``); no validation set, checkpoints off, logging
    every 10⁹ steps, no progress output, no system metrics."""
    from ddp_train import Trainer, load_config

    overrides = [f"run.output_dir={setup.work_dir}", "run.name=peers", "run.device=cpu",
                 f"run.seed={SEED}", f"data.batch_size={BATCH_SIZE}", "data.shuffle=true",
                 "data.collate=peer_loops:pad_collate", "optim.name=adamw", f"optim.lr={LR}",
                 "optim.weight_decay=0.0", "schedule.name=constant", "train.epochs=1",
                 f"train.max_steps={setup.steps}", "train.strategy=ddp", "train.precision=fp32",
                 "checkpoint.every_epochs=0", "checkpoint.every_steps=0", "checkpoint.resume=never",
                 "logging.every_steps=1000000000", "logging.progress=none",
                 "logging.system_metrics=false", "eval.task=none"]
    trainer = Trainer(load_config(None, overrides), model=setup.model, train_dataset=setup.dataset,
                      val_dataset=None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return {"overrides": overrides}


def train_hf_trainer(setup: Setup) -> dict[str, Any]:
    """Hugging Face ``Trainer.train()`` with its defaults, except what every contender shares
    (batch, AdamW, constant LR, no clipping, fp32, no workers) and no logging, saving,
    evaluation, reporting or progress bar."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=setup.work_dir, per_device_train_batch_size=BATCH_SIZE, max_steps=setup.steps,
        learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        use_cpu=True, seed=SEED, dataloader_num_workers=0, dataloader_pin_memory=False,
        dataloader_drop_last=True, remove_unused_columns=False, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    trainer = Trainer(model=setup.model, args=args, train_dataset=setup.dataset,
                      data_collator=pad_collate, optimizers=(adamw(setup.model.parameters()), None))
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics of every run
    trainer.train()
    # What HF's own defaults chose: the DDP setting and the per-step token count all-gather.
    return {"ddp_find_unused_parameters": trainer.accelerator.ddp_handler.find_unused_parameters
            if trainer.accelerator.ddp_handler is not None else None,
            "average_tokens_across_devices": args.average_tokens_across_devices}


def train_accelerate(setup: Setup) -> dict[str, Any]:
    """The hand loop written with Accelerate: ``accelerator.prepare`` (DDP, sharded loader,
    wrapped optimizer) and ``accelerator.backward``."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    loader = DataLoader(setup.dataset, batch_size=BATCH_SIZE, shuffle=True, collate_fn=pad_collate,
                        drop_last=True, generator=torch.Generator().manual_seed(SEED))
    model, optimizer, loader = accelerator.prepare(setup.model, adamw(setup.model.parameters()),
                                                   loader)
    for batch in islice(loader, setup.steps):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return {}


def train_lightning(setup: Setup) -> dict[str, Any]:
    """Lightning's ``Trainer.fit()`` on a ``LightningModule`` whose ``training_step`` returns
    the model's loss (automatic optimisation); DDP over gloo, no logger, checkpoints,
    progress bar, model summary or validation."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    # Lightning's start-up notes (accelerators found, tips) would fill the output of every run.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model = setup.model

    class CausalLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return adamw(self.parameters())

    trainer = L.Trainer(accelerator="cpu", devices=setup.world_size, num_nodes=1,
                        strategy=DDPStrategy(process_group_backend="gloo"), precision="32-true",
                        max_steps=setup.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=setup.work_dir)
    loader = DataLoader(setup.dataset, batch_size=BATCH_SIZE, shuffle=True, collate_fn=pad_collate,
                        drop_last=True)
    trainer.fit(CausalLM(), loader)  # Lightning puts its own DistributedSampler in
    return {}


@dataclass(frozen=True)
class Contender:
    """One way to train the workload."""

    description: str
    train: Callable[[Setup], dict[str, Any]]
    requires: tuple[str, ...] = ()
    """Importable modules it needs; a contender missing one is skipped and named."""


CONTENDERS: dict[str, Contender] = {
    "hand": Contender("hand-written DDP loop (the baseline)", train_hand),
    "hand_twin": Contender("the same hand-written loop again: the A/A control (true ratio 1)",
                           train_hand),
    "ddp_train": Contender("ddp_train Trainer.fit()", train_ddp_train,
                           ("ddp_train.training.batches",)),
    "hf_trainer": Contender("Hugging Face transformers Trainer.train()", train_hf_trainer),
    "accelerate": Contender("Accelerate: prepare() + accelerator.backward()", train_accelerate,
                            ("accelerate",)),
    "lightning": Contender("Lightning Trainer.fit()", train_lightning, ("lightning",)),
}
"""Name → contender, in table order."""
