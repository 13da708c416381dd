"""
Checkpoints: one safetensors file per run, written atomically, never a pickle.

    out_dir/ckpt.safetensors
        tensors   model.<name>        the trainable tensors: adapters only for a PEFT run (kilobytes
                                      to a few MB), the whole model for method='full'
                  optim.<i>.<name>    AdamW state (exp_avg, exp_avg_sq, step) of parameter i
        metadata  {"meta": JSON}      format, train config, PeftConfig, model shape, the base's
                                      identity (init_from + fingerprint), iter_num, best_val_loss

A single file is replaced with os.replace, so a reader sees the old checkpoint or the new one,
never half of one, whatever kills the writer. The base model is not saved with an adapter: it is
rebuilt from `init_from` and checked against the fingerprint recorded at training time.
"""

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import hub
import peft
from errors import UserError
from model import GPT, GPTConfig

CKPT_NAME = "ckpt.safetensors"
FORMAT = "gpt2-peft-checkpoint"
VERSION = 1


def fingerprint(model):
    """sha256 over the names, shapes, dtypes and bytes of a (plain, not yet adapted) model's weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_file_pid(name, target=CKPT_NAME):
    """The pid in `name` if it is a temp file of atomic_save_safetensors for `target`
    (".ckpt.safetensors.tmp-<pid>", left behind when a writer is killed), else None."""
    prefix = f".{target}.tmp-"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_save_safetensors(tensors, path, metadata=None):
    """Write `tensors` to `path` through a temp file in the same folder and os.replace.

    If the write fails (disk full, read-only folder) the temp file is removed, the previous file at
    `path` is untouched, and a UserError says what happened. Temp files of earlier writers that were
    killed half-way (their process is gone) are removed first, one by one, by their exact name."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    for name in os.listdir(folder):
        pid = temp_file_pid(name, os.path.basename(path))
        if pid is not None and pid != os.getpid() and not _alive(pid):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = " (the previous checkpoint is kept)" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {e.strerror or e}{kept}") from None


def optimizer_tensors(optimizer):
    """Flatten an optimizer's state into named tensors plus JSON-able param_groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def load_optimizer(optimizer, tensors, param_groups):
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save(out_dir, model, optimizer, meta):
    """Save the trainable tensors of `model`, the optimizer state and `meta` as one atomic file."""
    tensors = {f"model.{k}": v for k, v in peft.adapter_state_dict(model).items()}
    meta = dict(meta, format=FORMAT, version=VERSION)
    if optimizer is not None:
        optim, groups = optimizer_tensors(optimizer)
        tensors.update(optim)
        meta["optim_param_groups"] = groups
    atomic_save_safetensors(tensors, os.path.join(out_dir, CKPT_NAME), {"meta": json.dumps(meta)})


def read_meta(path):
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupted or truncated ({e}); restore it or start a new run") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a checkpoint written by train.py")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {meta.get('version')}, this code reads version {VERSION}")
    return meta


def load(out_dir):
    """Return (tensors, meta) of the checkpoint in out_dir; one clear error if there is none or it is broken."""
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
            raise UserError(f"{out_dir} holds a pickle checkpoint (ckpt.pt); this repo only loads safetensors checkpoints")
        raise UserError(f"no checkpoint in {out_dir} ({CKPT_NAME} missing); train first, or check --out_dir")
    meta = read_meta(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is corrupted or truncated ({e}); restore it or start a new run") from None
    return tensors, meta


def build_base(init_from, model_args, dropout=0.0):
    """The plain GPT a run starts from: a fresh one ('scratch'), a gpt2* name, a local transformers
    folder, or an HF PEFT adapter folder (its base with the adapter merged in, see hub.py)."""
    if init_from == "scratch":
        return GPT(GPTConfig(**dict(model_args, dropout=dropout)))
    if hub.is_adapter_folder(init_from):
        return hub.load_hf_peft(init_from, dropout=dropout)
    return GPT.from_pretrained(init_from, dropout=dropout)


def restore_model(tensors, meta, dropout=0.0):
    """Rebuild the model a checkpoint was saved from: base, identity check, adapters, trained tensors."""
    base = meta["base"]
    model = build_base(base["init_from"], meta["model_args"], dropout)
    if meta["model_args"]["block_size"] < model.config.block_size:
        model.crop_block_size(meta["model_args"]["block_size"])
    if base.get("fingerprint") and fingerprint(model) != base["fingerprint"]:
        raise UserError(
            f"the checkpoint was trained on base '{base['init_from']}' with fingerprint {base['fingerprint']}, "
            f"but that base now has different weights ({fingerprint(model)}); use the original base")
    cfg = peft.PeftConfig.from_dict(meta["peft"])
    peft.inject(model, cfg)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    peft.load_adapter_state_dict(model, model_sd)
    return model


def load_model(source, device="cpu", dropout=0.0, base=None):
    """A model to sample or evaluate: `source` is a training out_dir, a gpt2* name, a transformers
    folder, or an HF PEFT adapter folder (merged into `base`, else into the base its
    adapter_config.json names).

    Returns (model, meta); meta is None when the source is not a training checkpoint."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, CKPT_NAME)):
        tensors, meta = load(source)
        model = restore_model(tensors, meta, dropout)
    elif hub.is_adapter_folder(source):
        model, meta = hub.load_hf_peft(source, base, dropout), None
    else:
        model, meta = GPT.from_pretrained(source, dropout=dropout), None
    return model.to(device).eval(), meta
