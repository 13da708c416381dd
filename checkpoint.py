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

import hf_gpt2
import peft
from errors import UserError
from model import GPT, GPTConfig
from peft.hf import is_adapter_folder, load_hf_peft

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


def remove_stale_temp_files(folder, target=CKPT_NAME):
    """Remove the temp files for `target` that writers killed half-way left in `folder` (their process is
    gone), one by one, by their exact name."""
    for name in os.listdir(folder):
        pid = temp_file_pid(name, target)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def atomic_save_safetensors(tensors, path, metadata=None):
    """Write `tensors` to `path` through a temp file in the same folder and os.replace.

    If the write fails (disk full, read-only folder) the temp file is removed, the previous file at
    `path` is untouched, and a UserError says what happened. Temp files of earlier writers that were
    killed half-way (their process is gone) are removed first, one by one, by their exact name."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    remove_stale_temp_files(folder, os.path.basename(path))
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


def _kind(value):
    """A JSON value's kind: 'number' for ints and floats alike, lists element by element."""
    if isinstance(value, list):
        return [_kind(v) for v in value]
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def load_optimizer(optimizer, tensors, param_groups, path=CKPT_NAME):
    """Load the saved AdamW state into `optimizer`, after checking it fits the model's parameters (group
    sizes, each moment's shape): a damaged state is one line naming `path`, not an error inside AdamW."""
    def bad(what):
        return UserError(f"{path} has a damaged optimizer state ({what}); restore the file or start a new run")
    groups = optimizer.param_groups
    if len(param_groups) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(param_groups, groups)):
        raise bad(f"param groups of {[len(g['params']) for g in param_groups]} parameters, "
                  f"the model's have {[len(g['params']) for g in groups]}")
    for i, (saved, group) in enumerate(zip(param_groups, groups)):  # hyperparameters: the kind AdamW expects
        for key, value in saved.items():
            if key != "params" and key in group and _kind(value) != _kind(json.loads(json.dumps(group[key]))):
                raise bad(f"param group {i} has {key}={json.dumps(value)[:40]}, expected a value like {json.dumps(group[key])}")
    params = [p for g in groups for p in g["params"]]  # the order optimizer.state_dict() numbers them in
    state = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            if not idx.isdigit() or int(idx) >= len(params):
                raise bad(f"{name} belongs to no parameter")
            if key in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != tuple(params[int(idx)].shape):
                raise bad(f"{name} has shape {tuple(value.shape)}, the parameter has {tuple(params[int(idx)].shape)}")
            if key == "step" and value.numel() != 1:
                raise bad(f"{name} has {value.numel()} elements, a step count has 1")
            state.setdefault(int(idx), {})[key] = value
    for idx, s in state.items():
        missing = {"exp_avg", "exp_avg_sq", "step"} - set(s)
        if missing:
            raise bad(f"parameter {idx} lacks {', '.join(sorted(missing))}")
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


# what every reader of a checkpoint relies on: key -> type (a tuple: any of them; None: JSON null)
META_SCHEMA = {"config": dict, "peft": dict, "model_args": dict, "base": dict, "iter_num": int,
               "best_val_loss": (int, float)}
MODEL_ARGS_SCHEMA = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "vocab_size": int, "bias": bool}
BASE_SCHEMA = {"init_from": str, "fingerprint": (str, type(None))}
OPTIONAL_SCHEMA = {"optim_param_groups": list, "template": (str, type(None)), "data": dict, "tokens_seen": int}  # may be absent


def _check_fields(path, where, d, schema, required=True):
    for key, types in schema.items():
        if key not in d:
            if required:
                raise UserError(f"{path} has damaged metadata: {where} has no '{key}'; restore the file or start a new run")
            continue
        value = d[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
            raise UserError(f"{path} has damaged metadata: {where}['{key}'] is {type(value).__name__} {json.dumps(value)[:40]}; "
                            f"restore the file or start a new run")


def check_meta(path, meta):
    """Check a checkpoint's metadata against the schema above, in one place, so a damaged or hand-edited
    file is one line naming it, never a KeyError deep inside train.py, sample.py, eval.py or push_to_hub.py."""
    _check_fields(path, "meta", meta, META_SCHEMA)
    _check_fields(path, "meta", meta, OPTIONAL_SCHEMA, required=False)
    _check_fields(path, "model_args", meta["model_args"], MODEL_ARGS_SCHEMA)
    _check_fields(path, "base", meta["base"], BASE_SCHEMA)
    _check_fields(path, "base", meta["base"], {"path": (str, type(None)), "path_from_out_dir": (str, type(None))}, required=False)
    _check_fields(path, "config", meta["config"], {"dtype": str, "dataset": str}, required=False)
    if not all(meta["model_args"][k] > 0 for k in MODEL_ARGS_SCHEMA if k != "bias"):
        raise UserError(f"{path} has damaged metadata: model_args {meta['model_args']} has a size <= 0; restore the file or start a new run")
    for i, group in enumerate(meta.get("optim_param_groups", [])):
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in group["params"])):
            raise UserError(f"{path} has damaged metadata: optimizer param group {i} is not a dict with a list of "
                            f"parameter indices; restore the file or start a new run")
    defaults = peft.PeftConfig().asdict()  # each saved PEFT field has its default's type (None: a str or list)
    for key, value in meta["peft"].items():
        if key in defaults:
            want = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(defaults[key]), (type(None), str, list))
            _check_fields(path, "peft", meta["peft"], {key: want})
    try:
        peft.PeftConfig.from_dict(meta["peft"])
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{path} has damaged metadata: its PEFT settings do not load ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"restore the file or start a new run") from None


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
    check_meta(path, meta)
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


