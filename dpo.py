"""
Direct preference optimisation: the policy (from an SFT out_dir) learns to prefer the chosen
answer of each pair over the rejected one more than a frozen reference (the starting policy)
does, with no reward model and no sampling (dpo_loss.py has the losses and their sources).
    python dpo.py config/dpo_tiny.py                  # from out-sft, on the built-in task suite
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out-sft --pref_files=prefs.jsonl

Sequence log-probs are summed over the answer tokens only (the prompt is masked), chosen and
rejected rows in one forward pass. precompute_ref_logps scores every pair under the reference
once, before training, and frees it: no second model in memory and no reference forward per
step. Either way the reference is the init_from checkpoint, on resume too.
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
import evals
import tasks
from dpo_loss import LOSS_TYPES, answer_targets, dpo_loss, preference_metrics, rpo_nll, sequence_logps
from rewardmodel import load_pairs

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-dpo'
init_from = 'out-sft'  # an SFT out_dir: the starting policy and the reference; 'resume' continues out_dir
eval_interval = 100
log_interval = 10
eval_pairs = 1000  # held-out pairs scored at each eval (all of them when fewer)
eval_items_per_task = 100  # held-out task items for generation metrics (0 = skip)
always_save_checkpoint = False
wandb_log = False
wandb_project = 'mini-llm'
wandb_run_name = 'dpo'
# data
pref_files = ''  # comma-separated preference JSONL files; '' = the built-in task suite (data/tasks)
data_root = 'data'
val_fraction = 0.05  # held out from pref_files (the task suite has its own test split)
skip_bad_lines = False
max_seq_len = 256  # prompt + answer; a longer pair is dropped (cutting could cut what tells them apart)
# DPO
beta = 0.1  # the KL leash to the reference: lower lets the policy move further from it
loss_type = 'sigmoid'  # 'sigmoid' (DPO) | 'ipo' | 'hinge'
label_smoothing = 0.0  # conservative DPO (sigmoid only): the assumed chance that a label is wrong
rpo_alpha = 0.0  # > 0 adds alpha * NLL of the chosen answers (RPO), so their likelihood does not sink
precompute_ref_logps = True  # score the reference once, then free it; False keeps it in memory
# optimizer
batch_size = 16  # pairs per micro-batch per rank (two rows each)
gradient_accumulation_steps = 1  # total over ranks
max_iters = 300
learning_rate = 3e-5  # 60x the 5e-7 of 7B recipes; at MiniMind's 4e-8 the loss is still 0.69 after 200 steps
min_lr = 3e-6
warmup_iters = 20
lr_decay_iters = 300
lr_schedule = 'cosine'
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0  # > 0 makes policy and reference differ at step 0
# system
device = 'auto'
dtype = 'auto'
compile = False
seed = 1337
exec(open('configurator.py').read())
# -----------------------------------------------------------------------------

if loss_type not in LOSS_TYPES:
    raise SystemExit(f"loss_type={loss_type!r}: use one of {', '.join(LOSS_TYPES)} (label_smoothing > 0 with "
                     f"'sigmoid' is conservative DPO)")
if label_smoothing and loss_type != 'sigmoid':
    raise SystemExit(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")

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

# policy, reference and tokenizer: the reference is always the checkpoint the run started from
resume = init_from == 'resume'
ckpt = common.load_checkpoint(out_dir if resume else init_from)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
ref_dir = ckpt['config']['init_from'] if resume else init_from
tokenizer = common.tokenizer_from_checkpoint(ckpt)
model = common.model_from_checkpoint(ckpt, dropout=dropout).to(device)
ref_ckpt = common.load_checkpoint(ref_dir) if resume else ckpt
ref_model = common.model_from_checkpoint(ref_ckpt).to(device).eval().requires_grad_(False)
ref_ckpt = None
if max_seq_len > model.config.block_size:
    raise SystemExit(f"max_seq_len={max_seq_len} exceeds the model's block_size {model.config.block_size}")
model_args = model.config.to_dict()
if master:
    stage = ckpt.get('stage', '?')
    print(f"policy from {init_from} ({stage} stage), reference {ref_dir}: {model.get_num_params() / 1e6:.2f}M params"
          + ("; note: DPO usually starts from an SFT model" if stage == 'pretrain' else ''))

# data: pairs -> right-padded [chosen, rejected] rows with targets on the answer tokens only


def load_splits():
    """(train pairs, held-out pairs, held-out task items for generation). A bad line stops here
    with its file, line and field."""
    try:
        if pref_files:
            pairs = [p for path in pref_files.split(',') for p in load_pairs(path.strip(), skip_bad_lines)]
            random.Random(seed).shuffle(pairs)
            n_val = max(1, int(len(pairs) * val_fraction))
            return pairs[n_val:], pairs[:n_val], {}
        task_dir = tasks.ensure_tasks(os.path.join(data_root, 'tasks'))  # generated once, offline
        return (load_pairs(os.path.join(task_dir, 'pref_train.jsonl')),
                load_pairs(os.path.join(task_dir, 'pref_test.jsonl')), tasks.heldout(task_dir))
    except data.DataError as e:
        raise SystemExit(f"bad preference data: {e}") from None


def build(pairs):
    """ids (N, 2, L); targets (N, 2, L): the next token where it is an answer token, else -1."""
    ids, prompt_len, length, kept = common.encode_pairs(tokenizer, pairs, max_seq_len)
    targets = answer_targets(ids, prompt_len[:, None], length)  # (N, 2, L)
    return {'ids': ids, 'targets': targets, 'length': length, 'longest': length.max(1).values,
            'task': [pairs[i]['task'] for i in kept], 'dropped': len(pairs) - len(kept)}


train_pairs, val_pairs, task_items = load_splits()
train, val = build(train_pairs), build(val_pairs)
if master:
    print(f"dpo data: {len(train['ids']):,} train pairs, {len(val['ids']):,} held out; "
          f"{train['dropped'] + val['dropped']:,} dropped (longer than max_seq_len={max_seq_len}); "
          f"{int((train['targets'] != -1).sum()):,} answer tokens")
if len(train['ids']) == 0 or len(val['ids']) == 0:
    which = 'training' if len(train['ids']) == 0 else 'held-out'
    raise SystemExit(f"no {which} pair fits in max_seq_len={max_seq_len}: raise it (up to the block_size)")


def pair_batch(split, rows):
    """Rows (B,) of a split -> ids, targets (2B, T): B chosen then B rejected, T = the longest."""
    T = int(split['length'][rows].max())  # a CPU tensor: no device sync
    ids = split['ids'][rows, :, :T].transpose(0, 1).reshape(-1, T)  # (2B, T)
    targets = split['targets'][rows, :, :T].transpose(0, 1).reshape(-1, T)
    return rows, ids.to(device), targets.to(device)


def get_batches(split, step, n_micro):
    """This rank's n_micro micro-batches of optimizer step `step`, grouped by length (random
    batches of these pairs would be padded to 3x their tokens)."""
    first = (step * world_size + rank) * n_micro
    return [pair_batch(split, common.length_grouped_batch(split['longest'], batch_size, first + j, seed))
            for j in range(n_micro)]


def logps(m, ids, targets):
    """Summed answer log-probs under m: (chosen (B,), rejected (B,), MoE aux loss), one forward."""
    with autocast:
        logits, _, aux_loss = m(ids, return_aux=True)
    chosen, rejected = sequence_logps(logits, targets).chunk(2)
    return chosen, rejected, aux_loss


@torch.no_grad()
def reference_logps(split, rows, ids, targets):
    """The reference's (chosen, rejected) log-probs: looked up when precomputed, else a forward."""
    if 'ref' in split:
        ref = split['ref'][rows].to(device)  # (B, 2)
        return ref[:, 0], ref[:, 1]
    return logps(ref_model, ids, targets)[:2]


