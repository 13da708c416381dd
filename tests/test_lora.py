"""LoRALinear and its variants against their formulas: LoRA, rsLoRA, q/k/v slices, OLoRA, PiSSA,
QLoRA."""

import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402
from errors import UserError  # noqa: E402
from peft import quant  # noqa: E402
from peft.lora import LoRALinear, OLoRALinear, PiSSALinear  # noqa: E402
from conftest import batch, linear, randomize, tiny_gpt  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def cfg(**kw):
    return peft.PeftConfig(method=kw.pop("method", "lora"), **dict(dict(r=4, alpha=8.0), **kw))


def test_lora_formula():
    base = linear()
    W, b = base.weight.clone(), base.bias.clone()
    layer = LoRALinear(base, cfg())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 48)
    A, B, s = layer.lora_A, layer.lora_B, 8.0 / 4
    expected = x @ W.T + b + s * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.merge()(x), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scale():
    assert LoRALinear(linear(), cfg(r=4, alpha=8.0)).scale == 2.0
    assert LoRALinear(linear(), cfg(r=4, alpha=8.0, use_rslora=True)).scale == 4.0  # alpha / sqrt(r)


def test_init_starts_at_base():
    base = linear()
    x = torch.randn(4, 48)
    y0 = base(x)
    layer = LoRALinear(base, cfg(r=8))
    assert torch.equal(layer.lora_B, torch.zeros(40, 8))
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=√5) on [r, in]: U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    torch.testing.assert_close(layer(x), y0, atol=0, rtol=0)
    torch.manual_seed(0)
    g = LoRALinear(linear(), cfg(r=8, init="gaussian"))
    assert abs(g.lora_A.std().item() - 1 / 8) < 0.02  # HF peft's gaussian init: std 1/r


def test_only_adapter_gets_gradients():
    layer = LoRALinear(linear(), cfg())
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(2, 48, requires_grad=True)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_dropout_only_on_adapter_input():
    layer = LoRALinear(linear(), cfg(dropout=0.5)).train()
    x = torch.randn(64, 48)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: the base path sees no dropout
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, layer.base(x) + layer.scale * (xd @ layer.lora_A.T) @ layer.lora_B.T)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.merge()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("slices", [("q",), ("v",), ("q", "v"), ("k", "v"), ("q", "k", "v")])
def test_slices_touch_only_their_rows(slices):
    d = 16
    base = linear(d, 3 * d)
    W, b = base.weight.clone(), base.bias.clone()
    layer = LoRALinear(base, cfg(), slices=slices)
    assert layer.lora_A.shape == (4 * len(slices), d) and layer.lora_B.shape == (len(slices), d, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, d)
    y = layer(x)
    base_y = x @ W.T + b
    for i, name in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        if name in slices:
            j = slices.index(name)
            A, B = layer.lora_A[j * 4:(j + 1) * 4], layer.lora_B[j]
            torch.testing.assert_close(y[..., rows], base_y[..., rows] + layer.scale * (x @ A.T) @ B.T)
        else:
            torch.testing.assert_close(y[..., rows], base_y[..., rows], atol=0, rtol=0)
    torch.testing.assert_close(layer.merge()(x), y, atol=1e-5, rtol=0)
    # the zero blocks of B are not parameters: gradients reach only the slices' own A_j, B_j
    y.sum().backward()
    assert layer.lora_B.grad.shape == layer.lora_B.shape


def test_rank_larger_than_slice_is_an_error():
    with pytest.raises(UserError, match="r must be <= 16"):
        LoRALinear(linear(16, 48), cfg(r=17), slices=("q",))


@pytest.mark.parametrize("cls", [OLoRALinear, PiSSALinear])
@pytest.mark.parametrize("slices", [None, ("q", "v")])
def test_olora_pissa_start_at_base(cls, slices):
    base = linear(16, 48)
    W = base.weight.clone()
    x = torch.randn(5, 16)
    y0 = base(x)
    layer = cls(base, cfg(), slices=slices)
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=0)
    assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)
    # the base holds the residual W - s·B₀A₀; rows of slices not adapted are untouched
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), W, atol=1e-5, rtol=0)
    if slices:
        assert torch.equal(layer.base.weight[16:32], W[16:32])


def test_olora_factors():
    base = linear(24, 40)
    W = base.weight.clone()
    layer = OLoRALinear(base, cfg(r=6))
    B = layer.lora_B  # [out, r] = Q[:, :r]: orthonormal columns
    torch.testing.assert_close(B.T @ B, torch.eye(6), atol=1e-5, rtol=0)
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(layer.lora_A, R[:6])
    assert torch.triu(layer.lora_A).equal(layer.lora_A)  # A = R[:r] is upper triangular


