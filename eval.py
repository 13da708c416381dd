"""
Evaluate models: perplexity on WikiText-2, LAMBADA and IMDB or on any prepared data/ folder, and
lm-evaluation-harness tasks. One table row per model, one column per dataset metric.

    python eval.py --models=gpt2,out-lora,models/gpt2-milton --datasets=wikitext2,lambada,imdb
    python eval.py --models=models/gpt2-milton,out-quickstart --datasets=shakespeare,milton   # offline
    python eval.py --models=out-lora --datasets=wikitext2=wiki.test.jsonl,lambada=lambada.jsonl
    python eval.py --models=gpt2 --tasks=arc_challenge,truthfulqa_mc2,mmlu --limit=100

A model is a training out_dir (full or adapter checkpoint; adapters are merged first), a gpt2* name,
a transformers GPT-2 folder or a Hugging Face PEFT adapter folder (--base= overrides its base).

Datasets (--datasets, comma separated; the default is wikitext2,lambada,imdb unless --tasks is given):

    wikitext2   WikiText-2 raw, test split, its lines joined with "\\n\\n" into one text, as the
                transformers perplexity guide does               -> ppl
    lambada     LAMBADA (EleutherAI/lambada_openai, test): predict the last word of a passage
                                                                 -> acc, ppl
    imdb        IMDB reviews (stanfordnlp/imdb, test), each one a document of its own, after
                <|endoftext|>; --max_docs of them, evenly spaced  -> ppl
    NAME        a folder data/NAME (or any path to a folder, or a .bin file) holding val.bin: the
                perplexity of its tokens, as prepared for training -> ppl

The first three come from the Hugging Face Hub through the `datasets` package. Offline, pass a file
in the Hub's schema instead (.json, .jsonl or .parquet records with a "text" field):
`--datasets=wikitext2=wiki.test.jsonl`. `NAME=PATH` with any other NAME labels a val.bin folder.

Perplexity with a sliding window (https://huggingface.co/docs/transformers/perplexity). For tokens
x_0 .. x_{N-1}, a window covers x[b : b+W] (W = --block_size tokens, the model's context by default)
and the model predicts each of its tokens from the ones before it inside the window. Windows start
every S = --stride tokens, and each scores only the tokens after the previous window's end. With
S < W every token x_i but x_0 (which has no context) is scored exactly once, with W - S to W - 1
tokens of context:

    NLL = - sum_i log p(x_i | window context)          (summed in float64)
    ppl = exp(NLL / number of scored tokens)

S = W/2 (the default) gives every token at least W/2 tokens of context for twice the compute of
S = W, where windows are disjoint and the first token of each is context only (as in the guide).
We count the scored tokens exactly; the guide's loop counts one token fewer per window when S < W,
a 1/S relative difference in its average.

LAMBADA, as lm-evaluation-harness's lambada_openai: a passage is split at its last space into a
context and a target " word" (the target's tokens are those of the whole passage after the context's
tokens; an over-long context is cut from the left). Per example, with the target tokens t_1..t_k:

    correct    every t_j is the argmax of the model's next-token distribution (greedy decoding
               would write exactly the word)
    nll        - sum_j log p(t_j | context, t_<j)
    acc = mean(correct)      ppl = exp(mean(nll))          (per word, not per token, as lm-eval)

lm-evaluation-harness (optional: pip install lm-eval) runs through HarnessLM below, a wrapper that
gives the harness our GPT and the GPT-2 tokenizer: `--tasks=a,b` evaluates its tasks, `--include_path`
adds a folder of your own task YAMLs (e.g. over a local .jsonl file).

Output: the Markdown table on stdout (progress bars on stderr), and JSON written atomically to --out
(rewritten after each model, so a long run keeps what it has done; an existing --out is replaced only
with --overwrite=true, and only if it is an earlier eval.py result):

    {"config":   every key above,
     "datasets": {name: {"source": file, folder or "hub:...", "kind": "ppl" | "lambada", "records": n}},
     "models":   [{"model": as given, "method": "lora" | "full" | ... | null (not a training run),
                   "parameters": n, "block_size": W, "stride": S, "seconds": t,
                   "datasets": {name: {"ppl", "nll" (mean per token), "tokens", "windows"}
                                    or {"acc", "ppl", "nll" (mean per passage), "examples"}},
                   "columns":  {table column: value},
                   "tasks":    lm-eval's results, n-shot, versions, configs (with --tasks)}]}

Models with different contexts are each evaluated with their own (a note says so); --block_size=W
puts every row on the same windows. Everything is deterministic: no sampling, fixed document order.
"""

