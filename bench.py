"""
Benchmark: training-step speed and peak memory, ours side by side with transformers (+ HF peft).

    python bench.py                      # full fine-tuning, fp32 and bf16, vs GPT2LMHeadModel; KV-cache sampling
    python bench.py --method=lora        # LoRA (r=8 on c_attn) vs HF peft, + our full step, bf16 base, merged model
    python bench.py --method=all         # everything: the full comparison above, then every method in one table
    python bench.py --method=dora --r=16 --targets=lora2 --out=bench.json
    python bench.py --device=cuda --compile=true --method=all   # on a GPU: issue #13's protocol (below)

The model is the GPT-2 124M shape with random weights (n_layer=12, n_head=12, n_embd=768, vocab 50257),
trained on a fixed random batch of batch_size x seq_len tokens, dropout 0 everywhere. We build our GPT,
save it as a transformers folder (hf_gpt2.save), and both sides load that folder: same weights, same batch,
so the first-step losses must agree.

A train step is forward + backward + AdamW step + zero_grad, with the same AdamW on both sides
(weight decay on >= 2-D trainable parameters, none on the others; what GPT.configure_optimizers builds:
fused on CUDA). transformers computes its loss with labels=y, shift_labels=y: the same cross-entropy as
ours, with attn_implementation="sdpa"; HF peft adapts GPT-2's Conv1D layers with fan_in_fan_out=True.
"bf16" means torch.autocast(bfloat16) around the forward; "bf16 base" means PeftConfig(base_dtype=
"bfloat16"): frozen weights stored and multiplied in bf16, adapters and optimizer in fp32. What each
method is measured against is its layer class's hf_peft_counterpart (peft/), its step-time goal
relative to LoRA its bench_goal_vs_lora; this script names no method.

Every measurement runs in its own fresh process, bench_worker.py (`python -I`, started in a scratch
folder; the worker itself puts this repo on sys.path or takes it off, so that `import peft` there is
Hugging Face's on the HF side). bench_worker.py's docstring says how ms/step and peak MB are measured;
bench_report.py prints the tables and decides the goals. In short:
- ms/step: the median wall time of the timed steps, after `warmup` untimed ones;
  tokens/s = batch_size * seq_len / that median.
- peak MB, CPU: the highest resident set size of the process during the steps minus its RSS after the
  imports (weights, gradients, optimizer state, activations and allocator slack, not the libraries).
- peak MB, CUDA: torch.cuda.max_memory_allocated() during the steps (reset once the model is built).
- forward (adapter methods): the plain base, the adapted and the merged model in one process, taking
  turns, so that a change in the machine's load hits all three alike.
- sampling (full): generate sample_tokens new tokens (batch 1, random prompt) with and without the KV
  cache, after a short warm-up; the speedup is the ratio of the two wall times.

--device=cuda follows issue #13's protocol: its defaults become batch 16 x 1024, 4 warmup + 10 timed
steps (CUDA_DEFAULTS; what you set on the command line wins), every train step runs under bf16 autocast,
and the CPU's bf16 settings (bf16_warmup, bf16_steps, bf16_max_s) do not apply.
MFU = tokens/s x GPT.flops_per_token(seq_len) / the GPU's peak dense bf16 FLOP/s (devices.GPU_PEAK_BF16_FLOPS;
an unknown GPU gets no MFU). --compile=true wraps both models in torch.compile, ours with fullgraph=True
(a graph break is reported, and the step compiled with breaks instead). The goals are issue #13's: with
compile, full >= 1.3x transformers' tokens/s, LoRA >= 1.5x HF peft's and peak memory <= 0.8x theirs
(eager: <= 0.7x); each method's step time relative to our LoRA; a bf16-base LoRA at least as fast as the
fp32 base with <= 0.8x its memory.

On a CPU without native bf16 matmul instructions (no avx512_bf16 / amx_bf16), bf16 matmuls are emulated
and far slower than fp32 (one GPT-2 124M bf16 step takes many minutes on 2 AVX2 cores). The bf16 rows are
measured anyway, with fewer steps (bf16_warmup, bf16_steps), and a bf16 measurement still running after
bf16_max_s seconds of steps is stopped: it then proves bounds, which the tables print with '<' / '>'
(a step takes longer than the time spent, so tokens/s is below the batch's tokens / that time; the peak
memory is at least the peak so far), and a goal that a bound cannot decide says "unknown".
On a busy machine, timings with 2+ threads suffer from thread contention; --threads=1 is steadier there.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import bench_report
import configurator
import errors
import hf_gpt2
import outputs
import peft
from errors import UserError
from peft.config import TRAIN_KEYS
from devices import gpu_peak_flops
from model import GPT, GPTConfig

errors.install()

# -----------------------------------------------------------------------------
method = "full"  # 'full', any name in peft.METHODS, or 'all' (the full comparison, then every method)
device = "cpu"  # 'cpu', or 'cuda' for issue #13's GPU protocol (CUDA_DEFAULTS below)
compile = False  # wrap both models in torch.compile (ours with fullgraph=True)
# model shape: GPT-2 124M
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50257
block_size = 1024  # the model's context (sampling needs sample_prompt + sample_tokens of it)
# batch
batch_size = 4
seq_len = 256
# PEFT: these keys map one to one onto peft.PeftConfig fields, as in train.py
r = 8
alpha = 16.0
adapter_dropout = 0.0  # PeftConfig.dropout
targets = ("c_attn",)  # the same targets for every method, so step times compare; empty = each method's default
use_rslora = False
adapter_init = "kaiming"  # PeftConfig.init
oft_block_size = 32
coft_eps = 0.0
block_share = False
ether_nb = 32
flip_side = False
# AdamW, the same on both sides
learning_rate = 1e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
# what to run, and how long
warmup = 2  # untimed steps per fp32 measurement
steps = 3  # timed steps per fp32 measurement
bf16 = True  # also measure the bf16 rows (autocast for full, bf16 base for adapters)
bf16_warmup = 0  # bf16 is emulated (slow) on CPUs without bf16 instructions: fewer steps
bf16_steps = 1
bf16_max_s = 60  # stop a bf16 measurement after this many seconds of steps and report bounds (0 = never)
hf = True  # also measure transformers / HF peft
forward = True  # adapter methods: forward speed of the plain base, the adapted and the merged model
sample_tokens = 256  # full: new tokens sampled with and without the KV cache (0 = skip)
sample_prompt = 16  # prompt length for sampling
threads = os.cpu_count() or 1  # torch threads in every measurement; 0 = torch's default
seed = 1337
timeout = 3600  # seconds allowed per measurement process
out = ""  # also write the results as JSON to this file
overwrite = False  # replace an existing --out (only ever an earlier bench.py result)
# the valid values of every key (configurator's rules), checked before anything runs
_ = configurator.ANY


def cpu_or_cuda(value):
    """cpu, or cuda where CUDA is available"""
    return configurator.DEVICE(value) if value in ("cpu", "cuda") else "must be cpu or cuda"


domains = {
    "method": lambda m: None if m in ("all", *peft.METHODS) else f"choose 'all' or one of {', '.join(peft.METHODS)}",
    "device": cpu_or_cuda, "compile": _,
    "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1", "vocab_size": ">= 1", "block_size": ">= 1",
    "batch_size": ">= 1", "seq_len": ">= 1",
    **{k: rule for k, rule in peft.config.train_domains().items() if k not in ("method", "quantize", "base_dtype")},
    "learning_rate": "> 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "warmup": ">= 0", "steps": ">= 1", "bf16": _, "bf16_warmup": ">= 0", "bf16_steps": ">= 1", "bf16_max_s": ">= 0",
    "hf": _, "forward": _, "sample_tokens": ">= 0", "sample_prompt": ">= 1", "threads": ">= 0",
    "seed": "[0, 18446744073709551615]", "timeout": "> 0", "out": _, "overwrite": _,
}
# issue #13's protocol on a GPU: batch 16 x 1024, median of 10 timed steps after 4, all under bf16 autocast
CUDA_DEFAULTS = dict(batch_size=16, seq_len=1024, warmup=4, steps=10)
config = configurator.configure(configurator.defaults_from(globals()), sys.argv[1:], domains)
if config["device"] == "cuda":  # again, from the GPU defaults: what the user set still wins
    config = configurator.configure({**configurator.defaults_from(globals()), **CUDA_DEFAULTS}, sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(REPO, "bench_worker.py")
CUDA = device == "cuda"

# checks that need no model
if out:  # before any measurement: an existing file needs --overwrite=true, and only an earlier result is replaced
    outputs.check_output(out, overwrite, what="benchmark results",
                         ours=lambda p: outputs.is_json_with(p, {"machine", "settings", "results", "goals", "total_s"}))
if n_embd % n_head:
    raise UserError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
if seq_len > block_size:
    raise UserError(f"seq_len={seq_len} is longer than block_size={block_size}; raise --block_size")
if method in ("full", "all") and sample_tokens and sample_prompt + sample_tokens > block_size:
    raise UserError(f"sample_prompt + sample_tokens = {sample_prompt + sample_tokens} exceeds block_size="
                    f"{block_size}: the KV cache would fill up; raise --block_size or sample fewer tokens")


def peft_config(m, **over):
    """PeftConfig of method m from this script's keys (like train.py does)."""
    if m == "full":
        return peft.PeftConfig(method="full")
    kw = {field: config[key] for key, field in TRAIN_KEYS.items() if key in config}  # the keys this script has
    kw.update(method=m, **over)
    return peft.PeftConfig(**kw)


