"""Tests for shards.py: the shard format and the text -> train/val preparation."""

import os
import random

import numpy as np
import pytest

import shards
import tokenizer
from errors import UserError


def test_round_trip_tokens(tmp_path):
    path = tmp_path / "train.bin"
    ids = np.array([0, 1, 15496, 995, 50256, 65535], dtype=np.int64)
    shards.write_shard(path, ids)
    got = shards.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, ids)
    assert os.path.getsize(path) == 1024 + 2 * len(ids)
    header = np.fromfile(path, dtype="<i8", count=128)
    assert list(header[:4]) == [shards.MAGIC, shards.VERSION, len(ids), 2] and not header[4:].any()
    assert open(path, "rb").read(8) == b"PEFTSHRD"


def test_round_trip_mask(tmp_path):
    path = tmp_path / "train_mask.bin"
    mask = np.array([0, 0, 1, 1, 1, 0, 1], dtype=bool)
    shards.write_shard(path, mask, kind="mask")
    got = shards.read_shard(path, kind="mask")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, mask.astype(np.uint8))
    with pytest.raises(UserError, match="values must lie in"):
        shards.write_shard(path, [0, 2], kind="mask")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "val.bin"
    shards.write_shard(path, [1, 2, 3])
    shards.write_shard(path, [4, 5])  # overwrite in place
    assert os.listdir(tmp_path) == ["val.bin"]
    np.testing.assert_array_equal(shards.read_shard(path), [4, 5])
    with pytest.raises(UserError):  # a failed write keeps the old file and leaves nothing behind
        shards.write_shard(path, [1, 70000])
    assert os.listdir(tmp_path) == ["val.bin"]
    np.testing.assert_array_equal(shards.read_shard(path), [4, 5])


def test_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(UserError, match="65535"):
        shards.write_shard(tmp_path / "x.bin", [1, 65536])
    with pytest.raises(UserError):
        shards.write_shard(tmp_path / "x.bin", [-1, 3])
    with pytest.raises(UserError, match="no tokens"):
        shards.write_shard(tmp_path / "x.bin", [])
    assert not os.listdir(tmp_path)


def test_truncated(tmp_path):
    path = tmp_path / "train.bin"
    shards.write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(UserError, match=r"train\.bin is truncated: expected 1224 bytes .* found 1174"):
        shards.read_shard(path)
    with open(path, "r+b") as f:
        f.truncate(100)  # not even a whole header
    with pytest.raises(UserError, match=r"train\.bin is truncated"):
        shards.read_shard(path)


def test_bad_magic(tmp_path):
    path = tmp_path / "data.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # a raw nanoGPT-style .bin without our header
    with pytest.raises(UserError, match=r"data\.bin is not a token shard written by this repo \(bad magic\)"):
        shards.read_shard(path)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match="bad magic"):
        shards.read_shard(tmp_path / "empty.bin")


def test_wrong_kind_and_version(tmp_path):
    path = tmp_path / "train.bin"
    shards.write_shard(path, [1, 2, 3])
    with pytest.raises(UserError, match=r"train\.bin is a tokens shard, expected a mask shard"):
        shards.read_shard(path, kind="mask")
    shards.write_shard(tmp_path / "m.bin", [1, 0], kind="mask")
    with pytest.raises(UserError, match=r"m\.bin is a mask shard, expected a tokens shard"):
        shards.read_shard(tmp_path / "m.bin")
    raw = bytearray(path.read_bytes())
    raw[8:16] = (99).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="version 99"):
        shards.read_shard(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"missing shard .*nothere\.bin.*prepare\.py"):
        shards.read_shard(tmp_path / "nothere.bin")


def test_boundaries_keep_tokens_identical():
    """Cutting at any BOUNDARIES match never changes the tokens: encode(a) + encode(b) == encode(a + b)."""
    rng = random.Random(0)
    pieces = ["a", "Zed", " ", "  ", "\n", "\n\n", "\t", ".", "'s", "'ll", "1", "23", "é", "日", "🌍", "!?",
              " \n", "\u00a0", "\x1c", "\u3000"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        whole = tokenizer.encode(text)
        for pattern in shards.BOUNDARIES:
            for m in pattern.finditer(text):
                cut = m.start()
                assert tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) == whole, (text, cut)


