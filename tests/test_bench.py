"""bench.py smoke test: it runs end to end on a tiny shape and prints its tables. No timing assertions:
the numbers of a tiny model on a shared machine mean nothing; the real benchmark is run by hand."""
import json
import os
import subprocess
import sys

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
