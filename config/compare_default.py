# The offline default comparison: 14 fine-tuning methods on the bundled Milton base and Shakespeare,
# the same data, seed, token budget and schedule for all. 14 minutes on 2 quiet CPU cores of an
# AMD EPYC Zen 4 (measured 2026-11-27: about a minute per run, evals and start-up included).
#   python data/shakespeare/prepare.py
#   python compare.py config/compare_default.py --assets_dir=assets
# Every run: 100 iters x 8 x 128 = 102,400 tokens (about a third of Shakespeare's ~290k training
# tokens); evals at iters 0, 25, 50, 75, 100, each on the same 8 batches of each split.
base_config = "config/quickstart.py"  # base model, data, device; its LoRA settings do not carry over
out_dir = "out-compare"
common = dict(
    max_iters=100,
    batch_size=8,
    block_size=128,
    gradient_accumulation_steps=1,
    eval_interval=25,
    eval_iters=8,
    log_interval=5,
    learning_rate=3e-3,  # a run that sets its own learning_rate gets min_lr scaled alike (lr / 10 here)
    min_lr=3e-4,
    warmup_iters=10,
    lr_decay_iters=100,
    weight_decay=0.0,
    dropout=0.0,
    seed=1337,
)
# One learning rate for every adapter (the quickstart's 3e-3, tuned on this base, in the range
# the IA3 and ETHER papers use), so the comparison is about the methods; full fine-tuning at the
# usual 10x lower rate. Ranks and targets: the LoRA family at r=8, alpha=16 (train.py's defaults);
# LoRA-1..4 grow the targets (lora1 = c_attn ... lora4 = + lm_head); DoRA, OLoRA, PiSSA and QLoRA
# adapt every block Linear as their papers do (= lora3, so they compare directly with LoRA-3);
# OFT, ETHER* and IA3 keep their papers' targets and block settings (peft/config.py).
_adapter_lr = 3e-3
runs = [
    ("full", dict(method="full", learning_rate=3e-4)),
    ("lora1", dict(method="lora", targets=("lora1",), learning_rate=_adapter_lr)),
    ("lora2", dict(method="lora", targets=("lora2",), learning_rate=_adapter_lr)),
    ("lora3", dict(method="lora", targets=("lora3",), learning_rate=_adapter_lr)),
    ("lora4", dict(method="lora", targets=("lora4",), learning_rate=_adapter_lr)),
    ("dora", dict(method="dora", targets=("lora3",), learning_rate=_adapter_lr)),
    ("olora", dict(method="olora", targets=("lora3",), learning_rate=_adapter_lr)),
    ("pissa", dict(method="pissa", targets=("lora3",), learning_rate=_adapter_lr)),
    ("oft", dict(method="oft", learning_rate=_adapter_lr)),  # c_attn + attn.c_proj, blocks of 32
    ("ether", dict(method="ether", learning_rate=_adapter_lr)),  # q, v; 32 blocks
    ("ether+", dict(method="etherplus", learning_rate=_adapter_lr)),
    ("ether+HH", dict(method="etherplusHH", learning_rate=_adapter_lr)),
    ("ia3", dict(method="ia3", learning_rate=_adapter_lr)),  # k, v, mlp.c_proj
    ("qlora", dict(method="lora", targets=("lora3",), quantize="nf4", learning_rate=_adapter_lr)),
]
