"""
Publish a training run on the Hugging Face Hub: the merged model in transformers GPT-2 format (with
the GPT-2 tokenizer), the adapter alone in Hugging Face PEFT format where the method has one, and a
model card.

    python push_to_hub.py config/finetune_shakespeare.py --repo_id=you/gpt2-shakespeare-lora
    python push_to_hub.py --out_dir=out-quickstart --repo_id=you/quickstart --dry_run=true --save_dir=export

The run is found the way training found it: out_dir from the same config file(s) (their other keys
are ignored here) or --out_dir. The repository, and in a dry run the folder --save_dir, holds:

    README.md                                  model card (Hub YAML metadata + description)
    config.json, model.safetensors,            the merged model (what=merged or both): loads with
    generation_config.json                     AutoModelForCausalLM.from_pretrained(repo_id)
    vocab.json, merges.txt,                    GPT-2's tokenizer: AutoTokenizer.from_pretrained(repo_id)
    tokenizer_config.json, special_tokens_map.json
    adapter/adapter_config.json,               the adapter (what=both): loads with
    adapter/adapter_model.safetensors          PeftModel.from_pretrained(base, repo_id, subfolder="adapter")

With what=adapter the adapter files sit at the top instead (PeftModel.from_pretrained(base, repo_id)).
--what defaults to both where the method has a Hugging Face PEFT form (its layer class's hf_peft_type,
peft/hf.py), and to merged where HF PEFT cannot load it (full fine-tuning, and methods whose class gives
a no_hf_reason, which the card states). With a 4-bit base (QLoRA/QDoRA) the adapter is for the base
quantized to 4-bit NF4 and the merged model is dequantized. The card is model_card.py's.
HF PEFT's merge_and_unload() of the adapter gives the merged model (model_card.merge_note, printed and in
the card): an adapter on GPT-2's tied lm_head holds the adapted head whole (modules_to_save), so merging
never moves the token embedding; QLoRA/QDoRA merge on the dequantized base (base.dequantize()).

The upload is huggingface_hub's create_repo + upload_folder: one commit, so a failed upload never
leaves part of a model in the repo (a repo created just before it stays empty). The token comes from HF_TOKEN or the saved login (`hf auth login`); it is never
printed nor written to a file. --private applies when the repo is created.
"""

import os
import sys
import tempfile

import torch

import checkpoint
import configurator
import errors
import hf_gpt2
import model_card
import outputs
import peft
from errors import UserError
from peft.hf import no_hf_reason, write_hf_peft

errors.install()

# -----------------------------------------------------------------------------
out_dir = "out"  # the training run to publish (or give the training config file)
repo_id = ""  # user/name (or org/name) on the Hub
what = ""  # 'merged', 'adapter' or 'both'; '' = both when the method has an HF PEFT form, else merged
private = False  # create the repo private
revision = ""  # branch to push to ('' = main); created if missing
commit_message = ""  # '' = "Upload <method> fine-tune of <base>"
dry_run = False  # write the folder that would be uploaded to save_dir, upload nothing
save_dir = ""  # where to write that folder (a new or empty folder); kept after a real upload too
base_model = ""  # Hub id of the base, when training used a local copy of it (for the adapter and card)
base = ""  # where the run's local base model folder is now, if it moved ('' = where training found it)
license = "mit"  # the card's licence (GPT-2 is MIT)
datasets = ()  # Hub dataset ids for the card's metadata, e.g. --datasets=karpathy/tiny_shakespeare
save_dtype = ""  # dtype of the merged weights: '' = the training dtype, or float32 / bfloat16 / float16
_ = configurator.ANY
domains = {  # the valid values of every key (configurator's rules), checked before anything runs
    "out_dir": configurator.PATH, "repo_id": _, "what": ("", "merged", "adapter", "both"), "private": _,
    "revision": _, "commit_message": _, "dry_run": _, "save_dir": _, "base_model": _, "base": _, "license": _,
    "datasets": _, "save_dtype": ("",) + configurator.DTYPES,
}
config = configurator.configure(configurator.defaults_from(globals()), sys.argv[1:], domains,
                                ignore_unknown_from_files=True)
globals().update(config)
# -----------------------------------------------------------------------------

# checks that need neither the model nor the network
if not repo_id:
    raise UserError("--repo_id is required: the Hub repository to create or update, as user/name")
if not hf_gpt2.REPO_ID.match(repo_id):
    raise UserError(f"--repo_id={repo_id}: expected user/name (your Hub user or organisation, '/', the model's "
                    f"name; letters, digits, '-', '_', '.')")
if base_model and not (hf_gpt2.REPO_ID.match(base_model) or base_model in hf_gpt2.HUB_MODELS):
    raise UserError(f"--base_model={base_model}: expected the base's Hub id, e.g. openai-community/gpt2")
for d in datasets:
    if not (hf_gpt2.REPO_ID.match(d) or hf_gpt2.REPO_ID.match(f"x/{d}")):
        raise UserError(f"--datasets: '{d}' is not a Hub dataset id (e.g. karpathy/tiny_shakespeare)")
if dry_run and not save_dir:
    raise UserError("--dry_run writes the folder that would be uploaded: pass --save_dir=DIR too")
if save_dir and os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
    raise UserError(f"--save_dir={save_dir} already exists and is not an empty folder; choose a new folder")
