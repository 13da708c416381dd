"""Adapters in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors): exported
for transformers' GPT2LMHeadModel + peft.PeftModel.from_pretrained, and loaded back into a GPT.

    to_hf_peft(model, cfg, base)          (adapter_config dict, {key: tensor}) of our adapter layers
    write_hf_peft(model, cfg, folder, base)   the same as an adapter folder
    load_hf_peft(folder, base)            a GPT: the base with the folder's adapter merged in
    no_hf_reason(cfg)                     why a run has no HF PEFT form (None when it has one)
    export_notes(cfg)                     what a reader of the exported adapter should know

A method's HF PEFT form is its layer class's hf_peft_type: "LORA" (LoRALinear and its subclasses),
"IA3", or None with the reason in its no_hf_reason.

Export. HF PEFT can only adapt whole modules, and its LoRA keeps the base weights it is given. So:
- lora / rslora / dora on whole layers: A, B (and DoRA's m) as they are;
  keys base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r],
  .lora_magnitude_vector [out].
- q/k/v slices of c_attn: one LoRA of rank n·r on the whole c_attn with the block-structured B
  (LoRALinear.full_B); alpha' chosen so that alpha' / r' (or / √r' for rsLoRA) is still s.
  For DoRA the magnitude of rows not adapted is ‖W_row‖, so that their scale m / ‖W_row‖ is 1.
- olora / pissa: the base was mutated (W_res = W − s·B₀A₀), HF has the original W; the same
  model is W + s·(B A − B₀ A₀), a plain LoRA with A' = [A; A₀], B' = [B, −B₀], rank 2r.
- ia3: l as ia3_l, [out, 1] for output scaling, [1, in] for input (feed-forward) scaling.
- lm_head (any method): the whole adapted head, merged, as HF's modules_to_save copy
  (key base_model.model.lm_head.weight [vocab, C]), not as a LoRA/IA3 on lm_head. GPT-2's lm_head
  IS the token embedding (tied), and merge_and_unload() writes a LoRA/IA3 on lm_head into that
  shared tensor, so the input embedding would move too: a different model than the one trained,
  where only the head changed. A modules_to_save copy is a separate tensor: unmerged it replaces
  the head only, and merge_and_unload() leaves it as an untied lm_head (HF then sets
  tie_word_embeddings=False), exactly what peft.merge does. The price is vocab·C numbers in the
  adapter file (38.6M for GPT-2). HF refuses an adapter whose only target is in modules_to_save,
  so lm_head alone has no HF PEFT form (no_hf_reason says so).
GPT-2's c_attn / c_proj / c_fc are transformers Conv1D layers, hence "fan_in_fan_out": true; the
LoRA matrices keep the same [r, in] / [out, r] layout either way.
With quantize="nf4" the adapter was trained on the 4-bit base: load it on a base quantized the
same way (bitsandbytes NF4, double quantization) to get the same model. HF's merge_and_unload()
into 4-bit layers rounds W + s·B A to NF4 again; merged on base.dequantize() it is our merged model.

Loading (load_hf_peft) is the inverse, for these adapters and any HF PEFT LoRA / rsLoRA / DoRA / IA3
adapter of a GPT-2: peft.inject puts our layer of the same form on each adapted module, whole
(LoRALinear with A, B; DoRALinear with m on every row; IA3Linear with l, its side read from l's
shape), with the rank (its tensors') and alpha (alpha_pattern) HF gives that module; the tensors
are loaded into those layers and peft.merge folds them into the weights with the layers' own
merge(), so the merge math exists once, in the layer files. A q/k/v-sliced or OLoRA / PiSSA adapter
comes back as the plain LoRA it was exported as, which merges to the same weights. An adapted
head (modules_to_save) becomes lm_head, untied from wte. Training further from it (train.py
--init_from=<adapter folder>) starts from the merged model, with a new adapter of any method on top.
write_hf_peft adds one safetensors metadata entry, "gpt2_peft", naming the method and the base
precision it was trained on (quantize="nf4" for QLoRA/QDoRA, base_dtype). HF ignores it;
load_hf_peft uses it to build the base as training saw it (NF4-rounded for QLoRA), so an exported
QLoRA adapter loads back to the very model that was trained.
"""

