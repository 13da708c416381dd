"""Tests for model.py against transformers' GPT2LMHeadModel, on tiny random checkpoints (loaded with
hf_gpt2.load; the folder I/O itself is tests/test_hf_gpt2.py's)."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hf_gpt2  # noqa: E402
from errors import UserError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from conftest import all_logits, hf_logits  # noqa: E402

transformers = pytest.importorskip("transformers")

VOCAB = 211
BLOCK = 64
torch.set_num_threads(1)


def tiny_hf_model(seed=0):
    """A random transformers GPT-2 with non-trivial biases and LayerNorm gains (the default init
    leaves them at 0 and 1, which would hide layout mistakes)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=VOCAB,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(transformers model, folder with model.safetensors, folder with pytorch_model.bin)."""
    hf = tiny_hf_model()
    st = tmp_path_factory.mktemp("hf_st")
    hf.save_pretrained(st)
    assert (st / "model.safetensors").exists()
    pt = tmp_path_factory.mktemp("hf_pt")
    # transformers 5 dropped safe_serialization=False: write the .bin next to a copy of the config
    (pt / "config.json").write_text((st / "config.json").read_text())
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, pt / "pytorch_model.bin")
    return hf, st, pt


@pytest.mark.parametrize("variant", ["safetensors", "bin"])
def test_logits_match_transformers(hf_folder, variant):
    hf, st, pt = hf_folder
    model = hf_gpt2.load(st if variant == "safetensors" else pt).eval()
    assert model.config.block_size == BLOCK and model.config.vocab_size == VOCAB
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 17))
    ref = hf_logits(hf, idx)
    ours = all_logits(model, idx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    last, loss = model(idx)
    assert loss is None and last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, ref[:, [-1]], atol=1e-5, rtol=0)


def test_loss_ignores_minus_one():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 101, (2, 12))
    targets = torch.randint(0, 101, (2, 12))
    targets[0, :5] = -1
    targets[1, 9:] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 101)
    keep = targets != -1
    ref = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None



@pytest.mark.parametrize("chunk,pad_to", [(1, 64), (7, 64), (40, 1), (1000, 64), (7, None)])
def test_linear_cross_entropy_equals_cross_entropy(chunk, pad_to):
    """The chunked head + loss (vocabulary padded, gradients made in the forward) gives the loss and
    the gradients of F.cross_entropy on the full logits, to float rounding, for any chunk size."""
    torch.manual_seed(0)
    N, C, V = 40, 16, 101  # 101 is not a multiple of 64: the padded columns must not count
    x = torch.randn(N, C, requires_grad=True)
    W = torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -1
    ref = F.cross_entropy(x @ W.t(), targets, ignore_index=-1)
    gx, gw = torch.autograd.grad(2.5 * ref, (x, W))
    from model import linear_cross_entropy
    loss = linear_cross_entropy(x, W, targets, chunk, pad_to)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    ours = torch.autograd.grad(2.5 * loss, (x, W))  # the incoming gradient (2.5) is applied
    torch.testing.assert_close(ours[0], gx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], gw, atol=1e-6, rtol=1e-5)
    W.requires_grad_(False)  # a frozen head (PEFT): only x gets a gradient
    (only_x,) = torch.autograd.grad(2.5 * linear_cross_entropy(x, W, targets, chunk, pad_to), (x,))
    torch.testing.assert_close(only_x, gx, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: no gradient work at all
        torch.testing.assert_close(linear_cross_entropy(x, W, targets, chunk, pad_to), ref, atol=1e-6, rtol=1e-6)



def test_linear_cross_entropy_under_autocast():
    """Under bf16 autocast the head matmuls run in bf16 and the softmax in fp32, as F.cross_entropy
    on autocast logits does: same loss, gradients to bf16 rounding, fp32 results."""
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    W = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (40,))
    from model import linear_cross_entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, W), targets)
        loss = linear_cross_entropy(x, W, targets, 7, pad_to=64)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(torch.autograd.grad(loss, (x, W)), torch.autograd.grad(ref, (x, W))):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-2)


def test_training_loss_matches_transformers(hf_folder):
    """model(x, y, return_logits=False), train.py's call: no logits, and the loss and gradients of
    transformers' GPT2LMHeadModel (and of our own logits path) on the same weights."""
    hf, st, _ = hf_folder
    model = hf_gpt2.load(st)
    torch.manual_seed(3)
    idx = torch.randint(0, VOCAB, (3, 20))
    targets = torch.randint(0, VOCAB, (3, 20))
    targets[1, :6] = -1
    logits, loss = model(idx, targets, return_logits=False)
    assert logits is None
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, old = model(idx, targets)  # the logits path
    old.backward()
    torch.testing.assert_close(loss, old, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    hf = tiny_hf_model().train()  # the same weights as the folder; no dropout
    ref = hf(idx, labels=targets.masked_fill(targets == -1, -100), shift_labels=targets.masked_fill(targets == -1, -100)).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["transformer.wte.weight"], hf.transformer.wte.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["transformer.h.0.attn.c_attn.weight"],
                               hf.transformer.h[0].attn.c_attn.weight.grad.t(), atol=1e-5, rtol=1e-4)


