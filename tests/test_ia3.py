"""Tests for peft/ia3.py: the (IA)³ formulas on standalone Linears, and equality with HF peft's IA3
on a tiny transformers GPT-2 (HF peft runs in a subprocess: our peft/ shadows it here)."""

import pytest
import torch
import torch.nn as nn

from errors import UserError
from peft.config import PeftConfig
from peft.ia3 import IA3Linear
from conftest import all_logits

def make_cfg(**kw):
    kw.setdefault("method", "ia3")
    return PeftConfig(**kw)


def make_layer(d_in, d_out, slices=None, feedforward=None, seed=0, base=None, cfg=None):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(d_in, d_out)
    layer = IA3Linear(base, cfg or make_cfg(), slices, feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.5 * torch.randn_like(layer.ia3_l))
    return layer


def test_identity_at_init():
    base = nn.Linear(8, 24)
    for slices in (None, ("k", "v")):
        layer = IA3Linear(base, make_cfg(), slices)
        x = torch.randn(2, 3, 8)
        assert torch.all(layer.ia3_l == 1) and torch.equal(layer(x), base(x))


def test_output_scaling_scales_rows_and_bias():
    layer = make_layer(8, 24)  # widening layer (like c_attn): output scaling by default
    assert not layer.feedforward and layer.ia3_l.shape == (24,)
    W, b, l = layer.base.weight, layer.base.bias, layer.ia3_l.detach()
    x = torch.randn(2, 3, 8)
    assert torch.allclose(layer(x), (x @ W.T + b) * l, atol=1e-6)  # y = (x Wᵀ + b) ⊙ l
    merged = layer.merge()
    assert torch.allclose(merged.weight, W * l[:, None]) and torch.allclose(merged.bias, b * l)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    assert layer.hf_ia3_l().shape == (24, 1)


def test_input_scaling_scales_columns_not_bias():
    layer = make_layer(32, 8)  # narrowing layer (like mlp.c_proj, 4C -> C): input scaling by default
    assert layer.feedforward and layer.ia3_l.shape == (32,)
    W, b, l = layer.base.weight, layer.base.bias, layer.ia3_l.detach()
    x = torch.randn(2, 3, 32)
    assert torch.allclose(layer(x), (x * l) @ W.T + b, atol=1e-5)  # y = (x ⊙ l) Wᵀ + b
    merged = layer.merge()
    assert torch.allclose(merged.weight, W * l[None, :]) and torch.equal(merged.bias, b)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    assert layer.hf_ia3_l().shape == (1, 32)


def test_side_rule_and_explicit_choice():
    assert not make_layer(16, 16).feedforward  # square (attn.c_proj): output
    assert not make_layer(16, 64).feedforward  # mlp.c_fc: output (its output is the FFN hidden layer)
    assert make_layer(64, 16).feedforward  # mlp.c_proj: input
    assert make_layer(16, 64, feedforward=True).ia3_l.shape == (16,)
    assert make_layer(64, 16, feedforward=False).ia3_l.shape == (16,)


def test_kv_slices_scale_only_their_rows():
    d = 8
    layer = make_layer(d, 3 * d, slices=("v", "k"))
    assert layer.slices == ("k", "v") and layer.ia3_l.shape == (2 * d,)
    l = layer.ia3_l.detach()
    x = torch.randn(4, d)
    y, y0 = layer(x), layer.base(x)
    assert torch.equal(y[:, :d], y0[:, :d])  # q untouched
    assert torch.allclose(y[:, d:2 * d], y0[:, d:2 * d] * l[:d])  # k
    assert torch.allclose(y[:, 2 * d:], y0[:, 2 * d:] * l[d:])  # v
    merged = layer.merge()
    assert torch.equal(merged.weight[:d], layer.base.weight[:d])
    assert torch.equal(merged.bias[:d], layer.base.bias[:d])
    assert torch.allclose(merged(x), y, atol=1e-5)
    hf = layer.hf_ia3_l()
    assert hf.shape == (3 * d, 1) and torch.all(hf[:d] == 1) and torch.equal(hf[d:, 0], l)
    layer(x).sum().backward()
    assert layer.ia3_l.grad is not None and not layer.base.weight.requires_grad


