# A reward model for the tiny SFT model on the built-in preference pairs (identity, arithmetic,
# code), on a laptop CPU in about 2 minutes.
#   python sft.py config/sft_tiny.py && python reward.py config/reward_tiny.py
init_from = 'out-sft'
out_dir = 'out-reward'
eval_interval = 100
log_interval = 20
wandb_run_name = 'reward-tiny'

max_seq_len = 256
batch_size = 16
max_iters = 300  # ~3 epochs: held-out accuracy peaks here; longer runs memorise the arithmetic pairs
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 300
