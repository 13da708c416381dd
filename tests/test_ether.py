"""Tests for peft/ether.py (ETHER, ETHER+, two-sided ETHER+) on standalone Linears and a tiny GPT.

Trick used throughout: on a base with W = I and b = 0, merge() returns H itself (W' = I·H = H on
the input side, H·I = H on the output side), so H's properties can be checked as a dense matrix."""

import math

import pytest
import torch
import torch.nn as nn

from errors import UserError
from peft.config import PeftConfig
from peft.ether import ETHERLinear, ETHERPlusHHLinear, ETHERPlusLinear

CLASSES = {"ether": ETHERLinear, "etherplus": ETHERPlusLinear, "etherplusHH": ETHERPlusHHLinear}


def make_cfg(**kw):
    return PeftConfig(**kw)


def make_layer(method, d_in=16, d_out=16, nb=2, slices=None, seed=0, perturb=True, base=None, **kw):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(d_in, d_out)
    layer = CLASSES[method](base, make_cfg(method=method, ether_nb=nb, **kw), slices)
    if perturb:  # move ETHER+ away from its identity init (v = -u)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.startswith("ether_v"):
                    p.copy_(torch.randn_like(p))
    return layer


def identity_base(d):
    base = nn.Linear(d, d)
    with torch.no_grad():
        base.weight.copy_(torch.eye(d))
        base.bias.zero_()
    return base


def n_trainable(layer):
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("nb", [1, 2, 4])
def test_ether_blocks_are_reflections(nb):
    d, b = 16, 16 // nb
    H = make_layer("ether", nb=nb, base=identity_base(d)).merge().weight
    I = torch.eye(b)
    for i in range(nb):
        Hi = H[i * b:(i + 1) * b, i * b:(i + 1) * b]
        assert torch.allclose(Hi @ Hi.T, I, atol=1e-5)  # orthogonal
        assert torch.allclose(Hi, Hi.T, atol=1e-6)  # symmetric
        assert torch.linalg.det(Hi).item() == pytest.approx(-1.0, abs=1e-5)
        assert torch.linalg.matrix_norm(Hi - I).item() == pytest.approx(2.0, abs=1e-5)
    off = H - torch.block_diag(*[H[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(nb)])
    assert torch.all(off == 0)  # block-diagonal


def reference_bound(shape):
    """The bound of the reference's init, nn.init.kaiming_uniform_(u, a=√5) on a tensor of `shape`:
    gain·√(3 / fan_in), torch's fan_in (size(1) times the size of any further dimensions)."""
    fan_in = nn.init._calculate_correct_fan(torch.empty(shape), "fan_in")
    return nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / fan_in)


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("slices", [None, ("q", "v")])
def test_init_matches_the_reference(method, slices):
    # GPT-2 124M sizes, ether_nb=32: d = 768, b = 24. The reference draws u for a whole layer as
    # [nb, b] (bound 1/√b = 0.204) and for each q/k/v slice as [1, nb, b] (bound 1/√d = 0.036)
    d, nb = 768, 32
    base = nn.Linear(d, 3 * d) if slices else nn.Linear(d, d)
    layer = make_layer(method, d_in=d, d_out=base.out_features, nb=nb, slices=slices, base=base, perturb=False)
    bound = reference_bound((1, nb, d // nb) if slices else (nb, d // nb))
    assert bound == pytest.approx(1 / math.sqrt(d) if slices else 1 / math.sqrt(d // nb))
    for side in layer.sides:
        u = getattr(layer, f"ether_u_{side}").detach()
        assert u.numel() >= d
        assert u.abs().max().item() <= bound
        assert u.abs().max().item() > 0.98 * bound  # uniform up to the bound: the max comes close
        assert u.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06)  # U(-a, a) has std a/√3
        if method != "ether":
            assert torch.equal(getattr(layer, f"ether_v_{side}"), -u)  # ETHER+ starts at H = I


def test_ether_matches_the_formula_on_the_input_side():
    layer = make_layer("ether", d_in=12, d_out=20, nb=3)
    u = layer.ether_u_in.detach()
    H = torch.block_diag(*[torch.eye(4) - 2 * torch.outer(ui, ui) / ui.dot(ui) for ui in u])
    W, b = layer.base.weight, layer.base.bias
    x = torch.randn(2, 5, 12)
    assert torch.allclose(layer(x), (x @ H) @ W.T + b, atol=1e-5)  # W' = W blockdiag(H), bias untouched
    assert torch.allclose(layer.merge().weight, W @ H, atol=1e-5)
    assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)  # ETHER is not the identity at init


@pytest.mark.parametrize("method", ["etherplus", "etherplusHH"])
def test_etherplus_identity_at_init_then_symmetric(method):
    layer = make_layer(method, d_in=16, d_out=24, nb=4, perturb=False)
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), layer.base(x), atol=1e-6)
    assert torch.allclose(layer.merge().weight, layer.base.weight, atol=1e-6)
    layer = make_layer("etherplus", nb=4, base=identity_base(16))
    H = layer.merge().weight
    assert torch.allclose(H, H.T, atol=1e-6)
    assert not torch.allclose(H @ H.T, torch.eye(16), atol=1e-3)  # ETHER+ is not orthogonal
    u, v = layer.ether_u_in.detach()[0], layer.ether_v_in.detach()[0]
    H0 = torch.eye(4) - torch.outer(u, u) / u.dot(u) + torch.outer(v, v) / v.dot(v)
    assert torch.allclose(H[:4, :4], H0, atol=1e-5)


