"""Faults (issue #7): train.py killed, interrupted, diverging, out of disk, or losing a DDP peer.

Every test runs train.py as a user does, as a subprocess, on the tiny random GPT-2 and token shards of
conftest.py: full fine-tuning with dropout on (so resuming must replay the RNG too), 60 iterations,
a checkpoint every 5. One uninterrupted run of the same command is the reference: whatever happens to a
run, once resumed to the end its checkpoint and its logged losses must equal the reference's exactly.
Faults that must hit an exact moment (half-way through a checkpoint write, a disk that fills up, Ctrl-C
after a diverged step) are injected by tests/fixtures/faults/inject.py, which runs train.py unchanged.
"""
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import outputs
import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECT = os.path.join(ROOT, "tests", "fixtures", "faults", "inject.py")
MAX_ITERS, EVAL_INTERVAL = 60, 5
TEMP_FILE = re.compile(r"^\.(ckpt\.safetensors|metrics\.jsonl)\.tmp-\d+$")  # temp files of checkpoint/metrics writes


def args(base, data, out_dir, *extra):
    """The command of every run here; later arguments override earlier ones."""
    return ["--device=cpu", "--compile=false", f"--init_from={base}", f"--dataset={data}", f"--out_dir={out_dir}",
            "--method=full", "--dropout=0.1", "--batch_size=4", "--block_size=32", f"--max_iters={MAX_ITERS}",
            f"--eval_interval={EVAL_INTERVAL}", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
            f"--lr_decay_iters={MAX_ITERS}", "--learning_rate=3e-3", *extra]


