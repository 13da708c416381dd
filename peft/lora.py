"""LoRA (Hu et al. 2021, arXiv 2106.09685) and its variants rsLoRA, OLoRA and PiSSA.

A frozen linear layer y = x Wᵀ + b, W [out, in], learns a low-rank update ΔW = s·B A:

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ          A [r, in], B [out, r], s = alpha / r

- init: A kaiming-uniform (a=√5, like nn.Linear; or N(0, std 1/r) for init="gaussian"), B = 0,
  so the layer starts exactly as the base layer.
- rsLoRA (Kalajdzievski 2023): s = alpha / √r, so the update's size does not shrink as r grows.
- the forward never forms B A (an [out, in] matrix): x Aᵀ is [.., r] and costs r·(in + out)
  per token, against in·out for the base. The base weight has requires_grad False, so the
  backward computes no gradient for it, only for x, A and B.
- merge: W ← W + s·B A, one plain nn.Linear that computes the same function.
- LoRA+ (Hayou et al. 2024, arXiv 2402.12354; cfg.lora_plus_ratio > 0): B trains at
  lora_plus_ratio × the learning rate of A (the paper suggests 16). Which tensors are "B" is this
  class's lora_plus_params; model.configure_optimizers puts them in their own AdamW groups, and
  train.py's schedule scales every group's learning rate by the group's lr_scale.

Slices of the fused c_attn (targets "q", "k", "v"): c_attn's rows are [q | k | v], d rows each.
Each enabled slice j gets its own A_j [r, in], B_j [d, r], and its update touches only its d rows.
That is one LoRA of rank n·r (n = number of slices) whose B is block-structured:

    A = [A_q; A_v]                 (stored as lora_A [n·r, in])
    B = [[B_q, 0  ],               rows 0:d   (q)        (B_j stored as lora_B [n, d, r])
         [0,   0  ],               rows d:2d  (k, not adapted)
         [0,   B_v]]               rows 2d:3d (v)

so the forward is the same two matmuls as plain LoRA (full_B() builds the block matrix; the zero
blocks get no gradient since they are not parameters).

OLoRA (Büyükakyüz 2024, arXiv 2406.01775) and PiSSA (Meng et al. 2024, arXiv 2404.02948) start
from the weight's own structure instead of B = 0, and subtract the start from the base so the
output is unchanged:

    OLoRA:  Q, R = qr(W)             A₀ = R[:r, :],            B₀ = Q[:, :r]
    PiSSA:  U, S, Vᵀ = svd(W)        A₀ = diag(√(S_r/s)) V_rᵀ,  B₀ = U_r diag(√(S_r/s))
    then    W ← W − s·B₀ A₀          (the base is mutated; in fp32, on the [out, in] matrix)

A₀ and B₀ are kept as buffers (lora_A0, lora_B0) and saved with the adapter, because the adapter
means nothing without the residual base it was trained on. A QR / SVD recomputed on another
machine may differ (e.g. in the signs of columns), so loading saved A₀, B₀ rebases the weight:
W ← W + s·(B₀_current A₀_current − B₀_saved A₀_saved), which gives back exactly the saved model.
OLoRA on lm_head (tied to wte, [50257, C]) needs a far lower learning rate. The embedding is not
the problem: set_base_weight gives lm_head a Parameter of its own, wte stays as it was. The QR
is: A₀ = R[:r] carries the whole scale of the weight, B₀ = Q[:, :r] has unit columns of 50257
entries, each about 1/√50257 = 0.0045. Adam moves every entry of B by about the learning rate per
step, so at lr 3e-3 one step changes B by about its own size, and s·ΔB·A₀ is huge. Measured on
models/gpt2-milton (C = 64), r = 16, lm_head only: ‖A₀‖ = 602; the loss goes 6.43 → 15.9 in one
step at lr 3e-3, while lr 1e-4 trains (6.44 → 6.16 in 11 steps). PiSSA splits √S between A₀ and
B₀ and trains at 3e-3 (6.39 → 5.96). So targets="all" leaves lm_head out for OLoRA (config.py).
OLoRA and PiSSA reject quantize="nf4" (supports_quantize = False): the residual base would have to
be re-quantized whenever it is rebased, and the saved model could not be rebuilt exactly.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from peft.quant import dequantize, make_linear
from peft.slices import QKV, qkv_rows


class LoRALinear(nn.Module):
    """y = base(x) + s · (dropout(x) Aᵀ) Bᵀ  — see the module docstring. Owns the frozen base."""

    # what the rest of the repo knows about a method comes from these class attributes (peft/__init__.py)
    name = "lora"  # the registry name (--method=lora)
    title = "LoRA"  # for people: tables, model cards
    default_targets = ("q", "v")  # LoRA (Hu et al. 2021) §7.1 adapts W_q and W_v
    all_targets = "lora4"  # what targets=all means for this method (peft/config.py)
    hf_peft_type = "LORA"  # its Hugging Face PEFT form (peft/hf.py); None: no_hf_reason says why
    no_hf_reason = None
    bench_goal_vs_lora = None  # bench.py's goal: at most this step time relative to our LoRA
    supports_quantize = True
    config_fields = ("r", "alpha", "dropout", "use_rslora", "init", "targets", "base_dtype",
                     "lora_plus_ratio")  # the PeftConfig fields this method reads
    lora_plus_params = ("lora_B",)  # LoRA+: these train at lora_plus_ratio × the learning rate
    factors = None  # OLoRA / PiSSA: a function (W [out, in], r, s) -> (A₀ [r, in], B₀ [out, r])
    hf_init = None  # OLoRA / PiSSA: HF peft's init_lora_weights for the same start

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        """(HF peft config class name, kwargs, note or None): the same adapter in HF peft, which bench.py
        measures against ours. HF's LoRA on the same (whole) modules, with r, alpha, dropout, rsLoRA
        and init as ours; fan_in_fan_out because GPT-2's layers are transformers Conv1D."""
        whole, note = cfg.hf_targets()
        init = cls.hf_init or (True if cfg.init == "kaiming" else "gaussian")
        return "LoraConfig", dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=whole,
                                  fan_in_fan_out=True, use_rslora=cfg.use_rslora, use_dora=False,
                                  init_lora_weights=init, bias="none", task_type="CAUSAL_LM"), note

    @classmethod
    def title_for(cls, cfg):
        """The title as cfg sets the method up: rsLoRA (use_rslora), QLoRA / QDoRA (a 4-bit base)."""
        title = ("rs" if cfg.use_rslora else "") + cls.title
        return "Q" + title if cfg.quantize else title

    def __init__(self, base, cfg, slices=None):
        super().__init__()
        self.base = base  # frozen nn.Linear, CastLinear or bitsandbytes Linear4bit
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = cfg.r
        self.scale = cfg.scale()  # s
        self.slices = tuple(s for s in QKV if s in slices) if slices else None
        if slices and (set(slices) - set(QKV) or self.out_features % 3):
            raise UserError(f"slices {slices} need a fused q|k|v layer and names among q, k, v")
        d = self.out_features // 3 if self.slices else self.out_features  # rows adapted by one (A, B)
        n = len(self.slices) if self.slices else 1
        if self.r > min(d, self.in_features):
            what = f"each of its {', '.join(self.slices)} slices is" if self.slices else "its weight is"
            raise UserError(f"r={self.r} is too large: {what} {d}x{self.in_features}, "
                            f"so r must be <= {min(d, self.in_features)}")
        dev = base.weight.device  # adapters are float32 whatever the base's dtype
        self.lora_A = nn.Parameter(torch.empty(n * self.r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros((n, d, self.r) if self.slices else (d, self.r), device=dev))
        if self.slices:  # where slice j's rows sit among c_attn's 3 row blocks (device-side indices)
            rows = torch.tensor([QKV.index(s) for s in self.slices], device=dev)
            self.register_buffer("slice_rows", rows, persistent=False)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = in, per slice too
        if self.factors is not None:
            self.init_from_weight()

    def full_B(self, B=None):
        """B (default: lora_B) as one [out, n·r] matrix; for slices the block matrix shown above."""
        B = self.lora_B if B is None else B
        if self.slices is None:
            return B  # [out, r]
        n, d, r = B.shape
        eye = torch.eye(n, device=B.device, dtype=B.dtype)
        blocks = B[:, :, None, :] * eye[:, None, :, None]  # (adapter j, row, column block, rank): B_j at j
        return qkv_rows(blocks, self.slices, 0.0).view(3 * d, n * r)  # (row block, row, j, rank)

    def forward(self, x):
        y = self.base(x)  # (..., out), no gradient for the frozen weight
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., n·r)
        return y + F.linear(h * self.scale, self.full_B())  # (..., out)

    def delta_weight(self):
        """ΔW = s·B A, [out, in] (only for merging and DoRA's norm; the forward never builds it)."""
        return self.scale * (self.full_B() @ self.lora_A)

    @torch.no_grad()
    def merge(self):
        """A plain float32 nn.Linear with W + s·B A and the base's bias."""
        return make_linear(dequantize(self.base) + self.delta_weight(), self.base.bias)

    # --- OLoRA / PiSSA -------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_weight(self):
        """A = A₀, B = B₀ from the weight (per slice), kept as buffers; base W ← W − s·B₀ A₀."""
        W = dequantize(self.base)  # [out, in] float32
        if self.slices is None:
            A0, B0 = self.factors(W, self.r, self.scale)
        else:
            d = self.out_features // 3
            parts = [self.factors(W[i * d:(i + 1) * d], self.r, self.scale) for i in self.slice_rows.tolist()]
            A0 = torch.cat([a for a, _ in parts])  # [n·r, in]
            B0 = torch.stack([b for _, b in parts])  # [n, d, r]
        self.lora_A.copy_(A0)
        self.lora_B.copy_(B0)
        self.register_buffer("lora_A0", A0.clone())
        self.register_buffer("lora_B0", B0.clone())
        self.set_base_weight(W - self.scale * (self.full_B(B0) @ A0))

    def set_base_weight(self, W):
        # a new Parameter rather than an in-place write: lm_head's weight is shared with wte
        self.base.weight = nn.Parameter(W.to(self.base.weight.dtype), requires_grad=False)

    @torch.no_grad()
    def rebase(self, A0, B0):
        """Make the residual base the one built from (A0, B0) instead of this layer's lora_A0/B0."""
        A0, B0 = A0.to(self.lora_A0), B0.to(self.lora_B0)
        if torch.equal(A0, self.lora_A0) and torch.equal(B0, self.lora_B0):
            return  # the common case (same machine, same base): nothing to do, bit for bit
        old = self.full_B(self.lora_B0) @ self.lora_A0
        new = self.full_B(B0) @ A0
        self.set_base_weight(dequantize(self.base) + self.scale * (old - new))
        self.lora_A0.copy_(A0)
        self.lora_B0.copy_(B0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.Module.load_state_dict calls this before loading the children (self.base), so a full
        # state dict that also holds base.weight still ends with the saved base
        A0, B0 = state_dict.get(prefix + "lora_A0"), state_dict.get(prefix + "lora_B0")
        if (self.factors is not None and A0 is not None and B0 is not None
                and A0.shape == self.lora_A0.shape and B0.shape == self.lora_B0.shape):
            self.rebase(A0, B0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"r={self.r}, scale={self.scale:g}" + (f", slices={self.slices}" if self.slices else "")


def olora_factors(W, r, s):
    """W = Q R (reduced QR of the [out, in] matrix): A₀ = R[:r] [r, in], B₀ = Q[:, :r] [out, r]
    (orthonormal columns)."""
    Q, R = torch.linalg.qr(W)  # Q [out, k], R [k, in], k = min(out, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def pissa_factors(W, r, s):
    """W = U S Vᵀ: the top-r singular triplets, split so that s·B₀ A₀ = U_r S_r V_rᵀ."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U [out, k], S [k], Vh [k, in]
    root = torch.sqrt(S[:r] / s)  # [r]
    return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root[None, :]).contiguous()


class OLoRALinear(LoRALinear):
    """LoRA started from the QR decomposition of W: A₀ = R[:r], B₀ = Q[:, :r], W ← W − s·B₀ A₀.
    See the module docstring (buffers lora_A0, lora_B0; rebase on load; no nf4)."""

    name = "olora"
    title = "OLoRA"
    all_targets = "lora3"  # its QR start diverges on lm_head at the usual learning rates (see above)
    supports_quantize = False
    config_fields = ("r", "alpha", "dropout", "use_rslora", "targets", "base_dtype",
                     "lora_plus_ratio")  # as LoRA, but A, B come from a QR: no init
    factors = staticmethod(olora_factors)
    hf_init = "olora"


class PiSSALinear(LoRALinear):
    """LoRA started from the top-r singular vectors of W: s·B₀ A₀ = U_r S_r V_rᵀ, W ← W − s·B₀ A₀.
    See the module docstring (buffers lora_A0, lora_B0; rebase on load; no nf4)."""

    name = "pissa"
    title = "PiSSA"
    supports_quantize = False
    config_fields = ("r", "alpha", "dropout", "use_rslora", "targets", "base_dtype",
                     "lora_plus_ratio")  # as LoRA, but A, B come from an SVD: no init
    factors = staticmethod(pissa_factors)
    hf_init = "pissa"
