"""Bad input (issue #7): every mistake a user can make with the repo's commands, in one table.

Each row runs a real command as a subprocess (train.py, sample.py, eval.py, push_to_hub.py, compare.py,
bench.py, data/*/prepare.py) and asserts what a user must see: exit code 2, exactly one line on stderr,
starting with `error: ` and holding the expected words, no traceback; and that nothing already on
disk changed (every file of the row's own folder and of the shared runs, base model and data is hashed
before and after). Pickles planted by a row would create a file named PWNED if anything unpickled them.

One row per case. To add one: append a Case to CASES; `{base}`, `{data}`, `{run}`, `{scratch}`,
`{tmp}` in its command are replaced by the shared tiny base model, token shards, a finished LoRA run,
a finished from-scratch full run, and the row's own empty folder (`{moved}`: a LoRA run whose base
one row changes); `files` are written into `{tmp}` first, then `setup(tmp)` runs. Rows that could
write to a run work on a copy in `{tmp}/run` (setup=copy_run), since rows run concurrently.
The rows run two at a time (most of their time is starting Python and importing torch).

The security checks are at the end: no product file deletes recursively or loads a pickle, and the Hub
token never reaches a log, a checkpoint, an exported folder or a model card.
"""
import ast
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_TOKEN = "hf_FAKEfaultsTOKENdoNOTleak0123456789ab"
TRAIN = ["train.py", "--device=cpu", "--compile=false", "--init_from={base}", "--dataset={data}",
         "--out_dir={tmp}/out", "--batch_size=4", "--block_size=32", "--max_iters=2", "--eval_interval=2",
         "--eval_iters=1", "--method=lora", "--r=4"]
RESUME = TRAIN + ["--init_from=resume", "--max_iters=4", "--out_dir={tmp}/run"]  # later arguments win
RUN_ARGS = ["--method=lora", "--r=4"]


class Pwn:
    """Unpickling this runs os.mkdir(path): what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil_torch_file(tmp, name):
    """A torch.save file (zip + pickle, like ckpt.pt or pytorch_model.bin) whose loading with
    weights_only=False would create tmp/PWNED."""
    torch.save({"transformer.wte.weight": Pwn(os.path.join(tmp, "PWNED"))}, os.path.join(tmp, name))


# ----------------------------------------------------------------------------- row set-ups
def copy_run(tmp, which="run"):
    shutil.copytree(WORLD[which], os.path.join(tmp, "run"))
    return os.path.join(tmp, "run", "ckpt.safetensors")


def corrupt_header(tmp):
    """Flip bytes inside the safetensors JSON header (after its 8-byte length)."""
    path = copy_run(tmp)
    data = bytearray(open(path, "rb").read())
    for i in range(9, 40):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate_ckpt(tmp):
    path = copy_run(tmp)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def pickle_as_safetensors(tmp):
    """nanoGPT's habit: torch.save under the name train.py reads."""
    os.makedirs(os.path.join(tmp, "run"))
    evil_torch_file(tmp, os.path.join("run", "ckpt.safetensors"))


def raw_pickle_as_safetensors(tmp):
    os.makedirs(os.path.join(tmp, "run"))
    with open(os.path.join(tmp, "run", "ckpt.safetensors"), "wb") as f:
        pickle.dump({"w": Pwn(os.path.join(tmp, "PWNED"))}, f, protocol=2)


def pickle_ckpt_pt(tmp):
    os.makedirs(os.path.join(tmp, "run"))
    evil_torch_file(tmp, os.path.join("run", "ckpt.pt"))


def foreign_safetensors(tmp):
    from safetensors.torch import save_file
    os.makedirs(os.path.join(tmp, "run"))
    save_file({"x": torch.zeros(2)}, os.path.join(tmp, "run", "ckpt.safetensors"), metadata={"format": "pt"})


def hf_folder(tmp, weights_name=None, weights=b"", model_type="gpt2"):
    """A transformers-style folder: the shared base's config.json (model_type replaced) + weights."""
    folder = os.path.join(tmp, "model")
    os.makedirs(folder)
    config = open(os.path.join(WORLD["base"], "config.json")).read()
    open(os.path.join(folder, "config.json"), "w").write(config.replace('"gpt2"', f'"{model_type}"'))
    if weights_name:
        open(os.path.join(folder, weights_name), "wb").write(weights)
    return folder


def evil_pytorch_model_bin(tmp):
    folder = hf_folder(tmp)
    evil_torch_file(tmp, os.path.join(os.path.relpath(folder, tmp), "pytorch_model.bin"))


def pickled_adapter(tmp):
    folder = os.path.join(tmp, "adapter")
    os.makedirs(folder)
    open(os.path.join(folder, "adapter_config.json"), "w").write(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "%s"}' % WORLD["base"])
    evil_torch_file(tmp, os.path.join("adapter", "adapter_model.bin"))


def change_base_weights(tmp):
    """The base folder the `moved` run was trained on now holds other weights."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(WORLD["moved_base"], "model.safetensors")
    sd = load_file(path)
    sd = {k: v + 0.01 if k.endswith("c_attn.weight") else v for k, v in sd.items()}
    save_file(sd, path, metadata={"format": "pt"})


def shards(tmp, tokens, name="shards"):
    from shards import write_shard
    write_shard(os.path.join(tmp, name, "train.bin"), np.asarray(tokens, dtype=np.uint16))
    write_shard(os.path.join(tmp, name, "val.bin"), np.asarray(tokens, dtype=np.uint16))


def truncated_shard(tmp):
    shards(tmp, np.arange(500) % 256)
    path = os.path.join(tmp, "shards", "train.bin")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-300])


def existing_shards(tmp):
    """prepare.py rows write into {tmp}/prep, which already holds a user's prepared shards."""
    shards(tmp, np.arange(500) % 256, name="prep")


def compare_grid_out(tmp):
    os.makedirs(os.path.join(tmp, "grid"))
    open(os.path.join(tmp, "grid", "notes.txt"), "w").write("mine")