def env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def train(*argv, fault=None, at=None, note=None, timeout=300):
    """train.py, or train.py under inject.py with FAULT=fault at the at-th checkpoint write / step."""
    if fault is None:
        cmd, e = [sys.executable, "train.py", *argv], env()
    else:
        cmd = [sys.executable, INJECT, "train.py", *argv]
        e = env(FAULT=fault, FAULT_AT=str(at), **({"FAULT_NOTE": str(note)} if note else {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def popen(*argv):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)


def metrics(out_dir):
    """{key: {iter: value}} from metrics.jsonl, keeping the last value logged for each iter (a resumed
    run logs again the iterations after its checkpoint)."""
    out = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for key in ("val/loss", "train/loss", "train/loss_step"):
                if key in row:
                    out.setdefault(key, {})[row["iter"]] = row[key]
    return out


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def error_line(p):
    """The one `error:` line of a failed run (and no traceback)."""
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in p.stderr and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def assert_same_as_reference(out_dir, reference):
    """The run in out_dir ended where the reference did, with the same tensors and the same losses."""
    tensors, meta = checkpoint.load(str(out_dir))
    ref_tensors, ref_meta = reference["tensors"], reference["meta"]
    assert meta["iter_num"] == ref_meta["iter_num"] == MAX_ITERS
    assert meta["best_val_loss"] == ref_meta["best_val_loss"]
    assert tensors.keys() == ref_tensors.keys()
    for name in tensors:
        assert torch.equal(tensors[name], ref_tensors[name]), name
    got = metrics(out_dir)
    for key in ("val/loss", "train/loss_step"):
        assert got[key] == reference["metrics"][key], key


def folder_is_clean(out_dir):
    """Only what train.py writes: the checkpoint, metrics.jsonl, and temp files of killed writes."""
    names = set(os.listdir(out_dir))  # + the lock file a SIGKILLed run could not remove (stale: taken over)
    assert names - {checkpoint.CKPT_NAME, "metrics.jsonl", outputs.LOCK_NAME} <= {n for n in names if TEMP_FILE.match(n)}, names
    return names


@pytest.fixture(scope="module")
def reference(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    p = train(*args(base, data, out))
    assert p.returncode == 0, p.stderr
    tensors, meta = checkpoint.load(str(out))
    m = metrics(out)
    assert sorted(m["val/loss"]) == list(range(0, MAX_ITERS + 1, EVAL_INTERVAL))
    assert sorted(m["train/loss_step"]) == list(range(1, MAX_ITERS + 1))
    return {"out_dir": out, "tensors": tensors, "meta": meta, "metrics": m}


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(reference, base, data, tmp_path):
    """Up to four SIGKILLs at seeded-random moments (after a seeded-random iteration line, a random few ms
    later: inside a step, an eval or a checkpoint write), each followed by --init_from=resume. After every
    kill the last checkpoint loads; at the end tensors and losses equal the uninterrupted run's.
    The first kill comes after the first checkpoint (iter 5) is complete; a kill during the first write
    is test_kill_during_the_first_checkpoint_write_then_rerun."""
    out = tmp_path / "run"
    rng = random.Random(7)
    saved_at, kills = 0, []
    for _ in range(4):
        if saved_at >= MAX_ITERS - 1:
            break
        target = rng.randint(max(saved_at, EVAL_INTERVAL) + 1, MAX_ITERS)
        delay = rng.uniform(0.0, 0.03)
        p = popen(*args(base, data, out, *(["--init_from=resume"] if saved_at else [])))
        try:
            for line in p.stdout:
                if line.startswith(f"iter {target}/"):
                    time.sleep(delay)
                    p.kill()
                    break
            p.wait(timeout=120)
            stderr = p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
            p.stdout.close()
            p.stderr.close()
        assert p.returncode in (-signal.SIGKILL, 0), stderr  # 0: it had finished before the kill landed
        kills.append((target, round(delay, 4), p.returncode))
        folder_is_clean(out)
        tensors, meta = checkpoint.load(str(out))  # the last complete checkpoint, never half of one
        assert meta["iter_num"] % EVAL_INTERVAL == 0 and saved_at <= meta["iter_num"] <= MAX_ITERS, kills
        assert meta["iter_num"] >= EVAL_INTERVAL
        saved_at = meta["iter_num"]
    assert kills[0][2] == -signal.SIGKILL, kills
    p = train(*args(base, data, out, "--init_from=resume"))
    assert p.returncode == 0, (kills, p.stderr)
    assert_same_as_reference(out, reference)


def test_kill_half_way_through_a_checkpoint_write_keeps_the_previous_one(reference, base, data, tmp_path):
    """The 3rd checkpoint write (iter 15) dies half-way: ckpt.safetensors is still iter 10's, whole;
    the half-written temp file is left under its own name; resuming ends exactly at the reference."""
    out, note = tmp_path / "run", tmp_path / "before.sha256"
    p = train(*args(base, data, out), fault="kill", at=3, note=note)
    assert p.returncode == -signal.SIGKILL, p.stderr
    names = folder_is_clean(out)
    temps = [n for n in names if TEMP_FILE.match(n)]
    assert len(temps) == 1 and checkpoint.CKPT_NAME in names
    assert sha256(out / checkpoint.CKPT_NAME) == note.read_text()  # byte for byte the previous checkpoint
    tensors, meta = checkpoint.load(str(out))
    assert meta["iter_num"] == 10
    assert os.path.getsize(out / temps[0]) < os.path.getsize(out / checkpoint.CKPT_NAME)  # the half file
    p = train(*args(base, data, out, "--init_from=resume"))
    assert p.returncode == 0, p.stderr
    assert_same_as_reference(out, reference)


def test_kill_during_the_first_checkpoint_write_then_rerun(reference, base, data, tmp_path):
    """Killed while writing its very first checkpoint, a run leaves no ckpt.safetensors, only the repo's
    own half-written temp file. Running the same command again must start over (there is nothing to
    resume) rather than refuse the folder as holding files the repo did not write, and must end exactly
    at the reference, with no stale temp file left."""
    out = tmp_path / "run"
    p = train(*args(base, data, out), fault="kill", at=1)
    assert p.returncode == -signal.SIGKILL, p.stderr
    names = folder_is_clean(out)
    assert checkpoint.CKPT_NAME not in names and any(TEMP_FILE.match(n) for n in names)
    p = train(*args(base, data, out))
    assert p.returncode == 0, p.stderr
    assert_same_as_reference(out, reference)
    assert sorted(os.listdir(out)) == [checkpoint.CKPT_NAME, "metrics.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_and_exit_cleanly(reference, base, data, tmp_path, sig):
    """Ctrl-C / a scheduler's SIGTERM during training: the run saves where it is and exits 0, and
    resuming from there gives the uninterrupted run's losses."""
    out = tmp_path / "run"
    p = popen(*args(base, data, out, "--max_iters=100000"))
    try:
        for line in p.stdout:
            if line.startswith("iter "):
                p.send_signal(sig)
                break
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, stderr
    m = re.search(r"stopped by signal (\d+); checkpoint saved at iter (\d+)", stdout)
    assert m and int(m.group(1)) == sig, stdout[-2000:]
    stopped_at = int(m.group(2))
    assert 1 <= stopped_at <= MAX_ITERS - 2, stopped_at  # the signal came at the first iteration line
    assert checkpoint.load(str(out))[1]["iter_num"] == stopped_at
    p = train(*args(base, data, out, "--init_from=resume", f"--max_iters={stopped_at + 2}"))
    assert p.returncode == 0, p.stderr
    steps = metrics(out)["train/loss_step"]
    assert max(steps) == stopped_at + 2
    ref = reference["metrics"]["train/loss_step"]
    assert sorted(steps) == list(range(1, stopped_at + 3))
    assert all(steps[i] == ref[i] for i in steps), (steps, ref)  # before and after the stop


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(reference, tmp_path, base, data):
    """A learning rate of 1e30 makes AdamW's first step push the weights to ~1e30: the next loss is nan."""
    out = tmp_path / "run"
    shutil.copytree(reference["out_dir"], out)
    before = sha256(out / checkpoint.CKPT_NAME)
    p = train(*args(base, data, out, "--init_from=resume", f"--max_iters={MAX_ITERS + 10}",
                    "--learning_rate=1e30", "--decay_lr=false"))
    assert p.returncode == 2, p.stderr
    line = error_line(p)
    assert re.search(r"\b(nan|inf)\b", line) and "keeps the last good state" in line, line
    assert sha256(out / checkpoint.CKPT_NAME) == before
    folder_is_clean(out)


def test_nan_weights_are_never_saved_even_when_stopped_by_a_signal(reference, tmp_path, base, data):
    """The loss is only looked at on log steps; Ctrl-C between two of them must not save weights that
    have become nan over the last good checkpoint. Ctrl-C comes after the 4th step at lr 1e30."""
    out, note = tmp_path / "run", tmp_path / "before.sha256"
    shutil.copytree(reference["out_dir"], out)
    before = sha256(out / checkpoint.CKPT_NAME)
    p = train(*args(base, data, out, "--init_from=resume", "--max_iters=1000", "--learning_rate=1e30",
                    "--decay_lr=false", "--log_interval=100", "--eval_interval=100"), fault="sigint", at=4, note=note)
    assert note.read_text() == before  # the fault fired, on the reference's checkpoint
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    line = error_line(p)
    assert re.search(r"\b(nan|inf|non-finite)\b", line) and "last good state" in line, line
    assert sha256(out / checkpoint.CKPT_NAME) == before


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(base, data, tmp_path):
    """The 3rd write (iter 15) fails half-way with ENOSPC: one line, exit 2, iter 10's checkpoint
    byte for byte, and no temp file left behind."""
    out, note = tmp_path / "run", tmp_path / "before.sha256"
    p = train(*args(base, data, out), fault="enospc", at=3, note=note)
    assert p.returncode == 2, p.stderr
    line = error_line(p)
    assert os.strerror(errno.ENOSPC) in line and "previous checkpoint is kept" in line, line
    assert sha256(out / checkpoint.CKPT_NAME) == note.read_text()
    assert checkpoint.load(str(out))[1]["iter_num"] == 10
    assert sorted(os.listdir(out)) == [checkpoint.CKPT_NAME, "metrics.jsonl"]


def read_only_prefix():
    """A command prefix under which this process's user cannot write a 0555 folder it owns: root
    loses CAP_DAC_OVERRIDE/CAP_FOWNER (setpriv), anyone else is bound by the mode already."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
    return ["setpriv", "--inh-caps=-dac_override,-fowner", "--bounding-set=-dac_override,-fowner", "--"]


def test_read_only_out_dir_is_one_line_and_keeps_the_checkpoint(reference, base, data, tmp_path):
    """A genuinely read-only out_dir (mode 0555, and for root no capability to ignore it): resuming
    fails at its first write with one line, and the checkpoint is untouched."""
    out = tmp_path / "run"
    shutil.copytree(reference["out_dir"], out)
    before = sha256(out / checkpoint.CKPT_NAME)
    prefix = read_only_prefix()
    for name in os.listdir(out):
        os.chmod(out / name, 0o444)
    os.chmod(out, 0o555)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(out / 'probe')!r}, 'w')"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, "the folder is not read-only"
        p = subprocess.run([*prefix, sys.executable, "train.py",
                            *args(base, data, out, "--init_from=resume", f"--max_iters={MAX_ITERS + 10}")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    finally:
        os.chmod(out, 0o755)
        for name in os.listdir(out):
            os.chmod(out / name, 0o644)
    assert p.returncode == 2, p.stderr[-3000:]
    line = error_line(p)
    assert str(out) in line and "ermission denied" in line, line
    assert sha256(out / checkpoint.CKPT_NAME) == before


def children(pid):
    """Pids whose parent is pid (from /proc/*/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def processes_mentioning(text):
    """Pids of live (non-zombie) processes whose command line contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if text.encode() in cmdline and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(entry))
    return found


def test_torchrun_worker_killed_makes_the_whole_job_exit(base, data, tmp_path):
    """torchrun with 2 CPU processes: SIGKILL rank 1 while both train. The job must exit non-zero
    within a bound (rank 0 must not hang in a collective) and leave no process behind."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *args(base, data, out, "--method=lora", "--gradient_accumulation_steps=2", "--max_iters=100000")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("iter 3/"):  # rank 0 prints; the ranks meet in every backward's all-reduce
                break
        workers = {}
        for pid in children(p.pid):
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            workers[int(environ[b"RANK"])] = pid
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        output = p.communicate(timeout=60)[0]  # TimeoutExpired here: the job hangs
        elapsed = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode != 0, output[-3000:]
    assert elapsed < 60
    deadline = time.time() + 10
    while processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(out)) == []


# ----------------------------------------------------------------------------- issue 11: nothing saved is lost
def wait_for(p, prefix):
    for line in p.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}: " + p.stderr.read()[-2000:])


def test_one_writer_per_out_dir_and_a_killed_runs_lock_is_taken_over(base, data, tmp_path):
    """A second train.py into the out_dir of a running one (a fresh run or a resume) stops with one line
    naming the holder's pid and writes nothing; once the holder is SIGKILLed its lock is stale and the
    next run takes it over. A lock file naming a live but unrelated pid (pid reuse) does not block."""
    out = tmp_path / "run"
    p = popen(*args(base, data, out, "--max_iters=100000"))
    try:
        wait_for(p, "saved checkpoint")
        assert (out / outputs.LOCK_NAME).read_text().strip() == str(p.pid)
        before = {n: sha256(out / n) for n in (checkpoint.CKPT_NAME, "metrics.jsonl")}
        for extra in ([], ["--init_from=resume"], ["--overwrite=true"]):
            q = train(*args(base, data, out, *extra))
            assert q.returncode == 2, q.stderr
            assert f"is in use by another train.py (pid {p.pid})" in error_line(q)
        p.kill()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
        p.stderr.close()
    assert (out / outputs.LOCK_NAME).read_text().strip() == str(p.pid)  # left behind by the kill
    saved = checkpoint.load(str(out))[1]["iter_num"]
    assert saved >= EVAL_INTERVAL and before  # a checkpoint the resume continues
    q = train(*args(base, data, out, "--init_from=resume", f"--max_iters={saved + 2}"))
    assert q.returncode == 0, q.stderr
    assert checkpoint.load(str(out))[1]["iter_num"] == saved + 2
    assert outputs.LOCK_NAME not in os.listdir(out)  # released at exit
    (out / outputs.LOCK_NAME).write_text(f"{os.getpid()}\n")  # a live pid, but nobody holds the lock
    q = train(*args(base, data, out, "--init_from=resume", f"--max_iters={saved + 3}"))
    assert q.returncode == 0, q.stderr
    assert sorted(os.listdir(out)) == [checkpoint.CKPT_NAME, "metrics.jsonl"]


def test_overwrite_keeps_the_old_metrics_until_the_new_checkpoint(reference, base, data, tmp_path):
    """--overwrite=true over a finished run, killed while writing its first checkpoint: the old run's
    checkpoint and metrics.jsonl are both kept, byte for byte (they still match). Run to its end, the new
    run's metrics.jsonl holds only its own lines."""
    out = tmp_path / "run"
    shutil.copytree(reference["out_dir"], out)
    before = {n: sha256(out / n) for n in (checkpoint.CKPT_NAME, "metrics.jsonl")}
    p = train(*args(base, data, out, "--overwrite=true", "--max_iters=10", "--learning_rate=1e-3"), fault="kill", at=1)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "step 0:" in p.stdout  # the new run logged its first eval before it died
    assert {n: sha256(out / n) for n in before} == before
    folder_is_clean(out)
    p = train(*args(base, data, out, "--overwrite=true", "--max_iters=10", "--learning_rate=1e-3"))
    assert p.returncode == 0, p.stderr
    m = metrics(out)
    assert sorted(m["val/loss"]) == [0, 5, 10] and sorted(m["train/loss_step"]) == list(range(1, 11))
    assert checkpoint.load(str(out))[1]["iter_num"] == 10
    assert sorted(os.listdir(out)) == [checkpoint.CKPT_NAME, "metrics.jsonl"]  # stale temp files removed


def prepare_killed(text_file, out_dir, kill_at):
    """data/milton/prepare.py on text_file, SIGKILLed at a chosen moment: 'write' = while writing the
    second temp shard, 'publish' = right after the first rename of the publish step."""
    code = f"""
import os, runpy, signal, sys
sys.path.insert(0, {ROOT!r})
import shards
real_write, real_replace, n = shards._write_temp, os.replace, [0]
def write(*a, **k):
    n[0] += 1
    if {kill_at!r} == "write" and n[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(*a, **k)
def replace(a, b):
    real_replace(a, b)
    if {kill_at!r} == "publish" and b.endswith(".bin"):
        os.kill(os.getpid(), signal.SIGKILL)
shards._write_temp, os.replace = write, replace
sys.argv = ["prepare.py", "--input", {str(text_file)!r}, "--out_dir", {str(out_dir)!r}]
runpy.run_path(os.path.join({ROOT!r}, "data", "milton", "prepare.py"), run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env())


def test_an_interrupted_prepare_never_gives_a_mixed_pair(base_bpe, tmp_path):
    """Killed while writing, prepare.py leaves the previous train.bin/val.bin, byte for byte, and train.py
    uses them. Killed between the renames of its publish step (a new train.bin, the old val.bin), train.py
    refuses the pair with one line, and re-running prepare.py repairs it. Preparing the same text again
    gives the same prep_id (a resume accepts it)."""
    old_text, new_text = tmp_path / "old.txt", tmp_path / "new.txt"
    old_text.write_text("The first text, line one.\n" * 300)
    new_text.write_text("Another text entirely, with other words.\n" * 300)
    out = tmp_path / "data"
    assert subprocess.run([sys.executable, "data/milton/prepare.py", "--input", str(old_text), "--out_dir", str(out)],
                          cwd=ROOT, capture_output=True, env=env()).returncode == 0
    old = {n: sha256(out / n) for n in ("train.bin", "val.bin")}
    old_id = shards.check_same_preparation([str(out / "train.bin"), str(out / "val.bin")])
    assert old_id != 0

    def train_on(data_dir):
        return train("--device=cpu", f"--init_from={base_bpe}", f"--dataset={data_dir}", f"--out_dir={tmp_path / 'run'}",
                     "--batch_size=2", "--block_size=16", "--eval_only=true", "--eval_iters=1", "--overwrite=true")

    assert prepare_killed(new_text, out, "write").returncode == -signal.SIGKILL
    assert {n: sha256(out / n) for n in old} == old
    p = train_on(out)
    assert p.returncode == 0, p.stderr
    assert prepare_killed(new_text, out, "publish").returncode == -signal.SIGKILL
    assert sha256(out / "train.bin") != old["train.bin"] and sha256(out / "val.bin") == old["val.bin"]  # mixed
    p = train_on(out)
    assert p.returncode == 2
    assert "come from different preparations" in error_line(p) and "prepare.py" in error_line(p)
    assert subprocess.run([sys.executable, "data/milton/prepare.py", "--input", str(old_text), "--out_dir", str(out)],
                          cwd=ROOT, capture_output=True, env=env()).returncode == 0
    assert {n: sha256(out / n) for n in old} == old  # the same text: the same shards, the same prep_id
    assert train_on(out).returncode == 0


def test_sample_and_eval_from_another_folder_on_a_run_from_a_relative_base(base, data, tmp_path):
    """A run trained from cwd=work with --init_from=base (a relative folder). sample.py and eval.py find
    that base from any other folder; after the base is moved they say so in one line and --base=PATH
    points at it (same output); a checkpoint that recorded only a path relative to the repo root (as
    before absolute paths were recorded) still loads."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(base, work / "base")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args("base", data, "run", "--method=lora",
                        "--max_iters=2", "--eval_interval=2", "--dropout=0.0")], cwd=work, capture_output=True, text=True,
                       timeout=300, env=env())
    assert p.returncode == 0, p.stderr
    run = work / "run"
    assert checkpoint.load(str(run))[1]["base"]["init_from"] == "base"

    def sample(*extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--device=cpu", f"--out_dir={run}",
                               "--start=!#", "--num_samples=1", "--max_new_tokens=8", "--temperature=0", *extra],
                              cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env())

    def evaluate(*extra):
        return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--device=cpu", f"--models={run}",
                               f"--datasets={data}", "--out=r.json", "--overwrite=true", *extra],
                              cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env())

    s, e = sample(), evaluate()
    assert s.returncode == 0 and e.returncode == 0, s.stderr + e.stderr
    ppl = json.loads((elsewhere / "r.json").read_text())["models"][0]["datasets"]
    os.rename(work / "base", tmp_path / "moved")
    for q in (sample(), evaluate()):
        assert q.returncode == 2 and "--base=PATH" in error_line(q)
    s2, e2 = sample(f"--base={tmp_path / 'moved'}"), evaluate(f"--base={tmp_path / 'moved'}")
    assert s2.returncode == 0 and e2.returncode == 0, s2.stderr + e2.stderr
    assert s2.stdout == s.stdout
    assert json.loads((elsewhere / "r.json").read_text())["models"][0]["datasets"] == ppl
    # an old checkpoint: only the path as given, relative to the repo root
    from safetensors.torch import load_file, save_file
    tensors, meta = load_file(run / checkpoint.CKPT_NAME), checkpoint.read_meta(str(run / checkpoint.CKPT_NAME))
    meta["base"] = {"init_from": os.path.relpath(tmp_path / "moved", ROOT), "fingerprint": meta["base"]["fingerprint"]}
    save_file(tensors, run / checkpoint.CKPT_NAME, metadata={"meta": json.dumps(meta)})
    s3 = sample()
    assert s3.returncode == 0 and s3.stdout == s.stdout, s3.stderr