def test_pissa_is_best_rank_r_part():
    base = linear(24, 40)
    W = base.weight.clone()
    layer = PiSSALinear(base, cfg(r=6))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.delta_weight(), U[:, :6] @ torch.diag(S[:6]) @ Vh[:6], atol=1e-5, rtol=0)
    # and A, B share the singular values equally: ‖A_i‖ = ‖B_i‖ = √(S_i / s)
    torch.testing.assert_close(layer.lora_A.norm(dim=1), torch.sqrt(S[:6] / layer.scale))
    torch.testing.assert_close(layer.lora_B.norm(dim=0), torch.sqrt(S[:6] / layer.scale))


@pytest.mark.parametrize("cls", [OLoRALinear, PiSSALinear])
def test_reload_rebases_when_decomposition_differs(cls):
    """A recomputed QR / SVD may differ (another machine, sign flips): loading the saved A₀, B₀
    must give back exactly the saved model."""
    W0 = linear(16, 48).weight.clone()
    trained = cls(linear(16, 48), cfg(), slices=("q", "v"))
    with torch.no_grad():
        trained.lora_A.add_(0.1 * torch.randn_like(trained.lora_A))
        trained.lora_B.add_(0.1 * torch.randn_like(trained.lora_B))
    sd = {k: v.clone() for k, v in trained.state_dict().items() if not k.startswith("base.")}
    fresh = cls(linear(16, 48), cfg(), slices=("q", "v"))
    # simulate a different decomposition on the fresh side: flip the sign of one rank-1 component
    # in A₀ and B₀ (B₀A₀ is unchanged there) and perturb another so the residual base changes too
    with torch.no_grad():
        A0, B0 = fresh.lora_A0.clone(), fresh.lora_B0.clone()
        A0[0] = -A0[0]
        B0[0, :, 0] = -B0[0, :, 0]
        A0[1] += 0.05
        fresh.set_base_weight(W0 - fresh.scale * (fresh.full_B(B0) @ A0))
        fresh.lora_A0.copy_(A0)
        fresh.lora_B0.copy_(B0)
    x = torch.randn(4, 16)
    assert not torch.allclose(fresh.base(x), trained.base(x), atol=1e-4)
    fresh.load_state_dict(sd, strict=False)
    torch.testing.assert_close(fresh(x), trained(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.base.weight, trained.base.weight, atol=1e-6, rtol=0)


def test_olora_on_tied_lm_head_keeps_embedding():
    model = tiny_gpt()
    wte = model.transformer.wte.weight.clone()
    idx, tgt = batch()
    before = model(idx, tgt)[0]
    peft.inject(model, peft.PeftConfig(method="olora", r=4, targets=("lm_head",)))
    assert torch.equal(model.transformer.wte.weight, wte)
    torch.testing.assert_close(model(idx, tgt)[0], before, atol=1e-5, rtol=0)


def test_qv_default_targets_in_gpt():
    model = peft.inject(tiny_gpt(), peft.PeftConfig(method="lora", r=4))
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear) and attn.slices == ("q", "v")
    assert peft.adapter_state_dict(model)["transformer.h.0.attn.c_attn.lora_B"].shape == (2, 32, 4)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_trains_and_merges(method):
    """QLoRA / QDoRA on CPU: a few AdamW steps lower the loss on a fixed batch; the merged,
    dequantized model equals the adapted one (same 4-bit base)."""
    model = tiny_gpt(n_embd=64)
    peft.inject(model, peft.PeftConfig(method=method, r=4, quantize="nf4", targets=("lora3",)))
    assert quant.is_4bit(model.transformer.h[0].attn.c_attn.base)
    assert quant.is_4bit(model.transformer.h[0].attn.c_proj.base)
    idx, tgt = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        _, loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    with torch.no_grad():
        adapted = model(idx, tgt)[0]
        peft.merge(model)
        torch.testing.assert_close(model(idx, tgt)[0], adapted, atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_nf4_quantization_error_is_small():
    model = tiny_gpt(n_embd=64)
    W = model.transformer.h[0].mlp.c_fc.weight.clone()
    peft.inject(model, peft.PeftConfig(method="lora", quantize="nf4"))
    Wq = quant.dequantize(model.transformer.h[0].mlp.c_fc)
    err = (Wq - W).norm() / W.norm()
    assert 0 < err < 0.15  # NF4: ~4 bits per weight


def test_base_dtype_bfloat16_layer():
    model = tiny_gpt()
    randomize(model)
    peft.inject(model, peft.PeftConfig(method="lora", r=4, base_dtype="bfloat16"))
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, quant.CastLinear) and c_fc.weight.dtype == torch.bfloat16
    attn = model.transformer.h[0].attn.c_attn
    assert attn.base.weight.dtype == torch.bfloat16 and attn.lora_A.dtype == torch.float32
    x = torch.randn(2, 32)
    assert attn(x).dtype == torch.float32


# --- LoRA+ ------------------------------------------------------------------------------------

