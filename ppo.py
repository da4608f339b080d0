"""
RL fine-tuning from an SFT checkpoint: PPO (Schulman et al. 2017, with the RLHF recipe of Ziegler
et al. 2019 and TRL's PPOTrainer) or GRPO (Shao et al. 2024).
    python ppo.py config/ppo_tiny.py                        # from out-sft, on the built-in multiplication prompts
    python ppo.py config/grpo_tiny.py
    torchrun --standalone --nproc_per_node=8 ppo.py config/ppo_small.py

One iteration:
  1. rollout   batch_size prompts x num_generations samples through the KV-cache generator
  2. score     the verifiable reward and/or the reward model at the end of each response,
               weighted; missing_eos_penalty off a response that never emits <|im_end|>
  3. forward   log-probs of the sampled tokens under the policy (in training mode, dropout off:
               exactly what the update recomputes) and the frozen reference; the critic's values
  4. advantage PPO: per-token reward = -kl_coef * KL_t, + the score at the last token; GAE; whitened.
               GRPO: the score against its prompt's group (advantage='group'), the other samples'
               mean (rloo) or the whole batch (reinforce_pp); the KL goes into the loss instead
  5. update    ppo_epochs passes over num_minibatches shuffled minibatches: clipped policy loss,
               clipped value loss, entropy bonus, grad clipping; stops early past target_kl.
               loss_type says how the token losses of a minibatch add up (rl.aggregate)
DAPO (Yu et al. 2025) is GRPO with loss_type='dapo', epsilon_high=0.28, dynamic_sampling=True and
overlong_buffer_len > 0 (or mask_truncated_completions=True); Dr. GRPO is loss_type='dr_grpo'.
The math is in rl.py; this file is the loop. Metrics carry TRL's names (objective/kl, ...).
Rollouts decode under the stage's autocast (dtype), as the forward passes that score them do.
lora_rank > 0 (lora.py) trains adapters on a frozen base: on the policy, and on the critic's own
transformer too (its value head in full), since a full critic would hold the most memory of all:
its weights, gradients and two Adam moments. The reference is the policy with its adapters off,
and with critic_init='policy' the critic's frozen base is the very same tensors: one copy of the
SFT weights serves policy, reference and critic. The checkpoint holds the merged policy in
'model' (sample.py and later stages load it as any GPT), the adapters in 'lora' and the critic's
adapters and value head in 'value' (to resume, from the same parent).
Under torchrun batch_size is per rank; the ranks sample their rows from one shared random stream
and whiten over all ranks, so N ranks run what one process with N x batch_size would.
"""

import dataclasses
import math
import os
import time

import torch
import torch.nn as nn

