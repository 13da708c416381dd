# The offline quickstart: LoRA-fine-tune the bundled Milton base on Shakespeare, on a laptop CPU.
#   python data/shakespeare/prepare.py
#   python train.py config/quickstart.py          # a few minutes on 2 CPU cores
#   python sample.py --out_dir=out-quickstart --start="ROMEO:"
out_dir = "out-quickstart"
init_from = "models/gpt2-milton"
dataset = "shakespeare"
method = "lora"
targets = ("lora3",)  # attention, attention projection and feed-forward
r = 16
alpha = 32.0
block_size = 128
batch_size = 16
max_iters = 300
eval_interval = 100
eval_iters = 20
log_interval = 20
learning_rate = 3e-3
warmup_iters = 20
lr_decay_iters = 300
min_lr = 3e-4
device = "cpu"
