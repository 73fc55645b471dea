"""What is done to a model's weights around training: init, weight/spectral norm, and the
plain state dict that ``model.pt`` holds.
"""

from __future__ import annotations

import copy
import typing
from collections import Counter

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrizations, parametrize

from ddp_train.config.sections import InitScheme, WeightNorm

INIT_SCHEMES: tuple[str, ...] = typing.get_args(InitScheme)
NORM_KINDS: tuple[str, ...] = typing.get_args(WeightNorm)

# The layers whose ``weight`` init and norm act on.
_WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def apply_init(model: nn.Module, scheme: str) -> None:
    """Re-initialise ``model`` in place with ``scheme`` (one of :data:`INIT_SCHEMES`).

    ``default`` keeps the factory's init. Otherwise Linear/Conv weights get the scheme
    (``normal`` is N(0, 0.02)) and zero biases, Embedding weights get N(0, 0.02), and
    LayerNorm is left alone. Draws from torch's global RNG, so the same seed gives the
    same weights on every rank. Call it before :func:`apply_norm`.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r} (expected one of {', '.join(INIT_SCHEMES)})")
    if scheme == "default":
        return
    # A tied weight (GPT's lm_head is the token embedding) is initialised once, by its
    # first owner in module order, so the later owner does not silently overwrite it.
    done: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Embedding, *_WEIGHTED_LAYERS)) or id(module.weight) in done:
            continue
        if parametrize.is_parametrized(module, "weight"):
            # The init would fill a computed tensor and be lost without an error.
            raise ValueError("apply_init must run before apply_norm")
        done.add(id(module.weight))
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        else:
            _init_weight(module.weight, scheme)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _init_weight(weight: torch.Tensor, scheme: str) -> None:
    """Fill a Linear/Conv weight according to a non-default ``scheme``."""
    if scheme == "kaiming":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    elif scheme == "xavier":
        nn.init.xavier_uniform_(weight)
    elif scheme == "normal":
        nn.init.normal_(weight, mean=0.0, std=0.02)
    else:
        nn.init.orthogonal_(weight)


def apply_norm(model: nn.Module, kind: str) -> None:
    """Reparametrise the ``weight`` of every Linear/Conv layer of ``model`` in place.

    ``kind`` is one of :data:`NORM_KINDS`. A weight shared with another module (GPT's
    lm_head tied to the token embedding) is skipped: a parametrization would replace it by
    a computed tensor and break the tie.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r} (expected one of {', '.join(NORM_KINDS)})")
    if kind == "none":
        return
    owners = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    norm = parametrizations.weight_norm if kind == "weight" else parametrizations.spectral_norm
    for module in list(model.modules()):
        if isinstance(module, _WEIGHTED_LAYERS) and owners[id(module.weight)] == 1:
            norm(module, "weight")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the factory's plain model, on CPU, whatever wraps or reparametrises it.

    DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) wrappers are unwrapped and
    weight/spectral norm parametrizations are replaced by the weights they compute (as in
    eval mode), so the result loads with ``strict=True`` into a fresh model from the same
    factory. ``model`` itself is not modified.
    """
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    if any(parametrize.is_parametrized(module) for module in model.modules()):
        # Reading a spectral-normed weight in training mode runs a power iteration, which
        # would change the model; an eval-mode copy reads it as evaluation sees it.
        model = copy.deepcopy(model).eval()
    state = model.state_dict()
    # Parametrized weights are read rather than folded with remove_parametrizations: that
    # edits the module's class, which a deep copy shares with the original model.
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            prefix = f"{name}." if name else ""
            for tensor_name in module.parametrizations:
                inner = f"{prefix}parametrizations.{tensor_name}."
                state = {key: value for key, value in state.items() if not key.startswith(inner)}
                state[prefix + tensor_name] = getattr(module, tensor_name)
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
