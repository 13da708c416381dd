"""Parameter-efficient fine-tuning for model.GPT: adapters that wrap the model's nn.Linear layers.

    cfg = PeftConfig(method="lora", r=8, alpha=16, targets=("q", "v"))
    inject(model, cfg)                  # in place: freeze everything, wrap the targets
    ... train: only adapter parameters have requires_grad ...
    sd = adapter_state_dict(model)      # the small tensors to save
    load_adapter_state_dict(model, sd)  # into a model given the same inject(model, cfg)
    merge(model)                        # in place: back to a plain GPT with the update folded in

Every method is one layer class (METHODS below) that owns the frozen base Linear as `.base`,
computes the adapted layer in forward(x) and folds itself into one nn.Linear in merge(). Its class
attributes are all the repo knows about the method: name (the registry key), title, default_targets,
all_targets, config_fields, supports_quantize, lora_plus_params, hf_peft_type / no_hf_reason (its
Hugging Face PEFT form, peft/hf.py), and for bench.py the classmethod hf_peft_counterpart(cfg) (what
HF peft runs as the same adapter) and bench_goal_vs_lora (its step time relative to BENCH_REFERENCE's).
A new method is one new file plus one line in METHODS.
Adapter tensors are named after the wrapped module, e.g. for LoRA on c_attn
    transformer.h.0.attn.c_attn.lora_A, transformer.h.0.attn.c_attn.lora_B
(the frozen base is transformer.h.0.attn.c_attn.base.weight, not part of the adapter).
"""

import torch.nn as nn

from errors import UserError
from peft import quant
from peft.config import PRESETS, PeftConfig
from peft.dora import DoRALinear
from peft.ether import ETHERLinear, ETHERPlusHHLinear, ETHERPlusLinear
from peft.ia3 import IA3Linear
from peft.lora import LoRALinear, OLoRALinear, PiSSALinear
from peft.oft import OFTLinear
from peft.slices import QKV

__all__ = ["METHODS", "PeftConfig", "inject", "merge", "adapter_state_dict", "load_adapter_state_dict",
           "count_parameters", "adapter_layers", "lr_scales", "title", "PRESETS"]

METHODS = {"full": None} | {cls.name: cls for cls in (  # "full": fine-tune every weight; no adapter
    LoRALinear,         # Hu et al. 2021; rsLoRA = lora with use_rslora=True
    DoRALinear,         # Liu et al. 2024, LoRA + learned row magnitudes
    OLoRALinear,        # Büyükakyüz 2024, LoRA started from a QR of W
    PiSSALinear,        # Meng et al. 2024, LoRA started from the top singular vectors of W
    OFTLinear,          # Qiu et al. 2023, block-diagonal orthogonal rotation of the input
    ETHERLinear,        # Bini et al. 2024, block Householder reflections
    ETHERPlusLinear,    # ETHER+, one side
    ETHERPlusHHLinear,  # ETHER+, both sides of the weight
    IA3Linear,          # Liu et al. 2022, learned scaling of activations
)}
BENCH_REFERENCE = "lora"  # bench.py's step-time goals (the classes' bench_goal_vs_lora) are relative to it


def adapter_layers(model):
    """[(name, layer)] of every adapter layer in the model, in module order."""
    classes = tuple({c for c in METHODS.values() if c is not None})
    return [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]


def resolve_targets(model, targets):
    """{module name: None (whole layer) or a tuple of q/k/v slices} for the target names.

    A target matches every module whose name equals it or ends with "." + it; "q", "k", "v" match
    the fused c_attn layers and select rows of them. Each target must match at least one Linear."""
    names = [name for name, _ in model.named_modules() if name]
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    valid = sorted({".".join(n.split(".")[-2:]) if n.startswith("transformer.h.") else n for n in linears})
    plan = {}
    for t in targets:
        lookup = "c_attn" if t in QKV else t
        hits = [n for n in names if n == lookup or n.endswith("." + lookup)]
        if not hits:
            raise UserError(f"target '{t}' matches no module of the model; valid targets: "
                            f"{', '.join(valid + list(QKV) + list(PRESETS) + ['all'])}")
        for n in hits:
            if n not in linears:
                raise UserError(f"target '{t}' matches {n}, a {type(model.get_submodule(n)).__name__}; "
                                f"only Linear layers can be adapted ({', '.join(valid)})")
            if t in QKV:
                if n in plan and plan[n] is None:
                    raise UserError(f"targets adapt {n} both whole and by its '{t}' slice; use one or the other")
                plan[n] = tuple(s for s in QKV if s in (plan.get(n) or ()) + (t,))
            else:
                if n in plan and plan[n] is not None:
                    raise UserError(f"targets adapt {n} both whole and by its {'/'.join(plan[n])} slices; "
                                    f"use one or the other")
                plan[n] = None
    return plan


def leave_out_hint(cfg, name):
    """'; or leave lm_head out: --targets=lora3': the targets without those that match module `name`."""
    targets = cfg.resolved_targets()
    hits = [t for t in targets if name == t or name.endswith("." + ("c_attn" if t in QKV else t))]
    rest = tuple(t for t in targets if t not in hits)
    if not rest:
        return ""
    preset = next((p for p, ts in PRESETS.items() if ts == rest), None)
    return f"; or leave {'/'.join(hits)} out: --targets={preset or ','.join(rest)}"


