"""
One bench.py measurement, in its own fresh process:

    python -I bench_worker.py REPO JOB.json      # bench.py starts it so, in a scratch folder

JOB.json says what to measure (bench.py's Runner writes it): whose model ("side": "ours" or "hf"),
what ("kind": "train", "sample" or "forward"), the shape, the batch, the optimizer, the device. The
result is one stdout line `BENCH_RESULT {json}`; progress goes to stderr.

The two sides must not see each other's `peft`: this repo's peft/ folder shadows Hugging Face's
package of the same name. So before anything imports peft, use_side() takes the repo off sys.path
(for "hf", whatever put it there: the script's own folder when started without -I, the current
folder, PYTHONPATH) or puts it first (for "ours"), and the hf side checks where its peft came from.

Numbers (bench.py's docstring says how to read them):
- ms/step: the median wall time of the timed steps after `warmup` untimed ones (on CUDA the device is
  synchronised before and after each step).
- peak MB on a CPU: the highest resident set size during the steps minus the RSS after the imports,
  both read after gc + malloc_trim, with the high-water mark reset once the model and optimizer are
  built (/proc/self/clear_refs; where that is refused, ru_maxrss, and the result says so).
- peak MB on CUDA: torch.cuda.max_memory_allocated() during the steps, its counter reset once the
  model and optimizer are built: weights, gradients, AdamW state, activations (not the allocator's
  cached blocks).
"""

import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings


def use_side(repo, side):
    """sys.path for one side: the repo first ("ours"), or nowhere on it ("hf"), so that `import peft`
    finds this repo's peft/ or Hugging Face's package."""
    repo = os.path.abspath(repo)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != repo]  # "" is the current folder
    if side == "ours":
        sys.path.insert(0, repo)


def log(msg):
    print(f"    {msg}", file=sys.stderr, flush=True)


def done(result):
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    sys.exit(0)


def first_words(e):
    """A short reason from an exception: its type and first sentence."""
    return f"{type(e).__name__}: {str(e).strip().split('. ')[0][:200]}"


# -----------------------------------------------------------------------------
# CPU memory: the resident set size of this process

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


# -----------------------------------------------------------------------------