import common
import data
import heldout
import rl
import tasks
from configurator import configure
from generate import GenerationConfig, generate_ids, pad_prompts, ragged_inputs
from lora import (add_lora, adapters_off, check_resume, checkpoint_weights, load_adapters,
                  share_frozen_weights)

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-ppo'
init_from = 'out-sft'  # an SFT out_dir (the policy and the frozen reference); 'resume' continues out_dir
init_checkpoint = 'best'  # of init_from: 'best' (by val loss) | 'latest'
eval_interval = 20  # iterations (one iteration = one rollout batch and its update)
log_interval = 1
eval_items_per_task = 200  # held-out items per task, greedy (0 = skip)
eval_tasks = 'arithmetic,multiplication'  # comma-separated tasks of the suite to evaluate; '' = all
wandb_log = False
wandb_project = 'mini-llm'
wandb_run_name = 'ppo'
algorithm = 'ppo'  # 'ppo' | 'grpo'
# data
rl_file = ''  # RL prompts JSONL (docs/data.md); '' = the built-in prompts (data/tasks/rl_train.jsonl)
rl_tasks = ''  # comma-separated: train only on the prompts whose "task" is one of these ('' = every prompt)
data_root = 'data'
skip_bad_lines = False
# reward: score = verifiable_weight * exact match + reward_model_weight * RM score - missing_eos_penalty
verifiable_weight = 1.0  # tasks.verifiable_reward: the final number (or the text answer) is right
reward_model = ''  # a reward-model out_dir (reward.py); '' = none
reward_model_weight = 1.0  # 0 = the reward model only initialises the critic (critic_init='reward')
missing_eos_penalty = 1.0  # a response cut off at max_new_tokens never answered
# rollout
batch_size = 32  # prompts per iteration per rank
num_generations = 1  # samples per prompt; GRPO needs >= 2 (its baseline is the group mean)
max_new_tokens = 48  # the longest built-in answer, a multiplication working, is 41 tokens + <|im_end|>
temperature = 1.0
top_k = 0
top_p = 1.0
# KL to the reference
kl_coef = 0.05  # beta: PPO puts -beta * KL_t in the per-token reward, GRPO beta * KL in the loss
kl_estimator = 'auto'  # 'k1' (log-ratio) | 'k3' ((r - 1) - log r: >= 0); auto = k1 for PPO, k3 for GRPO
kl_target = 0.0  # > 0: adapt kl_coef to keep the per-sequence KL near this (Ziegler et al. 2019)
kl_horizon = 10000  # episodes over which the controller closes the gap
# the update
ppo_epochs = 4
num_minibatches = 4  # optimizer steps per epoch
micro_batch_size = 0  # rows per forward/backward (memory); 0 = a whole minibatch at once
cliprange = 0.2  # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high], both cliprange unless set
epsilon_low = 0.0  # > 0: the lower clip alone (0 = cliprange)
epsilon_high = 0.0  # > 0: the upper clip alone (0 = cliprange); DAPO's clip-higher: 0.28 with cliprange 0.2
cliprange_value = 0.2
vf_coef = 0.1
gamma = 1.0
lam = 0.95
whiten_rewards = False
entropy_coef = 0.0  # > 0 rewards keeping the policy's entropy (exploration)
target_kl = 0.0  # > 0: end an update early once a minibatch's approx KL to the rollout policy passes this
# how a minibatch's token losses add up (rl.aggregate): 'dapo' (every token of the global batch weighs the
# same) | 'bnpo' (the same over this rank's tokens) | 'grpo' (mean per response, then over responses) |
# 'dr_grpo' (sum / (responses x max_new_tokens), and no std scaling of GRPO's advantages)
loss_type = 'dapo'
# GRPO
advantage = 'group'  # 'group' (r - group mean, / group std) | 'rloo' (r - mean of the others) | 'reinforce_pp' (whitened over the batch)
scale_rewards = True  # advantage='group': divide by the group's std; False = mean-only (Dr. GRPO)
dynamic_sampling = False  # DAPO: drop groups whose samples all scored the same and sample more prompts in their place
max_sampling_tries = 4  # dynamic_sampling: rollout batches per iteration at most; then dropped groups fill the rest
# overlong responses (DAPO): leave responses cut at max_new_tokens out of the loss, or penalise length softly
mask_truncated_completions = False
overlong_buffer_len = 0  # > 0: the last this many tokens before max_new_tokens cost up to overlong_penalty_factor
overlong_penalty_factor = 1.0
# LoRA (the keys of sft.py): adapters on the policy and the critic's transformer; the reference is the base
lora_rank = 0  # 0 = full fine-tuning
lora_alpha = 16.0
lora_dropout = 0.0  # must stay 0: the rollout's log-probs and the update's must agree (as dropout)
lora_targets = 'c_attn,c_proj,c_fc'
# critic (PPO)
critic_init = 'policy'  # 'policy' (the SFT weights) | 'reward' (the reward model's transformer)
share_backbone = False  # the value head sits on the policy's transformer: one model, less memory
# optimizer
max_iters = 100
learning_rate = 1e-5
critic_learning_rate = 0.0  # the value head and the critic's transformer; 0 = learning_rate
min_lr = 1e-6
warmup_iters = 0
lr_decay_iters = 100
lr_schedule = 'constant'  # 'cosine' | 'wsd' | 'constant'
wsd_decay_frac = 0.2  # wsd: fraction of lr_decay_iters spent decaying
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
device = 'auto'
dtype = 'auto'
compile_model = False
parallel = 'ddp'  # under torchrun: 'ddp' (every rank holds the whole model) | 'fsdp' (FSDP2: sharded over the ranks)
seed = 1337
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

if algorithm not in ('ppo', 'grpo'):
    raise SystemExit(f"algorithm={algorithm!r}: use 'ppo' or 'grpo'")
if loss_type not in rl.LOSS_TYPES:
    raise SystemExit(f"loss_type={loss_type!r}: use one of {', '.join(rl.LOSS_TYPES)}")
if advantage not in ('group', 'rloo', 'reinforce_pp'):
    raise SystemExit(f"advantage={advantage!r}: use 'group', 'rloo' or 'reinforce_pp'")
if algorithm == 'ppo' and (advantage != 'group' or dynamic_sampling):
    raise SystemExit("advantage and dynamic_sampling are GRPO's (PPO's advantages come from its critic): "
                     "set algorithm='grpo', or leave them at 'group' and False")
if algorithm == 'grpo' and num_generations < 2 and (advantage != 'reinforce_pp' or dynamic_sampling):
    raise SystemExit("GRPO compares samples of the same prompt: set num_generations >= 2 (e.g. 8)")
if overlong_buffer_len >= max_new_tokens:
    raise SystemExit(f"overlong_buffer_len={overlong_buffer_len} must be below max_new_tokens={max_new_tokens}")
