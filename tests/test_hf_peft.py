"""Our adapters against Hugging Face PEFT (the pip package, run in a subprocess) on a tiny random
transformers GPT-2: the same adapter values, exported with peft/hf.py, must give the same logits,
loaded as they are and after HF's merge_and_unload()."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checkpoint  # noqa: E402
import hf_gpt2  # noqa: E402
import peft  # noqa: E402
from errors import UserError  # noqa: E402
from conftest import randomize  # noqa: E402
from hf_peft_helpers import run_hf_peft, save_adapter, write_tiny_gpt2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from peft.hf import load_hf_peft, no_hf_reason, to_hf_peft, write_hf_peft  # noqa: E402

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
    # lm_head is tied to wte: exported as a merged modules_to_save copy, so merge_and_unload() unties it
    "lora_lora4": dict(method="lora", r=4, alpha=8.0, targets=("lora4",)),
    "dora_head": dict(method="dora", r=4, alpha=8.0, targets=("q", "v", "lm_head")),
    "olora_head": dict(method="olora", r=4, alpha=8.0, targets=("c_attn", "lm_head")),
    "pissa_head": dict(method="pissa", r=4, alpha=8.0, targets=("mlp.c_fc", "lm_head")),
    "ia3_head": dict(method="ia3", targets=("k", "v", "mlp.c_proj", "lm_head")),
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """{case: (our logits, HF PEFT's logits, HF PEFT's after merge_and_unload)}; one HF subprocess."""
    tmp = tmp_path_factory.mktemp("hf_peft")
    base = write_tiny_gpt2(str(tmp / "base"))
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    ours, folders = {}, []
    for name, kw in CASES.items():
        model = hf_gpt2.load(base)
        peft.inject(model, peft.PeftConfig(**kw))
        randomize(model, seed=1)
        model.eval()
        with torch.no_grad():
            ours[name] = model(idx, targets=idx)[0]  # (B, T, V), every position
        folder = str(tmp / name)
        if name in ("lora_c_attn", "lora_lora4"):  # the writer push_to_hub.py uses
            write_hf_peft(model, model.peft_config, folder, base)
        else:
            save_adapter(folder, *to_hf_peft(model, base_model_name_or_path=base))
        folders.append(folder)
    theirs = run_hf_peft(base, folders, idx, str(tmp / "work"))
    return {name: (ours[name], *t) for name, t in zip(CASES, theirs)}, tmp


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_as_hf_peft(compared, case):
    results, _ = compared
    ours, theirs, _ = results[case]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_gives_the_same_model(compared, case):
    """HF's merge_and_unload() of the exported adapter is our (merged) model: with an adapter on the
    tied lm_head the token embedding must not move."""
    results, _ = compared
    ours, _, merged = results[case]
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=0)


def test_head_is_exported_as_a_merged_copy(compared):
    _, tmp = compared
    config = json.loads((tmp / "lora_lora4" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and "lm_head" not in config["target_modules"]
    from safetensors.torch import load_file
    tensors = load_file(str(tmp / "lora_lora4" / "adapter_model.safetensors"))
    assert tensors["base_model.model.lm_head.weight"].shape == (101, 32)
    assert not [k for k in tensors if "lm_head.lora" in k]
    for f in ("adapter_config.json", "adapter_model.safetensors"):  # shared like model.safetensors
        umask = os.umask(0)
        os.umask(umask)
        assert (tmp / "lora_lora4" / f).stat().st_mode & 0o777 == 0o666 & ~umask


def test_head_alone_has_no_hf_form():
    """HF PEFT refuses an adapter whose only target is a modules_to_save copy: merged only, and why."""
    cfg = peft.PeftConfig(method="lora", r=4, alpha=8.0, targets=("lm_head",))
    model = peft.inject(GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)), cfg)
    with pytest.raises(UserError, match="lm_head alone"):
        to_hf_peft(model)
    assert "lm_head alone" in no_hf_reason(cfg)


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

def test_adapters_written_by_hf_peft_load_as_hf_peft_computes_them(tmp_path):
    """Adapters in forms our export never writes, as HF PEFT users have them: a rank and alpha per
    module (rank_pattern, alpha_pattern) with rsLoRA, DoRA, and IA3 scaling the input of mlp.c_fc
    (our shape rule would scale its output). load_hf_peft builds the layer each module needs and
    merges it: the same logits as HF PEFT's PeftModel on the same base."""
    base = write_tiny_gpt2(str(tmp_path / "base"))
    g = torch.Generator().manual_seed(2)
    C, L = 32, 2
    pre = "base_model.model.transformer.h"
    common = {"base_model_name_or_path": base, "task_type": "CAUSAL_LM", "fan_in_fan_out": True,
              "inference_mode": True}
    lora = dict(common, peft_type="LORA", r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3})
    adapters = {}
    for name, config in {"lora_patterns": dict(lora, use_rslora=True), "dora": dict(lora, use_dora=True)}.items():
        tensors = {}
        for i in range(L):
            for module, out, r in (("attn.c_attn", 3 * C, 4), ("mlp.c_fc", 4 * C, 2)):
                tensors[f"{pre}.{i}.{module}.lora_A.weight"] = 0.3 * torch.randn(r, C, generator=g)
                tensors[f"{pre}.{i}.{module}.lora_B.weight"] = 0.3 * torch.randn(out, r, generator=g)
                if config.get("use_dora"):
                    tensors[f"{pre}.{i}.{module}.lora_magnitude_vector"] = 1 + torch.rand(out, generator=g)
        adapters[name] = (config, tensors)
    ia3 = {}
    for i in range(L):
        ia3[f"{pre}.{i}.mlp.c_fc.ia3_l"] = 1 + 0.3 * torch.randn(1, C, generator=g)  # input scaling
        ia3[f"{pre}.{i}.attn.c_proj.ia3_l"] = 1 + 0.3 * torch.randn(C, 1, generator=g)  # output scaling
    adapters["ia3_feedforward"] = (dict(common, peft_type="IA3", target_modules=["c_fc", "attn.c_proj"],
                                        feedforward_modules=["c_fc"]), ia3)
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    folders = []
    for name, (config, tensors) in adapters.items():
        save_adapter(str(tmp_path / name), config, tensors)
        folders.append(str(tmp_path / name))
    theirs = run_hf_peft(base, folders, idx, str(tmp_path / "work"))
    plain = hf_gpt2.load(base).eval()(idx, targets=idx)[0]
    for folder, (unmerged, merged) in zip(folders, theirs):
        model = load_hf_peft(folder).eval()
        assert not peft.adapter_layers(model)  # merged into plain Linears
        with torch.no_grad():
            ours = model(idx, targets=idx)[0]
        assert (ours - plain).abs().max() > 1e-2, folder  # the adapter changes the model
        torch.testing.assert_close(ours, unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, merged, atol=1e-4, rtol=0)


