"""
bench.py's tables and goals: each report asks `run` (bench.py's Runner) for the measurements it needs,
one process each (bench_worker.py), prints them as Markdown tables, and records every goal as
yes / no / unknown (a bound that cannot decide it) / n/a (not measured).

`s` is bench.py's settings (its config keys as attributes, plus `cuda`: the GPU protocol, where every
train step runs under bf16 autocast, and `peak_flops`: the device's bf16 peak for MFU, or None).
The goals are issue #13's: on a GPU, with and without torch.compile; on a CPU, the earlier CPU goals.
What a method is measured against (its HF peft counterpart) and its step-time goal relative to LoRA
come from its layer class (hf_peft_counterpart, bench_goal_vs_lora), and the method those ratios are
relative to is peft.BENCH_REFERENCE: this file names no method.
"""

from dataclasses import replace

import peft
from errors import UserError

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


def mfu(res):
    return f"{100 * res['mfu']:.1f}%" if res.get("mfu") is not None else "n/a"


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


def fullgraph_goal(goals, name, res):
    """--compile=true: did our model compile in one graph (fullgraph=True)?"""
    if "fullgraph" in res:
        met = "yes" if res["fullgraph"] else "no"
        goals.append({"goal": f"ours {name} compiles with fullgraph=True (no graph break)", "value": None,
                      "bound": None, "met": met})
        if not res["fullgraph"]:
            print(f"- {name}, ours: graph break: {res.get('fullgraph_error')}")


def memory_goal(s):
    """The peak-memory goal relative to the reference library: issue #13 on a GPU, the CPU goal otherwise."""
    return 0.8 if s.compile or not s.cuda else 0.7


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_full(s, run, goals, peft_config):
    """method=full: ours vs transformers (fp32 and bf16 autocast; on a GPU bf16 autocast only), and
    sampling with / without the KV cache."""
    rows = {}
    for prec in ("bf16",) if s.cuda else ("fp32", "bf16") if s.bf16 else ("fp32",):
        ours = run(f"ours full fine-tuning, {prec}", peft_cfg=peft_config("full"), autocast=prec == "bf16")
        theirs = (run(f"transformers GPT2LMHeadModel full fine-tuning, {prec}", side="hf", autocast=prec == "bf16")
                  if s.hf else {"na": "--hf=false"})
        rows[prec] = ours, theirs
    samp = None
    if s.sample_tokens:
        samp = run(f"ours sampling {s.sample_tokens} tokens with and without the KV cache", kind="sample")

    lines = []
    for prec, (o, t) in rows.items():
        lines.append([prec if prec == "fp32" else "bf16 (autocast)",
                      show(num(o, "tokens_per_s"), ".1f", why(o)), show(num(t, "tokens_per_s"), ".1f", why(t)),
                      show(div(num(o, "tokens_per_s"), num(t, "tokens_per_s")), ".2f"),
                      show(num(o, "peak_mb")), show(num(t, "peak_mb")),
                      show(div(num(o, "peak_mb"), num(t, "peak_mb")), ".2f"),
                      show(num(o, "ms")), show(num(t, "ms")),
                      f"{show(num(o, 'loss'), '.4f')} / {show(num(t, 'loss'), '.4f')}"]
                     + ([f"{mfu(o)} / {mfu(t)}"] if s.cuda else []))
    print(f"\n### Full fine-tuning, train step (batch {s.batch_size} x {s.seq_len}{s.compiled}), ours vs transformers\n")
    print(table(["precision", "ours tokens/s", "transformers tokens/s", "speed ratio", "ours peak MB",
                 "transformers peak MB", "memory ratio", "ours ms/step", "transformers ms/step",
                 "first loss (ours / transformers)"] + (["MFU (ours / transformers)"] if s.cuda else []), lines))
    for prec, (o, t) in rows.items():
        for side, res in (("ours", o), ("transformers", t)):
            if res.get("stopped"):
                print(f"- {prec} {side}: {res['stopped']}: the numbers are bounds")
            if res.get("attn_implementation"):
                print(f"- {prec} {side}: attn_implementation={res['attn_implementation']}")
        fullgraph_goal(goals, f"full, {prec}", o)

    if s.cuda:  # issue #13
        o, t = rows["bf16"]
        if s.compile:
            goal(goals, "full tokens/s >= 1.3x transformers' (compiled)",
                 div(num(o, "tokens_per_s"), num(t, "tokens_per_s")), ">=", 1.3)
        goal(goals, f"full peak memory <= {memory_goal(s)}x transformers'", div(num(o, "peak_mb"), num(t, "peak_mb")),
             "<=", memory_goal(s))
    else:
        o32, t32 = rows["fp32"]
        goal(goals, "full fp32 tokens/s >= 1.1x transformers'",
             div(num(o32, "tokens_per_s"), num(t32, "tokens_per_s")), ">=", 1.1)
        if s.bf16:
            goal(goals, "full bf16 tokens/s >= 2x our fp32", div(num(rows["bf16"][0], "tokens_per_s"),
                                                                   num(o32, "tokens_per_s")), ">=", 2.0)
        goal(goals, "full fp32 peak memory <= 0.8x transformers'", div(num(o32, "peak_mb"), num(t32, "peak_mb")),
             "<=", 0.8)
        if s.bf16:
            goal(goals, "full bf16 peak memory <= 0.8x transformers'",
                 div(num(rows["bf16"][0], "peak_mb"), num(rows["bf16"][1], "peak_mb")), "<=", 0.8)
    if samp is not None:
        print(f"\n### Sampling {s.sample_tokens} new tokens (ours, batch 1, prompt {s.sample_prompt} tokens, fp32)\n")
        if "speedup" in samp:
            same = "yes" if samp["same_tokens"] else "no (random weights: near-tied logits, tiny numeric differences)"
            print(table(["with the KV cache s", "without s", "speedup", "same tokens"],
                        [[f"{samp['cached_s']:.2f}", f"{samp['uncached_s']:.2f}", f"{samp['speedup']:.1f}", same]]))
        else:
            print(why(samp))
        goal(goals, "sampling with the KV cache >= 5x faster than without", num(samp, "speedup"), ">=", 5.0)


