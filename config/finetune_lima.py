# Instruction-tune GPT-2 (124M) on LIMA (1,000 curated answers; gated on the Hub: accept its terms and
# `huggingface-cli login` first, or pass --input), loss on the answers only:
#   python data/lima/prepare.py                                      # formatted with the guanaco template
#   python train.py config/finetune_lima.py
#   python sample.py --out_dir=out-lima --template=guanaco --start="What makes a good teacher?"
# Other methods: add --method=... and that method's learning rate:
#   --method=full --learning_rate=1e-5 --min_lr=1e-6     --method=dora --learning_rate=2e-4
#   --method=oft --learning_rate=5e-4                      --method=ether --learning_rate=1e-3
#   --method=ia3 --learning_rate=3e-3                      --quantize=nf4 (QLoRA)
out_dir = "out-lima"
init_from = "gpt2"
dataset = "lima"
mask_prompt = True
eval_interval = 25
eval_iters = 20
log_interval = 5

# LIMA's recipe (15 epochs, residual dropout, a decaying lr) with LoRA on every linear of the blocks
method = "lora"
targets = ("lora3",)
r = 16
alpha = 32.0
adapter_dropout = 0.1
# LIMA answers are long: whole 1024-token windows, 8 x 4 = 32,768 tokens per iteration,
# ~300 iterations = about 15 passes over the ~600k training tokens
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 4
max_iters = 300
learning_rate = 2e-4
warmup_iters = 20
lr_decay_iters = 300
min_lr = 2e-5
dtype = "bfloat16"
compile = True
