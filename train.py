"""
Fine-tune GPT-2, fully or with a PEFT method, on uint16 token shards. One process:

    python train.py config/finetune_shakespeare.py --method=lora --r=8

or several through torchrun (DDP; nccl on CUDA, gloo on CPU):

    torchrun --standalone --nproc_per_node=4 train.py config/finetune_shakespeare.py

Every key below can be set by a config file (plain Python) or --key=value; `--help` lists them.
Every iteration's randomness (which windows are sampled, dropout) is derived from
(seed, iteration, micro-step), so `init_from=resume` continues exactly where a run stopped.
"""

import hashlib
import importlib.util
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import configurator
import devices
import errors
import instruct
import outputs
import peft
from errors import UserError
from shards import check_same_preparation, read_shard
from tokenizer import EOT  # an UPPER_CASE constant: never a config key (configurator.is_key)

errors.install()

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = "out"
overwrite = False  # a fresh run into an out_dir that already holds a checkpoint needs this
eval_interval = 200
log_interval = 10
eval_iters = 50
eval_only = False  # evaluate the initial model and exit
always_save_checkpoint = True  # save at every eval (needed for resume); else only on a new best val loss
init_from = "gpt2"  # 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local HF folder
# logging
tensorboard_log = False  # event files in out_dir/tb
wandb_log = False
wandb_project = "gpt2-peft"
wandb_run_name = "run"
# data
dataset = "shakespeare"  # a folder under data/, or a path to a folder holding train.bin and val.bin
mask_prompt = True  # instruction data (a train_mask.bin next to train.bin): the loss on response tokens only
batch_size = 8  # micro-batch size
block_size = 256
gradient_accumulation_steps = 1  # micro-steps per iteration over all processes
# model (init_from='scratch' only, except dropout)
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50257
dropout = 0.0  # residual/attention dropout of the model itself
bias = True
# PEFT: these keys map one to one onto peft.PeftConfig fields (peft/config.py: TRAIN_KEYS)
method = "full"  # 'full' or any name in peft.METHODS
r = 8
alpha = 16.0
adapter_dropout = 0.0  # PeftConfig.dropout
targets = ()  # empty = the method's default targets; e.g. --targets=q,v or --targets=lora3
use_rslora = False
adapter_init = "kaiming"  # PeftConfig.init
oft_block_size = 32
coft_eps = 0.0
block_share = False
ether_nb = 32
flip_side = False
quantize = ""  # '' or 'nf4' (QLoRA / QDoRA)
base_dtype = ""  # '' = float32, or 'bfloat16' to store the frozen base in bf16
lora_plus_ratio = 0.0  # LoRA+: the LoRA family's B matrices train at this multiple of learning_rate (e.g. 16); 0 = off
# AdamW optimizer
learning_rate = 3e-4
max_iters = 1000
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 1000
min_lr = 3e-5
# system
backend = ""  # DDP backend: '' = nccl on CUDA, gloo on CPU
device = devices.default_device()  # cuda when a GPU is present, else cpu
dtype = "float32"  # 'float32', 'bfloat16' or 'float16' (autocast)
compile = False
seed = 1337
peak_flops = 0.0  # for MFU; 0 = look the device up in a table (measured matmul peak on CPU)
# the valid values of every key (configurator's rules), checked before anything runs
_ = configurator.ANY
domains = {
    "out_dir": configurator.PATH, "overwrite": _, "eval_interval": ">= 1", "log_interval": ">= 1", "eval_iters": ">= 1",
    "eval_only": _, "always_save_checkpoint": _, "init_from": configurator.PATH,
    "tensorboard_log": _, "wandb_log": _, "wandb_project": _, "wandb_run_name": _,
    "dataset": configurator.PATH, "mask_prompt": _, "batch_size": ">= 1", "block_size": ">= 1",
    "gradient_accumulation_steps": ">= 1",
    "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1", "vocab_size": "[1, 65536]",  # token shards are uint16
    "dropout": "[0, 1)", "bias": _,
    **peft.config.train_domains(),  # method, r, alpha, targets, ...: the rules of peft/config.py
    "learning_rate": "> 0", "max_iters": ">= 0", "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "grad_clip": ">= 0", "decay_lr": _, "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "min_lr": ">= 0",
    "backend": ("", "nccl", "gloo"), "device": configurator.DEVICE, "dtype": configurator.DTYPES, "compile": _,
    "seed": "[0, 18446744073709551615]", "peak_flops": ">= 0",
}
defaults = configurator.defaults_from(globals())
config = configurator.configure(defaults, sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

# checks across keys, that need no model: stop early, before anything is loaded or written
peft_config = peft.PeftConfig.from_train_config(config)  # validates: bad targets, quantize without bitsandbytes, ...
if init_from == "scratch" and n_embd % n_head:
    raise UserError(f"n_embd={n_embd} must be divisible by n_head={n_head} (each head gets n_embd // n_head dimensions)")
if decay_lr and min_lr > learning_rate:
    raise UserError(f"min_lr={min_lr} is above learning_rate={learning_rate}: the schedule decays to min_lr; lower --min_lr")
if wandb_log and importlib.util.find_spec("wandb") is None:
    raise UserError("--wandb_log=true needs wandb (pip install wandb); or log with --tensorboard_log=true")
device_type = devices.device_type(device)  # cuda:1 -> cuda

# DDP: one process per device, launched by torchrun
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    ddp_rank = int(os.environ["RANK"])
    ddp_local_rank = int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
    master_process = ddp_rank == 0
    if gradient_accumulation_steps % ddp_world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {ddp_world_size} processes")
    accum_per_rank = gradient_accumulation_steps // ddp_world_size
else:
    ddp_rank, ddp_world_size, master_process = 0, 1, True
    accum_per_rank = gradient_accumulation_steps
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} accum x {batch_size} batch x {block_size} tokens)")

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = devices.autocast(device, dtype)  # float32: nothing; else torch.autocast to dtype

