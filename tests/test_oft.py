"""Tests for peft/oft.py (OFT, COFT, block sharing, multiplicative dropout) on standalone Linears,
against HF peft's exact-Cayley OFT (in a subprocess: our peft/ shadows it here), and on a tiny GPT."""

import os

import pytest
import torch
import torch.nn as nn

from errors import UserError
from peft.config import PeftConfig
from peft.oft import OFTLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(**kw):
    kw.setdefault("method", "oft")
    return PeftConfig(**kw)


def make_layer(d_in=16, d_out=12, b=4, seed=0, scale=0.5, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    layer = OFTLinear(base, make_cfg(oft_block_size=b, **kw), None)
    if scale:
        with torch.no_grad():
            layer.oft_s.normal_(0.0, scale)
    return layer


def dense_R(layer):
    with torch.no_grad():
        R = layer.rotation().expand(layer.n_blocks, -1, -1)
    return torch.block_diag(*R)


def test_identity_at_init():
    layer = make_layer(scale=0)
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer.oft_s, torch.zeros_like(layer.oft_s))
    assert torch.allclose(layer(x), layer.base(x), atol=1e-6)
    assert torch.allclose(layer.merge().weight, layer.base.weight, atol=1e-6)


def test_blocks_orthogonal_det_one_and_cayley_orientation():
    layer = make_layer()
    with torch.no_grad():
        R = layer.rotation()
        S = layer.skew()
    I = torch.eye(4)
    assert R.shape == (4, 4, 4)
    assert torch.allclose(S, -S.transpose(-2, -1))
    assert torch.allclose(R.transpose(-2, -1) @ R, I.expand(4, 4, 4), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4), atol=1e-5)
    # R_i = (I + S_i)(I - S_i)⁻¹, and not the identity (parameters are random)
    assert torch.allclose(R, (I + S) @ torch.linalg.inv(I - S), atol=1e-5)
    assert (R - I).abs().max() > 0.1


def test_forward_rotates_input_and_keeps_neuron_angles():
    layer = make_layer()
    x = torch.randn(2, 5, 16)
    R, W, b = dense_R(layer), layer.base.weight, layer.base.bias
    y = layer(x)
    assert torch.allclose(y, (x @ R) @ W.T + b, atol=1e-5)  # y = (x R) Wᵀ + b
    W2 = layer.merge().weight
    assert torch.allclose(W2, W @ R.T, atol=1e-5)  # W' = W Rᵀ
    assert torch.allclose(W2 @ W2.T, W @ W.T, atol=1e-5)  # W'W'ᵀ = WWᵀ
    assert not torch.allclose(W2, W, atol=1e-3)


def test_merge_equals_forward():
    layer = make_layer(d_in=32, d_out=24, b=8)
    x = torch.randn(3, 7, 32)
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert torch.equal(merged.bias, layer.base.bias)
    assert torch.allclose(merged(x), layer(x), atol=1e-5)


def test_only_oft_params_train():
    layer = make_layer()
    layer(torch.randn(4, 16)).square().sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["oft_s"]
    assert layer.oft_s.grad is not None and layer.oft_s.grad.abs().sum() > 0
    assert layer.oft_s.shape == (4, 6)  # nb blocks of b(b-1)/2 entries
    assert set(layer.state_dict()) == {"oft_s", "base.weight", "base.bias"}  # index buffers not saved


def test_coft_projects_every_block_into_the_ball():
    eps = 0.3
    layer = make_layer(scale=0.0, coft_eps=eps)
    with torch.no_grad():
        layer.oft_s.normal_(0.0, 1.0)
        layer.oft_s[1] *= 1e-3  # one block well inside the ball: must be left alone
    inside = layer.oft_s[1].clone()
    x = torch.randn(2, 16)
    y = layer(x)
    radius = eps / layer.n_blocks ** 0.5  # eps' = eps / sqrt(nb), on ‖S_i‖_F (HF peft's convention)
    with torch.no_grad():
        norms = torch.linalg.matrix_norm(layer.skew())
    assert torch.all(norms <= radius * (1 + 1e-5))
    assert torch.allclose(norms[[0, 2, 3]], torch.full((3,), radius), rtol=1e-5)  # rescaled onto the sphere
    assert torch.equal(layer.oft_s[1], inside)
    assert torch.allclose(layer.merge()(x), y, atol=1e-5)


def test_block_share():
    layer = make_layer(block_share=True)
    assert layer.oft_s.shape == (1, 6)
    R = dense_R(layer)
    assert torch.allclose(R[:4, :4], R[12:, 12:]) and not torch.allclose(R[:4, :4], torch.eye(4))
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), (x @ R) @ layer.base.weight.T + layer.base.bias, atol=1e-5)
    assert torch.allclose(layer.merge()(x), layer(x), atol=1e-5)
    eps = 0.2  # with one shared block, COFT's radius is eps itself
    layer = make_layer(block_share=True, coft_eps=eps, scale=1.0)
    layer(x)
    assert torch.linalg.matrix_norm(layer.skew().detach()).item() == pytest.approx(eps, rel=1e-5)


