"""bench.py smoke test: it runs end to end on a tiny shape and prints its tables. No timing assertions:
the numbers of a tiny model on a shared machine mean nothing; the real benchmark is run by hand."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=101", "--block_size=32", "--seq_len=16",
        "--batch_size=2", "--warmup=0", "--steps=1", "--bf16=false", "--threads=1"]


def test_bench_full_and_lora_run_and_print_tables(tmp_path):
    runs = {
        "full": ["--method=full", "--sample_tokens=4", "--sample_prompt=4"],
        "lora": ["--method=lora", "--r=4"],
    }
    procs = {name: subprocess.Popen([sys.executable, "bench.py", *TINY, *args, f"--out={tmp_path / name}.json"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
             for name, args in runs.items()}  # both at once: most of the time is process start-up
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert "| method |" in stdout or "| precision |" in stdout, stdout
        assert "### Goals" in stdout
        results = json.load(open(tmp_path / f"{name}.json"))["results"]
        assert results and not any("error" in r for r in results), results
        train = [r for r in results if r["kind"] == "train"]
        assert all(r["ms"] > 0 and r["peak_mb"] >= 0 for r in train if "na" not in r)
        hf = [r for r in train if r["side"] == "hf"]
        assert hf and abs(hf[0]["loss"] - train[0]["loss"]) < 1e-3  # same weights, same batch, same loss


def test_worker_is_a_module_that_picks_each_sides_peft(monkeypatch):
    """bench_worker.py imports without running, and use_side() puts the repo first (ours) or takes every
    spelling of it off sys.path (hf: the script's folder, '' for the current folder, a relative path)."""
    import bench_worker
    monkeypatch.chdir(ROOT)
    for side in ("ours", "hf"):
        monkeypatch.setattr(sys, "path", [ROOT, "", ".", "/elsewhere", ROOT + "/"])
        bench_worker.use_side(ROOT, side)
        assert sys.path == ([ROOT] if side == "ours" else []) + ["/elsewhere"]


def test_worker_started_from_the_repo_root_measures_hugging_faces_peft(tmp_path):
    """The worst case for the shadowing: bench_worker.py run as a script (its folder, the repo root, on
    sys.path[0]) from the repo root, without -I. The hf side still gets Hugging Face's peft."""
    import peft
    import hf_gpt2
    from model import GPT, GPTConfig
    hf_gpt2.save(GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=1, n_head=2, n_embd=32, dropout=0.0)),
                 tmp_path / "base")
    name, kwargs, _ = peft.METHODS["lora"].hf_peft_counterpart(peft.PeftConfig(method="lora", r=4, targets=("c_attn",)))
    job = dict(side="hf", kind="train", base_dir=str(tmp_path / "base"), autocast=False, merge=False, peft=None,
               hf_peft=[name, kwargs], warmup=0, steps=1, batch_size=2, seq_len=16, vocab_size=101, threads=1, seed=0,
               learning_rate=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, sample_tokens=0, sample_prompt=1,
               variants=None, device="cpu", compile=False, ready_path=str(tmp_path / "ready"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "bench_worker.py", ROOT, str(tmp_path / "job.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.split("BENCH_RESULT ", 1)[1])
    assert not os.path.abspath(res["hf_peft_file"]).startswith(os.path.join(ROOT, "peft")), res["hf_peft_file"]
    assert res["trainable"] == 4 * 32 + 3 * 32 * 4 and res["ms"] > 0  # LoRA r=4 on c_attn [96, 32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_error_line():
    proc = subprocess.run([sys.executable, "bench.py", "--device=cuda", "--method=all"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --device=cuda: CUDA is not available on this machine; "
                                                "use --device=cpu"]



@pytest.mark.parametrize("argv, expected", [
    ([], dict(batch_size=4, seq_len=256, warmup=2, steps=3, CUDA=False)),  # the CPU defaults (README numbers)
    (["--device=cuda"], dict(batch_size=16, seq_len=1024, warmup=4, steps=10, CUDA=True)),  # issue #13's protocol
    (["--steps=3", "--device=cuda", "--seq_len=64"], dict(batch_size=16, seq_len=64, warmup=4, steps=3, CUDA=True)),
])
def test_device_cuda_takes_the_protocols_defaults_and_what_the_user_sets_wins(argv, expected):
    """bench.py's settings with CUDA pretended present (its config part only: not run as __main__)."""
    script = ("import json, runpy, sys, torch; torch.cuda.is_available = lambda: True; "
              f"sys.argv = ['bench.py', *{argv!r}]; g = runpy.run_path('bench.py', run_name='bench'); "
              f"print(json.dumps({{k: g[k] for k in {list(expected)!r}}}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
