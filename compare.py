"""
Compare fine-tuning methods: one command trains a grid of methods on the same data, seed, token
budget and learning-rate schedule, then writes the results table and draws the figures (plots.py).

    python compare.py config/compare_default.py                      # the offline default, ~15 min on 2 CPU cores
    python compare.py config/compare_default.py --assets_dir=assets  # also put the figures in assets/ (README)
    python compare.py config/compare_default.py --plot_only=true     # redraw from results.json
    python compare.py config/compare_default.py --dry_run=true       # check the grid, print the commands
    python compare.py config/compare_sweep.py --assets_dir=assets --assets_name=sweep   # lr sweep + forgetting
    python compare.py config/compare_default.py --device=cuda --out_dir=out-compare-gpu \
        --assets_dir=assets --assets_name=compare_gpu                # the same grid on a GPU
    tensorboard --logdir out-compare                                 # every run's curves

A grid config is plain Python (see config/compare_default.py) that sets
    base_config  the train.py config every run starts from (base model, data, model size)
    common       {train.py key: value} for every run: the token budget, schedule, seed, evals
    runs         [(name, {train.py key: value}), ...]: each run's method and its settings
Each run is `python train.py <base_config> --key=value ...` in its own process, so its peak memory
and time are its own. A run may set only its method's settings (the PEFT keys its method uses,
e.g. r for lora, oft_block_size for oft) and optimizer keys such as its paper's learning_rate,
never the data, budget or schedule, so the runs stay comparable. The PEFT keys of base_config do
not carry over: each run's method settings are exactly its entry (train.py's defaults otherwise).
A run that sets learning_rate but not min_lr gets min_lr scaled by the same factor, so every run
follows the same schedule shape.

Learning-rate sweep: a run whose learning_rate is a list, e.g.
    ("lora3", dict(method="lora", targets=("lora3",), learning_rate=(1e-3, 3e-3, 1e-2)))
becomes one run per rate, named lora3-lr0.001, lora3-lr0.003, lora3-lr0.01, each with min_lr scaled
from common's min_lr / learning_rate (a sweep may not set min_lr). Methods have very different good
rates, so a grid at one rate ranks the rates as much as the methods. The results then name each
entry's best rate (lowest final validation loss) and compare_lr.png draws final val loss against
the rate (log scale), one line per entry.

Learning versus forgetting: with forget_data (a data folder holding val.bin, e.g. milton, the base's
own domain), the base and every finished run are scored with eval.py's perplexity on the first
eval_tokens tokens of the fine-tuning data's val.bin (learned) and of forget_data's (forgot), in
disjoint windows of block_size tokens, adapters merged; compare_forgetting.png draws one against
the other, the base model starred. Scores are kept in grid.json: a re-run scores only new runs.

Output folder (out_dir):
    grid.json           the grid's identity (fingerprints) and each run's measured segments
    results.json        per run: method, settings, train.py command, trainable parameters (count
                        and % of the base, from the checkpoint's params), loss curves, final val
                        loss and perplexity, peak memory, wall time, tokens/s; plus the device and
                        this command
    results.csv         the same numbers, one row per run (results_curves.csv: the curves, long form)
    results.md          the table as Markdown, for the README (with --assets_dir: <assets_name>_results.md)
    compare_curves.png  training and validation loss of every run
    compare_params.png  trainable parameters vs final validation loss
    compare_cost.png    peak memory, wall time and throughput per run
    compare_lr.png      final validation loss vs learning rate, one line per entry (a sweep)
    compare_forgetting.png  perplexity on the fine-tuning data vs on forget_data (with forget_data)
    <run>/              train.py's out_dir: ckpt.safetensors, metrics.jsonl, tb/ (TensorBoard)
    logs/<run>.log      the run's console output

Resume: a run whose checkpoint reached max_iters is skipped, a half-finished one continues with
--init_from=resume, a run without a checkpoint starts over. Ctrl-C stops the current run at the
end of its iteration (train.py saves it); the same command later continues the grid.

Peak memory is the run's process peak resident set size (ru_maxrss from os.wait4: the Python
interpreter, torch and the model, activations and optimizer state), or on CUDA the peak of
torch.cuda.max_memory_allocated when train.py logs it as `cuda_peak_mb` in metrics.jsonl.
Wall time covers the whole process (start-up, model load, evals, checkpoints); tokens/s is the
median of train.py's training throughput (evals excluded).
"""

