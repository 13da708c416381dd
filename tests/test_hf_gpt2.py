"""hf_gpt2.py: transformers GPT-2 folders loaded into and saved from model.GPT, on tiny random models
(transformers reads what we save; tests/test_model.py checks the loaded model's logits)."""

import json
import os

import pytest
import torch
import torch.nn as nn

import hf_gpt2
from errors import UserError
from model import GPT, GPTConfig
from conftest import all_logits, hf_logits

transformers = pytest.importorskip("transformers")


def test_loads_bf16_checkpoint_to_fp32_and_unprefixed_keys(base, tmp_path):
    from safetensors.torch import save_file
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    (tmp_path / "config.json").write_text(open(os.path.join(base, "config.json")).read())
    sd = {k.removeprefix("transformer."): v.to(torch.bfloat16).contiguous()
          for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, tmp_path / "model.safetensors")
    model = hf_gpt2.load(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w = model.transformer.h[0].attn.c_attn.weight
    assert w.shape == (96, 32)
    torch.testing.assert_close(w, hf.transformer.h[0].attn.c_attn.weight.t().to(torch.bfloat16).float())


def test_save_round_trip(tmp_path):
    torch.manual_seed(6)
    model = GPT(GPTConfig(block_size=48, vocab_size=150, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "export"
    hf_gpt2.save(model, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 48 and cfg["activation_function"] == "gelu_new"
    idx = torch.randint(0, 150, (2, 20))
    ours = all_logits(model, idx)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.testing.assert_close(hf_logits(hf, idx), ours, atol=1e-5, rtol=0)
    again = hf_gpt2.load(folder).eval()
    torch.testing.assert_close(all_logits(again, idx), ours, atol=0, rtol=0)
    # bf16 export loads back (to fp32) close to the original
    hf_gpt2.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    low = hf_gpt2.load(tmp_path / "bf16").eval()
    assert low.transformer.wte.weight.dtype == torch.float32
    torch.testing.assert_close(all_logits(low, idx), ours, atol=0.1, rtol=0.05)


def test_save_untied_lm_head(tmp_path):
    """A merged lm_head adapter leaves lm_head different from wte: the export keeps both."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(block_size=32, vocab_size=120, n_layer=2, n_head=2, n_embd=32)).eval()
    new_head = nn.Linear(32, 120, bias=False)
    with torch.no_grad():
        new_head.weight.copy_(model.lm_head.weight + 0.05 * torch.randn_like(model.lm_head.weight))
    model.lm_head = new_head
    hf_gpt2.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    idx = torch.randint(0, 120, (1, 9))
    ours = all_logits(model, idx)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits(hf, idx), ours, atol=1e-5, rtol=0)
    again = hf_gpt2.load(tmp_path)
    assert again.lm_head.weight is not again.transformer.wte.weight
    torch.testing.assert_close(all_logits(again.eval(), idx), ours, atol=0, rtol=0)


def test_save_refuses_adapted_model(tmp_path):
    class Wrapped(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    model.transformer.h[0].attn.c_attn = Wrapped(model.transformer.h[0].attn.c_attn)
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))  # the forward goes through the wrapper
    assert logits.shape == (1, 1, 50)
    with pytest.raises(UserError, match="merge adapters first"):
        hf_gpt2.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_folders(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no model folder"):
        hf_gpt2.load(tmp_path / "missing")
    with pytest.raises(UserError, match="config.json"):
        hf_gpt2.load(tmp_path)  # exists, but empty

    # the Hub path: offline here, so the download fails and must become a UserError
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)  # so a stray ./gpt2 folder cannot be picked up
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*local"):
        hf_gpt2.load("gpt2")


def test_nanogpt_entry_points_are_hf_gpt2s(tmp_path):
    """GPT.from_pretrained / GPT.save_hf (nanoGPT's names, kept for user code) are hf_gpt2.load / save."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    model.save_hf(tmp_path / "m")
    idx = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(all_logits(GPT.from_pretrained(str(tmp_path / "m")).eval(), idx), all_logits(model, idx),
                               atol=0, rtol=0)
