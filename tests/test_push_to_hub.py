"""push_to_hub.py and loading its exports back, offline, on a tiny random GPT-2.

For every export rule: train.py runs a few steps (a large constant learning rate moves every
trainable tensor well away from its init), push_to_hub.py --dry_run writes the repo folder, and
    - the merged folder in transformers (AutoModelForCausalLM),
    - the adapter folder in HF PEFT (PeftModel on the base; QLoRA/QDoRA on the base quantized to NF4),
    - both folders loaded back with checkpoint.load_model
give the logits of the trained model as checkpoint.load_model(out_dir) rebuilds it, and so does
HF PEFT's merge_and_unload() of the adapter (on the dequantized base for QLoRA/QDoRA), also where
the adapter touches GPT-2's lm_head, which is tied to the token embedding.
transformers / HF peft run in subprocesses without the repo on sys.path (our peft/ shadows HF's).
"""
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checkpoint  # noqa: E402
import configurator  # noqa: E402
import tokenizer  # noqa: E402
from errors import UserError  # noqa: E402
from hf_peft_helpers import HF_PREAMBLE, run_hf_peft, write_tiny_gpt2  # noqa: E402
from shards import write_shard  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 256
FAKE_TOKEN = "hf_FAKEpushTOtestTOKEN0123456789abcdef"
TEXT = "ROMEO: What's in a name?  That which we call a rose\n\tby any other word 1234 would smell as sweet ü."
# name -> train.py arguments; every export rule of the issue
RUNS = {
    "lora_qv": ("--method=lora", "--r=4", "--alpha=8"),  # default q, v slices -> one rank-8 LoRA on c_attn
    "lora4": ("--method=lora", "--r=4", "--alpha=8", "--targets=lora4"),  # whole layers, lm_head included
    "rslora": ("--method=lora", "--r=4", "--alpha=8", "--use_rslora=true", "--targets=q,v,mlp.c_fc"),
    "dora": ("--method=dora", "--r=4", "--alpha=8", "--targets=c_attn,mlp.c_proj,lm_head"),
    "ia3": ("--method=ia3", "--targets=k,v,mlp.c_proj,lm_head"),
    "olora": ("--method=olora", "--r=4", "--alpha=8", "--targets=q,v,attn.c_proj,lm_head"),
    "pissa": ("--method=pissa", "--r=4", "--alpha=8", "--targets=c_attn,mlp.c_fc"),
    "qlora": ("--method=lora", "--r=4", "--alpha=8", "--quantize=nf4", "--targets=q,v,lm_head"),
    "qdora": ("--method=dora", "--r=4", "--alpha=8", "--quantize=nf4", "--targets=c_attn,mlp.c_proj"),
    "oft": ("--method=oft", "--oft_block_size=8"),
    "ether": ("--method=etherplusHH", "--ether_nb=4"),
    "full": ("--method=full",),
}
MERGED_ONLY = {"oft", "ether", "full"}
QUANTIZED = {"qlora", "qdora"}
HEAD = {"lora4", "dora", "ia3", "olora", "qlora"}  # runs whose adapter touches the tied lm_head
MERGED_FILES = {"README.md", "config.json", "model.safetensors", "generation_config.json", "vocab.json",
                "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
ADAPTER_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}

HF_SCRIPT = HF_PREAMBLE + r"""
out = {}
with torch.no_grad():
    for name, folder in job["merged"].items():
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        out["merged/" + name] = model.eval()(idx).logits
        out["info/" + name] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    for name, adapter in job["quantized"].items():
        base = transformers.AutoModelForCausalLM.from_pretrained(job["base"], quantization_config=nf4, dtype=torch.float32)
        # bitsandbytes' CPU inference path depends on the CPU: with avx512_bf16 (AMD Zen 4, Intel AMX)
        # an eval-mode no-grad Linear4bit repacks its weight and computes in bf16 (and fails for
        # in_features < 64), elsewhere it dequantizes to fp32. peft/quant.py pins the fp32 path for
        # our layers; pin it here too, so the reference is the same fp32 computation on every CPU.
        for m in base.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        out["adapter/" + name] = peft.PeftModel.from_pretrained(base, adapter).eval()(idx).logits
        # merged as the card says: on the dequantized base (merging into 4-bit layers rounds to NF4)
        base = transformers.AutoModelForCausalLM.from_pretrained(job["base"], quantization_config=nf4, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(base.dequantize(), adapter).merge_and_unload()
        out["adapter_merged/" + name] = merged.eval()(idx).logits
tok = transformers.AutoTokenizer.from_pretrained(job["tokenizer"])
out["tokens"] = tok.encode(job["text"])
out["decoded"] = tok.decode(out["tokens"])
torch.save(out, job["out"])
"""