if save_dir:
    outputs.check_output(save_dir, folder=True, key="--save_dir", what="exported model")  # a file in the way, read-only
if not os.path.isdir(out_dir):
    raise UserError(f"out_dir '{out_dir}' does not exist: pass --out_dir=<a training run's out_dir> "
                    f"or the config file it was trained with")
tensors, meta = checkpoint.load(out_dir)
cfg = peft.PeftConfig.from_dict(meta["peft"])
reason = no_hf_reason(cfg)
if reason and what in ("adapter", "both"):
    raise UserError(f"--what={what}: method '{cfg.method}' has no Hugging Face PEFT adapter form ({reason}); "
                    f"use --what=merged")
what = what or ("merged" if reason else "both")
init_from = meta["base"]["init_from"]
base_id = base_model or hf_gpt2.hub_id(init_from)
dtype = save_dtype or meta["config"].get("dtype", "float32")
if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"{os.path.join(out_dir, checkpoint.CKPT_NAME)} has damaged metadata: config['dtype'] is {dtype!r}; "
                    f"pass --save_dtype=float32 (or bfloat16, float16)")

# the token, checked against the Hub before any work (never printed)
if not dry_run:
    import httpx2  # huggingface_hub's HTTP client: its errors are what a failed connection raises
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
                        "(or check the export with --dry_run=true --save_dir=DIR)")
    api = HfApi(token=token)

    def hub_call(doing, fn, *args, **kwargs):
        """fn(*args, **kwargs), a Hub request; a failure is one line, with the token scrubbed from
        anything the server echoes."""
        try:
            return fn(*args, **kwargs)
        except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                msg = (f"the Hugging Face Hub rejected the token (HTTP {status}) while {doing}: log in again with "
                       f"`hf auth login` or set HF_TOKEN to a token with write access to {repo_id.split('/')[0]}")
            elif status is not None:
                server = (getattr(e, "server_message", None) or str(e) or "no message").splitlines()[0]
                msg = f"the Hugging Face Hub answered HTTP {status} while {doing}: {server}"
            else:
                detail = (str(e) or "no message").splitlines()[0]
                msg = f"cannot reach the Hugging Face Hub while {doing} ({type(e).__name__}: {detail})"
            raise UserError(msg.replace(token, "<token>")) from None

    user = hub_call("checking the token", api.whoami)["name"]

# the folder to upload: built in a temporary folder, moved to save_dir only when complete
model = checkpoint.restore_model(tensors, meta, out_dir=out_dir, base=base or None)
model.eval()
del tensors
trainable, total = peft.count_parameters(model)
parent = os.path.dirname(os.path.abspath(save_dir)) if save_dir else None
if parent:
    os.makedirs(parent, exist_ok=True)
staging = tempfile.mkdtemp(prefix=".push_to_hub-", dir=parent)
umask = os.umask(0o022)
os.umask(umask)
os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private (0700); save_dir gets the usual mode
try:
    adapter_at = model_card.adapter_path(what)
    if adapter_at is not None:
        if base_id is None and init_from != "scratch":
            print(f"note: the base '{init_from}' is a local folder; pass --base_model=<its Hub id> so others can "
                  f"load the adapter")
        write_hf_peft(model, cfg, os.path.join(staging, adapter_at), base_id or init_from)
        print(f"adapter: {model_card.merge_note(cfg)}")
    elif reason:
        print(f"note: no Hugging Face PEFT adapter: {reason}")
    peft.merge(model)
    if what != "adapter":
        hf_gpt2.save(model, staging, dtype=getattr(torch, dtype))
    hf_gpt2.write_tokenizer(staging, model.config.block_size)
    val_loss, best_val_loss = model_card.final_val_loss(out_dir, meta)
    card = model_card.model_card(repo_id, meta, cfg, what, trainable, total, val_loss, best_val_loss, base_id,
                                 license=license, datasets=datasets, save_dtype=dtype)
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    files = sorted(os.path.relpath(os.path.join(d, n), staging) for d, _, ns in os.walk(staging) for n in ns)
    if save_dir:
        os.replace(staging, save_dir)  # the complete folder appears at once (an empty save_dir is replaced)
        staging = None
    folder = save_dir or staging
    print(f"{peft.title(cfg)} run {out_dir} (iter {meta['iter_num']}) -> {what}: {len(files)} files in {folder}")
    for name in files:
        print(f"  {name}  ({os.path.getsize(os.path.join(folder, name)) / 1e6:.2f} MB)")
    if dry_run:
        print(f"dry run: nothing uploaded; `python push_to_hub.py --out_dir={out_dir} --repo_id={repo_id}` uploads it")
    else:
        hub_call("creating the repo", api.create_repo, repo_id, private=private, exist_ok=True)
        if revision:
            hub_call(f"creating the branch {revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload {peft.title(cfg)} fine-tune of {base_id or init_from}"
        hub_call("uploading", api.upload_folder, repo_id=repo_id, folder_path=folder, revision=revision or None,
                 commit_message=message)
        print(f"uploaded as {user}: https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else ""))
finally:
    if staging is not None:  # remove what this script wrote, file by file; never a recursive delete
        for d, _, names in os.walk(staging, topdown=False):
            for name in names:
                os.remove(os.path.join(d, name))
            os.rmdir(d)
