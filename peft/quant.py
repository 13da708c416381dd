"""The frozen base weights in less memory: 4-bit NF4 (QLoRA) or a 16-bit dtype.

An adapter layer only needs its base to compute y = x Wᵀ + b and, for merging or DoRA's norm, to
hand back W. Three kinds of base can do that, and every layer in peft/ works with all three:

    nn.Linear      W in float32 (the default)
    CastLinear     W (and b) stored in base_dtype, e.g. bfloat16; the input is cast to that dtype
                   and the output back to the input's dtype, so float32 adapters sit on top
    Linear4bit     bitsandbytes NF4 (QLoRA, Dettmers et al. 2023): W in 4-bit NormalFloat with
                   blocks of 64 weights sharing one absmax, and the absmaxes quantized again
                   ("double quantization"); matmuls dequantize on the fly into compute_dtype

freeze_linear(linear, cfg) -> one of the above, frozen;  dequantize(module) -> W in float32;
to_linear(module) -> a plain float32 nn.Linear (what merge() leaves behind).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices import TORCH_DTYPES


class CastLinear(nn.Linear):
    """A frozen nn.Linear whose weight and bias are stored in a low-precision dtype.
    y = (x.to(dtype) Wᵀ + b).to(x.dtype)"""

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def freeze_linear(linear, cfg):
    """The frozen base for `linear` as cfg.quantize / cfg.base_dtype ask (the linear itself if neither)."""
    dtype = TORCH_DTYPES[cfg.base_dtype or "float32"]
    if cfg.quantize == "nf4":
        import bitsandbytes as bnb
        w = linear.weight.detach()
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w.float().contiguous(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        q.support_avx512bf16_for_cpu = False  # keep one weight layout, so dequantize() is exact
        return q.to(w.device)  # moving to a device is what quantizes a Params4bit
    if dtype != torch.float32:
        c = CastLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        c.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        if linear.bias is not None:
            c.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return c
    linear.requires_grad_(False)
    return linear


def is_4bit(module):
    return type(module).__name__ == "Linear4bit"


def dequantize(module):
    """W [out, in] of a base Linear as float32 (a new tensor for 4-bit / low-precision bases)."""
    if is_4bit(module):
        import bitsandbytes as bnb
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return module.weight.float()


def make_linear(weight, bias):
    """A plain float32 nn.Linear with these weight [out, in] and bias [out] (or None), copied."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().float().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone())
    return lin


def to_linear(module):
    """A plain float32 nn.Linear computing what `module` (nn.Linear, CastLinear, Linear4bit) computes."""
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return module
    return make_linear(dequantize(module), module.bias)
