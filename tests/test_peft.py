"""Properties every fine-tuning method in peft.METHODS must have, on a tiny GPT:
merge == forward, gradients only on adapters, adapter save/load round trip, parameter counts,
and clear errors for bad settings."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peft  # noqa: E402
from errors import UserError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from peft import quant  # noqa: E402
from conftest import PEFT_BLOCK as BLOCK, batch, randomize, tiny_gpt  # noqa: E402

ADAPTER_METHODS = [m for m in peft.METHODS if m != "full"]
QUANTIZABLE = [m for m in ADAPTER_METHODS if peft.METHODS[m].supports_quantize]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def config(method, **kw):
    kw = dict(dict(r=4, oft_block_size=8, ether_nb=4), **kw)
    return peft.PeftConfig(method=method, **kw)


def logits(model, idx, targets):
    model.eval()
    with torch.no_grad():
        return model(idx, targets)[0]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merge_equals_forward(method):
    model = peft.inject(tiny_gpt(), config(method))
    randomize(model)
    idx, tgt = batch()
    before = logits(model, idx, tgt)
    peft.merge(model)
    after = logits(model, idx, tgt)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # a plain GPT again: only torch Linears, fp32, no adapter left
    assert not peft.adapter_layers(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert type(m) is nn.Linear and m.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_gradients_only_on_adapters(method):
    model = peft.inject(tiny_gpt(), config(method))
    randomize(model)
    model.train()
    idx, tgt = batch()
    _, loss = model(idx, tgt)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    # the trainable parameters are exactly the adapter's parameters (the state dict may add buffers)
    adapter_keys = set(peft.adapter_state_dict(model))
    assert trainable <= adapter_keys
    assert not any(".base." in n for n in trainable)
    # model.configure_optimizers hands AdamW exactly these
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_adapter_state_dict_round_trip(method):
    cfg = config(method)
    model = peft.inject(tiny_gpt(), cfg)
    randomize(model)
    sd = {k: v.clone() for k, v in peft.adapter_state_dict(model).items()}
    assert sd and all(k.startswith("transformer.") or k.startswith("lm_head.") for k in sd)
    assert not any(".base." in k for k in sd)
    torch.manual_seed(123)  # a different adapter init in the fresh model
    fresh = peft.inject(tiny_gpt(), cfg)
    peft.load_adapter_state_dict(fresh, sd)
    idx, tgt = batch()
    torch.testing.assert_close(logits(fresh, idx, tgt), logits(model, idx, tgt), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_count_parameters(method):
    model = tiny_gpt()
    _, total_before = peft.count_parameters(model)
    peft.inject(model, config(method))
    trainable, total = peft.count_parameters(model)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_adapter > 0
    assert total == total_before + trainable


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("method", QUANTIZABLE)
def test_nf4_base(method):
    """QLoRA-style: every block Linear becomes NF4; merge dequantizes and equals the forward."""
    model = tiny_gpt(n_embd=64)
    _, total_before = peft.count_parameters(model)
    peft.inject(model, config(method, quantize="nf4"))
    for name, m in model.named_modules():
        if name.startswith("transformer.h.") and isinstance(m, nn.Linear):
            assert quant.is_4bit(m), name
    assert type(model.lm_head) is nn.Linear  # the head (tied to the embedding) stays fp32
    trainable, total = peft.count_parameters(model)
    assert total == total_before + trainable  # 4-bit weights count as the weights they stand for
    randomize(model)
    idx, tgt = batch()
    model.train()
    model(idx, tgt)[1].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
           {n for n, p in model.named_parameters() if p.requires_grad}
    before = logits(model, idx, tgt)
    # the adapter alone restores the model on a freshly quantized base (quantization is deterministic)
    fresh = peft.inject(tiny_gpt(n_embd=64), config(method, quantize="nf4"))
    peft.load_adapter_state_dict(fresh, {k: v.clone() for k, v in peft.adapter_state_dict(model).items()})
    torch.testing.assert_close(logits(fresh, idx, tgt), before, atol=1e-6, rtol=0)
    peft.merge(model)
    torch.testing.assert_close(logits(model, idx, tgt), before, atol=1e-5, rtol=0)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("in_features", [32, 64])  # below and at bitsandbytes' NF4 block of 64
def test_nf4_inference_is_fp32_on_every_cpu(in_features):
    """bitsandbytes repacks an eval-mode, no-grad Linear4bit for a bf16 kernel on CPUs with
    avx512_bf16 (Zen 4, Intel AMX), which fails below 64 inputs and rounds to bf16. Our frozen NF4
    base pins the fp32 path, so inference is the dequantized weight in fp32 on any x86-64 CPU
    (this machine, a Zen 4, takes the bf16 path when not pinned)."""
    torch.manual_seed(0)
    q = quant.freeze_linear(nn.Linear(in_features, 96), peft.PeftConfig(method="lora", quantize="nf4"))
    x = torch.randn(3, 5, in_features)
    expected = x @ quant.dequantize(q).T + q.bias  # (3, 5, 96), fp32
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_bfloat16_base(method):
    """base_dtype: frozen weights in bf16, adapters in fp32; trains, merges to fp32."""
    model = peft.inject(tiny_gpt(), config(method, base_dtype="bfloat16"))
    for name, m in model.named_modules():
        if name.startswith("transformer.h.") and isinstance(m, nn.Linear):
            assert m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    randomize(model)
    idx, tgt = batch()
    model.train()
    model(idx, tgt)[1].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    before = logits(model, idx, tgt)
    peft.merge(model)
    # the merged fp32 model skips the bf16 rounding of activations, hence the loose tolerance
    torch.testing.assert_close(logits(model, idx, tgt), before, atol=2e-2, rtol=0)


def test_full():
    model = tiny_gpt()
    n = sum(p.numel() for p in model.parameters())
    peft.inject(model, peft.PeftConfig(method="full"))
    assert peft.count_parameters(model) == (n, n)
    sd = peft.adapter_state_dict(model)
    assert "lm_head.weight" not in sd and "transformer.wte.weight" in sd
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    fresh = peft.inject(tiny_gpt(seed=5), peft.PeftConfig(method="full"))
    peft.load_adapter_state_dict(fresh, {k: v.clone() for k, v in sd.items()})
    idx, tgt = batch()
    torch.testing.assert_close(logits(fresh, idx, tgt), logits(model, idx, tgt), atol=0, rtol=0)


def test_config_round_trip_and_defaults():
    cfg = peft.PeftConfig(method="lora", targets=["q", "v"], use_rslora=True)
    assert cfg.targets == ("q", "v")
    assert peft.PeftConfig.from_dict(cfg.asdict()) == cfg
    assert peft.PeftConfig(method="lora", targets="q, v") == cfg.__class__(method="lora", targets=("q", "v"))
    assert peft.PeftConfig(method="lora", targets=("lora3", "lm_head")).resolved_targets() == \
           ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
    for method in ADAPTER_METHODS:
        assert peft.PeftConfig(method=method).resolved_targets(), method  # every method has a default
    assert cfg.scale() == pytest.approx(16 / 8 ** 0.5)


def test_targets_resolve_to_modules():
    model = peft.inject(tiny_gpt(), config("lora", targets=("q", "v", "mlp.c_fc")))
    names = [n for n, _ in peft.adapter_layers(model)]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert model.transformer.h[0].attn.c_attn.slices == ("q", "v")
    assert model.transformer.h[0].mlp.c_fc.slices is None
    # one target can name one layer
    model = peft.inject(tiny_gpt(), config("lora", targets=("h.1.attn.c_proj",)))
    assert [n for n, _ in peft.adapter_layers(model)] == ["transformer.h.1.attn.c_proj"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="lroa"), "did you mean 'lora'"),
    (dict(method="rslora"), "use_rslora=True"),
    (dict(method="lora", r=0), "r=0"),
    (dict(method="lora", dropout=1.0), "dropout"),
    (dict(method="lora", init="xavier"), "init=xavier: must be one of kaiming, gaussian"),
    (dict(method="lora", alpha=0.0), "alpha=0.0: must be a number > 0"),
    (dict(method="oft", oft_block_size=1), "oft_block_size=1: must be an integer >= 2"),
    (dict(method="lora", dropout=float("nan")), "finite"),
    (dict(method="lora", quantize="int8"), "nf4"),
    (dict(method="full", quantize="nf4"), "full"),
    (dict(method="full", targets=("q",)), "full"),
    (dict(method="olora", quantize="nf4"), "does not support quantize"),
    (dict(method="lora", base_dtype="float8"), "base_dtype"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(UserError, match=match):
        peft.PeftConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="did you mean 'alpha'"):
        peft.PeftConfig.from_dict({"method": "lora", "alpah": 8})


def test_quantize_needs_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "bitsandbytes" else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        peft.PeftConfig(method="lora", quantize="nf4")


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="lora", r=33), "r=33 is too large: each of its q, v slices is 32x32"),
    (dict(method="lora", r=40, targets=("mlp.c_fc",)), "r must be <= 32"),
    (dict(method="lora", targets=("q", "wq")), "target 'wq' matches no module.*valid targets"),
    (dict(method="lora", targets=("ln_1",)), "only Linear layers"),
    (dict(method="lora", targets=("c_attn", "q")), "both whole and by its 'q' slice"),
])
def test_bad_inject(kwargs, match):
    with pytest.raises(UserError, match=match):
        peft.inject(tiny_gpt(), peft.PeftConfig(**kwargs))


@pytest.mark.parametrize("method", list(peft.METHODS))
def test_targets_all_works_for_every_method_on_a_50257_token_head(method):
    """targets=all (config/quickstart.py) on a GPT with GPT-2's vocabulary: every method injects and
    trains; lm_head is adapted except where the layer class's all_targets says otherwise (olora, etherplusHH: lora3;
    ether: lora2)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    peft.inject(model, peft.PeftConfig(method=method, r=4, targets="all"))
    adapted = {name for name, _ in peft.adapter_layers(model)}
    if method == "full":
        assert not adapted
    else:
        assert ("lm_head" in adapted) == (method not in ("olora", "etherplusHH", "ether"))
        assert ("transformer.h.0.mlp.c_fc" in adapted) == (method != "ether")
        assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"} <= adapted
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(idx, idx)[1]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="etherplusHH", targets="lora4"),
     r"lm_head: ether_nb 32 does not divide the output side \(50257\).*--ether_nb: \[1\]; or leave lm_head out: --targets=lora3$"),
    (dict(method="oft", oft_block_size=64, targets="mlp.c_proj,lm_head"),
     r"lm_head: oft_block_size 64 does not divide .*; or leave lm_head out: --targets=mlp.c_proj$"),
])
def test_a_target_the_method_cannot_adapt_names_the_targets_without_it(kwargs, match):
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=50257, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(UserError, match=match):
        peft.inject(model, peft.PeftConfig(**kwargs))


