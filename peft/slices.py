"""The q/k/v slices of GPT-2's fused attention projection c_attn, in one place.

c_attn's weight is [3d, d]: rows 0:d compute q, d:2d k, 2d:3d v. The targets "q", "k", "v" adapt
only some of these row blocks. A layer keeps its per-slice tensors for the chosen slices only, in
q, k, v order (n = len(slices) of them), and qkv_rows places them on c_attn's three row blocks:

    qkv_rows(values (n, ...), slices, fill) -> (3, ...)     the slices not chosen get `fill`

Users: LoRA's block B (fill 0), DoRA's row scale and IA3's scale (fill 1: the row is unchanged),
ETHER's unit vectors (fill 0: a zero vector makes an identity block).
"""

import torch

QKV = ("q", "k", "v")


def qkv_rows(values, slices, fill):
    """(3, ...): values[j] on the row block of slices[j], `fill` on the row blocks not in slices."""
    return torch.stack([values[slices.index(s)] if s in slices else torch.full_like(values[0], fill) for s in QKV])
