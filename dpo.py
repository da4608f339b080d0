"""
Direct preference optimisation and its reference-free relatives: the policy (from an SFT
out_dir) learns to prefer the chosen answer of each pair over the rejected one, with no reward
model and no sampling (dpo_loss.py has the losses, their formulas and sources).
    python dpo.py config/dpo_tiny.py                  # from out-sft, on the built-in task suite
    python dpo.py config/dpo_tiny.py --loss_type=simpo --beta=2.0 --learning_rate=1e-5
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out-sft --pref_files=prefs.jsonl

sigmoid (DPO), ipo, hinge compare the policy with a frozen reference, the starting policy (the
parent checkpoint, on resume too); reference='none' takes log ref = 0 (TRL's reference_free).
simpo and orpo need no reference at all. kto (Ethayarajh et al. 2024) learns from unpaired
feedback instead, one completion per prompt labelled desirable or not (TRL's format: prompt,
completion, label); each example's row goes through the forward pass beside a mismatched row, its
prompt with another example's completion, from which KTO estimates its reference point z0. Answer log-probs are summed over the answer tokens
only (the prompt is masked), chosen and rejected rows in one forward pass; SimPO, ORPO and IPO
with ipo_length_normalize use their per-token mean. precompute_ref_logps scores every pair under
the reference once, before training, and frees it: no second model in memory and no reference
forward per step.
lora_rank > 0 trains low-rank adapters only (lora.py); the reference is then the policy with its
adapters switched off (lora.adapters_off): the frozen base, exactly, with no second copy held.
The checkpoint holds the merged weights in 'model' (ppo.py and sample.py load it as any policy)
and the adapters in 'lora' (to resume).
"""

import time

import torch

import common
import dpo_loss as losses
import heldout
import preference
from configurator import configure
from lora import add_lora, adapters_off, check_resume, checkpoint_weights, load_adapters

# ----------------------------------------------------------------------------- config
# I/O
out_dir = 'out-dpo'
init_from = 'out-sft'  # an SFT out_dir: the starting policy and the reference; 'resume' continues out_dir
init_checkpoint = 'best'  # of init_from: 'best' (by val loss) | 'latest'
eval_interval = 100
log_interval = 10
eval_pairs = 1000  # held-out pairs scored at each eval (all of them when fewer)
eval_items_per_task = 100  # held-out task items for generation metrics (0 = skip)
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
loss_type = 'sigmoid'  # with a reference: 'sigmoid' (DPO) | 'ipo' | 'hinge' | 'kto' (unpaired); reference-free: 'simpo' | 'orpo'
beta = 0.1  # DPO family: the KL leash to the reference (lower moves further); SimPO: the reward scale (~2)
reference = 'model'  # DPO family: 'model' (the starting policy, frozen) | 'none' (log ref = 0)
ipo_length_normalize = False  # ipo: per-token mean log-probs (TRL's form) instead of sums
simpo_gamma = 0.5  # simpo: the target reward margin
orpo_lambda = 0.1  # orpo: weight of the odds-ratio term beside the SFT loss on the chosen answers
label_smoothing = 0.0  # conservative DPO (sigmoid only): the assumed chance that a label is wrong
desirable_weight = 1.0  # kto: lambda_D; keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n: examples of each label)
undesirable_weight = 1.0  # kto: lambda_U
rpo_alpha = 0.0  # DPO family: > 0 adds alpha * NLL of the chosen answers (RPO), so their likelihood does not sink
precompute_ref_logps = True  # score the reference once, then free it; False keeps it in memory
# LoRA (the keys of sft.py); the reference is then the base with the adapters off
lora_rank = 0  # 0 = full fine-tuning
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'c_attn,c_proj,c_fc'
# optimizer
batch_size = 16  # pairs per micro-batch per rank (two rows each)
gradient_accumulation_steps = 1  # total over ranks
max_iters = 300
learning_rate = 3e-5  # 60x the 5e-7 of 7B recipes; at MiniMind's 4e-8 the loss is still 0.69 after 200 steps
min_lr = 3e-6
warmup_iters = 20
lr_decay_iters = 300
lr_schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant'
wsd_decay_frac = 0.2  # wsd: fraction of lr_decay_iters spent decaying
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0  # > 0 makes policy and reference differ at step 0
# system
device = 'auto'
dtype = 'auto'
compile_model = False
parallel = 'ddp'  # under torchrun: 'ddp' (every rank holds the whole model) | 'fsdp' (FSDP2: sharded over the ranks)
seed = 1337
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

