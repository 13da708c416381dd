"""Shared test set-up: the repo root on sys.path, a deterministic CPU torch, the fixtures (tiny
transformers GPT-2 folders, token shards) and the small model builders the peft tests share
(tiny_gpt, randomize, batch, linear, all_logits, hf_logits: import them with `from conftest import ...`)."""
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
PEFT_VOCAB, PEFT_BLOCK = 97, 32  # tiny_gpt's vocabulary and context (a prime vocabulary: layout mistakes show)


def tiny_gpt(seed=0, n_embd=32):
    """A random tiny GPT with non-zero biases and LayerNorms (so layout mistakes show)."""
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=PEFT_BLOCK, vocab_size=PEFT_VOCAB, n_layer=2, n_head=2, n_embd=n_embd))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def randomize(model, seed=1, std=0.1):
    """Move every trainable parameter by std·N(0, 1): adapters away from their identity init."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=g).to(p))


def batch(seed=2, B=2, T=16):
    """(inputs, targets), each (B, T) token ids below PEFT_VOCAB."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PEFT_VOCAB, (B, T), generator=g), torch.randint(0, PEFT_VOCAB, (B, T), generator=g)


def all_logits(model, idx):
    """Logits of every position of our GPT: pass dummy targets (forward without targets returns the last only)."""
    with torch.no_grad():
        logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits  # (B, T, V)


def hf_logits(hf, idx):
    """Logits of every position of a transformers GPT2LMHeadModel."""
    with torch.no_grad():
        return hf(idx).logits  # (B, T, V)


def linear(in_features=48, out_features=40, seed=0):
    """A frozen random nn.Linear with a non-zero bias, to wrap in an adapter layer."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        lin.bias.normal_()
    return lin.requires_grad_(False)


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