def test_chunked_encoding_matches_whole(monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_CHARS", 50)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 20
    chunks = list(shards._chunks(text, size=50))
    assert len(chunks) > 10 and "".join(chunks) == text
    ids = shards.encode_docs([text])
    assert ids.dtype == np.uint16 and ids.tolist() == tokenizer.encode(text)


def test_split_docs():
    text = "".join(f"Line {i} of the play.\n\n" for i in range(100))
    train, val = shards.split_docs([text])
    assert "".join(train + val) == text
    assert 0.08 < len(val[0]) / len(text) < 0.12
    assert train[0].endswith(".") and val[0].startswith("\n\nLine")  # cut before a blank line
    # several documents: val starts inside the last one
    train, val = shards.split_docs(["a b c " * 50, "d e f " * 50])
    assert len(train) == 2 and len(val) == 1
    with pytest.raises(UserError, match="too short"):
        shards.split_docs(["hello"])


def test_prepare(tmp_path, capsys):
    docs = ["The first document.\nIt has two lines.\n", "The second document, which is longer.\n" * 10]
    train, val = shards.prepare(docs, tmp_path)
    out = capsys.readouterr().out
    assert f"train has {len(train):,} tokens" in out and f"val has {len(val):,} tokens" in out
    t, v = shards.read_shard(tmp_path / "train.bin"), shards.read_shard(tmp_path / "val.bin")
    np.testing.assert_array_equal(t, train)
    assert tokenizer.decode(t) + tokenizer.decode(v) == docs[0] + "<|endoftext|>" + docs[1]
    assert list(t).count(tokenizer.EOT) == 1  # documents are joined by one EOT


def test_read_text(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("\ufeffline one\r\nline two — ok\r\n".encode("utf-8"))
    assert shards.read_text(path) == "line one\nline two — ok\n"
    path.write_bytes(b"caf\xc3\xa9 ok\nna\xefve\n")  # latin-1 0xef at byte offset 11
    with pytest.raises(UserError, match=r"in\.txt is not UTF-8 text: invalid byte 0xef at byte offset 11"):
        shards.read_text(path)
    with pytest.raises(UserError, match="no such file"):
        shards.read_text(tmp_path / "missing.txt")


def test_download_failure_falls_back_with_one_line(monkeypatch, capsys):
    import urllib.error

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(shards.urllib.request, "urlopen", offline)
    assert shards.download_text("https://example.invalid/input.txt") is None
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "using the bundled texts" in out


def test_one_preparation_shares_one_prep_id(tmp_path):
    """write_prepared stamps every shard with a hash of all of them: the same arrays give the same id,
    other arrays another; check_same_preparation refuses a mix and accepts shards without an id (0)."""
    a, b = np.arange(100) % 256, (np.arange(100) * 3) % 256
    id1 = shards.write_prepared(str(tmp_path / "x"), {"train.bin": (a, "tokens"), "val.bin": (a, "tokens")})
    id2 = shards.write_prepared(str(tmp_path / "y"), {"train.bin": (b, "tokens"), "val.bin": (a, "tokens")})
    assert id1 != id2 and 0 not in (id1, id2)
    assert shards.write_prepared(str(tmp_path / "z"), {"train.bin": (a, "tokens"), "val.bin": (a, "tokens")}) == id1
    assert sorted(os.listdir(tmp_path / "x")) == ["train.bin", "val.bin"]  # no temp file left
    assert np.array_equal(shards.read_shard(str(tmp_path / "x" / "train.bin")), a)
    x = [str(tmp_path / "x" / n) for n in ("train.bin", "val.bin")]
    assert shards.check_same_preparation(x) == id1
    with pytest.raises(UserError, match="come from different preparations"):
        shards.check_same_preparation([x[0], str(tmp_path / "y" / "val.bin")])
    shards.write_shard(str(tmp_path / "old" / "train.bin"), a)  # shards written one by one (as before prep_ids)
    shards.write_shard(str(tmp_path / "old" / "val.bin"), a)
    assert shards.check_same_preparation([str(tmp_path / "old" / n) for n in ("train.bin", "val.bin")]) == 0
