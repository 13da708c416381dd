# Instruction-tune GPT-2 (124M) on Alpaca-52k (Stanford's instruction/input/output records), loss on the
# responses only:
#   python data/alpaca/prepare.py --max_length=512                   # needs the Hub
#   python train.py config/finetune_alpaca.py                        # LoRA on q and v, as alpaca-lora
#   python sample.py --out_dir=out-alpaca --template=alpaca --start="Give three tips for staying healthy."
#   python sample.py --out_dir=out-alpaca --template=alpaca --start="Translate to French." --template_input="Good morning"
# Other methods: add --method=... and that method's learning rate:
#   --method=full --learning_rate=2e-5 --min_lr=2e-6     --method=dora --learning_rate=3e-4
#   --method=oft --learning_rate=5e-4                      --method=ether --learning_rate=1e-3
#   --method=ia3 --learning_rate=3e-3                      --quantize=nf4 (QLoRA)
out_dir = "out-alpaca"
init_from = "gpt2"
dataset = "alpaca"
mask_prompt = True
eval_interval = 100
eval_iters = 40
log_interval = 10

# alpaca-lora's recipe: r 8, alpha 16, dropout 0.05 on q and v, lr 3e-4, ~3 epochs
method = "lora"
r = 8
alpha = 16.0
adapter_dropout = 0.05
# Alpaca examples are short (median ~150 tokens): 16 x 4 windows of 512 tokens = 32,768 tokens per iteration,
# ~700 iterations = about 3 passes over the 51k training examples
batch_size = 16
block_size = 512
gradient_accumulation_steps = 4
max_iters = 700
learning_rate = 3e-4
warmup_iters = 50
lr_decay_iters = 700
min_lr = 3e-5
dtype = "bfloat16"
compile = True