def test_multiplicative_dropout_keeps_exactly_int_p_nb_blocks_identity():
    layer = make_layer(d_in=32, b=4, dropout=0.5)  # nb = 8: 4 blocks are the identity per step
    seen = {}
    layer.base.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    x = torch.randn(3, 32)
    layer.train()
    layer(x)
    same = (seen["x"] - x).view(3, 8, 4).abs().amax(dim=(0, 2)) < 1e-7
    assert same.sum().item() == 4
    layer.eval()  # no dropout in eval mode, nor in merge
    assert torch.allclose(layer(x), layer.merge()(x), atol=1e-5)
    assert torch.allclose(layer(x), (x @ dense_R(layer)) @ layer.base.weight.T + layer.base.bias, atol=1e-5)


def test_bad_block_size_and_slices_are_user_errors():
    with pytest.raises(UserError, match=r"oft_block_size 5 .* in_features 16.*\[1, 2, 4, 8, 16\]"):
        OFTLinear(nn.Linear(16, 8), make_cfg(oft_block_size=5), None)
    with pytest.raises(UserError, match="in_features 16"):
        OFTLinear(nn.Linear(16, 8), make_cfg(oft_block_size=32), None)
    with pytest.raises(UserError, match="c_attn"):
        OFTLinear(nn.Linear(8, 24), make_cfg(oft_block_size=4), ("q", "v"))


def test_nf4_base_merge_equals_forward():
    pytest.importorskip("bitsandbytes")
    from peft.quant import freeze_linear
    torch.manual_seed(0)
    cfg = make_cfg(oft_block_size=8, quantize="nf4")
    layer = OFTLinear(freeze_linear(nn.Linear(64, 32), cfg), cfg, None)
    with torch.no_grad():
        layer.oft_s.normal_(0.0, 0.3)
    x = torch.randn(4, 64)
    assert torch.allclose(layer.merge()(x), layer(x), atol=1e-4)


HF_SCRIPT = """
import os, sys
root = os.path.realpath(sys.argv[1])
sys.path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]  # HF's peft, not ours
import torch
from peft.tuners.oft.layer import OFTRotationModule
d = torch.load("in.pt")
nb, b = d["s"].shape[0], d["b"]
m = OFTRotationModule(nb, b * (b - 1) // 2, b, nb * b, coft=True, eps=d["eps"], use_cayley_neumann=False)
with torch.no_grad():
    m.weight.copy_(-d["s"])  # HF's R is (I - S)(I + S)^-1: our R for -S
    torch.save({"x_rot": m(d["x"]), "s": -m.weight}, "out.pt")
"""


def test_same_rotation_and_coft_as_hf_peft(tmp_path):
    """HF peft's exact-Cayley OFT with oft_R.weight = -oft_s and eps = coft_eps rotates x like us."""
    import subprocess
    import sys
    layer = make_layer(d_in=12, b=4, scale=1.0, coft_eps=0.5)  # large S: COFT rescales every block
    x = torch.randn(5, 12)
    torch.save({"s": layer.oft_s.detach().clone(), "b": 4, "eps": 0.5, "x": x}, tmp_path / "in.pt")
    seen = {}
    layer.base.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    layer(x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", HF_SCRIPT, ROOT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = torch.load(tmp_path / "out.pt")
    assert torch.allclose(hf["s"], layer.oft_s, atol=1e-6)  # the same COFT projection
    assert torch.allclose(hf["x_rot"], seen["x"], atol=1e-5)


def test_tiny_gpt_inject_step_and_merge():
    from conftest import tiny_gpt
    from peft import adapter_state_dict, count_parameters, inject, merge
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (2, 8))
    logits0, _ = model(idx, targets=idx)
    inject(model, make_cfg(oft_block_size=8))  # default targets: c_attn, attn.c_proj
    assert count_parameters(model)[0] == 2 * 2 * (32 // 8) * (8 * 7 // 2)  # layers · targets · nb · b(b-1)/2
    assert sorted({k.split(".")[-1] for k in adapter_state_dict(model)}) == ["oft_s"]
    logits, loss = model(idx, targets=idx)
    assert torch.allclose(logits, logits0, atol=1e-5)  # R = I at init
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    with torch.no_grad():
        logits1, _ = model(idx, targets=idx)
        assert not torch.allclose(logits1, logits0, atol=1e-4)
        merge(model)
        assert torch.allclose(model(idx, targets=idx)[0], logits1, atol=1e-5)
