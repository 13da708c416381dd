"""
Benchmark: training-step speed and peak memory, ours side by side with transformers (+ HF peft).

    python bench.py                      # full fine-tuning, fp32 and bf16, vs GPT2LMHeadModel; KV-cache sampling
    python bench.py --method=lora        # LoRA (r=8 on c_attn) vs HF peft, + our full step, bf16 base, merged model
    python bench.py --method=all         # everything: the full comparison above, then every method in one table
    python bench.py --method=dora --r=16 --targets=lora2 --out=bench.json

The model is the GPT-2 124M shape with random weights (n_layer=12, n_head=12, n_embd=768, vocab 50257),
trained on a fixed random batch of batch_size x seq_len tokens, dropout 0 everywhere. We build our GPT,
save it as a transformers folder (hf_gpt2.save), and both sides load that folder: same weights, same batch,
so the first-step losses must agree.

A train step is forward + backward + AdamW step + zero_grad, with the same AdamW on both sides
(weight decay on >= 2-D trainable parameters, none on the others; what GPT.configure_optimizers builds
on a CPU). transformers computes its loss with labels=y, shift_labels=y: the same cross-entropy as ours.
"bf16" means torch.autocast(bfloat16) around the forward; "bf16 base" means PeftConfig(base_dtype=
"bfloat16"): frozen weights stored and multiplied in bf16, adapters and optimizer in fp32.

Every measurement runs in its own fresh process (`python -I`, started in a scratch folder, so that
`import peft` there is Hugging Face's and not our peft/ package). Its numbers:
- ms/step: the median wall time of the timed steps, after `warmup` untimed ones;
  tokens/s = batch_size * seq_len / that median.
- peak MB: the highest resident set size (RSS) of the process during the warmup and timed steps, minus
  its RSS after the imports, before the model was built (both read after gc + malloc_trim). So it counts
  weights, gradients, optimizer state, activations and allocator slack, not the Python libraries. The
  high-water mark is reset (/proc/self/clear_refs) once the model and optimizer are built, so loading
  transients do not count; where that reset is refused we fall back to ru_maxrss and say so.
- forward (adapter methods): the plain base, the adapted and the merged model in one process, taking
  turns, so that a change in the machine's load hits all three alike.
- sampling (full): generate sample_tokens new tokens (batch 1, random prompt) with and without the KV
  cache, after a short warm-up; the speedup is the ratio of the two wall times.

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
from dataclasses import replace

import torch

import configurator
import errors
import hf_gpt2
import outputs
import peft
from errors import UserError
from peft.config import TRAIN_KEYS
from model import GPT, GPTConfig

errors.install()

# -----------------------------------------------------------------------------
method = "full"  # 'full', any name in peft.METHODS, or 'all' (the full comparison, then every method)
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
domains = {
    "method": lambda m: None if m in ("all", *peft.METHODS) else f"choose 'all' or one of {', '.join(peft.METHODS)}",
    "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1", "vocab_size": ">= 1", "block_size": ">= 1",
    "batch_size": ">= 1", "seq_len": ">= 1",
    **{k: rule for k, rule in peft.config.train_domains().items() if k not in ("method", "quantize", "base_dtype")},
    "learning_rate": "> 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "warmup": ">= 0", "steps": ">= 1", "bf16": _, "bf16_warmup": ">= 0", "bf16_steps": ">= 1", "bf16_max_s": ">= 0",
    "hf": _, "forward": _, "sample_tokens": ">= 0", "sample_prompt": ">= 1", "threads": ">= 0",
    "seed": "[0, 18446744073709551615]", "timeout": "> 0", "out": _, "overwrite": _,
}
config = configurator.configure(configurator.defaults_from(globals()), sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
GOAL_VS_LORA = {"dora": 1.15, "oft": 1.3, "ether": 1.1, "etherplus": 1.1, "etherplusHH": 1.1}  # max step-time ratio

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


def hf_peft_config(cfg):
    """(HF peft config class name, kwargs, note) for our cfg, or (None, reason, None) where HF has no
    equivalent. HF adapts whole modules only: q/k/v slices become the whole c_attn."""
    ours = cfg.resolved_targets()
    whole = []
    for t in ours:
        t = "c_attn" if t in ("q", "k", "v") else t
        if t not in whole:
            whole.append(t)
    note = None if list(ours) == whole else f"HF adapts the whole {', '.join(whole)} (ours: {', '.join(ours)})"
    m = cfg.method
    if m in ("lora", "dora", "olora", "pissa"):
        init = {"olora": "olora", "pissa": "pissa"}.get(m, True if cfg.init == "kaiming" else "gaussian")
        return "LoraConfig", dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=whole,
                                  fan_in_fan_out=True, use_rslora=cfg.use_rslora, use_dora=m == "dora",
                                  init_lora_weights=init, bias="none", task_type="CAUSAL_LM"), note
    if m == "ia3":  # like ours: input scaling on layers that narrow (mlp.c_proj), output scaling elsewhere
        return "IA3Config", dict(target_modules=whole, feedforward_modules=[t for t in whole if t == "mlp.c_proj"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM"), note
    if m == "oft":  # exact Cayley, like ours (HF's default is the Cayley-Neumann approximation)
        kw = dict(r=0, oft_block_size=cfg.oft_block_size, target_modules=whole, module_dropout=cfg.dropout,
                  block_share=cfg.block_share, use_cayley_neumann=False, fan_in_fan_out=True, task_type="CAUSAL_LM")
        if cfg.coft_eps > 0:
            kw.update(coft=True, eps=cfg.coft_eps)
        return "OFTConfig", kw, note
    if m.startswith("ether"):
        return None, "ETHER is not in HF peft", None
    return None, f"no HF peft equivalent of '{m}' here", None


# -----------------------------------------------------------------------------
# the measurement process: self-contained (it must not import this repo when it measures HF)

WORKER = r'''
import contextlib, gc, json, os, resource, statistics, sys, time, warnings
repo, job = sys.argv[1], json.load(open(sys.argv[2]))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != repo]
if job["side"] == "ours":
    sys.path.insert(0, repo)
warnings.filterwarnings("ignore")
import torch
if job["threads"] > 0:
    torch.set_num_threads(job["threads"])
if job["side"] == "ours":
    import peft
    import hf_gpt2
    from errors import UserError
else:
    import transformers
    from transformers import GPT2LMHeadModel
    import peft
    assert os.path.dirname(os.path.abspath(peft.__file__)) != os.path.join(repo, "peft"), "got the repo's peft/"
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def status(field):
    """A kB field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmHWM") <= status("VmRSS") + 1024
    except OSError:
        return False


