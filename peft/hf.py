"""Export adapters in Hugging Face PEFT's format (adapter_config.json + adapter_model.safetensors),
loadable with transformers' GPT2LMHeadModel + peft.PeftModel.from_pretrained.

HF PEFT can only adapt whole modules, and its LoRA keeps the base weights it is given. So:
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
  so lm_head alone has no HF PEFT form (hub.no_adapter_reason says so).
GPT-2's c_attn / c_proj / c_fc are transformers Conv1D layers, hence "fan_in_fan_out": true; the
LoRA matrices keep the same [r, in] / [out, r] layout either way.
With quantize="nf4" the adapter was trained on the 4-bit base: load it on a base quantized the
same way (bitsandbytes NF4, double quantization) to get the same model. HF's merge_and_unload()
into 4-bit layers rounds W + s·B A to NF4 again; merged on base.dequantize() it is our merged model.
"""

import torch

from errors import UserError
from peft.dora import DoRALinear
from peft.ia3 import IA3Linear
from peft.lora import LoRALinear
from peft.quant import dequantize

LORA_METHODS = ("lora", "dora", "olora", "pissa")
HEAD = "lm_head"  # tied to transformer.wte: exported as a merged modules_to_save copy (see above)


def _target_name(module_name):
    """transformer.h.3.attn.c_attn -> attn.c_attn (what HF's target_modules match as a suffix)."""
    return ".".join(module_name.split(".")[-2:]) if module_name.startswith("transformer.h.") else module_name


@torch.no_grad()
def to_hf_peft(model, cfg=None, base_model_name_or_path=None):
    """(adapter_config dict, {key: tensor}) of the model's adapters in HF PEFT's format."""
    from peft import adapter_layers
    cfg = cfg or getattr(model, "peft_config", None)
    if cfg is None or cfg.method not in LORA_METHODS + ("ia3",):
        method = cfg.method if cfg else "full"
        raise UserError(f"method '{method}' has no Hugging Face PEFT form here; lora, rsLoRA, dora, olora, "
                        f"pissa and ia3 can be exported (or merge and save the whole model)")
    layers = [(name, layer) for name, layer in adapter_layers(model) if name != HEAD]
    head = [layer for name, layer in adapter_layers(model) if name == HEAD]
    if not layers:
        raise UserError("an adapter on lm_head alone has no Hugging Face PEFT form (lm_head is tied to the "
                        "token embedding; see peft/hf.py); merge and save the whole model")
    prefix = "base_model.model."
    targets = sorted({_target_name(name) for name, _ in layers})
    common = {"base_model_name_or_path": base_model_name_or_path, "task_type": "CAUSAL_LM",
              "target_modules": targets, "fan_in_fan_out": True, "inference_mode": True}
    tensors = {}
    if head:  # the adapted head, merged: [vocab, C]
        common["modules_to_save"] = [HEAD]
        tensors[f"{prefix}{HEAD}.weight"] = head[0].merge().weight.float().contiguous()
    if cfg.method == "ia3":
        feedforward = sorted({_target_name(name) for name, layer in layers if layer.feedforward})
        for name, layer in layers:
            assert isinstance(layer, IA3Linear)
            tensors[f"{prefix}{name}.ia3_l"] = layer.hf_ia3_l().contiguous()
        return dict(common, peft_type="IA3", feedforward_modules=feedforward), tensors

    ranks, alphas = {}, {}
    for name, layer in layers:
        assert isinstance(layer, LoRALinear)
        A, B = layer.lora_A.float(), layer.full_B().float()  # [R, in], [out, R]
        if layer.factors is not None:  # OLoRA / PiSSA: relative to the original base
            A = torch.cat([A, layer.lora_A0.float()])
            B = torch.cat([B, -layer.full_B(layer.lora_B0).float()], dim=1)
        R = A.shape[0]
        tensors[f"{prefix}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = B.contiguous()
        if isinstance(layer, DoRALinear):
            # m for every row: rows outside the adapted slices get their own norm (scale 1)
            norm = (dequantize(layer.base) + layer.delta_weight()).norm(dim=1)  # [out]
            m = norm * layer.row_scale(norm)  # = m on adapted rows, ‖W_row‖ elsewhere
            tensors[f"{prefix}{name}.lora_magnitude_vector"] = m.float().contiguous()
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
    config = dict(common, peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=cfg.dropout,
                  use_rslora=cfg.use_rslora, use_dora=cfg.method == "dora", bias="none",
                  init_lora_weights=True, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return config, tensors