import csv
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import checkpoint
import configurator
import errors
import outputs
import peft
import plots
from errors import UserError
from peft.config import TRAIN_KEYS, fields_used

errors.install()

# -----------------------------------------------------------------------------
# default config values; the grid itself (base_config, common, runs) comes from a grid config file
base_config = ""  # the train.py config file every run starts from
out_dir = "out-compare"  # the grid's output folder: one sub-folder per run, results, figures
assets_dir = ""  # also put the figures and the table here (e.g. 'assets' for the README)
assets_name = "compare"  # their names there: <assets_name>_curves.png, ..._params.png, ..._cost.png, ..._results.md
device = ""  # '' = as base_config and common say; e.g. 'cuda' runs every run on the GPU
max_runs = 0  # stop after training this many runs (finished runs that are skipped do not count); 0 = all
plot_only = False  # redraw the figures and tables from out_dir/results.json, train nothing
dry_run = False  # check the grid and print each run's train.py command, train nothing
forget_data = ""  # also score every run and the base on this data folder's val.bin (the base's own domain, e.g. 'milton'): learned vs forgot
eval_tokens = 16384  # tokens of each val.bin scored for learned vs forgot (disjoint windows of block_size); 0 = all
runs = ()  # [(name, {train.py key: value}), ...]
# -----------------------------------------------------------------------------
defaults = configurator.defaults_from(globals())
common = {}  # {train.py key: value} for every run (a dict, so added here: defaults_from keeps simple types)
defaults["common"] = common
_ = configurator.ANY
domains = {  # the valid values of every key (configurator's rules), checked before anything runs
    "base_config": configurator.PATH, "out_dir": configurator.PATH, "assets_dir": _, "assets_name": configurator.PATH,
    "device": lambda d: d and configurator.DEVICE(d), "max_runs": ">= 0", "plot_only": _, "dry_run": _, "runs": _,
    "common": _, "forget_data": _, "eval_tokens": ">= 0",
}
config = configurator.configure(defaults, sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))

# what else a run may set on its own: the optimizer (e.g. its paper's learning rate)
OPTIMIZER_KEYS = ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")
# compare.py sets these for every run itself
RESERVED_KEYS = ("out_dir", "overwrite", "eval_only", "tensorboard_log", "always_save_checkpoint", "wandb_run_name")


def fail_in(where, message):
    return UserError(f"{where}: {message}")


def jsonable(value):
    """JSON-ready copy: tuples become lists (so a grid hashes the same whether read back or not)."""
    return json.loads(json.dumps(value))


def sha(obj):
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it or choose another --out_dir") from None


# -----------------------------------------------------------------------------
# the grid: checks that need no training


def check_runs():
    """[(run name, settings, entry name)] from the config's `runs`, with one clear error for each kind
    of mistake. An entry whose learning_rate is a list (a sweep) becomes one run per rate."""
    if not runs:
        raise UserError("no runs: pass a grid config, e.g. python compare.py config/compare_default.py")
    if not isinstance(common, dict):
        raise UserError(f"common is {common!r}; it must be a dict, e.g. --common=\"{{'max_iters': 50, 'seed': 1}}\"")
    grid, seen = [], set()
    for i, entry in enumerate(runs):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict)):
            raise UserError(f"runs[{i}] is {entry!r}; each run is (name, {{train.py key: value}}), "
                            f"e.g. (\"lora1\", {{\"method\": \"lora\", \"targets\": (\"lora1\",)}})")
        name, settings = entry
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_+-]*", name) or name == "logs":
            raise UserError(f"run name '{name}' cannot name a run folder; use letters, digits, _ + and - (and not 'logs')")
        where = f"run '{name}'"
        if "method" not in settings:
            raise fail_in(where, f"no method; add \"method\": one of {', '.join(peft.METHODS)}")
        method = settings["method"]
        if not isinstance(method, str):
            raise fail_in(where, f"method {method!r} must be a string, one of {', '.join(peft.METHODS)}")
        try:
            peft.PeftConfig(method=method)  # an unknown method names the close match
        except UserError as e:
            raise fail_in(where, str(e)) from None
        used = fields_used(method)
        for key in settings:
            field = TRAIN_KEYS.get(key)
            if key == "method" or field is None:
                continue
            if field not in used:
                usable = [k for k, f in TRAIN_KEYS.items() if f in used]
                hint = (f"method '{method}' uses {', '.join(usable)}" if usable else f"method '{method}' has no adapter settings")
                raise fail_in(where, f"{key} does not apply to method '{method}' ({hint}); drop it or pick a method that uses it")
        lr = settings.get("learning_rate")
        if isinstance(lr, (tuple, list)):  # a sweep: one run per learning rate, named <name>-lr<rate>
            if "min_lr" in settings:
                raise fail_in(where, "sets min_lr and a list of learning rates; drop min_lr: each rate's min_lr is "
                                     "scaled from common's min_lr / learning_rate, the same for every run")
            expanded = [(f"{name}-lr{v:g}", dict(settings, learning_rate=v)) for v in check_lrs(where, lr)]
        else:
            if lr is not None:
                check_lrs(where, [lr])
            expanded = [(name, dict(settings))]
        for run_name, run_settings in expanded:
            if run_name in seen:
                raise UserError(f"two runs are named '{run_name}'; give every run its own name")
            seen.add(run_name)
            grid.append((run_name, run_settings, name))
    for key in common:
        if key in TRAIN_KEYS:
            raise UserError(f"common sets {key}, a method setting; set it in each run's entry instead")
        if key in RESERVED_KEYS:
            raise UserError(f"common sets {key}, which compare.py sets for every run itself; drop it")
    return grid


