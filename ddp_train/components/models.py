"""Built-in models: ``mlp``, ``cnn`` and ``gpt``.

Factories are registered in :data:`MODELS` under the names used by ``model.name``; a
user's own factory is named as ``package.module:factory`` instead. None of the built-ins
uses batch norm, so a run on N ranks matches a run on one rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddp_train.components.registry import Registry

MODELS = Registry("model", "model.name")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    """A fresh activation layer by name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (expected one of {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()


# ---------------------------------------------------------------------------------------
# mlp


@MODELS.register("mlp")
def mlp(in_features: int = 64, out_features: int = 10, hidden_sizes: Sequence[int] = (128, 128),
        activation: str = "relu", dropout: float = 0.0) -> nn.Module:
    """A multilayer perceptron; inputs of shape ``(B, ...)`` are flattened to ``(B, -1)``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), _activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# cnn


class SmallCNN(nn.Module):
    """3x3 conv + ReLU stages, one 2x2 max-pool, global average pool, linear classifier.

    Takes images ``(B, C, H, W)`` or flat rows ``(B, C*H*W)``, so it trains on the same
    tabular data sets as the MLP (e.g. the 8x8 digits).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 channels: Sequence[int], dropout: float) -> None:
        super().__init__()
        if not channels:
            raise ValueError("cnn needs at least one conv channel count")
        self.in_channels = in_channels
        self.image_size = image_size
        layers: list[nn.Module] = []
        width = in_channels
        for index, out in enumerate(channels):
            layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.ReLU()]
            # One pool after the first stage halves the work of the later ones; tiny
            # images keep their full resolution.
            if index == 0 and image_size >= 4:
                layers.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        elif x.dim() != 4:
            raise ValueError(f"cnn expects (B, C*H*W) or (B, C, H, W) input, got shape {tuple(x.shape)}")
        features = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(features))


@MODELS.register("cnn")
def cnn(in_channels: int = 1, image_size: int = 8, num_classes: int = 10,
        channels: Sequence[int] = (16, 32), dropout: float = 0.0) -> nn.Module:
    """A small convolutional classifier for square images (flat or ``(B, C, H, W)`` input)."""
    return SmallCNN(in_channels, image_size, num_classes, channels, dropout)


# ---------------------------------------------------------------------------------------
# gpt


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` to ``(B, T, C)``."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads), the layout the fused attention kernel wants.
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.proj(y))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` to ``(B, T, C)``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A small decoder-only transformer language model (nanoGPT-style).

    ``forward`` maps token ids ``(B, T)``, ``T <= block_size``, to next-token logits
    ``(B, T, vocab_size)``. The output projection shares its weight with the token
    embedding. :meth:`fsdp_units` names the blocks as the units FSDP shards one by one.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled down by depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections to the residual stream; scaling them keeps the
        # stream's variance independent of depth at init.
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def fsdp_units(self) -> list[nn.Module]:
        """The modules ``train.strategy=fsdp`` shards as units: one per transformer block.

        The embeddings and the tied head stay in the root unit (a tied weight must live in
        one unit).
        """
        return list(self.blocks)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``."""
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {self.block_size}")
        positions = torch.arange(length, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@MODELS.register("gpt")
def gpt(vocab_size: int = 256, block_size: int = 64, n_layer: int = 2, n_head: int = 4,
        n_embd: int = 128, dropout: float = 0.0, bias: bool = True) -> nn.Module:
    """A small GPT-style causal language model over ``vocab_size`` tokens."""
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
