# Pretrain the small bundled base model (GPT-2 architecture, real GPT-2 tokenizer) on Milton.
# Used by make_base.py, which exports the result to models/gpt2-milton/. About 10 minutes on 2 quiet CPU cores
# (410 iterations x 2,048 tokens, ~2.8 passes over Milton's 304k training tokens). The learning rate follows a cosine towards
# iteration 800 and training stops halfway, at a still-high rate, to keep the rebuild short.
out_dir = "out-base-milton"
init_from = "scratch"
dataset = "milton"
method = "full"
n_layer = 6
n_head = 4
n_embd = 64
dropout = 0.1
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 410
eval_interval = 100
eval_iters = 20
log_interval = 20
learning_rate = 3e-3
warmup_iters = 40
lr_decay_iters = 800
min_lr = 3e-4
weight_decay = 0.1
device = "cpu"
dtype = "float32"