def main(repo, job_path):
    with open(job_path) as f:
        job = json.load(f)
    use_side(repo, job["side"])
    warnings.filterwarnings("ignore")
    import torch
    if job["threads"] > 0:
        torch.set_num_threads(job["threads"])
    if job["side"] == "ours":
        import hf_gpt2
        import peft
        from errors import UserError
    else:
        import peft
        import transformers
        from transformers import GPT2LMHeadModel
        here = os.path.dirname(os.path.abspath(peft.__file__))
        assert here != os.path.join(os.path.abspath(repo), "peft"), f"got the repo's peft/ ({here})"
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    device = job["device"]
    cuda = device == "cuda"

    def sync():  # CUDA runs asynchronously: a wall time needs the device to have finished
        if cuda:
            torch.cuda.synchronize()

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
    x = torch.randint(V, (B, T), generator=g).to(device)  # (B, T) inputs
    y = torch.randint(V, (B, T), generator=g).to(device)  # (B, T) targets
    result = {"threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if job["side"] == "hf":
        result["hf_peft_file"] = peft.__file__

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
        return model.to(device)

    if job["kind"] == "forward":  # ours only: no-grad forwards of several models, taking turns, so that a
        # change in the machine's load hits them alike
        models = [(name, build_ours(p, merge).eval()) for name, p, merge in job["variants"]]
        times, last = {name: [] for name, _ in models}, {}
        n = job["warmup"] + job["steps"]
        for i in range(n):
            for name, model in models:
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(x, y)
                sync()
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

        def loss_of(m):
            return m(x, y, return_logits=False)[1]  # train.py's call: the loss without the logits
    else:
        model = GPT2LMHeadModel.from_pretrained(job["base_dir"], dtype=torch.float32, attn_implementation="sdpa")
        result["attn_implementation"] = model.config._attn_implementation
        if job["hf_peft"] is not None:
            name, kwargs = job["hf_peft"]
            try:
                model = peft.get_peft_model(model, getattr(peft, name)(**kwargs))
            except Exception as e:
                done({"na": f"HF peft refuses it: {first_words(e)}"})
        model = model.to(device)

        def loss_of(m):  # the same cross-entropy as ours: no shift, every position
            return m(input_ids=x, labels=y, shift_labels=y).loss

    params = list(model.parameters())  # a tied weight once
    result["trainable"] = sum(p.numel() for p in params if p.requires_grad)
    result["total"] = sum(p.numel() for p in params)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if job["autocast"] else contextlib.nullcontext()

    if job["kind"] == "sample":  # ours only: generate with and without the KV cache
        model.eval()
        prompt = torch.randint(V, (1, job["sample_prompt"]), generator=g).to(device)  # (1, P)
        for use_cache in (True, False):
            model.generate(prompt, 2, use_cache=use_cache)  # warm-up
        outs = {}
        for use_cache in (True, False):
            torch.manual_seed(job["seed"])
            sync()
            t0 = time.perf_counter()
            outs[use_cache] = model.generate(prompt, job["sample_tokens"], use_cache=use_cache)
            sync()
            dt = time.perf_counter() - t0
            result["cached_s" if use_cache else "uncached_s"] = dt
            log(f"{'with' if use_cache else 'without'} the KV cache: {job['sample_tokens']} tokens in {dt:.2f} s")
        result["speedup"] = result["uncached_s"] / result["cached_s"]
        result["same_tokens"] = bool(torch.equal(outs[True], outs[False]))
        done(result)

    # kind "train": forward + backward + AdamW step, AdamW as GPT.configure_optimizers builds it (fused on CUDA)
    model.train()
    trainable = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": job["weight_decay"]},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([gr for gr in groups if gr["params"]], lr=job["learning_rate"],
                                  betas=(job["beta1"], job["beta2"]), **(dict(fused=True) if cuda else {}))
    # torch.compile: ours in one graph (fullgraph=True) where it can be, else with graph breaks (the result
    # says why); HF peft's models are compiled as they come (fullgraph=False)
    fullgraph = job["compile"] and job["side"] == "ours"
    forward = torch.compile(model, fullgraph=fullgraph) if job["compile"] else model

    def step():
        with ctx:
            loss = loss_of(forward)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    settle()
    rss_ready = status("VmRSS")
    exact_peak = True if cuda else reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with open(job["ready_path"] + ".tmp", "w") as f:  # tells the parent the steps start now (for max_s)
        json.dump({"t": time.time(), "rss_start": rss_start, "exact_peak": exact_peak and not cuda}, f)
    os.replace(job["ready_path"] + ".tmp", job["ready_path"])
    times, losses = [], []
    n = job["warmup"] + job["steps"]
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        try:
            losses.append(step())
        except Exception as e:
            if i > 0 or not (job["side"] == "hf" or fullgraph):
                raise
            if job["side"] == "hf":
                done({"na": f"HF peft fails on the first step: {first_words(e)}"})
            log(f"fullgraph=True failed ({first_words(e)}); compiling with graph breaks")
            result["fullgraph_error"] = first_words(e)
            torch._dynamo.reset()
            fullgraph, forward = False, torch.compile(model)
            losses.append(step())
        sync()
        dt = time.perf_counter() - t0
        if i >= job["warmup"]:
            times.append(dt)
        log(f"{'warmup' if i < job['warmup'] else 'step'} {i + 1}/{n}: {dt * 1000:.0f} ms, loss {losses[-1]:.4f}")
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = status("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = (peak - rss_start) / 1024
    result.update(
        ms=1000 * statistics.median(times), step_ms=[1000 * t for t in times],
        tokens_per_s=B * T / statistics.median(times), loss=losses[0], peak_exact=exact_peak,
        peak_mb=peak_mb, ready_mb=(rss_ready - rss_start) / 1024)
    if job["compile"]:
        result["fullgraph"] = fullgraph
    done(result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
