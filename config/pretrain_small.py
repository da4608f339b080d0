# A GPT-2-small-class model (124M-ish: 12 layers, 768 wide, 1024 context) on one node of 8 GPUs.
#   python prepare.py --dataset=fineweb_edu --source=fineweb_edu --vocab_size=32768
#   torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py
# ~0.5M tokens per step (16 x 1024 x 32); 20k steps = ~10B tokens.
out_dir = 'out-small'
dataset = 'fineweb_edu'
eval_interval = 500
eval_iters = 100
log_interval = 10
wandb_log = True
wandb_run_name = 'pretrain-small'

block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32  # total over all ranks: 4 per GPU on 8 GPUs
n_layer = 12
n_head = 12
n_kv_head = 4
n_embd = 768
dropout = 0.0

learning_rate = 6e-4
max_iters = 20000
lr_decay_iters = 20000
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1

device = 'cuda'
dtype = 'bfloat16'
compile_model = True