def edit_ckpt(tmp, edit_meta=None, edit_tensors=None):
    """A copy of the LoRA run whose checkpoint's metadata (JSON) or tensors were damaged by hand."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = copy_run(tmp)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(path)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path, metadata={"meta": json.dumps(meta)})


def first_optim(tensors, key):
    return next(k for k in sorted(tensors) if k.startswith("optim.") and k.endswith("." + key))


DAMAGED = {  # id -> (edit_meta, edit_tensors, what the line says)
    "no-base": (lambda m: m.pop("base"), None, "has no 'base'"),
    "no-model-args": (lambda m: m.pop("model_args"), None, "has no 'model_args'"),
    "iter-num-string": (lambda m: m.update(iter_num="12"), None, "['iter_num'] is str"),
    "base-not-a-dict": (lambda m: m.update(base="gpt2"), None, "['base'] is str"),
    "fingerprint-number": (lambda m: m["base"].update(fingerprint=7), None, "['fingerprint'] is int"),
    "peft-unknown-key": (lambda m: m["peft"].update(rank=3), None, "PEFT settings do not load"),
    "optim-wrong-shape": (None, lambda t: t.update({first_optim(t, "exp_avg"): torch.zeros(3, 5)}), "damaged optimizer state"),
    "optim-groups-mismatch": (lambda m: m["optim_param_groups"][0]["params"].pop(), None, "damaged optimizer state"),
    "optim-group-betas": (lambda m: m["optim_param_groups"][0].update(betas="x"), None, "param group 0 has betas=\"x\""),
    "optim-groups-not-list": (lambda m: m.update(optim_param_groups=[{"params": "all"}]), None, "optimizer param group 0"),
}


def damaged(name):
    edit_meta, edit_tensors, _ = DAMAGED[name]
    return lambda tmp: edit_ckpt(tmp, edit_meta, edit_tensors)


def moved_relative_base(tmp):
    """A run trained on a relative local base that is no longer there (and no absolute path recorded)."""
    edit_ckpt(tmp, lambda m: m.update(base={"init_from": "no/such/base", "fingerprint": m["base"]["fingerprint"]}))


def other_base(tmp):
    """A copy of the shared base with other weights: what --base must refuse for a run trained on the original."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(WORLD["base"], os.path.join(tmp, "other_base"))
    path = os.path.join(tmp, "other_base", "model.safetensors")
    save_file({k: v + 0.01 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def mixed_preparations(tmp):
    """An interrupted prepare.py: a new train.bin beside the val.bin of an earlier preparation."""
    from shards import write_prepared
    a, b = np.arange(500) % 256, (np.arange(500) * 7) % 256
    write_prepared(os.path.join(tmp, "shards"), {"train.bin": (a, "tokens"), "val.bin": (a, "tokens")})
    write_prepared(os.path.join(tmp, "new"), {"train.bin": (b, "tokens"), "val.bin": (b, "tokens")})
    os.replace(os.path.join(tmp, "new", "train.bin"), os.path.join(tmp, "shards", "train.bin"))


def other_dataset(tmp):
    copy_run(tmp)
    shards(tmp, np.arange(5000) % 256)


@dataclass
class Case:
    id: str
    cmd: list  # script path (from the repo root) and its arguments
    message: str  # a substring of the error line (a regex when it starts with 're:')
    files: dict = field(default_factory=dict)  # {path under {tmp}: str or bytes}
    setup: object = None  # setup(tmp) -> None, after files are written
    env: dict = field(default_factory=dict)  # extra environment (None removes a variable)
    xfail: str = ""  # reason, while the product lacks a fix


LATIN1 = "Some lines.\nCaf\u00e9 au lait\n".encode("latin-1")
GRID = ["compare.py", "--base_config=config/quickstart.py", "--out_dir={tmp}/grid"]
PUSH = ["push_to_hub.py", "--out_dir={run}", "--repo_id=someone/tiny"]
NO_HUB = {"HF_TOKEN": None, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}

CASES = [
    # --- train.py: the command line and config files
    Case("train-typo-key", TRAIN + ["--learning_rat=1"], "unknown config key 'learning_rat' on the command line; did you mean 'learning_rate'?"),
    Case("train-wrong-type", TRAIN + ["--max_iters=ten"], "--max_iters=ten: expected an int"),
    Case("train-not-a-bool", TRAIN + ["--compile=maybe"], "--compile=maybe: expected a bool"),
    Case("train-no-equals", TRAIN + ["--batch_size"], "write overrides as --key=value"),
    Case("train-config-typo", TRAIN + ["{tmp}/cfg.py"], "re:unknown config key 'learnin_rate' in .*cfg.py; did you mean 'learning_rate'",
         files={"cfg.py": "batch_size = 4\nlearnin_rate = 1e-3\n"}),
    Case("train-config-wrong-type", TRAIN + ["{tmp}/cfg.py"], "config key 'batch_size' in", files={"cfg.py": "batch_size = '8'\n"}),
    Case("train-config-syntax-error", TRAIN + ["{tmp}/cfg.py"], "re:cfg.py line 3: syntax error",
         files={"cfg.py": "batch_size = 4\n# the learning rate\nlearning_rate = 3e-4 +\nmax_iters = 2\n"}),
    Case("train-config-raises", TRAIN + ["{tmp}/cfg.py"], "re:cfg.py line 2: ZeroDivisionError",
         files={"cfg.py": "batch_size = 4\nmax_iters = 1 // 0\n"}),
    Case("train-config-missing", TRAIN + ["{tmp}/nope.py"], "config file '{tmp}/nope.py' does not exist"),
    Case("train-config-not-utf8", TRAIN + ["{tmp}/cfg.py"], "re:cfg.py.*UTF-8",
         files={"cfg.py": b"batch_size = 4\n# caf\xe9\n"}),
    # --- train.py: data
    Case("train-unknown-dataset", TRAIN + ["--dataset=no_such_dataset"], "dataset 'no_such_dataset' not found"),
    Case("train-missing-shard", TRAIN + ["--dataset={tmp}/empty"], "missing shard", files={"empty/README": "no shards"}),
    Case("train-truncated-shard", TRAIN + ["--dataset={tmp}/shards"], "train.bin is truncated", setup=truncated_shard),
    Case("train-foreign-shard", TRAIN + ["--dataset={tmp}/bad"], "not a token shard",
         files={"bad/train.bin": b"\0" * 4096, "bad/val.bin": b"\0" * 4096}),
    Case("train-shard-too-short", TRAIN + ["--dataset={tmp}/shards"], "fewer than block_size+1=33",
         setup=lambda tmp: shards(tmp, range(20))),
    Case("train-token-id-beyond-vocab", TRAIN + ["--dataset={tmp}/shards"], "holds token id 1000, but the model's vocabulary has 256 tokens",
         setup=lambda tmp: shards(tmp, [1000] * 500)),
    # --- train.py: method and model settings
    Case("train-unknown-method", TRAIN + ["--method=lorra"], "--method=lorra: unknown method (did you mean 'lora'?)"),
    Case("train-rank-too-large", TRAIN + ["--r=100"], "r=100 is too large"),
    Case("train-unknown-target", TRAIN + ["--targets=nope"], "target 'nope' matches no module"),
    Case("train-full-with-targets", TRAIN + ["--method=full", "--targets=q"], "method 'full' trains every weight, so targets does not apply"),
    Case("train-block-size-too-large", TRAIN + ["--block_size=128"], "block_size=128 is larger than the model's 64 positions"),
    Case("train-bad-dtype", TRAIN + ["--dtype=float64"], "--dtype=float64: must be one of float32, bfloat16, float16"),
    Case("train-bad-device", TRAIN + ["--device=tpu"], "--device=tpu: must be cpu, cuda, cuda:N or mps"),
    # --- train.py: the model to start from
    Case("train-missing-base", TRAIN + ["--init_from={tmp}/no-such-model"], "no model folder at '{tmp}/no-such-model'"),
    Case("train-base-not-gpt2", TRAIN + ["--init_from={tmp}/model"], "holds a llama model",
         setup=lambda tmp: hf_folder(tmp, "model.safetensors", b"", model_type="llama")),
    Case("train-base-corrupted-safetensors", TRAIN + ["--init_from={tmp}/model"], "the file is damaged or not safetensors",
         setup=lambda tmp: hf_folder(tmp, "model.safetensors", b"\x10\0\0\0\0\0\0\0{not json at all}")),
    Case("train-base-malicious-pickle", TRAIN + ["--init_from={tmp}/model"], "not a plain PyTorch state dict",
         setup=evil_pytorch_model_bin),
    Case("train-adapter-pickle-only", TRAIN + ["--init_from={tmp}/adapter"], "a pickled adapter_model.bin is not loaded",
         setup=pickled_adapter),
    # --- train.py: out_dir and resume
    Case("train-existing-checkpoint", TRAIN + ["--out_dir={tmp}/run"], "already holds a checkpoint", setup=copy_run),
    Case("train-foreign-files", TRAIN, "holds files this repo did not write (thesis.tex)", files={"out/thesis.tex": "years of work"}),
    Case("train-foreign-files-overwrite", TRAIN + ["--overwrite=true"], "holds files this repo did not write (thesis.tex)",
         files={"out/thesis.tex": "years of work"}),
    Case("train-resume-no-checkpoint", RESUME, "no checkpoint in {tmp}/run", files={"run/metrics.jsonl": ""}),
    Case("train-resume-different-method", RESUME + ["--method=dora"], "holds a lora run whose settings differ", setup=copy_run),
    Case("train-resume-different-rank", RESUME + ["--r=8"], "re:holds a lora run whose settings differ .*'r': \\(4, 8\\)", setup=copy_run),
    Case("train-resume-different-block-size", RESUME + ["--block_size=16"], "resume with --block_size=32", setup=copy_run),
    Case("train-resume-base-changed", RESUME + ["--out_dir={moved}"], "that base now has different weights", setup=change_base_weights),
    Case("train-resume-different-model-shape", RESUME + ["--method=full", "--r=8", "--n_layer=3"],
         "n_layer", setup=lambda tmp: copy_run(tmp, "scratch")),
    Case("train-resume-corrupted-header", RESUME, "ckpt.safetensors is corrupted or truncated", setup=corrupt_header),
    Case("train-resume-truncated", RESUME, "ckpt.safetensors is corrupted or truncated", setup=truncate_ckpt),
    Case("train-resume-torch-save-as-safetensors", RESUME, "ckpt.safetensors is corrupted or truncated",
         setup=pickle_as_safetensors),
    Case("train-resume-raw-pickle-as-safetensors", RESUME, "ckpt.safetensors is corrupted or truncated",
         setup=raw_pickle_as_safetensors),
    Case("train-resume-pickle-ckpt-pt", RESUME, "holds a pickle checkpoint (ckpt.pt)", setup=pickle_ckpt_pt),
    Case("train-resume-foreign-safetensors", RESUME, "not a checkpoint written by train.py", setup=foreign_safetensors),
    Case("train-resume-other-dataset", RESUME + ["--dataset={tmp}/shards"], "was trained on dataset", setup=other_dataset),
    Case("train-mixed-preparations", TRAIN + ["--dataset={tmp}/shards"], "come from different preparations", setup=mixed_preparations),
    Case("train-out-dir-is-a-file", TRAIN + ["--out_dir={tmp}/notes.txt"], "is a file, not a folder", files={"notes.txt": "mine"}),
    Case("train-out-dir-under-a-file", TRAIN + ["--out_dir={tmp}/notes.txt/out"], "{tmp}/notes.txt is a file, not a folder",
         files={"notes.txt": "mine"}),
    *[Case(f"train-resume-damaged-{name}", RESUME, what, setup=damaged(name)) for name, (_, _, what) in DAMAGED.items()],
    # --- sample.py
    Case("sample-prompt-longer-than-context", ["sample.py", "--device=cpu", "--init_from={base}", "--start=" + "!#" * 33],
         "the prompt is 66 tokens but the model's context is 64 tokens"),
    Case("sample-prompt-file-not-utf8", ["sample.py", "--device=cpu", "--init_from={base}", "--start=FILE:{tmp}/p.txt"],
         "--start=FILE:{tmp}/p.txt: not UTF-8 text", files={"p.txt": LATIN1}),
    Case("sample-prompt-file-missing", ["sample.py", "--device=cpu", "--init_from={base}", "--start=FILE:{tmp}/p.txt"], "no such file"),
    Case("sample-empty-prompt", ["sample.py", "--device=cpu", "--init_from={base}", "--start="], "--start is empty"),
    Case("sample-negative-temperature", ["sample.py", "--device=cpu", "--out_dir={run}", "--start=!", "--temperature=-1"],
         "--temperature=-1.0: must be a number >= 0"),
    Case("sample-typo-key", ["sample.py", "--device=cpu", "--out_dir={run}", "--tempreature=0"], "did you mean 'temperature'?"),
    Case("sample-no-checkpoint", ["sample.py", "--device=cpu", "--out_dir={tmp}/nothing"], "no checkpoint in {tmp}/nothing"),
    Case("sample-truncated-checkpoint", ["sample.py", "--device=cpu", "--out_dir={tmp}/run"], "corrupted or truncated", setup=truncate_ckpt),
    Case("sample-pickle-checkpoint", ["sample.py", "--device=cpu", "--out_dir={tmp}/run"], "holds a pickle checkpoint (ckpt.pt)",
         setup=pickle_ckpt_pt),
    *[Case(f"sample-damaged-{name}", ["sample.py", "--device=cpu", "--out_dir={tmp}/run"], DAMAGED[name][2], setup=damaged(name))
      for name in ("no-base", "no-model-args", "fingerprint-number")],
    Case("sample-base-moved", ["sample.py", "--device=cpu", "--out_dir={tmp}/run"], "re:base 'no/such/base' .* not found .*--base=PATH",
         setup=moved_relative_base),
    Case("sample-base-given-is-wrong", ["sample.py", "--device=cpu", "--out_dir={run}", "--base={tmp}/other_base"],
         "now has different weights", setup=other_base),
    # --- data/*/prepare.py (existing shards in {tmp}/prep must survive)
    Case("prepare-shakespeare-not-utf8", ["data/shakespeare/prepare.py", "--input", "{tmp}/in.txt", "--out_dir", "{tmp}/prep", "--offline"],
         "in.txt is not UTF-8 text: invalid byte 0xe9 at byte offset 15", files={"in.txt": LATIN1}, setup=existing_shards),
    Case("prepare-milton-not-utf8", ["data/milton/prepare.py", "--input", "{tmp}/in.txt", "--out_dir", "{tmp}/prep"],
         "in.txt is not UTF-8 text", files={"in.txt": LATIN1}, setup=existing_shards),
    Case("prepare-empty-input", ["data/shakespeare/prepare.py", "--input", "{tmp}/in.txt", "--out_dir", "{tmp}/prep", "--offline"],
         "the text is empty", files={"in.txt": ""}, setup=existing_shards),
    Case("prepare-input-too-short", ["data/shakespeare/prepare.py", "--input", "{tmp}/in.txt", "--out_dir", "{tmp}/prep", "--offline"],
         "too short to split into train and val", files={"in.txt": "a"}, setup=existing_shards),
    Case("prepare-missing-input", ["data/milton/prepare.py", "--input", "{tmp}/nope.txt", "--out_dir", "{tmp}/prep"],
         "no such file: {tmp}/nope.txt", setup=existing_shards),
    Case("prepare-out-dir-is-a-file", ["data/milton/prepare.py", "--out_dir", "{tmp}/notes.txt"], "is a file, not a folder",
         files={"notes.txt": "mine"}),
    Case("prepare-foreign-train-bin", ["data/milton/prepare.py", "--out_dir", "{tmp}/prep"], "did not write",
         files={"prep/train.bin": "my own binary file"}),
    Case("prepare-alpaca-out-dir-under-a-file", ["data/alpaca/prepare.py", "--input={tmp}/a.json", "--out_dir={tmp}/notes.txt/prep"],
         "is a file, not a folder", files={"notes.txt": "mine", "a.json": '[{"instruction": "Hi", "input": "", "output": "Hello"}]'}),
    # --- instruction data: data/guanaco|alpaca|lima/prepare.py
    Case("prepare-alpaca-wrong-schema", ["data/alpaca/prepare.py", "--input={tmp}/a.json", "--out_dir={tmp}/prep"],
         "a.json record 1 has no field 'output' (fields: instruction, input)",
         files={"a.json": '[{"instruction": "Hi", "input": "", "output": "Hello"}, {"instruction": "Bye", "input": ""}]'},
         setup=existing_shards),
    Case("prepare-guanaco-no-assistant", ["data/guanaco/prepare.py", "--input={tmp}/g.jsonl", "--out_dir={tmp}/prep"],
         "### Assistant:", files={"g.jsonl": '{"text": "### Human: a question with no answer turn"}\n'}, setup=existing_shards),
    Case("prepare-lima-empty-file", ["data/lima/prepare.py", "--input={tmp}/l.jsonl", "--out_dir={tmp}/prep"],
         "l.jsonl is empty", files={"l.jsonl": ""}, setup=existing_shards),
    Case("prepare-alpaca-not-utf8", ["data/alpaca/prepare.py", "--input={tmp}/a.json", "--out_dir={tmp}/prep"],
         "a.json is not UTF-8 text", files={"a.json": b'[{"instruction": "caf\xe9", "input": "", "output": "x"}]'},
         setup=existing_shards),
    Case("prepare-alpaca-unknown-file-type", ["data/alpaca/prepare.py", "--input={tmp}/a.csv", "--out_dir={tmp}/prep"],
         "expected a .json, .jsonl or .parquet file", files={"a.csv": "instruction,input,output\n"}),
    Case("prepare-alpaca-hub-unreachable", ["data/alpaca/prepare.py", "--out_dir={tmp}/prep"], "--input",
         env={"HF_DATASETS_OFFLINE": "1"}, setup=existing_shards),
    # --- sample.py with a prompt template
    Case("sample-unknown-template", ["sample.py", "--device=cpu", "--init_from={base}", "--template=vicuna", "--start=Hi"],
         "--template=vicuna: must be one of '', guanaco, alpaca"),
    Case("sample-guanaco-with-input", ["sample.py", "--device=cpu", "--init_from={base}", "--template=guanaco",
                                       "--start=Hi", "--template_input=x"], "the guanaco template has no input section"),
    Case("sample-input-without-template", ["sample.py", "--device=cpu", "--init_from={base}", "--start=Hi", "--template_input=x"],
         "--template_input needs --template=alpaca"),
    # --- eval.py
    Case("eval-unknown-dataset", ["eval.py", "--device=cpu", "--models={base}", "--datasets=wikitext"], "unknown dataset 'wikitext'"),
    Case("eval-wrong-schema", ["eval.py", "--device=cpu", "--models={base}", "--datasets=lambada={tmp}/l.jsonl"],
         "record 0", files={"l.jsonl": '{"sentence": "no text field"}\n'}),
    Case("eval-empty-dataset", ["eval.py", "--device=cpu", "--models={base}", "--datasets=wikitext2={tmp}/w.jsonl"],
         "no records", files={"w.jsonl": ""}),
    Case("eval-hub-unreachable", ["eval.py", "--device=cpu", "--models={base}", "--datasets=wikitext2"], "--datasets=wikitext2=",
         env={"HF_DATASETS_OFFLINE": "1"}),
    Case("eval-unknown-task", ["eval.py", "--device=cpu", "--models={base}", "--tasks=arc_challange"],
         "re:arc_challange.*did you mean.*arc_challenge"),
    Case("eval-unknown-model", ["eval.py", "--device=cpu", "--models={tmp}/nowhere", "--datasets={data}"], "{tmp}/nowhere"),
    Case("eval-out-is-a-checkpoint", ["eval.py", "--device=cpu", "--models={base}", "--datasets={data}", "--out={tmp}/run/ckpt.safetensors"],
         "already exists and holds something this command did not write", setup=copy_run),
    Case("eval-overwrite-a-checkpoint", ["eval.py", "--device=cpu", "--models={base}", "--datasets={data}",
                                         "--out={tmp}/run/ckpt.safetensors", "--overwrite=true"], "holds something this command did not write",
         setup=copy_run),
    Case("eval-out-is-a-folder", ["eval.py", "--device=cpu", "--models={base}", "--datasets={data}", "--out={tmp}/run"], "is a folder",
         setup=copy_run),
    Case("eval-out-under-a-file", ["eval.py", "--device=cpu", "--models={base}", "--datasets={data}", "--out={tmp}/notes.txt/r.json"],
         "{tmp}/notes.txt is a file, not a folder", files={"notes.txt": "mine"}),
    *[Case(f"eval-damaged-{name}", ["eval.py", "--device=cpu", "--models={tmp}/run", "--datasets={data}", "--out={tmp}/r.json"],
           DAMAGED[name][2], setup=damaged(name)) for name in ("no-model-args", "base-not-a-dict")],
    Case("eval-base-moved", ["eval.py", "--device=cpu", "--models={tmp}/run", "--datasets={data}", "--out={tmp}/r.json"],
         "--base=PATH", setup=moved_relative_base),
    # --- make_base.py: the existing model folder (by default the bundled base) is kept
    Case("make-base-existing-save-dir", ["make_base.py", "--save_dir={base}"], "already exists; replace it with --overwrite=true"),
    Case("make-base-overwrite-foreign-folder", ["make_base.py", "--save_dir={data}", "--overwrite=true"],
         "holds something this command did not write"),
    Case("make-base-save-dir-under-a-file", ["make_base.py", "--save_dir={tmp}/notes.txt/model"], "is a file, not a folder",
         files={"notes.txt": "mine"}),
    # --- push_to_hub.py
    Case("push-save-dir-under-a-file", PUSH + ["--dry_run=true", "--save_dir={tmp}/notes.txt/export"], "is a file, not a folder",
         files={"notes.txt": "mine"}),
    *[Case(f"push-damaged-{name}", ["push_to_hub.py", "--out_dir={tmp}/run", "--repo_id=a/b", "--dry_run=true", "--save_dir={tmp}/export"],
           DAMAGED[name][2], setup=damaged(name)) for name in ("no-base", "iter-num-string")],
    Case("push-base-moved", ["push_to_hub.py", "--out_dir={tmp}/run", "--repo_id=a/b", "--dry_run=true", "--save_dir={tmp}/export"],
         "--base=PATH", setup=moved_relative_base),
    Case("push-no-token", PUSH + ["--save_dir={tmp}/export"], "no Hugging Face token", env=NO_HUB),
    Case("push-save-dir-not-empty", PUSH + ["--dry_run=true", "--save_dir={tmp}/taken"], "already exists and is not an empty folder",
         files={"taken/notes.txt": "mine"}),
    Case("push-dry-run-without-save-dir", PUSH + ["--dry_run=true"], "pass --save_dir=DIR too"),
    Case("push-bad-repo-id", ["push_to_hub.py", "--out_dir={run}", "--repo_id=a/b/c"], "--repo_id=a/b/c: expected user/name"),
    Case("push-no-repo-id", ["push_to_hub.py", "--out_dir={run}"], "--repo_id is required"),
    Case("push-bad-what", PUSH + ["--what=sideways"], "--what=sideways: must be one of '', merged, adapter, both"),
    Case("push-typo-key", PUSH + ["--wat=merged"], "did you mean 'what'?"),
    Case("push-missing-out-dir", ["push_to_hub.py", "--out_dir={tmp}/nowhere", "--repo_id=a/b"], "out_dir '{tmp}/nowhere' does not exist"),
    Case("push-no-checkpoint", ["push_to_hub.py", "--out_dir={tmp}/empty", "--repo_id=a/b"], "no checkpoint in {tmp}/empty",
         files={"empty/metrics.jsonl": ""}),
    Case("push-adapter-of-full-run", ["push_to_hub.py", "--out_dir={scratch}", "--repo_id=a/b", "--what=adapter"],
         "method 'full' has no Hugging Face PEFT adapter form"),
    # --- compare.py, bench.py
    Case("compare-typo-key", GRID + ["--runz=[]"], "did you mean 'runs'?"),
    Case("compare-no-runs", GRID, "no runs"),
    Case("compare-unknown-method", GRID + ["--runs=[('x', {'method': 'lorra'})]"], "did you mean 'lora'"),
    Case("compare-setting-of-another-method", GRID + ["--runs=[('x', {'method': 'lora', 'oft_block_size': 16})]"],
         "oft_block_size does not apply to method 'lora'"),
    Case("compare-foreign-out-dir", GRID + ["--runs=[('x', {'method': 'lora'})]"], "not a compare.py output folder", setup=compare_grid_out),
    Case("bench-typo-key", ["bench.py", "--metod=lora"], "did you mean 'method'?"),
    Case("bench-unknown-method", ["bench.py", "--method=lorra"], "--method=lorra: choose 'all' or one of"),
    # --- every key has a declared domain, checked before anything runs (configurator.py's rules)
    *[Case(f"train-domain-{arg[2:].split('=')[0]}", TRAIN + [arg], msg) for arg, msg in [
        ("--batch_size=0", "--batch_size=0: must be an integer >= 1"),
        ("--gradient_accumulation_steps=0", "--gradient_accumulation_steps=0: must be an integer >= 1"),
        ("--max_iters=-1", "--max_iters=-1: must be an integer >= 0"),
        ("--learning_rate=nan", "--learning_rate=nan: must be a finite number"),
        ("--grad_clip=-1", "--grad_clip=-1.0: must be a number >= 0"),
        ("--eval_interval=0", "--eval_interval=0: must be an integer >= 1"),
        ("--log_interval=-5", "--log_interval=-5: must be an integer >= 1"),
        ("--eval_iters=0", "--eval_iters=0: must be an integer >= 1"),
        ("--dropout=1.5", "--dropout=1.5: must be a number in [0, 1)"),
        ("--adapter_dropout=-0.1", "--adapter_dropout=-0.1: must be a number in [0, 1)"),
        ("--alpha=0", "--alpha=0.0: must be a number > 0"),
        ("--oft_block_size=1", "--oft_block_size=1: must be an integer >= 2"),
        ("--ether_nb=0", "--ether_nb=0: must be an integer >= 1"),
        ("--r=-4", "--r=-4: must be an integer >= 1"),
        ("--beta2=1.0", "--beta2=1.0: must be a number in [0, 1)"),
        ("--weight_decay=-0.1", "--weight_decay=-0.1: must be a number >= 0"),
        ("--warmup_iters=-1", "--warmup_iters=-1: must be an integer >= 0"),
        ("--min_lr=inf", "--min_lr=inf: must be a finite number"),
        ("--block_size=0", "--block_size=0: must be an integer >= 1"),
        ("--vocab_size=70000", "--vocab_size=70000: must be an integer in [1, 65536]"),
        ("--seed=-1", "--seed=-1: must be an integer in [0, 18446744073709551615]"),
        ("--quantize=int4", "--quantize=int4: must be one of '', nf4"),
        ("--backend=mpi", "--backend=mpi: must be one of '', nccl, gloo"),
        ("--out_dir=", "--out_dir=: must not be empty"),
        ("--device=cuda", "CUDA is not available on this machine"),
    ]],
    Case("train-scratch-heads-do-not-divide", TRAIN + ["--init_from=scratch", "--method=full", "--r=8", "--n_embd=100", "--n_head=12"],
         "n_embd=100 must be divisible by n_head=12"),
    Case("train-min-lr-above-lr", TRAIN + ["--learning_rate=1e-4", "--min_lr=1e-3"], "min_lr=0.001 is above learning_rate=0.0001"),
    Case("train-config-sets-none", TRAIN + ["{tmp}/cfg.py"], "re:config key 'batch_size' in .*cfg.py is None, but it must be of type int",
         files={"cfg.py": "batch_size = None\n"}),
    Case("train-config-domain", TRAIN + ["{tmp}/cfg.py"], "re:--learning_rate=-0.001 \\(set in .*cfg.py\\): must be a number > 0",
         files={"cfg.py": "learning_rate = -1e-3\n"}),
    Case("train-config-calls-exit", TRAIN + ["{tmp}/cfg.py"], "re:cfg.py calls exit\\(0\\); a config file only sets keys",
         files={"cfg.py": "import sys\nbatch_size = 4\nsys.exit(0)\n"}),
    Case("train-wandb-not-installed", TRAIN + ["--wandb_log=true"], "--wandb_log=true needs wandb"),  # not in requirements.txt
    Case("train-constant-is-not-a-key", TRAIN + ["--EOT=5"], "unknown config key 'EOT' on the command line"),
    Case("sample-temperature-nan", ["sample.py", "--init_from={base}", "--temperature=nan"], "--temperature=nan: must be a finite number"),
    Case("sample-num-samples-negative", ["sample.py", "--init_from={base}", "--num_samples=-2"], "--num_samples=-2: must be an integer >= 1"),
    Case("sample-max-new-tokens-negative", ["sample.py", "--init_from={base}", "--max_new_tokens=-5"],
         "--max_new_tokens=-5: must be an integer >= 1"),
    Case("sample-top-p-zero", ["sample.py", "--init_from={base}", "--top_p=0"], "--top_p=0.0: must be a number in (0, 1]"),
    Case("sample-device-tpu", ["sample.py", "--init_from={base}", "--device=tpu"], "--device=tpu: must be cpu, cuda, cuda:N or mps"),
    Case("eval-device-tpu", ["eval.py", "--models={base}", "--device=tpu"], "--device=tpu: must be cpu, cuda, cuda:N or mps"),
    Case("eval-limit-negative", ["eval.py", "--models={base}", "--limit=-5"], "--limit=-5: must be an integer >= 0"),
    Case("eval-stride-negative", ["eval.py", "--models={base}", "--stride=-1"], "--stride=-1: must be an integer >= 0"),
    Case("eval-no-models", ["eval.py", "--models="], "--models=: give at least one model"),
    Case("bench-out-not-ours", ["bench.py", "--out={tmp}/notes.json", "--overwrite=true"],
         "holds something this command did not write", files={"notes.json": '{"mine": 1}'}),
    Case("bench-out-exists", ["bench.py", "--out={tmp}/b.json"], "already exists; replace it with --overwrite=true",
         files={"b.json": '{"machine": 1, "settings": 1, "results": 1, "goals": 1, "total_s": 1}'}),
    Case("bench-out-under-a-file", ["bench.py", "--out={tmp}/notes.txt/b.json"], "is a file, not a folder",
         files={"notes.txt": "mine"}),
    Case("bench-batch-size-zero", ["bench.py", "--batch_size=0"], "--batch_size=0: must be an integer >= 1"),
    Case("bench-steps-nan", ["bench.py", "--learning_rate=nan"], "--learning_rate=nan: must be a finite number"),
    Case("compare-max-runs-negative", GRID + ["--max_runs=-1"], "--max_runs=-1: must be an integer >= 0"),
    Case("compare-run-lr-nan", GRID + ["{tmp}/g.py"], "run 'x': learning_rate nan must be a positive finite number",
         files={"g.py": "runs = [('x', dict(method='lora', learning_rate=float('nan')))]\n"}),
    Case("compare-common-batch-zero", GRID + ["--runs=[('x', {'method': 'lora'})]", "{tmp}/g.py"],
         "run 'x': --batch_size=0: must be an integer >= 1", files={"g.py": "common = dict(batch_size=0)\n"}),
    Case("make-base-empty-save-dir", ["make_base.py", "--save_dir="], "--save_dir=: must not be empty"),
    Case("prepare-val-fraction-nan", ["data/shakespeare/prepare.py", "--offline", "--out_dir={tmp}/prep", "--val_fraction=nan"],
         "--val_fraction=nan: must be a finite number", setup=existing_shards),
    Case("prepare-val-fraction-one", ["data/milton/prepare.py", "--out_dir={tmp}/prep", "--val_fraction=1"],
         "--val_fraction=1.0: must be a number in (0, 1)", setup=existing_shards),
    Case("prepare-argparse-unknown-flag", ["data/shakespeare/prepare.py", "--offline", "--outdir={tmp}/prep"],
         "unrecognized arguments: --outdir", setup=existing_shards),
    Case("prepare-argparse-bad-int", ["data/alpaca/prepare.py", "--max_length=lots", "--out_dir={tmp}/prep"],
         "argument --max_length: invalid int value: 'lots'", setup=existing_shards),
    Case("prepare-max-length-one", ["data/lima/prepare.py", "--max_length=1", "--out_dir={tmp}/prep"],
         "--max_length=1: must be an integer >= 2", setup=existing_shards),
]
assert len({c.id for c in CASES}) == len(CASES)

WORLD = {}  # the shared folders, filled by the `world` fixture (set-ups read them)


def run_env(tmp, extra=None):
    e = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "PYTHONPATH")}
    e.update(OMP_NUM_THREADS="1", HF_HOME=os.path.join(tmp, ".hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_HUB_DISABLE_TELEMETRY="1")
    for k, v in (extra or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def fill(text, ctx):
    return re.sub(r"\{(\w+)\}", lambda m: ctx.get(m.group(1), m.group(0)), text)


def snapshot(*roots):
    """{path: sha256} of every file under roots."""
    out = {}
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(base, data, tmp_path_factory):
    """A finished LoRA run, a finished from-scratch full run, and a LoRA run on a base copy that one row
    changes; trained at once. The LoRA run sees the (fake) Hub token in its environment and logs to
    TensorBoard, for the token test."""
    tmp = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(base, tmp / "moved_base")
    WORLD.update(base=base, data=data, run=str(tmp / "run"), scratch=str(tmp / "scratch"),
                 moved=str(tmp / "moved"), moved_base=str(tmp / "moved_base"))
    common = ["train.py", "--device=cpu", "--compile=false", f"--dataset={data}", "--batch_size=4", "--block_size=32",
              "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1"]
    jobs = {
        "run": common + [f"--init_from={base}", f"--out_dir={tmp / 'run'}", *RUN_ARGS, "--tensorboard_log=true"],
        "scratch": common + ["--init_from=scratch", f"--out_dir={tmp / 'scratch'}", "--method=full", "--n_layer=2",
                             "--n_head=2", "--n_embd=32", "--vocab_size=256"],
        "moved": common + [f"--init_from={tmp / 'moved_base'}", f"--out_dir={tmp / 'moved'}", *RUN_ARGS],
    }
    token_env = run_env(str(tmp), {"HF_TOKEN": FAKE_TOKEN})
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=token_env) for name, cmd in jobs.items()}
    outputs = {}
    for name, p in procs.items():
        outputs[name] = p.communicate(timeout=600)
        assert p.returncode == 0, outputs[name][1]
    WORLD["outputs"] = outputs
    return dict(WORLD)


def run_case(case, world, tmp):
    """Set up, snapshot, run, snapshot: everything a row's assertions need."""
    os.makedirs(tmp)
    ctx = dict(world, tmp=tmp)
    for name, content in case.files.items():
        path = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    if case.setup is not None:
        case.setup(tmp)
    shared = [world[k] for k in ("base", "data", "run", "scratch", "moved")]
    before = snapshot(tmp, *shared)
    cmd = [sys.executable] + [fill(a, ctx) for a in case.cmd]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=run_env(tmp, case.env))
    return {"p": p, "before": before, "after": snapshot(tmp, *shared), "ctx": ctx}


