"""User factories in every form of the batch contract, named in configs as 'batch_components:...'."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from user_components import blobs


class DictItems(Dataset):
    """A map-style data set whose items are mappings ``{"x", "labels", "ids"}``."""

    def __init__(self, pairs: Any, start_id: int = 0) -> None:
        self.pairs, self.start_id = pairs, start_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = self.pairs[index]
        return {"x": x, "labels": y, "ids": index + self.start_id}


def dict_blobs(n_train: int = 204, n_val: int = 50) -> tuple[Dataset, Dataset]:
    """The blobs as mapping items (Hugging Face style); validation ids start at 100000."""
    train, val = blobs(n_train=n_train, n_val=n_val)
    return DictItems(train), DictItems(val, start_id=100_000)


class LossReturningMLP(nn.Module):
    """A model called as ``model(x=..., labels=..., ids=...)`` returning ``{"loss", "logits"}``.

    With ``ID_LOG`` set, every training forward appends its sample ids to ``ID_LOG.rank<r>``:
    the samples each optimizer step really trained on.
    """

    def __init__(self, in_features: int = 8, out_features: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        log = os.environ.get("ID_LOG")
        if log and self.training and ids is not None:
            with open(f"{log}.rank{os.environ.get('RANK', '0')}", "a") as file:
                file.write(" ".join(str(i) for i in ids.tolist()) + "\n")
        logits = self.net(x)
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = nn.functional.cross_entropy(logits, labels)
        return output


def loss_mlp(in_features: int = 8, out_features: int = 3) -> nn.Module:
    """The factory of :class:`LossReturningMLP`."""
    return LossReturningMLP(in_features, out_features)


class PairInputs(Dataset):
    """Pairs whose inputs are a tuple ``(a, b)`` or a mapping ``{"a", "b"}`` (``form``)."""

    def __init__(self, pairs: Any, form: str) -> None:
        self.pairs, self.form = pairs, form

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Any:
        x, y = self.pairs[index]
        a, b = x[:4], x[4:]
        return ((a, b) if self.form == "tuple" else {"a": a, "b": b}), y


def pair_blobs(form: str = "tuple") -> tuple[Dataset, Dataset]:
    """The blobs with two-part inputs."""
    train, val = blobs(n_train=96, n_val=31)
    return PairInputs(train, form), PairInputs(val, form)


class TwoInputs(nn.Module):
    """``model(a, b)`` → logits; returns a tuple ``(logits, features)`` (the first is the prediction)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.a(a) + self.b(b))
        return self.head(features), features


def two_inputs() -> nn.Module:
    """The factory of :class:`TwoInputs`."""
    return TwoInputs()


def double_cross_entropy(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """A train.step_fn: twice the cross entropy, and the plain one as an extra value."""
    inputs, targets = batch
    loss = nn.functional.cross_entropy(model(inputs), targets)
    return 2 * loss, {"plain_ce": loss.item()}


class PaddedSequences(Dataset):
    """Token sequences of lengths 3..12 whose next token is a function of the current one."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 13, (1,), generator=generator))
            start = int(torch.randint(0, 16, (1,), generator=generator))
            tokens = (start + 3 * torch.arange(length)) % 16
            self.items.append(tokens)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[index]}


def padded_sequences(n_train: int = 96, n_val: int = 40) -> tuple[Dataset, Dataset]:
    """Variable-length sequences: every micro-batch counts a different number of tokens."""
    train, val = PaddedSequences(n_train, 0), PaddedSequences(n_val, 1)
    train.task = val.task = "language_model"  # type: ignore[attr-defined]
    return train, val


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pads to the longest sequence; targets are the next tokens, -100 where there is none."""
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    for row, item in enumerate(items):
        tokens = item["input_ids"]
        input_ids[row, :len(tokens)] = tokens
        labels[row, :len(tokens) - 1] = tokens[1:]
    return {"input_ids": input_ids, "attention_mask": (labels != -100).long(), "labels": labels}


class TinyLM(nn.Module):
    """Embedding → linear next-token model returning its own token-mean loss (labels already shifted)."""

    def __init__(self, vocab: int = 16, width: int = 12) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(torch.tanh(self.embed(input_ids)))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         labels.reshape(-1), ignore_index=-100)
        return output


def tiny_lm() -> nn.Module:
    """The factory of :class:`TinyLM`."""
    return TinyLM()


class Stream(IterableDataset):
    """An iterable over fixed ``(x, y)`` pairs, without ``__len__``; ``endless`` repeats them."""

    def __init__(self, pairs: Any, endless: bool = False) -> None:
        self.pairs, self.endless = pairs, endless

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            for index in range(len(self.pairs)):
                x, y = self.pairs[index]
                yield {"x": x, "labels": y, "ids": index}
            if not self.endless:
                return


def stream_blobs(n_train: int = 204, n_val: int = 51, endless: bool = False) -> tuple[Stream, Stream]:
    """The blobs as streams of mapping items."""
    train, val = blobs(n_train=n_train, n_val=n_val)
    return Stream(train, endless), Stream(val)


class Strings(Dataset):
    """Raw text and labels: a batch of strings, which no model can take."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[str, int]:
        return f"sample {index}", index % 3


def strings() -> tuple[Dataset, Dataset]:
    """Untokenized text."""
    return Strings(), Strings()


class SaysHello(nn.Module):
    """A model whose output is neither a tensor nor carries a loss or logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, str]:
        return {"greeting": "hello"}


def says_hello() -> nn.Module:
    """The factory of :class:`SaysHello`."""
    return SaysHello()


def read_ids(log: Path) -> list[int]:
    """Every id a training forward logged, over all ranks' files."""
    return [int(token) for path in sorted(log.parent.glob(log.name + ".rank*"))
            for token in path.read_text().split()]


def regression_blobs() -> tuple[Dataset, Dataset]:
    """Inputs of 8 features against 3 real-valued targets each."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(8, 3, generator=generator)
    def make(n: int) -> torch.utils.data.TensorDataset:
        inputs = torch.randn(n, 8, generator=generator)
        return torch.utils.data.TensorDataset(inputs, inputs @ weights)
    return make(64), make(32)
