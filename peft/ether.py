"""
ETHER and ETHER+: Efficient finetuning of large-scale models with Hyperplane Reflections
(Bini, Roth, Akata, Khoreva, ICML 2024, arXiv 2405.20271; reference code: github.com/mwbini/ether).

The frozen weight W [out, in] is multiplied by a block-diagonal matrix H = blockdiag(H_1 … H_nb)
(nb = cfg.ether_nb blocks of size b = dim / nb along the side it acts on). Each block is built
from vectors of length b, normalized (û = u / ‖u‖):

    ETHER  ("ether"):        H_i = I - 2 û ûᵀ             a Householder reflection: orthogonal,
                                                         symmetric, det -1, ‖H_i - I‖_F = 2
    ETHER+ ("etherplus"):    H_i = I - û ûᵀ + v̂ v̂ᵀ       symmetric, not orthogonal; H = I when
                                                         v̂ = ±û, so v is initialized to -u
    ETHER+ two-sided ("etherplusHH"):   W' = H_out · W · H_in  (its own u, v on each side)

ETHER's H is never the identity: the layer's output changes at step 0 (the reference accepts
this; the reflection is a bounded, distance-2 perturbation).

Init, as the reference: kaiming_uniform_(a=√5), i.e. U(-1/√fan_in, 1/√fan_in), on the tensor that
holds the vectors. fan_in is torch's: size(1) for a 2-D tensor, size(1)·size(2) for a 3-D one, so
    whole layer:     u [nb, b]                  fan_in = b          bound 1/√b
    q/k/v slices:    u [n_slices, nb, b]        fan_in = nb·b = d   bound 1/√d
(the reference's ETHERQKVLinear draws each slice's vectors as a [1, nb, b] tensor: the same bound).
The forward sees only û, but the scale is not free: under Adam every entry of u moves by about
the learning rate per step, so the angle û turns by scales with 1/‖u‖. With nb = 32 on GPT-2 124M
(d = 768, b = 24) a slice's ‖u‖ per block is √32 ≈ 5.7 times smaller than a whole layer's, and
its vectors turn that much faster at the same learning rate: the paper's learning rates assume it.

Which side, as in the reference:
- q/k/v slices of the fused c_attn ([3d, d], rows q 0:d, k d:2d, v 2d:3d): H acts on the output
  side of each chosen slice, W_s' = blockdiag(H_s) · W_s, with separate vectors per slice. Fast
  path (the reference's own note): one block-diagonal H over all 3d outputs whose blocks on the
  slices not chosen are the identity. A block with û = v̂ = 0 *is* the identity in the formulas
  below, so the chosen slices' unit vectors are simply padded with zero blocks.
  With etherplusHH every chosen slice also gets its own input-side H (W_s' = H_out,s W_s H_in,s).
- any other layer (or the whole c_attn): input side, W' = W · blockdiag(H).
- flip_side moves the one-sided H to the output side when out_features < in_features (the smaller
  side: fewer parameters and less work, e.g. mlp.c_proj 4C -> C). It has no effect on square
  layers, on q/k/v slices (each slice is square) or on etherplusHH (both sides anyway).

The clean block-diagonal form is implemented, as the paper states the method. The reference's
input-side code for nb > 1 reshapes the [out, in] weight to (nb, out, in/nb), which applies block
H_r to every input chunk of the r-th group of output rows: not W · blockdiag(H). The two coincide
for nb = 1 and for the output side.

Bias. W' replaces W and the bias stays as it is (the reference calls F.linear(x, H W, b)):
output side y = (x Wᵀ) H + b = H applied to the bias-free output, plus b. (H is symmetric, so
the row-vector form z H equals H z.) The input side leaves the bias alone by construction.

Cost. No dense (dim × dim) H is ever built: a block acts on a row vector z as
    ETHER:   z H_i = z - 2 (z·û) û            ETHER+:   z H_i = z - (z·û) û + (z·v̂) v̂
One-sided methods apply it to each token (O(dim) per token: x H_in before the frozen base matmul,
or (x Wᵀ) H_out after it). etherplusHH instead builds W' = H_out W H_in once per step
(adapted_weight: W's blocks times the small b×b blocks of H, O(out·in·b), independent of the
number of tokens) and runs one plain x W'ᵀ: the per-token form would need a rotated copy of x
for every q/k/v slice and a batched matmul over them, which on a GPU costs more in memory traffic
than the weight-side form's extra weight-gradient matmul (W' needs ∂L/∂W' = gᵀx for the vectors'
gradients). merge() uses the same adapted_weight().

Parameters per layer (independent of nb): ETHER dim, ETHER+ 2·dim, etherplusHH 2(in + out), with
dim the adapted side (d per chosen slice for q/k/v). Names: ether_u_in / ether_u_out (and
ether_v_in / ether_v_out for ETHER+), shape [nb, b], or [n_slices, nb, b] for slices (q, k, v order).
Dropout (cfg.dropout) is applied to the layer input, as in the reference (recipe: no dropout).
A 4-bit base is not supported (the output side needs the bare weight W).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from peft.quant import dequantize, make_linear
from peft.slices import QKV, qkv_rows


def divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


class ETHERLinear(nn.Module):
    """ETHER: blockdiag(I - 2ûûᵀ) on one side (see the module docstring). Owns the frozen base."""

    name = "ether"
    title = "ETHER"
    default_targets = ("q", "v")  # the ETHER reference code adapts the q and v projections
    all_targets = "lora2"  # reflecting the input of the MLP or of the head wrecks the model (peft/config.py)
    hf_peft_type = None
    no_hf_reason = "ETHER and ETHER+ are not part of HF PEFT, so the reflections are merged into the weights"
    bench_goal_vs_lora = 1.1
    supports_quantize = False
    config_fields = ("ether_nb", "flip_side", "dropout", "targets", "base_dtype")  # the PeftConfig fields this method reads
    vectors = ("u",)  # trainable vectors per block; ETHER+ has ("u", "v")
    two_sided = False  # H on both sides of W (etherplusHH), else on one side

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        """(None, why, None): bench.py has nothing to measure ETHER, ETHER+ or ETHER+HH against."""
        return None, f"{cls.title} is not in HF peft", None

    def __init__(self, base, cfg, slices=None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        nb = cfg.ether_nb
        two_sided = self.two_sided
        self.slices = None
        if slices is not None:
            if d_out != 3 * d_in:
                raise UserError(f"q/k/v slices need the fused c_attn [3d, d], got a layer [{d_out}, {d_in}]")
            self.slices = tuple(s for s in QKV if s in slices)  # q, k, v order
            self.sides = ("in", "out") if two_sided else ("out",)
            dims = {"in": d_in, "out": d_in}  # each slice is [d, d]
        else:
            if two_sided:
                self.sides = ("in", "out")
            elif cfg.flip_side and d_out < d_in:
                self.sides = ("out",)
            else:
                self.sides = ("in",)
            dims = {"in": d_in, "out": d_out}
        common = math.gcd(*[dims[s] for s in self.sides])
        for side in self.sides:
            if nb < 1 or dims[side] % nb != 0:
                raise UserError(f"ether_nb {nb} does not divide the {side}put side ({dims[side]}) of a targeted "
                                f"[{d_out}, {d_in}] layer; valid values for --ether_nb: {divisors(common)}")
        self.nb = nb
        self.block = {side: dims[side] // nb for side in self.sides}  # b per side
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        for side in self.sides:
            b = self.block[side]
            shape = (nb, b) if self.slices is None else (len(self.slices), nb, b)
            u = torch.empty(shape, device=base.weight.device)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))  # bound 1/√b, or 1/√(nb·b) for slices: see the docstring
            self.register_parameter(f"ether_u_{side}", nn.Parameter(u))
            if "v" in self.vectors:
                self.register_parameter(f"ether_v_{side}", nn.Parameter(-u.clone()))  # v̂v̂ᵀ = ûûᵀ: H = I

    def unit_vectors(self, side):
        """The normalized vectors of one side: a list (û, or û and v̂), each (nb, b), or for q/k/v
        slices (3, nb, b) with zero blocks (= identity blocks) on the slices not adapted."""
        out = []
        for name in self.vectors:
            w = F.normalize(getattr(self, f"ether_{name}_{side}"), dim=-1)
            if self.slices is not None:
                w = qkv_rows(w, self.slices, 0.0)  # (3, nb, b)
            out.append(w)
        return out

    def apply_h(self, z, vecs):
        """z H, block-wise: z (..., nb, b), û broadcastable to it. H_i = I - 2ûûᵀ."""
        (u,) = vecs
        return z - 2 * (z * u).sum(-1, keepdim=True) * u

    def forward(self, x):
        x = self.drop(x)
        W, bias = self.base.weight, self.base.bias
        lead, nb = x.shape[:-1], self.nb
        if self.two_sided:  # etherplusHH: W' = H_out W H_in once per step, then one matmul
            z = F.linear(x.to(W.dtype), self.adapted_weight().to(W.dtype)).to(x.dtype)  # (..., out)
            return z + bias.to(z.dtype) if bias is not None else z
        if self.sides == ("in",):  # whole layer, input side: x H_in, then the base
            vecs = [w.to(x.dtype) for w in self.unit_vectors("in")]
            return self.base(self.apply_h(x.reshape(*lead, nb, -1), vecs).reshape(x.shape))
        # output side, of the whole layer (flip_side) or of each q/k/v slice of the fused c_attn
        z = F.linear(x.to(W.dtype), W).to(x.dtype)  # (..., out), bias-free
        vecs = [w.to(z.dtype) for w in self.unit_vectors("out")]  # (nb, b), or (3, nb, b) for slices
        blocks = (nb, -1) if self.slices is None else (3, nb, -1)
        z = self.apply_h(z.reshape(*lead, *blocks), vecs).reshape(z.shape)  # z H_out
        return z + bias.to(z.dtype) if bias is not None else z

    def h_blocks(self, side):
        """The blocks H_i of one side as matrices: (nb, b, b), or (3, nb, b, b) for q/k/v slices
        (identity blocks on the slices not adapted). Built by applying H to the rows of I (H is
        symmetric, so I H = H): small, O(dim·b)."""
        vecs = [w.unsqueeze(-2) for w in self.unit_vectors(side)]  # (..., nb, 1, b)
        eye = torch.eye(self.block[side], device=vecs[0].device, dtype=vecs[0].dtype)  # (b, b)
        return self.apply_h(eye, vecs)  # (..., nb, b, b)

    def adapted_weight(self):
        """W' = H_out W H_in [out, in] in float32 (the sides this layer adapts): a batched matmul of
        W's blocks with the small H blocks, O(out·in·b), no dense H. Used by etherplusHH's forward
        (gradients flow to the vectors) and by merge."""
        W = dequantize(self.base)
        d_out, d_in = W.shape
        nb = self.nb
        if self.slices is None:
            if "in" in self.sides:  # W H_in: every row's block j times H_j
                W = torch.einsum("onj,njk->onk", W.view(d_out, nb, -1), self.h_blocks("in")).reshape(d_out, d_in)
            if "out" in self.sides:  # H_out W: block i of rows times H_i
                W = (self.h_blocks("out") @ W.view(nb, -1, d_in)).reshape(d_out, d_in)
        else:  # slice s: H_out,s W_s H_in,s
            if "in" in self.sides:
                W = torch.einsum("sonj,snjk->sonk", W.view(3, d_in, nb, -1), self.h_blocks("in")).reshape(d_out, d_in)
            W = (self.h_blocks("out") @ W.view(3, nb, -1, d_in)).reshape(d_out, d_in)
        return W

    @torch.no_grad()
    def merge(self):
        """A plain fp32 nn.Linear with W' = H_out W H_in (the sides this layer adapts), same bias."""
        return make_linear(self.adapted_weight(), self.base.bias)

    def extra_repr(self):
        return f"nb={self.nb}, sides={self.sides}, slices={self.slices}"


class ETHERPlusLinear(ETHERLinear):
    """ETHER+: blockdiag(I - ûûᵀ + v̂v̂ᵀ) on one side of W (see the module docstring)."""

    name = "etherplus"
    title = "ETHER+"
    all_targets = "lora4"
    vectors = ("u", "v")

    def apply_h(self, z, vecs):
        """z H, block-wise: H_i = I - ûûᵀ + v̂v̂ᵀ (symmetric, so z H = H z)."""
        u, v = vecs
        return z - (z * u).sum(-1, keepdim=True) * u + (z * v).sum(-1, keepdim=True) * v


class ETHERPlusHHLinear(ETHERPlusLinear):
    """ETHER+ on both sides of the weight, W' = H_out W H_in, each side with its own u, v."""

    name = "etherplusHH"
    title = "ETHER+ (two-sided, HH)"
    # ether_nb must divide both sides of the tied 50,257-row head, and 50257 = 29 x 1733 shares no
    # divisor but 1 with the width: only ether_nb=1 would do, so targets=all leaves lm_head out
    all_targets = "lora3"
    bench_goal_vs_lora = 1.2
    config_fields = ("ether_nb", "dropout", "targets", "base_dtype")  # no flip_side: both sides anyway
    two_sided = True
