# PPO of the GPT-2-small-class SFT model (config/sft_small.py) on 8 GPUs: the reward model of
# reward.py plus the verifiable reward where a prompt has an answer, a critic initialised from the
# reward model, an adaptive KL coefficient. Prompts: an RL JSONL (docs/data.md); '' = the built-in
# prompts (arithmetic and multiplication).
#   torchrun --standalone --nproc_per_node=8 ppo.py config/ppo_small.py
init_from = 'out-sft-small'
out_dir = 'out-ppo-small'
algorithm = 'ppo'
rl_file = ''
eval_interval = 25
eval_items_per_task = 1000
eval_tasks = ''  # all tasks of the suite: watch identity/chat/code for regressions too
log_interval = 1
wandb_log = True
wandb_run_name = 'ppo-small'

reward_model = 'out-reward-small'  # reward.py's out_dir; '' = the verifiable reward alone
reward_model_weight = 1.0
verifiable_weight = 1.0
missing_eos_penalty = 1.0
critic_init = 'reward'

batch_size = 64  # prompts per GPU: 512 rollouts per iteration over 8 GPUs
num_generations = 1
max_new_tokens = 128
temperature = 1.0
kl_coef = 0.05
kl_estimator = 'k1'
kl_target = 6.0  # nats per response; Ziegler et al. 2019's controller
kl_horizon = 10000
ppo_epochs = 4
num_minibatches = 4
micro_batch_size = 16
target_kl = 0.1  # end an update early when a minibatch has moved this far
vf_coef = 0.1
whiten_rewards = False

learning_rate = 3e-6
lr_schedule = 'constant'
max_iters = 500
grad_clip = 1.0

device = 'cuda'
dtype = 'bfloat16'
compile_model = False  # rollout and update shapes change every iteration