# -----------------------------------------------------------------------------
# the parent: plan the measurements, run each in its own process (bench_report.py prints the tables)


def machine():
    """What the numbers were measured on."""
    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    gpu = torch.cuda.get_device_name() if CUDA else None
    return {
        "cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": gpu, "gpu_peak_bf16_flops": gpu_peak_flops(gpu) if gpu else None, "cuda": torch.version.cuda,
        "torch": torch.__version__, "transformers": version("transformers"), "hf_peft": version("peft"),
        "python": platform.python_version(),
    }


def vm_hwm_kb(pid):
    """Peak RSS (kB) of a running process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None


class Runner:
    """Runs measurements one after another, each in a fresh bench_worker.py process, and keeps every result.
    With a known GPU peak (peak_flops), a train result gets its MFU from flops_per_token."""

    def __init__(self, workdir, base_dir, total, flops_per_token=None, peak_flops=None):
        self.workdir, self.base_dir, self.total = workdir, base_dir, total
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.results, self.done, self.t0 = [], {}, time.time()

    def __call__(self, label, side="ours", kind="train", peft_cfg=None, hf_cfg=None, autocast=False, merge=False,
                 variants=None):
        autocast = autocast or (CUDA and kind == "train")  # the GPU protocol: every train step under bf16 autocast
        # bf16 on a CPU may be emulated (slow): fewer steps, and a stop after bf16_max_s
        low = not CUDA and (autocast or (peft_cfg is not None and peft_cfg.base_dtype == "bfloat16"))
        i = len(self.results) + 1
        path = os.path.join(self.workdir, f"job{i}.json")
        job = dict(side=side, kind=kind, base_dir=self.base_dir, autocast=autocast, merge=merge,
                   peft=peft_cfg.asdict() if peft_cfg is not None and side == "ours" else None, hf_peft=hf_cfg,
                   warmup=bf16_warmup if low else warmup, steps=bf16_steps if low else steps,
                   batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, threads=threads, seed=seed,
                   learning_rate=learning_rate, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                   sample_tokens=sample_tokens, sample_prompt=sample_prompt, variants=variants,
                   device=device, compile=compile and kind == "train", ready_path=path + ".ready")
        key = json.dumps({k: v for k, v in job.items() if k != "ready_path"}, sort_keys=True)
        if key in self.done:  # the same measurement again (e.g. our full step in --method=all): reuse it
            return self.done[key]
        with open(path, "w") as f:
            json.dump(job, f)
        print(f"[{i}/{self.total}] {label} ({time.time() - self.t0:.0f} s so far)", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TOKENIZERS_PARALLELISM="false")
        t = time.time()
        proc = subprocess.Popen([sys.executable, "-I", WORKER, REPO, path], cwd=self.workdir, env=env,
                                stdout=subprocess.PIPE, text=True)
        res = self.wait(proc, job, bf16_max_s if low else 0)
        res.update(label=label, side=side, kind=kind, method=peft_cfg.method if peft_cfg else "full",
                   autocast="bfloat16" if autocast else None, merged=merge, wall_s=time.time() - t,
                   base_dtype=peft_cfg.base_dtype if peft_cfg else None, compile=job["compile"])
        if "ms" in res:
            if self.peak_flops:
                res["mfu"] = res["tokens_per_s"] * self.flops_per_token / self.peak_flops
            b = res.get("bounds", {})
            print(f"    -> {b.get('ms', '')}{res['ms']:.0f} ms/step, {b.get('tokens_per_s', '')}"
                  f"{res['tokens_per_s']:.1f} tokens/s, peak {b.get('peak_mb', '')}{res['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
        elif "variants" in res:
            print("    -> " + ", ".join(f"{v['name']} {v['ms']:.1f} ms" for v in res["variants"]), file=sys.stderr,
                  flush=True)
        elif "speedup" not in res:
            print(f"    -> {bench_report.why(res)}", file=sys.stderr, flush=True)
        self.results.append(res)
        self.done[key] = res
        return res

    def wait(self, proc, job, max_s):
        """The worker's result; with max_s > 0, stop it once its steps have run max_s seconds and
        report what that proves: a step takes at least max_s / (number of steps) seconds."""
        deadline = time.time() + timeout
        while True:
            try:
                stdout, _ = proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if max_s and os.path.exists(job["ready_path"]):
                with open(job["ready_path"]) as f:
                    ready = json.load(f)
                elapsed = time.time() - ready["t"]
                if elapsed > max_s and proc.poll() is None:
                    hwm = vm_hwm_kb(proc.pid)
                    proc.kill()
                    proc.communicate()
                    n = job["warmup"] + job["steps"]
                    step_s = elapsed / n
                    res = {"ms": 1000 * step_s, "tokens_per_s": job["batch_size"] * job["seq_len"] / step_s,
                           "bounds": {"ms": ">", "tokens_per_s": "<"},
                           "stopped": f"stopped after {elapsed:.0f} s of {n} step(s) (--bf16_max_s={max_s})"}
                    if hwm is not None and ready["exact_peak"]:
                        res["peak_mb"] = (hwm - ready["rss_start"]) / 1024
                        res["bounds"]["peak_mb"] = ">"
                    return res
            if time.time() > deadline:
                proc.kill()
                proc.communicate()
                return {"error": f"timed out after {timeout} s (raise --timeout or lower --steps)"}
        lines = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"error": f"the measurement process failed (exit {proc.returncode}); its traceback is above"}
        return json.loads(lines[-1][len("BENCH_RESULT "):])


def count_jobs(methods):
    """How many measurement processes this run starts (for the progress lines)."""
    n = 0
    if method in ("full", "all"):
        n += (2 if hf else 1) * (1 if CUDA or not bf16 else 2) + (1 if sample_tokens else 0)
    if methods:
        n += (0 if method == "all" else 1) + (0 if peft.BENCH_REFERENCE in methods else 1)  # our full, our reference
        for m in methods:
            n += 1 + (1 if hf and peft.METHODS[m].hf_peft_counterpart(peft_config(m))[0] else 0)
        n += (1 if bf16 else 0) + (1 if forward else 0)
    return n


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    methods = None if method == "full" else ([m for m in peft.METHODS if m != "full"] if method == "all" else [method])
    for m in methods or ():
        peft_config(m)  # settings that cannot work stop here, before anything is built
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, CPU capability "
          f"{info['cpu_capability']}, native bf16 matmul: {info['native_bf16']}; torch {info['torch']}, "
          f"transformers {info['transformers']}, HF peft {info['hf_peft']}, Python {info['python']}")
    if CUDA:
        peak = info["gpu_peak_bf16_flops"]
        print(f"GPU: {info['gpu']} (CUDA {info['cuda']}); "
              + (f"MFU against its peak dense bf16 {peak / 1e12:.1f} TFLOP/s" if peak else
                 "MFU omitted: this GPU is not in devices.GPU_PEAK_BF16_FLOPS"))
    elif info["load_average"] and info["load_average"][0] > 0.5 * (info["cores"] or 1):
        print(f"warning: the machine is busy (load average {info['load_average'][0]:.1f} over {info['cores']} "
              f"cores): the timings will be noisy and slow")
    print(f"shape: n_layer={n_layer} n_head={n_head} n_embd={n_embd} vocab_size={vocab_size}, batch {batch_size} x "
          f"{seq_len} tokens, dropout 0; {warmup} warmup + {steps} timed steps"
          + ("" if CUDA else f" (bf16: {bf16_warmup} + {bf16_steps}, stopped after {bf16_max_s} s)")
          + f"; AdamW lr={learning_rate} wd={weight_decay} betas=({beta1}, {beta2})"
          + ("; every train step under bf16 autocast, fused AdamW" if CUDA else "")
          + ("; torch.compile (ours with fullgraph=True)" if compile else ""))
    print("ms/step = median of the timed steps; peak MB = "
          + ("torch.cuda.max_memory_allocated during the steps" if CUDA else
             "max RSS during the steps minus RSS after the imports (weights + grads + AdamW state + activations)")
          + ", each measurement in its own process; '<' / '>' mark bounds from a stopped measurement")
    sys.stdout.flush()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        torch.manual_seed(seed)
        base_dir = os.path.join(workdir, "base")
        gpt = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=0.0))
        hf_gpt2.save(gpt, base_dir)  # both sides load these weights
        flops = gpt.flops_per_token(seq_len)
        del gpt
        peak = info["gpu_peak_bf16_flops"]
        run = Runner(workdir, base_dir, count_jobs(methods), flops, peak)
        s = SimpleNamespace(**config, cuda=CUDA, compiled=", torch.compile" if compile else "")
        goals = []
        if method in ("full", "all"):
            bench_report.report_full(s, run, goals, peft_config)
        if methods:
            bench_report.report_methods(s, run, goals, peft_config, methods)
    print("\n### Goals\n")
    if not goals:
        print("(the spec sets no goal for this configuration)")
    print(bench_report.table(["goal", "measured", "met?"],
                             [[g["goal"], bench_report.show(None if g["value"] is None else (g["value"], g["bound"]),
                                                            ".3f", "-" if g["met"] in ("yes", "no") else "n/a"),
                               g["met"]] for g in goals]))  # '-': a yes / no without a number (fullgraph)
    if info["native_bf16"] is False and bf16 and not CUDA:
        print("\nnote: this CPU has no bf16 matmul instructions (avx512_bf16 / amx_bf16): bf16 matmuls are "
              "emulated and far slower than fp32, so the bf16 goals (which assume hardware bf16) cannot be met here.")
    if CUDA and not peak:
        print(f"\nnote: no MFU: the peak bf16 FLOP/s of '{info['gpu']}' is not in devices.GPU_PEAK_BF16_FLOPS")
    if any(res.get("peak_exact") is False for res in run.results):
        print("note: this system refused to reset the RSS high-water mark: some peaks are whole-process "
              "ru_maxrss (loading transients included)")
    total = time.time() - t_start
    print(f"\ntotal time {total:.0f} s")
    if out:
        outputs.write_json(out, {"machine": info, "settings": config, "results": run.results, "goals": goals,
                                 "total_s": total})
        print(f"wrote {out}")
