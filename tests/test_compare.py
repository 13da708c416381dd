"""compare.py end to end, as a user runs it: a tiny grid (3 methods, a tiny random GPT-2, random
token shards, a few iterations each) trained, interrupted, continued, re-run, redrawn, and misused."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("full", "lora1", "ia3")


@pytest.fixture(scope="module")
def grid(tmp_path_factory, base, data):
    """A train.py base config and a grid config over the tiny base model and token shards (conftest)."""
    tmp = tmp_path_factory.mktemp("grid")
    # the base config's own LoRA settings (targets lora3, r 4) must not leak into the runs
    (tmp / "train_tiny.py").write_text(
        f"init_from = {base!r}\ndataset = {data!r}\ndevice = 'cpu'\ncompile = False\n"
        f"batch_size = 4\nblock_size = 32\nmethod = 'lora'\ntargets = ('lora3',)\nr = 4\n")
    (tmp / "grid_tiny.py").write_text(
        f"base_config = {str(tmp / 'train_tiny.py')!r}\n"
        "common = dict(max_iters=24, eval_interval=12, eval_iters=2, log_interval=1, warmup_iters=2,\n"
        "              lr_decay_iters=24, learning_rate=3e-3, min_lr=3e-4)\n"
        "runs = [\n"
        "    ('full', dict(method='full', learning_rate=1e-3)),\n"
        "    ('lora1', dict(method='lora', targets=('lora1',), r=4, alpha=8.0)),\n"
        "    ('ia3', dict(method='ia3')),\n"
        "]\n")
    return tmp


def compare(grid, *args):
    return subprocess.run([sys.executable, "compare.py", str(grid / "grid_tiny.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def ckpt_iter(run_dir):
    import checkpoint
    path = os.path.join(run_dir, "ckpt.safetensors")
    return checkpoint.read_meta(path)["iter_num"] if os.path.exists(path) else None


def mtimes(out):
    return {r: os.path.getmtime(out / r / "ckpt.safetensors") for r in RUNS}


@pytest.fixture(scope="module")
def finished(grid):
    """The grid run as a user would: one run, then Ctrl-C in the middle of the next, then to the end."""
    out = grid / "out"
    steps = {}
    p = compare(grid, f"--out_dir={out}", "--max_runs=1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "stopped after max_runs=1: 1 of 3 runs finished" in p.stdout
    assert ckpt_iter(out / "full") == 24 and not (out / "lora1").exists()
    steps["max_runs"] = json.loads((out / "results.json").read_text())

    # Ctrl-C while lora1 trains: train.py saves where it is, compare.py stops before ia3
    proc = subprocess.Popen([sys.executable, "compare.py", str(grid / "grid_tiny.py"), f"--out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = out / "logs" / "lora1.log"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.exists() and "iter 1/" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted: 1 of 3 runs finished" in stdout or "interrupted: 2 of 3 runs finished" in stdout, stdout
    assert not (out / "ia3").exists()  # the next run never started
    steps["interrupted_at"] = ckpt_iter(out / "lora1")  # usually mid-run; 24 if lora1 was already done

    p = compare(grid, f"--out_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    steps["continue"] = p
    return out, steps


def test_grid_trains_every_method_and_reports(finished):
    out, steps = finished
    assert [r["name"] for r in steps["max_runs"]["runs"]] == ["full"] and steps["max_runs"]["missing"] == ["lora1", "ia3"]
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["runs"]] == list(RUNS) and res["missing"] == []
    assert res["budget"]["tokens"] == 24 * 4 * 32 and res["device"].startswith("CPU")
    by = {r["name"]: r for r in res["runs"]}
    assert by["full"]["trainable_pct"] == 100 and by["full"]["learning_rate"] == 1e-3
    assert by["lora1"]["trainable_params"] == 2 * 4 * (32 + 96)  # r=4 on c_attn [96, 32] of 2 layers
    assert by["ia3"]["trainable_params"] == 2 * (32 + 32 + 128)  # k, v, mlp.c_proj's input
    assert 2.9 < by["lora1"]["trainable_pct"] < 3 and by["lora1"]["settings"]["targets"] == ["lora1"]
    for r in res["runs"]:
        assert r["curve"]["iter"] == [0, 12, 24] and r["steps"]["iter"] == list(range(1, 25)), r["name"]
        assert r["final_val_loss"] == round(r["curve"]["val_loss"][-1], 4)
        assert math.isclose(r["final_val_ppl"], math.exp(r["final_val_loss"]), rel_tol=1e-3)
        assert r["peak_mem_mb"] > 50 and r["wall_s"] > 0 and r["tok_per_s"] > 0, r
        assert r["command"].startswith("python train.py ") and f"--out_dir={out / r['name']}" in r["command"]
        assert glob.glob(str(out / r["name"] / "tb" / "events.out.tfevents.*")), r["name"]  # TensorBoard
    assert by["full"]["final_val_loss"] < by["full"]["curve"]["val_loss"][0]  # it learned something
    if steps["interrupted_at"] != 24:  # lora1 was stopped mid-run and resumed, not restarted
        assert by["lora1"]["segments"] == 2 and "resuming from" in (out / "logs" / "lora1.log").read_text()
    with open(out / "results.csv") as f:
        lines = f.read().splitlines()
    assert len(lines) == 4 and lines[0].startswith("name,method,quantize,settings,learning_rate,trainable_params")
    assert "| lora1 | lora |" in (out / "results.md").read_text()
    for name in ("compare_curves.png", "compare_params.png", "compare_cost.png"):
        check_png(out / name)


def check_png(path):
    import matplotlib.image
    assert path.stat().st_size > 20_000, path
    img = matplotlib.image.imread(str(path))
    assert img.shape[0] >= 300 and img.shape[1] >= 700 and img[..., :3].std() > 0.05, (path, img.shape)


def test_rerun_skips_finished_runs_and_redoes_a_lost_one(finished, grid):
    out, _ = finished
    before = mtimes(out)
    p = compare(grid, f"--out_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("finished earlier (24 iters), skipped") == 3 and "step 0:" not in p.stdout
    assert mtimes(out) == before
    # lose one run's checkpoint: only that run trains again, from the start
    os.remove(out / "ia3" / "ckpt.safetensors")
    p = compare(grid, f"--out_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    after = mtimes(out)
    assert after["full"] == before["full"] and after["lora1"] == before["lora1"] and after["ia3"] > before["ia3"]
    assert p.stdout.count("skipped") == 2 and "ia3: training" in p.stdout
    res = json.loads((out / "results.json").read_text())
    ia3 = next(r for r in res["runs"] if r["name"] == "ia3")
    assert ia3["segments"] == 1 and ia3["curve"]["iter"] == [0, 12, 24]


def test_plot_only_redraws_from_results(finished, grid, tmp_path):
    out, _ = finished
    for name in ("compare_curves.png", "compare_params.png", "compare_cost.png"):
        os.remove(out / name)
    p = compare(grid, f"--out_dir={out}", "--plot_only=true", f"--assets_dir={tmp_path / 'assets'}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train.py" not in p.stdout
    for name in ("compare_curves.png", "compare_params.png", "compare_cost.png"):
        check_png(out / name)
        check_png(tmp_path / "assets" / name)
    assert (tmp_path / "assets" / "compare_results.md").exists()


def test_bad_input_stops_with_one_line(finished, grid, tmp_path):
    out, _ = finished

    def fails(*args, message):
        p = compare(grid, *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = [line for line in p.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, p.stderr)

    new = tmp_path / "new"
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lorra'})]", message="did you mean 'lora'")
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lora', 'oft_block_size': 16})]",
          message="oft_block_size does not apply to method 'lora'")
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lora', 'max_iters': 5})]", message="must be the same for every run")
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lora', 'learning_rat': 1e-3})]", message="did you mean 'learning_rate'")
    fails(f"--out_dir={new}", "--common={'r': 4}", message="set it in each run's entry")
    assert not new.exists()  # nothing was written
    fails(f"--out_dir={out}", "--common={'max_iters': 24, 'seed': 7}", message="holds the results of a different grid")
    fails(f"--out_dir={out}", "--runs=[('lora1', {'method': 'lora', 'targets': ('lora1',), 'r': 8})]",
          message="run 'lora1' in")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fails(f"--out_dir={foreign}", message="not a compare.py output folder")
    fails(f"--out_dir={tmp_path / 'empty'}", "--plot_only=true", message="results.json does not exist")
    assert json.loads((out / "results.json").read_text())["missing"] == []  # the finished grid is untouched


# -----------------------------------------------------------------------------
# a learning-rate sweep, scored on a second dataset (learned vs forgot)

SWEEP = {"lora1": (1e-3, 3e-2), "ia3": (3e-3, 1e-1)}
SWEEP_RUNS = ["lora1-lr0.001", "lora1-lr0.03", "ia3-lr0.003", "ia3-lr0.1"]


@pytest.fixture(scope="module")
def sweep_config(grid, tmp_path_factory):
    """A sweep grid (2 methods x 2 rates) with forget_data: a second token stream, the 'base domain'."""
    import numpy as np
    from shards import write_shard
    tmp = tmp_path_factory.mktemp("sweep")
    other = tmp / "other"
    other.mkdir()
    tokens = np.random.default_rng(1).integers(0, 64, size=600).astype(np.uint16)
    write_shard(other / "train.bin", tokens)
    write_shard(other / "val.bin", tokens)
    (tmp / "sweep_tiny.py").write_text(
        f"base_config = {str(grid / 'train_tiny.py')!r}\n"
        f"forget_data = {str(other)!r}\n"
        "eval_tokens = 200\n"
        "common = dict(max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2,\n"
        "              lr_decay_iters=8, learning_rate=3e-3, min_lr=3e-4)\n"
        f"runs = [('lora1', dict(method='lora', targets=('lora1',), r=4, alpha=8.0, learning_rate={SWEEP['lora1']!r})),\n"
        f"        ('ia3', dict(method='ia3', learning_rate={SWEEP['ia3']!r}))]\n")
    return tmp, other


@pytest.fixture(scope="module")
def sweep(sweep_config):
    """The sweep trained and scored, with the figures also in an assets folder."""
    tmp, other = sweep_config
    out = tmp / "out"
    p = subprocess.run([sys.executable, "compare.py", str(tmp / "sweep_tiny.py"), f"--out_dir={out}",
                        f"--assets_dir={tmp / 'assets'}", "--assets_name=sw"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    return tmp, out, other, p


def run_sweep(tmp, *args):
    return subprocess.run([sys.executable, "compare.py", str(tmp / "sweep_tiny.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_sweep_runs_each_method_at_each_rate_on_the_same_schedule(sweep):
    tmp, out, _, _ = sweep
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["runs"]] == SWEEP_RUNS and res["missing"] == []
    for r in res["runs"]:
        assert r["learning_rate"] == SWEEP[r["group"]][SWEEP_RUNS.index(r["name"]) % 2]
        args = dict(a[2:].split("=", 1) for a in r["command"].split()[3:])
        # the same data, budget and schedule for every run; min_lr keeps common's ratio (1/10)
        assert (args["max_iters"], args["warmup_iters"], args["lr_decay_iters"], args["eval_interval"]) == ("8", "2", "8", "4")
        assert math.isclose(float(args.get("min_lr", 3e-4)), r["learning_rate"] / 10), r["command"]
        assert r["curve"]["iter"] == [0, 4, 8]
    assert res["budget"]["tokens"] == 8 * 4 * 32


def test_sweep_picks_each_methods_best_rate_by_val_loss(sweep):
    tmp, out, _, _ = sweep
    res = json.loads((out / "results.json").read_text())
    for group, rates in SWEEP.items():
        rows = [r for r in res["runs"] if r["group"] == group]
        best = min(rows, key=lambda r: r["final_val_loss"])
        g = next(g for g in res["best"] if g["group"] == group)
        assert g["best_run"] == best["name"] and g["learning_rate"] == best["learning_rate"] and g["complete"]
        assert g["learning_rates"] == list(rates) and g["val_losses"] == [r["final_val_loss"] for r in rows]
    md = (out / "results.md").read_text()
    assert "Each run at its best learning rate" in md
    for g in res["best"]:
        assert f"| {g['group']} | {g['method']} | {g['learning_rate']:g}" in md
    check_png(out / "compare_lr.png")
    check_png(tmp / "assets" / "sw_lr.png")
    assert (tmp / "assets" / "sw_results.md").read_text() == md


def test_forgetting_equals_a_direct_perplexity(sweep, base, data):
    """learned / forgot ppl: a run merged into its base, disjoint windows of block_size over the first
    eval_tokens tokens of each val.bin, mean token cross-entropy recomputed here from the logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import checkpoint
    import peft
    from shards import read_shard
    tmp, out, other, _ = sweep
    res = json.loads((out / "results.json").read_text())
    fg = res["forgetting"]
    assert fg["block_size"] == 32 and fg["forgot_data"] == "other"

    def ppl(source, folder):
        model, meta = checkpoint.load_model(str(source))
        if meta is not None:
            peft.merge(model)
        model.eval()
        ids = torch.as_tensor(np.asarray(read_shard(os.path.join(folder, "val.bin")), dtype=np.int64)[:200])
        nll, n = 0.0, 0
        for b in range(0, len(ids) - 1, 32):  # windows ids[b:b+32]; the first token of each is context only
            w = ids[b:b + 32]
            with torch.no_grad():
                logits, _ = model(w[None, :-1], targets=w[None, 1:])
            nll += F.cross_entropy(logits[0].double(), w[1:], reduction="sum").item()
            n += len(w) - 1
        return math.exp(nll / n), n

    learned_dir, base_dir = data, base
    for name in ("lora1-lr0.03", "ia3-lr0.003"):
        r = next(r for r in res["runs"] if r["name"] == name)
        want_l, n_l = ppl(out / name, learned_dir)
        want_f, n_f = ppl(out / name, other)
        assert math.isclose(r["learned_ppl"], want_l, rel_tol=1e-4) and math.isclose(r["forgot_ppl"], want_f, rel_tol=1e-4)
    assert fg["tokens"] == {"learned": n_l, "forgot": n_f}
    want_l, _ = ppl(base_dir, learned_dir)
    want_f, _ = ppl(base_dir, other)
    assert math.isclose(fg["base"]["learned_ppl"], want_l, rel_tol=1e-4)
    assert math.isclose(fg["base"]["forgot_ppl"], want_f, rel_tol=1e-4)
    check_png(out / "compare_forgetting.png")
    assert "ppl (learned)" in (out / "results.md").read_text()


