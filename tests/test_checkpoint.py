"""checkpoint.py: atomic writes, clear errors on broken or foreign files, base identity checks."""
import errno
import json
import os

import pytest
import torch

import checkpoint
import hf_gpt2
import peft
from errors import UserError
from model import GPT, GPTConfig


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))


def save_run(out_dir, model, init_from="scratch", fp=None):
    meta = {"config": {}, "peft": model.peft_config.asdict(), "iter_num": 3, "best_val_loss": 1.0,
            "model_args": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")},
            "base": {"init_from": init_from, "fingerprint": fp}}
    opt = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    checkpoint.save(out_dir, model, opt, meta)
    return opt


def test_round_trip_restores_model_and_optimizer(tmp_path):
    model = peft.inject(tiny(), peft.PeftConfig(method="lora", r=2, targets=("c_attn",)))
    opt = save_run(tmp_path, model)
    tensors, meta = checkpoint.load(tmp_path)
    assert meta["iter_num"] == 3 and all(k.startswith(("model.", "optim.")) for k in tensors)
    torch.manual_seed(0)  # scratch base: the same init, then the saved adapter on top
    restored = checkpoint.restore_model(tensors, meta)
    idx = torch.arange(8)[None]
    assert torch.equal(model(idx)[0], restored(idx)[0])
    opt2 = restored.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    checkpoint.load_optimizer(opt2, tensors, meta["optim_param_groups"])
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = peft.inject(tiny(), peft.PeftConfig(method="lora", r=2, targets=("c_attn",)))
    save_run(tmp_path, model)
    before = (tmp_path / checkpoint.CKPT_NAME).read_bytes()

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(UserError, match="No space left on device .*previous checkpoint is kept"):
        save_run(tmp_path, model)
    assert (tmp_path / checkpoint.CKPT_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [checkpoint.CKPT_NAME]  # no temp file left behind


def test_broken_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.load(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="pickle checkpoint"):
        checkpoint.load(tmp_path)
    model = peft.inject(tiny(), peft.PeftConfig(method="lora", r=2, targets=("c_attn",)))
    save_run(tmp_path, model)
    path = tmp_path / checkpoint.CKPT_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted or truncated"):
        checkpoint.load(tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path), metadata={"meta": json.dumps({"format": "other"})})
    with pytest.raises(UserError, match="not a checkpoint written by train.py"):
        checkpoint.load(tmp_path)


def test_adapter_on_a_different_base_is_refused(tmp_path):
    base_dir = tmp_path / "base"
    hf_gpt2.save(tiny(seed=0), str(base_dir))
    base = hf_gpt2.load(str(base_dir))
    fp = checkpoint.fingerprint(base)
    model = peft.inject(base, peft.PeftConfig(method="lora", r=2, targets=("c_attn",)))
    save_run(tmp_path, model, init_from=str(base_dir), fp=fp)
    loaded, meta = checkpoint.load_model(str(tmp_path))  # same base: fine
    assert meta["base"]["fingerprint"] == fp
    hf_gpt2.save(tiny(seed=1), str(base_dir))  # the base folder now holds other weights
    with pytest.raises(UserError, match="different weights"):
        checkpoint.load_model(str(tmp_path))


def test_a_relative_base_is_found_from_the_repo_root_when_not_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another working folder: the configs' models/gpt2-milton is not here
    assert checkpoint.local_base("models/gpt2-milton") == os.path.join(checkpoint.ROOT, "models/gpt2-milton")
    (tmp_path / "models" / "gpt2-milton").mkdir(parents=True)  # a folder of that name here wins
    assert checkpoint.local_base("models/gpt2-milton") == "models/gpt2-milton"
    assert checkpoint.local_base("gpt2") == "gpt2" and checkpoint.local_base("scratch") == "scratch"