# data: uint16 token shards. Plain text: a batch is batch_size random windows of block_size + 1 tokens.
# Instruction data (data/guanaco|alpaca|lima, written with a parallel {split}_mask.bin, 1 = response token):
# every window starts at the first token of an example (examples are separated by EOT), so the model always
# sees a whole prompt, and with mask_prompt the targets of prompt tokens are -1, which the loss ignores.
data_dir = dataset if os.path.isdir(dataset) else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
if not os.path.isdir(data_dir):
    raise UserError(f"dataset '{dataset}' not found: expected data/{dataset}/ or a folder holding train.bin and val.bin")
data_template = instruct.read_template(data_dir)  # e.g. "guanaco": saved with the checkpoint for sample.py
shards, masks, starts = {}, {}, {}
for split in ("train", "val"):
    shards[split] = data = read_shard(os.path.join(data_dir, f"{split}.bin"))
    mask_path = os.path.join(data_dir, f"{split}_mask.bin")
    if not os.path.exists(mask_path):
        if len(data) <= block_size + 1:
            raise UserError(f"{data_dir}/{split}.bin has {len(data)} tokens, fewer than block_size+1={block_size + 1}; lower --block_size or add data")
        continue
    masks[split] = mask = read_shard(mask_path, kind="mask")
    if len(mask) != len(data):
        raise UserError(f"{mask_path} has {len(mask)} items but {split}.bin has {len(data)} tokens; re-run the dataset's prepare.py")
    # example starts: 0 and every position right after an EOT, keeping those whose window holds at least one
    # response token (a window of prompt only would give an empty loss). A window that runs past the end of
    # the shard is padded with EOT tokens that carry no loss, so the last examples count too.
    ex_start = np.concatenate([[0], np.flatnonzero(data[:-1] == EOT) + 1])  # (N,)
    resp = np.flatnonzero(mask)  # positions of response tokens
    if len(resp) == 0:
        raise UserError(f"{mask_path} marks no response token (all prompt); re-run the dataset's prepare.py")
    k = np.searchsorted(resp, ex_start + 1)  # the first response token a window's targets can reach
    has_resp = (k < len(resp)) & (resp[np.minimum(k, len(resp) - 1)] <= ex_start + block_size)
    starts[split] = ex_start[has_resp]
    if len(starts[split]) == 0:
        raise UserError(f"{data_dir}/{split}.bin has no example whose first answer token lies within block_size={block_size} tokens "
                        f"of its start; raise --block_size or prepare the data with a smaller --max_length")
    long_examples = int((np.diff(np.append(ex_start, len(data))) > block_size + 1).sum())
    if long_examples and master_process:
        print(f"{split}: {long_examples:,} of {len(ex_start):,} examples are longer than block_size+1={block_size + 1} tokens; "
              f"only their first block_size+1 tokens are trained on (see data/<name>/prepare.py --max_length)")
    if master_process:
        print(f"{split}: {len(starts[split]):,} instruction examples, loss on "
              f"{'response tokens only' if mask_prompt else 'all tokens (mask_prompt=False)'}")
