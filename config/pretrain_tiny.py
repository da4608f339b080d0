# A tiny GPT on the built-in corpus (the Python standard library), on a laptop CPU in ~3 minutes.
#   python prepare.py && python train.py config/pretrain_tiny.py
out_dir = 'out-tiny'
dataset = 'stdlib'
eval_interval = 100
eval_iters = 20
log_interval = 20
wandb_run_name = 'pretrain-tiny'

block_size = 256
batch_size = 16
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_kv_head = 2  # GQA
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 2e-4
warmup_iters = 50
