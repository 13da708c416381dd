"""Tests for data/*/prepare.py, run as users run them: as scripts, from another folder."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import shards
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {name: os.path.join(ROOT, "data", name, "prepare.py") for name in ("shakespeare", "milton")}

TEXT = "".join(f"Speaker {i}:\nA line of verse, número {i}, with some words in it.\n\n" for i in range(40))


def run(script, *args, cwd):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def counts(stdout):
    found = dict(re.findall(r"^(train|val) has ([\d,]+) tokens$", stdout, flags=re.M))
    return int(found["train"].replace(",", "")), int(found["val"].replace(",", ""))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_prepare_input_file(name, tmp_path):
    src = tmp_path / "my text.txt"
    src.write_text(TEXT, encoding="utf-8")
    r = run(SCRIPTS[name], "--input", str(src), "--out_dir", str(tmp_path), "--offline", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n_train, n_val = counts(r.stdout)
    train, val = shards.read_shard(tmp_path / "train.bin"), shards.read_shard(tmp_path / "val.bin")
    assert (len(train), len(val)) == (n_train, n_val)
    assert 0.05 < n_val / (n_train + n_val) < 0.15
    assert tokenizer.decode(train) + tokenizer.decode(val) == TEXT
    assert np.concatenate([train, val]).tolist() == tokenizer.encode(TEXT)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_prepare_non_utf8_input(name, tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("Some lines.\nCafé au lait\n".encode("latin-1"))  # é = 0xe9, at byte offset 15
    r = run(SCRIPTS[name], "--input", str(src), "--out_dir", str(tmp_path), "--offline", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "latin1.txt" in lines[0] and "byte offset 15" in lines[0]
    assert not (tmp_path / "train.bin").exists()


def test_prepare_missing_input(tmp_path):
    r = run(SCRIPTS["milton"], "--input", "nope.txt", "--out_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: no such file: nope.txt"


def test_milton_bundled(tmp_path):
    r = run(SCRIPTS["milton"], "--out_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n_train, n_val = counts(r.stdout)
    assert n_train > 250_000 and n_val > 25_000
    train = shards.read_shard(tmp_path / "train.bin")
    assert len(train) == n_train
    assert list(train).count(tokenizer.EOT) == 5  # six works joined by EOT, all before the val cut
    assert tokenizer.decode(train[:3]).startswith("AREOPAG")  # sorted order: areopagitica.txt first


def test_shakespeare_bundled_offline(tmp_path):
    r = run(SCRIPTS["shakespeare"], "--offline", "--out_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "download" not in r.stdout  # --offline: no attempt, no fallback line
    n_train, n_val = counts(r.stdout)
    assert n_train > 250_000 and n_val > 25_000
    assert tokenizer.decode(shards.read_shard(tmp_path / "train.bin")[:5]).startswith("HAMLET")