# train.bin, val.bin (and masks) must come from one run of prepare.py (see shards.py: prep_id)
prep_id = check_same_preparation([os.path.join(data_dir, f"{split}{kind}.bin") for split in shards
                                  for kind in ("", "_mask") if kind == "" or split in masks])
# what the checkpoint records of the data: a resume on other data is refused (prep_id: the same tokens,
# wherever the folder is now; shards without one: the same folder and token counts)
data_identity = {"dataset": dataset, "path": os.path.realpath(data_dir), "prep_id": f"{prep_id:016x}" if prep_id else None,
                 "tokens": {split: len(shards[split]) for split in shards}}


def derived_seed(*keys):
    """A seed that depends only on (seed, *keys): never on the process, the run or PYTHONHASHSEED."""
    return int.from_bytes(hashlib.blake2b(repr((seed,) + keys).encode(), digest_size=8).digest(), "little") >> 1


def window(arr, i, fill):
    """arr[i : i + block_size + 1], padded with `fill` where it runs past the end (instruction data only)."""
    w = arr[i : i + block_size + 1]
    return w if len(w) == block_size + 1 else np.concatenate([w, np.full(block_size + 1 - len(w), fill, w.dtype)])


def get_batch(split, step, micro):
    """Batch number `micro` of iteration `step`: the same windows whatever the process count."""
    data = shards[split]
    g = torch.Generator().manual_seed(derived_seed(split, step, micro))
    if split in starts:  # instruction data: windows begin at example starts
        ix = starts[split][torch.randint(len(starts[split]), (batch_size,), generator=g).numpy()].tolist()
    else:
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    windows = np.stack([window(data, i, EOT) for i in ix]).astype(np.int64)  # (B, T+1)
    if windows.max() >= model_vocab:  # on the host, before anything reaches the device
        raise UserError(f"{data_dir}/{split}.bin holds token id {windows.max()}, but the model's vocabulary has "
                        f"{model_vocab} tokens; prepare the data with this model's tokenizer")
    x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])  # (B, T), (B, T)
    if split in masks:  # no loss on padding, nor (mask_prompt) where the next token is part of a prompt
        target_pos = np.array(ix)[:, None] + 1 + np.arange(block_size)  # (B, T) position of each target
        ignore = target_pos >= len(data)
        if mask_prompt:
            ignore |= np.stack([window(masks[split], i, 0)[1:] for i in ix]) == 0  # (B, T)
        y = y.masked_fill(torch.from_numpy(ignore), -1)
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# out_dir: one writer at a time (a lock naming its pid; a killed run's lock is taken over), checked
# before the model is loaded so an unwritable out_dir fails in seconds, not at the first checkpoint
ckpt_path = os.path.join(out_dir, checkpoint.CKPT_NAME)
if master_process:
    outputs.check_output(out_dir, overwrite=True, folder=True, key="--out_dir")  # a file in the way, read-only
    created_out_dir = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}; choose another --out_dir") from None
    out_dir_lock = outputs.OutDirLock(out_dir, remove_folder=created_out_dir)

