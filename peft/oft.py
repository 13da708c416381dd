"""
OFT: Orthogonal Fine-Tuning (Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning", NeurIPS 2023, arXiv 2306.07280), with its constrained variant COFT and block sharing.

The frozen weight W [out, in] is multiplied by a trainable orthogonal matrix R on the input side:

    y = (x R) Wᵀ + b            i.e.   W' = W Rᵀ,   bias untouched
    R = blockdiag(R_1, ..., R_nb),   R_i [b, b],   b = cfg.oft_block_size,   nb = in / b

Every R_i comes from the exact Cayley transform of a skew-symmetric S_i (Sᵀ = -S):

    R_i = (I + S_i)(I - S_i)⁻¹   (= (I - S_i)⁻¹(I + S_i): the two factors commute)

which is orthogonal with det +1 for any S_i. We store only the strictly-upper-triangular entries
of S_i (`oft_s`, b(b-1)/2 numbers per block) and build S_i = U - Uᵀ from them, so there is no
redundant half to drift. oft_s = 0 at init, hence R = I and the layer starts equal to the base.
Since R is orthogonal, W'W'ᵀ = W R Rᵀ Wᵀ = W Wᵀ: the angles between neurons (rows of W) are kept,
which is the point of the method. R is computed with torch.linalg.solve, batched over blocks, not
with an explicit inverse; x is rotated block-wise ((..., nb, b) einsum with R, O(in·b) per token)
and the frozen base is then called as usual, so the dense W' is never rebuilt during training.

Options
- block_share: one S shared by all nb blocks (b(b-1)/2 parameters for the whole layer).
- COFT (cfg.coft_eps = eps > 0): before every forward, with no gradient, each block whose
  ‖S_i‖_F exceeds eps' = eps / √n is rescaled onto the sphere of radius eps' (n = number of
  stored blocks: nb, or 1 with block_share), a ball around S = 0, i.e. around R = I.
  Convention: this is exactly HF peft's `eps` (‖S‖_F of its S = U - Uᵀ, radius eps/√n). The OFT
  paper's code stores a full matrix P with S = ½(P - Pᵀ) and uses radius eps_code·b²/√nb; there
  P stays skew (its gradients are skew), so eps here = eps_code · b².
- dropout (cfg.dropout = p > 0): multiplicative block dropout of BOFT (Liu et al., arXiv
  2311.06243): while training, int(p·nb) randomly chosen blocks use R_i = I for that step.
  Nothing happens with block_share (one block), nor in eval mode or in merge. (HF peft 0.21
  builds this layer for OFT but its Linear.forward never calls it.)

Conventions vs the references
- Orientation: R = (I + S)(I - S)⁻¹ as in the OFT paper. HF peft (`use_cayley_neumann=False`)
  and the batched code of the OFT repo compute (I - S)(I + S)⁻¹ = our R for -S, i.e. Rᵀ:
  the same family, with HF's `oft_R.weight` = -oft_s (same triu_indices order). HF's default
  Cayley-Neumann series is only an approximation of R (not orthogonal for large S); here R is exact.
- q/k/v slices of the fused c_attn are not supported: the rotation acts on the layer's input,
  which q, k and v share; target the whole 'c_attn'.
- A 4-bit (bitsandbytes nf4) base works: the forward only calls it, merge dequantizes it.
"""

import math

import torch
import torch.nn as nn

from errors import UserError
from peft.quant import dequantize, make_linear


def divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


