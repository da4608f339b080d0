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
"""

import json
import math
import os
import sys
import random
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import tasks
from rewardmodel import RewardModel, bradley_terry_loss, load_pairs, reward_metrics

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-reward'
init_from = 'out-sft'  # an SFT (or pretrain, or reward) out_dir; 'resume' continues out_dir
eval_interval = 100
log_interval = 10
eval_pairs = 1000  # held-out pairs scored at each eval (all of them when fewer)
always_save_checkpoint = False
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
# optimizer
batch_size = 16  # pairs per micro-batch per rank (two rows each)
gradient_accumulation_steps = 1  # total over ranks
max_iters = 300
learning_rate = 1e-4  # the head alone; config/reward_tiny.py (head + lm_coef) needs 3e-5
min_lr = 1e-5
warmup_iters = 20
lr_decay_iters = 300
lr_schedule = 'cosine'
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0
# system
device = 'auto'
dtype = 'auto'
compile = False
seed = 1337
exec(open('configurator.py').read())
# -----------------------------------------------------------------------------

# distributed setup and device
ddp, rank, local_rank, world_size, device = common.setup_distributed(device)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
assert gradient_accumulation_steps % world_size == 0
accum_per_rank = gradient_accumulation_steps // world_size
torch.manual_seed(seed + rank)
autocast, scaler, dtype = common.autocast_context(device_type, dtype)
if master:
    os.makedirs(out_dir, exist_ok=True)

# model and tokenizer: the backbone of the previous stage and a new head, or all resumed
resume = init_from == 'resume'
ckpt = common.load_checkpoint(out_dir if resume else init_from)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
tokenizer = common.tokenizer_from_checkpoint(ckpt)
model = RewardModel(common.model_from_checkpoint(ckpt, dropout=dropout), lm_coef)
if 'reward_head' in ckpt:  # resuming, or going on from another reward model
    model.head.load_state_dict(ckpt['reward_head'])
    if ckpt.get('reward_lm_coef', 0.0) != lm_coef:  # the head was trained beside another log-likelihood term
        source = out_dir if resume else init_from
        message = f"{source} was trained with lm_coef={ckpt.get('reward_lm_coef', 0.0)}, this run has {lm_coef}"
        if resume:
            raise SystemExit(f"{message}: resume with the same --lm_coef")
        print(f"note: {message}; the head starts from the old one")
if max_seq_len > model.backbone.config.block_size:
    raise SystemExit(f"max_seq_len={max_seq_len} exceeds the model's block_size {model.backbone.config.block_size}")
if freeze_backbone:
    model.backbone.requires_grad_(False)
if not model.backbone.config.tie_embeddings and not lm_coef:
    model.backbone.lm_head.requires_grad_(False)  # unused here (and DDP rejects unused parameters)
model.to(device)
model_args = model.backbone.config.to_dict()
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
if master:
    print(f"reward model from {init_from} ({ckpt.get('stage', '?')} stage): "
          f"{model.backbone.get_num_params() / 1e6:.2f}M params, training {n_train / 1e6:.3f}M"
          + (' (head only)' if freeze_backbone else ''))

# data: pairs -> right-padded [chosen, rejected] rows, built once


def load_splits():
    """(train pairs, held-out pairs). A bad line stops here with its file, line and field."""
    try:
        if pref_files:
            pairs = [p for path in pref_files.split(',') for p in load_pairs(path.strip(), skip_bad_lines)]
            random.Random(seed).shuffle(pairs)
            n_val = max(1, int(len(pairs) * val_fraction))
            return pairs[n_val:], pairs[:n_val]
        task_dir = tasks.ensure_tasks(os.path.join(data_root, 'tasks'))  # generated once, offline
        return (load_pairs(os.path.join(task_dir, 'pref_train.jsonl')),
                load_pairs(os.path.join(task_dir, 'pref_test.jsonl')))
    except data.DataError as e:
        raise SystemExit(f"bad preference data: {e}") from None


def build(pairs):
    ids, prompt_len, length, kept = common.encode_pairs(tokenizer, pairs, max_seq_len)
    margin = torch.tensor([pairs[i]['margin'] if use_margin else 0.0 for i in kept])
    return {'ids': ids, 'prompt_len': prompt_len, 'length': length, 'longest': length.max(1).values, 'margin': margin,
            'task': [pairs[i]['task'] for i in kept], 'dropped': len(pairs) - len(kept)}


train_pairs, val_pairs = load_splits()
train, val = build(train_pairs), build(val_pairs)
if master:
    print(f"reward data: {len(train['ids']):,} train pairs, {len(val['ids']):,} held out; "
          f"{train['dropped'] + val['dropped']:,} dropped (longer than max_seq_len={max_seq_len}); "
          f"{int(train['length'].sum()):,} train tokens")
if len(train['ids']) == 0 or len(val['ids']) == 0:
    which = 'training' if len(train['ids']) == 0 else 'held-out'
    raise SystemExit(f"no {which} pair fits in max_seq_len={max_seq_len}: raise it (up to the block_size)")


def pair_batch(split, rows):
    """Rows (B,) of a split -> ids (2B, T): B chosen then B rejected, T = the longest of them;
    last (2B,) the index of each row's last real token; response_mask (2B, T) True on the
    answer's tokens; margin (B,)."""
    T = int(split['length'][rows].max())  # a CPU tensor: no device sync
    ids = split['ids'][rows, :, :T].transpose(0, 1).reshape(-1, T)  # (2B, T)
    length = split['length'][rows].T.reshape(-1)  # (2B,)
    pos = torch.arange(T)
    response_mask = (pos >= split['prompt_len'][rows].repeat(2)[:, None]) & (pos < length[:, None])
    return ids.to(device), (length - 1).to(device), response_mask.to(device), split['margin'][rows].to(device)