def test_sweep_resume_skips_finished_runs_and_their_scores(sweep):
    tmp, out, _, first = sweep
    assert first.stdout.count(", other ppl ") == 5  # the base and 4 runs scored once
    before = {r: os.path.getmtime(out / r / "ckpt.safetensors") for r in SWEEP_RUNS}
    p = run_sweep(tmp, f"--out_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("finished earlier (8 iters), skipped") == 4 and "step 0:" not in p.stdout
    assert ", other ppl " not in p.stdout  # nothing scored again
    assert {r: os.path.getmtime(out / r / "ckpt.safetensors") for r in SWEEP_RUNS} == before
    p = run_sweep(tmp, f"--out_dir={out}", "--dry_run=true")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [ln.split(":")[0] for ln in p.stdout.splitlines()[:4]] == SWEEP_RUNS and "4 runs of 8 iters" in p.stdout


def test_bad_sweep_input_stops_with_one_line(sweep_config, tmp_path):
    tmp, _ = sweep_config

    def fails(*args, message, config=None):
        if config is not None:
            (tmp_path / "bad.py").write_text((tmp / "sweep_tiny.py").read_text() + config)
        cmd = [sys.executable, "compare.py", str(tmp_path / "bad.py" if config is not None else tmp / "sweep_tiny.py"), *args]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = [line for line in p.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, p.stderr)

    new = tmp_path / "new"
    run = "--runs=[('x', {'method': 'lora', 'learning_rate': %s})]"
    fails(f"--out_dir={new}", run % "()", message="learning_rate is an empty list")
    fails(f"--out_dir={new}", run % "[1e-3, -1e-3]", message="learning_rate -0.001 must be a positive finite number")
    fails(f"--out_dir={new}", run % "[1e-3, 0.001]", message="lists learning_rate 0.001 twice")
    fails(f"--out_dir={new}", run % "[1e-3, 'fast']", message="learning_rate 'fast' must be a positive")
    fails(f"--out_dir={new}", config="runs = [('x', dict(method='ia3', learning_rate=(1e-3, float('nan'))))]\n",
          message="learning_rate nan must be a positive finite number")
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lora', 'learning_rate': (1e-3, 1e-2), 'min_lr': 1e-5})]",
          message="drop min_lr")
    fails(f"--out_dir={new}", "--runs=[('x-lr1e-05', {'method': 'lora'}), ('x', {'method': 'lora', 'learning_rate': [1e-5]})]",
          message="two runs are named 'x-lr1e-05'")
    fails(f"--out_dir={new}", f"--forget_data={tmp_path / 'nowhere'}", "--dry_run=true", message="nowhere")
    fails(f"--out_dir={new}", "--eval_tokens=1", "--dry_run=true", message="eval_tokens=1 must be 0 (all) or at least 2")
    # every run's config is checked against train.py's declared rules (train.py --help=json) before any run
    fails(f"--out_dir={new}", "--runs=[('x', {'method': 'lora', 'r': 0})]", "--dry_run=true",
          message="run 'x': --r=0: must be an integer >= 1")
    assert not new.exists()
    # an out_dir (or assets_dir) that cannot be written stops a dry run too, before any work
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fails(f"--out_dir={a_file}", "--dry_run=true", message="is a file, not a folder")
    fails(f"--out_dir={a_file / 'sub'}", "--dry_run=true", message="is a file, not a folder")
    fails(f"--out_dir={new}", f"--assets_dir={a_file / 'sub'}", "--dry_run=true", message="--assets_dir")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a 0o555 folder; sysfs refuses even root
        read_only = "/sys"
    fails(f"--out_dir={os.path.join(read_only, 'out')}", "--dry_run=true", message="cannot write to")
    fails(f"--out_dir={os.path.join(read_only, 'out')}", message="cannot write to")
