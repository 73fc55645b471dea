"""A model with several named inputs and its data, for the export and serving tests.

The Hugging Face shape of things without Hugging Face: items of token ids of varying
length, a padding collate that adds an attention mask, and a model that takes
``input_ids`` and ``attention_mask`` as keyword arguments and returns ``{"logits"}``
(and ``"loss"`` when given ``labels``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB, MAX_LENGTH, CLASSES = 40, 16, 3
PAD = 0


class TokenItems(Dataset):
    """Items ``{"input_ids": [L], "labels": class}`` with L from 2 to 12; the class is the
    first token's residue, so the task is learnable."""

    model_hints = {"vocab_size": VOCAB, "num_classes": CLASSES}
    task = "classification"

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 13, (n,), generator=generator)
        self.items = [torch.randint(1, VOCAB, (int(length),), generator=generator) for length in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.items[index]
        return {"input_ids": ids, "labels": int(ids[0]) % CLASSES}


def token_data(n_train: int = 96, n_val: int = 40) -> tuple[TokenItems, TokenItems]:
    """``(train, val)`` token items (``data.name``)."""
    return TokenItems(n_train, seed=1), TokenItems(n_val, seed=2)


def pad_batch(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``data.collate``: pad ``input_ids`` to the longest item, with the attention mask."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, :len(item["input_ids"])] = item["input_ids"]
        attention_mask[row, :len(item["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([item["labels"] for item in items])}


class TokenClassifier(nn.Module):
    """Embeddings with learned positions (up to ``max_length``), masked mean pooling, a head."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        # Looked up by position: a longer sequence fails inside the model (no shape guard).
        self.positions = nn.Embedding(max_length, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = torch.tanh(self.tokens(input_ids) + self.positions(positions))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def token_classifier(vocab_size: int = VOCAB, num_classes: int = CLASSES, max_length: int = MAX_LENGTH,
                     width: int = 16) -> nn.Module:
    """``model.name``: the token classifier."""
    return TokenClassifier(vocab_size, num_classes, max_length, width)


def tiny_bert(vocab_size: int = VOCAB, num_classes: int = CLASSES, max_length: int = MAX_LENGTH) -> nn.Module:
    """``model.name``: a one-layer Hugging Face BERT classifier with random weights (nothing downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_length, num_labels=num_classes))
