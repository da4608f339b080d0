# DPO of the tiny SFT model on the built-in preference pairs (identity, arithmetic, code, multiplication), on a
# laptop CPU in about 3 minutes.
#   python sft.py config/sft_tiny.py && python dpo.py config/dpo_tiny.py
init_from = 'out-sft'
out_dir = 'out-dpo'
eval_interval = 250
eval_items_per_task = 1000  # all 1,000 held-out arithmetic problems: on 200, noise is +-3 points
log_interval = 25
wandb_run_name = 'dpo-tiny'

max_seq_len = 256
beta = 0.1
# Plain DPO lowers the chosen answers' likelihood too (the rejected ones fall faster) and greedy
# arithmetic drops by half; the RPO term keeps the chosen answers likely.
rpo_alpha = 1.0
batch_size = 16
max_iters = 500
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 20
lr_decay_iters = 500
# LoRA: --lora_rank=8 trains adapters only; the reference is the base with the adapters off (no
# second copy). Peak RSS of 5 steps on one CPU thread: 479 -> 479 MB here (1.3M params: activations
# dominate); 1,187 -> 1,006 MB at 26M params (1,290 with a live reference, precompute_ref_logps=False).