ROOT = os.path.dirname(os.path.abspath(__file__))  # the repo root: old checkpoints' relative base paths start here


def base_identity(init_from, model, out_dir):
    """What a checkpoint records about its base: the name or path it was given, the weights' fingerprint,
    and for a local folder its absolute path and its path from out_dir, so it is found from any folder."""
    identity = {"init_from": init_from, "fingerprint": None if init_from == "scratch" else fingerprint(model)}
    if init_from != "scratch" and os.path.isdir(init_from):
        identity["path"] = os.path.abspath(init_from)
        identity["path_from_out_dir"] = os.path.relpath(identity["path"], os.path.abspath(out_dir))
    return identity


def local_base(init_from):
    """A relative base folder such as the configs' models/gpt2-milton, from the current folder if it is
    there, else from the repo root (as data/<name> is for --dataset), so a config works from any folder."""
    if init_from in ("scratch", "resume") or os.path.isabs(init_from) or os.path.isdir(init_from):
        return init_from
    in_repo = os.path.join(ROOT, init_from)
    return in_repo if os.path.isdir(in_repo) else init_from


def find_base(base, out_dir=None, override=None):
    """Where the base of a checkpoint is now: `override` (a script's --base) if given; else the first
    folder that exists of its recorded absolute path, its path from out_dir, and the path it was given
    (from the repo root, then from the current folder); a gpt2* name as it is. The caller checks the
    fingerprint, so a wrong folder is refused, never used."""
    init_from = base["init_from"]
    if init_from == "scratch":
        return init_from
    if override:
        if not os.path.isdir(override) and override not in hf_gpt2.HUB_MODELS:
            raise UserError(f"--base={override}: no model folder there; give the folder of the base this run was trained on")
        return override
    if base.get("path") is None and init_from in hf_gpt2.HUB_MODELS:
        return init_from
    from_out_dir = base.get("path_from_out_dir")
    candidates = [base.get("path"), os.path.normpath(os.path.join(out_dir, from_out_dir)) if out_dir and from_out_dir else None,
                  os.path.join(ROOT, init_from), init_from]
    for path in candidates:
        if path and os.path.isdir(path):
            return path
    tried = ", ".join(dict.fromkeys(p for p in candidates if p))
    raise UserError(f"the base '{init_from}' this run was trained on is not found (looked in {tried}); "
                    f"pass --base=PATH where it is now (its fingerprint is checked)")


def build_base(init_from, model_args, dropout=0.0):
    """The plain GPT a run starts from: a fresh one ('scratch'), a gpt2* name, a local transformers
    folder, or an HF PEFT adapter folder (its base with the adapter merged in, see peft/hf.py)."""
    if init_from == "scratch":
        return GPT(GPTConfig(**dict(model_args, dropout=dropout)))
    if is_adapter_folder(init_from):
        return load_hf_peft(init_from, dropout=dropout)
    return hf_gpt2.load(init_from, dropout=dropout)


def restore_model(tensors, meta, dropout=0.0, out_dir=None, base=None):
    """Rebuild the model a checkpoint was saved from: base (found by find_base; `base` overrides where),
    identity check, adapters, trained tensors."""
    identity = meta["base"]
    where = find_base(identity, out_dir, base)
    model = build_base(where, meta["model_args"], dropout)
    if meta["model_args"]["block_size"] < model.config.block_size:
        model.crop_block_size(meta["model_args"]["block_size"])
    if identity.get("fingerprint") and fingerprint(model) != identity["fingerprint"]:
        moved = f" (loaded from {where})" if where != identity["init_from"] else ""
        raise UserError(
            f"the checkpoint was trained on base '{identity['init_from']}' with fingerprint {identity['fingerprint']}, "
            f"but that base{moved} now has different weights ({fingerprint(model)}); use the original base (--base=PATH)")
    cfg = peft.PeftConfig.from_dict(meta["peft"])
    peft.inject(model, cfg)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        peft.load_adapter_state_dict(model, model_sd)
    except UserError as e:
        where = os.path.join(out_dir, CKPT_NAME) if out_dir else "the checkpoint"
        raise UserError(f"{where}: {e}") from None
    return model


def load_model(source, device="cpu", dropout=0.0, base=None):
    """A model to sample or evaluate: `source` is a training out_dir, a gpt2* name, a transformers
    folder, or an HF PEFT adapter folder (merged into `base`, else into the base its
    adapter_config.json names). For a training out_dir, `base` is where its base folder is now.

    Returns (model, meta); meta is None when the source is not a training checkpoint."""
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, CKPT_NAME)):
        tensors, meta = load(source)
        model = restore_model(tensors, meta, dropout, out_dir=source, base=base)
    elif is_adapter_folder(source):
        model, meta = load_hf_peft(source, base, dropout), None
    else:
        model, meta = hf_gpt2.load(source, dropout=dropout), None
    return model.to(device).eval(), meta
