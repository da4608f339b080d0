"""
Reward modelling on preference pairs: a backbone from an SFT (or pretrain) out_dir and a scalar
head read at the last real token (rewardmodel.py), plus lm_coef times the backbone's mean
log-likelihood of the response, trained with the Bradley-Terry loss so that the chosen answer
scores above the rejected one.
    python reward.py config/reward_tiny.py            # from out-sft, on the built-in task suite
    torchrun --standalone --nproc_per_node=8 reward.py --init_from=out-sft --pref_files=prefs.jsonl

The checkpoint is the usual one (the backbone in 'model') plus 'reward_head', stage 'reward':
rewardmodel.load_reward_model(out_dir) loads it and rewardmodel.score() scores pairs (ppo.py).
Batches put the chosen and rejected rows of every pair in one forward pass, right-padded to the
longest row of the batch; pairs of similar length are batched together, so little is padding.
lora_rank > 0 trains low-rank adapters on the backbone (lora.py) and the head in full; the
checkpoint holds the merged backbone in 'model' (ppo.py and load_reward_model read it unchanged)
and the adapters in 'lora' (to resume).
"""

import torch

import common
import preference
from configurator import configure
from lora import add_lora, check_resume, checkpoint_weights, load_adapters
from rewardmodel import RewardModel, bradley_terry_loss, reward_metrics

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-reward'
init_from = 'out-sft'  # an SFT (or pretrain, or reward) out_dir; 'resume' continues out_dir
init_checkpoint = 'best'  # of init_from: 'best' (by val loss) | 'latest'
eval_interval = 100
log_interval = 10
eval_pairs = 1000  # held-out pairs scored at each eval (all of them when fewer)
wandb_log = False
wandb_project = 'mini-llm'
wandb_run_name = 'reward'
# data
pref_files = ''  # comma-separated preference JSONL files; '' = the built-in task suite (data/tasks)
data_root = 'data'
val_fraction = 0.05  # held out from pref_files (the task suite has its own test split)
skip_bad_lines = False
max_seq_len = 256  # prompt + answer; a longer pair is dropped (cutting could cut what tells them apart)
# loss
use_margin = True  # subtract each pair's "margin" field (0 when absent) inside the sigmoid
center_rewards_coef = 0.0  # > 0 keeps rewards near mean 0 (TRL suggests 0.01); a steadier scale for PPO
lm_coef = 0.0  # > 0 adds lm_coef * mean log p(response) to the head's reward (SimPO's implicit reward)
freeze_backbone = False  # train the head only: a linear probe on the SFT model's features
# LoRA (the keys of sft.py): adapters on the backbone, the head trained in full
lora_rank = 0  # 0 = the whole backbone trains
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'c_attn,c_proj,c_fc'
# optimizer
batch_size = 16  # pairs per micro-batch per rank (two rows each)
gradient_accumulation_steps = 1  # total over ranks
max_iters = 300
learning_rate = 1e-4  # the head alone; config/reward_tiny.py (head + lm_coef) needs 3e-5
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 300
lr_schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant'
wsd_decay_frac = 0.2  # wsd: fraction of lr_decay_iters spent decaying
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0
# system
device = 'auto'
dtype = 'auto'
compile_model = False
parallel = 'ddp'  # under torchrun: 'ddp' (every rank holds the whole model) | 'fsdp' (FSDP2: sharded over the ranks)
seed = 1337
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

ctx = common.setup(device, dtype, seed, out_dir, gradient_accumulation_steps, parallel)

# model and tokenizer: the backbone of the previous stage and a new head, or all resumed
resume = init_from == 'resume'
ckpt, parent = common.start_from(ctx, init_from, init_checkpoint)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
tokenizer = common.tokenizer_from_checkpoint(ckpt)
if resume:
    check_resume(ckpt, lora_rank, out_dir)
if freeze_backbone and lora_rank:
    raise SystemExit("freeze_backbone=True trains the head alone: set lora_rank=0 (or leave freeze_backbone off)")
# LoRA resumes from the base weights (the parent) plus the saved adapters; 'model' holds them merged
base = common.load_checkpoint(parent) if resume and lora_rank else ckpt
model = RewardModel(common.model_from_checkpoint(base, dropout=dropout), lm_coef)
add_lora(model.backbone, lora_rank, lora_alpha, lora_targets, lora_dropout)  # the head stays trainable
if resume and lora_rank:
    load_adapters(model.backbone, ckpt['lora'], out_dir)
if 'reward_head' in ckpt:  # resuming, or going on from another reward model
    model.head.load_state_dict(ckpt['reward_head'])
    if ckpt.get('reward_lm_coef', 0.0) != lm_coef:  # the head was trained beside another log-likelihood term
        message = f"{out_dir if resume else init_from} was trained with lm_coef={ckpt.get('reward_lm_coef', 0.0)}, this run has {lm_coef}"
        if resume:
            raise SystemExit(f"{message}: resume with the same --lm_coef")
        print(f"note: {message}; the head starts from the old one")
if max_seq_len > model.backbone.config.block_size:
    raise SystemExit(f"max_seq_len={max_seq_len} exceeds the model's block_size {model.backbone.config.block_size}")
if freeze_backbone:
    model.backbone.requires_grad_(False)
if not model.backbone.config.tie_embeddings and not lm_coef:
    model.backbone.lm_head.requires_grad_(False)  # unused here (and DDP rejects unused parameters)