def env(**extra):
    """The subprocess environment: one thread, an empty HF home, a fake (recognizable) token, offline."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HOME")}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="1")
    e.update({k: v for k, v in extra.items() if v is not None})
    return e


def run(script, *args, **env_extra):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env(**env_extra))


def push(*args, hf_home, token=FAKE_TOKEN, **env_extra):
    return run("push_to_hub.py", *args, HF_TOKEN=token, HF_HOME=str(hf_home), **env_extra)


def one_error_line(p, message):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    return lines[0]


def logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx, targets=idx)[0]  # (B, T, V): every position


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny base folder and token shards every run trains on."""
    tmp = tmp_path_factory.mktemp("push")
    base = write_tiny_gpt2(str(tmp / "base"), vocab_size=VOCAB, n_positions=32)
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, VOCAB, size=61), 50).astype(np.uint16)
    (tmp / "data").mkdir()
    write_shard(tmp / "data" / "train.bin", tokens[:2500])
    write_shard(tmp / "data" / "val.bin", tokens[2500:])
    (tmp / "hf_home").mkdir()
    return tmp, base


def train_args(setup, out_dir, *extra):
    tmp, base = setup
    return (f"--init_from={base}", f"--dataset={tmp / 'data'}", f"--out_dir={out_dir}", "--device=cpu",
            "--batch_size=2", "--block_size=32", "--max_iters=3", "--eval_interval=3", "--eval_iters=2",
            "--log_interval=1", "--decay_lr=false", "--learning_rate=0.05", *extra)