def test_cached_forward_matches_uncached(hf_folder):
    hf, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 40))
    full = all_logits(model, idx)  # (2, 40, V)
    cache = model.new_kv_cache()
    start = 0
    with torch.no_grad():
        for chunk in (7, 1, 12, 1, 1, 18):  # chunked prefill, then single tokens, then a chunk
            logits, _ = model(idx[:, start:start + chunk], kv_cache=cache)
            start += chunk
            assert cache.pos == start
            torch.testing.assert_close(logits[:, 0], full[:, start - 1], atol=1e-5, rtol=0)
        # with targets, a cached chunk returns every position's logits
        cache.reset()
        model(idx[:, :25], kv_cache=cache)
        logits, _ = model(idx[:, 25:], targets=idx[:, 25:], kv_cache=cache)
    torch.testing.assert_close(logits, full[:, 25:], atol=1e-5, rtol=0)


def test_generate_greedy_cache_equals_no_cache(hf_folder):
    hf, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    torch.manual_seed(3)
    idx = torch.randint(0, VOCAB, (2, 10))
    # 70 new tokens: the context passes block_size (64), exercising the re-prefill fallback
    a = model.generate(idx, 70, temperature=0.0, use_cache=True)
    b = model.generate(idx, 70, temperature=0.0, use_cache=False)
    assert a.shape == (2, 80)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :10], idx)
    # and the first steps agree with transformers' own greedy decoding
    ref = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(a[:, :30], ref)


def test_generate_sampling_and_stop_token(hf_folder):
    _, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    out = model.generate(idx, 8, temperature=0.8, top_k=5, top_p=0.9)
    assert out.shape == (3, 13)
    # top_k=1 and a tiny top_p are both greedy
    greedy = model.generate(idx, 8, temperature=0.0)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_p=1e-6), greedy)
    # stop on the first greedy token of row 0: that row stops at once and pads with the stop token
    stop = int(greedy[0, 5])
    out = model.generate(idx, 8, temperature=0.0, stop_token=stop)
    assert (out[0, 5:] == stop).all()
    if not (greedy[:, 5:] == stop).any(dim=1).all():
        assert out.shape[1] == 13
    single = model.generate(idx[:1], 8, temperature=0.0, stop_token=stop)
    assert single.shape == (1, 6)


def test_generate_stop_sequences(hf_folder):
    """A row ends once its new tokens end with a stop sequence (a template's next turn), then pads."""
    _, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(idx, 10, temperature=0.0)
    seq = greedy[0, 7:9].tolist()  # new tokens 3 and 4 of row 0
    pad = VOCAB - 1
    out = model.generate(idx, 10, temperature=0.0, stop_token=pad, stop_sequences=[seq])
    for row in range(2):  # each row: greedy up to the end of its first new occurrence of seq, then pad
        hits = [j for j in range(6, 15) if greedy[row, j - 1:j + 1].tolist() == seq]
        end = hits[0] + 1 if hits else 15
        assert torch.equal(out[row, :end], greedy[row, :end]) and (out[row, end:] == pad).all()
    # the sequence inside the prompt does not count: only new tokens are matched
    last = [int(idx[0, -1])]  # the prompt's last token as a stop sequence
    hits = [j for j in range(5, 15) if int(greedy[0, j]) == last[0]]
    out = model.generate(idx[:1], 10, temperature=0.0, stop_token=pad, stop_sequences=[last])
    assert out.shape[1] == (hits[0] + 1 if hits else 15)
    with pytest.raises(ValueError):
        model.generate(idx, 2, stop_sequences=[seq])


def test_bad_inputs(hf_folder):
    _, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    with pytest.raises(UserError, match=f"prompt is {BLOCK + 1} tokens.*context is {BLOCK}"):
        model.generate(torch.zeros(1, BLOCK + 1, dtype=torch.long), 1)
    with pytest.raises(UserError, match="context"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    cache = model.new_kv_cache()
    model(torch.zeros(1, BLOCK - 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(UserError, match="context"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_configure_optimizers_and_counts(capsys):
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    for p in model.parameters():
        p.requires_grad_(False)
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    model.transformer.h[0].attn.c_attn.bias.requires_grad_(True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    groups = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert [p.shape for p in groups[0.1]] == [(48, 16)]
    assert [p.shape for p in groups[0.0]] == [(48,)]
    assert "num decayed parameter tensors: 1" in capsys.readouterr().out
    n = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == n
    assert model.get_num_params() == n - 16 * 16
    assert 0 < model.estimate_mfu(4, 0.5, 1e12) < 1
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")


def test_crop_block_size(hf_folder):
    hf, st, _ = hf_folder
    model = hf_gpt2.load(st).eval()
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(8))
    before = all_logits(model, idx)
    model.crop_block_size(24)
    assert model.config.block_size == 24 and model.transformer.wpe.weight.shape == (24, 32)
    torch.testing.assert_close(all_logits(model, idx), before, atol=0, rtol=0)
    with pytest.raises(UserError, match="context"):
        model(torch.zeros(1, 25, dtype=torch.long))
    out = model.generate(idx, 10, temperature=0.0)  # passes the cropped context: re-prefill path
    assert torch.equal(out, model.generate(idx, 10, temperature=0.0, use_cache=False))
    with pytest.raises(UserError, match="cannot crop"):
        model.crop_block_size(100)


def test_mfu_formula():
    """MFU's numerator: one flops formula for train.py and bench.py (the peak is tests/test_devices.py's)."""
    gpt = GPT(GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32))
    N, L, H, Q = gpt.get_num_params(), 2, 2, 16
    assert gpt.flops_per_token(16) == 6 * N + 12 * L * H * Q * 16
    assert gpt.estimate_mfu(3, 2.0, 1e9) == pytest.approx(gpt.flops_per_token() * 64 * 3 / 2.0 / 1e9)
