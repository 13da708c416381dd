"""DoRALinear against the DoRA formula: init, forward, detached norm, unscaled bias, dropout
semantics, slices, merge, and the 4-bit base (QDoRA)."""

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402
from peft import quant  # noqa: E402
from peft.dora import DoRALinear  # noqa: E402
from conftest import linear  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def cfg(**kw):
    return peft.PeftConfig(method="dora", **dict(dict(r=4, alpha=8.0), **kw))


def randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def reference(x, W, b, A, B, m, s, xd=None):
    """y = f ⊙ (x Wᵀ + s·(x̃ Aᵀ)Bᵀ) + b with f = m / ‖W + sBA‖_row (detached); with dropout
    (x̃ ≠ x) HF's form x Wᵀ + b + (f − 1) ⊙ x̃ Wᵀ + f ⊙ s·(x̃ Aᵀ)Bᵀ."""
    xd = x if xd is None else xd
    norm = (W + s * B @ A).norm(dim=1).detach()
    f = m / norm
    return x @ W.T + b + (f - 1) * (xd @ W.T) + f * ((s * (xd @ A.T)) @ B.T)


@pytest.mark.parametrize("slices", [None, ("q", "v")])
def test_init_equals_base(slices):
    base = linear(16, 48)
    x = torch.randn(3, 16)
    y0 = base(x)
    layer = DoRALinear(base, cfg(), slices=slices)
    torch.testing.assert_close(layer(x), y0, atol=1e-6, rtol=0)
    norms = base.weight.norm(dim=1)
    expected = norms if slices is None else norms.view(3, 16)[[0, 2]]
    torch.testing.assert_close(layer.lora_magnitude, expected)


def test_formula_and_merge():
    base = linear()
    W, b = base.weight.clone(), base.bias.clone()
    layer = DoRALinear(base, cfg())
    randomize(layer)
    x = torch.randn(2, 5, 48)
    y = layer(x)
    expected = reference(x, W, b, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scale)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=0)
    # merged rows have exactly the learned magnitudes (|m|: the noise made a few m negative)
    torch.testing.assert_close(merged.weight.norm(dim=1), layer.lora_magnitude.detach().abs(), atol=1e-5, rtol=0)


def test_norm_is_detached():
    """Gradients equal those of the reference with ‖W + sBA‖ treated as a constant."""
    base = linear()
    W, b = base.weight.clone(), base.bias.clone()
    layer = DoRALinear(base, cfg())
    randomize(layer)
    x = torch.randn(6, 48)
    g = torch.randn(6, 40)
    (layer(x) * g).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    m = layer.lora_magnitude.detach().clone().requires_grad_()
    (reference(x, W, b, A, B, m, layer.scale) * g).sum().backward()
    for ours, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude, m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)
    assert layer.base.weight.grad is None


def test_bias_not_scaled():
    layer = DoRALinear(linear(), cfg())
    randomize(layer)
    f = layer.lora_magnitude / layer.weight_norm()
    assert (f - 1).abs().max() > 0.01  # the rows really are rescaled
    torch.testing.assert_close(layer(torch.zeros(1, 48))[0], layer.base.bias, atol=1e-6, rtol=0)


def test_dropout_semantics():
    base = linear()
    W, b = base.weight.clone(), base.bias.clone()
    layer = DoRALinear(base, cfg(dropout=0.3)).train()
    randomize(layer)
    x = torch.randn(8, 48)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.3, training=True)
    expected = reference(x, W, b, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scale, xd=xd)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    layer.eval()  # no dropout in eval: the plain formula, equal to the merged layer
    torch.testing.assert_close(layer(x), layer.merge()(x), atol=1e-5, rtol=0)


def test_slices():
    d = 16
    base = linear(d, 3 * d)
    W, b = base.weight.clone(), base.bias.clone()
    layer = DoRALinear(base, cfg(), slices=("q", "v"))
    assert layer.lora_magnitude.shape == (2, d)
    randomize(layer)
    x = torch.randn(4, d)
    y = layer(x)
    torch.testing.assert_close(y[:, d:2 * d], x @ W[d:2 * d].T + b[d:2 * d], atol=0, rtol=0)  # k untouched
    for j, i in enumerate((0, 2)):  # q and v: DoRA on their own rows
        rows = slice(i * d, (i + 1) * d)
        A, B = layer.lora_A[j * 4:(j + 1) * 4], layer.lora_B[j]
        expected = reference(x, W[rows], b[rows], A, B, layer.lora_magnitude[j], layer.scale)
        torch.testing.assert_close(y[:, rows], expected, atol=1e-5, rtol=1e-5)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.weight[d:2 * d], W[d:2 * d])


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_qdora_init_and_merge():
    """On a 4-bit base, m starts as the norms of the dequantized weight, so QDoRA starts exactly
    at the quantized base; merge gives the dequantized, DoRA-scaled weight."""
    q = quant.freeze_linear(linear(64, 64), peft.PeftConfig(method="dora", quantize="nf4"))
    x = torch.randn(3, 64)
    y0 = q(x)
    layer = DoRALinear(q, cfg(quantize="nf4"))
    torch.testing.assert_close(layer(x), y0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_magnitude, quant.dequantize(q).norm(dim=1))
    randomize(layer)
    torch.testing.assert_close(layer.merge()(x), layer(x), atol=1e-5, rtol=0)