import dataclasses
import json
import os
import re

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import hf_gpt2
import outputs
from errors import UserError
from peft import METHODS, PeftConfig, adapter_layers, inject, load_adapter_state_dict, merge
from peft.dora import DoRALinear
from peft.ia3 import IA3Linear
from peft.lora import LoRALinear
from peft.quant import dequantize, make_linear

HEAD = "lm_head"  # tied to transformer.wte: exported as a merged modules_to_save copy (see above)
PREFIX = "base_model.model."  # HF PEFT's key prefix: PeftModel -> LoraModel -> GPT2LMHeadModel
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# HF PEFT's tensor names (after PREFIX + module name) -> our layers' tensor names
TENSORS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude",
           ".ia3_l": "ia3_l"}
FULL_REASON = "full fine-tuning changes every weight, so there is no adapter: the model itself is the result"
HEAD_ALONE_REASON = ("an adapter on lm_head alone has no HF PEFT form: lm_head is tied to the token embedding, so it "
                     "would have to be exported as a whole copy (modules_to_save), and HF PEFT refuses an adapter "
                     "with no other target; the merged model (lm_head untied from the embedding) is the result")


def _target_name(module_name):
    """transformer.h.3.attn.c_attn -> attn.c_attn (what HF's target_modules match as a suffix)."""
    return ".".join(module_name.split(".")[-2:]) if module_name.startswith("transformer.h.") else module_name


def no_hf_reason(cfg):
    """None when HF PEFT can load this run's adapter on GPT-2; else why not (one sentence)."""
    cls = METHODS[cfg.method]
    if cls is None:
        return FULL_REASON
    if cls.hf_peft_type is None:
        return cls.no_hf_reason or f"HF PEFT has no form for method '{cfg.method}', so it is merged into the weights"
    if cfg.resolved_targets() == (HEAD,):
        return HEAD_ALONE_REASON
    return None


def export_notes(cfg):
    """What a reader of this run's exported adapter should know about its conversion (see above)."""
    cls = METHODS[cfg.method]
    if cls is None or not issubclass(cls, LoRALinear):
        return []
    notes = []
    if cls.factors is not None:
        notes.append(f"{cls.title} trains a residual base W − s·B₀A₀; the adapter here is converted to a plain LoRA "
                     f"of twice the rank on the original base (A' = [A; A₀], B' = [B, −B₀]), the same model.")
    if set(cfg.resolved_targets()) & {"q", "k", "v"}:
        notes.append("The q/k/v slices of GPT-2's fused c_attn are exported as one LoRA on the whole c_attn "
                     "with a block-structured B (zero rows where no slice was adapted), the same model.")
    return notes


# -----------------------------------------------------------------------------
# export