def check_lrs(where, lrs):
    """The learning rates of a run (one, or a sweep's list): positive finite numbers, each once."""
    if not lrs:
        raise fail_in(where, "learning_rate is an empty list; give one rate or several, e.g. (1e-3, 3e-3, 1e-2)")
    seen = set()
    for v in lrs:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise fail_in(where, f"learning_rate {v!r} must be a positive finite number, e.g. 3e-3")
        if f"{v:g}" in seen:
            raise fail_in(where, f"lists learning_rate {v:g} twice; give each rate once")
        seen.add(f"{v:g}")
    return [float(v) for v in lrs]


def fingerprints(grid):
    """What makes results comparable: base config (path and text), common settings and device
    for the whole grid, and each run's own settings."""
    if not os.path.isfile(base_config):
        raise UserError(f"base_config '{base_config}' does not exist; set it to a train.py config, e.g. config/quickstart.py")
    with open(base_config, "rb") as f:
        text = f.read()
    shared = {"base_config": base_config, "base_config_sha256": hashlib.sha256(text).hexdigest()[:16],
              "common": jsonable(common), "device": device}
    return sha(shared), shared, {name: sha(settings) for name, settings, _ in grid}


def check_out_dir(grid):
    """The grid.json this run continues, or a new one; an out_dir holding another grid is an error."""
    grid_fp, shared, run_fps = fingerprints(grid)
    path = os.path.join(out_dir, "grid.json")
    if os.path.isfile(path):
        state = read_json(path)
        if state.get("fingerprint") != grid_fp:
            old = state.get("shared", {})
            diff = [k for k in shared if old.get(k) != shared[k]]
            raise UserError(f"{out_dir} holds the results of a different grid ({', '.join(diff) or 'other settings'} differ); "
                            f"choose another --out_dir, or delete {out_dir} to start over")
        for name, fp in run_fps.items():
            old = state["runs"].get(name)
            if old is not None and old["fingerprint"] != fp and os.path.exists(os.path.join(out_dir, name, checkpoint.CKPT_NAME)):
                raise UserError(f"run '{name}' in {out_dir} was trained with other settings ({old['settings']}); "
                                f"delete {os.path.join(out_dir, name)} to retrain it, or choose another --out_dir")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} exists but holds no grid.json, so it is not a compare.py output folder; choose another --out_dir")
    else:
        state = {"fingerprint": grid_fp, "shared": shared, "runs": {}}
    for name, settings, _ in grid:
        old = state["runs"].get(name)
        if old is None or old["fingerprint"] != run_fps[name]:
            state["runs"][name] = {"fingerprint": run_fps[name], "settings": jsonable(settings), "segments": [], "params": None}
    return state


def train_defaults():
    """train.py's keys, defaults and declared rules, from `train.py --help=json` (configurator's
    machine-readable --help), and the peak RSS of that process: Python and torch loaded, no model (the
    memory figure's baseline)."""
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty stderr cannot block the child
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--help=json"], stdout=subprocess.PIPE,
                             stderr=err, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        err.seek(0)
        stderr_text = err.read()
    if p.returncode != 0:
        raise UserError(f"`python train.py --help=json` failed (exit {p.returncode}): {stderr_text.strip().splitlines()[-1:]}")
    keys, rules = configurator.read_help_json(out)  # a grid is checked against train.py's own rules
    missing = [k for k in list(TRAIN_KEYS) + list(OPTIMIZER_KEYS) + list(RESERVED_KEYS) if k not in keys]
    if missing:
        raise RuntimeError(f"train.py has no key(s) {', '.join(missing)}; compare.py and train.py disagree")
    return keys, rules, maxrss_mb(usage)