def report_methods(s, run, goals, peft_config, methods):
    """Adapter methods: ours vs HF peft per method, our full and LoRA steps, bf16 base, merged model."""
    prec = "bf16 autocast" if s.cuda else "fp32"
    cfgs = {m: peft_config(m) for m in methods}
    ref = peft.BENCH_REFERENCE
    ref_cfg = peft_config(ref, targets=cfgs[methods[0]].resolved_targets()) if len(methods) == 1 else cfgs[ref]
    ours, theirs, notes = {}, {}, {}
    # ours first: a setting that cannot work on this shape (e.g. a block size that does not divide) stops here
    ours[methods[0]] = run(f"ours {methods[0]}, {prec}", peft_cfg=cfgs[methods[0]])
    if "user_error" in ours[methods[0]] and len(methods) == 1:
        raise UserError(ours[methods[0]]["user_error"])
    full = run(f"ours full fine-tuning, {prec}", peft_cfg=peft_config("full"))
    lora = ours.get(ref) or run(f"ours {ref} (the reference for the ratios), {prec}", peft_cfg=ref_cfg)
    for m in methods:
        if m not in ours:
            ours[m] = run(f"ours {m}, {prec}", peft_cfg=cfgs[m])
        name, kwargs, notes[m] = peft.METHODS[m].hf_peft_counterpart(cfgs[m])
        if not s.hf:
            theirs[m] = {"na": "--hf=false"}
        elif name is None:
            theirs[m] = {"na": kwargs}
        else:
            theirs[m] = run(f"transformers + HF peft {m}, {prec}", side="hf", hf_cfg=[name, kwargs], peft_cfg=cfgs[m])

    rows = []
    listed = [("full", full, {"na": "-"})]
    if ref not in methods:
        listed.append((f"{ref} (reference)", lora, {"na": "-"}))
    for m, o, t in listed + [(m, ours[m], theirs[m]) for m in methods]:
        speed, mem = div(num(o, "tokens_per_s"), num(t, "tokens_per_s")), div(num(o, "peak_mb"), num(t, "peak_mb"))
        vs_lora = div(num(o, "ms"), num(lora, "ms"))
        lim = peft.METHODS[m].bench_goal_vs_lora if m in peft.METHODS and peft.METHODS[m] else None
        if m == ref and s.cuda:  # issue #13
            met = ["memory " + goal(goals, f"{m} peak memory <= {memory_goal(s)}x HF peft's", mem, "<=", memory_goal(s))]
            if s.compile:
                met.insert(0, "speed " + goal(goals, f"{m} tokens/s >= 1.5x HF peft's (compiled)", speed, ">=", 1.5))
            met = ", ".join(met)
        elif m == ref:
            met = ", ".join([
                "speed " + goal(goals, f"{m} tokens/s >= 1.1x HF peft's", speed, ">=", 1.1),
                "memory " + goal(goals, f"{m} peak memory <= 0.8x HF peft's", mem, "<=", 0.8),
                "vs full " + goal(goals, f"{m} step <= 0.75x our full fine-tuning step",
                                  div(num(o, "ms"), num(full, "ms")), "<=", 0.75)])
        elif lim is not None:
            met = goal(goals, f"{m} step <= {lim}x our {ref} step", vs_lora, "<=", lim) + f" (<= {lim}x {ref})"
        else:
            met = "-"  # no goal set (or the reference rows)
        rows.append([m, show(num(o, "trainable"), ","), show(num(o, "ms"), ".0f", short(o)),
                     show(num(t, "ms"), ".0f", short(t)), show(speed, ".2f"), show(num(o, "peak_mb")),
                     show(num(t, "peak_mb"), ".0f", short(t)), show(mem, ".2f"),
                     show(vs_lora, ".2f")] + ([f"{mfu(o)} / {mfu(t)}"] if s.cuda else []) + [met])
    tg = ", ".join(s.targets) if s.targets else "each method's default"
    print(f"\n### Adapter methods, train step ({prec}{s.compiled}, batch {s.batch_size} x {s.seq_len}, r={s.r}, "
          f"targets: {tg}), ours vs transformers + HF peft\n")
    print(table(["method", "trainable params", "ours ms/step", "HF ms/step", "speed ratio (ours tokens/s / HF)",
                 "ours peak MB", "HF peak MB", "memory ratio (ours / HF)", f"step time / our {ref}"]
                + (["MFU (ours / HF)"] if s.cuda else []) + ["goal met?"], rows))
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
        fullgraph_goal(goals, m, ours[m])

    # bf16 base: the method of a single-method run, else the reference
    bm = methods[0] if len(methods) == 1 else ref
    if s.bf16:
        low = run(f"ours {bm} with a bf16 base, fp32 adapters", peft_cfg=replace(cfgs[bm], base_dtype="bfloat16"))
        tps = num(low, "tokens_per_s")
        print(f"\n### {bm} with the frozen base stored in bf16 (adapters and AdamW in fp32{', bf16 autocast' * s.cuda})\n")
        print(table(["config", "ms/step", "tokens/s", "peak MB", f"tokens/s / HF peft {prec}",
                     "tokens/s / ours, fp32 base", "peak MB / ours, fp32 base"],
                    [[f"ours {bm}, bf16 base", show(num(low, "ms"), ".0f", why(low)), show(tps, ".1f"),
                      show(num(low, "peak_mb")), show(div(tps, num(theirs[bm], "tokens_per_s")), ".2f"),
                      show(div(tps, num(ours[bm], "tokens_per_s")), ".2f"),
                      show(div(num(low, "peak_mb"), num(ours[bm], "peak_mb")), ".2f")]]))
        if low.get("stopped"):
            print(f"- {low['stopped']}: the numbers are bounds")
        if bm == ref and s.cuda:  # issue #13: storing the base in bf16 must pay off under autocast
            goal(goals, f"{ref} with a bf16 base >= the fp32 base's tokens/s", div(tps, num(ours[bm], "tokens_per_s")),
                 ">=", 1.0)
            goal(goals, f"{ref} with a bf16 base peak memory <= 0.8x the fp32 base's",
                 div(num(low, "peak_mb"), num(ours[bm], "peak_mb")), "<=", 0.8)
        elif bm == ref:
            goal(goals, f"{ref} with a bf16 base >= 2.5x HF peft's fp32 tokens/s",
                 div(tps, num(theirs[bm], "tokens_per_s")), ">=", 2.5)

    if s.forward:
        variants = [["plain base", None, False], [f"{bm}, not merged", cfgs[bm].asdict(), False],
                    [f"{bm}, merged", cfgs[bm].asdict(), True]]
        res = run(f"ours: plain base, {bm} adapters, {bm} merged, forward, taking turns", kind="forward",
                  variants=variants)
        print(f"\n### Forward (no grad, batch {s.batch_size} x {s.seq_len}, fp32, one process, the models taking "
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
