"""
Supervised fine-tuning on chat data: the loss is on assistant tokens only (content + <|im_end|>).
    python sft.py config/sft_tiny.py                       # from out-tiny, on the built-in task suite
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_small.py

Batches are padded (one conversation per row) or packed (several per row, each attending only to
itself, with its own positions): packing wastes no compute on pads and gives every conversation
the same loss it has alone. lora_rank > 0 trains low-rank adapters only; checkpoints always hold
the merged weights (any script can load them) and, with LoRA, the adapters too.
"""

import os

import torch

import common
import data
import heldout
import tasks
from configurator import configure
from lora import apply_lora, checkpoint_weights

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-sft'
init_from = 'out-tiny'  # a pretrain (or earlier SFT) out_dir; 'resume' continues out_dir
init_checkpoint = 'best'  # of init_from: 'best' (by val loss) | 'latest'
eval_interval = 100
log_interval = 10
eval_iters = 20  # held-out loss batches
eval_items_per_task = 100  # held-out items per task for generation metrics (0 = skip)
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

SYSTEM_PROMPTS = ['You are a helpful assistant.', 'Answer briefly.', 'You are a concise, friendly assistant.']
ctx = common.setup(device, dtype, seed, out_dir, gradient_accumulation_steps, parallel)

# model and tokenizer: from the previous stage, or resumed
resume = init_from == 'resume'
ckpt, parent = common.start_from(ctx, init_from, init_checkpoint)
tokenizer = common.tokenizer_from_checkpoint(ckpt)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
# LoRA resumes from the base weights (the parent) plus the saved adapters
base = common.load_checkpoint(parent) if resume and lora_rank else ckpt
model = common.model_from_checkpoint(base, dropout=dropout)
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
model.to(ctx.device)
common.shard(ctx, model)  # FSDP only
model_args = model.config.to_dict()
if ctx.master:
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


train_convs, val_convs, task_items = load_conversations()
train_ids, train_tgt, train_doc, dropped, kept = build_rows(augment(train_convs, torch.Generator().manual_seed(seed)))
val_ids, val_tgt, val_doc, _, _ = build_rows(val_convs)  # held out as it is
if ctx.master:
    print(f"sft data: {kept:,} conversations -> {len(train_ids):,} rows of {max_seq_len} "
          f"({'packed' if packing else 'padded'}); {dropped:,} dropped (no assistant token left after truncation); "
          f"{(train_tgt != -1).sum().item():,} supervised tokens; {len(val_convs):,} held out")
if kept == 0:
    raise SystemExit("no training conversation has an assistant token within max_seq_len")


def get_batch(ids, tgt, doc, generator, n_micro):
    """n_micro micro-batches of rows; every rank draws the same indices and keeps its share."""
    ix = torch.randint(len(ids), (n_micro * ctx.world_size, batch_size), generator=generator)
    return [(ids[r].to(ctx.device), tgt[r].to(ctx.device), doc[r].to(ctx.device))
            for r in ix[ctx.rank * n_micro:(ctx.rank + 1) * n_micro]]


def forward(m, x, y, d):
    positions, mask = common.packed_attention(d) if packing else (None, None)
    with ctx.autocast:
        return m(x, y, positions=positions, attn_mask=mask)[1]


# optimizer (and its state when resuming)
iter_num, best_val_loss = 0, float('inf')
data_generator = torch.Generator().manual_seed(seed)
params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
optimizer = common.adamw(params, learning_rate, weight_decay, (beta1, beta2), ctx.device_type)
if resume:
    iter_num, best_val_loss = common.resume_training(ctx, ckpt, optimizer, data_generator)
ckpt = base = None
raw_model = model
model = common.wrap(ctx, model, compile_model)
eval_model = common.eval_module(ctx, model, raw_model)


@torch.no_grad()
def evaluate():
    """Held-out loss on assistant tokens, then task metrics by greedy generation."""
    eval_model.eval()
    # eval_iters fixed batches, the same whatever the number of ranks, shared out between them
    ix = torch.randint(len(val_ids), (eval_iters, batch_size), generator=torch.Generator().manual_seed(seed + 1))
    total = torch.zeros(2, device=ctx.device)  # (sum of batch losses, batches)
    for r, weight in common.rank_share(ctx, ix):
        loss = forward(eval_model, val_ids[r].to(ctx.device), val_tgt[r].to(ctx.device), val_doc[r].to(ctx.device))
        total += weight * torch.stack([loss.float(), torch.ones((), device=ctx.device)])
    total = common.sum_over_ranks(ctx, total)
    metrics = {'val/loss': (total[0] / total[1]).item()}
    metrics.update(heldout.stage_metrics(ctx, raw_model, tokenizer, task_items, eval_items_per_task))
    eval_model.train()
    return metrics


def state():
    state = common.model_state(ctx, raw_model)
    weights, lora = checkpoint_weights(raw_model, state, lora_rank)
    return common.checkpoint(ctx, 'sft', weights, model_args, tokenizer, config, parent, pretrain_dataset, optimizer,
                             iter_num, data_generator, **lora)


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
    loss_sum = torch.zeros((), device=ctx.device)
    for micro_step, (x, y, d) in enumerate(get_batch(train_ids, train_tgt, train_doc, data_generator, ctx.accum_per_rank)):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        loss = forward(model, x, y, d) / ctx.accum_per_rank
        ctx.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip)
    iter_num += 1

    if iter_num % log_interval == 0:
        metrics = {'train/loss': common.mean_over_ranks(ctx, loss_sum).item(), 'train/grad_norm': grad_norm.item(), 'lr': lr}
        tokens = gradient_accumulation_steps * batch_size * max_seq_len
        common.log_step(ctx, log, iter_num, max_iters, metrics, common.step_time(log, iter_num), (tokens, 'tok'))

    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps, best val loss {best_val_loss:.4f}")
