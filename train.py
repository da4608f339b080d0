"""
Pretraining. On a laptop CPU:
    python prepare.py && python train.py config/pretrain_tiny.py
On 8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py

gradient_accumulation_steps is the total over all ranks (as in nanoGPT): each of N ranks runs
gradient_accumulation_steps / N micro-steps, so a run's batch and curve do not depend on N.
"""

import dataclasses
import json
import math
import os

import numpy as np
import torch

import common
from configurator import configure
from model import GPT, GPTConfig
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out'
init_from = 'scratch'  # 'scratch' | 'resume' (from out_dir) | path of another out_dir (weights only)
init_checkpoint = 'best'  # of another out_dir: 'best' (by val loss) | 'latest'
eval_interval = 250
log_interval = 10
eval_iters = 50
eval_only = False  # evaluate once and exit
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
# model: every field of GPTConfig in model.py but vocab_size (the tokenizer's, rounded up)
n_layer = 6
n_head = 6
n_kv_head = 0  # 0 = n_head
n_embd = 384
head_dim = 0  # 0 = n_embd // n_head
dropout = 0.0
bias = False
qkv_bias = False  # bias on the q, k, v projection only (Qwen2)
norm = 'rmsnorm'
norm_eps = 0.0  # 0 = 1e-6 for rmsnorm, 1e-5 for layernorm
pos = 'rope'
rope_theta = 10000.0
mlp = 'swiglu'
gelu_approximate = 'none'  # 'tanh' = GPT-2's original gelu
mlp_hidden = 0
qk_norm = False
tie_embeddings = True
n_experts = 0
n_experts_active = 2
moe_renormalize = True
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
compile_model = False  # torch.compile: faster steps after a ~20 s first compile
parallel = 'ddp'  # under torchrun: 'ddp' (every rank holds the whole model) | 'fsdp' (FSDP2: sharded over the ranks)
seed = 1337
peak_flops = 0.0  # for MFU; 0 = measure (CPU) or look up (GPU)
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

ctx = common.setup(device, dtype, seed, out_dir, gradient_accumulation_steps, parallel)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if ctx.master:
    print(f"tokens per iteration: {tokens_per_iter:,} ({gradient_accumulation_steps} accum x {batch_size} batch x {block_size} ctx); "
          f"{ctx.world_size} rank(s) on {ctx.device}, {ctx.dtype}")

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


def windows(data, ix):
    """Rows of (x, y) windows of block_size tokens starting at the offsets ix (batch_size,)."""
    chunk = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:]
    if ctx.device_type == 'cuda':  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(ctx.device, non_blocking=True), y.pin_memory().to(ctx.device, non_blocking=True)
    return x.to(ctx.device), y.to(ctx.device)


def get_batches(split, generator, n_micro):
    """n_micro micro-batches of (x, y), each (batch_size, block_size), at random offsets.
    Every rank draws the offsets of the whole iteration from the same generator and keeps its own
    share, so N ranks see exactly the batches one process with N-times the accumulation would."""
    data = open_split(split)
    ix = torch.randint(len(data) - block_size - 1, (n_micro * ctx.world_size, batch_size), generator=generator)
    return [windows(data, rows) for rows in ix[ctx.rank * n_micro:(ctx.rank + 1) * n_micro]]


data_generator = torch.Generator().manual_seed(seed)

# model: from scratch, resumed from out_dir, or initialised from another run's weights
iter_num, best_val_loss, evals_without_improvement, ckpt, parent = 0, float('inf'), 0, None, None
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(GPTConfig) if f.name != 'vocab_size'}
model_args['vocab_size'] = 64 * math.ceil(tokenizer.n_vocab / 64)  # a multiple of 64 runs faster
if init_from == 'scratch':
    model = GPT(GPTConfig(**model_args))
else:
    ckpt, parent = common.start_from(ctx, init_from, init_checkpoint)
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
model.to(ctx.device)
common.shard(ctx, model)  # FSDP only
if ctx.master:
    print(f"model: {model.get_num_params() / 1e6:.2f}M non-embedding parameters "
          f"({model.get_num_active_params() / 1e6:.2f}M active per token), init_from={init_from}")