def maxrss_mb(usage):
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def arg(value):
    """A value as train.py's --key=value text (configurator.convert reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def set_key(cfg, keys, key, value, where):
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; `python train.py --help` lists the keys"
        raise fail_in(where, f"unknown train.py key '{key}'{hint}")
    cfg[key] = configurator.check_type(key, value, keys[key], f"in {where}")


def resolve(grid, keys, rules):
    """Each run's complete train.py config and the command line that gives exactly it."""
    base = configurator.configure(keys, [base_config], rules)
    shared = dict(base)
    for key in TRAIN_KEYS:  # method settings come from each run's entry, not from base_config
        shared[key] = keys[key]
    for key, value in common.items():
        set_key(shared, keys, key, value, "common")
    if device:
        shared["device"] = device
    if shared["init_from"] == "resume":
        raise UserError(f"init_from='resume' (from {base_config} or common): compare.py resumes unfinished runs by itself; "
                        f"set init_from to the base model, e.g. gpt2 or models/gpt2-milton")
    plans = []
    for name, settings, group in grid:
        where = f"run '{name}'"
        cfg = dict(shared)
        for key, value in settings.items():
            if key in keys and key not in TRAIN_KEYS and key not in OPTIMIZER_KEYS:
                raise fail_in(where, f"{key} must be the same for every run (same data, budget, schedule and evals); "
                                     f"set it in common: a run sets only its method's settings and {', '.join(OPTIMIZER_KEYS)}")
            set_key(cfg, keys, key, value, where)
        if "learning_rate" in settings and "min_lr" not in settings:
            cfg["min_lr"] = float(f"{cfg['learning_rate'] * shared['min_lr'] / shared['learning_rate']:.12g}")
        try:
            for key, value in cfg.items():  # train.py's declared valid values, before any run starts
                configurator.check(key, value, rules[key])
            peft.PeftConfig.from_train_config(cfg)
        except UserError as e:
            raise fail_in(where, str(e)) from None
        cfg["out_dir"] = os.path.join(out_dir, name)
        cfg["tensorboard_log"] = True
        cfg["always_save_checkpoint"] = True  # a checkpoint at every eval: the run can resume
        if cfg["wandb_log"]:
            cfg["wandb_run_name"] = name
        args = [base_config] + [f"--{k}={arg(v)}" for k, v in cfg.items() if v != base[k]]
        if configurator.configure(keys, args, rules) != cfg:  # the command line must give exactly this config
            raise RuntimeError(f"run '{name}': the train.py arguments {args} do not reproduce its config")
        plans.append({"name": name, "group": group, "settings": settings, "config": cfg, "args": args})
    return plans


# -----------------------------------------------------------------------------
# running: one train.py process per run

stop = []  # signals received: stop after the current run
child = None  # the running train.py


