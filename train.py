"""
Pretraining. On a laptop CPU:
    python prepare.py && python train.py config/pretrain_tiny.py
On 8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py

gradient_accumulation_steps is the total over all ranks (as in nanoGPT): each of N ranks runs
gradient_accumulation_steps / N micro-steps, so a run's batch and curve do not depend on N.
"""

import dataclasses
import functools
import json
import math
import os

import numpy as np
import torch

import common
import corpus
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
dataset = 'stdlib'  # reads data/<dataset>/: meta.json and the token shards it lists, written by prepare.py
data_root = 'data'
gradient_accumulation_steps = 1
batch_size = 16  # micro-batch size per rank
block_size = 256
# rows: how training rows are cut from the token stream and drawn (docs/data.md, "Rows of tokens")
doc_mask = False  # attention stays inside each document of a row (block-diagonal), positions restart at each document
align_to_docs = False  # rows start where a document starts (or every block_size tokens into a longer one), not anywhere
sampling = 'random'  # 'random': row starts drawn with replacement | 'epoch': every row once per epoch, shuffled, resumable
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
optim = 'adamw'  # 'adamw' | 'muon' (Muon on the blocks' weight matrices, AdamW on the rest)
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

# data: the token shards prepare.py wrote (or train.bin/val.bin of an older dataset), memory-mapped
# afresh per batch (a long-lived np.memmap keeps growing resident memory). A row never spans two
# shards. Row starts are positions in the split's shards laid end to end.
data_path = os.path.join(data_root, dataset)
meta_path = os.path.join(data_path, 'meta.json')
if not os.path.exists(meta_path):
    raise SystemExit(f"{meta_path} not found: run `python prepare.py --dataset={dataset}` first")
with open(meta_path) as f:
    meta = json.load(f)
tokenizer = Tokenizer.load(os.path.join(data_path, meta['tokenizer']))
bytes_per_token = meta['val_bytes'] / meta['val_tokens'] if meta.get('val_bytes') else None
shards = {split: corpus.token_shards(data_path, meta, split) for split in ('train', 'val')}  # [(path, tokens)]
shard_starts = {split: np.cumsum([0] + [n for _, n in s])[:-1] for split, s in shards.items()}


def open_shard(split, k):
    return np.memmap(shards[split][k][0], dtype=np.dtype(meta['dtype']), mode='r')


def per_shard(split, count):
    """count(tokens) for each shard of split, and where each shard's share starts (int64 arrays)."""
    counts = np.array([max(0, count(n)) for _, n in shards[split]], np.int64)
    return counts, np.cumsum(counts) - counts


def to_position(split, counts, firsts, index, scale=1):
    """The i-th of per_shard's things (a row start or a window) -> its start position in split: shard
    k's share begins at firsts[k]; the j-th of its share is at shard_starts[k] + j * scale."""
    k = np.searchsorted(firsts + counts, index, side='right')  # the shard each index falls in
    return shard_starts[split][k] + (index - firsts[k]) * scale


# rows anywhere: start i is valid while a whole row (block_size + 1 tokens) fits in i's shard
anywhere = {split: per_shard(split, lambda n: n - block_size - 1) for split in ('train', 'val')}
for split in ('train', 'val'):
    if anywhere[split][0].sum() == 0:
        raise SystemExit(f"{data_path}: no {split} shard has more than block_size + 1 = {block_size + 1} tokens "
                         f"({', '.join(f'{os.path.basename(p)} {n:,}' for p, n in shards[split])})")


if sampling not in ('random', 'epoch'):
    raise SystemExit(f"sampling={sampling!r}: use 'random' (row starts drawn with replacement) or 'epoch'")
bos_id = meta.get('bos_id', tokenizer.eot_id)  # every document starts with it (prepare.py)