if min(epsilon_low, epsilon_high, overlong_buffer_len, overlong_penalty_factor) < 0 or max_sampling_tries < 1:
    raise SystemExit("epsilon_low, epsilon_high, overlong_buffer_len and overlong_penalty_factor must be >= 0, "
                     "max_sampling_tries >= 1")
clip_low, clip_high = epsilon_low or cliprange, epsilon_high or cliprange
scale_rewards = scale_rewards and loss_type != 'dr_grpo'  # Dr. GRPO drops the std as well as the length
kl_estimator = {'ppo': 'k1', 'grpo': 'k3'}[algorithm] if kl_estimator == 'auto' else kl_estimator
if algorithm == 'grpo' and kl_estimator == 'k1':
    raise SystemExit("kl_estimator='k1' in GRPO's loss has zero expected gradient (the penalty would do nothing): "
                     "use kl_estimator='k3' (rl.kl_penalty says why)")
if not verifiable_weight and not (reward_model and reward_model_weight):
    raise SystemExit("no reward: set verifiable_weight > 0, or reward_model=<a reward-model out_dir> with "
                     "reward_model_weight > 0")
if temperature <= 0:
    raise SystemExit(f"temperature={temperature}: RL samples its rollouts, so it must be > 0 (greedy rollouts "
                     "would make every GRPO group identical and PPO's ratios undefined)")
if reward_model and not reward_model_weight and critic_init != 'reward':
    raise SystemExit(f"reward_model={reward_model!r} would be unused: reward_model_weight=0 and critic_init={critic_init!r}")
if lora_dropout:
    raise SystemExit("lora_dropout must be 0 in RL: the log-probs of the rollout and of the update's first "
                     "minibatch must agree exactly (the model's dropout is off for the same reason)")
if critic_init == 'reward' and share_backbone:
    raise SystemExit("critic_init='reward' needs the critic's own transformer: with share_backbone=True the value "
                     "head sits on the policy; set share_backbone=False, or critic_init='policy'")

ctx = common.setup(device, dtype, seed, out_dir, parallel=parallel)
device = ctx.device

# models: policy and frozen reference from the SFT checkpoint; the critic; the reward model
resume = init_from == 'resume'
ckpt, parent = common.start_from(ctx, init_from, init_checkpoint)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
sft_ckpt = common.load_checkpoint(parent) if resume else ckpt  # the reference stays the SFT model
tokenizer = common.tokenizer_from_checkpoint(ckpt)
if resume:
    check_resume(ckpt, lora_rank, out_dir)
# dropout off: the log-probs of the rollout and of the update's first minibatch must agree exactly.
# LoRA: the SFT weights, frozen, under adapters (resumed: load_adapters below)
policy = common.model_from_checkpoint(sft_ckpt if lora_rank else ckpt, dropout=0.0)
add_lora(policy, lora_rank, lora_alpha, lora_targets)
reference = None  # LoRA: the policy with its adapters off (reference_logprobs)
if not lora_rank:
    reference = common.model_from_checkpoint(sft_ckpt, dropout=0.0).requires_grad_(False).eval()
if max_new_tokens + 8 > policy.config.block_size:
    raise SystemExit(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size {policy.config.block_size}")
reward_net = None  # the reward model (rewardmodel.py), frozen: its head at each response's last token (+ lm_coef term)
if reward_model and reward_model_weight:  # with weight 0 it only initialises the critic (below)
    import rewardmodel
    reward_net, rm_tokenizer = rewardmodel.load_reward_model(reward_model, device)
    reward_net.requires_grad_(False)
    if rm_tokenizer.identity != tokenizer.identity:
        raise SystemExit(f"reward model {reward_model} uses another tokenizer ({rm_tokenizer.identity}) than the policy "
                         f"({tokenizer.identity}): train it from the same pretrain/SFT lineage")
critic, value_head, critic_ckpt = None, None, None  # PPO's value function: a head on a transformer
n_shared = 0  # LoRA: numbers of the critic's frozen base that are the policy's own tensors
if algorithm == 'ppo':
    if critic_init not in ('policy', 'reward') or (critic_init == 'reward' and not reward_model):
        raise SystemExit(f"critic_init={critic_init!r}: use 'policy', or 'reward' together with reward_model=<out_dir>")
    from_rm = critic_init == 'reward'
    if not share_backbone:
        critic_ckpt = common.load_checkpoint(reward_model) if from_rm else sft_ckpt
        if common.tokenizer_from_checkpoint(critic_ckpt).identity != tokenizer.identity:
            raise SystemExit(f"reward model {reward_model} uses another tokenizer than the policy: train it from the "
                             f"same pretrain/SFT lineage")
        critic = common.model_from_checkpoint(critic_ckpt, dropout=0.0)
        add_lora(critic, lora_rank, lora_alpha, lora_targets)  # LoRA: adapters on the critic's frozen base too
        # an untied output head is unused (DDP rejects unused parameters); a tied one is the embedding
        critic.lm_head.requires_grad_(critic.config.tie_embeddings and not lora_rank)
        if lora_rank and not from_rm:  # the policy's frozen base is the same SFT weights: hold them once
            n_shared = share_frozen_weights(critic, policy)
    value_head = nn.Linear(policy.config.n_embd if critic is None else critic.config.n_embd, 1)
    if from_rm:  # the reward model's head (not its lm_coef term): values start near the reward's scale
        value_head.load_state_dict(critic_ckpt['reward_head'])
    else:
        nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)  # V = 0 until it learns
