# Online (iterative) DPO of the tiny SFT model on the built-in multiplication prompts: each step
# samples 4 answers to each of 16 prompts from the current policy, and the best-scored answer of a
# prompt (the exact final number, <|im_end|> emitted) is preferred over its worst; prompts whose
# answers all scored the same give no pair. Evaluated on the held-out pairs and task items as dpo_tiny.
#   python sft.py config/sft_tiny.py && python dpo.py config/dpo_online_tiny.py
init_from = 'out-sft'
out_dir = 'out-dpo-online'
eval_interval = 200  # an eval scores the held-out pairs and generates ~2,100 answers (~6 s here)
eval_items_per_task = 1000  # all 1,000 held-out arithmetic and multiplication problems: on 200, noise is +-3 points
log_interval = 10
wandb_run_name = 'dpo-online-tiny'

online = True
rl_tasks = 'multiplication'  # where the SFT model has room: 46-71% greedy, ~90% in one of 8 samples (grpo_tiny.py)
online_samples = 4
max_new_tokens = 44  # the longest working (999*99 = ...) is 41 tokens, then <|im_end|>
temperature = 0.7  # samples near the greedy answer: the contrasts that can flip an argmax
max_seq_len = 256
beta = 0.1
rpo_alpha = 1.0  # as dpo_tiny: keeps the chosen (right) workings likely while the wrong ones fall
batch_size = 16  # prompts per step, x 4 samples = 64 rollouts
max_iters = 400  # 200: +4.1 points on held-out multiplication (69 s); 400: +6.1 (119 s)
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 10
lr_decay_iters = 400