def test_user_errors():
    with pytest.raises(UserError, match="slices"):
        IA3Linear(nn.Linear(8, 24), make_cfg(), ("k",), feedforward=True)
    with pytest.raises(UserError, match="c_attn"):
        IA3Linear(nn.Linear(8, 16), make_cfg(), ("k",))


def test_nf4_base_merge_equals_forward():
    pytest.importorskip("bitsandbytes")
    from peft.quant import freeze_linear
    cfg = make_cfg(quantize="nf4")
    for d_in, d_out, slices in ((64, 16, None), (16, 48, ("k", "v"))):
        torch.manual_seed(0)
        layer = make_layer(d_in, d_out, slices, base=freeze_linear(nn.Linear(d_in, d_out), cfg), cfg=cfg)
        x = torch.randn(4, d_in)
        assert torch.allclose(layer.merge()(x), layer(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# A tiny GPT: inject / merge, and the same numbers through HF peft's IA3 (tests/hf_peft_helpers.py
# runs HF peft in a subprocess, since our peft/ shadows it here)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_peft_helpers import write_tiny_gpt2
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def hf_adapter(model, model_dir):
    """(adapter_config, tensors) of the adapted GPT in HF peft's IA3 format."""
    from peft import adapter_layers
    tensors, targets, feedforward = {}, set(), set()
    for name, layer in adapter_layers(model):
        tensors[f"base_model.model.{name}.ia3_l"] = layer.hf_ia3_l()
        short = ".".join(name.split(".")[-2:])  # attn.c_attn, mlp.c_proj: HF matches name suffixes
        targets.add(short)
        if layer.feedforward:
            feedforward.add(short)
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
              "target_modules": sorted(targets), "feedforward_modules": sorted(feedforward), "fan_in_fan_out": True}
    return config, tensors


def test_inject_merge_and_hf_peft_equality(tiny_gpt2, tmp_path):
    from hf_peft_helpers import run_hf_peft, save_adapter
    import hf_gpt2
    from peft import adapter_layers, inject, merge
    torch.manual_seed(1)
    idx = torch.randint(0, 101, (2, 11))
    cases = {"c_attn_mlp": ("c_attn", "mlp.c_proj"), "paper_default": None}  # None: k, v, mlp.c_proj
    ours, folders = {}, []
    for i, (tag, targets) in enumerate(cases.items()):
        model = inject(hf_gpt2.load(tiny_gpt2).eval(), make_cfg(targets=targets))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(1 + 0.5 * torch.randn_like(p))
        layers = dict(adapter_layers(model))
        assert not layers["transformer.h.0.attn.c_attn"].feedforward
        assert layers["transformer.h.1.mlp.c_proj"].feedforward
        assert layers["transformer.h.0.attn.c_attn"].slices == (None if targets else ("k", "v"))
        ours[tag] = all_logits(model, idx)
        folders.append(str(tmp_path / tag))
        save_adapter(folders[-1], *hf_adapter(model, tiny_gpt2))
        merge(model)
        assert not any(isinstance(m, IA3Linear) for m in model.modules())
        assert torch.allclose(all_logits(model, idx), ours[tag], atol=1e-5)
    assert not torch.allclose(ours["c_attn_mlp"], ours["paper_default"], atol=1e-3)
    theirs = run_hf_peft(tiny_gpt2, folders, idx, str(tmp_path / "hf"))
    for tag, (logits, merged) in zip(cases, theirs):  # HF's PeftModel, and its merge_and_unload()
        assert (ours[tag] - logits).abs().max().item() < 1e-5, tag
        assert (ours[tag] - merged).abs().max().item() < 1e-4, tag
