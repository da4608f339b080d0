# A reward model for the tiny SFT model on the built-in preference pairs (identity, arithmetic, code,
# multiplication), on a laptop CPU in about a minute.
#   python sft.py config/sft_tiny.py && python reward.py config/reward_tiny.py
init_from = 'out-sft'
out_dir = 'out-reward'
eval_interval = 200
log_interval = 20
wandb_run_name = 'reward-tiny'

max_seq_len = 256
# The last-token head alone tops out near 75% on held-out arithmetic pairs (it must redo the sum
# to see that one digit is wrong); adding 3 x the response's mean log-likelihood gives ~92%.
lm_coef = 3.0
batch_size = 16
max_iters = 600  # ~0.55 epoch of the 17,600 pairs
learning_rate = 3e-5  # 1e-4 lets the arithmetic pairs pull the LM term below where it started
min_lr = 3e-6
warmup_iters = 20
lr_decay_iters = 600
# LoRA: --lora_rank=8 trains adapters on the backbone and the head in full (the checkpoint holds
# the merged backbone, so ppo.py reads it unchanged). Peak RSS of 5 steps on one CPU thread:
# 422 -> 414 MB here (activations dominate at 1.3M params); 1,125 -> 959 MB at 26M params.