def test_loading_a_foreign_or_broken_adapter_folder_is_one_clear_error(tmp_path):
    """checkpoint.load_model on HF PEFT folders load_hf_peft cannot use: the reason in one line."""
    from safetensors.torch import save_file
    base = write_tiny_gpt2(str(tmp_path / "base"))
    folder = tmp_path / "adapter"
    folder.mkdir()

    def fails(config, tensors, message, **kwargs):
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        with pytest.raises(UserError, match=message) as e:
            checkpoint.load_model(str(folder), **kwargs)
        assert "\n" not in str(e.value)

    A, B = torch.zeros(4, 32), torch.zeros(96, 4)
    key = "base_model.model.transformer.h.0.attn.c_attn"
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": base}
    ok = {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
    fails({"peft_type": "PREFIX_TUNING"}, ok, "holds a PREFIX_TUNING adapter")
    fails(dict(lora, base_model_name_or_path=str(tmp_path / "gone")), ok, "neither a local folder nor")
    fails(dict(lora, base_model_name_or_path=None), ok, "names no base_model_name_or_path")
    fails(lora, {f"{key}.lora_embedding_A": A}, "not a LoRA/DoRA/IA3 weight")
    fails(lora, {"base_model.model.transformer.h.7.attn.c_attn.lora_A.weight": A,
                 "base_model.model.transformer.h.7.attn.c_attn.lora_B.weight": B}, "not a projection of this GPT-2")
    fails(lora, {f"{key}.lora_A.weight": torch.zeros(4, 64), f"{key}.lora_B.weight": B}, "do not fit")
    fails(dict(lora, modules_to_save=["transformer.wte"]), ok, "modules_to_save")
    fails(dict(lora, modules_to_save=["lm_head"]), ok, "must hold 'base_model.model.lm_head.weight'")
    fails(lora, dict(ok, **{"base_model.model.lm_head.weight": torch.zeros(101, 32)}), "must hold")
    fails(dict(lora, modules_to_save=["lm_head"]), dict(ok, **{"base_model.model.lm_head.weight": torch.zeros(5, 32)}),
          "expected")
    # the same folder, made valid, loads (on an explicitly given base too)
    (folder / "adapter_config.json").write_text(json.dumps(lora))
    save_file(ok, str(folder / "adapter_model.safetensors"))
    model, meta = checkpoint.load_model(str(folder), base=base)
    assert meta is None and type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear
