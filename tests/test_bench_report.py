"""bench_report.py's tables and goals, fed canned measurements: the GPU branches (issue #13's goals, MFU
columns, fullgraph) run here without a GPU, and every number a goal sees is checked."""
from types import SimpleNamespace

import pytest

import bench_report
import peft


def settings(**kw):
    return SimpleNamespace(**dict(dict(cuda=True, compile=True, compiled=", torch.compile", bf16=True, hf=True,
                                       sample_tokens=4, sample_prompt=4, batch_size=16, seq_len=1024, r=8,
                                       targets=("c_attn",), forward=True), **kw))


def peft_config(m, **over):
    return peft.PeftConfig(method=m, **over) if m != "full" else peft.PeftConfig(method="full")


def fake_run(ms, compiled=True):
    """A Runner stand-in: ms[(side, method, base_dtype)] -> ms/step; peak MB = ms / 2 for ours, ms for HF."""
    calls = []

    def run(label, side="ours", kind="train", peft_cfg=None, hf_cfg=None, autocast=False, merge=False, variants=None):
        calls.append(dict(label=label, side=side, kind=kind, autocast=autocast, hf_cfg=hf_cfg))
        if kind == "sample":
            return {"cached_s": 1.0, "uncached_s": 6.0, "speedup": 6.0, "same_tokens": True}
        if kind == "forward":
            return {"variants": [{"name": v[0], "ms": 10.0, "tokens_per_s": 100.0} for v in variants]}
        m = peft_cfg.method if peft_cfg else "full"
        t = ms[(side, m, peft_cfg.base_dtype if peft_cfg else None)]
        res = {"ms": t, "tokens_per_s": 1000.0 / t, "peak_mb": t / (2 if side == "ours" else 1), "loss": 4.6,
               "trainable": 1, "mfu": 0.5 if side == "ours" else None}
        return dict(res, fullgraph=side == "ours") if compiled else res
    return run, calls


def test_gpu_full_with_compile(capsys):
    run, calls = fake_run({("ours", "full", None): 10.0, ("hf", "full", None): 14.0})
    goals = []
    bench_report.report_full(settings(), run, goals, peft_config)
    out = capsys.readouterr().out
    assert "| bf16 (autocast) |" in out and "| fp32 |" not in out  # the protocol: bf16 autocast only
    assert "MFU (ours / transformers)" in out and "50.0% / n/a" in out
    met = {g["goal"]: g["met"] for g in goals}
    assert met == {"ours full, bf16 compiles with fullgraph=True (no graph break)": "yes",
                   "full tokens/s >= 1.3x transformers' (compiled)": "yes",  # 1.4
                   "full peak memory <= 0.8x transformers'": "yes",  # 5 / 14
                   "sampling with the KV cache >= 5x faster than without": "yes"}


def test_gpu_methods_eager(capsys):
    ms = {("ours", "full", None): 20.0, ("ours", "lora", None): 10.0, ("hf", "lora", None): 12.0,
          ("ours", "lora", "bfloat16"): 11.0, ("ours", "dora", None): 12.0, ("hf", "dora", None): 15.0,
          ("ours", "etherplusHH", None): 12.5}
    run, calls = fake_run(ms, compiled=False)
    goals = []
    bench_report.report_methods(settings(compile=False, compiled=""), run, goals, peft_config,
                                ["lora", "dora", "etherplusHH"])
    out = capsys.readouterr().out
    assert "train step (bf16 autocast, batch 16 x 1024" in out and "etherplusHH, HF: ETHER+ (two-sided, HH) is not" in out
    met = {g["goal"]: (g["met"], g["value"]) for g in goals}
    assert met["lora peak memory <= 0.7x HF peft's"] == ("yes", pytest.approx(5 / 12))
    assert not any("1.5x" in g for g in met)  # the speed goal is for compiled runs
    assert met["dora step <= 1.15x our lora step"] == ("no", pytest.approx(1.2))
    assert met["etherplusHH step <= 1.2x our lora step"] == ("no", pytest.approx(1.25))
    assert met["lora with a bf16 base >= the fp32 base's tokens/s"] == ("no", pytest.approx(10 / 11))
    assert met["lora with a bf16 base peak memory <= 0.8x the fp32 base's"] == ("no", pytest.approx(1.1))
    hf = [c["hf_cfg"] for c in calls if c["side"] == "hf"]
    assert [h[0] for h in hf] == ["LoraConfig", "LoraConfig"] and hf[1][1]["use_dora"] is True


def test_cpu_goals_stay_the_cpu_ones(capsys):
    ms = {("ours", "full", None): 20.0, ("hf", "full", None): 21.0, ("ours", "lora", None): 10.0,
          ("hf", "lora", None): 12.0, ("ours", "lora", "bfloat16"): 30.0}
    run, _ = fake_run(ms, compiled=False)
    goals = []
    s = settings(cuda=False, compile=False, compiled="")
    bench_report.report_methods(s, run, goals, peft_config, ["lora"])
    out = capsys.readouterr().out
    assert "MFU" not in out and "train step (fp32, batch" in out
    assert [g["goal"] for g in goals] == [
        "lora tokens/s >= 1.1x HF peft's", "lora peak memory <= 0.8x HF peft's",
        "lora step <= 0.75x our full fine-tuning step", "lora with a bf16 base >= 2.5x HF peft's fp32 tokens/s",
        "merged lora forward >= 0.95x the base's tokens/s (the same speed, within noise)"]
