# Fine-tune GPT-2 (124M) on Shakespeare, as nanoGPT's finetune_shakespeare does, with any method:
#   python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py                       # full fine-tuning
#   python train.py config/finetune_shakespeare.py --method=lora --learning_rate=1e-3
# Needs the Hub (to download gpt2) and ideally a GPU; --init_from=gpt2-xl for the 1.5B model.
out_dir = "out-shakespeare"
init_from = "gpt2"
dataset = "shakespeare"
eval_interval = 50
eval_iters = 40
log_interval = 5

method = "full"
# 1 batch of 32 x 1024 tokens = 32,768 tokens per iteration
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 4
max_iters = 200
learning_rate = 3e-5  # full fine-tuning wants a small, constant learning rate
decay_lr = False
dtype = "bfloat16"
compile = True