@pytest.fixture(scope="module")
def results(world, tmp_path_factory, request):
    """Every selected row, run two at a time."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "callspec", None) and isinstance(item.callspec.params.get("case"), Case)}
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(run_case, c, world, str(root / c.id)) for c in CASES if c.id in selected}
    return {cid: f for cid, f in futures.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
                                  for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, results):
    r = results[case.id].result()  # re-raises a failed set-up
    p, ctx = r["p"], r["ctx"]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    message = fill(case.message, ctx)
    if message.startswith("re:"):
        assert re.search(message[3:], lines[0]), (message, lines[0])
    else:
        assert message in lines[0], (message, lines[0])
    assert p.returncode == 2, (p.returncode, lines[0])
    lost = {path for path, digest in r["before"].items() if r["after"].get(path) != digest}
    assert not lost, f"changed or deleted: {sorted(lost)}"
    new_shared = set(r["after"]) - set(r["before"])
    assert not {path for path in new_shared if not path.startswith(ctx["tmp"])}, new_shared
    assert not os.path.exists(os.path.join(ctx["tmp"], "PWNED")), "a pickle was loaded"


def test_the_planted_pickles_would_run_code_if_loaded(tmp_path):
    """The pickle rows mean something: loading their files without weights_only runs the payload."""
    evil_torch_file(str(tmp_path), "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "PWNED").is_dir()
    os.rmdir(tmp_path / "PWNED")
    raw_pickle_as_safetensors(str(tmp_path))
    with open(tmp_path / "run" / "ckpt.safetensors", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "PWNED").is_dir()


# ----------------------------------------------------------------------------- security
def product_files():
    """The repo's own Python files: everything but tests, the venv, outputs and caches."""
    skip = {".venv", ".git", "tests", "__pycache__", ".pytest_cache"}
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in skip and not x.startswith("out")]
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(d, n)