@pytest.mark.parametrize("nb", [1, 2, 4, 8])
def test_parameter_counts_do_not_depend_on_nb(nb):
    d_in, d_out = 16, 32
    assert n_trainable(make_layer("ether", d_in, d_out, nb)) == d_in
    assert n_trainable(make_layer("etherplus", d_in, d_out, nb)) == 2 * d_in
    assert n_trainable(make_layer("etherplusHH", d_in, d_out, nb)) == 2 * (d_in + d_out)
    assert n_trainable(make_layer("ether", d_out, d_in, nb, flip_side=True)) == d_in  # output side
    d = 8  # q and v slices of a fused c_attn [3d, d]: d per slice and side
    assert n_trainable(make_layer("ether", d, 3 * d, nb, slices=("q", "v"))) == 2 * d
    assert n_trainable(make_layer("etherplus", d, 3 * d, nb, slices=("q", "v"))) == 2 * 2 * d
    assert n_trainable(make_layer("etherplusHH", d, 3 * d, nb, slices=("q", "v"))) == 2 * 2 * (d + d)


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplusHH"])
def test_qv_slices_leave_k_rows_untouched(method):
    d = 8
    layer = make_layer(method, d_in=d, d_out=3 * d, nb=2, slices=("v", "q"))
    assert layer.slices == ("q", "v")
    x = torch.randn(2, 3, d)
    y, y0 = layer(x), layer.base(x)
    W, W2 = layer.base.weight, layer.merge().weight
    assert torch.allclose(y[..., d:2 * d], y0[..., d:2 * d], atol=1e-6)
    assert torch.equal(W2[d:2 * d], W[d:2 * d])
    for rows in (slice(0, d), slice(2 * d, 3 * d)):
        assert not torch.allclose(W2[rows], W[rows], atol=1e-3)
    assert torch.equal(layer.merge().bias, layer.base.bias)  # the bias is not transformed
    assert torch.allclose(layer.merge()(x), y, atol=1e-5)


def test_slice_output_side_formula_and_bias():
    d, nb = 8, 2
    layer = make_layer("ether", d_in=d, d_out=3 * d, nb=nb, slices=("q", "v"))
    u = layer.ether_u_out.detach()  # (2 slices, nb, b)
    H = lambda us: torch.block_diag(*[torch.eye(4) - 2 * torch.outer(w, w) / w.dot(w) for w in us])  # noqa: E731
    Hfull = torch.block_diag(H(u[0]), torch.eye(d), H(u[1]))
    W, b = layer.base.weight, layer.base.bias
    x = torch.randn(5, d)
    assert torch.allclose(layer(x), (x @ W.T) @ Hfull + b, atol=1e-5)  # y = H (x Wᵀ) + b
    assert torch.allclose(layer.merge().weight, Hfull @ W, atol=1e-5)


def test_etherplusHH_two_sided_formula():
    d_in, d_out, nb = 8, 12, 2
    layer = make_layer("etherplusHH", d_in=d_in, d_out=d_out, nb=nb)

    def H(u, v):
        return torch.block_diag(*[torch.eye(len(a)) - torch.outer(a, a) / a.dot(a) + torch.outer(c, c) / c.dot(c)
                                  for a, c in zip(u.detach(), v.detach())])
    H_in, H_out = H(layer.ether_u_in, layer.ether_v_in), H(layer.ether_u_out, layer.ether_v_out)
    W, b = layer.base.weight, layer.base.bias
    assert torch.allclose(layer.merge().weight, H_out @ W @ H_in, atol=1e-5)
    x = torch.randn(4, d_in)
    assert torch.allclose(layer(x), x @ (H_out @ W @ H_in).T + b, atol=1e-5)


