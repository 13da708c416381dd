"""
The model card (README.md) that push_to_hub.py publishes with a run: Hub YAML metadata, then the base,
the method, the hyperparameters, the losses, how to load the files, and the training command.

    model_card(repo_id, meta, cfg, what, ...)   the card's text
    train_command(meta)                         `python train.py --key=value ...` that trained the run
    final_val_loss(out_dir, meta)               (val loss of the saved checkpoint, best val loss)
    merge_note(cfg)                             what HF PEFT's merge_and_unload() of the adapter gives

Everything it says about the method comes from peft/ (the layer class's title, config_fields, HF PEFT
form or the reason there is none, peft/hf.py's export notes): this file names no method.
"""

import json
import math
import os
import shlex

import configurator
import hf_gpt2
import peft
from peft.config import fields_used
from peft.hf import HEAD, export_notes, no_hf_reason

# training keys that say how the run was trained (the card lists them; I/O and logging keys it does not)
TRAIN_FIELDS = ("learning_rate", "max_iters", "batch_size", "gradient_accumulation_steps", "block_size",
                "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters",
                "min_lr", "dropout", "dtype", "seed")


def merge_note(cfg):
    """What `PeftModel.from_pretrained(base, adapter).merge_and_unload()` gives for an exported adapter
    (the card's note and push_to_hub.py's output): the merged model, and how, where that needs care."""
    note = "HF PEFT's `merge_and_unload()` of the adapter gives the merged model (the same logits, to float rounding)"
    if cfg.quantize:
        note += (" when the adapter is merged on the dequantized base: `PeftModel.from_pretrained(base.dequantize(), "
                 "...).merge_and_unload()`. Merged into the 4-bit layers instead, W + s·B A is rounded to NF4 again: "
                 "a different model")
    note += "."
    if HEAD in cfg.resolved_targets():
        note += (" GPT-2's `lm_head` is tied to the token embedding, and an HF PEFT adapter on it would be merged "
                 "into that shared tensor, moving the input embedding too; so the adapter holds the adapted head whole "
                 "(`modules_to_save`: vocab × n_embd numbers, 38.6M for GPT-2 124M), which merge_and_unload() leaves "
                 "untied from the embedding (`tie_word_embeddings=False`), as in the merged model. HF PEFT's warning "
                 "that a tied layer is part of the adapter is expected.")
    return note


