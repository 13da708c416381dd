"""
GPT-2 in one file, in the style of nanoGPT (github.com/karpathy/nanoGPT), plus what fine-tuning needs:
a KV cache for generation and an optimizer that only sees trainable parameters. Loading and saving
transformers GPT-2 folders (and the OpenAI weights) is hf_gpt2.py's job.

Layout conventions:
- every projection is a torch nn.Linear with weight [out, in] (transformers stores the GPT-2
  projections as Conv1D with weight [in, out]; hf_gpt2.py transposes on load and on save).
- attn.c_attn is the fused [q | k | v] projection: rows 0:C are q, C:2C are k, 2C:3C are v.
- lm_head.weight is the same Parameter as transformer.wte.weight (weight tying).
- forward code always calls the projection modules (self.c_attn(x), ...) and never reads their
  .weight, so peft/ can swap them for adapter wrappers.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from errors import UserError

@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length (transformers: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms (GPT-2 has them)
    layer_norm_epsilon: float = 1e-5


class KVCache:
    """Keys and values of the tokens already processed, one preallocated buffer pair per layer.

    k[i], v[i]: (B, nh, block_size, hs), allocated on the first write of a sequence (so they take
    the batch size and the dtype the model computes in, e.g. bf16 under autocast). Only the first
    `pos` positions are valid.
    Attention layer i calls update(i, k, v) with the new tokens' keys/values; GPT.forward advances
    `pos` once after all layers have run.
    """

    def __init__(self, n_layer, block_size):
        self.block_size = block_size
        self.pos = 0  # number of cached tokens = position of the next token
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v):
        """Append k, v (B, nh, T, hs) at positions pos..pos+T-1; return all keys/values so far."""
        B, nh, T, hs = k.shape
        buf = self.k[layer]
        fresh = buf is None or (self.pos == 0 and (buf.shape[0], buf.dtype, buf.device) != (B, k.dtype, k.device))
        if fresh:  # first write, or a new sequence with another batch size / dtype / device
            self.k[layer] = k.new_empty(B, nh, self.block_size, hs)
            self.v[layer] = v.new_empty(B, nh, self.block_size, hs)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos+T, hs) views

    def reset(self):
        """Forget every cached token; the buffers are kept and overwritten."""
        self.pos = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, y = softmax(q kᵀ / √hs + causal mask) v per head."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused [q|k|v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.size()  # batch, sequence length, embedding dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        past = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, past+T, hs)
        if past == 0:  # plain causal attention over this chunk
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token may look at every cached token
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # new token i sits at position past+i and may look at keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """y = c_proj(gelu_tanh(c_fc(x))), hidden size 4C."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C), GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# --- the loss without the logits ---------------------------------------------------------------
LOSS_CHUNK = 1024  # tokens per chunk in linear_cross_entropy: (1024, 50304) fp32 logits = 206 MB
VOCAB_MULTIPLE = 64  # on CUDA the head matmul runs on the vocabulary padded to this (50257 -> 50304)


def linear_cross_entropy(x, weight, targets, chunk=LOSS_CHUNK, pad_to=None):
    """Mean cross-entropy of the logits x Wᵀ, without ever holding all of them.

    x (N, C) the final hidden states, weight (V, C) the head (lm_head = wte), targets (N,) with -1
    for positions that are not scored. Equals F.cross_entropy(x @ W.T, targets, ignore_index=-1)
    to float rounding, gradients included, but the (N, V) logits — 3.3 GB in fp32 for 16 × 1024
    tokens of GPT-2 — exist only one chunk of `chunk` tokens at a time.

    How: the loss is the last thing the model computes, so its gradient with respect to the chunk's
    logits is known in the forward already, softmax(logits) - onehot(target) (divided by the number
    of scored positions). Each chunk turns it into its share of the gradients of x (that chunk's
    rows) and of W (a sum over chunks) right away, and drops the logits; backward only multiplies
    the stored gradients by the incoming one. No recompute, so the flops are those of the plain
    path: one head matmul forward, two backward.
    Vocabulary padding: the matmul runs on W padded with zero rows to a multiple of pad_to (default
    VOCAB_MULTIPLE on CUDA, whose kernels are faster on such shapes; 1, no padding, elsewhere: on a
    CPU the padded copy of W only costs memory); the padded columns are set to -inf before the
    softmax, so they add nothing to the loss or the gradients (exact). The weight keeps its [V, C]
    shape, so checkpoints do not change.
    Under autocast the matmuls run in its dtype and the softmax in fp32, as F.cross_entropy does.
    """
    if pad_to is None:
        pad_to = VOCAB_MULTIPLE if x.device.type == "cuda" else 1
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, chunk, pad_to)
    return _linear_cross_entropy(x, weight, targets, chunk, pad_to, False, False)[0]


