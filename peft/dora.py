"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

DoRA splits each output row of the weight into a length and a direction, learns the lengths
directly (m [out]) and the direction through a LoRA update:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row            (‖·‖_row: norm of each row of the [out, in] matrix)

    m init = ‖W‖_row (B = 0 at init, so W' = W: DoRA starts as the base layer, like LoRA)

Forward, without forming W' in the matmul:

    n = ‖W + s·B A‖_row      computed without gradient, and treated as a constant (paper §4.3:
                             saves memory, barely changes the result)
    f = m / n                [out]
    y = f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b

The bias is not scaled: W' is the weight, b stays b (GPT-2's layers have biases, so reusing the
base output x Wᵀ + b as a whole would be wrong; we subtract b from it first).
With dropout on (training, p > 0) we follow HF peft: the adapter's change of the layer, W' − W,
acts on the dropped input x̃, the base on the clean x:

    y = x Wᵀ + b + (f − 1) ⊙ (x̃ Wᵀ) + f ⊙ s·(x̃ Aᵀ) Bᵀ      (= the formula above when x̃ = x)

which costs one more base matmul per step. Each forward forms W + s·B A once to take its norm
(like HF peft), so DoRA is slower than LoRA.

Slices (targets q / k / v of the fused c_attn) work: m covers only the adapted rows
(lora_magnitude [n, d]), rows of other slices keep f = 1.
A 4-bit (nf4, QDoRA) or low-precision base works: W is dequantized to float32 for the norm.
merge: W ← f ⊙ (W + s·B A) row-wise, bias unchanged.
LoRA+ (lora_plus_ratio): B and m train at ratio × the learning rate, as in HF peft's
create_loraplus_optimizer, which puts every vector parameter (DoRA's m) in B's group.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft.lora import LoRALinear
from peft.quant import dequantize, make_linear
from peft.slices import qkv_rows


class DoRALinear(LoRALinear):
    """y = (m / ‖W + sBA‖_row) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b — see the module docstring."""

    name = "dora"
    title = "DoRA"
    bench_goal_vs_lora = 1.15
    supports_quantize = True
    lora_plus_params = ("lora_B", "lora_magnitude")  # LoRA+: m goes with B, as in HF peft

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        """HF peft's LoRA with use_dora=True (see LoRALinear.hf_peft_counterpart)."""
        name, kwargs, note = super().hf_peft_counterpart(cfg)
        return name, dict(kwargs, use_dora=True), note

    def __init__(self, base, cfg, slices=None):
        super().__init__(base, cfg, slices)
        with torch.no_grad():
            norm = self.weight_norm()  # [out]
        if self.slices:
            norm = norm.view(3, -1)[self.slice_rows]  # [n, d], the adapted rows only
        self.lora_magnitude = nn.Parameter(norm.clone())

    def weight_norm(self):
        """‖W + s·B A‖ of each output row, [out] (call under no_grad: it is a constant)."""
        return (dequantize(self.base) + self.delta_weight()).norm(dim=1)

    def row_scale(self, norm):
        """f = m / norm for the adapted rows, 1 for the rows of slices that are not adapted."""
        if self.slices is None:
            return self.lora_magnitude / norm  # [out]
        f = self.lora_magnitude / norm.view(3, -1)[self.slice_rows]  # (n, d), the adapted rows
        return qkv_rows(f, self.slices, 1.0).view(-1)  # [out]

    def forward(self, x):
        with torch.no_grad():
            norm = self.weight_norm()  # [out], a constant
        f = self.row_scale(norm)  # [out], gradient flows to m
        bias = self.base.bias
        y = self.base(x)  # (..., out) = x Wᵀ + b
        dropping = self.training and isinstance(self.lora_dropout, nn.Dropout)
        xd = self.lora_dropout(x) if dropping else x  # x̃
        # f ⊙ s·(x̃ Aᵀ)Bᵀ with f and s folded into B ([out, n·r], weight-side, not per token)
        lora = F.linear(F.linear(xd, self.lora_A), (self.scale * f)[:, None] * self.full_B())
        if not dropping:  # y = f ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b = f ⊙ (x Wᵀ + b) + (1 − f) ⊙ b + f ⊙ s·(x Aᵀ)Bᵀ
            scaled = f * y if bias is None else torch.addcmul(bias - f * bias, f, y)  # one pass over y
            return scaled + lora
        # HF's dropout semantics: x Wᵀ + b + (f − 1) ⊙ x̃ Wᵀ + f ⊙ s·(x̃ Aᵀ)Bᵀ
        yd = self.base(xd)
        if bias is not None:
            yd = yd - bias
        return torch.addcmul(y, f - 1, yd) + lora

    @torch.no_grad()
    def merge(self):
        """A plain float32 nn.Linear with W' = f ⊙ (W + s·B A) (row-wise) and the base's bias."""
        W = dequantize(self.base) + self.delta_weight()  # [out, in]
        f = self.row_scale(W.norm(dim=1))  # [out]
        return make_linear(f[:, None] * W, self.base.bias)