actor_critic = rl.ActorCritic(policy, critic, value_head)
if resume and lora_rank:  # the policy's adapters, the critic's adapters and its value head
    load_adapters(actor_critic, {**{'policy.' + k: v for k, v in ckpt['lora'].items()}, **ckpt['value']}, out_dir,
                  keep=('value_head.',))
elif resume:
    actor_critic.load_state_dict({**{'policy.' + k: v for k, v in ckpt['model'].items()}, **ckpt['value']})
actor_critic.to(device)
common.shard(ctx, actor_critic)  # FSDP only; the frozen reference and reward model stay whole on every rank
if ctx.fsdp:  # FSDP picks its root at the first forward: it must be the ActorCritic's, not the policy's alone
    with torch.no_grad():
        actor_critic(torch.zeros(1, 2, dtype=torch.long, device=device))
    actor_critic.reshard()  # the root keeps its gathered parameters after a forward: the optimizer needs the shards
ref_model = rl.ActorCritic(policy if reference is None else reference.to(device))  # no value head
model_args = policy.config.to_dict()
if ctx.master:
    critic_desc = 'none' if algorithm == 'grpo' else 'shared backbone' if share_backbone else f'own transformer from {critic_init}'
    if n_shared:
        critic_desc += f" with LoRA, its frozen base the policy's ({n_shared / 1e6:.2f}M numbers held once)"
    n_train = sum(p.numel() for p in actor_critic.parameters() if p.requires_grad)
    print(f"{algorithm}: policy from {init_from} ({policy.get_num_params() / 1e6:.2f}M params), reference {parent}"
          f"{' (the base, adapters off)' if lora_rank else ''}, training {n_train / 1e6:.3f}M"
          f"{f' (LoRA rank {lora_rank})' if lora_rank else ''}, "
          f"critic: {critic_desc}, reward: {verifiable_weight:g} x verifiable"
          f"{f' + {reward_model_weight:g} x {reward_model}' if reward_model and reward_model_weight else ''}")

# data: prompts rendered once as the chat prefix the policy continues
task_dir = os.path.join(data_root, 'tasks')
if not rl_file or eval_items_per_task:
    tasks.ensure_tasks(task_dir)  # generated once, offline
prompts, too_long = data.rl_prompts(rl_file or os.path.join(task_dir, 'rl_train.jsonl'), rl_tasks, tokenizer,
                                    max_new_tokens, policy.config.block_size, skip_bad_lines)
if not prompts:
    raise SystemExit(f"no prompt fits block_size {policy.config.block_size} with max_new_tokens={max_new_tokens}")
task_items = {}  # held-out items of the suite, for evaluate()
if eval_items_per_task:
    task_items = {t: v for t, v in tasks.heldout(task_dir).items() if not eval_tasks or t in eval_tasks.split(',')}
gen_config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              vocab_size=tokenizer.n_vocab,  # the model's padded ids are never sampled
                              stop_token_ids=(tokenizer.im_end_id, tokenizer.eot_id))
special_ids = set(tokenizer.special_tokens.values())
n_rollouts = batch_size * num_generations  # per rank
minibatch_size = n_rollouts // num_minibatches
if minibatch_size < 1 or n_rollouts % num_minibatches:
    raise SystemExit(f"batch_size * num_generations = {n_rollouts} rollouts do not split into num_minibatches={num_minibatches}")
micro = micro_batch_size or minibatch_size
single_step = algorithm != 'ppo' and ppo_epochs == 1 and num_minibatches == 1  # see step 3 of the loop
if ctx.master:
    print(f"rl data: {len(prompts):,} prompts ({too_long} too long for block_size dropped); {n_rollouts} rollouts "
          f"per rank per iteration, {ppo_epochs} epochs x {num_minibatches} minibatches of {minibatch_size}")


def rows(x, index):
    """Select rows of a per-row tensor; shared positions (L,) and a None mask pass through."""
    return x if x is None or x.dim() == 1 else x[index]


def forward_all(m, ids, positions, mask, n_query):
    """Response log-probs (and values) for every rollout, micro-batch by micro-batch, no grad."""
    logprobs, values = [], []
    with torch.no_grad():
        for index in torch.arange(len(ids), device=ids.device).split(micro):
            with ctx.autocast:
                lp, _, v, _ = m(ids[index], rows(positions, index), rows(mask, index), n_query, temperature,
                                with_entropy=False)
            logprobs.append(lp)
            values.append(v)
    return torch.cat(logprobs), None if values[0] is None else torch.cat(values)


