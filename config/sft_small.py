# SFT of the GPT-2-small-class model (config/pretrain_small.py) on 8 GPUs; put your chat data in
# sft_files (MiniMind "conversations" or OpenAI "messages" JSONL; see docs/data.md).
#   torchrun --standalone --nproc_per_node=8 sft.py config/sft_small.py
init_from = 'out-small'
out_dir = 'out-sft-small'
sft_files = ''  # '' = the built-in task suite; e.g. 'sft_mini_512.jsonl'
eval_interval = 250
log_interval = 10
wandb_log = True
wandb_run_name = 'sft-small'

max_seq_len = 1023
packing = True
batch_size = 16
gradient_accumulation_steps = 8
max_iters = 3000
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 100
lr_decay_iters = 3000
device = 'cuda'
dtype = 'bfloat16'
compile_model = True
