# Instruction-tune GPT-2 (124M) on Guanaco (OpenAssistant conversations, as in the QLoRA paper), loss on the
# assistant's answers only:
#   python data/guanaco/prepare.py                                   # ~10k conversations, needs the Hub
#   python train.py config/finetune_guanaco.py                       # LoRA on every linear of the blocks
#   python sample.py --out_dir=out-guanaco --template=guanaco --start="How do I learn to juggle?"
#   python sample.py --init_from=gpt2 --template=guanaco --start="How do I learn to juggle?"   # before
# Other methods: add --method=... and that method's learning rate (values that suit this data size):
#   --method=full --learning_rate=2e-5 --min_lr=2e-6     --method=dora --learning_rate=2e-4
#   --method=oft --learning_rate=5e-4                      --method=ether --learning_rate=1e-3
#   --method=ia3 --learning_rate=3e-3                      --quantize=nf4 (QLoRA, as the paper trained Guanaco)
out_dir = "out-guanaco"
init_from = "gpt2"
dataset = "guanaco"
mask_prompt = True
eval_interval = 100
eval_iters = 40
log_interval = 10

# QLoRA's Guanaco recipe scaled to GPT-2: all linear layers, dropout 0.1, lr 2e-4, short warmup
method = "lora"
targets = ("lora3",)
r = 16
alpha = 32.0
adapter_dropout = 0.1
# 8 x 4 windows of 1024 tokens = 32,768 tokens per iteration; ~3 passes over the ~9k training conversations
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 4
max_iters = 1000
learning_rate = 2e-4
warmup_iters = 50
lr_decay_iters = 1000
min_lr = 2e-5
dtype = "bfloat16"
compile = True