# model: the base, then the adapters
iter_num, best_val_loss = 0, float("inf")
if init_from == "resume":
    if master_process:
        print(f"resuming from {out_dir}")
    tensors, meta = checkpoint.load(out_dir)
    saved = peft.PeftConfig.from_dict(meta["peft"])
    if saved != peft_config:
        diff = {k: (v, getattr(peft_config, k)) for k, v in saved.asdict().items() if v != getattr(peft_config, k)}
        raise UserError(f"{out_dir} holds a {saved.method} run whose settings differ from this command's "
                        f"(saved, given: {diff}); pass the same settings or choose another --out_dir")
    saved_data = meta.get("data")  # absent in checkpoints written before it was recorded
    if saved_data is not None:
        if saved_data.get("prep_id") and prep_id:
            same_data = saved_data["prep_id"] == data_identity["prep_id"]
        else:
            same_data = (saved_data.get("path"), saved_data.get("tokens")) == (data_identity["path"], data_identity["tokens"])
    if saved_data is not None and not same_data:
        raise UserError(f"{out_dir} was trained on dataset '{saved_data.get('dataset')}' ({saved_data.get('path')}), but this "
                        f"command gives '{dataset}' ({data_identity['path']}), not the same prepared data; resume with the same --dataset, "
                        f"or start a new run in another --out_dir")
    if meta["model_args"]["block_size"] != block_size:
        raise UserError(f"{out_dir} was trained with block_size={meta['model_args']['block_size']}; resume with --block_size={meta['model_args']['block_size']}")
    if meta["base"]["init_from"] == "scratch":  # the model keys define a scratch model: they must agree
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "bias"):
            if config[key] != defaults[key] and config[key] != meta["model_args"][key]:
                raise UserError(f"{out_dir} holds a model with {key}={meta['model_args'][key]}, but this command sets "
                                f"{key}={config[key]}; drop --{key} to resume it, or choose another --out_dir")
    model = checkpoint.restore_model(tensors, meta, dropout, out_dir=out_dir)
    base_identity = meta["base"]
    iter_num, best_val_loss = meta["iter_num"], meta["best_val_loss"]
    if iter_num >= max_iters and master_process:
        print(f"the checkpoint is at iter {iter_num}, max_iters is {max_iters}: nothing left to train (raise --max_iters to continue)")
else:
    if os.path.exists(ckpt_path) and not overwrite:
        raise UserError(f"{out_dir} already holds a checkpoint; continue it with --init_from=resume, "
                        f"choose another --out_dir, or replace it with --overwrite=true")
    if os.path.isdir(out_dir):
        foreign = [f for f in os.listdir(out_dir) if f not in (checkpoint.CKPT_NAME, "metrics.jsonl", "tb", outputs.LOCK_NAME)
                   and not f.startswith(outputs.PROBE_PREFIX)  # another command checking it can write here
                   and checkpoint.temp_file_pid(f) is None  # a killed write's temp file is the repo's own
                   and checkpoint.temp_file_pid(f, "metrics.jsonl") is None]
        if foreign:
            raise UserError(f"{out_dir} holds files this repo did not write ({', '.join(sorted(foreign)[:3])}); choose another --out_dir")
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size, bias=bias)
    torch.manual_seed(seed)  # the same initial weights (scratch) and adapter init on every process
    init_from = checkpoint.local_base(init_from)  # e.g. models/gpt2-milton from another folder
    model = checkpoint.build_base(init_from, model_args, dropout)
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is larger than the model's {model.config.block_size} positions; use --block_size={model.config.block_size} or less")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    base_identity = checkpoint.base_identity(init_from, model, out_dir)
    peft.inject(model, peft_config)
