"""Shared test set-up: the repo root on sys.path, a deterministic CPU torch."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 256  # tiny models: token ids below 256 are single bytes in GPT-2's BPE


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny random transformers GPT-2 folder, as a user's local base model."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Token shards with some structure (a noisy repeating pattern) so the loss can fall."""
    from shards import write_shard
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, size=97)
    tokens = np.tile(pattern, 60)
    noise = rng.random(tokens.size) < 0.1
    tokens[noise] = rng.integers(0, VOCAB, size=noise.sum())
    write_shard(folder / "train.bin", tokens[:5000].astype(np.uint16))
    write_shard(folder / "val.bin", tokens[5000:].astype(np.uint16))
    return str(folder)


@pytest.fixture(scope="session")
def base_bpe(tmp_path_factory):
    """A tiny random GPT-2 with the whole GPT-2 vocabulary (50257 tokens), so real BPE text and EOT fit it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base_bpe")
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)
