# GRPO from the tiny SFT model on the built-in arithmetic prompts: 8 samples per prompt, each
# scored against its group (no critic), reward 1 for the exact final number. ~8 CPU minutes.
#   python ppo.py config/grpo_tiny.py
init_from = 'out-sft'
out_dir = 'out-grpo'
algorithm = 'grpo'
eval_interval = 50
eval_items_per_task = 200
log_interval = 5
wandb_run_name = 'grpo-tiny'

batch_size = 16  # prompts; x 8 samples = 128 rollouts per iteration
num_generations = 8
max_new_tokens = 8
temperature = 1.0
kl_coef = 0.02  # GRPO puts beta * KL (k3) in the loss
kl_estimator = 'k3'
scale_rewards = True  # (r - mean) / std over the group
loss_norm = 'token'
ppo_epochs = 1  # one pass: each minibatch step is on fresh samples except for the first ratio
num_minibatches = 2
learning_rate = 1e-4
lr_schedule = 'constant'
max_iters = 200
