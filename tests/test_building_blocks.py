"""Unit tests of the built-in models, init/norm, plain state dicts, data sets, losses and registries."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from ddp_train.components.datasets import (DATASETS, _digits_table, chars, digits, synthetic_classification,
                                           synthetic_regression)
from ddp_train.components.losses import build_loss
from ddp_train.components.models import MODELS, cnn, gpt, mlp
from ddp_train.components.weights import INIT_SCHEMES, apply_init, apply_norm, plain_state_dict
from ddp_train.errors import ConfigError

# Small sizes keep the whole file fast on a shared CPU.
SMALL_GPT = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}

# (factory, kwargs, a batch maker, the expected output shape)
ModelCase = tuple[Callable[..., nn.Module], dict[str, Any], Callable[[], torch.Tensor], tuple[int, ...]]
MODEL_CASES: dict[str, ModelCase] = {
    "mlp": (mlp, {"hidden_sizes": [32, 16], "activation": "gelu", "dropout": 0.1},
            lambda: torch.rand(4, 64), (4, 10)),
    "mlp_image": (mlp, {"in_features": 64}, lambda: torch.rand(4, 1, 8, 8), (4, 10)),
    "cnn_flat": (cnn, {"channels": [4, 8]}, lambda: torch.rand(4, 64), (4, 10)),
    "cnn_image": (cnn, {"in_channels": 3, "image_size": 6, "num_classes": 5, "channels": [4]},
                  lambda: torch.rand(4, 3, 6, 6), (4, 5)),
    "gpt": (gpt, SMALL_GPT, lambda: torch.randint(32, (2, 16)), (2, 16, 32)),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_forward_backward(case: str) -> None:
    torch.manual_seed(0)
    factory, kwargs, batch, shape = MODEL_CASES[case]
    model = factory(**kwargs)
    out = model(batch())
    assert out.shape == shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_are_registered() -> None:
    assert {"mlp", "cnn", "gpt"} <= set(MODELS.names())
    assert MODELS.resolve("gpt") is gpt


def test_cnn_flat_and_image_inputs_agree() -> None:
    model = cnn(in_channels=2, image_size=5, num_classes=3, channels=[4])
    images = torch.rand(3, 2, 5, 5)
    torch.testing.assert_close(model(images.flatten(1)), model(images))
    with pytest.raises(ValueError, match="cnn expects"):
        model(torch.rand(3, 2, 5))


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = gpt(**SMALL_GPT).eval()
    tokens = torch.randint(32, (2, 12))
    t = 5
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 32
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t + 1], after[:, :t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


def test_gpt_structure_and_errors() -> None:
    model = gpt(**SMALL_GPT)
    assert model.lm_head.weight is model.tok_emb.weight
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        gpt(n_embd=30, n_head=4)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme", INIT_SCHEMES[1:])
def test_apply_init_is_seeded_and_changes_weights(scheme: str) -> None:
    def build() -> nn.Module:
        torch.manual_seed(1)
        model = gpt(**SMALL_GPT)
        torch.manual_seed(2)
        apply_init(model, scheme)
        return model

    torch.manual_seed(1)
    factory_weights = _weights(gpt(**SMALL_GPT))
    first, second = build(), build()
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key])
    changed = _weights(first)
    assert not torch.equal(changed["blocks.0.attn.qkv.weight"], factory_weights["blocks.0.attn.qkv.weight"])
    assert not changed["blocks.0.attn.qkv.bias"].any()
    torch.testing.assert_close(changed["blocks.0.ln_1.weight"], factory_weights["blocks.0.ln_1.weight"])
    # The tie survives, and the tied weight keeps the embedding's N(0, 0.02).
    assert first.lm_head.weight is first.tok_emb.weight
    assert first.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_apply_init_default_and_errors() -> None:
    torch.manual_seed(0)
    model = cnn()
    before = _weights(model)
    apply_init(model, "default")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match="unknown init"):
        apply_init(model, "he")
    apply_norm(model, "weight")
    with pytest.raises(ValueError, match="before apply_norm"):
        apply_init(model, "kaiming")


def _parametrized(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if parametrize.is_parametrized(m)}


@pytest.mark.parametrize("kind", ["weight", "spectral"])
@pytest.mark.parametrize("case", ["mlp", "cnn_image", "gpt"])
def test_norm_then_plain_state_dict_loads_into_fresh_model(kind: str, case: str) -> None:
    torch.manual_seed(0)
    factory, kwargs, batch, _ = MODEL_CASES[case]
    model = factory(**kwargs)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    apply_norm(model, kind)
    # Every layer but the tied lm_head (whose weight is the token embedding's) is normed.
    assert _parametrized(model) == layers - {"lm_head"}
    if case == "gpt":
        assert model.lm_head.weight is model.tok_emb.weight
    inputs = batch()
    for _ in range(3):  # spectral norm runs its power iteration in training-mode forwards
        model(inputs)
    before = _weights(model)

    state = plain_state_dict(model)
    # The model, its spectral norm vectors included, is left as it was.
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    fresh = factory(**kwargs).eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(inputs), model.eval()(inputs), rtol=1e-4, atol=1e-5)
    assert _parametrized(model) == layers - {"lm_head"}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())


def test_apply_norm_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown norm"):
        apply_norm(mlp(), "batch")


def test_plain_state_dict_copies_tensors() -> None:
    model = mlp()
    state = plain_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    state["1.weight"].zero_()
    assert model[1].weight.abs().sum() > 0


class _Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule: the model under ``_orig_mod``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._orig_mod = module


def test_plain_state_dict_strips_compile_prefix() -> None:
    model = mlp()
    apply_norm(model, "weight")
    wrapped = _Compiled(model)
    assert all(key.startswith("_orig_mod.") for key in wrapped.state_dict())
    mlp().load_state_dict(plain_state_dict(wrapped), strict=True)


def test_plain_state_dict_strips_ddp_prefix() -> None:
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = _Compiled(DistributedDataParallel(mlp()))
        assert all(key.startswith("_orig_mod.module.") for key in wrapped.state_dict())
        mlp().load_state_dict(plain_state_dict(wrapped), strict=True)
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# data sets

DATA_CASES: dict[str, tuple[Callable[..., Any], dict[str, Any], int]] = {
    "digits": (digits, {}, 1797),
    "synthetic_classification": (synthetic_classification, {"n_samples": 200, "n_classes": 3}, 200),
    "synthetic_regression": (synthetic_regression, {"n_samples": 100, "n_targets": 2}, 100),
}


def test_digits_read_without_scikit_learn_equal_load_digits() -> None:
    """The fast path (scikit-learn's CSV read directly) gives exactly what load_digits gives."""
    from sklearn.datasets import load_digits

    pixels, labels = _digits_table()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and pixels.dtype == bunch.data.dtype
    assert np.array_equal(labels, bunch.target)


@pytest.mark.parametrize("case", DATA_CASES)
def test_dataset_sizes_and_determinism(case: str) -> None:
    factory, kwargs, total = DATA_CASES[case]
    train, val = factory(**kwargs)
    again_train, again_val = factory(**kwargs)
    assert len(train) + len(val) == total
    assert len(val) == round(0.2 * total)
    for ours, theirs in ((train, again_train), (val, again_val)):
        assert torch.equal(ours.inputs, theirs.inputs) and torch.equal(ours.targets, theirs.targets)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (train.model_hints["in_features"],)
    if train.task == "classification":
        assert y.dtype == torch.int64
        classes = train.model_hints["num_classes"]
        assert 0 <= int(torch.cat([train.targets, val.targets]).min())
        assert int(torch.cat([train.targets, val.targets]).max()) < classes
    else:
        assert train.task == "regression"
        assert y.shape == (train.model_hints["out_features"],) and y.dtype == torch.float32


def test_digits_hints_fit_the_models() -> None:
    train, _ = digits(val_fraction=0.5, split_seed=3)
    x, y = train[:5]
    for factory in (mlp, cnn):
        kwargs = {k: v for k, v in train.model_hints.items() if k in inspect.signature(factory).parameters}
        assert factory(**kwargs)(x).shape == (5, 10)
    assert 0.0 <= float(train.inputs.min()) and float(train.inputs.max()) <= 1.0
    assert not torch.equal(train.inputs, digits(val_fraction=0.5, split_seed=4)[0].inputs)


def test_chars_windows_and_vocab() -> None:
    train, val = chars(block_size=16, val_fraction=0.2, max_chars=5000)
    assert train.task == val.task == "language_model"
    assert train.model_hints == val.model_hints
    vocab_size = train.model_hints["vocab_size"]
    assert train.model_hints["block_size"] == 16
    for data in (train, val):
        assert data.inputs.shape[1] == 16 and data.inputs.dtype == torch.int64
        assert int(data.inputs.max()) < vocab_size and int(data.targets.max()) < vocab_size
        torch.testing.assert_close(data.inputs[:, 1:], data.targets[:, :-1])
    # Train windows start every 8 characters, validation windows every 16.
    torch.testing.assert_close(train.inputs[1, :8], train.inputs[0, 8:])
    torch.testing.assert_close(val.inputs[1, 0], val.targets[0, -1])
    assert len(train) == (4000 - 17) // 8 + 1 and len(val) == (1000 - 17) // 16 + 1
    again, _ = chars(block_size=16, val_fraction=0.2, max_chars=5000)
    assert torch.equal(train.inputs, again.inputs)


def test_chars_full_corpus_is_big_enough() -> None:
    train, val = chars()
    assert len(train) * 32 + len(val) * 64 > 50_000
    assert set(DATA_CASES) | {"chars"} <= set(DATASETS.names())


@pytest.mark.parametrize(("factory", "kwargs", "key"), [
    (digits, {"val_fraction": 1.0}, "val_fraction"),
    (synthetic_classification, {"n_classes": 1}, "n_classes"),
    (synthetic_classification, {"n_samples": 2, "val_fraction": 0.1}, "n_samples"),
    (synthetic_classification, {"noise": -1.0}, "noise"),
    (synthetic_regression, {"n_targets": 0}, "n_targets"),
    (synthetic_regression, {"val_fraction": 0.0}, "val_fraction"),
    (chars, {"block_size": 1}, "block_size"),
    (chars, {"block_size": 64, "max_chars": 500}, "block_size"),
    (chars, {"max_chars": 0}, "max_chars"),
])
def test_bad_data_args_name_the_key(factory: Callable[..., Any], kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        factory(**kwargs)
    assert info.value.key == f"data.args.{key}"
    assert repr(kwargs[key]) in info.value.message


def test_registry_suggests_closest_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mlp'") as info:
        MODELS.resolve("mpl")
    assert info.value.key == "model.name"
    with pytest.raises(ConfigError, match="did you mean 'digits'") as info:
        DATASETS.resolve("digit")
    assert info.value.key == "data.name"


@pytest.mark.parametrize("outputs_shape, targets_shape", [((6, 5), (6,)), ((6, 5), (6, 1)),
                                                          ((2, 3, 5), (2, 3))])
def test_cross_entropy_over_the_last_dimension(outputs_shape: tuple[int, ...],
                                               targets_shape: tuple[int, ...]) -> None:
    # Class scores (B, C), a column of labels (B, 1) and sequence logits (B, T, C) all mean
    # one prediction per row of the last dimension, and gradients flow back the same way.
    torch.manual_seed(0)
    outputs = torch.randn(outputs_shape, requires_grad=True)
    targets = torch.randint(5, targets_shape)
    loss = build_loss("cross_entropy", {"label_smoothing": 0.1})(outputs, targets)
    loss.backward()
    reference_outputs = outputs.detach().clone().requires_grad_(True)
    expected = nn.functional.cross_entropy(reference_outputs.reshape(-1, 5), targets.reshape(-1),
                                           label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs.grad, reference_outputs.grad, rtol=0, atol=0)