def test_full_accepts_targets_all_only():
    assert peft.PeftConfig(method="full", targets="all").targets == ("all",)
    with pytest.raises(UserError, match=r"targets does not apply; drop it \(--targets=\)"):
        peft.PeftConfig(method="full", targets="lora4")


def test_inject_twice_is_an_error():
    model = peft.inject(tiny_gpt(), config("lora"))
    with pytest.raises(UserError, match="already has adapters"):
        peft.inject(model, config("lora"))


def test_load_adapter_errors():
    model = peft.inject(tiny_gpt(), config("lora"))
    sd = peft.adapter_state_dict(model)
    missing = dict(sd)
    missing.pop("transformer.h.0.attn.c_attn.lora_A")
    with pytest.raises(UserError, match="lacks 1 tensor"):
        peft.load_adapter_state_dict(model, missing)
    with pytest.raises(UserError, match="does not"):
        peft.load_adapter_state_dict(model, dict(sd, **{"transformer.h.0.mlp.c_fc.lora_A": torch.zeros(4, 32)}))
    other = peft.inject(tiny_gpt(), config("lora", r=2))
    with pytest.raises(UserError, match="shape"):
        peft.load_adapter_state_dict(model, peft.adapter_state_dict(other))


def test_torch_compile_fullgraph():
    """torch.compile(model, fullgraph=True) traces the training step with no graph break (the
    chunked loss, DoRA's detached norm, COFT's projection, etherplusHH's weight-side W') and gives
    eager's loss and gradients. backend="aot_eager" traces forward and backward as inductor would
    but skips the C++ code generation, which takes minutes on a CPU."""
    for method, kw in [("full", {}), ("dora", {}), ("oft", dict(coft_eps=0.1)), ("etherplusHH", {})]:
        torch._dynamo.reset()  # a fresh cache per model: no recompile limit across methods
        model = peft.inject(tiny_gpt(), config(method, **kw))
        randomize(model)
        idx, tgt = batch()
        params = [p for p in model.parameters() if p.requires_grad]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(idx, tgt, return_logits=False)[1]
        grads = torch.autograd.grad(loss, params)
        ref = model(idx, tgt, return_logits=False)[1]
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6, msg=method)
        for g, r in zip(grads, torch.autograd.grad(ref, params)):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=method)
    torch._dynamo.reset()


