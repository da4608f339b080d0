"""
Pretraining. On a laptop CPU:
    python prepare.py && python train.py config/pretrain_tiny.py
On 8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py

gradient_accumulation_steps is the total over all ranks (as in nanoGPT): each of N ranks runs
gradient_accumulation_steps / N micro-steps, so a run's batch and curve do not depend on N.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig
from tokenizer import Tokenizer
import common

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch' | 'resume' (from out_dir) | path of another out_dir (weights only)
eval_interval = 250
log_interval = 10
eval_iters = 50
eval_only = False  # evaluate once and exit
always_save_checkpoint = False  # save every eval, not only when val loss improves
early_stop_patience = 0  # stop after this many evals without val improvement (0 = never)
# logging
wandb_log = False
wandb_project = 'mini-llm'
wandb_run_name = 'pretrain'
# data
dataset = 'stdlib'  # reads data/<dataset>/{train,val}.bin and meta.json, written by prepare.py
data_root = 'data'
gradient_accumulation_steps = 1
batch_size = 16  # micro-batch size per rank
block_size = 256
# model (see GPTConfig in model.py for what each means)
n_layer = 6
n_head = 6
n_kv_head = 0  # 0 = n_head
n_embd = 384
dropout = 0.0
bias = False
norm = 'rmsnorm'
pos = 'rope'
rope_theta = 10000.0
mlp = 'swiglu'
mlp_hidden = 0
qk_norm = False
tie_embeddings = True
n_experts = 0
n_experts_active = 2
n_shared_experts = 0
moe_aux_loss_coef = 0.01
moe_capacity_factor = 1.25
grad_checkpoint = False
# optimizer
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
# learning rate schedule
lr_schedule = 'cosine'  # 'cosine' | 'wsd' (warmup-stable-decay) | 'constant'
warmup_iters = 100
lr_decay_iters = 5000  # usually = max_iters
min_lr = 6e-5  # usually learning_rate / 10
wsd_decay_frac = 0.2  # wsd: fraction of lr_decay_iters spent decaying
# system
device = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = 'auto'  # 'auto' (bf16 on capable GPUs, fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False  # torch.compile the model: faster steps after a ~20 s first compile
seed = 1337
peak_flops = 0.0  # for MFU; 0 = measure (CPU) or look up (GPU)
exec(open('configurator.py').read())  # overrides from the command line or a config file
# -----------------------------------------------------------------------------

# distributed setup and device
ddp, rank, local_rank, world_size, device = common.setup_distributed(device)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
assert gradient_accumulation_steps % world_size == 0, \
    f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the number of ranks ({world_size})"
accum_per_rank = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
torch.manual_seed(seed + rank)  # dropout differs per rank; data sampling below does not
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
autocast, scaler, dtype = common.autocast_context(device_type, dtype)
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} accum x {batch_size} batch x {block_size} ctx); "
          f"{world_size} rank(s) on {device}, {dtype}")

# data: memmaps re-opened per batch (a long-lived np.memmap keeps growing resident memory)
data_path = os.path.join(data_root, dataset)
meta_path = os.path.join(data_path, 'meta.json')
if not os.path.exists(meta_path):
    raise SystemExit(f"{meta_path} not found: run `python prepare.py --dataset={dataset}` first")
with open(meta_path) as f:
    meta = json.load(f)
tokenizer = Tokenizer.load(os.path.join(data_path, meta['tokenizer']))
bytes_per_token = meta['val_bytes'] / meta['val_tokens'] if meta.get('val_bytes') else None


def open_split(split):
    return np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=np.dtype(meta['dtype']), mode='r')


for split in ('train', 'val'):
    if len(open_split(split)) <= block_size + 1:
        raise SystemExit(f"{data_path}/{split}.bin has {len(open_split(split))} tokens, too few for block_size={block_size}")


def get_batches(split, generator, n_micro):
    """n_micro micro-batches of (x, y), each (batch_size, block_size), at random offsets.
    Every rank draws the offsets of the whole iteration from the same generator and keeps its own
    share, so N ranks see exactly the batches one process with N-times the accumulation would."""
    data = open_split(split)
    ix = torch.randint(len(data) - block_size - 1, (n_micro * world_size, batch_size), generator=generator)
    batches = []
    for rows in ix[rank * n_micro:(rank + 1) * n_micro]:
        chunk = np.stack([data[i:i + block_size + 1] for i in rows.tolist()]).astype(np.int64)
        x, y = torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])
        if device_type == 'cuda':  # pinned memory lets the copy overlap with compute
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        batches.append((x, y))
    return batches


data_generator = torch.Generator().manual_seed(seed)

# model: from scratch, resumed from out_dir, or initialised from another run's weights
model_args = dict(vocab_size=64 * math.ceil(tokenizer.n_vocab / 64),  # a multiple of 64 runs faster
                  block_size=block_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                  dropout=dropout, bias=bias, norm=norm, pos=pos, rope_theta=rope_theta, mlp=mlp,
                  mlp_hidden=mlp_hidden, qk_norm=qk_norm, tie_embeddings=tie_embeddings, n_experts=n_experts,
                  n_experts_active=n_experts_active, n_shared_experts=n_shared_experts,
                  moe_aux_loss_coef=moe_aux_loss_coef, moe_capacity_factor=moe_capacity_factor,
                  grad_checkpoint=grad_checkpoint)
iter_num, best_val_loss, evals_without_improvement, ckpt = 0, float('inf'), 0, None
if init_from == 'scratch':
    model = GPT(GPTConfig(**model_args))
else:
    ckpt = common.load_checkpoint(out_dir if init_from == 'resume' else init_from, device='cpu')
    if ckpt['tokenizer'] != tokenizer.spec:
        raise SystemExit(f"the checkpoint in {init_from} was trained with a different tokenizer than {data_path}")
    # the architecture comes from the checkpoint; settings that do not change weights from here
    model_args = dict(ckpt['model_args'], dropout=dropout, grad_checkpoint=grad_checkpoint,
                      moe_aux_loss_coef=moe_aux_loss_coef, moe_capacity_factor=moe_capacity_factor)
    model = common.model_from_checkpoint(ckpt, **model_args)
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
        model_args['block_size'] = block_size
    elif block_size > model.config.block_size:
        raise SystemExit(f"block_size={block_size} is longer than the checkpoint's context ({model.config.block_size}); "
                         f"use --block_size={model.config.block_size} or less")
    if init_from == 'resume':
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        evals_without_improvement = ckpt.get('evals_without_improvement', 0)
        common.set_rng_state(ckpt['rng'], data_generator)
        if ddp:  # only rank 0's state was saved: give each rank its own dropout stream again
            torch.manual_seed(seed + rank + iter_num)
model.to(device)
if master:
    print(f"model: {model.get_num_params() / 1e6:.2f}M non-embedding parameters "
          f"({model.get_num_active_params() / 1e6:.2f}M active per token), init_from={init_from}")

# optimizer (and its state when resuming)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])  # fp16: the loss scale it had reached
ckpt = None  # free the memory

# compile, then wrap in DDP
raw_model = model
if compile:
    if master:
        print("compiling the model (the first step takes a while)...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def eval_batches(split):
    """eval_iters fixed batches (the same at every eval, so the numbers are comparable)."""
    data = open_split(split)
    generator = torch.Generator().manual_seed(seed + 1)
    ix = torch.randint(len(data) - block_size - 1, (eval_iters, batch_size), generator=generator)
    for rows in ix:
        chunk = np.stack([data[i:i + block_size + 1] for i in rows.tolist()]).astype(np.int64)
        yield torch.from_numpy(chunk[:, :-1]).to(device), torch.from_numpy(chunk[:, 1:]).to(device)


@torch.no_grad()
def estimate_loss():
    """Mean loss per split over the eval batches, shared out between ranks and summed back."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        for i, (x, y) in enumerate(eval_batches(split)):
            if i % world_size == rank:
                with autocast:
                    _, loss = model(x, y)
                total += torch.stack([loss.float(), torch.ones((), device=device)])
        if ddp:
            torch.distributed.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def lr_at(it):
    return common.get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, lr_schedule, wsd_decay_frac)