def get_batches(split, step, n_micro):
    """This rank's n_micro micro-batches of optimizer step `step`, grouped by length (random
    batches of these pairs would be padded to 3x their tokens)."""
    first = (step * world_size + rank) * n_micro
    return [pair_batch(split, common.length_grouped_batch(split['longest'], batch_size, first + j, seed))
            for j in range(n_micro)]


def pair_rewards(m, ids, last, response_mask):
    """(r_chosen (B,), r_rejected (B,), MoE aux loss) in one forward pass."""
    with autocast:
        rewards, aux_loss = m(ids, last, response_mask=response_mask)
    r_chosen, r_rejected = rewards.chunk(2)
    return r_chosen, r_rejected, aux_loss


def loss_fn(r_chosen, r_rejected, margin, aux_loss):
    loss = bradley_terry_loss(r_chosen, r_rejected, margin, center_rewards_coef)
    if model_args['n_experts']:
        loss = loss + model_args['moe_aux_loss_coef'] * aux_loss
    return loss


# optimizer
iter_num, best_val_loss = 0, float('inf')
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')
if resume:
    optimizer.load_state_dict(ckpt['optimizer'])
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    common.set_rng_state(ckpt['rng'], torch.Generator())  # dropout's; batches are a function of the step
ckpt = None

# compile, then wrap in DDP
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def evaluate():
    """Loss and TRL's metrics on the held-out pairs (the same pairs on every rank, in order),
    and accuracy per task when the data names tasks."""
    model.eval()
    n = min(eval_pairs, len(val['ids']))
    rows = val['longest'][:n].argsort()  # by length: little padding
    chosen, rejected = [], []
    for r in rows.split(2 * batch_size):
        ids, last, response_mask, _ = pair_batch(val, r)
        r_chosen, r_rejected, _ = pair_rewards(raw_model, ids, last, response_mask)
        chosen.append(r_chosen)
        rejected.append(r_rejected)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    metrics = {'val/loss': bradley_terry_loss(chosen, rejected, val['margin'][rows].to(device), center_rewards_coef)}
    metrics.update({f'val/{k}': v for k, v in reward_metrics(chosen, rejected).items()})
    correct = (chosen > rejected).cpu()
    row_tasks = [val['task'][i] for i in rows.tolist()]
    for task in sorted({t for t in row_tasks if t}):
        on_task = torch.tensor([t == task for t in row_tasks])
        metrics[f'val/accuracy_{task}'] = correct[on_task].float().mean()
    model.train()
    return {k: float(v) for k, v in metrics.items()}