def test_every_method_describes_itself_on_its_layer_class():
    """peft.METHODS is built from the layer classes: each names itself, and carries what the rest of
    the repo reads (model card, HF export, bench.py goals, targets=None / all)."""
    for name, cls in peft.METHODS.items():
        if cls is None:
            assert name == "full"
            continue
        assert cls.name == name
        assert isinstance(cls.title, str) and cls.title
        assert cls.all_targets in peft.PRESETS
        assert cls.default_targets and all(isinstance(t, str) for t in cls.default_targets)
        assert set(cls.config_fields) <= set(peft.config.DOMAINS)
        assert cls.hf_peft_type in ("LORA", "IA3", None)
        assert (cls.hf_peft_type is None) == isinstance(cls.no_hf_reason, str)
        assert cls.bench_goal_vs_lora is None or cls.bench_goal_vs_lora >= 1
    assert len({cls for cls in peft.METHODS.values()}) == len(peft.METHODS)  # one class per method


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_hf_peft_counterpart_is_well_formed(method):
    """bench.py measures each method against its layer class's hf_peft_counterpart: (HF config class
    name, JSON-able kwargs on whole modules, note) or (None, reason, None)."""
    cls = peft.METHODS[method]
    for targets in (("c_attn", "mlp.c_proj"), ("q", "v")):
        name, kwargs, note = cls.hf_peft_counterpart(config(method, targets=targets))
        if name is None:
            assert isinstance(kwargs, str) and kwargs and note is None
            continue
        assert name in ("LoraConfig", "IA3Config", "OFTConfig"), name
        assert json.loads(json.dumps(kwargs)) == kwargs  # it travels to bench_worker.py as JSON
        assert kwargs["fan_in_fan_out"] is True and kwargs["task_type"] == "CAUSAL_LM"
        if targets == ("q", "v"):  # HF adapts whole modules only
            assert kwargs["target_modules"] == ["c_attn"] and "whole c_attn" in note
        else:
            assert kwargs["target_modules"] == ["c_attn", "mlp.c_proj"] and note is None