model.to(ctx.device)
common.shard(ctx, model)  # FSDP only
model_args = model.backbone.config.to_dict()
params = [p for p in model.parameters() if p.requires_grad]
if ctx.master:
    print(f"reward model from {init_from} ({ckpt.get('stage', '?')} stage): "
          f"{model.backbone.get_num_params() / 1e6:.2f}M params, training {sum(p.numel() for p in params) / 1e6:.3f}M"
          + (' (head only)' if freeze_backbone else f' (LoRA rank {lora_rank} + head)' if lora_rank else ''))

# data: pairs -> right-padded [chosen, rejected] rows, built once (preference.py)
train_pairs, val_pairs, _ = preference.load_splits(pref_files, data_root, val_fraction, seed, skip_bad_lines)
train, val = preference.encode_splits(ctx, tokenizer, train_pairs, val_pairs, max_seq_len, 'reward')
if not use_margin:
    train['margin'].zero_(), val['margin'].zero_()


def pair_rewards(m, batch):
    """(r_chosen (B,), r_rejected (B,), MoE aux loss) of a batch, in one forward pass; each row's
    reward is read at its last real token."""
    rows, ids, prompt_len, length = batch
    with ctx.autocast:
        rewards, aux_loss = m(ids, length - 1, response_mask=preference.response_mask(ids, prompt_len, length))
    r_chosen, r_rejected = rewards.chunk(2)
    return r_chosen, r_rejected, aux_loss


def loss_fn(batch):
    """Bradley-Terry loss on one micro-batch (+ MoE aux) and TRL's metrics."""
    r_chosen, r_rejected, aux_loss = pair_rewards(model, batch)
    loss = bradley_terry_loss(r_chosen, r_rejected, train['margin'][batch[0]].to(ctx.device), center_rewards_coef)
    if model_args['n_experts']:
        loss = loss + model_args['moe_aux_loss_coef'] * aux_loss
    return loss, reward_metrics(r_chosen.detach(), r_rejected.detach())


# optimizer (and its state when resuming)
iter_num, best_val_loss = 0, float('inf')
optimizer = common.adamw(params, learning_rate, weight_decay, (beta1, beta2), ctx.device_type)
if resume:
    # batches are a function of the step: no data generator to restore
    iter_num, best_val_loss = common.resume_training(ctx, ckpt, optimizer)
ckpt = base = None
raw_model = model
model = common.wrap(ctx, model, compile_model)


@torch.no_grad()
def evaluate():
    """Loss and TRL's metrics on the held-out pairs (the same pairs on every rank, in order),
    and accuracy per task when the data names tasks."""
    model.eval()
    batches = preference.eval_batches(val, eval_pairs, batch_size, ctx.device)
    chosen, rejected = (torch.cat(x) for x in zip(*[pair_rewards(raw_model, b)[:2] for b in batches]))
    rows = torch.cat([b[0] for b in batches])
    loss = bradley_terry_loss(chosen, rejected, val['margin'][rows].to(ctx.device), center_rewards_coef)
    metrics = {'val/loss': loss, **{f'val/{k}': v for k, v in reward_metrics(chosen, rejected).items()}}
    model.train()
    return {**{k: float(v) for k, v in metrics.items()},
            **preference.accuracy_by_task(chosen > rejected, val, rows, 'val/accuracy_')}


def state():
    backbone = common.model_state(ctx, raw_model.backbone)
    weights, lora = checkpoint_weights(raw_model.backbone, backbone, lora_rank)
    return common.checkpoint(ctx, 'reward', weights, model_args, tokenizer, config, parent, pretrain_dataset, optimizer,
                             iter_num, reward_head=common.model_state(ctx, raw_model.head), reward_lm_coef=lm_coef, **lora)


log, stop = common.start_logging(ctx, config, resume, iter_num, wandb_log, wandb_project, wandb_run_name)

# the training loop
iter_start, interrupted = iter_num, False
while True:
    lr = common.set_lr(optimizer, iter_num, config)

    # evaluate and checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        best_val_loss = common.after_eval(ctx, log, iter_num, evaluate(), best_val_loss, iter_num > iter_start, state)
    if iter_num >= max_iters:
        break

    # one optimizer step over the micro-batches
    sums = torch.zeros(3, device=ctx.device)  # loss, accuracy, margin
    for micro_step, batch in enumerate(preference.train_batches(ctx, train, iter_num, batch_size)):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        loss, stats = loss_fn(batch)
        ctx.scaler.scale(loss / ctx.accum_per_rank).backward()
        sums += torch.stack([loss.detach(), stats['accuracy'], stats['margin']]) / ctx.accum_per_rank
    grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip)
    iter_num += 1

    # log (the only host sync of a step, and only every log_interval steps)
    if iter_num % log_interval == 0:
        train_loss, accuracy, margin = common.mean_over_ranks(ctx, sums).tolist()
        metrics = {'train/loss': train_loss, 'train/accuracy': accuracy, 'train/margin': margin,
                   'train/grad_norm': grad_norm.item(), 'lr': lr}
        common.log_step(ctx, log, iter_num, max_iters, metrics, common.step_time(log, iter_num),
                        (gradient_accumulation_steps * batch_size, 'pairs'))

    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps, best val loss {best_val_loss:.4f}")