if precompute_ref_logps:
    t0 = time.time()
    for split in (train, val):
        ref = torch.zeros(len(split['ids']), 2)
        for rows in split['longest'].argsort().split(2 * batch_size):  # by length: little padding
            ref[rows] = torch.stack(reference_logps(split, *pair_batch(split, rows)), 1).cpu()
        split['ref'] = ref  # (N, 2)
    ref_model = None  # freed: the lookup table replaces it
    if master:
        n_pairs = len(train['ids']) + len(val['ids'])
        print(f"reference log-probs of {n_pairs:,} pairs precomputed in {time.time() - t0:.1f} s")


def loss_fn(batch):
    """DPO loss on one micro-batch (+ RPO term, + MoE aux) and the TRL metrics."""
    rows, ids, targets = batch
    chosen, rejected, aux_loss = logps(model, ids, targets)
    ref_chosen, ref_rejected = reference_logps(train, rows, ids, targets)
    loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing).mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * rpo_nll(chosen, (targets[:len(rows)] != -1).sum())
    if model_args['n_experts']:
        loss = loss + model_args['moe_aux_loss_coef'] * aux_loss
    return loss, preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta)


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
    then task metrics by greedy generation (arith_acc, identity_acc, ...)."""
    model.eval()
    n = min(eval_pairs, len(val['ids']))
    order = val['longest'][:n].argsort()  # by length: little padding
    parts = []
    for rows in order.split(2 * batch_size):
        rows, ids, targets = pair_batch(val, rows)
        parts.append(torch.stack([*logps(raw_model, ids, targets)[:2], *reference_logps(val, rows, ids, targets)], 1))
    chosen, rejected, ref_chosen, ref_rejected = torch.cat(parts).unbind(1)
    four = (chosen, rejected, ref_chosen, ref_rejected)
    metrics = {'val/loss': dpo_loss(*four, beta, loss_type, label_smoothing).mean()}
    metrics.update({f'val/{k}': v for k, v in preference_metrics(*four, beta).items()})
    correct = (chosen - ref_chosen > rejected - ref_rejected).cpu()
    row_tasks = [val['task'][i] for i in order.tolist()]
    for task in sorted({t for t in row_tasks if t}):
        metrics[f'val/rewards/accuracies_{task}'] = correct[torch.tensor([t == task for t in row_tasks])].float().mean()
    metrics = {k: float(v) for k, v in metrics.items()}
    if eval_items_per_task and task_items and master:
        metrics.update(evals.task_metrics(raw_model, tokenizer, task_items, eval_items_per_task))
    model.train()
    return metrics


def save(reason):
    state = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
             'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': dict(config, init_from=ref_dir),
             'tokenizer': tokenizer.spec, 'tokenizer_identity': tokenizer.identity,
             'rng': common.rng_state(torch.Generator()), 'stage': 'dpo',
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
                             f"in {out_dir} was kept. Lower learning_rate or raise beta.")
        improved = metrics['val/loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val/loss'])
        last_eval = iter_num >= max_iters
        if master and iter_num > iter_start and (improved or always_save_checkpoint or (last_eval and not saved)):
            save('val loss improved' if improved else 'always_save_checkpoint' if always_save_checkpoint else 'final')
            saved = True
    if iter_num >= max_iters:
        break

    # one optimizer step over the micro-batches
    sums = torch.zeros(4, device=device)  # loss, rewards/accuracies, rewards/margins, logps/chosen
    for micro_step, batch in enumerate(get_batches(train, iter_num, accum_per_rank)):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum_per_rank - 1
        loss, stats = loss_fn(batch)
        scaler.scale(loss / accum_per_rank).backward()
        sums += torch.stack([loss.detach(), stats['rewards/accuracies'], stats['rewards/margins'],
                             stats['logps/chosen']]) / accum_per_rank
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
        train_loss, accuracy, margin, logp_chosen = sums.tolist()
        if not math.isfinite(train_loss):
            raise SystemExit(f"train loss is {train_loss} at step {iter_num}: stopping; the last good checkpoint in "
                             f"{out_dir} is intact. Lower learning_rate or raise beta.")
        dt = (time.time() - t_last) / log_interval
        t_last = time.time()
        if master:
            pairs_per_s = gradient_accumulation_steps * batch_size / dt
            print(f"iter {iter_num}: loss {train_loss:.4f}, rewards/accuracies {accuracy * 100:.1f}%, rewards/margins "
                  f"{margin:.3f}, logps/chosen {logp_chosen:.2f}, lr {lr:.2e}, {dt * 1000:.0f} ms/step, "
                  f"{pairs_per_s:,.0f} pairs/s, eta {common.format_eta((max_iters - iter_num) * dt)}")
            if wandb_run:
                wandb_run.log({'train/loss': train_loss, 'train/rewards/accuracies': accuracy,
                               'train/rewards/margins': margin, 'train/logps/chosen': logp_chosen, 'lr': lr},
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