def test_bench_goals_are_issue_13s():
    goals = {m: cls.bench_goal_vs_lora for m, cls in peft.METHODS.items() if cls is not None}
    assert goals == {"lora": None, "dora": 1.15, "olora": None, "pissa": None, "oft": 1.3, "ether": 1.1,
                     "etherplus": 1.1, "etherplusHH": 1.2, "ia3": None}
    assert peft.METHODS[peft.BENCH_REFERENCE].bench_goal_vs_lora is None


def test_hf_peft_builds_every_counterpart(tmp_path):
    """Hugging Face's peft accepts every counterpart's kwargs (in a process where `import peft` is HF's,
    set up by bench_worker.use_side as bench.py's measurements are)."""
    counterparts = {m: peft.METHODS[m].hf_peft_counterpart(config(m, targets=("c_attn",)))[:2]
                    for m in ADAPTER_METHODS}
    counterparts = {m: c for m, c in counterparts.items() if c[0] is not None}
    assert {c[0] for c in counterparts.values()} == {"LoraConfig", "IA3Config", "OFTConfig"}
    job = tmp_path / "counterparts.json"
    job.write_text(json.dumps(counterparts))
    script = ("import json, os, sys; repo = sys.argv[1]; sys.path.insert(0, repo); import bench_worker; "
              "bench_worker.use_side(repo, 'hf'); import peft; "
              "assert not os.path.abspath(peft.__file__).startswith(os.path.join(repo, 'peft')), peft.__file__; "
              "[getattr(peft, name)(**kwargs) for name, kwargs in json.load(open(sys.argv[2])).values()]; print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, root, str(job)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


NEW_METHOD = '''"""BitFit-style bias tuning, a method defined by tests/test_peft.py to prove that a new method is one
file plus one registry line: y = x Wᵀ + (b + δ), δ [out] starts at 0."""

import torch
import torch.nn as nn

from errors import UserError
from peft.quant import dequantize, make_linear


class BiasLinear(nn.Module):
    """y = base(x) + δ. Owns the frozen base."""

    name = "biasfit"
    title = "BiasFit"
    default_targets = ("c_attn",)
    all_targets = "lora4"
    config_fields = ("targets", "base_dtype")
    supports_quantize = False
    lora_plus_params = ()
    hf_peft_type = None
    no_hf_reason = "HF PEFT has no bias-only method, so the bias change is merged into the weights"
    bench_goal_vs_lora = None

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        return None, cls.no_hf_reason, None

    def __init__(self, base, cfg, slices=None):
        super().__init__()
        if slices:
            raise UserError("biasfit adapts whole layers, not q/k/v slices")
        self.base = base
        self.bias_delta = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))  # [out]

    def forward(self, x):
        return self.base(x) + self.bias_delta

    @torch.no_grad()
    def merge(self):
        bias = self.bias_delta if self.base.bias is None else self.base.bias.float() + self.bias_delta
        return make_linear(dequantize(self.base), bias)
'''


def test_a_new_method_is_one_file_and_one_registry_line(tmp_path, base, data):
    """Copy the repo, add peft/biasfit.py and its line in peft.METHODS (with its import), change
    nothing else, and run the new method through every script a user would: train.py, sample.py,
    push_to_hub.py --dry_run, compare.py --dry_run and bench.py's argument checks."""
    import shutil
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo = tmp_path / "repo"
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "out-*", "assets", "*.bin", ".pytest_cache")
    shutil.copytree(root, repo, ignore=skip)
    (repo / "peft" / "biasfit.py").write_text(NEW_METHOD)
    init = (repo / "peft" / "__init__.py").read_text()
    assert init.count("    IA3Linear,") == 1
    init = init.replace("    IA3Linear,", "    IA3Linear,\n    BiasLinear,", 1)  # the registry line ...
    init = init.replace("from peft.ia3 import", "from peft.biasfit import BiasLinear\nfrom peft.ia3 import", 1)  # ... and its import
    (repo / "peft" / "__init__.py").write_text(init)

    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, f"{args[0]}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        return p

    out = tmp_path / "out"
    train = [f"--init_from={base}", f"--dataset={data}", "--batch_size=2", "--block_size=16", "--max_iters=4",
             "--eval_interval=4", "--eval_iters=1", "--warmup_iters=1", "--lr_decay_iters=4", "--device=cpu",
             "--compile=false", "--method=biasfit"]
    p = run("train.py", *train, f"--out_dir={out}")
    assert "biasfit" in p.stdout
    run("sample.py", f"--out_dir={out}", "--max_new_tokens=4", "--num_samples=1", "--start=a", "--device=cpu")
    p = run("push_to_hub.py", f"--out_dir={out}", "--repo_id=someone/tiny-biasfit", "--dry_run=true",
            f"--save_dir={tmp_path / 'export'}")
    card = (tmp_path / "export" / "README.md").read_text()
    assert "BiasFit" in card and "HF PEFT has no bias-only method" in card  # the card reads the class
    (tmp_path / "train_tiny.py").write_text(f"init_from = {base!r}\ndataset = {data!r}\ndevice = 'cpu'\n"
                                            f"compile = False\nbatch_size = 2\nblock_size = 16\n")
    (tmp_path / "grid.py").write_text(f"base_config = {str(tmp_path / 'train_tiny.py')!r}\ncommon = dict(max_iters=4)\n"
                                      f"runs = [('bias', dict(method='biasfit')), "
                                      f"('bias-all', dict(method='biasfit', targets=('all',), learning_rate=(1e-3, 1e-2)))]\n")
    p = run("compare.py", str(tmp_path / "grid.py"), f"--out_dir={tmp_path / 'grid'}", "--dry_run=true")
    assert p.stdout.count("--method=biasfit") == 3, p.stdout
    # bench.py: every key's rule passes (the method's too), then a check after them stops it before any work
    p = subprocess.run([sys.executable, "bench.py", "--method=biasfit", "--seq_len=64", "--block_size=32"], cwd=repo,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stderr.startswith("error: seq_len=64 is longer than block_size=32"), p.stderr