def dangerous_calls(source):
    """(line, what) for recursive deletes and pickle loads in Python source."""
    found = [(i, "rm -r") for i, line in enumerate(source.splitlines(), 1) if re.search(r"\brm\s+-[a-zA-Z]*[rR]", line)]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in ("rmtree", "removedirs"):
            found.append((node.lineno, f"{owner}.{name}"))
        elif owner in ("pickle", "cPickle", "dill", "joblib", "marshal") and name in ("load", "loads"):
            found.append((node.lineno, f"{owner}.{name}"))
        elif name == "Unpickler":
            found.append((node.lineno, "Unpickler"))
        elif owner == "torch" and name == "load":
            w = kwargs.get("weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "load" and isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value:
            found.append((node.lineno, "load(allow_pickle=True)"))
    return found


def test_the_security_scan_finds_what_it_looks_for():
    bad = ("import shutil, os, pickle, torch, numpy as np\nshutil.rmtree('x')\nos.removedirs('a/b')\n"
           "pickle.load(f)\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
           "np.load('a.npy', allow_pickle=True)\nos.system('rm -rf /tmp/x')\npickle.Unpickler(f).load()\n")
    assert sorted(what for _, what in dangerous_calls(bad)) == sorted([
        "rm -r", "shutil.rmtree", "os.removedirs", "pickle.load", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "load(allow_pickle=True)", "Unpickler"])
    assert dangerous_calls("torch.load(p, map_location='cpu', weights_only=True)\nos.remove(p)\nos.rmdir(d)\n") == []


def test_no_product_file_deletes_recursively_or_loads_a_pickle():
    files = list(product_files())
    assert any(f.endswith("train.py") for f in files) and any(os.sep + "peft" + os.sep in f for f in files)
    found = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            hits = dangerous_calls(f.read())
        if hits:
            found[os.path.relpath(path, ROOT)] = hits
    assert not found, found


def test_hub_token_is_never_written(world, tmp_path):
    """The LoRA run trained with HF_TOKEN set (and TensorBoard on); push_to_hub.py --dry_run exports it
    with the token set. The token is in no output, no file of the run (checkpoint, metrics.jsonl, event
    files), and no file of the export (model card, merged model, adapter)."""
    save_dir = tmp_path / "export"
    p = subprocess.run([sys.executable, "push_to_hub.py", f"--out_dir={world['run']}", "--repo_id=someone/tiny",
                        "--dry_run=true", f"--save_dir={save_dir}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=run_env(str(tmp_path), {"HF_TOKEN": FAKE_TOKEN}))
    assert p.returncode == 0, p.stderr
    files = {os.path.join(d, n): os.path.relpath(os.path.join(d, n), root)
             for root in (world["run"], str(save_dir)) for d, _, ns in os.walk(root) for n in ns}
    names = set(files.values())
    assert {"ckpt.safetensors", "metrics.jsonl", "README.md", "model.safetensors"} <= names
    assert any(n.startswith("tb" + os.sep) for n in names), names  # TensorBoard event files are checked too
    for f in files:
        assert FAKE_TOKEN.encode() not in open(f, "rb").read(), f
    outputs = [p.stdout, p.stderr] + [s for out in world["outputs"].values() for s in out]
    assert not [o for o in outputs if FAKE_TOKEN in o]