import difflib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import configurator
import devices
import errors
import outputs
import peft
import shards
import tokenizer
from errors import UserError
from model import sample_next

# -----------------------------------------------------------------------------
models = ("gpt2",)  # training out_dirs, gpt2* names, transformers folders or HF PEFT adapter folders
datasets = ()  # wikitext2, lambada, imdb, a data/ folder name or path, NAME=FILE; () = the three (none with --tasks)
block_size = 0  # window W in tokens; 0 = each model's own context
stride = 0  # tokens between window starts; 0 = block_size // 2
batch_size = 4  # windows (or LAMBADA passages, or harness requests) per forward pass
max_docs = 500  # IMDB reviews to evaluate, evenly spaced over the test split; 0 = all 25,000
tasks = ()  # lm-evaluation-harness task names, e.g. arc_challenge,truthfulqa_mc2,mmlu
include_path = ""  # a folder of extra lm-eval task YAMLs
num_fewshot = -1  # lm-eval few-shot examples; -1 = each task's default
limit = 0  # lm-eval: only the first N examples of each task; 0 = all
max_gen_toks = 256  # lm-eval generate_until: tokens to generate when a task does not say
bootstrap_iters = 100000  # lm-eval: bootstrap resamples for the stderr of non-mean metrics; 0 = none
base = ""  # the base to merge into: for HF PEFT adapter folders ('' = the one their config names), and for training runs whose base folder moved
out = "eval_results.json"  # JSON results, rewritten after each model
overwrite = False  # replace an existing --out (only ever an earlier eval.py result)
device = devices.default_device()  # cuda when a GPU is present, else cpu
dtype = "float32"  # 'float32', 'bfloat16' or 'float16' (autocast)
# -----------------------------------------------------------------------------
DEFAULTS = configurator.defaults_from(dict(globals()))
_ = configurator.ANY
DOMAINS = {  # the valid values of every key (configurator's rules), checked before anything runs
    "models": lambda v: None if v else "give at least one model, e.g. --models=gpt2,out-lora",
    "datasets": _, "block_size": lambda v: None if v == 0 or v >= 2 else "must be 0 (the model's context) or >= 2",
    "stride": ">= 0", "batch_size": ">= 1", "max_docs": ">= 0", "tasks": _, "include_path": _,
    "num_fewshot": ">= -1", "limit": ">= 0", "max_gen_toks": ">= 1", "bootstrap_iters": ">= 0", "base": _,
    "out": configurator.PATH, "overwrite": _, "device": configurator.DEVICE, "dtype": configurator.DTYPES,
}

DEFAULT_DATASETS = ("wikitext2", "lambada", "imdb")
# name -> (datasets.load_dataset path, config name, split); every one has a "text" field
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "lambada": ("EleutherAI/lambada_openai", "default", "test"),
    "imdb": ("stanfordnlp/imdb", None, "test"),
}
TEXT_FIELD = "text"
ROOT = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# datasets: text -> tokens, resolved once and shared by every model

def hub_texts(name):
    """The "text" column of a Hub dataset, downloaded (or taken from the cache) with `datasets`."""
    path, config_name, split = HUB_DATASETS[name]
    local = f"--datasets={name}={name}.jsonl (.json, .jsonl or .parquet records with a '{TEXT_FIELD}' field)"
    try:
        import datasets as hf_datasets  # optional dependency: only the Hub downloads need it
    except ImportError:
        raise UserError(f"--datasets={name} is downloaded with the `datasets` package, which is not installed: "
                        f"pip install datasets, or pass a local copy: {local}") from None
    try:
        ds = hf_datasets.load_dataset(path, config_name, split=split)
    except Exception as e:  # no network, offline mode, missing dataset, ...: all mean "give us a file"
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UserError(f"could not load {path} ({config_name or 'default'}, {split} split) from the Hugging Face "
                        f"Hub ({reason}); where the Hub is reachable save it (datasets.load_dataset(...)"
                        f".to_json(FILE)) and pass the file: {local}") from None
    return list(ds[TEXT_FIELD])


