"""
Sample from a trained run (full or adapter checkpoint) or from a base model, with the KV cache.

    python sample.py --out_dir=out-quickstart --start="ROMEO:"
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --num_samples=2
    python sample.py --out_dir=out-guanaco --template=guanaco --start="How do I boil an egg?"

With --template (guanaco or alpaca, see instruct.py), --start is the instruction: it is wrapped in the
prompt format the model was fine-tuned on, and the answer ends at <|endoftext|> or where the template's
next turn would begin ("### Human:", "### Instruction:"). Running the same command on the base model
(--init_from=gpt2) and on the fine-tuned out_dir gives the before/after comparison.
"""

import sys
import time

import torch

import checkpoint
import configurator
import devices
import errors
import instruct
import peft
import tokenizer
from errors import UserError

errors.install()

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a gpt2* name, or a local HF folder
out_dir = "out"
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 0 = greedy
top_k = 200  # 0 = off
top_p = 1.0  # nucleus sampling; 1.0 = off
seed = 1337
device = devices.default_device()  # cuda when a GPU is present, else cpu
dtype = "float32"  # 'float32', 'bfloat16' or 'float16'
compile = False
use_cache = True
template = ""  # '' = plain continuation; 'guanaco' or 'alpaca' = answer --start as an instruction
template_input = ""  # alpaca only: the optional input that goes with the instruction
merge_adapters = True  # fold adapters into the weights first: sampling then runs at the base model's speed
base = ""  # where the run's base model folder is now, if it moved ('' = where training found it)
_ = configurator.ANY
domains = {  # the valid values of every key (configurator's rules), checked before anything runs
    "init_from": configurator.PATH, "out_dir": configurator.PATH, "start": _, "num_samples": ">= 1",
    "max_new_tokens": ">= 1", "temperature": ">= 0", "top_k": ">= 0", "top_p": "(0, 1]",
    "seed": "[0, 18446744073709551615]", "device": configurator.DEVICE, "dtype": configurator.DTYPES, "compile": _,
    "use_cache": _, "template": ("",) + tuple(instruct.TEMPLATES), "template_input": _, "merge_adapters": _,
    "base": _,
}
config = configurator.configure(configurator.defaults_from(globals()), sys.argv[1:], domains)
globals().update(config)
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
ctx = devices.autocast(device, dtype)  # float32: nothing; else torch.autocast to dtype

if init_from == "resume":
    tensors, meta = checkpoint.load(out_dir)  # one clear line if out_dir holds no checkpoint
    model = checkpoint.restore_model(tensors, meta, out_dir=out_dir, base=base or None).to(device).eval()
else:
    model, meta = checkpoint.load_model(init_from, device=device, base=base or None)
if meta is not None and merge_adapters:
    peft.merge(model)
if compile:
    model = torch.compile(model)

if start.startswith("FILE:"):
    path = start[5:]
    try:
        with open(path, encoding="utf-8") as f:
            start = f.read()
    except FileNotFoundError:
        raise UserError(f"--start=FILE:{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--start=FILE:{path}: not UTF-8 text (byte {e.start})") from None
tuned_on = (meta or {}).get("template")  # the prompt template of the data an instruction-tuned run saw
if template and tuned_on and template != tuned_on:
    raise UserError(f"this model was instruction-tuned on {tuned_on}-format data; use --template={tuned_on}")
if tuned_on and not template:
    print(f"(this model was instruction-tuned with the {tuned_on} template: add --template={tuned_on} "
          f"to ask it a question)", file=sys.stderr)
stop_strings = []
if template:  # wrap the instruction in the fine-tuning prompt format; answers end at EOT or the next turn
    start = instruct.format_prompt(template, start, template_input)
    stop_strings = instruct.stop_strings(template)
elif template_input:
    raise UserError("--template_input needs --template=alpaca")
start_ids = tokenizer.encode(start)
if not start_ids:
    raise UserError("--start is empty; give at least one character of prompt")
if max(start_ids) >= model.config.vocab_size:
    raise UserError(f"the prompt has token ids up to {max(start_ids)} but the model's vocabulary has {model.config.vocab_size}")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)

with torch.no_grad(), ctx:
    for k in range(num_samples):
        t0 = time.time()
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           use_cache=use_cache, stop_token=tokenizer.EOT if template else None,
                           stop_sequences=[tokenizer.encode(s) for s in stop_strings])
        dt = time.time() - t0
        text = tokenizer.decode(y[0].tolist())
        if template:  # the answer ends at the first EOT or stop string
            answer = instruct.cut_at_stop(template, text[len(start):].split("<|endoftext|>")[0])
            text = start + answer.rstrip()
        print(text)
        print(f"---------------  ({y.size(1) - x.size(1)} tokens in {dt:.2f}s)", file=sys.stderr)
