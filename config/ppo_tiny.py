# PPO from the tiny SFT model on the built-in arithmetic prompts: reward 1 for the exact final
# number, a critic of its own (initialised from the SFT model), per-token KL to the SFT model.
# A laptop CPU, ~8 minutes.
#   python ppo.py config/ppo_tiny.py
init_from = 'out-sft'
out_dir = 'out-ppo'
algorithm = 'ppo'
eval_interval = 50
eval_items_per_task = 200  # all 200 held-out arithmetic problems, greedy
log_interval = 5
wandb_run_name = 'ppo-tiny'

batch_size = 64
num_generations = 2  # PPO needs no groups; two samples per prompt just halve the prompt reads
max_new_tokens = 8  # up to 4 digits and <|im_end|>
temperature = 1.0
kl_coef = 0.02
kl_estimator = 'k1'
ppo_epochs = 4
num_minibatches = 4
cliprange = 0.2
cliprange_value = 0.2
gamma = 1.0
lam = 0.95
learning_rate = 1e-4
lr_schedule = 'constant'
max_iters = 200