class OFTLinear(nn.Module):
    """y = base(x R), R = blockdiag((I + S_i)(I - S_i)⁻¹) — see the module docstring. Owns the frozen base."""

    name = "oft"
    title = "OFT"
    default_targets = ("c_attn", "attn.c_proj")  # OFT (Qiu et al. 2023) fine-tunes the attention projections
    all_targets = "lora4"                         # q, k, v (one input: one R for the fused c_attn) and out
    hf_peft_type = None
    no_hf_reason = ("HF PEFT's OFT cannot adapt GPT-2: it wraps only torch Linear and Conv2d layers, not the "
                    "transformers Conv1D layers GPT-2 is built from (and its default Cayley-Neumann series only "
                    "approximates the exact orthogonal rotation trained here), so the rotations are merged into the weights")
    bench_goal_vs_lora = 1.3
    supports_quantize = True
    config_fields = ("oft_block_size", "coft_eps", "block_share", "dropout", "targets", "base_dtype")  # the PeftConfig fields this method reads

    @classmethod
    def hf_peft_counterpart(cls, cfg):
        """(HF peft config class name, kwargs, note or None) for bench.py: HF's OFT with the exact Cayley
        transform, like ours (HF's default is the Cayley-Neumann approximation), same blocks."""
        whole, note = cfg.hf_targets()
        kwargs = dict(r=0, oft_block_size=cfg.oft_block_size, target_modules=whole, module_dropout=cfg.dropout,
                      block_share=cfg.block_share, use_cayley_neumann=False, fan_in_fan_out=True, task_type="CAUSAL_LM")
        if cfg.coft_eps > 0:
            kwargs.update(coft=True, eps=cfg.coft_eps)
        return "OFTConfig", kwargs, note

    def __init__(self, base, cfg, slices=None):
        super().__init__()
        if slices is not None:
            raise UserError("OFT rotates the input of c_attn, which q, k and v share: target 'c_attn' "
                            f"instead of the slices {'/'.join(slices)}")
        d_in, b = base.in_features, cfg.oft_block_size
        if b < 1 or d_in % b != 0:
            raise UserError(f"oft_block_size {b} does not divide in_features {d_in} of a targeted layer; "
                            f"valid block sizes: {divisors(d_in)}")
        self.base = base
        self.base.requires_grad_(False)
        self.block_size = b
        self.n_blocks = d_in // b
        self.block_share = cfg.block_share
        self.coft_eps = cfg.coft_eps
        self.dropout = cfg.dropout
        n_stored = 1 if cfg.block_share else self.n_blocks
        # strictly-upper-triangular entries of each S_i, zeros => R = I
        self.oft_s = nn.Parameter(torch.zeros(n_stored, b * (b - 1) // 2, device=base.weight.device))
        rows, cols = torch.triu_indices(b, b, offset=1, device=base.weight.device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self):
        """S_i = U_i - U_iᵀ, with U_i strictly upper triangular holding oft_s[i]. (n, b, b)"""
        n, b = self.oft_s.shape[0], self.block_size
        U = self.oft_s.new_zeros(n, b, b)
        U[:, self.rows, self.cols] = self.oft_s
        return U - U.transpose(-2, -1)

    @torch.no_grad()
    def project(self):
        """COFT: rescale every block with ‖S_i‖_F > eps' = eps/√n onto the sphere of radius eps'."""
        eps = self.coft_eps / math.sqrt(self.oft_s.shape[0])
        norm = math.sqrt(2.0) * self.oft_s.norm(dim=1, keepdim=True)  # ‖U - Uᵀ‖_F = √2 ‖oft_s‖
        self.oft_s.mul_(torch.where(norm > eps, eps / norm, torch.ones_like(norm)))

    def rotation(self):
        """The blocks R_i = (I + S_i)(I - S_i)⁻¹, shape (n, b, b), n = nb or 1 with block_share."""
        if self.coft_eps > 0:
            self.project()
        S = self.skew()
        I = torch.eye(self.block_size, device=S.device, dtype=S.dtype)
        return torch.linalg.solve(I - S, I + S)  # (I - S)⁻¹ (I + S)

    def forward(self, x):
        R = self.rotation()  # (n, b, b)
        R = R.expand(self.n_blocks, -1, -1)  # block_share: the same block nb times (a view)
        if self.training and self.dropout > 0 and not self.block_share:
            # multiplicative dropout: int(p·nb) random blocks are the identity for this step
            drop = torch.randperm(self.n_blocks, device=R.device) < int(self.dropout * self.n_blocks)
            R = torch.where(drop[:, None, None], torch.eye(self.block_size, device=R.device, dtype=R.dtype), R)
        xb = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)  # (..., nb, b)
        x_rot = torch.einsum("...ni,nij->...nj", xb, R.to(x.dtype))  # row vector times R, per block
        return self.base(x_rot.reshape(x.shape))

    @torch.no_grad()
    def merge(self):
        """A plain fp32 nn.Linear with W' = W Rᵀ (W'[:, block i] = W[:, block i] R_iᵀ), same bias."""
        R = self.rotation().expand(self.n_blocks, -1, -1)
        W = dequantize(self.base)
        Wb = W.view(W.shape[0], self.n_blocks, self.block_size)  # (out, nb, b)
        W_new = torch.einsum("onj,nij->oni", Wb, R).reshape(W.shape)
        return make_linear(W_new, self.base.bias)

    def extra_repr(self):
        return (f"block_size={self.block_size}, n_blocks={self.n_blocks}, block_share={self.block_share}, "
                f"coft_eps={self.coft_eps}, dropout={self.dropout}")
