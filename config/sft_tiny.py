# Supervised fine-tuning of the tiny pretrained model on the built-in task suite (identity,
# arithmetic, code, chat), on a laptop CPU in ~9 minutes.
#   python sft.py config/sft_tiny.py
init_from = 'out-tiny'
out_dir = 'out-sft'
eval_interval = 500  # an eval generates ~2,100 answers (~4.5 s here): every 200 iterations was 45 s of the run
eval_items_per_task = 1000  # all 1,000 held-out arithmetic problems (identity has 120, code and chat 40)
log_interval = 20
wandb_run_name = 'sft-tiny'

max_seq_len = 192
packing = True
batch_size = 16
max_iters = 2000  # arithmetic is 29% at 1000 iterations and 81% at 2000: the skill arrives late
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 2000
