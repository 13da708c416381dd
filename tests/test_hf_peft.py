"""Our adapters against Hugging Face PEFT (the pip package, run in a subprocess) on a tiny random
transformers GPT-2: the same adapter values, exported with peft/hf.py, must give the same logits."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
from errors import UserError  # noqa: E402
from hf_peft_helpers import randomize_adapters, run_hf_peft, save_adapter, write_tiny_gpt2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from peft.hf import save_hf_peft, to_hf_peft  # noqa: E402

pytest.importorskip("transformers")

CASES = {
    "lora_c_attn": dict(method="lora", r=4, alpha=8.0, targets=("c_attn",)),
    "lora_lora3": dict(method="lora", r=4, alpha=8.0, targets=("lora3",)),
    "lora_qv": dict(method="lora", r=4, alpha=8.0),  # default q, v slices -> one rank-8 LoRA on c_attn
    "rslora": dict(method="lora", r=4, alpha=8.0, use_rslora=True, targets=("q", "v", "mlp.c_fc")),
    "dora": dict(method="dora", r=4, alpha=8.0, targets=("c_attn", "mlp.c_proj")),
    "dora_qv": dict(method="dora", r=4, alpha=8.0),
    "olora": dict(method="olora", r=4, alpha=8.0, targets=("q", "v", "attn.c_proj")),
    "pissa": dict(method="pissa", r=4, alpha=8.0, use_rslora=True, targets=("c_attn", "mlp.c_fc")),
    "ia3": dict(method="ia3"),  # paper default: k, v (output scaling) and mlp.c_proj (input scaling)
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """{case: (our logits, HF PEFT's logits)}; one HF subprocess for all cases."""
    tmp = tmp_path_factory.mktemp("hf_peft")
    base = write_tiny_gpt2(str(tmp / "base"))
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, folders = {}, []
    for name, kw in CASES.items():
        model = GPT.from_pretrained(base)
        peft.inject(model, peft.PeftConfig(**kw))
        randomize_adapters(model, seed=1)
        model.eval()
        with torch.no_grad():
            ours[name] = model(idx, targets=idx)[0]  # (B, T, V), every position
        folder = str(tmp / name)
        if name == "lora_c_attn":
            save_hf_peft(model, folder, base_model_name_or_path=base)
        else:
            save_adapter(folder, *to_hf_peft(model, base_model_name_or_path=base))
        folders.append(folder)
    theirs = run_hf_peft(base, folders, idx, str(tmp / "work"))
    return {name: (ours[name], t) for name, t in zip(CASES, theirs)}, tmp


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_as_hf_peft(compared, case):
    results, _ = compared
    ours, theirs = results[case]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_adapter_folder_format(compared):
    _, tmp = compared
    with open(tmp / "lora_qv" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] == 8 and config["lora_alpha"] == 16.0  # rank 2r, same s = 2
    assert config["target_modules"] == ["attn.c_attn"]
    from safetensors.torch import load_file
    tensors = load_file(str(tmp / "lora_qv" / "adapter_model.safetensors"))
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 8)
    assert not B[32:64].any() and not B[:32, 4:].any() and not B[64:, :4].any()  # the block structure
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 32)


def test_methods_without_hf_form_are_rejected():
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32))
    peft.inject(model, peft.PeftConfig(method="oft", oft_block_size=8))
    with pytest.raises(UserError, match="no Hugging Face PEFT form"):
        to_hf_peft(model)
