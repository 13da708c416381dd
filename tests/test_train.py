"""train.py end to end, as a user runs it: subprocesses on a tiny random GPT-2 and random token shards."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shards import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, env=None, torchrun=0):
    cmd = [sys.executable, "train.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    return subprocess.run(cmd + ["--device=cpu", "--compile=false", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def common(base, data, out_dir, *extra):
    return (f"--init_from={base}", f"--dataset={data}", f"--out_dir={out_dir}", "--batch_size=4",
            "--block_size=32", "--eval_interval=4", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--lr_decay_iters=8", "--learning_rate=3e-3", *extra)


def step_losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iter"]: r["train/loss_step"] for r in rows if "train/loss_step" in r}


def test_lora_run_saves_an_adapter_only_checkpoint_and_learns(base, data, tmp_path):
    out = tmp_path / "lora"
    p = train(*common(base, data, out, "--method=lora", "--targets=lora3", "--max_iters=12", "--eval_interval=12"))
    assert p.returncode == 0, p.stderr
    assert "trainable parameters" in p.stdout and "tok/s" in p.stdout and "eta" in p.stdout
    vals = [json.loads(x)["val/loss"] for x in open(out / "metrics.jsonl") if "val/loss" in x]
    assert vals[-1] < vals[0]
    from safetensors import safe_open
    with safe_open(str(out / "ckpt.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.startswith("model.")]
    assert names and not any("wte" in k or k.endswith("base.weight") for k in names)
    assert os.path.getsize(out / "ckpt.safetensors") < 200_000  # adapters + their AdamW state


@pytest.mark.parametrize("method", ["full", "lora", "lora+"])
def test_resume_continues_exactly(base, data, tmp_path, method):
    """Stopped at iter 4 and resumed == never stopped, dropout on (its RNG is replayed too).
    lora+: B's learning-rate multiple survives the resume (the param groups are saved)."""
    extra = ("--method=lora", "--lora_plus_ratio=16") if method == "lora+" else (f"--method={method}",)
    extra += ("--dropout=0.1", "--adapter_dropout=0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    p = train(*common(base, data, straight, *extra, "--max_iters=8"))
    assert p.returncode == 0, p.stderr
    p = train(*common(base, data, split, *extra, "--max_iters=4"))
    assert p.returncode == 0, p.stderr
    p = train(*common(base, data, split, *extra, "--max_iters=8", "--init_from=resume"))
    assert p.returncode == 0, p.stderr
    a, b = step_losses(straight), step_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[i] == b[i] for i in range(1, 9)), (a, b)