@pytest.fixture(scope="module")
def exported(setup):
    """Train every run, export it with push_to_hub.py --dry_run, and compute all the logits:
    {name: {"ours", "merged_hf", "adapter_hf", "merged_back", "adapter_back"}} plus the pushes' output."""
    tmp, base = setup
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    results, outputs, adapters, merged, quantized = {}, {}, [], {}, {}
    for name, args in RUNS.items():
        out_dir = tmp / "runs" / name
        p = run("train.py", *train_args(setup, out_dir, *args))
        assert p.returncode == 0, p.stderr
        save_dir = tmp / "export" / name
        if name == "lora_qv":  # out_dir read from the training config file, its other keys ignored
            cfg_file = tmp / "train_config.py"
            cfg_file.write_text(f"out_dir = {str(out_dir)!r}\nlearning_rate = 0.05\nmethod = 'lora'\nmax_iters = 3\n")
            p = push(cfg_file, "--repo_id=someone/tiny-lora", "--dry_run=true", f"--save_dir={save_dir}",
                     hf_home=tmp / "hf_home")
        else:
            p = push(f"--out_dir={out_dir}", f"--repo_id=someone/tiny-{name}", "--dry_run=true",
                     f"--save_dir={save_dir}", hf_home=tmp / "hf_home")
        assert p.returncode == 0, p.stderr
        outputs[name] = p.stdout + p.stderr

        model, meta = checkpoint.load_model(str(out_dir))
        r = results[name] = {"ours": logits(model, idx), "meta": meta}
        r["merged_back"] = logits(checkpoint.load_model(str(save_dir))[0], idx)
        merged[name] = str(save_dir)
        if name not in MERGED_ONLY:
            r["adapter_back"] = logits(checkpoint.load_model(str(save_dir / "adapter"))[0], idx)
            if name in QUANTIZED:
                quantized[name] = str(save_dir / "adapter")
            else:
                adapters.append((name, str(save_dir / "adapter")))

    # transformers (merged folders, NF4 + HF PEFT for QLoRA/QDoRA, the tokenizer) in one subprocess
    work = tmp / "hf"
    work.mkdir()
    torch.save(idx, work / "idx.pt")
    job = {"idx": str(work / "idx.pt"), "merged": merged, "quantized": quantized, "base": base,
           "tokenizer": merged["lora_qv"], "text": TEXT, "out": str(work / "out.pt")}
    (work / "job.json").write_text(json.dumps(job))
    p = subprocess.run([sys.executable, "-I", "-c", HF_SCRIPT, ROOT, str(work / "job.json")], cwd=work,
                       capture_output=True, text=True, timeout=600, env=env())
    assert p.returncode == 0, p.stderr[-4000:]
    hf = torch.load(work / "out.pt")
    for name in RUNS:
        results[name]["merged_hf"] = hf[f"merged/{name}"]
        results[name]["loading_info"] = hf[f"info/{name}"]
    for name in quantized:
        results[name]["adapter_hf"] = hf[f"adapter/{name}"]
        results[name]["adapter_hf_merged"] = hf[f"adapter_merged/{name}"]
    # the plain adapters: HF PEFT on the fp32 base (tests/hf_peft_helpers.py), unmerged and merged
    theirs = run_hf_peft(base, [a for _, a in adapters], idx, str(tmp / "hf_peft"))
    for (name, _), (unmerged, merged_logits) in zip(adapters, theirs):
        results[name]["adapter_hf"], results[name]["adapter_hf_merged"] = unmerged, merged_logits
    return results, outputs, hf, tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_merged_folder_gives_our_logits(exported, name):
    results, _, _, _ = exported
    r = results[name]
    assert r["loading_info"] == []  # transformers found every tensor it needs and nothing else
    torch.testing.assert_close(r["merged_hf"], r["ours"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r["merged_back"], r["ours"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in RUNS if n not in MERGED_ONLY])
def test_adapter_folder_gives_our_logits(exported, name):
    """HF PEFT on the base (on the NF4-quantized base for QLoRA/QDoRA), and the adapter loaded back."""
    results, _, _, _ = exported
    r = results[name]
    torch.testing.assert_close(r["adapter_hf"], r["ours"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r["adapter_back"], r["ours"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in RUNS if n not in MERGED_ONLY])
def test_adapter_merge_and_unload_is_the_merged_export(exported, name):
    """HF PEFT's merge_and_unload() of the exported adapter is the exported merged model (in
    transformers), fp32: an adapter on the tied lm_head must not move the token embedding."""
    results, _, _, _ = exported
    r = results[name]
    torch.testing.assert_close(r["adapter_hf_merged"], r["merged_hf"], atol=1e-4, rtol=0)


def test_training_moved_the_model(exported, setup):
    """The comparisons above mean something: every run's logits differ from the base's."""
    results, _, _, _ = exported
    _, base = setup
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = logits(checkpoint.load_model(base)[0], idx)
    for name, r in results.items():
        assert (r["ours"] - plain).abs().max() > 1e-2, name


@pytest.mark.parametrize("name", list(RUNS))
def test_export_folder_is_complete_and_holds_no_token(exported, name):
    results, outputs, _, tmp = exported
    folder = tmp / "export" / name
    files = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
    assert files == MERGED_FILES | (set() if name in MERGED_ONLY else ADAPTER_FILES)
    umask = os.umask(0)
    os.umask(umask)
    for f in files:
        assert FAKE_TOKEN.encode() not in (folder / f).read_bytes(), f
        assert (folder / f).stat().st_mode & 0o777 == 0o666 & ~umask, f  # shared: 0644 with umask 022
    assert FAKE_TOKEN not in outputs[name]
    assert not [f for f in os.listdir(tmp / "export") if f.startswith(".")]  # no staging folder left

    from huggingface_hub import ModelCard
    card = ModelCard.load(folder / "README.md")  # valid YAML front matter, parsed as the Hub does
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and "gpt2" in data["tags"]
    assert "base_model" not in data  # the base is a local folder, not a Hub id
    meta = results[name]["meta"]
    cfg = meta["peft"]
    text = card.text
    assert f"`{cfg['method']}`" in text and "Trainable parameters" in text and "python train.py" in text
    assert f"--method={cfg['method']}" in text or cfg["method"] == "full"
    val = [json.loads(x) for x in open(tmp / "runs" / name / "metrics.jsonl") if "val/loss" in x][-1]["val/loss"]
    assert f"{val:.4f}" in text and "perplexity" in text
    for field in ("r", "alpha") if cfg["method"] in ("lora", "dora", "olora", "pissa") else ():
        assert f"| {field} | `{cfg[field]}` |" in text
    if name in MERGED_ONLY:
        assert "no PEFT adapter" in text and ("HF PEFT" in text or "full fine-tuning" in text)
        assert "no Hugging Face PEFT adapter" in outputs[name]  # push_to_hub.py says why, too
    else:
        assert "merge_and_unload()" in text and "merge_and_unload()" in outputs[name]
        assert "dtype=torch.float32)" in text  # the base in fp32 as trained (the bundled one is stored in fp16)
        assert ("modules_to_save" in text) == (name in HEAD)
        assert ("base.dequantize()" in text) == (name in QUANTIZED)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["vocab_size"] == VOCAB


def test_adapter_config_and_card_details(exported):
    _, _, _, tmp = exported
    qv = json.loads((tmp / "export" / "lora_qv" / "adapter" / "adapter_config.json").read_text())
    assert qv["peft_type"] == "LORA" and qv["r"] == 8 and qv["lora_alpha"] == 16.0  # rank 2r, same scale
    assert qv["target_modules"] == ["attn.c_attn"] and qv["task_type"] == "CAUSAL_LM"
    olora = json.loads((tmp / "export" / "olora" / "adapter" / "adapter_config.json").read_text())
    assert olora["r"] == 16 and olora["rank_pattern"] == {"c_proj": 8}  # [A; A0]: 2·2r on the q, v slices, 2r else
    ia3 = json.loads((tmp / "export" / "ia3" / "adapter" / "adapter_config.json").read_text())
    assert ia3["peft_type"] == "IA3" and ia3["feedforward_modules"] == ["mlp.c_proj"]
    card = (tmp / "export" / "qlora" / "README.md").read_text()
    assert "QLoRA" in card and "BitsAndBytesConfig" in card and "dequantized" in card
    assert "--quantize=nf4" in card
    card = (tmp / "export" / "oft" / "README.md").read_text()
    assert "Conv1D" in card and "adapter/" not in card
    card = (tmp / "export" / "ether" / "README.md").read_text()
    assert "not part of HF PEFT" in card


def test_tokenizer_files_load_in_transformers_like_tiktoken(exported):
    _, _, hf, _ = exported
    assert hf["tokens"] == tokenizer.encode(TEXT)
    assert hf["decoded"] == TEXT


def test_what_adapter_puts_the_adapter_at_the_top(exported):
    _, _, _, tmp = exported
    save_dir = tmp / "export-adapter-only"
    p = push(f"--out_dir={tmp / 'runs' / 'ia3'}", "--repo_id=someone/tiny-ia3", "--what=adapter",
             "--base_model=openai-community/gpt2", "--dry_run=true", f"--save_dir={save_dir}", hf_home=tmp / "hf_home")
    assert p.returncode == 0, p.stderr
    files = set(os.listdir(save_dir))
    assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors", "vocab.json", "merges.txt",
                     "tokenizer_config.json", "special_tokens_map.json"}
    from huggingface_hub import ModelCard
    data = ModelCard.load(save_dir / "README.md").data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == "openai-community/gpt2"
    assert data["base_model_relation"] == "adapter"
    config = json.loads((save_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "openai-community/gpt2"
    # the same adapter, loaded on an explicitly given base, is the trained model
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    ours = logits(checkpoint.load_model(str(tmp / "runs" / "ia3"))[0], idx)
    back = logits(checkpoint.load_model(str(save_dir), base=str(tmp / "base"))[0], idx)
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_train_and_sample_from_an_export(exported, setup, kind):
    """train.py --init_from=<export> starts from the trained model: its first eval (a fresh LoRA on
    top, B = 0) equals the original run's last eval on the same batches. sample.py samples from it."""
    _, _, _, tmp = exported
    source = tmp / "export" / "dora" / ("adapter" if kind == "adapter" else "")
    out_dir = tmp / f"further-{kind}"
    p = run("train.py", *train_args(setup, out_dir, "--method=lora", "--max_iters=1", "--eval_interval=1"),
            f"--init_from={source}")
    assert p.returncode == 0, p.stderr
    first = [json.loads(x) for x in open(out_dir / "metrics.jsonl") if "val/loss" in x][0]
    last = [json.loads(x) for x in open(tmp / "runs" / "dora" / "metrics.jsonl") if "val/loss" in x][-1]
    assert first["iter"] == 0 and abs(first["val/loss"] - last["val/loss"]) < 1e-5
    if kind == "adapter":
        p = run("sample.py", f"--init_from={source}", "--start=!", "--num_samples=1", "--max_new_tokens=4",
                "--device=cpu")
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("!")


def test_bad_input_stops_with_one_line(exported):
    _, _, _, tmp = exported
    home = tmp / "hf_home"
    lora, oft = tmp / "runs" / "lora_qv", tmp / "runs" / "oft"
    one_error_line(push(f"--out_dir={tmp / 'nowhere'}", "--repo_id=a/b", hf_home=home), "does not exist")
    (tmp / "empty_run").mkdir()
    one_error_line(push(f"--out_dir={tmp / 'empty_run'}", "--repo_id=a/b", hf_home=home), "no checkpoint")
    one_error_line(push(f"--out_dir={oft}", "--repo_id=a/b", "--what=adapter", hf_home=home),
                   "method 'oft' has no Hugging Face PEFT adapter form")
    one_error_line(push(f"--out_dir={tmp / 'runs' / 'full'}", "--repo_id=a/b", "--what=both", hf_home=home),
                   "method 'full' has no Hugging Face PEFT adapter form")
    for bad in ("justaname", "a/b/c", "user/na me", "-user/name", "user/name--x"):
        one_error_line(push(f"--out_dir={lora}", f"--repo_id={bad}", hf_home=home), "expected user/name")
    one_error_line(push(f"--out_dir={lora}", hf_home=home), "--repo_id is required")
    one_error_line(push(f"--out_dir={lora}", "--repo_id=a/b", "--dry_run=true", hf_home=home), "--save_dir")
    one_error_line(push(f"--out_dir={lora}", "--repo_id=a/b", "--wat=merged", hf_home=home), "did you mean 'what'")
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    one_error_line(push(f"--out_dir={lora}", "--repo_id=a/b", "--dry_run=true", f"--save_dir={taken}", hf_home=home),
                   "not an empty folder")
    assert os.listdir(taken) == ["notes.txt"]


def test_no_token_stops_before_any_request(exported, tmp_path):
    """A real upload without a token: no HF_TOKEN, an empty HF home. Any request would go to a closed
    local port and fail differently; the run stops at the token check, writes and uploads nothing."""
    _, _, _, tmp = exported
    save_dir = tmp_path / "would-upload"
    p = push(f"--out_dir={tmp / 'runs' / 'lora_qv'}", "--repo_id=someone/tiny", f"--save_dir={save_dir}",
             hf_home=tmp_path / "empty_home", token=None, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    one_error_line(p, "no Hugging Face token")
    assert not save_dir.exists()


class _Reject(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub that rejects every token (as the Hub does an expired one) and records requests."""
    seen = []

    def do_GET(self):
        type(self).seen.append((self.command, self.path, self.headers.get("authorization", "")))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


def test_rejected_token_is_one_line_and_never_shown(exported, tmp_path):
    _, _, _, tmp = exported
    server = http.server.HTTPServer(("127.0.0.1", 0), _Reject)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        save_dir = tmp_path / "would-upload"
        p = push(f"--out_dir={tmp / 'runs' / 'lora_qv'}", "--repo_id=someone/tiny", f"--save_dir={save_dir}",
                 hf_home=tmp_path / "home", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0")
    finally:
        server.shutdown()
        server.server_close()
    line = one_error_line(p, "rejected the token (HTTP 401)")
    assert FAKE_TOKEN not in p.stdout + p.stderr and "hf auth login" in line
    assert [(m, path) for m, path, _ in _Reject.seen] == [("GET", "/api/whoami-v2")]  # no repo created, no upload
    assert _Reject.seen[0][2] == f"Bearer {FAKE_TOKEN}"  # the token was sent, to the Hub only
    assert not save_dir.exists()


def test_configurator_ignores_unknown_keys_only_from_files(tmp_path):
    f = tmp_path / "train_config.py"
    f.write_text("out_dir = 'out-x'\nlearning_rate = 1e-3\nbatch_size = 2\n")
    defaults = {"out_dir": "out", "repo_id": ""}
    domains = {"out_dir": configurator.PATH, "repo_id": configurator.ANY}
    assert configurator.configure(defaults, [str(f)], domains, ignore_unknown_from_files=True)["out_dir"] == "out-x"
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        configurator.configure(defaults, [str(f)], domains)
    with pytest.raises(UserError, match="unknown config key 'repoid' on the command line"):
        configurator.configure(defaults, [str(f), "--repoid=a/b"], domains, ignore_unknown_from_files=True)
    f.write_text("out_dir = 3\n")
    with pytest.raises(UserError, match="must be of type str"):
        configurator.configure(defaults, [str(f)], domains, ignore_unknown_from_files=True)