model_args = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")}
model_vocab = model.config.vocab_size
trainable, total = peft.count_parameters(model)
params = {"trainable": trainable, "total": total}  # recorded in the checkpoint and metrics.jsonl (compare.py reads them)
if master_process:
    print(f"method {method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")
model.to(device)

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, peft.lr_scales(model))
if init_from == "resume":
    if "optim_param_groups" not in meta:
        raise UserError(f"{ckpt_path} holds no optimizer state, so it cannot be resumed; start a new run from it instead")
    checkpoint.load_optimizer(optimizer, tensors, meta["optim_param_groups"], ckpt_path)
    del tensors
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))

raw_model = model
if compile:
    if master_process:
        print("compiling the model...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)


@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches every time, split across the processes."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        ks = range(ddp_rank, eval_iters, ddp_world_size)
        bar = ks
        if master_process and eval_iters * batch_size * block_size >= 200_000:
            from tqdm import tqdm
            bar = tqdm(ks, desc=f"eval {split}", leave=False)
        for k in bar:
            X, Y = get_batch(split, -1, k)  # step -1: the fixed evaluation batches
            with ctx:
                _, loss = model(X, Y, return_logits=False)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def get_lr(it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint():
    # the loss is looked at on log and eval steps only: weights that became nan/inf since then (a stop
    # by signal saves between log steps) must never replace the last good checkpoint
    bad = next((n for n, p in raw_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise UserError(f"the weights became nan/inf by iter {iter_num} ({bad}); stopped without saving, so {ckpt_path} "
                        f"keeps the last good state. Lower --learning_rate or use --dtype=float32")
    # defaults: this file's own defaults (before config files and overrides), so a reader can tell what a
    # run changed without parsing train.py; params: its trainable and total parameter counts
    meta = {"config": config, "defaults": defaults, "params": params, "peft": peft_config.asdict(), "model_args": model_args,
            "base": base_identity, "iter_num": iter_num, "best_val_loss": best_val_loss,
            "tokens_seen": iter_num * tokens_per_iter, "template": data_template, "data": data_identity}
    global pending_metrics
    if pending_metrics is None:
        checkpoint.save(out_dir, raw_model, optimizer, meta)
        return
    # the first checkpoint of a run that replaces another (--overwrite=true): its metrics replace the old
    # run's only now, right after its checkpoint did, so a crash before leaves the old pair matching
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in pending_metrics)
        checkpoint.save(out_dir, raw_model, optimizer, meta)  # the checkpoint first, the metrics' rename right after

    checkpoint.remove_stale_temp_files(out_dir, "metrics.jsonl")
    outputs.atomic_write(os.path.join(out_dir, "metrics.jsonl"), write)
    pending_metrics = None


def log_metrics(record):
    """Append one JSON line to out_dir/metrics.jsonl (and TensorBoard / wandb when switched on). A dict
    value (params) goes to TensorBoard as one scalar per entry (params/trainable, params/total)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        if pending_metrics is not None:  # replacing an earlier run: kept until this run's first checkpoint
            pending_metrics.append(record)
        else:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    except OSError as e:  # disk full, read-only folder
        raise UserError(f"could not write {path}: {e.strerror or e}; {ckpt_path} keeps the last saved state") from None
    for key, value in record.items():
        if key != "iter" and tb_writer is not None:
            for name, v in (value.items() if isinstance(value, dict) else [("", value)]):
                tb_writer.add_scalar(f"{key}/{name}" if name else key, v, record["iter"])
    if wandb_log:
        wandb.log(record, step=record["iter"])


# logging and signals (master only)
tb_writer = None
stop_signal = []
pending_metrics = [] if init_from != "resume" and os.path.exists(ckpt_path) else None  # see save_checkpoint
if master_process:
    try:
        if init_from != "resume" and pending_metrics is None:
            open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}; choose another --out_dir") from None
    if tensorboard_log:
        from torch.utils.tensorboard import SummaryWriter
        tb_writer = SummaryWriter(os.path.join(out_dir, "tb"))
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    log_metrics({"iter": iter_num, "params": params})  # the first row of every run (and of every resumed part)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop_signal.append(signum))  # stop after this iteration

# training loop
peak = peak_flops or devices.peak_flops(device, dtype)  # MFU's denominator
X, Y = get_batch("train", iter_num, ddp_rank * accum_per_rank)
t_start = t0 = time.time()
iter_start, running_mfu = iter_num, -1.0
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:  # each group at its own multiple of lr (LoRA+: B's groups)
        group["lr"] = lr * group.get("lr_scale", 1.0)  # (checkpoints from before LoRA+ have no lr_scale)

    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        t_eval = time.time()
        losses = estimate_loss()  # the same numbers on every process
        if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
            raise UserError(f"the eval loss became {losses['val']} at iter {iter_num}; stopped without saving, so {ckpt_path} "
                            f"keeps the last good state. Lower --learning_rate or use --dtype=float32")
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_metrics({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
            if (losses["val"] < best_val_loss or always_save_checkpoint) and not eval_only:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > iter_start or iter_num == max_iters:
                    save_checkpoint()
                    print(f"saved checkpoint to {ckpt_path}")
        t0 += time.time() - t_eval  # tokens/s counts training time only
    if eval_only or iter_num >= max_iters:
        break

    # forward/backward over accum_per_rank micro-batches; the gradient is their mean
    torch.manual_seed(derived_seed("dropout", iter_num, ddp_rank))
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum_per_rank):
        if ddp:  # sync gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum_per_rank - 1
        with ctx:
            _, loss = model(X, Y, return_logits=False)
            loss = loss / accum_per_rank
        # prefetch the next batch while the backward runs (async on CUDA)
        nxt = (iter_num, ddp_rank * accum_per_rank + micro + 1) if micro + 1 < accum_per_rank else (iter_num + 1, ddp_rank * accum_per_rank)
        X, Y = get_batch("train", *nxt)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:  # the logged loss is the mean over all processes, as a single process would see it
            dist.all_reduce(loss_sum)  # gloo has no AVG: sum, then divide
            loss_sum /= ddp_world_size
        lossf = loss_sum.item()  # one host sync per log line, not per step
        if not math.isfinite(lossf):
            raise UserError(f"loss became {lossf} at iter {iter_num}; stopped without saving, so {ckpt_path} keeps the last good state. "
                            f"Lower --learning_rate or use --dtype=float32")
        t1 = time.time()
        dt = (t1 - t0) / log_interval if iter_num - iter_start >= log_interval else (t1 - t0) / (iter_num - iter_start)
        t0 = t1
        if master_process:
            tok_s = tokens_per_iter / dt
            if peak and iter_num - iter_start >= 2 * log_interval:
                mfu = raw_model.estimate_mfu(batch_size * accum_per_rank, dt, peak)
                running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            eta = (max_iters - iter_num) * (t1 - t_start) / (iter_num - iter_start)
            mfu_txt = f" | mfu {100 * running_mfu:.1f}%" if running_mfu >= 0 else ""
            print(f"iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu_txt} | eta {eta // 60:.0f}m{eta % 60:02.0f}s")
            record = {"iter": iter_num, "train/loss_step": lossf, "lr": lr, "tok_per_s": tok_s}
            if running_mfu >= 0:
                record["mfu"] = 100 * running_mfu  # percent, as printed
            if device_type == "cuda":
                record["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            log_metrics(record)

    if ddp and iter_num % log_interval == 0:  # a signal may reach one process only: stop all together
        flag = torch.tensor([float(len(stop_signal))], device=device)  # (a host sync: only on log steps)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop_signal:
            stop_signal.append("from another process")
    if stop_signal and (not ddp or iter_num % log_interval == 0):
        if master_process:
            save_checkpoint()
            print(f"stopped by signal {stop_signal[0]}; checkpoint saved at iter {iter_num} in {ckpt_path}; continue with --init_from=resume")
        break

if master_process and tb_writer is not None:
    tb_writer.close()
if ddp:
    dist.destroy_process_group()
