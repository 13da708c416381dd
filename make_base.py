"""
Rebuild the small base model bundled in models/gpt2-milton/ (the offline quickstart's starting point):
GPT-2 architecture and the real GPT-2 tokenizer, pretrained from scratch by this repo on the bundled
Milton corpus. One command, about 10 minutes on 2 CPU cores:

    python make_base.py --overwrite=true     # replaces models/gpt2-milton (or --save_dir=models/new)

It runs data/milton/prepare.py, then `train.py config/pretrain_base_milton.py`, then writes the
trained model as a transformers GPT-2 folder in float16 (to stay under 10 MB in git).
"""

import os
import subprocess
import sys

import torch

import checkpoint
import configurator
import errors
import hf_gpt2
import outputs
import peft

errors.install()

# -----------------------------------------------------------------------------
train_config = "config/pretrain_base_milton.py"
out_dir = "out-base-milton"
save_dir = "models/gpt2-milton"
overwrite = False  # replace an existing save_dir (the bundled base every adapter is fingerprinted against!) and retrain out_dir
domains = {"train_config": configurator.PATH, "out_dir": configurator.PATH, "save_dir": configurator.PATH,
           "overwrite": configurator.ANY}  # the valid values of every key (configurator's rules)
config = configurator.configure(configurator.defaults_from(globals()), sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

# before ten minutes of training: save_dir must be writable, and an existing model there is replaced only
# with --overwrite=true (adapters trained on it would no longer match its fingerprint)
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}  # what hf_gpt2.save writes
outputs.check_output(save_dir, overwrite, folder=True, key="--save_dir", what="base model",
                     ours=lambda path: set(os.listdir(path)) <= MODEL_FILES)
root = os.path.dirname(os.path.abspath(__file__))
subprocess.run([sys.executable, os.path.join(root, "data", "milton", "prepare.py")], check=True)
cmd = [sys.executable, os.path.join(root, "train.py"), train_config, f"--out_dir={out_dir}"]
ckpt = os.path.join(out_dir, checkpoint.CKPT_NAME)
if overwrite or not os.path.exists(ckpt):
    subprocess.run(cmd + (["--overwrite=true"] if overwrite else []), check=True)
else:  # an earlier run: continue it if it stopped early (train.py says so and exits if it is finished)
    subprocess.run(cmd + ["--init_from=resume"], check=True)

model, meta = checkpoint.load_model(out_dir)
peft.merge(model)  # method='full': nothing to merge, but it keeps this script right for any method
hf_gpt2.save(model, save_dir, dtype=torch.float16)
print(f"wrote {save_dir} (iter {meta['iter_num']}, val loss {meta['best_val_loss']:.4f}):")
for name in sorted(os.listdir(save_dir)):
    print(f"  {name}: {os.path.getsize(os.path.join(save_dir, name)) / 1e6:.2f} MB")