def inject(model, cfg):
    """Turn `model` into a model fine-tuned by cfg.method, in place, and return it.

    full: every parameter trainable, nothing else changes.
    otherwise:
    1. every parameter is frozen (requires_grad False);
    2. with cfg.quantize / cfg.base_dtype, every Linear of the transformer blocks (targets or
       not; never the embeddings or the tied lm_head) is replaced by its low-precision frozen form
       (peft/quant.py: bitsandbytes NF4 Linear4bit for QLoRA, or CastLinear);
    3. each target Linear is replaced by METHODS[cfg.method](base, cfg, slices), whose adapter
       parameters are the only trainable ones.
    """
    cfg.validate()
    if adapter_layers(model):
        raise UserError("this model already has adapters: inject into a fresh model")
    if cfg.method == "full":
        model.requires_grad_(True)
        model.peft_config = cfg
        return model
    plan = resolve_targets(model, cfg.resolved_targets())
    model.requires_grad_(False)
    if cfg.quantize or cfg.base_dtype not in (None, "float32"):
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name.startswith("transformer.h."):
                model.set_submodule(name, quant.freeze_linear(m, cfg))
    layer_class = METHODS[cfg.method]
    for name, slices in plan.items():
        try:
            layer = layer_class(model.get_submodule(name), cfg, slices)
        except UserError as e:
            raise UserError(f"{name}: {e}{leave_out_hint(cfg, name)}") from None
        model.set_submodule(name, layer)
    model.peft_config = cfg  # adapter_state_dict and peft/hf.py read it
    return model


def merge(model):
    """Fold every adapter into its layer, in place: afterwards every Linear is a plain float32
    nn.Linear (4-bit and low-precision bases dequantized), every parameter trainable, and the
    model computes what the adapted model computed. Returns the model.
    An adapter on lm_head unties it from transformer.wte (only the head changed), so a merged
    lora4 model has its own lm_head.weight (hf_gpt2.save then writes it)."""
    adapters = [name for name, _ in adapter_layers(model)]
    for name in adapters:
        model.set_submodule(name, model.get_submodule(name).merge())
    for name, m in list(model.named_modules()):  # frozen low-precision bases outside the targets
        if isinstance(m, nn.Linear) and quant.to_linear(m) is not m:
            model.set_submodule(name, quant.to_linear(m))
    model.requires_grad_(True)
    model.__dict__.pop("peft_config", None)
    return model


def adapter_state_dict(model):
    """The tensors that make up the fine-tune: each adapter layer's parameters and persistent
    buffers (not its frozen base), keyed by the model's qualified names, e.g.
    transformer.h.0.attn.c_attn.lora_A. For method "full" (or a model without adapters) the
    whole state dict, without lm_head.weight when it is tied to transformer.wte.weight."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None or cfg.method == "full":
        sd = model.state_dict()
        if getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.transformer.wte.weight:
            sd.pop("lm_head.weight", None)
        return sd
    sd = {}
    for name, layer in adapter_layers(model):
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                sd[f"{name}.{key}"] = value
    return sd


def load_adapter_state_dict(model, sd):
    """Load what adapter_state_dict wrote into a model prepared the same way (same base, same
    inject config). Strict: missing or unexpected names and wrong shapes are a UserError."""
    expected = adapter_state_dict(model)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise UserError(f"the adapter lacks {len(missing)} tensor(s) this model needs "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                        f"it was saved with another method or other targets")
    if unexpected:
        raise UserError(f"the adapter has {len(unexpected)} tensor(s) this model does not "
                        f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); "
                        f"it was saved with another method or other targets")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"adapter tensor {k} has shape {tuple(sd[k].shape)}, this model expects "
                            f"{tuple(v.shape)}; it was saved with other settings (e.g. r or block sizes)")
    model.load_state_dict(sd, strict=False)
    return model


def lr_scales(model):
    """{parameter name: learning-rate multiplier} of the parameters that do not train at the base
    learning rate (for model.configure_optimizers). LoRA+ (cfg.lora_plus_ratio > 0): each adapter
    layer's lora_plus_params (the B matrices) train at lora_plus_ratio × the learning rate."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None or not cfg.lora_plus_ratio:
        return {}
    return {f"{name}.{p}": cfg.lora_plus_ratio for name, layer in adapter_layers(model) for p in layer.lora_plus_params}


def count_parameters(model):
    """(trainable, total) parameter counts; tied weights count once, 4-bit weights count as the
    number of weights they stand for (not the bytes they are packed in)."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def title(cfg):
    """cfg's method for people (model cards): its layer class's title_for(cfg) where it has one
    (rsLoRA, QLoRA, QDoRA), else its title, "on a 4-bit NF4 base" when quantized."""
    cls = METHODS[cfg.method]
    if cls is None:
        return "full fine-tuning"
    if hasattr(cls, "title_for"):
        return cls.title_for(cfg)
    return cls.title + (" on a 4-bit NF4 base" if cfg.quantize else "")