def reference_logprobs(ids, positions, mask, n_query):
    """Response log-probs under the reference: its own frozen model, or (LoRA) the policy with its
    adapters off, which computes exactly the frozen SFT base. The latter bypasses the FSDP root's
    forward, so the root's parameters are gathered around it, as for generation."""
    if reference is not None:
        return forward_all(ref_model, ids, positions, mask, n_query)[0]
    with common.gathered(ctx), adapters_off(policy):
        return forward_all(ref_model, ids, positions, mask, n_query)[0]


# optimizer: the critic (value head and its transformer) may learn at its own rate
iter_num, kl_coef_now = 0, kl_coef
data_generator = torch.Generator().manual_seed(seed)
params = [p for p in actor_critic.parameters() if p.requires_grad]
actor_ids = {id(p) for p in policy.parameters()}
optimizer = common.adamw([p for p in params if id(p) in actor_ids], learning_rate, weight_decay, (beta1, beta2),
                         ctx.device_type, scaled=[p for p in params if id(p) not in actor_ids],
                         lr_scale=(critic_learning_rate or learning_rate) / learning_rate)
if resume:
    iter_num, _ = common.resume_training(ctx, ckpt, optimizer, data_generator)
    kl_coef_now = ckpt['kl_coef']
ckpt = sft_ckpt = critic_ckpt = None
model = common.wrap(ctx, actor_critic, compile_model)


def evaluate():
    """Held-out task metrics by greedy generation (val/arith_acc = exact match of the final number)."""
    with common.gathered(ctx):
        return heldout.stage_metrics(ctx, policy, tokenizer, task_items, eval_items_per_task)


def state():
    weights = common.model_state(ctx, actor_critic)  # one gather under FSDP: the policy's weights, then the rest
    policy_state = {k.removeprefix('policy.'): v for k, v in weights.items() if k.startswith('policy.')}
    value_state = {k: v for k, v in weights.items() if not k.startswith('policy.')}
    policy_state, lora = checkpoint_weights(policy, policy_state, lora_rank)
    if lora_rank:  # of the critic, what is trained: its adapters and value head
        value_state = {k: v for k, v in value_state.items() if 'lora_' in k or k.startswith('value_head.')}
    return common.checkpoint(ctx, algorithm, policy_state, model_args, tokenizer, config, parent, pretrain_dataset,
                             optimizer, iter_num, data_generator, value=value_state, kl_coef=kl_coef_now, **lora)


CONSOLE_KEYS = {  # of the metrics below, those on the console line (all go to history.jsonl and wandb)
    'ppo': ('objective/scores', 'objective/kl', 'objective/entropy', 'val/response_length', 'policy/approxkl_avg',
            'policy/clipfrac_avg', 'loss/policy_avg', 'loss/value_avg', 'lr', 'time/rollout_frac'),
}
CONSOLE_KEYS['grpo'] = tuple(k for k in CONSOLE_KEYS['ppo'] if k != 'loss/value_avg')


def all_ranks_done(done):
    """Under FSDP a rollout ends when every rank's rows have (each decode step is a collective)."""
    return bool(done.all()) if not ctx.fsdp else common.sum_over_ranks(ctx, (~done).sum()).item() == 0


def global_sum(x):
    """The sum of x's elements over every rank's batch (whitening statistics)."""
    return common.sum_over_ranks(ctx, x.sum())


def mean_all(x):
    """Mean over ranks of a scalar tensor, as a float (a host sync: only once per iteration)."""
    return common.mean_over_ranks(ctx, x).item()


def layout(batch, responses):
    """Prompts and their sampled responses (token lists) as tensors: the left-padded prompts
    (N, Tq) and their pad counts (N,), the right-padded responses (N, R) and their mask (N, R)."""
    query, query_pad = pad_prompts([p['ids'] for p in batch], tokenizer.pad_id, device)
    R = max(1, max(len(r) for r in responses))
    response = torch.tensor([r + [tokenizer.pad_id] * (R - len(r)) for r in responses], dtype=torch.long, device=device)
    mask = torch.tensor([[t < len(r) for t in range(R)] for r in responses], dtype=torch.bool, device=device)
    return query, query_pad, response, mask


