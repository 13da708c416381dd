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