def test_lora_plus_runs_B_at_its_multiple_of_the_scheduled_lr(base, data, tmp_path):
    """--lora_plus_ratio: lora_B's AdamW groups run at ratio x the scheduled lr at every iteration
    (checked in the saved param groups at iter 5, mid-decay), and the run differs from plain LoRA."""
    import checkpoint
    runs = {}
    for ratio in (0, 16):
        out = tmp_path / f"ratio{ratio}"
        p = train(*common(base, data, out, "--method=lora", "--targets=lora3", f"--lora_plus_ratio={ratio}",
                          "--max_iters=5", "--eval_interval=5"))
        assert p.returncode == 0, p.stderr
        runs[ratio] = step_losses(out)
    tensors, meta = checkpoint.load(str(tmp_path / "ratio16"))
    groups = meta["optim_param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 16.0]
    lrs = {g["lr_scale"]: g["lr"] for g in groups}
    assert 3e-4 < lrs[1.0] < 3e-3 and lrs[16.0] == pytest.approx(16 * lrs[1.0])  # decayed, still 16x
    assert runs[0][1] == runs[16][1] and runs[0][5] != runs[16][5]


def test_run_metadata_and_every_logged_value_are_recorded(base, data, tmp_path):
    """The checkpoint keeps train.py's own defaults and the parameter counts; metrics.jsonl (and
    TensorBoard) keep every logged value: the params first, then lr and MFU at every log step."""
    import checkpoint
    out = tmp_path / "run"
    p = train(*common(base, data, out, "--method=lora", "--targets=lora1", "--r=4", "--max_iters=4", "--tensorboard_log=true"))
    assert p.returncode == 0, p.stderr
    meta = checkpoint.read_meta(str(out / "ckpt.safetensors"))
    assert meta["defaults"]["learning_rate"] == 3e-4 and meta["config"]["learning_rate"] == 3e-3  # before overrides
    assert meta["defaults"]["r"] == 8 and meta["defaults"]["targets"] == [] and meta["defaults"]["method"] == "full"
    params = meta["params"]
    assert params["trainable"] == 2 * 4 * (32 + 96)  # r=4 on c_attn [96, 32] of 2 layers
    assert f"{params['trainable']:,} trainable parameters of {params['total']:,}" in p.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[0] == {"iter": 0, "params": params}
    steps = [r for r in rows if "train/loss_step" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and all(r["lr"] > 0 and r["tok_per_s"] > 0 for r in steps)
    assert [r["iter"] for r in steps if "mfu" in r] == [2, 3, 4]  # from the second log interval on, as printed
    mfu_printed = [line.split("mfu ")[1].split("%")[0] for line in p.stdout.splitlines() if "mfu " in line]
    assert mfu_printed == [f"{r['mfu']:.1f}" for r in steps if "mfu" in r]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert {"lr", "mfu", "tok_per_s", "train/loss_step", "val/loss", "params/trainable", "params/total"} <= set(tags)
    assert [e.step for e in tb.Scalars("mfu")] == [2, 3, 4] and tb.Scalars("params/total")[0].value == params["total"]


def test_ddp_two_processes_equal_one_process(base, data, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the single-process losses."""
    args = ("--method=lora", "--lora_plus_ratio=4", "--gradient_accumulation_steps=2", "--max_iters=4")
    one, two = tmp_path / "one", tmp_path / "two"
    p = train(*common(base, data, one, *args))
    assert p.returncode == 0, p.stderr
    p = train(*common(base, data, two, *args), torchrun=2)
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[i] - b[i]) < 1e-5 for i in a), (a, b)


def test_bad_input_stops_with_one_line(base, data, tmp_path):
    def fails(*args, message):
        p = train(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = [line for line in p.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, p.stderr)

    out = tmp_path / "out"
    fails(*common(base, data, out), "--learning_rat=1", message="did you mean 'learning_rate'")
    fails(*common(base, data, out), "--max_iters=ten", message="expected an int")
    fails(*common(base, tmp_path / "nodata", out), message="dataset")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(*common(base, empty, out), message="train.bin")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.bin").write_bytes(b"\x00" * 4096)
    (bad / "val.bin").write_bytes(b"\x00" * 4096)
    fails(*common(base, bad, out), message="not a token shard")
    fails(*common(base, data, out), "--block_size=128", message="larger than the model's 64 positions")
    big = tmp_path / "big"  # GPT-2 token ids for a model whose vocabulary has 256 tokens
    write_shard(big / "train.bin", np.full(500, 1000, dtype=np.uint16))
    write_shard(big / "val.bin", np.full(500, 1000, dtype=np.uint16))
    fails(*common(base, big, out), message="holds token id 1000, but the model's vocabulary has 256 tokens")
    fails(*common(tmp_path / "no-such-model", data, out), message="no-such-model")
    fails(*common(base, data, out), "--device=cuda", message="CUDA is not available")
    fails(*common(base, data, out), "--init_from=resume", message="no checkpoint")
    fails(*common(base, data, out), "--method=lorra", message="lora")
    fails(*common(base, data, out), "--method=lora", "--r=100", message="r=100 is too large")
    assert not out.exists() or not (out / "ckpt.safetensors").exists()

    # a finished run is never overwritten by a fresh one, nor resumed with other settings
    done = tmp_path / "done"
    assert train(*common(base, data, done, "--method=lora", "--max_iters=4")).returncode == 0
    before = (done / "ckpt.safetensors").read_bytes()
    fails(*common(base, data, done, "--method=lora", "--max_iters=4"), message="already holds a checkpoint")
    fails(*common(base, data, done, "--method=dora", "--max_iters=8", "--init_from=resume"), message="holds a lora run")
    assert (done / "ckpt.safetensors").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    fails(*common(base, data, foreign), message="did not write")


# -----------------------------------------------------------------------------
# instruction data: a {split}_mask.bin next to the tokens puts the loss on response tokens only

EOT = 50256


def write_examples(folder, split, examples):
    """examples: (prompt ids, response ids) pairs -> {split}.bin and {split}_mask.bin, EOT after each."""
    ids, mask = [], []
    for prompt, response in examples:
        ids += prompt + response + [EOT]
        mask += [0] * len(prompt) + [1] * (len(response) + 1)
    write_shard(os.path.join(folder, f"{split}.bin"), np.array(ids, dtype=np.uint16))
    write_shard(os.path.join(folder, f"{split}_mask.bin"), np.array(mask, dtype=np.uint8), kind="mask")
    return np.array(ids), np.array(mask)


def reference_loss(base, ids, mask, T):
    """Mean cross-entropy of transformers' model on window ids[0:T+1], over targets whose mask is 1."""
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    x = torch.tensor(ids[:T])[None]
    with torch.no_grad():
        logits = model(x).logits[0]  # (T, V)
    nll = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(ids[1:T + 1]), reduction="none")
    keep = torch.tensor(mask[1:T + 1] == 1)
    return nll[keep].mean().item(), nll.mean().item()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_prompt_mask_puts_the_loss_on_responses_only(base_bpe, tmp_path, mask_prompt, padded):
    """val holds one usable example start, so every eval window is the same: its loss is checkable by hand.
    The first example's prompt is longer than block_size (no answer token reachable): windows must skip it.
    padded: the last example is shorter than a window, which is padded with EOT tokens that carry no loss."""
    rng = np.random.default_rng(0)
    T = 16
    tok = lambda n: rng.integers(0, 50000, n).tolist()  # noqa: E731
    data = tmp_path / "instr"
    data.mkdir()
    write_examples(data, "train", [(tok(5), tok(7)) for _ in range(20)])
    ids, mask = write_examples(data, "val", [(tok(T + 3), tok(4)), (tok(6), tok(5 if padded else T))])
    start = T + 3 + 4 + 1  # the second example: the only one whose window has an answer token
    ids, mask = ids[start:], mask[start:]
    p = train(f"--init_from={base_bpe}", f"--dataset={data}", f"--out_dir={tmp_path / 'out'}", "--eval_only=true",
              f"--block_size={T}", "--batch_size=2", "--eval_iters=2", f"--mask_prompt={mask_prompt}")
    assert p.returncode == 0, p.stderr
    assert "val: 1 instruction examples" in p.stdout
    val = [json.loads(x)["val/loss"] for x in open(tmp_path / "out" / "metrics.jsonl") if "val/loss" in x][0]
    masked, unmasked = reference_loss(base_bpe, ids, mask, min(T, len(ids) - 1))
    assert val == pytest.approx(masked if mask_prompt else unmasked, rel=1e-5)
    assert abs(masked - unmasked) > 1e-3  # the two cases differ by more than the tolerance above


def test_instruction_run_learns_the_answers(base_bpe, tmp_path):
    """Prompts are noise, answers a fixed sequence: with the mask the answer loss falls towards 0."""
    rng = np.random.default_rng(1)
    answer = rng.integers(0, 50000, 6).tolist()
    data = tmp_path / "instr"
    data.mkdir()
    for split, n in (("train", 60), ("val", 20)):
        write_examples(data, split, [(rng.integers(0, 50000, 4).tolist(), answer) for _ in range(n)])
    out = tmp_path / "out"
    p = train(f"--init_from={base_bpe}", f"--dataset={data}", f"--out_dir={out}", "--method=full",
              "--block_size=32", "--batch_size=4", "--max_iters=40", "--eval_interval=40", "--eval_iters=2",
              "--learning_rate=1e-2", "--warmup_iters=0", "--decay_lr=false")
    assert p.returncode == 0, p.stderr
    vals = [json.loads(x)["val/loss"] for x in open(out / "metrics.jsonl") if "val/loss" in x]
    assert vals[0] > 9 and vals[-1] < 0.5 * vals[0]


def test_bad_mask_shards_stop_with_one_line(base_bpe, tmp_path):
    data = tmp_path / "instr"
    data.mkdir()
    write_examples(data, "train", [([1, 2, 3], [4, 5])] * 20)
    write_examples(data, "val", [([1, 2, 3], [4, 5])] * 20)
    write_shard(data / "val_mask.bin", np.ones(7, dtype=np.uint8), kind="mask")  # shorter than val.bin
    common_args = (f"--init_from={base_bpe}", f"--dataset={data}", "--eval_only=true", "--block_size=8")
    p = train(*common_args, f"--out_dir={tmp_path / 'a'}")
    assert p.returncode == 2 and "val_mask.bin has 7 items but val.bin has 120 tokens" in p.stderr
    write_examples(data, "val", [(list(range(1, 12)), [4, 5])] * 3)  # every prompt longer than block_size
    p = train(*common_args, f"--out_dir={tmp_path / 'b'}")
    assert p.returncode == 2 and "no example whose first answer token lies within block_size=8" in p.stderr