def score(batch, responses):
    """(scores, verifiable), each (N,): verifiable_weight x exact match + reward_model_weight x the
    reward model's score, minus missing_eos_penalty off a response that never emitted <|im_end|>,
    plus DAPO's soft overlong penalty when overlong_buffer_len > 0."""
    texts = [tokenizer.decode([t for t in r if t not in special_ids]) for r in responses]
    verifiable = torch.tensor([tasks.verifiable_reward(t, p['answer']) for t, p in zip(texts, batch)], device=device)
    scores = verifiable_weight * verifiable
    query, query_pad, response, mask = layout(batch, responses)
    if reward_net is not None and reward_model_weight:  # read at each response's last token: <|im_end|>, as trained
        ids = torch.cat([query, response], dim=1)
        real = torch.cat([torch.arange(query.size(1), device=device)[None, :] >= query_pad[:, None], mask], dim=1)  # (N, L)
        response_mask = torch.cat([torch.zeros_like(query, dtype=torch.bool), mask], dim=1)  # (N, L), for lm_coef
        with ctx.autocast:
            scores = scores + reward_model_weight * rewardmodel.score_ids(reward_net, ids, real, response_mask)
    # a turn ends with <|im_end|>, where the reward model was trained to read its score
    scores = scores - missing_eos_penalty * (~rl.ended_with(response, mask, tokenizer.im_end_id)).float()
    if overlong_buffer_len:
        scores = scores + rl.overlong_penalty(mask.sum(1), max_new_tokens, overlong_buffer_len, overlong_penalty_factor)
    return scores, verifiable


def generate_and_score(rollout_seed):
    """One rollout batch: batch_size prompts drawn from the shared prompt stream (every rank draws the
    same indices and keeps its row), num_generations samples each, adjacent, sampled from one stream
    per seed that every rank shares, each rank its slice of rows (N ranks draw what one process with
    N x batch_size would). -> {'batch', 'responses', 'stopped', 'scores', 'verifiable'}, per row."""
    ix = torch.randint(len(prompts), (ctx.world_size, batch_size), generator=data_generator)[ctx.rank]
    batch = [prompts[i] for i in ix.tolist() for _ in range(num_generations)]
    policy.eval()
    # in the stage's dtype (autocast), as the forward passes that score the samples run
    with common.gathered(ctx), ctx.autocast:
        gen = generate_ids(policy, [p['ids'] for p in batch], dataclasses.replace(gen_config, seed=rollout_seed),
                           tokenizer.pad_id, rows=(ctx.rank * n_rollouts, ctx.world_size * n_rollouts),
                           all_done=all_ranks_done)
    policy.train()
    responses = gen.rows()
    scores, verifiable = score(batch, responses)
    return {'batch': batch, 'responses': responses, 'stopped': gen.stopped, 'scores': scores, 'verifiable': verifiable}


def take_groups(rollout, groups):
    """The rows of the given prompt groups (indices into the rollout's groups of num_generations)."""
    rows = [g * num_generations + k for g in groups for k in range(num_generations)]
    index = torch.tensor(rows, dtype=torch.long, device=device)
    return {k: [v[i] for i in rows] if isinstance(v, list) else v[index] for k, v in rollout.items()}


def concat(rollouts):
    return {k: sum((r[k] for r in rollouts), []) if isinstance(rollouts[0][k], list) else torch.cat([r[k] for r in rollouts])
            for k in rollouts[0]}


def sample_batch(iteration_seed):
    """This iteration's rollouts on this rank, and how many rollout batches they took. With
    dynamic_sampling (DAPO, Yu et al. 2025, section 3.2; verl's filter_groups), a group whose samples all
    scored the same is set aside (under a group baseline its advantages are all 0) and more
    prompts are sampled, until every rank holds batch_size varied groups or max_sampling_tries
    batches were generated; set-aside groups fill any places still empty (they carry only the KL
    term), so the batch keeps its shape and every rank makes the same number of steps."""
    if not dynamic_sampling:
        return generate_and_score(iteration_seed), 1
    kept, set_aside = [], []
    for attempt in range(max_sampling_tries):
        part = generate_and_score(iteration_seed + attempt)
        varied = rl.varied_groups(part['scores'], num_generations).tolist()
        kept.append(take_groups(part, [g for g, v in enumerate(varied) if v]))
        set_aside.append(take_groups(part, [g for g, v in enumerate(varied) if not v]))
        short = len(concat(kept)['batch']) < n_rollouts
        if common.sum_over_ranks(ctx, torch.tensor(float(short), device=device)).item() == 0:  # every rank is full
            break
    both = concat(kept + set_aside)
    return take_groups(both, range(batch_size)), attempt + 1


log, stop = common.start_logging(ctx, config, resume, iter_num, wandb_log, wandb_project, wandb_run_name)

