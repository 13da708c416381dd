# The offline learning-rate sweep: 6 methods x 4 learning rates on the bundled Milton base and
# Shakespeare, the same data, seed, token budget and schedule for all 23 runs, then each run (and
# the base) scored on Shakespeare (learned) and on Milton, the base's own domain (forgot).
# About 25 minutes on 2 quiet cores of an AMD EPYC (README).
#   python data/shakespeare/prepare.py --offline
#   python data/milton/prepare.py --offline
#   python compare.py config/compare_sweep.py --assets_dir=assets --assets_name=sweep
# Every run: 50 iters x 8 x 128 = 51,200 tokens; evals at iters 0, 25, 50, each on the same 8
# batches of each split. The best rate of each method is the one with the lowest final val loss.
base_config = "config/quickstart.py"  # base model, data, device; its LoRA settings do not carry over
out_dir = "out-sweep"
forget_data = "milton"  # the base's pretraining domain: what fine-tuning on Shakespeare costs it
eval_tokens = 8192  # the first 8,192 tokens of each val.bin, disjoint windows of 128
common = dict(
    max_iters=50,
    batch_size=8,
    block_size=128,
    gradient_accumulation_steps=1,
    eval_interval=25,
    eval_iters=8,
    log_interval=5,
    learning_rate=3e-3,  # each run's min_lr is its learning_rate / 10 (this ratio), so every schedule has one shape
    min_lr=3e-4,
    warmup_iters=5,
    lr_decay_iters=50,
    weight_decay=0.0,
    dropout=0.0,
    seed=1337,
)
# Rates a factor ~3 apart (half a decade), centred where each method's papers and the 100-iter
# default grid put it: full fine-tuning about 10x below the adapters, the orthogonal methods and IA3
# (a handful of scales) above LoRA. A best rate at an end of its range says: widen it (adding a rate
# to a list trains only that run; LoRA-3, ETHER, ETHER+ and IA3 got their fourth rate that way).
runs = [
    ("full", dict(method="full", learning_rate=(3e-4, 1e-3, 3e-3, 1e-2))),
    ("lora3", dict(method="lora", targets=("lora3",), learning_rate=(1e-3, 3e-3, 1e-2, 3e-2))),
    ("oft", dict(method="oft", learning_rate=(3e-3, 1e-2, 3e-2))),  # c_attn + attn.c_proj, blocks of 32
    ("ether", dict(method="ether", learning_rate=(3e-3, 1e-2, 3e-2, 1e-1))),  # q, v
    ("ether+", dict(method="etherplus", learning_rate=(3e-3, 1e-2, 3e-2, 1e-1))),  # q, v
    ("ia3", dict(method="ia3", learning_rate=(3e-2, 1e-1, 3e-1, 1.0))),  # k, v, mlp.c_proj
]