def save(reason):
    state = {'model': raw_model.backbone.state_dict(), 'reward_head': raw_model.head.state_dict(),
             'reward_lm_coef': lm_coef, 'optimizer': optimizer.state_dict(), 'model_args': model_args,
             'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config, 'tokenizer': tokenizer.spec,
             'tokenizer_identity': tokenizer.identity, 'rng': common.rng_state(torch.Generator()), 'stage': 'reward',
             'dataset': pretrain_dataset}
    common.save_checkpoint(state, os.path.join(out_dir, 'ckpt.pt'))
    print(f"saved checkpoint to {out_dir}/ckpt.pt at step {iter_num} ({reason})")


if master:
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
wandb_run = common.init_wandb(wandb_log and master, wandb_project, wandb_run_name, config)
stop_flag = common.StopFlag()

# the training loop
t_start = t_last = time.time()
iter_start, saved = iter_num, False
history_path = os.path.join(out_dir, 'history.jsonl')
interrupted = False
while True:
    lr = common.get_lr(iter_num, learning_rate, min_lr, warmup_iters, lr_decay_iters, lr_schedule)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # evaluate and checkpoint
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        metrics = evaluate()
        if master:
            print(f"step {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            with open(history_path, 'a') as f:
                f.write(json.dumps({'iter': iter_num, **metrics, 'time': time.time() - t_start}) + '\n')
            if wandb_run:
                wandb_run.log(metrics, step=iter_num)
        if not math.isfinite(metrics['val/loss']):
            raise SystemExit(f"val loss is {metrics['val/loss']} at step {iter_num}; the last good checkpoint "
                             f"in {out_dir} was kept. Lower learning_rate or raise warmup_iters.")
        improved = metrics['val/loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val/loss'])
        last_eval = iter_num >= max_iters
        if master and iter_num > iter_start and (improved or always_save_checkpoint or (last_eval and not saved)):
            save('val loss improved' if improved else 'always_save_checkpoint' if always_save_checkpoint else 'final')
            saved = True
    if iter_num >= max_iters:
        break

    # one optimizer step over the micro-batches
    sums = torch.zeros(3, device=device)  # loss, accuracy, margin
    for micro_step, (ids, last, response_mask, margin) in enumerate(get_batches(train, iter_num, accum_per_rank)):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum_per_rank - 1
        r_chosen, r_rejected, aux_loss = pair_rewards(model, ids, last, response_mask)
        loss = loss_fn(r_chosen, r_rejected, margin, aux_loss) / accum_per_rank
        scaler.scale(loss).backward()
        stats = reward_metrics(r_chosen.detach(), r_rejected.detach())
        sums += torch.stack([loss.detach() * accum_per_rank, stats['accuracy'], stats['margin']]) / accum_per_rank
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # log (the only host sync of a step, and only every log_interval steps)
    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(sums)
            sums /= world_size
        train_loss, accuracy, margin = sums.tolist()
        if not math.isfinite(train_loss):
            raise SystemExit(f"train loss is {train_loss} at step {iter_num}: stopping; the last good checkpoint in "
                             f"{out_dir} is intact. Lower learning_rate or raise warmup_iters.")
        dt = (time.time() - t_last) / log_interval
        t_last = time.time()
        if master:
            pairs_per_s = gradient_accumulation_steps * batch_size / dt
            print(f"iter {iter_num}: loss {train_loss:.4f}, accuracy {accuracy * 100:.1f}%, margin {margin:.3f}, "
                  f"lr {lr:.2e}, {dt * 1000:.0f} ms/step, {pairs_per_s:,.0f} pairs/s, "
                  f"eta {common.format_eta((max_iters - iter_num) * dt)}")
            if wandb_run:
                wandb_run.log({'train/loss': train_loss, 'train/accuracy': accuracy, 'train/margin': margin, 'lr': lr},
                              step=iter_num)

    if stop_flag.should_stop(ddp, device):
        if master:
            save('interrupted')
        interrupted = True
        break

if master:
    print(f"done: {iter_num} steps in {time.time() - t_start:.1f} s, best val loss {best_val_loss:.4f}")
    if wandb_run:
        wandb_run.finish()
common.cleanup_distributed(ddp)
if interrupted:
    sys.exit(130)  # saved, but not finished: a pipeline must not take this stage as done