def file_texts(name, path):
    """The "text" field of every record in a local .json/.jsonl/.parquet file in the Hub's schema."""
    if os.path.isdir(path):
        raise UserError(f"--datasets={name}={path}: {path} is a folder; give a .json, .jsonl or .parquet file "
                        f"of records with a '{TEXT_FIELD}' field")
    records = shards.read_records(path)
    texts = []
    for i, rec in enumerate(records):
        if not isinstance(rec.get(TEXT_FIELD), str):
            what = "has no" if TEXT_FIELD not in rec else "has a non-string"
            raise UserError(f"{path}: record {i} {what} '{TEXT_FIELD}' field (its fields: {', '.join(rec) or 'none'}); "
                            f"{name} records look like {{\"{TEXT_FIELD}\": \"...\"}}")
        texts.append(rec[TEXT_FIELD])
    return texts


def evenly_spaced(items, k):
    """k items spread evenly over the list (all of them when k is 0 or >= len): items[i * n // k].
    The IMDB test split is sorted by label, so its first 500 reviews would all be negative ones."""
    n = len(items)
    if k <= 0 or k >= n:
        return list(items)
    return [items[i * n // k] for i in range(k)]


def lambada_example(text, where):
    """One LAMBADA passage -> (context tokens, target tokens), split as lm-eval's lambada_openai does:
    context = the text before the last space, target = " " + the last word, and the target's tokens
    are the tokens of the whole passage after the context's (GPT-2's tokenizer always cuts before a
    space, so they are the tokens of " word"). An empty context becomes <|endoftext|>."""
    if " " not in text:
        raise UserError(f"{where} has no space, so there is no last word to predict: {text[:60]!r}")
    context, word = text.rsplit(" ", 1)
    target = " " + word
    if not context:
        return [tokenizer.EOT], tokenizer.encode(target)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + target)[len(context_ids):]


def val_bin_path(path):
    """A val.bin inside a folder, or a .bin file itself."""
    return path if path.endswith(".bin") and os.path.isfile(path) else os.path.join(path, "val.bin")


def load_dataset(spec, max_docs=500):
    """One --datasets entry -> {name, kind: 'ppl' | 'lambada', docs | examples, source, ...}.

    kind 'ppl': docs, a list of int64 token arrays, each scored with sliding windows on its own.
    kind 'lambada': examples, a list of (context ids, target ids)."""
    name, _, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not name:
        raise UserError(f"--datasets entry '{spec}' has no name; write NAME or NAME=PATH")
    if path and name not in HUB_DATASETS:  # NAME=folder: a label for a val.bin folder
        if not (os.path.isdir(path) or path.endswith(".bin")):
            raise UserError(f"--datasets={spec}: a file in a Hub schema can only stand for {', '.join(HUB_DATASETS)}; "
                            f"for '{name}' give a folder holding val.bin")
        return bin_dataset(name, val_bin_path(path))
    if name not in HUB_DATASETS:
        folder = name if os.path.isdir(name) or name.endswith(".bin") else os.path.join(ROOT, "data", name)
        if os.path.isdir(folder) or os.path.isfile(folder):
            label = os.path.basename(os.path.normpath(folder if os.path.isdir(folder) else os.path.dirname(folder)))
            return bin_dataset(label, val_bin_path(folder))
        data_dir = os.path.join(ROOT, "data")
        prepared = sorted(d for d in (os.listdir(data_dir) if os.path.isdir(data_dir) else [])
                          if os.path.isfile(os.path.join(data_dir, d, "val.bin")))
        close = difflib.get_close_matches(name, list(HUB_DATASETS) + prepared, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown dataset '{name}': {hint}known are {', '.join(HUB_DATASETS)}, a prepared folder "
                        f"under data/ ({', '.join(prepared) or 'none yet'}), a path to a folder with val.bin, "
                        f"or NAME=FILE for a local copy of {', '.join(HUB_DATASETS)}")

    texts = file_texts(name, path) if path else hub_texts(name)
    source = path or "hub:" + "/".join(x for x in HUB_DATASETS[name] if x)
    where = path or HUB_DATASETS[name][0]
    if not texts:
        raise UserError(f"{where} holds no records; give a file with at least one {{\"{TEXT_FIELD}\": ...}} record")
    if name == "wikitext2":
        ids = np.array(tokenizer.encode("\n\n".join(texts)), dtype=np.int64)  # the guide's join
        if len(ids) < 2:
            raise UserError(f"{where} holds {len(ids)} token(s) of text; perplexity needs at least 2")
        return dict(name=name, kind="ppl", source=source, docs=[ids], records=len(texts))
    if name == "imdb":
        chosen = evenly_spaced(texts, max_docs)
        docs = [np.array([tokenizer.EOT] + tokenizer.encode(t), dtype=np.int64) for t in chosen]
        if sum(len(d) - 1 for d in docs) == 0:
            raise UserError(f"{where}: every review is empty; nothing to score")
        return dict(name=name, kind="ppl", source=source, docs=docs, records=len(texts))
    examples = [lambada_example(t, f"{where}: record {i}") for i, t in enumerate(texts)]
    return dict(name=name, kind="lambada", source=source, examples=examples, records=len(texts))


def bin_dataset(name, path):
    """The val.bin tokens of a prepared folder: one stream, scored as it is (already tokenized)."""
    ids = np.asarray(shards.read_shard(path), dtype=np.int64)  # one clear line if missing or broken
    if len(ids) < 2:
        raise UserError(f"{path} holds {len(ids)} token; perplexity needs at least 2")
    return dict(name=name, kind="ppl", source=path, docs=[ids], records=1)


def max_token(ds):
    if ds["kind"] == "ppl":
        return max(int(d.max()) for d in ds["docs"] if len(d))
    return max(max(c + t) for c, t in ds["examples"])


# -----------------------------------------------------------------------------
# scoring

@torch.no_grad()
def token_nll(model, rows, device="cpu", ctx=nullcontext()):
    """rows: a list of (x, y) token sequences with len(x) == len(y); y[i] is the token to predict after
    x[:i+1], or -1 where nothing is scored. Rows are right-padded to the longest (causal attention:
    padding never changes the positions before it).
    Returns, for the scored positions only, row by row: nll (N,) float32 = -log p(y | x), hit (N,)
    bool = (argmax == y), and the number of scored positions of each row (they sum to N)."""
    T = max(len(x) for x, _ in rows)
    X = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    Y = torch.full((len(rows), T), -1, dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(rows):
        X[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        Y[i, :len(y)] = torch.as_tensor(y, dtype=torch.long)
    X, Y = X.to(device), Y.to(device)
    with ctx:
        logits, nll = model(X, targets=Y, reduction="none")  # (B, T, V), (B, T): every position
    scored = Y >= 0  # (B, T)
    nll = nll[scored].float()  # (N,)
    hit = logits[scored].argmax(dim=-1) == Y[scored]  # (N,)
    return nll, hit, scored.sum(dim=1).tolist()


def load_for_eval(source, device="cpu", base=None):
    """(model, meta) as checkpoint.load_model gives them, adapters folded into the weights (the
    evaluated model is the base's shape) and in eval mode; meta is None for a non-training source."""
    model, meta = checkpoint.load_model(source, device=device, base=base)
    if meta is not None:
        peft.merge(model)
    model.eval()
    return model, meta


def sliding_windows(n, block_size, stride):
    """The windows of the transformers perplexity guide over n tokens, as (begin, end, first):
    the window holds tokens[begin:end] (end - begin <= block_size) and scores tokens[first:end], the
    ones after the previous window's end (first > begin: a token needs at least one of context)."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + block_size, n)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        prev_end = end
        if end == n:
            break


def perplexity(model, docs, block_size, stride, batch_size=4, device="cpu", ctx=nullcontext(), desc=None):
    """Sliding-window perplexity over documents (each a 1-D token array scored on its own; its first
    token is context only). Windows of every document are batched together, longest first.
    Returns {ppl, nll (mean per scored token), tokens (scored), windows}."""
    windows = [(d, b, e, f) for d, doc in enumerate(docs) for b, e, f in sliding_windows(len(doc), block_size, stride)]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # stable: equal lengths keep their order
    total_nll, scored = 0.0, 0  # python floats are float64
    with tqdm(total=sum(e - b - 1 for _, b, e, _ in windows), desc=desc, unit="tok", unit_scale=True,
              disable=desc is None, file=sys.stderr, mininterval=1.0) as bar:
        for i in range(0, len(windows), batch_size):
            rows = []
            for d, b, e, f in windows[i:i + batch_size]:
                x = docs[d][b:e - 1]  # inputs; x[j] predicts docs[d][b + j + 1]
                y = docs[d][b + 1:e].copy()
                y[:f - b - 1] = -1  # already scored by the previous window: context only
                rows.append((x, y))
                scored += e - f
            nll, _, _ = token_nll(model, rows, device, ctx)
            total_nll += nll.double().sum().item()
            bar.update(sum(len(x) for x, _ in rows))
    mean = total_nll / scored
    return dict(ppl=math.exp(mean), nll=mean, tokens=scored, windows=len(windows))


def lambada(model, examples, block_size, batch_size=4, device="cpu", ctx=nullcontext(), desc=None):
    """LAMBADA accuracy and perplexity (see the module docstring) over (context ids, target ids) pairs.
    An input longer than the window keeps its last block_size tokens (lm-eval cuts from the left too).
    Returns {acc, ppl, nll (mean per passage), examples}."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]), reverse=True)
    nlls, correct = [0.0] * len(examples), [False] * len(examples)
    with tqdm(total=sum(min(len(c) + len(t) - 1, block_size) for c, t in examples), desc=desc, unit="tok",
              unit_scale=True, disable=desc is None, file=sys.stderr, mininterval=1.0) as bar:
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            rows = []
            for k in chunk:
                context, target = examples[k]
                if len(target) > block_size:
                    raise UserError(f"a LAMBADA target word is {len(target)} tokens, longer than the window "
                                    f"({block_size}); use a larger --block_size")
                seq = (context + target)[-(block_size + 1):]
                x = seq[:-1]
                y = [-1] * (len(x) - len(target)) + target  # score the target's tokens only
                rows.append((x, y))
            nll, hit, counts = token_nll(model, rows, device, ctx)
            for k, n, h in zip(chunk, nll.double().split(counts), hit.split(counts)):
                nlls[k], correct[k] = n.sum().item(), bool(h.all())
            bar.update(sum(len(x) for x, _ in rows))
    mean = sum(nlls) / len(nlls)
    return dict(acc=sum(correct) / len(correct), ppl=math.exp(mean), nll=mean, examples=len(examples))


# -----------------------------------------------------------------------------
# lm-evaluation-harness

class HarnessLM:
    """Our GPT as an lm-evaluation-harness model: the three request types every task reduces to.

    loglikelihood((context, continuation)) -> (log p(continuation | context), is_greedy)
        Tokenized as lm-eval's HFLM does: trailing spaces of the context move to the continuation,
        the continuation's tokens are those of context + continuation after the context's tokens,
        an empty context is <|endoftext|>, and an input longer than the context is cut from the left.
        is_greedy: every continuation token is the argmax given what precedes it.
    loglikelihood_rolling((text,)) -> log p(text)
        lm-eval's rolling windows: <|endoftext|> then the text's tokens, cut into disjoint windows of
        block_size predictions; the last window is filled up with earlier tokens as context.
    generate_until((context, gen_kwargs)) -> text
        greedy (or sampled when gen_kwargs has do_sample/temperature > 0) with the KV cache, up to
        max_gen_toks tokens, stopping at <|endoftext|> or any of gen_kwargs["until"], which is cut off.

    Tokens come from tokenizer.py (GPT-2's BPE). The model's vocabulary must cover them: a GPT-2
    with fewer than 50257 tokens cannot be evaluated on arbitrary text.
    lm-eval is optional, so this class does not inherit from lm_eval.api.model.LM here:
    harness_lm() builds the subclass (HarnessLM, LM) when it is needed. Requests are batched for the
    two loglikelihoods (longest first, right-padded); generation runs one request at a time.
    """

    def __init__(self, model, batch_size=4, max_gen_toks=256, device="cpu", ctx=nullcontext()):
        super().__init__()  # lm_eval's LM.__init__ in the combined class (rank 0 of 1, no cache)
        self.model = model
        self.block_size = model.config.block_size
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = device
        self.ctx = ctx

    def _encode_pair(self, context, continuation):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # "Answer: " + "four" is scored as "Answer:" + " four", the way GPT-2 tokenizes it
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
        # nothing to condition on: <|endoftext|>, where every GPT-2 document starts
        return context_ids or [tokenizer.EOT], continuation_ids

    def _check_vocab(self, ids):
        if ids and max(ids) >= self.model.config.vocab_size:
            raise UserError(f"a request has token id {max(ids)} but the model's vocabulary has "
                            f"{self.model.config.vocab_size} tokens; lm-eval tasks need a full GPT-2 vocabulary")

    def _score(self, pairs, disable_tqdm=False):
        """[(context ids, continuation ids)] -> [(sum of continuation log-probs, is_greedy)], in order."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        results = [None] * len(pairs)
        for i in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood", file=sys.stderr):
            chunk = order[i:i + self.batch_size]
            rows = []
            for k in chunk:
                context, cont = pairs[k]
                if not cont or len(cont) > self.block_size:
                    raise UserError(f"a continuation of {len(cont)} tokens cannot be scored with a "
                                    f"{self.block_size}-token context (it needs 1 to {self.block_size})")
                self._check_vocab(context + cont)
                seq = (context + cont)[-(self.block_size + 1):]
                rows.append((seq[:-1], [-1] * (len(seq) - 1 - len(cont)) + cont))
            nll, hit, counts = token_nll(self.model, rows, self._device, self.ctx)
            for k, n, h in zip(chunk, nll.double().split(counts), hit.split(counts)):
                results[k] = (-n.sum().item(), bool(h.all()))
        return results

    def loglikelihood(self, requests, disable_tqdm=False):
        return self._score([self._encode_pair(*req.args) for req in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        pairs, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=tokenizer.encode(text), prefix_token=tokenizer.EOT,
                                                max_seq_len=self.block_size, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._score(pairs, disable_tqdm)):
            totals[r] += logprob
        return totals

    @torch.no_grad()
    def _generate(self, context_ids, until, max_new, temperature, top_k, top_p):
        """Tokens after context_ids, one at a time with the KV cache, until EOT, a stop string or max_new."""
        L = self.block_size
        idx = torch.tensor([context_ids[-max(1, L - max_new):]], dtype=torch.long, device=self._device)  # (1, T)
        kv_cache = self.model.new_kv_cache()
        with self.ctx:
            logits, _ = self.model(idx, kv_cache=kv_cache)  # (1, 1, V)
        out = []
        for _ in range(max_new):
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p)  # (1, 1)
            if idx_next.item() == tokenizer.EOT:
                break
            out.append(idx_next.item())
            if any(s in tokenizer.decode(out) for s in until):
                break
            idx = torch.cat((idx, idx_next), dim=1)  # (1, T + 1)
            with self.ctx:
                if kv_cache.pos == L:  # the cache is full: re-read the last L tokens, as GPT.generate does
                    kv_cache.reset()
                    logits, _ = self.model(idx[:, -L:], kv_cache=kv_cache)
                else:
                    logits, _ = self.model(idx_next, kv_cache=kv_cache)
        return out

    def generate_until(self, requests, disable_tqdm=False):
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until", file=sys.stderr):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            if not kwargs.get("do_sample", temperature > 0):
                temperature = 0.0  # greedy
            context_ids = tokenizer.encode(context) or [tokenizer.EOT]
            self._check_vocab(context_ids)
            ids = self._generate(context_ids, until, max_new, temperature, kwargs.get("top_k") or None,
                                 kwargs.get("top_p") or None)
            text = tokenizer.decode(ids)
            for s in until:
                text = text.split(s)[0]
            results.append(text)
        return results


def harness_lm(model, **kwargs):
    """A HarnessLM that is an lm_eval.api.model.LM (so lm_eval.simple_evaluate accepts it)."""
    lm_eval = import_lm_eval()
    cls = type("HarnessLM", (HarnessLM, lm_eval.api.model.LM), {})
    return cls(model, **kwargs)


def import_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError:
        raise UserError("--tasks runs lm-evaluation-harness, which is not installed: pip install lm-eval") from None
    return lm_eval


def task_manager(tasks, include_path=""):
    """lm-eval's TaskManager (its own tasks plus the YAMLs under include_path), after checking that it
    knows every name in `tasks`: a typo stops here, before any model is loaded."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path={include_path} is not a folder; give the folder holding your task YAMLs")
    tm = TaskManager(include_path=include_path or None)
    known = set(tm.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"lm-eval does not know the task '{name}': {hint}`lm-eval ls tasks` lists them all, "
                            f"and --include_path=DIR adds your own task YAMLs")
    return tm


def run_harness(lm, tasks, tm, num_fewshot=-1, limit=0, bootstrap_iters=100000):
    """lm_eval.simple_evaluate on our model; returns the JSON-able part of its results."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, log_samples=False,
                                  num_fewshot=None if num_fewshot < 0 else num_fewshot,
                                  limit=limit or None, bootstrap_iters=bootstrap_iters)
    print(make_table(res))
    if res.get("groups"):
        print(make_table(res, "groups"))
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=handle_non_serializable))


def harness_columns(harness, tasks):
    """{column: value} for the summary table: each metric of each requested task, without its stderr.
    lm-eval keys a metric as "metric,filter" (e.g. "acc,none", "exact_match,strict-match")."""
    cols = {}
    for name in tasks:
        metrics = harness.get("groups", {}).get(name) or harness.get("results", {}).get(name) or {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, stderr
            cols[f"{name} {metric}" + (f" ({filt})" if filt and filt != "none" else "")] = value
    return cols


# -----------------------------------------------------------------------------
# output

def table(rows):
    """Markdown: one row per model, one column per dataset metric (blank where a model has none)."""
    columns = []
    for row in rows:
        columns += [c for c in row["columns"] if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [fmt(c, row["columns"].get(c)) for c in columns]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(column, value):
    if value is None:
        return ""
    return f"{value:.2f}" if column.endswith("ppl") or "perplexity" in column else f"{value:.4f}"


# -----------------------------------------------------------------------------

def main(argv):
    c = SimpleNamespace(**configurator.configure(DEFAULTS, argv, DOMAINS))
    ctx = devices.autocast(c.device, c.dtype)  # float32: nothing; else torch.autocast to dtype

    # check and load everything that does not depend on the model first: a typo fails in seconds
    tm = task_manager(c.tasks, c.include_path) if c.tasks else None
    outputs.check_output(c.out, c.overwrite, what="JSON results",
                         ours=lambda p: outputs.is_json_with(p, {"config", "datasets", "models"}))
    specs = c.datasets or (() if c.tasks else DEFAULT_DATASETS)
    data = {}
    for spec in specs:
        ds = load_dataset(spec, c.max_docs)
        if ds["name"] in data:
            raise UserError(f"--datasets names '{ds['name']}' twice; give each dataset once")
        data[ds["name"]] = ds

    rows, contexts = [], {}
    for source in c.models:
        t0 = time.time()
        model, meta = load_for_eval(source, c.device, c.base or None)
        context = model.config.block_size
        W = c.block_size or context
        if not 2 <= W <= context:
            raise UserError(f"--block_size={c.block_size}: {source} has a context of {context} tokens; "
                            f"use 2..{context} (0 = the model's context)")
        S = c.stride or max(1, W // 2)
        if not 1 <= S <= W:
            raise UserError(f"--stride={c.stride}: must be between 1 and the window ({W}); 0 = half the window")
        contexts[source] = W
        row = dict(model=source, method=meta["peft"]["method"] if meta else None,
                   parameters=sum(p.numel() for p in model.parameters()), block_size=W, stride=S,
                   datasets={}, columns={})
        for name, ds in data.items():
            top = max_token(ds)
            if top >= model.config.vocab_size:
                raise UserError(f"dataset '{name}' has token id {top} but {source} has a vocabulary of "
                                f"{model.config.vocab_size} tokens; evaluate it on data prepared for this model")
            desc = f"{source} {name}"
            if ds["kind"] == "lambada":
                r = lambada(model, ds["examples"], W, c.batch_size, c.device, ctx, desc)
                row["columns"][f"{name} acc"], row["columns"][f"{name} ppl"] = r["acc"], r["ppl"]
            else:
                r = perplexity(model, ds["docs"], W, S, c.batch_size, c.device, ctx, desc)
                row["columns"][f"{name} ppl"] = r["ppl"]
            row["datasets"][name] = r
        if c.tasks:
            lm = harness_lm(model, batch_size=c.batch_size, max_gen_toks=c.max_gen_toks, device=c.device, ctx=ctx)
            print(f"lm-evaluation-harness on {source}:")
            row["tasks"] = run_harness(lm, c.tasks, tm, c.num_fewshot, c.limit, c.bootstrap_iters)
            row["columns"].update(harness_columns(row["tasks"], c.tasks))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        del model
        outputs.write_json(c.out, dict(
            config={k: list(v) if isinstance(v, tuple) else v for k, v in vars(c).items()},
            datasets={n: dict(source=d["source"], kind=d["kind"], records=d["records"]) for n, d in data.items()},
            models=rows))

    print(table(rows))
    if len(set(contexts.values())) > 1:
        print(f"note: the models have different contexts ({', '.join(f'{m}: {w}' for m, w in contexts.items())}); "
              f"--block_size={min(contexts.values())} compares them on the same windows")
    print(f"wrote {c.out}")


if __name__ == "__main__":
    errors.install()
    main(sys.argv[1:])
