"""
Supervised fine-tuning on chat data: the loss is on assistant tokens only (content + <|im_end|>).
    python sft.py config/sft_tiny.py                       # from out-tiny, on the built-in task suite
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_small.py

Batches are padded (one conversation per row) or packed (several per row, each attending only to
itself, with its own positions): packing wastes no compute on pads and gives every conversation
the same loss it has alone. lora_rank > 0 trains low-rank adapters only; checkpoints always hold
the merged weights (any script can load them) and, with LoRA, the adapters too.
"""

import json
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import evals
import tasks
from lora import apply_lora, lora_state_dict, merged_state_dict

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-sft'
init_from = 'out-tiny'  # a pretrain (or earlier SFT) out_dir; 'resume' continues out_dir
eval_interval = 100
log_interval = 10
eval_iters = 20  # held-out loss batches
eval_items_per_task = 100  # held-out items per task for generation metrics (0 = skip)
always_save_checkpoint = False
wandb_log = False
wandb_project = 'mini-llm'
wandb_run_name = 'sft'
# data
sft_files = ''  # comma-separated chat JSONL files; '' = the built-in task suite (data/tasks)
sft_weights = ''  # comma-separated mixing weights, one per file ('' = as they come)
data_root = 'data'
val_fraction = 0.05  # held out from sft_files (the task suite has its own test split)
skip_bad_lines = False
max_seq_len = 256  # conversations are cut here; one left with no assistant token is dropped
packing = True
drop_turns_prob = 0.0  # augmentation: chance to cut a conversation after a random assistant turn
system_prompt_rate = 0.0  # augmentation: chance to prepend a random generic system prompt
# LoRA
lora_rank = 0  # 0 = full fine-tuning
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'c_attn,c_proj,c_fc'
# optimizer
batch_size = 16  # rows per micro-batch per rank
gradient_accumulation_steps = 1  # total over ranks
max_iters = 1000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 1000
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

SYSTEM_PROMPTS = ['You are a helpful assistant.', 'Answer briefly.', 'You are a concise, friendly assistant.']

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

# model and tokenizer: from the previous stage, or resumed
resume = init_from == 'resume'
ckpt = common.load_checkpoint(out_dir if resume else init_from)
base_dir = ckpt['config'].get('init_from', init_from) if resume and lora_rank else None
tokenizer = common.tokenizer_from_checkpoint(ckpt)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
if resume and lora_rank:  # LoRA resumes from the base weights plus the saved adapters
    base = common.load_checkpoint(base_dir)
    model = common.model_from_checkpoint(base, dropout=dropout)
else:
    model = common.model_from_checkpoint(ckpt, dropout=dropout)
if max_seq_len > model.config.block_size:
    raise SystemExit(f"max_seq_len={max_seq_len} is longer than the model's context ({model.config.block_size})")
if lora_rank:
    n_train = apply_lora(model, lora_rank, lora_alpha, lora_targets.split(','), lora_dropout)
    if resume:  # the adapters must match this run's lora_targets/rank exactly
        unexpected = model.load_state_dict(ckpt['lora'], strict=False).unexpected_keys
        missing = [k for k in model.state_dict() if 'lora_' in k and k not in ckpt['lora']]
        if unexpected or missing:
            raise SystemExit(f"the LoRA adapters in {out_dir} do not fit lora_targets={lora_targets!r}, "
                             f"lora_rank={lora_rank}: resume with the settings of the first run")
else:
    n_train = sum(p.numel() for p in model.parameters())
model.to(device)
model_args = model.config.to_dict()
if master:
    print(f"model from {init_from}: {model.get_num_params() / 1e6:.2f}M params, training {n_train / 1e6:.3f}M"
          f"{f' (LoRA rank {lora_rank})' if lora_rank else ''}")

# data: conversations -> (ids, targets) with targets -1 where nothing is learned


def load_conversations():
    """(train conversations, held-out conversations, held-out task items for generation)."""
    if sft_files:
        # each file split on its own (seeded), before weighting: val draws from every file and no
        # upsampled copy of a val conversation lands in train
        files = sft_files.split(',')
        weights = [float(w) for w in sft_weights.split(',')] if sft_weights else [1.0] * len(files)
        assert len(weights) == len(files), f"{len(files)} sft_files but {len(weights)} sft_weights"
        train, val = [], []
        for path, weight in zip(files, weights):
            convs = data.load_sft([path], skip_bad_lines=skip_bad_lines)
            order = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
            n_val = max(1, int(len(convs) * val_fraction))
            val += [convs[i] for i in order[:n_val]]
            whole, frac = int(weight), weight - int(weight)
            keep = [convs[i] for i in order[n_val:]]
            train += keep * whole + keep[:round(frac * len(keep))]
        return train, val, []
    task_dir = tasks.ensure_tasks(os.path.join(data_root, 'tasks'))  # generated once, offline
    train = data.load_sft([os.path.join(task_dir, 'sft_train.jsonl')])
    test = data.load_sft([os.path.join(task_dir, 'sft_test.jsonl')])
    return train, test, tasks.heldout(task_dir)