def save(reason):
    """Atomic checkpoint of everything a resume needs, so the loss curve continues exactly."""
    common.save_checkpoint({
        'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num, 'best_val_loss': best_val_loss, 'evals_without_improvement': evals_without_improvement,
        'config': config, 'tokenizer': tokenizer.spec, 'tokenizer_identity': tokenizer.identity,
        'rng': common.rng_state(data_generator), 'stage': 'pretrain', 'dataset': dataset,
    }, os.path.join(out_dir, 'ckpt.pt'))
    print(f"saved checkpoint to {out_dir}/ckpt.pt at step {iter_num} ({reason})")


# logging
if master:
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
wandb_run = common.init_wandb(wandb_log and master, wandb_project, wandb_run_name, config)
stop_flag = common.StopFlag()
if master and peak_flops == 0.0:
    peak_flops = common.measure_peak_flops(device_type, dtype)
    print(f"matmul peak for MFU: {peak_flops / 1e9:,.0f} GFLOP/s ({dtype})" if peak_flops else "MFU: unknown GPU peak")

# the training loop
t_start = t_last = time.time()
iter_start, running_mfu, saved = iter_num, -1.0, False
history_path = os.path.join(out_dir, 'history.jsonl')
interrupted = False
while True:
    lr = lr_at(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # evaluate, checkpoint, maybe stop early
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        bpb = losses['val'] / math.log(2) / bytes_per_token if bytes_per_token else float('nan')
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val bpb {bpb:.4f}")
            with open(history_path, 'a') as f:
                f.write(json.dumps({'iter': iter_num, 'train_loss': losses['train'], 'val_loss': losses['val'],
                                    'val_bpb': bpb, 'time': time.time() - t_start}) + '\n')
            if wandb_run:
                wandb_run.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'],
                               'val/bpb': bpb, 'lr': lr, 'mfu': running_mfu * 100}, step=iter_num)
        if not math.isfinite(losses['val']):
            raise SystemExit(f"val loss is {losses['val']} at step {iter_num}; the last good checkpoint in {out_dir} "
                             "was kept. Lower learning_rate, raise warmup_iters, or use dtype=bfloat16/float32.")
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        evals_without_improvement = 0 if improved else evals_without_improvement + 1
        # save when val improves; always at the last step if this run has saved nothing yet
        last_eval = iter_num >= max_iters or 0 < early_stop_patience <= evals_without_improvement
        if master and iter_num > iter_start and (improved or always_save_checkpoint or (last_eval and not saved)):
            save('val loss improved' if improved else 'always_save_checkpoint' if always_save_checkpoint else 'final')
            saved = True
        if early_stop_patience and evals_without_improvement >= early_stop_patience:
            if master:
                print(f"early stop: val loss has not improved for {early_stop_patience} evals")
            break
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step: forward/backward over the micro-batches, clip, step
    batches = get_batches('train', data_generator, accum_per_rank)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(batches):
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro_step == accum_per_rank - 1
        with autocast:
            _, loss, aux = model(x, y, return_aux=True)
            loss = loss / accum_per_rank
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        aux_sum += aux.detach() / accum_per_rank
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    # log: the host syncs only every log_interval steps
    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world_size
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            raise SystemExit(f"train loss is {train_loss} at step {iter_num}: stopping without saving; the last good "
                             f"checkpoint in {out_dir} is intact. Lower learning_rate or raise warmup_iters.")
        dt = (time.time() - t_last) / log_interval
        t_last = time.time()
        if master:
            if peak_flops and iter_num - iter_start >= 2 * log_interval:  # skip the compile/warm-up steps
                mfu = raw_model.estimate_mfu(tokens_per_iter // world_size, dt, peak_flops)  # per rank
                running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            eta = common.format_eta((max_iters - iter_num) * dt)
            moe = f", aux {aux_sum.item():.3f}" if n_experts else ''
            print(f"iter {iter_num}: loss {train_loss:.4f}{moe}, lr {lr:.2e}, {dt * 1000:.0f} ms/step, "
                  f"{tokens_per_iter / dt:,.0f} tok/s, mfu {max(running_mfu, 0) * 100:.1f}%, eta {eta}")
            if wandb_run:
                wandb_run.log({'train/loss_step': train_loss, 'lr': lr, 'tok_per_s': tokens_per_iter / dt}, step=iter_num)

    # Ctrl-C / SIGTERM: save and leave cleanly (under DDP the ranks agree at log steps: a sync)
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
