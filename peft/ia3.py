"""
(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv 2205.05638). A trainable vector l, initialized to ones, rescales one side of a frozen layer:

    output scaling (attention-type targets):   y = (x Wᵀ + b) ⊙ l      l [out]   (bias scaled too)
    input scaling  (feed-forward targets):     y = (x ⊙ l) Wᵀ + b      l [in]

merge folds l into the weight: output scaling multiplies the rows of W and the bias by l, input
scaling multiplies the columns of W (the bias is untouched). At init l = 1 and the layer equals
its base. Parameters per layer: out (or in) — e.g. 3·768 for GPT-2's c_attn.

Which side (the feed-forward rule). The paper scales the keys, the values and the feed-forward
hidden activation (the input of the second MLP matrix); HF peft scales the output of every target
except those listed in `feedforward_modules`, whose input it scales, and its GPT-2 default is
targets c_attn + mlp.c_proj with feedforward_modules = [mlp.c_proj]. A layer does not know its
own module name, so `feedforward=None` applies that default by shape: input scaling when the layer
narrows (in_features > out_features: in GPT-2 only mlp.c_proj, which reads the 4C hidden
activation), output scaling otherwise (c_attn, attn.c_proj, mlp.c_fc — whose output is that
hidden layer — and lm_head). Pass feedforward=True/False to choose explicitly.

q/k/v slices of the fused c_attn (rows 0:d, d:2d, 2d:3d): only the chosen slices' output rows are
scaled, so slices=('k', 'v') is the paper's choice. With slices, `ia3_l` holds the chosen slices'
vectors one after the other (q, k, v order), length len(slices)·d; the other rows are scaled by 1.

Storage and export. `ia3_l` is 1-D ([out], [in], or [len(slices)·d]) so that the optimizer, which
decays only tensors with ≥ 2 dims, never pulls l towards 0. HF peft stores the same numbers as
`ia3_l` [out, 1] (output scaling) or [1, in] (input scaling) on the whole c_attn: `hf_ia3_l()`
returns exactly that tensor (ones in the rows of slices that are not adapted).
IA3 has no dropout (as in the paper and HF peft): cfg.dropout is not used.
A 4-bit (bitsandbytes nf4) base works: the forward only calls it, merge dequantizes it.
"""

import torch
import torch.nn as nn

from errors import UserError
from peft.quant import dequantize, make_linear
from peft.slices import QKV, qkv_rows


class IA3Linear(nn.Module):
    """y = base(x) ⊙ l (output scaling) or base(x ⊙ l) (input scaling, feedforward=True) — see the
    module docstring. feedforward=None: input scaling iff the layer narrows (in > out). Owns the base."""

    name = "ia3"
    title = "IA3"
    default_targets = ("k", "v", "mlp.c_proj")  # IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner
    all_targets = "lora4"                        # activation (= the input of mlp.c_proj)
    hf_peft_type = "IA3"
    no_hf_reason = None
    bench_goal_vs_lora = None
    supports_quantize = True
    config_fields = ("targets", "base_dtype")  # the PeftConfig fields IA3 reads (no dropout, as in the paper and HF peft)

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        """(HF peft config class name, kwargs, note or None) for bench.py: HF's IA3 on the same (whole)
        modules, with input scaling where ours has it (mlp.c_proj narrows), output scaling elsewhere."""
        whole, note = cfg.hf_targets()
        return "IA3Config", dict(target_modules=whole, feedforward_modules=[t for t in whole if t == "mlp.c_proj"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM"), note

    def __init__(self, base, cfg, slices=None, feedforward=None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        if feedforward is None:
            feedforward = slices is None and base.in_features > base.out_features
        if feedforward and slices is not None:
            raise UserError("IA3 input (feed-forward) scaling applies to a whole layer, not to the q/k/v "
                            "slices of c_attn: target 'c_attn' or use output scaling")
        self.feedforward = feedforward
        self.slices = None
        if slices is not None:
            d = base.in_features
            if base.out_features != 3 * d:
                raise UserError(f"q/k/v slices need the fused c_attn [3d, d], got a layer "
                                f"[{base.out_features}, {base.in_features}]")
            self.slices = tuple(s for s in QKV if s in slices)  # q, k, v order
            n = len(self.slices) * d
        else:
            n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device))

    def scale(self):
        """The full scaling vector: [in] for input scaling, else [out] (ones on unadapted slices)."""
        if self.slices is None:
            return self.ia3_l
        return qkv_rows(self.ia3_l.view(len(self.slices), -1), self.slices, 1.0).view(-1)  # (3d,)

    def forward(self, x):
        if self.feedforward:
            return self.base(x * self.ia3_l.to(x.dtype))
        y = self.base(x)
        return y * self.scale().to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """A plain fp32 nn.Linear: W ⊙ l[:, None] and b ⊙ l (output), or W ⊙ l[None, :] (input)."""
        W = dequantize(self.base)
        l = self.scale().float()
        b = self.base.bias.float() if self.base.bias is not None else None
        if self.feedforward:
            W = W * l[None, :]
        else:
            W = W * l[:, None]
            b = b * l if b is not None else None
        return make_linear(W, b)

    @torch.no_grad()
    def hf_ia3_l(self):
        """This layer's l in HF peft's layout: [out, 1] for output scaling, [1, in] for input scaling."""
        l = self.scale().detach().float()
        return l[None, :] if self.feedforward else l[:, None]

    def extra_repr(self):
        side = "input (feed-forward)" if self.feedforward else "output"
        return f"scaling={side}, slices={self.slices}"