ALL_LOSS_TYPES = losses.LOSS_TYPES + losses.REFERENCE_FREE_LOSS_TYPES + losses.UNPAIRED_LOSS_TYPES
if loss_type not in ALL_LOSS_TYPES:
    raise SystemExit(f"loss_type={loss_type!r}: use one of {', '.join(ALL_LOSS_TYPES)}")
kto = loss_type == 'kto'
if kto and rpo_alpha:
    raise SystemExit("rpo_alpha adds the NLL of chosen answers: KTO's examples are unpaired; set rpo_alpha=0")
if label_smoothing and loss_type != 'sigmoid':
    raise SystemExit(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
if reference not in ('model', 'none'):
    raise SystemExit(f"reference={reference!r}: use 'model' or 'none'")
uses_reference = reference == 'model' and (loss_type in losses.LOSS_TYPES or kto)
length_normalized = loss_type in losses.REFERENCE_FREE_LOSS_TYPES or (loss_type == 'ipo' and ipo_length_normalize)
ctx = common.setup(device, dtype, seed, out_dir, gradient_accumulation_steps, parallel)

# policy, reference and tokenizer: the reference is always the checkpoint the run started from
resume = init_from == 'resume'
ckpt, parent = common.start_from(ctx, init_from, init_checkpoint)
pretrain_dataset = ckpt.get('dataset')  # carried forward, for eval.py's loss/bpb
tokenizer = common.tokenizer_from_checkpoint(ckpt)
if resume:
    check_resume(ckpt, lora_rank, out_dir)
# base: the starting policy, the reference (on resume the parent). LoRA resumes from it plus the
# saved adapters ('model' holds them merged); full fine-tuning loads the reference from it
base = common.load_checkpoint(parent) if resume and (lora_rank or uses_reference) else ckpt
model = common.model_from_checkpoint(base if lora_rank else ckpt, dropout=dropout)
n_train = add_lora(model, lora_rank, lora_alpha, lora_targets, lora_dropout)
if resume and lora_rank:
    load_adapters(model, ckpt['lora'], out_dir)
model.to(ctx.device)
common.shard(ctx, model)  # FSDP only; the frozen reference stays whole on every rank
ref_model = None  # full fine-tuning: a frozen copy of the starting policy; LoRA: the policy, adapters off
if uses_reference and not lora_rank:
    ref_model = common.model_from_checkpoint(base)
    ref_model.to(ctx.device).eval().requires_grad_(False)
if max_seq_len > model.config.block_size:
    raise SystemExit(f"max_seq_len={max_seq_len} exceeds the model's block_size {model.config.block_size}")
model_args = model.config.to_dict()
if ctx.master:
    stage = ckpt.get('stage', '?')
    print(f"policy from {init_from} ({stage} stage), {loss_type} loss, reference {parent if uses_reference else 'none'}: "
          f"{model.get_num_params() / 1e6:.2f}M params, training {n_train / 1e6:.3f}M{f' (LoRA rank {lora_rank})' if lora_rank else ''}"
          + ("; note: DPO usually starts from an SFT model" if stage == 'pretrain' else ''))

# data: pairs -> right-padded [chosen, rejected] rows, built once (preference.py)
# kto: unpaired examples, each as the pair (its completion, another example's completion) under its prompt
load = preference.load_unpaired_splits if kto else preference.load_splits
train_pairs, val_pairs, task_items = load(pref_files, data_root, val_fraction, seed, skip_bad_lines)
train, val = preference.encode_splits(ctx, tokenizer, train_pairs, val_pairs, max_seq_len, 'dpo')


def with_targets(batch):
    """(rows, ids, prompt_len, length) -> (rows, ids, targets): the next token on the answer tokens, -1 elsewhere."""
    rows, ids, prompt_len, length = batch
    return rows, ids, losses.answer_targets(ids, prompt_len, length)


def answer_logps(m, ids, targets):
    """Answer log-probs under m, summed over each row's answer tokens: (2B,) chosen then rejected,
    and the MoE aux loss; one forward pass."""
    with ctx.autocast:
        logits, _, aux_loss = m(ids, return_aux=True)
    return losses.sequence_logps(logits, targets), aux_loss


@torch.no_grad()
def reference_logps(split, rows, ids, targets):
    """The reference's summed log-probs (2B,): looked up when precomputed, else a forward pass;
    zeros without a reference."""
    if not uses_reference:
        return torch.zeros(len(ids), device=ctx.device)
    if 'ref' in split:
        return split['ref'][rows].T.reshape(-1).to(ctx.device)  # (B, 2) -> chosen then rejected
    if ref_model is not None:
        return answer_logps(ref_model, ids, targets)[0]
    training = raw_model.training
    with adapters_off(raw_model.eval()):  # LoRA: the frozen base (in eval mode: no dropout) is the reference
        logps = answer_logps(raw_model, ids, targets)[0]
    raw_model.train(training)
    return logps


raw_model = model
if uses_reference and precompute_ref_logps:
    t0 = time.time()
    for split in (train, val):
        ref = torch.zeros(len(split['ids']), 2)
        for rows, ids, targets in map(with_targets, preference.eval_batches(split, len(split['ids']), batch_size, ctx.device)):
            ref[rows] = reference_logps(split, rows, ids, targets).view(2, -1).T.cpu()
        split['ref'] = ref  # (N, 2)
    ref_model = None  # freed: the lookup table replaces it
    if ctx.master:
        print(f"reference log-probs of {len(train['ids']) + len(val['ids']):,} pairs precomputed in {time.time() - t0:.1f} s")


def kto_losses(logps, ref_logps, labels):
    """Per-example KTO losses (B,) and TRL's KTO metrics. logps, ref_logps (2B,): the B examples'
    own rows, then their B mismatched rows, whose mean log-ratio is the reference point z0 (averaged
    over the ranks, as TRL gathers it: one z0 for the global batch)."""
    own, mismatched = logps.chunk(2)
    ref_own, ref_mismatched = ref_logps.chunk(2)
    z0 = common.mean_over_ranks(ctx, (mismatched - ref_mismatched).mean().detach()).clamp(min=0)  # kto_reference_point, all ranks
    per_example = losses.kto_loss(own, ref_own, labels, z0, beta, desirable_weight, undesirable_weight)
    return per_example, losses.kto_metrics(own, ref_own, labels, z0, beta)


def pair_losses(logps, ref_logps, counts):
    """Per-pair losses (B,) of loss_type, and the four scores it compared: (policy chosen, policy
    rejected, reference chosen, reference rejected), per-token means where length_normalized.
    counts (2B,): each row's answer tokens."""
    if length_normalized:
        logps, ref_logps = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
    chosen, rejected = logps.chunk(2)
    scores = (chosen, rejected, *ref_logps.chunk(2))
    if loss_type == 'simpo':
        return losses.simpo_loss(chosen, rejected, beta, simpo_gamma), scores
    if loss_type == 'orpo':  # the SFT term per pair, then lambda x the odds ratio (ORPO eq. 6)
        return -chosen + orpo_lambda * losses.orpo_odds_ratio_loss(chosen, rejected), scores
    return losses.dpo_loss(*scores, beta, loss_type, label_smoothing), scores


def loss_fn(batch):
    """The loss of one micro-batch (+ RPO term, + MoE aux) and TRL's metrics."""
    rows, ids, targets = batch
    logps, aux_loss = answer_logps(model, ids, targets)
    counts = losses.sequence_token_counts(targets)
    if kto:
        per_example, metrics = kto_losses(logps, reference_logps(train, rows, ids, targets), train['label'][rows].to(ctx.device))
        return per_example.mean() + aux_term(aux_loss), metrics
    per_pair, scores = pair_losses(logps, reference_logps(train, rows, ids, targets), counts)
    loss = per_pair.mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * losses.rpo_nll(logps[:len(rows)], counts[:len(rows)].sum())
    return loss + aux_term(aux_loss), losses.preference_metrics(*scores, beta)


def aux_term(aux_loss):
    """The MoE load-balancing loss, weighted (0 for a dense model)."""
    return model_args['moe_aux_loss_coef'] * aux_loss if model_args['n_experts'] else 0.0


# optimizer (and its state when resuming)
iter_num, best_val_loss = 0, float('inf')
params = [p for p in model.parameters() if p.requires_grad]
optimizer = common.adamw(params, learning_rate, weight_decay, (beta1, beta2), ctx.device_type)
if resume:
    # batches are a function of the step: no data generator to restore
    iter_num, best_val_loss = common.resume_training(ctx, ckpt, optimizer)
ckpt = base = None
model = common.wrap(ctx, model, compile_model)


@torch.no_grad()
def evaluate():
    """Loss and TRL's metrics on the held-out pairs (the same pairs on every rank, in order),
    then task metrics by greedy generation (val/arith_acc, val/identity_acc, ...)."""
    model.eval()
    batches = [with_targets(b) for b in preference.eval_batches(val, eval_pairs, batch_size, ctx.device)]
    if kto:
        metrics = evaluate_kto(batches)
    else:
        metrics = evaluate_pairs(batches)
    metrics.update(heldout.stage_metrics(ctx, raw_model, tokenizer, task_items, eval_items_per_task))
    model.train()
    return metrics


def evaluate_pairs(batches):
    """The DPO family's held-out loss and TRL's metrics over all held-out pairs, and accuracy per task."""
    per_pair, scores = [], []
    for rows, ids, targets in batches:
        loss, four = pair_losses(answer_logps(raw_model, ids, targets)[0], reference_logps(val, rows, ids, targets),
                                 losses.sequence_token_counts(targets))
        per_pair.append(loss)
        scores.append(torch.stack(four, 1))
    chosen, rejected, ref_chosen, ref_rejected = torch.cat(scores).unbind(1)
    metrics = {'val/loss': float(torch.cat(per_pair).mean())}
    metrics.update({f'val/{k}': float(v) for k, v in losses.preference_metrics(chosen, rejected, ref_chosen, ref_rejected, beta).items()})
    correct = chosen - ref_chosen > rejected - ref_rejected
    metrics.update(preference.accuracy_by_task(correct, val, torch.cat([b[0] for b in batches]), 'val/rewards/accuracies_'))
    return metrics


def evaluate_kto(batches):
    """KTO's held-out loss and metrics: each batch's (its own z0), weighted by its examples."""
    totals, n = {}, 0
    for rows, ids, targets in batches:
        per_example, metrics = kto_losses(answer_logps(raw_model, ids, targets)[0], reference_logps(val, rows, ids, targets),
                                          val['label'][rows].to(ctx.device))
        for key, value in {'loss': per_example.mean(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * len(rows)
        n += len(rows)
    return {f'val/{k}': v / n for k, v in totals.items()}


def state():
    state = common.model_state(ctx, raw_model)
    weights, lora = checkpoint_weights(raw_model, state, lora_rank)
    return common.checkpoint(ctx, 'dpo', weights, model_args, tokenizer, config, parent, pretrain_dataset, optimizer,
                             iter_num, **lora)


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
    sums = torch.zeros(4, device=ctx.device)  # loss, rewards/accuracies, rewards/margins, logps/chosen
    for micro_step, batch in enumerate(preference.train_batches(ctx, train, iter_num, batch_size)):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        loss, stats = loss_fn(with_targets(batch))
        ctx.scaler.scale(loss / ctx.accum_per_rank).backward()
        sums += torch.stack([loss.detach(), stats['rewards/accuracies'], stats['rewards/margins'],
                             stats['logps/chosen']]) / ctx.accum_per_rank
    grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip)
    iter_num += 1

    # log (the only host sync of a step, and only every log_interval steps)
    if iter_num % log_interval == 0:
        train_loss, accuracy, margin, logp_chosen = common.mean_over_ranks(ctx, sums).tolist()
        metrics = {'train/loss': train_loss, 'train/rewards/accuracies': accuracy, 'train/rewards/margins': margin,
                   'train/logps/chosen': logp_chosen, 'train/grad_norm': grad_norm.item(), 'lr': lr}
        common.log_step(ctx, log, iter_num, max_iters, metrics, common.step_time(log, iter_num),
                        (gradient_accumulation_steps * batch_size, 'pairs'))

    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps, best val loss {best_val_loss:.4f}")