@torch.no_grad()
def to_hf_peft(model, cfg=None, base_model_name_or_path=None):
    """(adapter_config dict, {key: tensor}) of the model's adapters in HF PEFT's format."""
    cfg = cfg or getattr(model, "peft_config", None)
    cls = METHODS[cfg.method] if cfg else None
    if cls is None or cls.hf_peft_type is None:
        method = cfg.method if cfg else "full"
        forms = ", ".join(name for name, c in METHODS.items() if c is not None and c.hf_peft_type)
        raise UserError(f"method '{method}' has no Hugging Face PEFT form here; {forms} (and rsLoRA, QLoRA, "
                        f"QDoRA) can be exported (or merge and save the whole model)")
    layers = [(name, layer) for name, layer in adapter_layers(model) if name != HEAD]
    head = [layer for name, layer in adapter_layers(model) if name == HEAD]
    if not layers:
        raise UserError("an adapter on lm_head alone has no Hugging Face PEFT form (lm_head is tied to the "
                        "token embedding; see peft/hf.py); merge and save the whole model")
    targets = sorted({_target_name(name) for name, _ in layers})
    common = {"base_model_name_or_path": base_model_name_or_path, "task_type": "CAUSAL_LM",
              "target_modules": targets, "fan_in_fan_out": True, "inference_mode": True}
    tensors = {}
    if head:  # the adapted head, merged: [vocab, C]
        common["modules_to_save"] = [HEAD]
        tensors[f"{PREFIX}{HEAD}.weight"] = head[0].merge().weight.float().contiguous()
    if cls.hf_peft_type == IA3Linear.hf_peft_type:
        feedforward = sorted({_target_name(name) for name, layer in layers if layer.feedforward})
        for name, layer in layers:
            assert isinstance(layer, IA3Linear)
            tensors[f"{PREFIX}{name}.ia3_l"] = layer.hf_ia3_l().contiguous()
        return dict(common, peft_type=cls.hf_peft_type, feedforward_modules=feedforward), tensors

    ranks, alphas = {}, {}
    for name, layer in layers:
        assert isinstance(layer, LoRALinear)
        A, B = layer.lora_A.float(), layer.full_B().float()  # [R, in], [out, R]
        if layer.factors is not None:  # OLoRA / PiSSA: relative to the original base
            A = torch.cat([A, layer.lora_A0.float()])
            B = torch.cat([B, -layer.full_B(layer.lora_B0).float()], dim=1)
        R = A.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
        if isinstance(layer, DoRALinear):
            # m for every row: rows outside the adapted slices get their own norm (scale 1)
            norm = (dequantize(layer.base) + layer.delta_weight()).norm(dim=1)  # [out]
            m = norm * layer.row_scale(norm)  # = m on adapted rows, ‖W_row‖ elsewhere
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.float().contiguous()
        ranks[name] = R
        alphas[name] = layer.scale * (R ** 0.5 if cfg.use_rslora else R)  # alpha' with alpha'/R' = s
    first = layers[0][0]
    r, alpha = ranks[first], alphas[first]
    # layers whose rank differs (sliced c_attn has rank n·r): HF's rank_pattern / alpha_pattern,
    # keyed by the last name component, which HF matches as a regex suffix (.*\.)?(key)$
    rank_pattern, alpha_pattern = {}, {}
    for name in ranks:
        key = name.split(".")[-1]
        if ranks[name] != r or alphas[name] != alpha:
            if rank_pattern.get(key, ranks[name]) != ranks[name]:
                raise UserError(f"layers named {key} have different ranks; HF PEFT cannot express that")
            rank_pattern[key], alpha_pattern[key] = ranks[name], alphas[name]
    config = dict(common, peft_type=cls.hf_peft_type, r=r, lora_alpha=alpha, lora_dropout=cfg.dropout,
                  use_rslora=cfg.use_rslora, use_dora=issubclass(cls, DoRALinear), bias="none",
                  init_lora_weights=True, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return config, tensors


def write_hf_peft(model, cfg, folder, base_model_name_or_path):
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
# loading: the inverse


def is_adapter_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _pattern(patterns, name, default):
    """HF PEFT's rank_pattern / alpha_pattern lookup: the first key k with name ~ (.*\\.)?(k)$."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_hf_peft(folder):
    """(adapter_config dict, {key: float32 tensor}, the "gpt2_peft" metadata dict) of an adapter
    folder, after checking it is one load_hf_peft can use."""
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path} ({e})") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in (LoRALinear.hf_peft_type, IA3Linear.hf_peft_type):
        raise UserError(f"{folder} holds a {kind} adapter; only LoRA (and rsLoRA, DoRA) and IA3 adapters load here")
    head = config.get("modules_to_save") in ([HEAD], [f"{PREFIX}{HEAD}"])  # an adapted head (see above)
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
    head_key = f"{PREFIX}{HEAD}.weight"
    if head != (head_key in tensors):
        raise UserError(f"{weights} must hold '{head_key}' exactly when {config_path} sets modules_to_save=['lm_head']")
    return config, tensors, trained


@torch.no_grad()
def load_hf_peft(folder, base=None, dropout=0.0):
    """A GPT: the GPT-2 base (`base`, else the adapter's base_model_name_or_path) with the HF PEFT
    LoRA / rsLoRA / DoRA / IA3 adapter in `folder` merged into its weights: our layers of the same
    form, holding its tensors, then their merge() (module docstring). An adapted head
    (modules_to_save=["lm_head"]) becomes lm_head, untied from wte, as HF's merge_and_unload gives it."""
    config, tensors, trained = read_hf_peft(folder)
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{os.path.join(folder, ADAPTER_CONFIG)} names no base_model_name_or_path; "
                        f"pass the base model explicitly")
    model = hf_gpt2.load(hf_gpt2.resolve_base(base), dropout=dropout)

    # {module name: {our tensor name: HF tensor}}
    head_key = f"{PREFIX}{HEAD}.weight"
    parts = {}
    for key, t in tensors.items():
        if key == head_key:
            continue
        suffix = next((s for s in TENSORS if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise UserError(f"{weights} has a tensor '{key}' that is not a LoRA/DoRA/IA3 weight of a GPT-2")
        parts.setdefault(key[len(PREFIX):-len(suffix)], {})[TENSORS[suffix]] = t
    for name in parts:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise UserError(f"{weights} adapts '{name}', which is not a projection of this GPT-2 "
                            f"({model.config.n_layer} layers); is it the right base?")

    # which of our layers holds these tensors: IA3Linear, DoRALinear (a magnitude) or LoRALinear
    if config["peft_type"] == IA3Linear.hf_peft_type:
        cls = IA3Linear
    else:
        dora = config.get("use_dora") or any("lora_magnitude" in p for p in parts.values())
        cls = DoRALinear if dora else LoRALinear
    needs = {IA3Linear: {"ia3_l"}, LoRALinear: {"lora_A", "lora_B"},
             DoRALinear: {"lora_A", "lora_B", "lora_magnitude"}}[cls]  # the tensors of each module's layer
    hf_name = {ours: suffix.lstrip(".") for suffix, ours in TENSORS.items()}
    for name, p in parts.items():
        if set(p) != needs:
            raise UserError(f"{weights}: {name} has {', '.join(sorted(hf_name[k] for k in p))}; a module of this "
                            f"{config['peft_type']} adapter needs {', '.join(sorted(hf_name[k] for k in needs))}")

    def lora_cfg(cfg, name):  # HF's rank (the tensors') and alpha (alpha_pattern) for this module
        alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        return dataclasses.replace(cfg, r=parts[name]["lora_A"].shape[0], alpha=alpha)

    if parts:
        # inject: the base as training saw it (NF4-rounded / bf16 where it was), our layer on each module
        cfg = PeftConfig(method=cls.name, use_rslora=bool(config.get("use_rslora")), targets=tuple(parts),
                         quantize=trained.get("quantize"), base_dtype=trained.get("base_dtype"))
        if cls is not IA3Linear:
            cfg = lora_cfg(cfg, next(iter(parts)))
        inject(model, cfg)
        sd = {}
        for name, layer in adapter_layers(model):
            p = parts[name]
            if cls is IA3Linear:  # the side is l's shape: [out, 1] scales outputs, [1, in] inputs
                l, base_layer = p["ia3_l"], layer.base
                if tuple(l.shape) not in ((base_layer.out_features, 1), (1, base_layer.in_features)):
                    raise UserError(f"{weights}: {name}.ia3_l has shape {tuple(l.shape)}, expected "
                                    f"{(base_layer.out_features, 1)} or {(1, base_layer.in_features)}")
                if layer.feedforward != (l.shape[0] == 1):
                    layer = IA3Linear(base_layer, cfg, None, feedforward=l.shape[0] == 1)
                p = dict(p, ia3_l=l.reshape(-1))  # HF's [out, 1] / [1, in] -> our [out] / [in]
            else:
                own = lora_cfg(cfg, name)
                if (own.r, own.alpha) != (cfg.r, cfg.alpha):  # a module of its own rank / alpha
                    layer = cls(layer.base, own)
                A, B = p["lora_A"], p["lora_B"]
                if tuple(A.shape) != tuple(layer.lora_A.shape) or tuple(B.shape) != tuple(layer.lora_B.shape):
                    raise UserError(f"{weights}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                    f"which do not fit its {(layer.out_features, layer.in_features)} weight; "
                                    f"is it the right base?")
            model.set_submodule(name, layer)
            sd.update({f"{name}.{k}": t for k, t in p.items()})
        try:
            load_adapter_state_dict(model, sd)
        except UserError as e:
            raise UserError(f"{weights}: {e}") from None
        merge(model)  # each layer's own merge(); the NF4 / bf16 bases of other modules dequantized
    if head_key in tensors:
        W = tensors[head_key]
        if W.shape != model.lm_head.weight.shape:
            raise UserError(f"{weights}: {head_key} has shape {tuple(W.shape)}, expected "
                            f"{tuple(model.lm_head.weight.shape)}; is it the right base?")
        model.lm_head = make_linear(W, None)  # untied from wte: only the head was adapted
    return model
