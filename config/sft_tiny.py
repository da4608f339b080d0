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
# Longer (lr_decay_iters with it), from one pretrained model (Zen 5, bf16): 2500 steps ended at 85.7%
# (2000: 84.0-86.0%); 3000 ended at 93.6% (multiplication 86%), but its val loss was lowest at step
# 2000 (0.4044; 0.4129 at the end, code_loss 5.50 -> 5.80), and best.pt, which the next stages and
# eval.py take, is that step's model: arithmetic 87.6%, multiplication 71%.
learning_rate = 1e-3
# AdamW's weight decay on the weight matrices (sft.py's default is 0). From the pretrained models of
# three seeds (1337, 1, 2; Zen 5, bf16), 0.1 against 0 at step 2000 (the stage's own evals): val loss
# 0.399 / 0.332 / 0.251 against 0.412 / 0.337 / 0.266, arithmetic 85.4 / 86.5 / 85.7% against 84.0 /
# 87.5 / 84.3%, multiplication 65.4 / 38.1 / 64.9% against 63.5 / 36.8 / 52.2%, code loss lower in all
weight_decay = 0.1
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 2000