# optimizer (and its state when resuming)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = common.adamw(params, learning_rate, weight_decay, (beta1, beta2), ctx.device_type)
if init_from == 'resume':
    iter_num, best_val_loss = common.resume_training(ctx, ckpt, optimizer, data_generator)
    evals_without_improvement = ckpt.get('evals_without_improvement', 0)
ckpt = None  # free the memory
raw_model = model
model = common.wrap(ctx, model, compile_model)


@torch.no_grad()
def estimate_loss():
    """Mean loss per split over eval_iters fixed batches (the same at every eval, so the numbers
    compare), shared out between ranks and summed back."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        data = open_split(split)
        ix = torch.randint(len(data) - block_size - 1, (eval_iters, batch_size), generator=torch.Generator().manual_seed(seed + 1))
        total = torch.zeros(2, device=ctx.device)  # (sum of losses, count)
        for rows, weight in common.rank_share(ctx, ix):
            with ctx.autocast:
                _, loss = model(*windows(data, rows))
            total += weight * torch.stack([loss.float(), torch.ones((), device=ctx.device)])
        total = common.sum_over_ranks(ctx, total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    bpb = out['val'] / math.log(2) / bytes_per_token if bytes_per_token else float('nan')
    return {'val/loss': out['val'], 'val/bpb': bpb, 'val/train_split_loss': out['train']}


def state():
    return common.checkpoint(ctx, 'pretrain', common.model_state(ctx, raw_model), model_args, tokenizer, config, parent, dataset,
                             optimizer, iter_num, data_generator,
                             evals_without_improvement=evals_without_improvement)


log, stop = common.start_logging(ctx, config, init_from == 'resume', iter_num, wandb_log, wandb_project, wandb_run_name)
if ctx.master and peak_flops == 0.0:
    peak_flops = common.measure_peak_flops(ctx.device_type, ctx.dtype)
    print(f"matmul peak for MFU: {peak_flops / 1e9:,.0f} GFLOP/s ({ctx.dtype})" if peak_flops else "MFU: unknown GPU peak")

# the training loop
iter_start, running_mfu, interrupted = iter_num, -1.0, False
while True:
    lr = common.set_lr(optimizer, iter_num, config)

    # evaluate, checkpoint, maybe stop early
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        metrics = estimate_loss()
        if not (init_from == 'resume' and iter_num == iter_start):  # a resume re-evaluates the saved weights
            evals_without_improvement = 0 if metrics['val/loss'] < best_val_loss else evals_without_improvement + 1
        best_val_loss = common.after_eval(ctx, log, iter_num, metrics, best_val_loss, iter_num > iter_start, state)
        if early_stop_patience and evals_without_improvement >= early_stop_patience:
            if ctx.master:
                print(f"early stop: val loss has not improved for {early_stop_patience} evals")
            break
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step: forward/backward over the micro-batches, clip, step
    loss_sum, aux_sum = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device)
    for micro_step, (x, y) in enumerate(get_batches('train', data_generator, ctx.accum_per_rank)):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        with ctx.autocast:
            _, loss, aux = model(x, y, return_aux=True)
            loss = loss / ctx.accum_per_rank
        ctx.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        aux_sum += aux.detach() / ctx.accum_per_rank
    grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip)
    iter_num += 1

    # log: the host syncs only every log_interval steps
    if iter_num % log_interval == 0:
        train_loss, aux_loss = common.mean_over_ranks(ctx, torch.stack([loss_sum, aux_sum])).tolist()
        dt = common.step_time(log, iter_num)
        if peak_flops and iter_num - iter_start >= 2 * log_interval:  # skip the compile/warm-up steps
            mfu = raw_model.estimate_mfu(tokens_per_iter // ctx.world_size, dt, peak_flops)  # per rank
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        metrics = {'train/loss': train_loss, **({'train/aux_loss': aux_loss} if n_experts else {}),
                   'train/grad_norm': grad_norm.item(), 'lr': lr, 'train/mfu': max(running_mfu, 0) * 100}
        common.log_step(ctx, log, iter_num, max_iters, metrics, dt, (tokens_per_iter, 'tok'))

    # Ctrl-C / SIGTERM: save and leave cleanly
    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps, best val loss {best_val_loss:.4f}")
