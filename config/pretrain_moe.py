# A small mixture-of-experts GPT on the built-in corpus: 8 experts, 2 active per token, plus one
# shared expert (DeepSeek-MoE style). CPU-sized; scale n_layer/n_embd up for GPUs.
#   python prepare.py && python train.py config/pretrain_moe.py
out_dir = 'out-moe'
dataset = 'stdlib'
eval_interval = 100
eval_iters = 20
log_interval = 20
wandb_run_name = 'pretrain-moe'

block_size = 256
batch_size = 16
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
mlp_hidden = 256  # per expert: smaller experts, more of them
n_experts = 8
n_experts_active = 2
n_shared_experts = 1
moe_aux_loss_coef = 0.01
moe_capacity_factor = 1.25

learning_rate = 2e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 2e-4
warmup_iters = 50