def augment(convs, rng):
    """The seed's augmentations, drawn once (seeded): with drop_turns_prob a copy cut after a
    random assistant turn is added (the whole conversation stays too); with system_prompt_rate
    a generic system prompt is put in front."""
    out = []
    for conv in convs:
        ends = [i + 1 for i, m in enumerate(conv) if m['role'] == 'assistant'][:-1]
        if drop_turns_prob and ends and torch.rand((), generator=rng) < drop_turns_prob:
            out.append(conv[:ends[int(torch.randint(len(ends), (), generator=rng))]])
        if system_prompt_rate and conv[0]['role'] != 'system' and torch.rand((), generator=rng) < system_prompt_rate:
            conv = [{'role': 'system', 'content': SYSTEM_PROMPTS[int(torch.randint(len(SYSTEM_PROMPTS), (), generator=rng))]}] + conv
        out.append(conv)
    return out


def build_rows(convs):
    """Conversations -> packed/padded rows; those left with no assistant token are dropped and counted."""
    encoded = [common.encode_conversation(tokenizer, c, max_seq_len) for c in convs]
    kept = [e for e in encoded if e is not None]
    return (*common.pack_rows(kept, max_seq_len, tokenizer.pad_id, packing), len(encoded) - len(kept), len(kept))


rng = torch.Generator().manual_seed(seed)
train_convs, val_convs, task_items = load_conversations()
train_ids, train_tgt, train_doc, dropped, kept = build_rows(augment(train_convs, rng))
val_ids, val_tgt, val_doc, _, _ = build_rows(val_convs)  # held out as it is
if master:
    print(f"sft data: {kept:,} conversations -> {len(train_ids):,} rows of {max_seq_len} "
          f"({'packed' if packing else 'padded'}); {dropped:,} dropped (no assistant token left after truncation); "
          f"{(train_tgt != -1).sum().item():,} supervised tokens; {len(val_convs):,} held out")
if kept == 0:
    raise SystemExit("no training conversation has an assistant token within max_seq_len")


def get_batch(ids, tgt, doc, generator, n_micro):
    """n_micro micro-batches of rows; every rank draws the same indices and keeps its share."""
    ix = torch.randint(len(ids), (n_micro * world_size, batch_size), generator=generator)[rank * n_micro:(rank + 1) * n_micro]
    return [(ids[r].to(device), tgt[r].to(device), doc[r].to(device)) for r in ix]


def forward(m, x, y, d):
    positions, mask = common.packed_attention(d) if packing else (None, None)
    with autocast:
        return m(x, y, positions=positions, attn_mask=mask)[1]


# optimizer
iter_num, best_val_loss = 0, float('inf')
data_generator = torch.Generator().manual_seed(seed)
params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if resume:
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    common.set_rng_state(ckpt['rng'], data_generator)
    if ddp:  # only rank 0's state was saved: give each rank its own dropout stream again
        torch.manual_seed(seed + rank + iter_num)
ckpt = None

# compile, then wrap in DDP
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


@torch.no_grad()
def evaluate():
    """Held-out loss on assistant tokens, then task metrics by greedy generation."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    losses = [forward(model, x, y, d) for x, y, d in get_batch(val_ids, val_tgt, val_doc, generator, eval_iters)]
    val_loss = torch.stack(losses).mean()
    if ddp:
        torch.distributed.all_reduce(val_loss)
        val_loss /= world_size
    metrics = {'val/loss': val_loss.item()}
    if eval_items_per_task and task_items and master:
        metrics.update(evals.task_metrics(raw_model, tokenizer, task_items, eval_items_per_task))
    model.train()
    return metrics


def save(reason):
    state = {'model': merged_state_dict(raw_model) if lora_rank else raw_model.state_dict(),
             'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'model_args': model_args, 'iter_num': iter_num,
             'best_val_loss': best_val_loss, 'config': config, 'tokenizer': tokenizer.spec,
             'tokenizer_identity': tokenizer.identity, 'rng': common.rng_state(data_generator), 'stage': 'sft',
             'dataset': pretrain_dataset}
    if lora_rank:
        state['lora'] = lora_state_dict(raw_model)
        state['config'] = dict(config, init_from=base_dir or init_from)
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
            raise SystemExit(f"val loss is {metrics['val/loss']} at step {iter_num}; the last good checkpoint was kept")
        improved = metrics['val/loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val/loss'])
        if master and iter_num > iter_start and (improved or always_save_checkpoint or (iter_num >= max_iters and not saved)):
            save('val loss improved' if improved else 'always_save_checkpoint' if always_save_checkpoint else 'final')
            saved = True
    if iter_num >= max_iters:
        break

    # one optimizer step over the micro-batches
    loss_sum = torch.zeros((), device=device)
    for micro_step, (x, y, d) in enumerate(get_batch(train_ids, train_tgt, train_doc, data_generator, accum_per_rank)):
        if ddp:
            model.require_backward_grad_sync = micro_step == accum_per_rank - 1
        loss = forward(model, x, y, d) / accum_per_rank
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # log
    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            raise SystemExit(f"train loss is {train_loss} at step {iter_num}: stopping; the last good checkpoint is intact")
        dt = (time.time() - t_last) / log_interval
        t_last = time.time()
        if master:
            tokens = gradient_accumulation_steps * batch_size * max_seq_len
            print(f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/step, {tokens / dt:,.0f} tok/s, "
                  f"eta {common.format_eta((max_iters - iter_num) * dt)}")

    if (not ddp or iter_num % log_interval == 0) and stop_flag.should_stop(ddp, device):
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
