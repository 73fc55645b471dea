"""A small encoder, synthetic unlabelled data, and the contrastive step that trains them.

``info_nce(model, batch)`` replaces the trainer's ``loss(model(inputs), targets)``: it makes
two randomly augmented views of every sample, embeds both in one forward pass, and asks each
view to pick its partner out of the batch (InfoNCE, symmetric). It returns the loss and two
numbers the trainer logs alongside it (``train/align``, ``train/pair_accuracy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

TEMPERATURE = 0.2
"""Softmax temperature of the similarities: lower makes the task sharper."""


def clusters(n_train: int = 1024, n_val: int = 256, n_features: int = 32, n_clusters: int = 8,
             seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Unlabelled points around ``n_clusters`` random centres; items are 1-tuples ``(x,)``."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n_clusters, n_features, generator=generator)

    def points(n: int) -> TensorDataset:
        which = torch.randint(n_clusters, (n,), generator=generator)
        return TensorDataset(centres[which] + torch.randn(n, n_features, generator=generator))

    return points(n_train), points(n_val)


def encoder(in_features: int = 32, hidden: int = 128, embedding: int = 32) -> nn.Module:
    """An MLP mapping a point to its embedding (normalised in the step, not here)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, embedding))


def augment(points: torch.Tensor, noise: float = 0.5, drop: float = 0.2) -> torch.Tensor:
    """A random view: Gaussian noise, then a random ``drop`` fraction of the features zeroed."""
    noisy = points + noise * torch.randn_like(points)
    return noisy * (torch.rand_like(points) >= drop)


def info_nce(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The symmetric InfoNCE loss of two views of ``batch``, and how well the views agree.

    Both views go through ``model`` in one call: under DDP each forward must be followed by
    its own backward, so the views cannot take two calls.
    """
    (points,) = batch
    embeddings = F.normalize(model(torch.cat([augment(points), augment(points)])), dim=-1)
    first, second = embeddings.chunk(2)
    similarities = first @ second.T / TEMPERATURE
    partners = torch.arange(len(points), device=points.device)
    loss = (F.cross_entropy(similarities, partners) + F.cross_entropy(similarities.T, partners)) / 2
    with torch.no_grad():
        align = (first * second).sum(-1).mean()  # cosine similarity of the two views of a sample
        pair_accuracy = (similarities.argmax(-1) == partners).float().mean()
    return loss, {"align": align.item(), "pair_accuracy": pair_accuracy.item()}