def on_signal(signum, frame):
    """Ctrl-C / SIGTERM: pass it on to train.py, which saves a checkpoint and exits; then stop."""
    stop.append(signum)
    if child is not None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def run_train(plan, resume):
    """Run train.py for one run; return (exit code, wall s, peak RSS MB, console output)."""
    global child
    name = plan["name"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + plan["args"] + (["--init_from=resume"] if resume else [])
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    lines = []
    with open(os.path.join(out_dir, "logs", f"{name}.log"), "a" if resume else "w", buffering=1) as log:  # line by line
        log.write(f"$ {shlex.join(cmd)}\n")
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in child.stdout:  # the run's output, live and into its log
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        _, status, usage = os.wait4(child.pid, 0)  # its own rusage: ru_maxrss is this process's peak
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        child.stdout.close()
    rc, child = child.returncode, None
    return rc, wall, maxrss_mb(usage), "".join(lines)


def run_status(plan):
    """'done', 'resume' (a checkpoint short of max_iters) or 'fresh'."""
    path = os.path.join(plan["config"]["out_dir"], checkpoint.CKPT_NAME)
    if not os.path.isfile(path):
        return "fresh", 0
    it = checkpoint.read_meta(path)["iter_num"]
    return ("done" if it >= plan["config"]["max_iters"] else "resume"), it


def run_params(plan):
    """{"trainable": n, "total": n} as train.py recorded them in the run's checkpoint, or None (no
    checkpoint yet, or one written before train.py recorded them: grid.json then keeps what it has)."""
    path = os.path.join(plan["config"]["out_dir"], checkpoint.CKPT_NAME)
    return checkpoint.read_meta(path).get("params") if os.path.isfile(path) else None


def start_fresh(plan, record):
    """A run without a checkpoint starts over: drop the curves and event files of an earlier start."""
    run_dir = plan["config"]["out_dir"]
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    tb = os.path.join(run_dir, "tb")
    for name in os.listdir(tb) if os.path.isdir(tb) else ():  # train.py's event files; never a recursive delete
        if name.startswith("events.out.tfevents."):
            os.remove(os.path.join(tb, name))
    record["segments"], record["params"] = [], None
    record.pop("eval", None)


def train_grid(plans, state):
    """Train every unfinished run in grid order. Returns a line saying why it stopped early, or None."""
    grid_json = os.path.join(out_dir, "grid.json")
    trained = 0
    for i, plan in enumerate(plans):
        name, cfg = plan["name"], plan["config"]
        record = state["runs"][name]
        status, it = run_status(plan)
        if status == "done":
            print(f"[{i + 1}/{len(plans)}] {name}: finished earlier ({it} iters), skipped")
            continue
        if stop:
            return "interrupted"
        if max_runs and trained >= max_runs:
            return f"stopped after max_runs={max_runs}"
        if status == "fresh":
            start_fresh(plan, record)
        what = f"resuming at iter {it}" if status == "resume" else "training"
        print(f"[{i + 1}/{len(plans)}] {name}: {what} (method {cfg['method']}, learning_rate {cfg['learning_rate']:g})")
        rc, wall, rss, output = run_train(plan, resume=status == "resume")
        end_status, end_it = run_status(plan)
        record["segments"].append({"from_iter": it, "to_iter": end_it, "wall_s": round(wall, 2),
                                   "peak_rss_mb": round(rss, 1), "exit_code": rc})
        record.pop("eval", None)  # new weights: score them again
        record["params"] = run_params(plan) or record["params"]
        outputs.write_json(grid_json, state)
        trained += 1
        log = os.path.join(out_dir, "logs", f"{name}.log")
        if stop:
            return "interrupted"
        if rc == 2:
            msg = next((ln[len("error: "):] for ln in reversed(output.splitlines()) if ln.startswith("error: ")), "see its log")
            raise UserError(f"run '{name}' stopped: {msg} (its output: {log})")
        if rc != 0 or end_status != "done":
            print(f"error: run '{name}' crashed (exit code {rc}); its output is above and in {log}", file=sys.stderr)
            sys.exit(1)
    return None


# -----------------------------------------------------------------------------
# learned vs forgot: eval.py's perplexity of each finished run (and of the base) on the fine-tuning
# data's val.bin and on forget_data's val.bin (the base's own domain)


def eval_data(plans):
    """{'learned': dataset, 'forgot': dataset} as eval.load_dataset reads them (the first eval_tokens
    tokens of each val.bin), or None without forget_data. Checked before any training."""
    if not forget_data:
        return None
    if eval_tokens < 0 or eval_tokens == 1:
        raise UserError(f"eval_tokens={eval_tokens} must be 0 (all) or at least 2 tokens, e.g. 16384")
    from eval import load_dataset
    data = {}
    for kind, spec in (("learned", plans[0]["config"]["dataset"]), ("forgot", forget_data)):
        ds = load_dataset(spec)  # one clear line if the folder or its val.bin is missing
        if ds["kind"] != "ppl":
            raise UserError(f"forget_data='{forget_data}': give a data folder holding val.bin, e.g. milton")
        if eval_tokens:
            ds["docs"] = [d[:eval_tokens] for d in ds["docs"]]
        data[kind] = ds
    return data


def evaluate(plans, state, data):
    """Score every finished run not scored yet (and the base) on both datasets; kept in grid.json."""
    from eval import load_for_eval, perplexity
    cfg = plans[0]["config"]
    W = cfg["block_size"]
    key = sha({"learned": data["learned"]["source"], "forgot": data["forgot"]["source"], "eval_tokens": eval_tokens,
               "block_size": W})

    def score(source, record, label):
        if record.get("eval", {}).get("key") == key:
            return
        t0 = time.perf_counter()
        model, _ = load_for_eval(source, cfg["device"])
        record["eval"] = {"key": key, **{kind: perplexity(model, ds["docs"], W, W, batch_size=8, device=cfg["device"])
                                         for kind, ds in data.items()}}
        outputs.write_json(os.path.join(out_dir, "grid.json"), state)
        print(f"{label}: {data['learned']['name']} ppl {record['eval']['learned']['ppl']:.2f}, "
              f"{data['forgot']['name']} ppl {record['eval']['forgot']['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")

    score(cfg["init_from"], state.setdefault("base", {}), f"base {cfg['init_from']}")
    for plan in plans:
        if run_status(plan)[0] == "done":
            score(plan["config"]["out_dir"], state["runs"][plan["name"]], plan["name"])


# -----------------------------------------------------------------------------
# results: from each run's metrics.jsonl and its measured segments


def read_metrics(path):
    """(evals {iter: row}, steps {iter: row}); a resumed run repeats some iters: the last row wins."""
    evals, steps = {}, {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "val/loss" in row:
                evals[row["iter"]] = row
            if "train/loss_step" in row:
                steps[row["iter"]] = row
    return dict(sorted(evals.items())), dict(sorted(steps.items()))


def device_name(cfg):
    if cfg["device"].startswith("cuda"):
        import torch
        return f"GPU: {torch.cuda.get_device_name(cfg['device'])}"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model or 'unknown model'}, {cores} cores"


def collect(plans, state, baseline_mb, data):
    rows, missing = [], []
    for plan in plans:
        name, cfg = plan["name"], plan["config"]
        record = state["runs"][name]
        if run_status(plan)[0] != "done":
            missing.append(name)
            continue
        evals, steps = read_metrics(os.path.join(cfg["out_dir"], "metrics.jsonl"))
        last = evals[max(evals)]
        segs = record["segments"]
        cuda_peak = [r["cuda_peak_mb"] for r in list(evals.values()) + list(steps.values()) if "cuda_peak_mb" in r]
        params = record["params"] or {}
        trainable, total = params.get("trainable"), params.get("total")
        base_params = None if total is None else (total if cfg["method"] == "full" else total - trainable)
        tok_s = [r["tok_per_s"] for r in steps.values() if "tok_per_s" in r]
        rows.append({
            "name": name, "group": plan["group"], "method": cfg["method"], "quantize": cfg["quantize"] or None,
            "settings": jsonable(plan["settings"]), "learning_rate": cfg["learning_rate"],
            "command": shlex.join(["python", "train.py"] + plan["args"]),
            "trainable_params": trainable, "total_params": total, "base_params": base_params,
            "trainable_pct": None if trainable is None else round(100 * trainable / base_params, 4),
            "final_val_loss": round(last["val/loss"], 4), "final_val_ppl": round(math.exp(last["val/loss"]), 2),
            "final_train_loss": round(last["train/loss"], 4),
            "best_val_loss": round(min(r["val/loss"] for r in evals.values()), 4),
            "peak_mem_mb": round(max(cuda_peak), 1) if cuda_peak else (max(s["peak_rss_mb"] for s in segs) if segs else None),
            "peak_mem_kind": "cuda_max_allocated" if cuda_peak else "process_peak_rss",
            "peak_rss_mb": max(s["peak_rss_mb"] for s in segs) if segs else None,
            "wall_s": round(sum(s["wall_s"] for s in segs), 1) if segs else None,
            "tok_per_s": round(statistics.median(tok_s), 1) if tok_s else None,
            "segments": len(segs),
            "curve": {"iter": list(evals), "train_loss": [r["train/loss"] for r in evals.values()],
                      "val_loss": [r["val/loss"] for r in evals.values()]},
            "steps": {"iter": list(steps), "loss": [r["train/loss_step"] for r in steps.values()]},
        })
        if data and "eval" in record:
            rows[-1]["learned_ppl"] = round(record["eval"]["learned"]["ppl"], 2)
            rows[-1]["forgot_ppl"] = round(record["eval"]["forgot"]["ppl"], 2)
    cfg = plans[0]["config"]
    forgetting = None
    if data and "eval" in state.get("base", {}):
        base = state["base"]["eval"]
        forgetting = {"learned_data": data["learned"]["name"], "forgot_data": data["forgot"]["name"],
                      "tokens": {k: base[k]["tokens"] for k in ("learned", "forgot")}, "block_size": cfg["block_size"],
                      "base": {"learned_ppl": round(base["learned"]["ppl"], 2), "forgot_ppl": round(base["forgot"]["ppl"], 2)}}
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    return {
        "command": shlex.join(["python", "compare.py"] + sys.argv[1:]),
        "device": device_name(cfg),
        "fingerprint": state["fingerprint"], "grid": state["shared"],
        "budget": {"max_iters": cfg["max_iters"], "tokens_per_iter": tokens_per_iter,
                   "tokens": cfg["max_iters"] * tokens_per_iter, "seed": cfg["seed"], "dataset": cfg["dataset"],
                   "init_from": cfg["init_from"], "block_size": cfg["block_size"], "batch_size": cfg["batch_size"]},
        "rss_baseline_mb": round(baseline_mb, 1),
        "runs": rows, "missing": missing, "best": best_lrs(plans, rows), "forgetting": forgetting,
    }


def best_lrs(plans, rows):
    """Per grid entry (a sweep's group of runs): its run with the lowest final validation loss, and
    every rate tried. Ties go to the lower rate."""
    done = {r["name"]: r for r in rows}
    out = []
    for group in dict.fromkeys(p["group"] for p in plans):
        tried = sorted((r["learning_rate"], r["final_val_loss"], r["name"]) for r in rows if r["group"] == group)
        if not tried:
            continue
        lr, loss, name = min(tried, key=lambda t: (t[1], t[0]))
        out.append({"group": group, "method": done[name]["method"], "best_run": name, "learning_rate": lr,
                    "final_val_loss": loss, "final_val_ppl": done[name]["final_val_ppl"],
                    "learning_rates": [t[0] for t in tried], "val_losses": [t[1] for t in tried],
                    "complete": len(tried) == sum(p["group"] == group for p in plans)})
    return out


CSV_FIELDS = ("name", "method", "quantize", "settings", "learning_rate", "trainable_params", "trainable_pct", "final_val_loss",
              "final_val_ppl", "best_val_loss", "final_train_loss", "peak_mem_mb", "peak_mem_kind", "wall_s", "tok_per_s",
              "group", "learned_ppl", "forgot_ppl")


def fmt_int(n):
    return "n/a" if n is None else f"{n:,}"


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def write_tables(results):
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in results["runs"]:
            w.writerow([json.dumps(r.get(k), sort_keys=True) if k == "settings" else r.get(k) for k in CSV_FIELDS])
    with open(os.path.join(out_dir, "results_curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("name", "iter", "train_loss", "val_loss"))
        for r in results["runs"]:
            c = r["curve"]
            for it, tr, va in zip(c["iter"], c["train_loss"], c["val_loss"]):
                w.writerow((r["name"], it, tr, va))
    b = results["budget"]
    mem = "peak CUDA memory" if any(r["peak_mem_kind"] == "cuda_max_allocated" for r in results["runs"]) else "peak RSS"
    fg = results.get("forgetting")
    ppl_cols = f" {fg['learned_data']} ppl (learned) | {fg['forgot_data']} ppl (forgot) |" if fg else ""
    lines = [f"Device: {results['device']}. Every run: {b['tokens']:,} tokens ({b['max_iters']} iters x "
             f"{b['tokens_per_iter']:,}), seed {b['seed']}, data `{b['dataset']}`, base `{b['init_from']}`.",
             "", f"`{results['command']}`", "",
             f"| run | method | learning rate | trainable params | % of base | val loss | val ppl | {mem} (MB) | wall time (s) | tokens/s |"
             + ppl_cols,
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fg else "")]
    if fg:
        lines.append(f"| base | | | | | | | | | | {fg['base']['learned_ppl']:.2f} | {fg['base']['forgot_ppl']:.2f} |")
    for r in results["runs"]:
        method = r["method"] + (f" + {r['quantize']}" if r.get("quantize") else "")
        lines.append(f"| {r['name']} | {method} | {r['learning_rate']:g} | {fmt_int(r['trainable_params'])} | "
                     f"{fmt(r['trainable_pct'], '.3f')} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
                     f"{fmt(r['peak_mem_mb'], ',.0f')} | "
                     f"{fmt(r['wall_s'], '.0f')}{f' ({n} parts)' if (n := r.get('segments', 1)) > 1 else ''} | "
                     f"{fmt(r['tok_per_s'], ',.0f')} |"
                     + (f" {fmt(r.get('learned_ppl'), '.2f')} | {fmt(r.get('forgot_ppl'), '.2f')} |" if fg else ""))
    if fg:
        lines += ["", f"Learned / forgot: eval.py's perplexity on the first {fg['tokens']['learned']:,} scored tokens of "
                      f"{fg['learned_data']}'s val.bin and {fg['tokens']['forgot']:,} of {fg['forgot_data']}'s "
                      f"(the base's own domain), disjoint windows of {fg['block_size']} tokens."]
    if is_sweep(results):
        lines += ["", "Each run at its best learning rate (lowest final val loss; every rate tried, with its val loss):", "",
                  "| run | method | best learning rate | val loss | val ppl | rates tried: val loss |",
                  "|---|---|---:|---:|---:|---|"]
        for g in results["best"]:
            tried = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in zip(g["learning_rates"], g["val_losses"]))
            edge = " (an end of the range: try further)" if len(g["learning_rates"]) > 1 and g["learning_rate"] in (
                g["learning_rates"][0], g["learning_rates"][-1]) else ""
            lines.append(f"| {g['group']} | {g['method']} | {g['learning_rate']:g}{edge} | {g['final_val_loss']:.4f} | "
                         f"{g['final_val_ppl']:.2f} | {tried}{'' if g['complete'] else ' (not all finished)'} |")
    if mem == "peak RSS" and results.get("rss_baseline_mb"):
        lines += ["", f"Peak RSS is the whole training process; Python and torch alone take {results['rss_baseline_mb']:,.0f} MB. "
                      f"Wall time includes start-up, evals and checkpoints; a run resumed in n parts starts up n times."]
    if results["missing"]:
        lines += ["", f"Not finished yet: {', '.join(results['missing'])}."]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def is_sweep(results):
    return any(len(g["learning_rates"]) > 1 for g in results.get("best", []))


def draw(results):
    """The figures (plots.py) into out_dir, and with assets_dir copies of them and of results.md there."""
    paths = plots.draw(results, out_dir, sweep=is_sweep(results))
    if not paths:
        print("no finished runs yet: no figures")
        return []
    if assets_dir:
        os.makedirs(assets_dir, exist_ok=True)
        for p in paths + [os.path.join(out_dir, "results.md")]:
            suffix = "results.md" if p.endswith(".md") else os.path.basename(p)[len("compare_"):]
            shutil.copyfile(p, os.path.join(assets_dir, f"{assets_name}_{suffix}"))
    return paths


def print_summary(results, figures):
    print()
    with open(os.path.join(out_dir, "results.md")) as f:
        print(f.read())
    names = ", ".join(os.path.basename(p) for p in figures) or "no figures"
    print(f"wrote {'' if plot_only else 'results.json, '}results.csv, results.md and {names} in {out_dir}/"
          + (f" (figures also in {assets_dir}/)" if assets_dir else ""))
    print(f"TensorBoard: tensorboard --logdir {out_dir}")


# -----------------------------------------------------------------------------

outputs.writable_folder(out_dir, f"--out_dir={out_dir}")  # not a file, not under a file, not read-only: in a dry run too
if assets_dir:
    outputs.writable_folder(assets_dir, f"--assets_dir={assets_dir}")
if plot_only:
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; run the grid first (without --plot_only) or check --out_dir")
    results = read_json(path)
    write_tables(results)
    print_summary(results, draw(results))
    sys.exit(0)

grid = check_runs()
state = check_out_dir(grid)
keys, rules, baseline_mb = train_defaults()
plans = resolve(grid, keys, rules)
data = eval_data(plans)
if dry_run:
    for plan in plans:
        print(f"{plan['name']}: {shlex.join(['python', 'train.py'] + plan['args'])}")
    cfg = plans[0]["config"]
    print(f"{len(plans)} runs of {cfg['max_iters']} iters x {cfg['gradient_accumulation_steps'] * cfg['batch_size'] * cfg['block_size']:,} tokens into {out_dir}/"
          + (f"; then the base and each run scored on {data['learned']['source']} and {data['forgot']['source']}" if data else ""))
    sys.exit(0)

os.makedirs(out_dir, exist_ok=True)
outputs.write_json(os.path.join(out_dir, "grid.json"), state)
handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
stopped = train_grid(plans, state)
for sig, handler in handlers.items():
    signal.signal(sig, handler)
if data and stopped != "interrupted":
    evaluate(plans, state, data)
results = collect(plans, state, baseline_mb, data)
outputs.write_json(os.path.join(out_dir, "results.json"), results)
write_tables(results)
print_summary(results, draw(results))
if stopped:
    done = len(plans) - len(results["missing"])
    print(f"{stopped}: {done} of {len(plans)} runs finished; run the same command again to continue")
    sys.exit(130 if stopped == "interrupted" else 0)