def _arg(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def train_command(meta):
    """`python train.py --key=value ...` as the checkpoint recorded the run (a resumed run shows its
    base as init_from, not 'resume'): every key that differs from train.py's default, read from the
    checkpoint's "defaults" (train.py's own defaults, before config files and overrides). A checkpoint
    written before train.py recorded them has no "defaults": then every key is written out, a longer
    but equally exact command."""
    config = dict(meta["config"], init_from=meta["base"]["init_from"])
    defaults = meta.get("defaults") if isinstance(meta.get("defaults"), dict) else {}
    args = []
    for key, value in config.items():
        if key == "overwrite" or not configurator.is_key(key):  # checkpoints before 2026-11 kept train.py's EOT
            continue
        if key in defaults and value == defaults[key] and type(value) is type(defaults[key]):
            continue
        args.append(shlex.quote(f"--{key}={_arg(value)}"))
    return " ".join(["python train.py"] + args)


def final_val_loss(out_dir, meta):
    """(val loss of the saved checkpoint, best val loss): the last metrics.jsonl row at the
    checkpoint's iteration, else the checkpoint's best_val_loss."""
    best = meta.get("best_val_loss")
    best = best if isinstance(best, (int, float)) and math.isfinite(best) else None
    final = None
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(row, dict) and row.get("iter") == meta.get("iter_num") and "val/loss" in row:
                    final = row["val/loss"]
    except OSError:
        pass
    return (final if final is not None else best), best


def _table(rows):
    lines = ["| | |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def adapter_path(what):
    """Where the adapter sits in the repo: 'adapter' (what=both: the merged model is at the top),
    '' (what=adapter), or None (what=merged)."""
    return {"both": "adapter", "adapter": ""}.get(what)


def model_card(repo_id, meta, cfg, what, trainable, total, val_loss, best_val_loss, base_id,
               license="mit", datasets=(), save_dtype="float32"):
    """README.md for the Hub: YAML metadata (license, library_name, base_model, tags, datasets),
    then base, method, hyperparameters, trainable parameters, data, losses, usage and the command."""
    from huggingface_hub import ModelCardData
    config = meta["config"]
    init_from = meta["base"]["init_from"]
    merged, adapter_at = what != "adapter", adapter_path(what)
    name = peft.title(cfg)
    reason = no_hf_reason(cfg)
    adapted = peft.METHODS[cfg.method] is not None  # not full fine-tuning
    fields = fields_used(cfg.method)  # the PeftConfig fields the method's layer class reads
    tags = ["gpt2", "gpt2-peft", cfg.method if adapted else "full-fine-tuning"]
    if adapted:
        tags.append("peft")
    if cfg.use_rslora and "use_rslora" in fields:  # the Hub tag of the rank-stabilized scale (HF PEFT: use_rslora)
        tags.append("rslora")
    if cfg.quantize:
        tags += ["4-bit", "nf4", f"q{cfg.method}"]  # "q" + the method, as the Hub tags a 4-bit one
    data = ModelCardData(
        license=license,
        library_name="transformers" if merged else "peft",
        base_model=base_id,
        base_model_relation=("finetune" if merged else "adapter") if base_id else None,
        pipeline_tag="text-generation",
        tags=tags,
        datasets=list(datasets) or None,
    )

    if base_id:
        base_txt = f"[{base_id}](https://huggingface.co/{base_id})"
    elif init_from == "scratch":
        base_txt = "none (trained from scratch)"
    else:
        base_txt = f"the local GPT-2 folder `{init_from}` (not on the Hub)"
    loss_txt = f"{val_loss:.4f} (perplexity {math.exp(val_loss):.2f})" if val_loss is not None else "not measured"
    rows = [("Base model", base_txt), ("Method", name),
            ("Trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"),
            ("Dataset", f"`{config.get('dataset')}`" + (f" ({', '.join(datasets)})" if datasets else "")),
            ("Iterations", f"{meta.get('iter_num')} ({meta.get('tokens_seen', 0):,} tokens)"),
            ("Final validation loss", loss_txt)]
    if best_val_loss is not None and best_val_loss != val_loss:
        rows.append(("Best validation loss", f"{best_val_loss:.4f} (perplexity {math.exp(best_val_loss):.2f})"))
    rows += [("Library", "gpt2-peft: a nanoGPT-style PyTorch library for parameter-efficient fine-tuning of GPT-2"),
             ("Licence", license)]

    tokenizer_files = "the GPT-2 tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`)"
    files = []
    if merged:
        files.append(f"- the merged model in transformers GPT-2 format ({save_dtype}): `config.json`, "
                     f"`model.safetensors`, `generation_config.json`, and {tokenizer_files}")
    if adapter_at is not None:
        files.append(f"- {'`adapter/`: ' if adapter_at else ''}the adapter alone in Hugging Face PEFT format: "
                     f"`adapter_config.json`, `adapter_model.safetensors`" + ("" if merged else f"; and {tokenizer_files}"))
    if reason:
        files.append(f"- no PEFT adapter: {reason}.")

    base_load = base_id or init_from
    usage = ["```python"] + (["import torch"] if adapter_at is not None else []) + [
        "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if merged:
        usage += [f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")']
    if adapter_at is not None:
        usage += (["", "# or: the base model plus the adapter"] if merged else []) + ["from peft import PeftModel"]
        if cfg.quantize:
            usage += ["from transformers import BitsAndBytesConfig",
                      "# the adapter was trained on the base quantized exactly so (4-bit NF4, double quantization),",
                      "# the rest of the model (embeddings, LayerNorms, lm_head) in float32",
                      f'nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                      f"bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{cfg.base_dtype or 'float32'})",
                      f'base = AutoModelForCausalLM.from_pretrained("{base_load}", quantization_config=nf4, '
                      f'dtype=torch.float32)']
        elif cfg.base_dtype not in (None, "float32"):
            usage += [f"# the adapter was trained on the base held in {cfg.base_dtype}",
                      f'base = AutoModelForCausalLM.from_pretrained("{base_load}", dtype=torch.{cfg.base_dtype})']
        else:
            usage += ["# float32 as trained (a base stored in float16 would otherwise load in float16: logits off by ~1e-2)",
                      f'base = AutoModelForCausalLM.from_pretrained("{base_load}", dtype=torch.float32)']
        sub = f', subfolder="{adapter_at}"' if adapter_at else ""
        usage += [f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub})']
        if cfg.quantize:
            usage += ["# merged (see the notes): on the dequantized base, not into the 4-bit layers",
                      f'# model = PeftModel.from_pretrained(base.dequantize(), "{repo_id}"{sub}).merge_and_unload()']
        else:
            usage += ["model = model.merge_and_unload()  # optional: the merged model (see the notes)"]
    local = repo_id.split("/")[-1]
    usage += [f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
              f"With gpt2-peft, after `hf download {repo_id} --local-dir {local}` (sample, or train further "
              f"with `train.py --init_from=...`):", "", "```bash"]
    if merged:
        usage += [f"python sample.py --init_from={local}"]
    if adapter_at is not None:
        usage += [f"python sample.py --init_from={os.path.join(local, adapter_at)}   # the adapter on its base, merged"]
    usage += ["```"]

    peft_rows = [("method", f"`{cfg.method}`")]
    for field in fields:
        if field == "targets":
            default = " (the method's default)" if cfg.targets is None else ""
            peft_rows.append((field, ", ".join(cfg.resolved_targets()) + default))
        else:
            peft_rows.append((field, f"`{getattr(cfg, field)}`"))
    if "alpha" in fields:  # the LoRA family's s
        peft_rows.append(("scale s", f"{cfg.scale():.6g} (alpha / {'√r' if cfg.use_rslora else 'r'})"))
    train_rows = [(k, f"`{config[k]}`") for k in TRAIN_FIELDS if k in config]

    notes = [merge_note(cfg)] if adapter_at is not None else []
    if adapter_at is not None:
        notes += export_notes(cfg)  # how peft/hf.py converted the adapter
    if cfg.quantize and merged:
        notes.append(f"The merged model is the 4-bit NF4 base dequantized plus the merged adapter, saved in {save_dtype}.")
    if base_id is None and adapter_at is not None and init_from != "scratch":
        notes.append(f"The adapter's base `{init_from}` is a local folder: load the adapter on that folder.")

    how = f"with {name}" if adapted else "(every weight)"
    body = [f"# {local}", "", f"GPT-2 fine-tuned {how} on `{config.get('dataset')}` by gpt2-peft's `train.py`.", "",
            _table(rows), "", "## Files", "", *files, "", "## How to use", "", *usage, ""]
    if notes:
        body += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    gpt2 = " GPT-2's weights are released by OpenAI under the MIT licence." if hf_gpt2.hub_id(init_from) else ""
    body += ["## Method hyperparameters", "", _table(peft_rows), "",
             "## Training hyperparameters", "", _table(train_rows), "",
             "## Training command", "", "```bash", train_command(meta), "```", "",
             "## Licence", "", f"Released under the `{license}` licence.{gpt2}", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