def test_flip_side_moves_H_to_the_smaller_side():
    down = make_layer("ether", d_in=32, d_out=8, nb=2, flip_side=True)  # like mlp.c_proj 4C -> C
    assert down.sides == ("out",) and down.ether_u_out.shape == (2, 4)
    up = make_layer("ether", d_in=8, d_out=32, nb=2, flip_side=True)  # input already the smaller side
    assert up.sides == ("in",) and up.ether_u_in.shape == (2, 4)
    assert make_layer("ether", d_in=32, d_out=8, nb=2).sides == ("in",)  # without flip_side
    assert make_layer("ether", d_in=16, d_out=16, nb=2, flip_side=True).sides == ("in",)  # square
    assert make_layer("etherplusHH", d_in=32, d_out=8, nb=2, flip_side=True).sides == ("in", "out")
    x = torch.randn(3, 32)
    u = down.ether_u_out.detach()
    H = torch.block_diag(*[torch.eye(4) - 2 * torch.outer(w, w) / w.dot(w) for w in u])
    W, b = down.base.weight, down.base.bias
    assert torch.allclose(down(x), (x @ W.T) @ H + b, atol=1e-5)
    assert torch.allclose(down.merge()(x), down(x), atol=1e-5)


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplusHH"])
@pytest.mark.parametrize("shape,slices,flip", [((16, 24), None, False), ((24, 16), None, True),
                                               ((8, 24), ("q", "v"), False), ((8, 24), ("k",), False)])
def test_merge_equals_forward(method, shape, slices, flip):
    layer = make_layer(method, d_in=shape[0], d_out=shape[1], nb=4, slices=slices, flip_side=flip)
    x = torch.randn(2, 3, shape[0])
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert torch.allclose(merged(x), layer(x), atol=1e-5)


def test_gradients_reach_only_ether_vectors():
    layer = make_layer("etherplusHH", d_in=8, d_out=24, nb=2, slices=("q", "v"))
    layer(torch.randn(4, 8)).square().sum().backward()
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["ether_u_in", "ether_v_in", "ether_u_out", "ether_v_out"]
    assert all(getattr(layer, n).grad.abs().sum() > 0 for n in names)
    assert layer.ether_u_out.shape == (2, 2, 4)


def test_bf16_base_runs_in_float32():
    from peft.quant import freeze_linear
    torch.manual_seed(0)
    cfg = make_cfg(method="etherplus", ether_nb=2, base_dtype="bfloat16")
    layer = ETHERPlusLinear(freeze_linear(nn.Linear(8, 24), cfg), cfg, ("q", "v"))
    x = torch.randn(3, 8)
    y = layer(x)
    assert y.dtype == torch.float32 and layer.ether_u_out.dtype == torch.float32
    assert torch.allclose(layer.merge()(x), y, atol=3e-2)  # the base matmul ran on bf16-rounded x


def test_bad_nb_is_a_user_error():
    with pytest.raises(UserError, match=r"ether_nb 3 .*16.*\[1, 2, 4, 8, 16\]"):
        make_layer("ether", d_in=16, d_out=16, nb=3)
    with pytest.raises(UserError, match="ether_nb 4"):  # HH: nb must divide both sides
        make_layer("etherplusHH", d_in=16, d_out=6, nb=4)
    with pytest.raises(UserError, match="c_attn"):
        make_layer("ether", d_in=16, d_out=16, nb=2, slices=("q",))


@pytest.mark.parametrize("method,targets,flip,n_params", [
    ("ether", None, False, 2 * 2 * 32),  # default targets q, v: layers · slices · d
    ("etherplus", None, False, 2 * 2 * 2 * 32),
    ("etherplusHH", None, False, 2 * 2 * 2 * (32 + 32)),
    ("etherplus", ("lora3",), True, 2 * 2 * (32 + 32 + 32 + 32)),  # mlp.c_proj flipped to its 32 outputs
])
def test_tiny_gpt_inject_step_and_merge(method, targets, flip, n_params):
    from conftest import tiny_gpt
    from peft import count_parameters, inject, merge
    model = tiny_gpt().eval()
    idx = torch.randint(0, 64, (2, 8))
    logits0, _ = model(idx, targets=idx)
    inject(model, make_cfg(method=method, ether_nb=4, targets=targets, flip_side=flip))
    assert count_parameters(model)[0] == n_params
    logits, loss = model(idx, targets=idx)
    assert torch.allclose(logits, logits0, atol=1e-5) == (method != "ether")  # ETHER+ starts at H = I
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    with torch.no_grad():
        logits1, _ = model(idx, targets=idx)
        assert not torch.allclose(logits1, logits, atol=1e-4)
        merge(model)
        assert torch.allclose(model(idx, targets=idx)[0], logits1, atol=1e-5)
