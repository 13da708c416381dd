# The offline quickstart: LoRA-fine-tune the bundled Milton base on Shakespeare, on a laptop CPU
# (120 iterations x 2,048 tokens, about 4 minutes on 2 cores).
#   python data/shakespeare/prepare.py
#   python train.py config/quickstart.py
#   python sample.py --out_dir=out-quickstart --start="ROMEO:"
# Any method runs from it: python train.py config/quickstart.py --method=dora (see the README's table).
out_dir = "out-quickstart"
init_from = "models/gpt2-milton"
dataset = "shakespeare"
method = "lora"
targets = ("all",)  # every Linear the method adapts well: for LoRA lora4 = attention, its projection,
#                    feed-forward and the output layer (see the README); less for olora, etherplusHH,
#                    ether (each layer class's all_targets)
r = 16
alpha = 32.0
block_size = 128
batch_size = 16
max_iters = 120
eval_interval = 40
eval_iters = 10
log_interval = 20
learning_rate = 3e-3
warmup_iters = 10
lr_decay_iters = 120
min_lr = 3e-4
device = "cpu"
