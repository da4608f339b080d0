# PPO from the tiny SFT model on the built-in multiplication prompts: reward 1 for the exact final
# number, a critic of its own (initialised from the SFT model, value head from zero), per-token KL
# to the SFT model in the reward, GAE. ~3.5 CPU minutes; pipeline.py runs it as it is. (RLHF proper,
# the reward model's score alone, lowered held-out multiplication: see pipeline.py's STAGES.)
#   python ppo.py config/ppo_tiny.py
init_from = 'out-sft'
out_dir = 'out-ppo'
algorithm = 'ppo'
eval_interval = 30
eval_items_per_task = 1000  # all 1,000 held-out arithmetic and multiplication problems: on 200, noise is +-3 points
log_interval = 10
wandb_run_name = 'ppo-tiny'

batch_size = 256  # one big batch and one optimizer step per rollout: see below
micro_batch_size = 32  # rows per forward/backward: ~10% faster than all 256 at once (smaller tensors stay in cache)
num_generations = 1
rl_tasks = 'multiplication'  # where RL has room (see config/grpo_tiny.py)
max_new_tokens = 44  # the longest working is 41 tokens, then <|im_end|>
temperature = 0.7
kl_coef = 0.05
kl_estimator = 'k1'
# With 0/1 rewards and a 1.3M-parameter policy the gradient of a few dozen rollouts is mostly noise,
# and Adam turns noise into full-size steps. 2 epochs x 2 minibatches of 32 took held-out accuracy
# from 29.5% to 21%; one step per 256 rollouts took it to 34.1-34.5% (all 1,654 test problems).
ppo_epochs = 1
num_minibatches = 1
cliprange = 0.2
cliprange_value = 0.2
vf_coef = 0.1
gamma = 1.0
lam = 0.95
target_kl = 0.02  # end an update early once a minibatch has moved this far from the rollout policy
learning_rate = 2e-5  # see config/grpo_tiny.py: 1e-4 wrecks this model
critic_learning_rate = 1e-4  # the value head starts from zero: it needs to move faster than the policy
warmup_iters = 10
lr_schedule = 'constant'
max_iters = 60
# LoRA: --lora_rank=8 puts adapters on the policy and the critic, whose frozen base is the policy's
# own tensors; the reference is that base with the adapters off: one copy of the SFT weights in all.
# Peak RSS of 3 iterations on one CPU thread: 1,430 -> 1,461 MB here (activations dominate at 1.3M
# params); 1,807 -> 1,390 MB at 26M params (batch_size=32).