def settle():
    """Free garbage and hand free heap pages back to the OS, so RSS counts live memory only."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def log(msg):
    print(f"    {msg}", file=sys.stderr, flush=True)


def done(result):
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    sys.exit(0)


# before the memory baseline: start the thread pool and import what torch loads lazily on a first
# backward / AdamW step / autocast (the AdamW step alone pulls in ~70 MB of modules)
w = torch.nn.Parameter(torch.ones(256, 256))
opt = torch.optim.AdamW([w])
with torch.autocast("cpu", dtype=torch.bfloat16):
    q = torch.ones(1, 2, 4, 8)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
(w @ w).sum().backward()
opt.step()
del w, opt, q
settle()
rss_start = status("VmRSS")
torch.manual_seed(job["seed"])
g = torch.Generator().manual_seed(job["seed"])
B, T, V = job["batch_size"], job["seq_len"], job["vocab_size"]
x = torch.randint(V, (B, T), generator=g)  # (B, T) inputs
y = torch.randint(V, (B, T), generator=g)  # (B, T) targets
result = {"threads": torch.get_num_threads()}


def build_ours(peft_dict, merge):
    """Our GPT from the saved base (fp32, dropout 0), with adapters (and merged) as asked."""
    model = hf_gpt2.load(job["base_dir"])
    try:
        if peft_dict is not None:
            peft.inject(model, peft.PeftConfig.from_dict(peft_dict))
            if merge:
                peft.merge(model)
    except UserError as e:
        done({"user_error": str(e)})
    return model


if job["kind"] == "forward":  # ours only: no-grad forwards of several models, taking turns, so that a
    # change in the machine's load hits them alike
    models = [(name, build_ours(p, merge).eval()) for name, p, merge in job["variants"]]
    times, last = {name: [] for name, _ in models}, {}
    n = job["warmup"] + job["steps"]
    for i in range(n):
        for name, model in models:
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x, y)
            last[name] = time.perf_counter() - t0
            if i >= job["warmup"]:
                times[name].append(last[name])
        log(f"{'warmup' if i < job['warmup'] else 'round'} {i + 1}/{n}: "
            + ", ".join(f"{name} {1000 * dt:.1f} ms" for name, dt in last.items()))
    result["variants"] = [{"name": name, "ms": 1000 * statistics.median(ts), "step_ms": [1000 * t for t in ts],
                           "tokens_per_s": B * T / statistics.median(ts)} for name, ts in times.items()]
    done(result)

# the model
if job["side"] == "ours":
    model = build_ours(job["peft"], job["merge"])

    def loss_fn():
        return model(x, y)[1]
else:
    model = GPT2LMHeadModel.from_pretrained(job["base_dir"], dtype=torch.float32)
    result["attn_implementation"] = model.config._attn_implementation
    if job["hf_peft"] is not None:
        name, kwargs = job["hf_peft"]
        try:
            model = peft.get_peft_model(model, getattr(peft, name)(**kwargs))
        except Exception as e:
            done({"na": f"HF peft refuses it: {type(e).__name__}: {str(e).strip().split('. ')[0][:200]}"})

    def loss_fn():  # the same cross-entropy as ours: no shift, every position
        return model(input_ids=x, labels=y, shift_labels=y).loss

params = list(model.parameters())  # a tied weight once
result["trainable"] = sum(p.numel() for p in params if p.requires_grad)
result["total"] = sum(p.numel() for p in params)
ctx = torch.autocast("cpu", dtype=torch.bfloat16) if job["autocast"] else contextlib.nullcontext()

if job["kind"] == "sample":  # ours only: generate with and without the KV cache
    model.eval()
    prompt = torch.randint(V, (1, job["sample_prompt"]), generator=g)  # (1, P)
    for use_cache in (True, False):
        model.generate(prompt, 2, use_cache=use_cache)  # warm-up
    outs = {}
    for use_cache in (True, False):
        torch.manual_seed(job["seed"])
        t0 = time.perf_counter()
        outs[use_cache] = model.generate(prompt, job["sample_tokens"], use_cache=use_cache)
        dt = time.perf_counter() - t0
        result["cached_s" if use_cache else "uncached_s"] = dt
        log(f"{'with' if use_cache else 'without'} the KV cache: {job['sample_tokens']} tokens in {dt:.2f} s")
    result["speedup"] = result["uncached_s"] / result["cached_s"]
    result["same_tokens"] = bool(torch.equal(outs[True], outs[False]))
    done(result)

# kind "train": forward + backward + AdamW step, AdamW as GPT.configure_optimizers builds it on a CPU
model.train()
trainable = [p for p in params if p.requires_grad]
groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": job["weight_decay"]},
          {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW([gr for gr in groups if gr["params"]], lr=job["learning_rate"],
                              betas=(job["beta1"], job["beta2"]))


def step():
    with ctx:
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


settle()
rss_ready = status("VmRSS")
exact_peak = reset_peak()
with open(job["ready_path"] + ".tmp", "w") as f:  # tells the parent the steps start now (for max_s)
    json.dump({"t": time.time(), "rss_start": rss_start, "exact_peak": exact_peak}, f)
os.replace(job["ready_path"] + ".tmp", job["ready_path"])
times, losses = [], []
n = job["warmup"] + job["steps"]
for i in range(n):
    t0 = time.perf_counter()
    try:
        losses.append(step())
    except Exception as e:
        if job["side"] == "ours" or i > 0:
            raise
        done({"na": f"HF peft fails on the first step: {type(e).__name__}: {str(e).strip().split('. ')[0][:200]}"})
    dt = time.perf_counter() - t0
    if i >= job["warmup"]:
        times.append(dt)
    log(f"{'warmup' if i < job['warmup'] else 'step'} {i + 1}/{n}: {dt * 1000:.0f} ms, loss {losses[-1]:.4f}")
peak = status("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result.update(
    ms=1000 * statistics.median(times), step_ms=[1000 * t for t in times],
    tokens_per_s=B * T / statistics.median(times), loss=losses[0], peak_exact=exact_peak,
    peak_mb=(peak - rss_start) / 1024, ready_mb=(rss_ready - rss_start) / 1024)
done(result)
'''


# -----------------------------------------------------------------------------
# the parent: plan the measurements, run each in its own process, print the tables


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
    return {
        "cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
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
    """Runs measurements one after another, each in a fresh process, and keeps every result."""

    def __init__(self, workdir, base_dir, total):
        self.workdir, self.base_dir, self.total = workdir, base_dir, total
        self.results, self.done, self.t0 = [], {}, time.time()

    def __call__(self, label, side="ours", kind="train", peft_cfg=None, hf_cfg=None, autocast=False, merge=False,
                 variants=None):
        low = autocast or (peft_cfg is not None and peft_cfg.base_dtype == "bfloat16")
        i = len(self.results) + 1
        path = os.path.join(self.workdir, f"job{i}.json")
        job = dict(side=side, kind=kind, base_dir=self.base_dir, autocast=autocast, merge=merge,
                   peft=peft_cfg.asdict() if peft_cfg is not None and side == "ours" else None, hf_peft=hf_cfg,
                   warmup=bf16_warmup if low else warmup, steps=bf16_steps if low else steps,
                   batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, threads=threads, seed=seed,
                   learning_rate=learning_rate, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
                   sample_tokens=sample_tokens, sample_prompt=sample_prompt, variants=variants,
                   ready_path=path + ".ready")
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
        proc = subprocess.Popen([sys.executable, "-I", "-c", WORKER, REPO, path], cwd=self.workdir, env=env,
                                stdout=subprocess.PIPE, text=True)
        res = self.wait(proc, job, bf16_max_s if low else 0)
        res.update(label=label, side=side, kind=kind, method=peft_cfg.method if peft_cfg else "full",
                   autocast="bfloat16" if autocast else None, merged=merge, wall_s=time.time() - t,
                   base_dtype=peft_cfg.base_dtype if peft_cfg else None)
        if "ms" in res:
            b = res.get("bounds", {})
            print(f"    -> {b.get('ms', '')}{res['ms']:.0f} ms/step, {b.get('tokens_per_s', '')}"
                  f"{res['tokens_per_s']:.1f} tokens/s, peak {b.get('peak_mb', '')}{res['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
        elif "variants" in res:
            print("    -> " + ", ".join(f"{v['name']} {v['ms']:.1f} ms" for v in res["variants"]), file=sys.stderr,
                  flush=True)
        elif "speedup" not in res:
            print(f"    -> {why(res)}", file=sys.stderr, flush=True)
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


# numbers that may be bounds: (value, bound), bound '' = measured, '<' = at most, '>' = at least
FLIP = {"": "", "<": ">", ">": "<"}


def num(res, key):
    if res is None or res.get(key) is None:
        return None
    return res[key], res.get("bounds", {}).get(key, "")


def div(a, b):
    """a / b, with what their bounds imply (None when they pull opposite ways)."""
    if a is None or b is None or b[0] == 0:
        return None
    ba, bb = a[1], FLIP[b[1]]
    if ba and bb and ba != bb:
        return None
    return a[0] / b[0], ba or bb


def show(x, spec=".0f", missing="n/a"):
    return missing if x is None else x[1] + format(x[0], spec)


def why(res):
    """What to print instead of a number for a measurement that has none."""
    return res.get("na") or res.get("user_error") or res.get("error") or "n/a"


def short(res):
    """A table cell for a measurement without numbers (the reason is printed under the table)."""
    return "-" if res.get("na") == "-" else "error" if "error" in res else "n/a"


def goal(goals, text, x, op, target):
    """Record a goal 'x op target' (op '>=' or '<='); returns yes / no / unknown (a bound that does not
    decide it) / n/a (not measured)."""
    if x is None:
        met = "n/a"
    else:
        v, b = x
        ok = v >= target if op == ">=" else v <= target
        proves = {"": None, "<": op == "<=", ">": op == ">="}[b]  # a bound proves the goal met, or unmet
        met = "yes" if ok and (b == "" or proves) else "no" if not ok and (b == "" or not proves) else "unknown"
    goals.append({"goal": text, "value": None if x is None else x[0], "bound": None if x is None else x[1],
                  "met": met})
    return met


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_full(run, goals):
    """method=full: ours vs transformers, fp32 and bf16 autocast; sampling with / without the KV cache."""
    rows = {}
    for prec in ("fp32", "bf16") if bf16 else ("fp32",):
        ours = run(f"ours full fine-tuning, {prec}", peft_cfg=peft_config("full"), autocast=prec == "bf16")
        theirs = (run(f"transformers GPT2LMHeadModel full fine-tuning, {prec}", side="hf", autocast=prec == "bf16")
                  if hf else {"na": "--hf=false"})
        rows[prec] = ours, theirs
    samp = None
    if sample_tokens:
        samp = run(f"ours sampling {sample_tokens} tokens with and without the KV cache", kind="sample")

    lines = []
    for prec, (o, t) in rows.items():
        lines.append([prec if prec == "fp32" else "bf16 (autocast)",
                      show(num(o, "tokens_per_s"), ".1f", why(o)), show(num(t, "tokens_per_s"), ".1f", why(t)),
                      show(div(num(o, "tokens_per_s"), num(t, "tokens_per_s")), ".2f"),
                      show(num(o, "peak_mb")), show(num(t, "peak_mb")),
                      show(div(num(o, "peak_mb"), num(t, "peak_mb")), ".2f"),
                      show(num(o, "ms")), show(num(t, "ms")),
                      f"{show(num(o, 'loss'), '.4f')} / {show(num(t, 'loss'), '.4f')}"])
    print(f"\n### Full fine-tuning, train step (batch {batch_size} x {seq_len}), ours vs transformers\n")
    print(table(["precision", "ours tokens/s", "transformers tokens/s", "speed ratio", "ours peak MB",
                 "transformers peak MB", "memory ratio", "ours ms/step", "transformers ms/step",
                 "first loss (ours / transformers)"], lines))
    for prec, (o, t) in rows.items():
        for side, res in (("ours", o), ("transformers", t)):
            if res.get("stopped"):
                print(f"- {prec} {side}: {res['stopped']}: the numbers are bounds")
            if res.get("attn_implementation"):
                print(f"- {prec} {side}: attn_implementation={res['attn_implementation']}")

    o32, t32 = rows["fp32"]
    goal(goals, "full fp32 tokens/s >= 1.1x transformers'", div(num(o32, "tokens_per_s"), num(t32, "tokens_per_s")),
         ">=", 1.1)
    if bf16:
        goal(goals, "full bf16 tokens/s >= 2x our fp32", div(num(rows["bf16"][0], "tokens_per_s"),
                                                               num(o32, "tokens_per_s")), ">=", 2.0)
    goal(goals, "full fp32 peak memory <= 0.8x transformers'", div(num(o32, "peak_mb"), num(t32, "peak_mb")), "<=", 0.8)
    if bf16:
        goal(goals, "full bf16 peak memory <= 0.8x transformers'",
             div(num(rows["bf16"][0], "peak_mb"), num(rows["bf16"][1], "peak_mb")), "<=", 0.8)
    if samp is not None:
        print(f"\n### Sampling {sample_tokens} new tokens (ours, batch 1, prompt {sample_prompt} tokens, fp32)\n")
        if "speedup" in samp:
            same = "yes" if samp["same_tokens"] else "no (random weights: near-tied logits, tiny numeric differences)"
            print(table(["with the KV cache s", "without s", "speedup", "same tokens"],
                        [[f"{samp['cached_s']:.2f}", f"{samp['uncached_s']:.2f}", f"{samp['speedup']:.1f}", same]]))
        else:
            print(why(samp))
        goal(goals, "sampling with the KV cache >= 5x faster than without", num(samp, "speedup"), ">=", 5.0)


def report_methods(run, goals, methods):
    """Adapter methods: ours vs HF peft per method, our full and LoRA steps, bf16 base, merged model."""
    cfgs = {m: peft_config(m) for m in methods}
    lora_cfg = peft_config("lora", targets=cfgs[methods[0]].resolved_targets()) if len(methods) == 1 else cfgs["lora"]
    ours, theirs, notes = {}, {}, {}
    # ours first: a setting that cannot work on this shape (e.g. a block size that does not divide) stops here
    ours[methods[0]] = run(f"ours {methods[0]}, fp32", peft_cfg=cfgs[methods[0]])
    if "user_error" in ours[methods[0]] and len(methods) == 1:
        raise UserError(ours[methods[0]]["user_error"])
    full = run("ours full fine-tuning, fp32", peft_cfg=peft_config("full"))
    lora = ours.get("lora") or run("ours lora (the reference for the ratios), fp32", peft_cfg=lora_cfg)
    for m in methods:
        if m not in ours:
            ours[m] = run(f"ours {m}, fp32", peft_cfg=cfgs[m])
        name, kwargs, notes[m] = hf_peft_config(cfgs[m])
        if not hf:
            theirs[m] = {"na": "--hf=false"}
        elif name is None:
            theirs[m] = {"na": kwargs}
        else:
            theirs[m] = run(f"transformers + HF peft {m}, fp32", side="hf", hf_cfg=[name, kwargs], peft_cfg=cfgs[m])

    rows = []
    listed = [("full", full, {"na": "-"})]
    if "lora" not in methods:
        listed.append(("lora (reference)", lora, {"na": "-"}))
    for m, o, t in listed + [(m, ours[m], theirs[m]) for m in methods]:
        speed, mem = div(num(o, "tokens_per_s"), num(t, "tokens_per_s")), div(num(o, "peak_mb"), num(t, "peak_mb"))
        vs_lora = div(num(o, "ms"), num(lora, "ms"))
        if m == "lora":
            met = ", ".join([
                "speed " + goal(goals, "lora tokens/s >= 1.1x HF peft's", speed, ">=", 1.1),
                "memory " + goal(goals, "lora peak memory <= 0.8x HF peft's", mem, "<=", 0.8),
                "vs full " + goal(goals, "lora step <= 0.75x our full fine-tuning step",
                                  div(num(o, "ms"), num(full, "ms")), "<=", 0.75)])
        elif m in GOAL_VS_LORA:
            lim = GOAL_VS_LORA[m]
            met = goal(goals, f"{m} step <= {lim}x our lora step", vs_lora, "<=", lim) + f" (<= {lim}x lora)"
        else:
            met = "-"  # no goal set (or the reference rows)
        rows.append([m, show(num(o, "trainable"), ","), show(num(o, "ms"), ".0f", short(o)),
                     show(num(t, "ms"), ".0f", short(t)), show(speed, ".2f"), show(num(o, "peak_mb")),
                     show(num(t, "peak_mb"), ".0f", short(t)), show(mem, ".2f"),
                     show(vs_lora, ".2f"), met])
    tg = ", ".join(targets) if targets else "each method's default"
    print(f"\n### Adapter methods, train step (fp32, batch {batch_size} x {seq_len}, r={r}, targets: {tg}), "
          f"ours vs transformers + HF peft\n")
    print(table(["method", "trainable params", "ours ms/step", "HF ms/step", "speed ratio (ours tokens/s / HF)",
                 "ours peak MB", "HF peak MB", "memory ratio (ours / HF)", "step time / our lora", "goal met?"], rows))
    for m in methods:
        for side, res in (("ours", ours[m]), ("HF", theirs[m])):
            if "ms" not in res:
                print(f"- {m}, {side}: {why(res)}")
            elif res.get("stopped"):
                print(f"- {m}, {side}: {res['stopped']}: the numbers are bounds")
        if notes.get(m):
            print(f"- {m}: {notes[m]}")
        if theirs[m].get("loss") is not None and ours[m].get("loss") is not None:
            print(f"- {m}: first-step loss ours {ours[m]['loss']:.4f}, HF {theirs[m]['loss']:.4f}")

    # bf16 base: the method of a single-method run, else lora
    bm = methods[0] if len(methods) == 1 else "lora"
    if bf16:
        low = run(f"ours {bm} with a bf16 base, fp32 adapters", peft_cfg=replace(cfgs[bm], base_dtype="bfloat16"))
        tps = num(low, "tokens_per_s")
        print(f"\n### {bm} with the frozen base stored in bf16 (adapters and AdamW in fp32)\n")
        print(table(["config", "ms/step", "tokens/s", "peak MB", "tokens/s / HF peft fp32", "tokens/s / our fp32"],
                    [[f"ours {bm}, bf16 base", show(num(low, "ms"), ".0f", why(low)), show(tps, ".1f"),
                      show(num(low, "peak_mb")), show(div(tps, num(theirs[bm], "tokens_per_s")), ".2f"),
                      show(div(tps, num(ours[bm], "tokens_per_s")), ".2f")]]))
        if low.get("stopped"):
            print(f"- {low['stopped']}: the numbers are bounds")
        if bm == "lora":
            goal(goals, "lora with a bf16 base >= 2.5x HF peft's fp32 tokens/s",
                 div(tps, num(theirs[bm], "tokens_per_s")), ">=", 2.5)

    if forward:
        variants = [["plain base", None, False], [f"{bm}, not merged", cfgs[bm].asdict(), False],
                    [f"{bm}, merged", cfgs[bm].asdict(), True]]
        res = run(f"ours: plain base, {bm} adapters, {bm} merged, forward, taking turns", kind="forward",
                  variants=variants)
        print(f"\n### Forward (no grad, batch {batch_size} x {seq_len}, fp32, one process, the models taking "
              f"turns): a merged model runs at the base model's speed\n")
        if "variants" not in res:
            print(why(res))
            goal(goals, f"merged {bm} forward >= 0.95x the base's tokens/s", None, ">=", 0.95)
            return
        base, _, merged = res["variants"]
        print(table(["model", "ms/forward", "tokens/s", "tokens/s / base's"],
                    [[v["name"], f"{v['ms']:.1f}", f"{v['tokens_per_s']:.1f}",
                      f"{v['tokens_per_s'] / base['tokens_per_s']:.3f}"] for v in res["variants"]]))
        goal(goals, f"merged {bm} forward >= 0.95x the base's tokens/s (the same speed, within noise)",
             (merged["tokens_per_s"] / base["tokens_per_s"], ""), ">=", 0.95)


def count_jobs(methods):
    """How many measurement processes this run starts (for the progress lines)."""
    n = 0
    if method in ("full", "all"):
        n += (2 if hf else 1) * (2 if bf16 else 1) + (1 if sample_tokens else 0)
    if methods:
        n += (0 if method == "all" else 1) + (0 if "lora" in methods else 1)  # our full step (shared), our lora
        for m in methods:
            n += 1 + (1 if hf and hf_peft_config(peft_config(m))[0] else 0)
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
    if info["load_average"] and info["load_average"][0] > 0.5 * (info["cores"] or 1):
        print(f"warning: the machine is busy (load average {info['load_average'][0]:.1f} over {info['cores']} "
              f"cores): the timings will be noisy and slow")
    print(f"shape: n_layer={n_layer} n_head={n_head} n_embd={n_embd} vocab_size={vocab_size}, batch {batch_size} x "
          f"{seq_len} tokens, dropout 0; {warmup} warmup + {steps} timed steps (bf16: {bf16_warmup} + {bf16_steps}, "
          f"stopped after {bf16_max_s} s); AdamW lr={learning_rate} wd={weight_decay} betas=({beta1}, {beta2})")
    print("ms/step = median of the timed steps; peak MB = max RSS during the steps minus RSS after the imports "
          "(weights + grads + AdamW state + activations), each measurement in its own process; "
          "'<' / '>' mark bounds from a stopped measurement")
    sys.stdout.flush()
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        torch.manual_seed(seed)
        base_dir = os.path.join(workdir, "base")
        gpt = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=0.0))
        hf_gpt2.save(gpt, base_dir)  # both sides load these weights
        del gpt
        run = Runner(workdir, base_dir, count_jobs(methods))
        goals = []
        if method in ("full", "all"):
            report_full(run, goals)
        if methods:
            report_methods(run, goals, methods)
    print("\n### Goals\n")
    if not goals:
        print("(the spec sets no goal for this configuration)")
    print(table(["goal", "measured", "met?"],
                [[g["goal"], show(None if g["value"] is None else (g["value"], g["bound"]), ".3f"), g["met"]]
                 for g in goals]))
    if info["native_bf16"] is False and bf16:
        print("\nnote: this CPU has no bf16 matmul instructions (avx512_bf16 / amx_bf16): bf16 matmuls are "
              "emulated and far slower than fp32, so the bf16 goals (which assume hardware bf16) cannot be met here.")
    if any(res.get("peak_exact") is False for res in run.results):
        print("note: this system refused to reset the RSS high-water mark: some peaks are whole-process "
              "ru_maxrss (loading transients included)")
    total = time.time() - t_start
    print(f"\ntotal time {total:.0f} s")
    if out:
        outputs.write_json(out, {"machine": info, "settings": config, "results": run.results, "goals": goals,
                                 "total_s": total})
        print(f"wrote {out}")
