"""The ``chars`` corpus as a GPT-2 reads it: byte-level BPE, pieces of varied length, padded batches.

The tokenizer is trained here, on the training text only, every time it is needed: the
training is deterministic and takes about 0.1 s, so every rank and every DataLoader worker
ends up with the same vocabulary without a file to share or a process to wait for.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from ddp_train.components.datasets import chars_corpus

VOCAB_SIZE = 384
"""The BPE vocabulary: the 256 byte symbols, 2 special tokens and the merges that fill the rest."""
PAD_TOKEN = "<|pad|>"
END_TOKEN = "<|endoftext|>"
VAL_FRACTION = 0.1
"""The last tenth of the corpus is validation text, as for the built-in ``chars`` data set."""


def _texts() -> tuple[str, str]:
    """The corpus split into (training text, validation text)."""
    text = chars_corpus()
    cut = len(text) - round(len(text) * VAL_FRACTION)
    return text[:cut], text[cut:]


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens trained on the training text; pads with id 0."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD_TOKEN, END_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([_texts()[0]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=END_TOKEN)


@functools.cache
def token_streams() -> tuple[torch.Tensor, torch.Tensor]:
    """The training and the validation text as token ids."""
    train_text, val_text = _texts()
    encode = tokenizer().backend_tokenizer.encode
    return (torch.tensor(encode(train_text).ids, dtype=torch.int64),
            torch.tensor(encode(val_text).ids, dtype=torch.int64))


class Pieces(Dataset):
    """Consecutive pieces of a token stream, ``lengths[i]`` tokens each, as ``{"input_ids": ...}``.

    ``task`` and ``model_hints`` tell the trainer the validation metrics to compute and the
    model factory its vocabulary and context length.
    """

    task = "language_model"

    def __init__(self, ids: torch.Tensor, lengths: list[int]) -> None:
        if sum(lengths) > len(ids):
            raise ValueError(f"{sum(lengths)} tokens asked of a stream of {len(ids)}")
        self.pieces = list(torch.split(ids[:sum(lengths)], lengths))
        self.model_hints = {"vocab_size": VOCAB_SIZE, "n_positions": max(lengths)}

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.pieces[index]}


def random_lengths(total: int, min_len: int, max_len: int, generator: torch.Generator) -> list[int]:
    """Lengths drawn uniformly from [min_len, max_len] until ``total`` tokens are used up."""
    lengths: list[int] = []
    used = 0
    while used + max_len <= total:
        lengths.append(int(torch.randint(min_len, max_len + 1, (), generator=generator)))
        used += lengths[-1]
    return lengths


def pieces(min_len: int = 16, max_len: int = 64, seed: int = 0) -> tuple[Pieces, Pieces]:
    """(training pieces, validation pieces) of lengths in [min_len, max_len]: batches need padding."""
    if not 2 <= min_len <= max_len:
        raise ValueError(f"expected 2 <= min_len <= max_len, got {min_len} and {max_len}")
    generator = torch.Generator().manual_seed(seed)
    train_ids, val_ids = token_streams()
    return (Pieces(train_ids, random_lengths(len(train_ids), min_len, max_len, generator)),
            Pieces(val_ids, random_lengths(len(val_ids), min_len, max_len, generator)))


@functools.cache
def _collator() -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(tokenizer(), mlm=False)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad to the longest piece: ``input_ids``, ``attention_mask``, ``labels`` (-100 at pads).

    A module-level function (not the collator object) so that DataLoader workers can pickle it.
    """
    return _collator()(items)