def document_rows(tokens):
    """The row starts of align_to_docs in one shard (an int64 array): every document's start (its
    bos token) and, in a document longer than a row, every block_size tokens after it. Rows at
    document starts alone would never train on the rest of a long document (on stdlib at
    block_size 256: 96% of the tokens). A row whose document ends early runs on into the next ones.
    Only starts with a whole row (block_size + 1 tokens) left in the shard."""
    # 1) document starts: the bos positions, scanned in chunks (the memmap is never read whole);
    #    0 as well: a shard may start inside a document (and an old split without a bos)
    chunk = 1 << 24
    docs = np.unique(np.concatenate([[0]] + [np.flatnonzero(tokens[i:i + chunk] == bos_id) + i
                                             for i in range(0, len(tokens), chunk)]))
    # 2) each document cut into pieces of block_size tokens, from its start
    pieces = -(-np.diff(np.append(docs, len(tokens))) // block_size)  # per document, rounded up
    piece = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # 0, 1, .. within its document
    starts = np.repeat(docs, pieces) + block_size * piece
    return starts[starts <= len(tokens) - block_size - 1]


# align_to_docs: where rows may start, per split, as positions. An epoch's rows: those, or the
# non-overlapping windows i * block_size of each train shard
aligned = {split: np.concatenate([document_rows(open_shard(split, k)) + shard_starts[split][k]
                                  for k in range(len(shards[split]))])
           for split in ('train', 'val')} if align_to_docs else None
windows_per_shard = per_shard('train', lambda n: (n - 1) // block_size)
epoch_rows = len(aligned['train']) if align_to_docs else int(windows_per_shard[0].sum())
rows_per_iter = gradient_accumulation_steps * batch_size  # drawn by all ranks together
if ctx.master and (align_to_docs or doc_mask or sampling == 'epoch'):
    print(f"rows: {'at document starts' if align_to_docs else 'anywhere'}, attention "
          f"{'within each document' if doc_mask else 'across documents'}, {sampling} sampling; "
          f"{epoch_rows:,} rows per epoch ({epoch_rows / rows_per_iter:,.1f} iterations)")


def random_starts(split, shape, generator, at_docs):
    """Row starts (shape) drawn with replacement from `generator`: anywhere, or at the aligned starts.
    (One shard: the draws of a single train.bin, so older runs continue as they were.)"""
    if at_docs:
        return torch.from_numpy(aligned[split])[torch.randint(len(aligned[split]), shape, generator=generator)]
    counts, firsts = anywhere[split]
    index = torch.randint(int(counts.sum()), shape, generator=generator)
    return torch.from_numpy(to_position(split, counts, firsts, index.numpy()))


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    """The order of the rows in `epoch`: a permutation seeded by (seed, epoch), the same on every rank."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(epoch_rows))


def epoch_starts(position, shape):
    """Row starts (shape) at `position`, position + 1, ... of the epoch stream, in which epoch e
    (positions e * n .. e * n + n - 1, n = epoch_rows) holds every row once, in epoch_order(e)."""
    count = math.prod(shape)
    first, last = position // epoch_rows, (position + count - 1) // epoch_rows
    skip = position - first * epoch_rows
    rows = torch.cat([epoch_order(e) for e in range(first, last + 1)])[skip:skip + count].numpy()
    starts = aligned['train'][rows] if align_to_docs else to_position('train', *windows_per_shard, rows, block_size)
    return torch.from_numpy(starts).view(shape)


def windows(split, ix, masked):
    """Rows of (x, y) windows of block_size tokens starting at the positions ix (batch_size,) of
    split, and the model's keyword arguments for them: with `masked` (doc_mask), the positions and
    the block-diagonal causal mask that keep each row's documents apart, as SFT's packing does.
    These depend on the row, so they are built per batch (on the device: a cumsum and a comparison)."""
    ix = ix.numpy() if torch.is_tensor(ix) else np.asarray(ix)
    k = np.searchsorted(shard_starts[split], ix, side='right') - 1  # the shard of each row
    maps = {s: open_shard(split, s) for s in np.unique(k).tolist()}
    local = ix - shard_starts[split][k]  # the row's start in its shard
    rows = [maps[s][i:i + block_size + 1] for s, i in zip(k.tolist(), local.tolist())]
    chunk = torch.from_numpy(np.stack(rows).astype(np.int64))
    x, y = chunk[:, :-1], chunk[:, 1:]
    if ctx.device_type == 'cuda':  # pinned memory lets the copy overlap with compute
        x, y = x.pin_memory().to(ctx.device, non_blocking=True), y.pin_memory().to(ctx.device, non_blocking=True)
    else:
        x, y = x.to(ctx.device), y.to(ctx.device)
    if not masked:
        return x, y, {}
    # a document runs from its bos to the next; tokens before a row's first bos end an earlier one
    positions, attn_mask = common.packed_attention(torch.cumsum(x == bos_id, dim=1))  # (B, T), (B, 1, T, T)
    return x, y, {'positions': positions, 'attn_mask': attn_mask}


def get_batches(split, generator, n_micro, position):
    """n_micro micro-batches of (x, y, model kwargs), each (batch_size, block_size). Every rank
    draws the row starts of the whole iteration and keeps its own share, so N ranks see exactly the
    batches one process with N-times the accumulation would: 'random' from `generator`, 'epoch' the
    rows at `position` of the epoch stream."""
    shape = (n_micro * ctx.world_size, batch_size)
    ix = epoch_starts(position, shape) if sampling == 'epoch' else random_starts(split, shape, generator, align_to_docs)
    return [windows(split, rows, doc_mask) for rows in ix[ctx.rank * n_micro:(ctx.rank + 1) * n_micro]]


data_generator = torch.Generator().manual_seed(seed)

# model: from scratch, resumed from out_dir, or initialised from another run's weights
iter_num, best_val_loss, evals_without_improvement, ckpt, parent = 0, float('inf'), 0, None, None
data_position = 0  # sampling='epoch': rows drawn so far by all ranks, the place in the epoch stream
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
optimizer = common.build_optimizer(ctx, optim, model, params, learning_rate, weight_decay, (beta1, beta2))
if init_from == 'resume':
    iter_num, best_val_loss = common.resume_training(ctx, ckpt, optimizer, data_generator)
    evals_without_improvement = ckpt.get('evals_without_improvement', 0)
    data_position = ckpt.get('data_position', 0)
    if sampling == 'epoch' and data_position and ckpt.get('epoch_rows') != epoch_rows and ctx.master:
        print(f"warning: the checkpoint's epochs had {ckpt['epoch_rows']:,} rows, these have {epoch_rows:,} "
              f"(another dataset, block_size or align_to_docs): the epoch order is not the one it was trained on")
ckpt = None  # free the memory
raw_model = model
model = common.wrap(ctx, model, compile_model)
eval_model = common.eval_module(ctx, model, raw_model)


@torch.no_grad()
def estimate_loss():
    """Mean loss per split over eval_iters fixed batches (the same at every eval, so the numbers
    compare), in the training's row layout (align_to_docs, doc_mask), shared out between ranks and
    summed back. With another layout than the default, val is measured in the default one too
    (rows anywhere, attention across documents): val/plain_loss, which compares across layouts."""
    out = {}
    eval_model.eval()
    layouts = {'train': ('train', align_to_docs, doc_mask), 'val': ('val', align_to_docs, doc_mask)}
    if align_to_docs or doc_mask:
        layouts['plain'] = ('val', False, False)
    for name, (split, at_docs, masked) in layouts.items():
        ix = random_starts(split, (eval_iters, batch_size), torch.Generator().manual_seed(seed + 1), at_docs)
        total = torch.zeros(2, device=ctx.device)  # (sum of losses, count)
        for rows, weight in common.rank_share(ctx, ix):
            x, y, kwargs = windows(split, rows, masked)
            with ctx.autocast:
                _, loss = eval_model(x, y, **kwargs)
            total += weight * torch.stack([loss.float(), torch.ones((), device=ctx.device)])
        total = common.sum_over_ranks(ctx, total)
        out[name] = (total[0] / total[1]).item()  # .item() is a host sync (once per layout per eval)
    eval_model.train()
    bpb = {k: v / math.log(2) / bytes_per_token if bytes_per_token else float('nan') for k, v in out.items()}
    metrics = {'val/loss': out['val'], 'val/bpb': bpb['val'], 'val/train_split_loss': out['train']}
    if 'plain' in out:
        metrics.update({'val/plain_loss': out['plain'], 'val/plain_bpb': bpb['plain']})
    return metrics


def state():
    return common.checkpoint(ctx, 'pretrain', common.model_state(ctx, raw_model), model_args, tokenizer, config, parent, dataset,
                             optimizer, iter_num, data_generator,
                             evals_without_improvement=evals_without_improvement, data_position=data_position,
                             epoch_rows=epoch_rows)


log, stop = common.start_logging(ctx, config, init_from == 'resume', iter_num, wandb_log, wandb_project, wandb_run_name)
if ctx.master and peak_flops == 0.0:
    peak_flops = common.measure_peak_flops(ctx.device_type, ctx.dtype)
    measured = ctx.dtype if ctx.device_type == 'cuda' else common.cpu_peak_dtype(ctx.dtype)
    print(f"matmul peak for MFU: {peak_flops / 1e9:,.0f} GFLOP/s ({measured})" if peak_flops else "MFU: unknown GPU peak")

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
    batches = get_batches('train', data_generator, ctx.accum_per_rank, data_position)
    if sampling == 'epoch':
        data_position += rows_per_iter
    for micro_step, (x, y, kwargs) in enumerate(batches):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        with ctx.autocast:
            _, loss, aux = model(x, y, **kwargs, return_aux=True)
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
                   'train/grad_norm': grad_norm.item(), 'lr': lr, 'train/mfu': max(running_mfu, 0) * 100,
                   **({'train/epoch': data_position / epoch_rows} if sampling == 'epoch' else {})}
        common.log_step(ctx, log, iter_num, max_iters, metrics, dt, (tokens_per_iter, 'tok'))

    # Ctrl-C / SIGTERM: save and leave cleanly
    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps, best val loss {best_val_loss:.4f}")
