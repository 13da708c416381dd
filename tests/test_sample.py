"""sample.py from a training run (adapter checkpoint) and from an HF folder, as a user runs it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    return subprocess.run([sys.executable, script, "--device=cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_sample_from_adapter_run_and_from_base(base, data, tmp_path):
    out = tmp_path / "run"
    p = run("train.py", f"--init_from={base}", f"--dataset={data}", f"--out_dir={out}", "--method=lora",
            "--block_size=32", "--batch_size=2", "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    assert p.returncode == 0, p.stderr
    # token ids below 256 are single bytes, so '!' and '#' fit the tiny model's vocabulary
    greedy = run("sample.py", f"--out_dir={out}", "--start=!", "--num_samples=2", "--max_new_tokens=40", "--temperature=0")
    assert greedy.returncode == 0, greedy.stderr
    samples = greedy.stdout.split("\n")
    assert greedy.stderr.count("40 tokens in") == 2
    unmerged = run("sample.py", f"--out_dir={out}", "--start=!", "--num_samples=1", "--max_new_tokens=40",
                   "--temperature=0", "--merge_adapters=false", "--use_cache=false")
    assert unmerged.returncode == 0 and unmerged.stdout.split("\n")[0] == samples[0]  # merged+cache == adapter, no cache

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("#")
    p = run("sample.py", f"--init_from={base}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5")
    assert p.returncode == 0, p.stderr

    prompt.write_text("!#" * 33)  # 66 single-byte tokens; the tiny model's context is 64
    p = run("sample.py", f"--init_from={base}", f"--start=FILE:{prompt}", "--num_samples=1")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "context" in p.stderr
    p = run("sample.py", f"--out_dir={tmp_path / 'nothing'}")
    assert p.returncode == 2 and "no checkpoint" in p.stderr


def test_template_before_and_after_instruction_tuning(base_bpe, tmp_path):
    """Prepare the Alpaca fixture, instruction-tune a tiny GPT-2 (real vocabulary) on it, then ask with --template."""
    base = base_bpe
    data, out = tmp_path / "alpaca", tmp_path / "out"
    p = subprocess.run([sys.executable, "data/alpaca/prepare.py", "--input=tests/fixtures/alpaca.json", f"--out_dir={data}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (data / "template.txt").read_text().strip() == "alpaca"
    p = run("train.py", f"--init_from={base}", f"--dataset={data}", f"--out_dir={out}", "--method=full",
            "--block_size=64", "--batch_size=4", "--max_iters=30", "--eval_interval=30", "--eval_iters=1",
            "--learning_rate=1e-2", "--warmup_iters=0", "--decay_lr=false", "--compile=false")
    assert p.returncode == 0, p.stderr
    import instruct
    question = "Name a primary color."
    prompt = instruct.format_prompt("alpaca", question)
    for source in (f"--init_from={base}", f"--out_dir={out}"):  # before and after
        p = run("sample.py", source, "--template=alpaca", f"--start={question}", "--num_samples=1",
                "--max_new_tokens=60", "--temperature=0")
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(prompt)
        answer = p.stdout[len(prompt):]
        assert "<|endoftext|>" not in answer and not any(s in answer for s in instruct.stop_strings("alpaca"))
    p = run("sample.py", f"--out_dir={out}", "--template=guanaco", f"--start={question}")
    assert p.returncode == 2 and p.stderr.strip() == "error: this model was instruction-tuned on alpaca-format data; use --template=alpaca"
    p = run("sample.py", f"--out_dir={out}", "--start=Hi", "--num_samples=1", "--max_new_tokens=2")
    assert p.returncode == 0 and "add --template=alpaca" in p.stderr
    p = run("sample.py", f"--init_from={base}", "--template=vicuna", "--start=Hi")
    assert p.returncode == 2 and "--template=vicuna: must be one of '', guanaco, alpaca" in p.stderr