# the training loop
iter_start, interrupted = iter_num, False
while True:
    lr = common.set_lr(optimizer, iter_num, config)

    # evaluate and checkpoint: no validation loss here, so ckpt.pt (the latest) is the product
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        common.log_eval(ctx, log, iter_num, evaluate())
        if iter_num > iter_start:
            common.save(ctx, state, None)
    if iter_num >= max_iters:
        break
    t0 = time.time()

    # 1-2. rollout and score: batch_size prompts x num_generations samples on this rank
    iteration_seed = seed + 1_000_003 * (iter_num + 1)
    rollout, n_tries = sample_batch(iteration_seed)
    batch, scores, verifiable = rollout['batch'], rollout['scores'], rollout['verifiable']
    query, query_pad, response, mask = layout(batch, rollout['responses'])  # (N, Tq), (N,), (N, R), (N, R)
    ids = torch.cat([query, response], dim=1)  # (N, L)
    Tq, L = query.size(1), ids.size(1)
    positions, attn_mask, _ = ragged_inputs(query_pad, L, L)  # per-row positions, pads hidden
    # the tokens the update learns from: a truncated response's are left out when asked (DAPO)
    loss_mask = rl.mask_truncated(mask, rollout['stopped']) if mask_truncated_completions else mask
    t_rollout = time.time() - t0

    # 3. log-probs under the policy as it is now (the update's starting point) and the reference.
    # With one optimizer step per batch and no critic, the policy the update starts from is the one
    # whose forward the update runs first: the old log-probs are that forward's, detached (ratio 1),
    # filled in below, and their separate forward is skipped (TRL's GRPO does the same when it
    # takes one step per generation): config/grpo_tiny.py 1.77 -> 1.40 s per iteration here.
    if single_step:
        old_logprobs, values = torch.zeros(mask.shape, device=device), None
    else:
        old_logprobs, values = forward_all(model, ids, positions, attn_mask, Tq)  # (N, R) each
    ref_logprobs = reference_logprobs(ids, positions, attn_mask, Tq)

    # 4. advantages
    if algorithm == 'ppo':
        rewards = -kl_coef_now * rl.kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * mask  # (N, R)
        rewards[torch.arange(len(ids), device=device), rl.last_token_index(mask)] += scores
        if whiten_rewards:
            rewards = rl.masked_whiten(rewards, mask, shift_mean=False, total=global_sum)
        advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
        advantages = rl.masked_whiten(advantages, mask, total=global_sum)
    elif advantage == 'group':
        advantages = rl.group_advantages(scores, num_generations, scale_rewards)[:, None] * mask  # (N, R)
    elif advantage == 'rloo':
        advantages = rl.rloo_advantages(scores, num_generations)[:, None] * mask
    else:  # reinforce_pp: over the tokens the loss sees, on every rank
        advantages = rl.reinforce_pp_advantages(scores, loss_mask, total=global_sum)

    # 5. the update: ppo_epochs passes over shuffled minibatches. The entropy (a pass over each
    # chunk's probabilities, and its gradient) only where the loss or this iteration's log needs it
    log_now = (iter_num + 1) % log_interval == 0 or iter_num + 1 >= max_iters
    with_entropy = bool(entropy_coef) or log_now
    shuffle = torch.Generator().manual_seed(iteration_seed)
    stats = {k: torch.zeros((), device=device) for k in ('approxkl', 'clipfrac', 'pg', 'vf', 'vf_clipfrac', 'entropy', 'ratio', 'tokens')}
    n_steps, stopped_early = 0, False
    for epoch in range(ppo_epochs):
        # its own stream: a shuffle of this rank's rows must not move the shared prompt stream
        order = torch.randperm(len(ids), generator=shuffle).to(device)
        for mb in order.split(minibatch_size):
            # what the minibatch's summed losses are divided by (rl.loss_normaliser): the same for
            # each of its micro-batches, so that their losses add up to the minibatch's
            norm = rl.loss_normaliser(loss_type, loss_mask[mb], len(mb), max_new_tokens, global_sum, ctx.world_size)
            mb_tokens, mb_kl = common.sum_over_ranks(ctx, loss_mask[mb].sum()) / ctx.world_size, torch.zeros((), device=device)
            micro_batches = mb.split(micro)
            for k, index in enumerate(micro_batches):
                common.sync_grads(ctx, model, k == len(micro_batches) - 1)
                m = loss_mask[index]
                with ctx.autocast:  # the log-probs and entropies (n, R) of the sampler's distribution
                    logprobs, entropy, vpred, aux_loss = model(ids[index], rows(positions, index),
                                                               rows(attn_mask, index), Tq, temperature, with_entropy)
                if single_step:  # the policy before the update is this forward's
                    old_logprobs[index] = logprobs.detach()
                pg, clipped = rl.policy_loss(logprobs, old_logprobs[index], advantages[index], clip_low, clip_high)
                loss = rl.aggregate(pg, m, loss_type, norm)
                if vpred is not None:
                    vf, vf_clipped = rl.value_loss(vpred, values[index], returns[index], cliprange_value)
                    loss = loss + vf_coef * rl.aggregate(vf, m, loss_type, norm)
                    stats['vf'] += (vf.detach() * m).sum()
                    stats['vf_clipfrac'] += (vf_clipped * m).sum()
                if algorithm == 'grpo' and kl_coef_now:
                    loss = loss + kl_coef_now * rl.aggregate(rl.kl_penalty(logprobs, ref_logprobs[index], kl_estimator),
                                                             m, loss_type, norm)
                if policy.config.n_experts:  # the load-balancing loss, per micro-batch of the minibatch
                    loss = loss + policy.config.moe_aux_loss_coef * aux_loss / len(micro_batches)
                if entropy_coef:
                    loss = loss - entropy_coef * rl.aggregate(entropy, m, loss_type, norm)
                ctx.scaler.scale(loss).backward()
                log_ratio = (logprobs - old_logprobs[index]).detach()
                approxkl = (0.5 * log_ratio ** 2 * m).sum()  # 0.5 (log r)^2, as TRL
                mb_kl += approxkl
                for name, x in (('approxkl', approxkl), ('clipfrac', (clipped * m).sum()), ('pg', (pg.detach() * m).sum()),
                                ('ratio', (log_ratio.exp() * m).sum()), ('tokens', m.sum())):
                    stats[name] += x
                if with_entropy:
                    stats['entropy'] += (entropy.detach() * m).sum()
            grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip)
            n_steps += 1
            if target_kl and mean_all(mb_kl / mb_tokens.clamp(min=1)) > target_kl:  # a host sync, only when asked for
                stopped_early = True
                if ctx.master:
                    print(f"early stop of the update after {n_steps} steps: approx KL past target_kl={target_kl}")
                break
        if stopped_early:
            break
    iter_num += 1
    # the sampling policy's KL to the reference (single step: its log-probs came from the update)
    kl = rl.kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * mask  # (N, R)

    # the adaptive KL controller sees this batch's mean per-sequence KL
    kl_per_seq = mean_all(kl.sum(1).mean())
    kl_coef_used = kl_coef_now
    if kl_target:
        kl_coef_now = rl.adaptive_kl_coef(kl_coef_now, kl_per_seq, kl_target, n_rollouts * ctx.world_size, kl_horizon)

    # log
    if log_now:
        n_tok = stats.pop('tokens').clamp(min=1)
        score_mean = mean_all(scores.mean())
        metrics = {
            'objective/kl': kl_per_seq,
            'objective/entropy': mean_all((-old_logprobs * mask).sum(1).mean()),
            'objective/non_score_reward': -kl_coef_used * kl_per_seq,
            'objective/rlhf_reward': score_mean - kl_coef_used * kl_per_seq,
            'objective/scores': score_mean,
            'objective/verifiable': mean_all(verifiable.mean()),  # exact-match rate of the samples
            'policy/approxkl_avg': mean_all(stats['approxkl'] / n_tok),
            'policy/clipfrac_avg': mean_all(stats['clipfrac'] / n_tok),
            'policy/entropy_avg': mean_all(stats['entropy'] / n_tok),
            'loss/policy_avg': mean_all(stats['pg'] / n_tok),
            'val/ratio': mean_all(stats['ratio'] / n_tok),
            'val/num_eos_tokens': mean_all(rollout['stopped'].float().sum()) * ctx.world_size,
            'val/response_length': mean_all(mask.float().sum(1).mean()),
            'kl_coef': kl_coef_used, 'lr': lr, 'update_steps': n_steps, 'early_stopped': float(stopped_early),
            'episode': iter_num * n_rollouts * ctx.world_size,
        }
        if algorithm == 'grpo' and num_generations > 1:  # the share of prompts whose samples all scored the same (no signal in a group baseline)
            metrics['val/frac_reward_zero_std'] = 1.0 - mean_all(rl.varied_groups(scores, num_generations).float().mean())
        if dynamic_sampling:
            metrics['rollout/tries'] = n_tries
        if algorithm == 'ppo':
            metrics.update({'loss/value_avg': mean_all(stats['vf'] / n_tok), 'val/clipfrac_avg': mean_all(stats['vf_clipfrac'] / n_tok)})
        if not all(math.isfinite(metrics[k]) for k in ('objective/scores', 'loss/policy_avg', 'objective/kl')):
            raise SystemExit(f"non-finite loss or reward at iteration {iter_num}: stopping; the last good checkpoint is intact")
        metrics['time/rollout_frac'] = t_rollout / (time.time() - t0)
        # response tokens of the batch (all ranks) per second of rollout (sampling and scoring)
        metrics['time/rollout_tok_s'] = mean_all(mask.float().sum()) * ctx.world_size / t_rollout
        common.log_step(ctx, log, iter_num, max_iters, metrics, common.step_time(log, iter_num),
                        (n_rollouts * ctx.world_size, 'rollouts'), show=CONSOLE_KEYS[algorithm])

    if stop.requested(ctx):
        common.save(ctx, state, None, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} iterations")
