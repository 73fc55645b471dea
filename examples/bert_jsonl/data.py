"""Texts labelled by the keyword they contain, as JSON Lines read with ``datasets.load_dataset``.

``keyword_texts`` writes ``train.jsonl`` and ``val.jsonl`` under its ``directory`` when they
are missing (one ``{"text": ..., "label": ...}`` object per line), so the example runs as it
is; point ``directory`` at files of your own with the same two fields to train on them.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

from ddp_train.checkpoint.atomic import atomic_write

KEYWORDS = (("bad", "poor", "awful", "sad"), ("good", "great", "fine", "glad"))
"""The classes, negative (0) and positive (1): a text's label is the group its one keyword is from."""
FILLERS = tuple(f"{consonant}{vowel}{end}" for consonant in "bdfgklmnpt" for vowel in "aeiou"
                for end in ("n", "r", "s", "x"))
"""200 made-up words that say nothing about the label."""
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _text(label: int, rng: random.Random) -> str:
    """6 to 16 filler words with one keyword of class ``label`` at a random place."""
    words = rng.choices(FILLERS, k=rng.randint(6, 16))
    words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
    return " ".join(words)


def write_jsonl(path: Path, n_samples: int, seed: int) -> None:
    """``n_samples`` labelled texts (classes drawn uniformly) as JSON Lines at ``path``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_samples):
        label = rng.randrange(len(KEYWORDS))
        lines.append(json.dumps({"text": _text(label, rng), "label": label}))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank may find the file missing and write it: each writes the same bytes, and
    # the atomic rename means no rank ever reads a half-written file.
    atomic_write(path, ("\n".join(lines) + "\n").encode())


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the example's words: ``[CLS] words [SEP]``, pads with id 0."""
    words = [*SPECIAL_TOKENS, *FILLERS, *(word for group in KEYWORDS for word in group)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


class TokenizedTexts(Dataset):
    """A ``datasets`` split, tokenized: items ``{"input_ids": [...], "labels": int}``.

    ``task`` and ``model_hints`` tell the trainer the validation metrics to compute and the
    model factory its vocabulary and number of classes.
    """

    task = "classification"

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows = rows
        self.model_hints = {"vocab_size": len(tokenizer()), "num_labels": len(KEYWORDS)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def keyword_texts(directory: str = "data/bert_jsonl", n_train: int = 2000, n_val: int = 400,
                  seed: int = 0) -> tuple[TokenizedTexts, TokenizedTexts]:
    """(training, validation) texts from ``directory``'s ``train.jsonl`` and ``val.jsonl``,
    written first if missing."""
    root = Path(directory)
    files = {"train": root / "train.jsonl", "validation": root / "val.jsonl"}
    samples_and_seeds = {"train": (n_train, seed), "validation": (n_val, seed + 1)}
    for split, path in files.items():
        if not path.exists():
            write_jsonl(path, *samples_and_seeds[split])
    # Every rank would draw progress bars for loading and tokenizing; the run has its own.
    datasets.disable_progress_bars()
    # The Arrow cache goes next to the files rather than into the user's home directory.
    splits = datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()},
                                   cache_dir=str(root / "cache"))
    encode = tokenizer()

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"input_ids": encode(batch["text"])["input_ids"], "labels": batch["label"]}

    tokenized = splits.map(tokenize, batched=True, remove_columns=["text", "label"])
    return TokenizedTexts(tokenized["train"]), TokenizedTexts(tokenized["validation"])


@functools.cache
def _collator() -> DataCollatorWithPadding:
    return DataCollatorWithPadding(tokenizer())


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad to the longest text: ``input_ids``, ``attention_mask`` (0 at pads), ``labels``.

    A module-level function (not the collator object) so that DataLoader workers can pickle it.
    """
    return _collator()(items)
