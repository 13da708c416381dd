# The offline learning-rate sweep: 4 methods x 3-4 learning rates on the bundled Milton base and
# Shakespeare, the same data, seed, token budget and schedule for all 14 runs, then each run (and
# the base) scored on Shakespeare (learned) and on Milton, the base's own domain (forgot).
# Short runs, sized for a CPU shared with other work: 22 minutes on 2 cores of an AMD EPYC shared
# with other engineers (load average 5-8; README), well under that on quiet cores.
#   python data/shakespeare/prepare.py --offline
#   python data/milton/prepare.py --offline
#   python compare.py config/compare_sweep.py --assets_dir=assets --assets_name=sweep
# Every run: 30 iters x 4 x 128 = 15,360 tokens; evals at iters 0, 15, 30, each on the same 6
# batches of each split. The best rate of each method is the one with the lowest final val loss.
base_config = "config/quickstart.py"  # base model, data, device; its LoRA settings do not carry over
out_dir = "out-sweep"
forget_data = "milton"  # the base's pretraining domain: what fine-tuning on Shakespeare costs it
eval_tokens = 4096  # the first 4,096 tokens of each val.bin, disjoint windows of 128
common = dict(
    max_iters=30,
    batch_size=4,
    block_size=128,
    gradient_accumulation_steps=1,
    eval_interval=15,
    eval_iters=6,
    log_interval=5,
    learning_rate=3e-3,  # each run's min_lr is its learning_rate / 10 (this ratio), so every schedule has one shape
    min_lr=3e-4,
    warmup_iters=3,
    lr_decay_iters=30,
    weight_decay=0.0,
    dropout=0.0,
    seed=1337,
)
# Rates a factor ~3 apart (half a decade). These runs are short (30 iters), so every range sits
# ~3x above the rate the 100-iter default grid uses: full fine-tuning about 10x below the adapters,
# IA3 (a handful of scales) above them. A best rate at an end of its range says: widen it (adding a
# rate to a list trains only that run); full and IA3 got a fourth rate that way.
runs = [
    ("full", dict(method="full", learning_rate=(3e-4, 1e-3, 3e-3, 1e-2))),
    ("lora3", dict(method="lora", targets=("lora3",), learning_rate=(3e-3, 1e-2, 3e-2))),
    ("oft", dict(method="oft", learning_rate=(3e-3, 1e-2, 3e-2))),  # c_attn + attn.c_proj, blocks of 32
    ("ia3", dict(method="ia3", learning_rate=(1e-2, 3e-2, 1e-1, 3e-1))),  # k, v, mlp.c_proj
]
