# GRPO from the tiny SFT model on the built-in multiplication prompts (3-digit by 2-digit, answered
# with a working): 8 samples per prompt, each scored against its group (no critic), reward 1 for
# the exact final number. ~5 CPU minutes
# (run with OMP_NUM_THREADS=1 on a shared 2-core machine: 2 threads contending are ~10x slower).
#   python ppo.py config/grpo_tiny.py
init_from = 'out-sft'
out_dir = 'out-grpo'
algorithm = 'grpo'
eval_interval = 60
eval_items_per_task = 1000  # all 1,000 held-out arithmetic and multiplication problems: on 200, noise is +-3 points
log_interval = 10
wandb_run_name = 'grpo-tiny'

# Multiplication is where RL has room: the SFT model gets 46-71% of the held-out problems right
# greedily but ~90% in at least one of 8 samples (its slips are carries into the sum), and half of
# the groups mix right and wrong samples. On arithmetic (~89% after SFT) RL moved 3-4 points at most.
rl_tasks = 'multiplication'
batch_size = 32  # prompts; x 8 samples = 256 rollouts per iteration (16 x 240 iterations: +4 points, 32 x 120: +7)
micro_batch_size = 32  # rows per forward/backward: ~10% faster than all 256 at once (smaller tensors stay in cache)
num_generations = 8
max_new_tokens = 44  # the longest working (999*99 = ...) is 41 tokens, then <|im_end|>
temperature = 0.7  # samples near the greedy answer: the contrasts that can flip an argmax
kl_coef = 0.02  # GRPO puts beta * KL (k3) in the loss
kl_estimator = 'k3'
scale_rewards = True  # (r - mean) / std over the group
loss_type = 'dapo'  # every token of the batch weighs the same (rl.aggregate has the others)
# held-out multiplication at 120 iterations, same SFT model, one run each: dapo 71.0%, grpo 70.9%, dr_grpo 70.7%
# (bnpo is dapo on one process): no difference this model can show, so TRL's default stays
ppo_epochs = 1
num_minibatches = 1  # one optimizer step per rollout batch: the batch is the gradient's only average
# 1e-4 wrecks this 1.3M-parameter model: with few of a batch's groups carrying signal, Adam turns
# the gradient's noise into full-size steps on every weight; the KL reaches ~1 nat in 10 steps and
# accuracy falls to ~10%. 2e-5 moves it: held-out 29.9% -> 34.0% on all 1,654 test problems.
learning_rate = 2e-5
warmup_iters = 10
lr_schedule = 'constant'
max_iters = 120  # held-out multiplication 65.1% -> 71.0% at 120, 71.7% at 180 (pipeline run of 2026-12-06)
# LoRA: --lora_rank=8 (adapters only; the reference is the base with the adapters off). Peak RSS of
# 3 iterations on one CPU thread: 1,008 -> 986 MB here; 1,135 -> 863 MB at 26M params (batch_size=4).
# Rollouts decode under dtype's autocast: --dtype=bfloat16 samples 1.2-1.6x faster than fp32 at
# this size on an AMX CPU (2.4x at 26M params).