HF_LORAPLUS = r"""
from peft.optimizers import create_loraplus_optimizer
for run in job["runs"]:
    base = transformers.GPT2LMHeadModel.from_pretrained(job["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, run["adapter"], is_trainable=True)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=job["lr"], loraplus_lr_ratio=job["ratio"],
                                    loraplus_weight_decay=run["weight_decay"], betas=(0.9, 0.95))
    model(idx, labels=idx).loss.backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]] for g in opt.param_groups]
    json.dump(groups, open(run["groups"], "w"))
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, run["after"])
"""
LORA_PLUS_CASES = {"lora": 0.1, "dora": 0.0}  # method: weight decay (HF peft decays DoRA's magnitude
LR, RATIO = 1e-3, 16.0                      # vector, we never decay vectors: DoRA runs without decay)


def hf_name_to_ours(hf_name):
    """base_model.model.<module>.lora_A.default.weight -> <module>.lora_A (lora_magnitude_vector -> lora_magnitude)"""
    module, kind = hf_name.removeprefix("base_model.model.").split(".default.")[0].rsplit(".", 1)
    return f"{module}.{'lora_magnitude' if kind == 'lora_magnitude_vector' else kind}"


@pytest.fixture(scope="module")
def lora_plus_runs(tmp_path_factory):
    """{method: (our model before, after one AdamW step, our groups, HF's groups, HF's parameters after)}
    for LoRA+ on the same adapter; HF peft's create_loraplus_optimizer runs in one subprocess."""
    import json
    import subprocess

    from hf_peft_helpers import HF_PREAMBLE, REPO, save_adapter, write_tiny_gpt2
    import hf_gpt2
    from peft.hf import to_hf_peft

    tmp = tmp_path_factory.mktemp("lora_plus")
    base = write_tiny_gpt2(str(tmp / "base"))
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(idx, tmp / "idx.pt")
    job = {"base": base, "idx": str(tmp / "idx.pt"), "lr": LR, "ratio": RATIO, "runs": []}
    ours = {}
    for method, weight_decay in LORA_PLUS_CASES.items():
        model = hf_gpt2.load(base)
        peft.inject(model, peft.PeftConfig(method=method, r=4, alpha=8.0, targets=("c_attn", "mlp.c_fc"),
                                           lora_plus_ratio=RATIO))
        randomize(model, seed=1)  # B != 0, so A gets a gradient too
        save_adapter(str(tmp / method), *to_hf_peft(model, base_model_name_or_path=base))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = model.configure_optimizers(weight_decay, LR, (0.9, 0.95), "cpu", peft.lr_scales(model))
        model(idx[:, :-1], targets=idx[:, 1:])[1].backward()  # = HF's loss with labels=idx (shifted inside)
        opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {}
        for g in opt.param_groups:
            groups.setdefault((g["lr"], g["weight_decay"]), set()).update(names[id(p)] for p in g["params"])
        ours[method] = (model, before, groups)
        job["runs"].append({"adapter": str(tmp / method), "weight_decay": weight_decay,
                            "groups": str(tmp / f"{method}_groups.json"), "after": str(tmp / f"{method}_after.pt")})
    json.dump(job, open(tmp / "job.json", "w"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-I", "-c", HF_PREAMBLE + HF_LORAPLUS, REPO, str(tmp / "job.json")],
                       cwd=tmp, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = {}
    for method, run in zip(LORA_PLUS_CASES, job["runs"]):
        theirs = {}
        for g_lr, g_wd, params in json.load(open(run["groups"])):
            if params:
                theirs.setdefault((g_lr, g_wd), set()).update(hf_name_to_ours(n) for n in params)
        after = {hf_name_to_ours(n): t for n, t in torch.load(run["after"]).items()}
        out[method] = (*ours[method], theirs, after)
    return out


@pytest.mark.parametrize("method", list(LORA_PLUS_CASES))
def test_lora_plus_matches_hf_peft(lora_plus_runs, method):
    """LoRA+ (lora_plus_ratio) against HF peft's create_loraplus_optimizer on the same adapter: the
    same parameter groups (learning rate, weight decay) and the same update after one AdamW step."""
    model, before, ours, theirs, after = lora_plus_runs[method]
    assert ours == theirs
    assert ours[(LR * RATIO, LORA_PLUS_CASES[method])] >= set(peft.lr_scales(model))
    assert set(after) == set(before)
    for n, p in model.named_parameters():
        if p.requires_grad:  # Adam's first step is about lr·sign(g): compare the updates to lr / 10
            torch.testing.assert_close(p.detach() - before[n], after[n] - before[n], atol=LR / 10, rtol=0)
    step_B = (model.transformer.h[0].attn.c_attn.lora_B - before["transformer.h.0.attn.c_attn.lora_B"]).abs().max()
    assert step_B.item() == pytest.approx(LR * RATIO, rel=0.05)  # B moves ratio times faster than A


@pytest.mark.parametrize("method", ["ia3", "oft", "ether", "full"])
def test_lora_plus_without_B_matrices_is_one_clear_error(method):
    with pytest.raises(UserError, match=f"method '{method}' has none, so drop lora_plus_ratio"):
        peft.PeftConfig(method=method, lora_plus_ratio=16.0)
    with pytest.raises(UserError, match="lora_plus_ratio=-1.0: must be a number >= 0"):
        peft.PeftConfig(method="lora", lora_plus_ratio=-1.0)
