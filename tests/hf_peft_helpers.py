"""Helpers to compare our adapters with Hugging Face PEFT on tiny random GPT-2s.

HF PEFT must run in a separate Python process: importing `peft` from the repo root (which pytest
puts on sys.path) gives our peft/ package instead. run_hf_peft starts `python -I` (no cwd, no
PYTHONPATH on sys.path) in a scratch folder, loads transformers' GPT2LMHeadModel plus each
adapter folder with peft.PeftModel.from_pretrained, and returns the logits, unmerged and after
merge_and_unload() (which must be the same model: GPT-2's tied lm_head makes that non-trivial).
"""

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Start of every script that runs HF peft in a subprocess: this repo off sys.path (its peft/ would
# shadow HF's), then the job file (argv[2]) and the input ids it names.
HF_PREAMBLE = r"""
import json, os, sys
repo = sys.argv[1]
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != repo]
import torch, transformers, peft
assert os.path.dirname(os.path.abspath(peft.__file__)) != os.path.join(repo, "peft"), "got the repo's peft/"
job = json.load(open(sys.argv[2]))
idx = torch.load(job["idx"])
"""

HF_SCRIPT = HF_PREAMBLE + r"""
for adapter, out in job["runs"]:
    base = transformers.GPT2LMHeadModel.from_pretrained(job["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        unmerged = model(idx).logits
        torch.save((unmerged, model.merge_and_unload()(idx).logits), out)
"""


def write_tiny_gpt2(folder, seed=0, n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32):
    """A random transformers GPT-2 saved to folder (config.json + model.safetensors), with
    non-zero biases and non-trivial LayerNorms so that layout mistakes show."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                  vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def save_adapter(folder, config, tensors):
    """Write an HF PEFT adapter folder from (adapter_config dict, {key: tensor})."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(folder, "adapter_model.safetensors"))


def run_hf_peft(base_dir, adapter_dirs, idx, workdir, timeout=300):
    """Logits (B, T, V) of transformers GPT-2 at base_dir with each HF PEFT adapter folder in
    adapter_dirs, one subprocess for all of them. Returns a list of (unmerged, merged) pairs, one per
    adapter: the PeftModel's logits and those of its merge_and_unload()."""
    os.makedirs(workdir, exist_ok=True)
    idx_path = os.path.join(workdir, "idx.pt")
    torch.save(idx, idx_path)
    runs = [[os.path.abspath(a), os.path.join(workdir, f"logits_{i}.pt")] for i, a in enumerate(adapter_dirs)]
    job_path = os.path.join(workdir, "job.json")
    with open(job_path, "w") as f:
        json.dump({"base": os.path.abspath(base_dir), "idx": idx_path, "runs": runs}, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-I", "-c", HF_SCRIPT, REPO, job_path], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"HF peft subprocess failed:\n{proc.stderr[-4000:]}")
    return [torch.load(out) for _, out in runs]