def _linear_cross_entropy(x, weight, targets, chunk, pad_to, grad_x, grad_w):
    """(mean loss, dloss/dx (N, C) or None, dloss/dW (V, C) or None), `chunk` rows at a time."""
    N, V = x.shape[0], weight.shape[0]
    Vp = -(-V // pad_to) * pad_to
    if torch.is_autocast_enabled(x.device.type):  # cast first, so the padded copy is the cast one
        weight = weight.to(torch.get_autocast_dtype(x.device.type))
    w = F.pad(weight, (0, 0, 0, Vp - V)) if Vp > V else weight  # (Vp, C), zero rows at the end
    keep = targets != -1  # (N,)
    count = keep.sum()  # a device tensor: no host synchronisation
    loss = torch.zeros((), device=x.device, dtype=torch.float32)
    gx = torch.empty_like(x) if grad_x else None  # (N, C)
    gw = torch.zeros(Vp, x.shape[1], device=x.device, dtype=torch.float32) if grad_w else None  # (Vp, C)
    for start in range(0, N, chunk):
        xc, kc = x[start:start + chunk], keep[start:start + chunk]  # (n, C), (n,)
        tc = targets[start:start + chunk].clamp(min=0)[:, None]  # (n, 1), ignored rows point at 0
        logits = F.linear(xc, w).float()  # (n, Vp)
        logits[:, V:] = float("-inf")  # padding: probability 0
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
        nll = lse - logits.gather(1, tc)  # (n, 1) = -log p(target)
        loss = loss + torch.where(kc[:, None], nll, 0.0).sum()
        if grad_x or grad_w:
            g = logits.sub_(lse).exp_()  # (n, Vp) softmax, in place of the logits
            g.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=g.dtype))  # - onehot(target)
            g.mul_(kc[:, None])  # ignored rows give no gradient
            if grad_x:
                gx[start:start + chunk] = g.to(w.dtype) @ w  # (n, C)
            if grad_w:
                gw += g.to(xc.dtype).t() @ xc  # (Vp, C)
    loss = loss / count
    gx = gx.div_(count) if grad_x else None
    gw = gw[:V].div_(count) if grad_w else None  # in place: no second (V, C) copy
    return loss, gx, gw


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with autograd: the gradients come from the forward (see there)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, pad_to):
        loss, gx, gw = _linear_cross_entropy(x, weight, targets, chunk, pad_to, ctx.needs_input_grad[0],
                                             ctx.needs_input_grad[1])
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw = ctx.saved_tensors
        return (gx * grad_loss if gx is not None else None, gw * grad_loss if gw is not None else None,
                None, None, None)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one Parameter, two uses
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/√(2·n_layer) (one per sub-block)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Number of parameters (trainable or not). non_embedding drops the position embeddings;
        the token embeddings stay counted because they are also the lm_head weights."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def crop_block_size(self, block_size):
        """Shrink the context to block_size tokens by keeping the first block_size position
        embeddings (e.g. fine-tune GPT-2, trained with 1024 positions, on 256-token sequences)."""
        if not 1 <= block_size <= self.config.block_size:
            raise UserError(f"cannot crop the context to {block_size} tokens: it must be between 1 and "
                            f"the model's {self.config.block_size}")
        self.config.block_size = block_size
        wpe = self.transformer.wpe.weight
        self.transformer.wpe.weight = nn.Parameter(wpe[:block_size].detach().clone(), requires_grad=wpe.requires_grad)

    def new_kv_cache(self):
        """An empty KV cache sized for this model (batch size and dtype are set by the first call)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(self, idx, targets=None, kv_cache=None, reduction="mean", return_logits=True):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, V) and the mean cross-entropy over positions whose target
        is not -1 (reduction="none": the per-position cross-entropy (B, T), 0 where the target is -1,
        which is what eval.py scores with). Without: logits (B, 1, V) of the last position only and
        loss None.
        return_logits=False (training: train.py, bench.py) with targets and reduction="mean": logits
        None, and the loss of a plain lm_head comes from linear_cross_entropy, which never holds the
        (B, T, V) logits (same loss and gradients; an adapter on lm_head takes the logits path).
        With a kv_cache the T tokens continue the cached ones: they sit at positions
        pos..pos+T-1, attend to the cached keys/values, and are appended to the cache.
        """
        B, T = idx.size()
        past = 0 if kv_cache is None else kv_cache.pos
        if past + T > self.config.block_size:
            raise UserError(f"cannot forward a sequence of {past + T} tokens ({past} cached + {T} new), "
                            f"the model's context is {self.config.block_size} tokens; use shorter sequences")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        if (targets is not None and not return_logits and reduction == "mean" and type(self.lm_head) is nn.Linear
                and self.lm_head.bias is None):
            # training: the loss without the (B, T, V) logits (see linear_cross_entropy)
            logits = None
            loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        elif targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)
            if reduction == "none":
                loss = loss.view(B, T)  # (B, T)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, V), the list index keeps the time dim
            loss = None
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """nanoGPT's entry point: hf_gpt2.load (a gpt2* name or a transformers GPT-2 folder, in fp32)."""
        import hf_gpt2  # here: hf_gpt2 imports this module
        return hf_gpt2.load(name_or_path, dropout=dropout)

    def save_hf(self, folder, dtype=torch.float32):
        """hf_gpt2.save: this model as a transformers GPT-2 folder."""
        import hf_gpt2
        hf_gpt2.save(self, folder, dtype=dtype)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lr_scales=None):
        """AdamW over the trainable parameters: matrices and embeddings (>= 2-D) get weight decay,
        biases, LayerNorm gains and other vectors do not. Fused kernel on CUDA.
        lr_scales {parameter name: multiplier} (peft.lr_scales, e.g. LoRA+'s B matrices) puts those
        parameters in groups of their own whose lr is multiplier × learning_rate; every group keeps
        its multiplier as "lr_scale", so a schedule sets group["lr"] = lr × group["lr_scale"]."""
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        if not param_dict:
            raise UserError("the model has no trainable parameters: check the fine-tuning method and its targets")
        lr_scales = lr_scales or {}
        decay_params = [p for p in param_dict.values() if p.dim() >= 2]
        nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
        optim_groups = []
        for scale in sorted({1.0, *lr_scales.values()}):
            for decay in (True, False):
                params = [p for pn, p in param_dict.items() if (p.dim() >= 2) == decay and lr_scales.get(pn, 1.0) == scale]
                if params:
                    optim_groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                                         "lr": learning_rate * scale, "lr_scale": scale})
        if lr_scales:
            print(f"learning rate x{', x'.join(f'{s:g}' for s in sorted(set(lr_scales.values())))} for "
                  f"{len(lr_scales)} parameter tensors (e.g. {next(iter(lr_scales))})")
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def flops_per_token(self, seq_len=None):
        """Training flops (forward + backward) per token of a seq_len-token sequence (default block_size):
        ≈ 6N + 12·L·H·Q·T (PaLM appendix B), N = all parameters; with frozen weights the backward is
        cheaper, so for PEFT this counts the flops a full fine-tune would do."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model flops utilization: achieved flops / peak_flops (flops per second of the device)."""
        flops_per_fwdbwd = self.flops_per_token() * self.config.block_size
        flops_per_iter = flops_per_fwdbwd * fwdbwd_per_iter
        flops_achieved = flops_per_iter / dt  # per second
        return flops_achieved / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 stop_token=None, stop_sequences=()):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + n) with n <= max_new_tokens.

        temperature 0 picks the argmax (greedy); otherwise sample from softmax(logits / temperature),
        restricted to the top_k most likely tokens and/or the smallest set whose probability reaches
        top_p (nucleus). With stop_token, a row that produced it keeps emitting it, and generation
        ends early once every row has. stop_sequences (lists of token ids, e.g. the tokens of
        "### Human:") end a row the same way once its new tokens end with one of them (then stop_token,
        which stop_sequences requires, fills the rest of the row).
        use_cache: the prompt is run once (prefill), then each step runs only the newest token against
        the cached keys/values. When the context reaches block_size the cache is full; we then fall
        back to re-prefilling the last block_size tokens at every step, which is exactly what the
        uncached path computes (it crops the context to the last block_size tokens).
        Call model.eval() first if the model has dropout.
        """
        B, T = idx.size()
        block_size = self.config.block_size
        if T == 0:
            raise UserError("the prompt is empty: give at least one token")
        if T > block_size:
            raise UserError(f"the prompt is {T} tokens but the model's context is {block_size} tokens; "
                            f"shorten the prompt")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        if stop_sequences and stop_token is None:
            raise ValueError("stop_sequences needs a stop_token to pad finished rows with")
        kv_cache = self.new_kv_cache() if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # rows that produced stop_token
        for step in range(max_new_tokens):
            if kv_cache is None:
                logits, _ = self(idx[:, -block_size:])  # (B, 1, V)
            elif step == 0 or kv_cache.pos == block_size:  # prefill, or re-prefill when full
                kv_cache.reset()
                logits, _ = self(idx[:, -block_size:], kv_cache=kv_cache)  # (B, 1, V)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=kv_cache)  # (B, 1, V)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
            if stop_token is not None:
                idx_next = idx_next.masked_fill(done.unsqueeze(1), stop_token)
                done = done | (idx_next[:, 0] == stop_token)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + step + 1)
            for seq in stop_sequences:  # does a row's new text end with this sequence?
                if 0 < len(seq) <= step + 1:
                    tail = torch.tensor(seq, device=idx.device)  # (S,)
                    done = done | (idx[:, -len(seq):] == tail).all(dim=1)
            if stop_token is not None and bool(done.all()):
                break
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row from logits (B, V): argmax when temperature == 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted descending
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # (B, V)
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1)  # (B, 1)

