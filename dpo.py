"""
Direct preference optimisation and its reference-free relatives: the policy (from an SFT
out_dir) learns to prefer the chosen answer of each pair over the rejected one, with no reward
model and, offline, no sampling (dpo_loss.py has the losses, their formulas and sources).
    python dpo.py config/dpo_tiny.py                  # from out-sft, on the built-in task suite
    python dpo.py config/dpo_tiny.py --loss_type=simpo --beta=2.0 --learning_rate=1e-5
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out-sft --pref_files=prefs.jsonl
    python dpo.py config/dpo_online_tiny.py           # online: pairs of the policy's own samples

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
online=True is online (iterative) DPO (Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback"; TRL's OnlineDPOTrainer): no fixed pairs; each step samples online_samples
completions of batch_size RL prompts from the current policy, scores them (tasks.verifiable_reward,
+ a reward model, - missing_eos_penalty, as ppo.py does) and pairs each prompt's best against its
worst (preference.online_pairs; a prompt whose samples tied gives none), then takes the same loss
against the live reference. The held-out pairs and task metrics still evaluate it.
"""

import dataclasses
import os
import time

import torch

import common
import data
import dpo_loss as losses
import heldout
import preference
import rewardmodel
import tasks
from configurator import configure
from generate import GenerationConfig, generate_ids
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
# online DPO: each step's pairs are the policy's own samples (the held-out pairs still evaluate it)
online = False
rl_file = ''  # online: RL prompts JSONL (docs/data.md); '' = the built-in prompts (data/tasks/rl_train.jsonl)
rl_tasks = ''  # online: comma-separated: only the prompts whose "task" is one of these ('' = every prompt)
online_samples = 4  # online: completions per prompt; its best-scored one is chosen, its worst rejected
max_new_tokens = 48  # online: of each completion (a built-in multiplication working is up to 41 tokens + <|im_end|>)
temperature = 0.7  # online: > 0; near the greedy answer: the contrasts that can flip an argmax
reward_model = ''  # online: a reward-model out_dir (reward.py) whose score is added; '' = verifiable reward only
reward_model_weight = 1.0
missing_eos_penalty = 1.0  # online: off the score of a completion cut off at max_new_tokens
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
if online and loss_type not in losses.LOSS_TYPES:  # kto's unpaired labels and z0 would need their own sampler
    raise SystemExit(f"online=True trains the DPO family on pairs of its own samples: loss_type={loss_type!r} is not "
                     f"supported; use one of {', '.join(losses.LOSS_TYPES)}")
if online and parallel == 'fsdp':
    raise SystemExit("online=True samples from the policy at every step, which under FSDP would make every decode step "
                     "a collective of all ranks (not supported here): use parallel='ddp'")
if online and (online_samples < 2 or temperature <= 0):
    raise SystemExit(f"online=True pairs different samples of a prompt: set online_samples >= 2 (got {online_samples}) "
                     f"and temperature > 0 (got {temperature})")
if not online and (rl_file or rl_tasks or reward_model):
    raise SystemExit("rl_file, rl_tasks and reward_model are online DPO's: set online=True, or leave them ''")
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
    with ctx.autocast:  # per-token cross-entropies, chunk by chunk: never the (2B, T, vocab) logits
        _, nll, aux_loss = m(ids, targets, return_aux=True, reduction='none')
    return -nll.sum(-1), aux_loss  # prompt and pad positions are 0


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
    splits = (val,) if online else (train, val)  # online: the training pairs are sampled as it goes
    for split in splits:
        ref = torch.zeros(len(split['ids']), 2)
        for rows, ids, targets in map(with_targets, preference.eval_batches(split, len(split['ids']), batch_size, ctx.device)):
            ref[rows] = reference_logps(split, rows, ids, targets).view(2, -1).T.cpu()
        split['ref'] = ref  # (N, 2)
    if not online:  # online scores its samples under the reference live: it stays
        ref_model = None  # freed: the lookup table replaces it
    if ctx.master:
        print(f"reference log-probs of {sum(len(s['ids']) for s in splits):,} pairs precomputed in {time.time() - t0:.1f} s")


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


def loss_fn(batch, split):
    """The loss of one micro-batch of split's pairs (+ RPO term, + MoE aux) and TRL's metrics."""
    rows, ids, targets = batch
    logps, aux_loss = answer_logps(model, ids, targets)
    counts = losses.sequence_token_counts(targets)
    if kto:
        per_example, metrics = kto_losses(logps, reference_logps(split, rows, ids, targets), split['label'][rows].to(ctx.device))
        return per_example.mean() + aux_term(aux_loss), metrics
    per_pair, scores = pair_losses(logps, reference_logps(split, rows, ids, targets), counts)
    loss = per_pair.mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * losses.rpo_nll(logps[:len(rows)], counts[:len(rows)].sum())
    return loss + aux_term(aux_loss), losses.preference_metrics(*scores, beta)


def aux_term(aux_loss):
    """The MoE load-balancing loss, weighted (0 for a dense model)."""
    return model_args['moe_aux_loss_coef'] * aux_loss if model_args['n_experts'] else 0.0


def offline_batches(it):
    """This rank's micro-batches of step it, each (batch, the split it is from, weight 1)."""
    return [(with_targets(b), train, 1.0) for b in preference.train_batches(ctx, train, it, batch_size)]


# online DPO: the RL prompts, rendered once as the chat prefix the policy continues (as ppo.py)
def load_prompts():
    task_dir = os.path.join(data_root, 'tasks')
    if not rl_file:
        tasks.ensure_tasks(task_dir)  # generated once, offline
    fits, too_long = data.rl_prompts(rl_file or os.path.join(task_dir, 'rl_train.jsonl'), rl_tasks, tokenizer,
                                     max_new_tokens, max_seq_len, skip_bad_lines)
    if not fits:
        raise SystemExit(f"no RL prompt fits max_seq_len={max_seq_len} with max_new_tokens={max_new_tokens}")
    if reward_net is None and all(p['answer'] is None for p in fits):
        raise SystemExit("online=True has nothing to score with: no prompt has an \"answer\"; set reward_model=<out_dir>")
    if ctx.master:
        print(f"online: {len(fits):,} prompts ({too_long} too long dropped), {online_samples} samples "
              f"each; reward: verifiable{f' + {reward_model_weight:g} x {reward_model}' if reward_net else ''}")
    return fits


reward_net = None  # online: the reward model (rewardmodel.py), frozen
if online and reward_model:
    reward_net, rm_tokenizer = rewardmodel.load_reward_model(reward_model, ctx.device)
    reward_net.requires_grad_(False)
    if rm_tokenizer.identity != tokenizer.identity:
        raise SystemExit(f"reward model {reward_model} uses another tokenizer ({rm_tokenizer.identity}) than the policy "
                         f"({tokenizer.identity}): train it from the same pretrain/SFT lineage")
prompts = load_prompts() if online else []
gen_config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              vocab_size=tokenizer.n_vocab,  # the model's padded ids are never sampled
                              stop_token_ids=(tokenizer.im_end_id, tokenizer.eot_id))
special_ids = set(tokenizer.special_tokens.values())


def padded(seqs):
    """Token lists -> (ids (N, T) right-padded with pad_id, lengths (N,)), on the CPU."""
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor([len(seq) for seq in seqs])


def score(picked, responses):
    """(scores, verifiable), (N,) on the CPU, as ppo.py's score: tasks.verifiable_reward of the text,
    + reward_model_weight x the reward model's score (read at the response's last token, where it
    was trained to read it), - missing_eos_penalty off a response that never emitted <|im_end|>."""
    texts = [tokenizer.decode([t for t in r if t not in special_ids]) for r in responses]
    verifiable = torch.tensor([tasks.verifiable_reward(t, p['answer']) for t, p in zip(texts, picked)])
    scores = verifiable.clone()
    if reward_net is not None:
        ids, length = padded([p['ids'] + r for p, r in zip(picked, responses)])
        prompt_len = torch.tensor([len(p['ids']) for p in picked])
        real = torch.arange(ids.size(1))[None, :] < length[:, None]
        with ctx.autocast:
            rm = rewardmodel.score_ids(reward_net, ids.to(ctx.device), real.to(ctx.device),
                                       preference.response_mask(ids, prompt_len, length).to(ctx.device))
        scores = scores + reward_model_weight * rm.float().cpu()
    ended = torch.tensor([bool(r) and r[-1] == tokenizer.im_end_id for r in responses])
    return scores - missing_eos_penalty * (~ended).float(), verifiable


def sample_pairs(it, micro_step):
    """Micro-step micro_step of step it on this rank: batch_size prompts x online_samples completions
    of the policy (in eval mode, the stage's autocast), scored, and the pairs they give. Prompts and
    samples come from streams seeded by (seed, it) that every rank shares, each micro-batch of each
    rank its slice (as ppo.py): N ranks sample what one process accumulating N micro-batches would,
    and a resumed run what the first would have."""
    step_seed = seed + 1_000_003 * (it + 1)
    draw = torch.Generator().manual_seed(step_seed)
    ix = torch.randint(len(prompts), (ctx.world_size, ctx.accum_per_rank, batch_size), generator=draw)[ctx.rank, micro_step]
    picked = [prompts[i] for i in ix.tolist() for _ in range(online_samples)]  # a prompt's samples adjacent
    n, first = len(picked), (ctx.rank * ctx.accum_per_rank + micro_step) * len(picked)
    raw_model.eval()
    with ctx.autocast:
        gen = generate_ids(raw_model, [p['ids'] for p in picked], dataclasses.replace(gen_config, seed=step_seed + 1),
                           tokenizer.pad_id, rows=(first, n * ctx.world_size * ctx.accum_per_rank))
    raw_model.train()
    responses = gen.rows()
    scores, verifiable = score(picked, responses)
    chosen, rejected = preference.online_pairs(scores, online_samples)
    return {'picked': picked, 'responses': responses, 'scores': scores, 'verifiable': verifiable,
            'chosen': chosen.tolist(), 'rejected': rejected.tolist()}


def pair_rows(part, chosen, rejected):
    """Sampled pairs (indices into part's samples) as the offline path batches pairs
    (preference.pair_batch): (rows, ids (2n, T), prompt_len (2n,), length (2n,)), the n chosen rows
    then their n rejected rows, each its prompt + the completion as sampled (with its <|im_end|>
    when it emitted one), right-padded."""
    picks = chosen + rejected
    ids, length = padded([part['picked'][i]['ids'] + part['responses'][i] for i in picks])
    prompt_len = torch.tensor([len(part['picked'][i]['ids']) for i in picks])
    return torch.arange(len(chosen)), ids.to(ctx.device), prompt_len.to(ctx.device), length.to(ctx.device)


def online_batches(it):
    """This rank's micro-batches of step it, sampled now, each (batch, {} (no precomputed
    reference), weight), and the step's sampling metrics. weight = n x world_size x accum_per_rank / P
    (n: the micro-batch's pairs, P: the step's, over all ranks and micro-steps), so that every pair
    of the step weighs the same wherever it fell; a micro-batch with none runs one stand-in pair at
    weight 0, so that every rank makes the same backward passes (DDP). No pair at all: no batch."""
    parts = [sample_pairs(it, j) for j in range(ctx.accum_per_rank)]
    local = torch.tensor([[len(p['chosen']), float(p['scores'].sum()), float(p['verifiable'].sum())] for p in parts])
    n_pairs, score_sum, verifiable_sum = common.sum_over_ranks(ctx, local.sum(0).to(ctx.device)).tolist()
    n_prompts = ctx.world_size * ctx.accum_per_rank * batch_size
    metrics = {'train/online_pair_frac': n_pairs / n_prompts, 'train/online_score': score_sum / (n_prompts * online_samples),
               'train/online_verifiable': verifiable_sum / (n_prompts * online_samples)}
    if not n_pairs:
        return [], metrics
    batches = []
    for part in parts:
        n = len(part['chosen'])
        chosen, rejected = (part['chosen'], part['rejected']) if n else ([0], [0])
        batches.append((with_targets(pair_rows(part, chosen, rejected)), {}, n * ctx.world_size * ctx.accum_per_rank / n_pairs))
    return batches, metrics


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
        metrics = evaluate()
        if online:  # its val/loss is on the suite's fixed pairs, not what it trains on: the latest is the product (as ppo.py)
            common.log_eval(ctx, log, iter_num, metrics)
            if iter_num > iter_start:
                common.save(ctx, state, None)
        else:
            best_val_loss = common.after_eval(ctx, log, iter_num, metrics, best_val_loss, iter_num > iter_start, state)
    if iter_num >= max_iters:
        break

    # one optimizer step over the micro-batches; online: sampled now, and none when no prompt gave a
    # pair (the step is skipped, and still counted)
    batches, sampled = online_batches(iter_num) if online else (offline_batches(iter_num), {})
    sums = torch.zeros(4, device=ctx.device)  # loss, rewards/accuracies, rewards/margins, logps/chosen
    for micro_step, (batch, split, weight) in enumerate(batches):
        common.sync_grads(ctx, model, micro_step == ctx.accum_per_rank - 1)
        loss, stats = loss_fn(batch, split)
        ctx.scaler.scale(loss * weight / ctx.accum_per_rank).backward()
        sums += torch.stack([loss.detach(), stats['rewards/accuracies'], stats['rewards/margins'],
                             stats['logps/chosen']]) * weight / ctx.accum_per_rank
    grad_norm = common.optimizer_step(ctx, optimizer, params, grad_clip) if batches else None
    iter_num += 1

    # log (the only host sync of an offline step, and only every log_interval steps)
    if iter_num % log_interval == 0:
        metrics = {}
        if batches:
            train_loss, accuracy, margin, logp_chosen = common.mean_over_ranks(ctx, sums).tolist()
            metrics = {'train/loss': train_loss, 'train/rewards/accuracies': accuracy, 'train/rewards/margins': margin,
                       'train/logps/chosen': logp_chosen, 'train/grad_norm': grad_norm.item()}
        metrics.update(sampled, lr=lr)
        common.log_step(ctx, log, iter_num, max_iters, metrics, common.step_time(log, iter_num),
                        (gradient_accumulation_steps * batch_size * (online_samples if online else 1),
                         'samples' if online else 'pairs'))

    if stop.requested(ctx):
        common.save(ctx, state, best_val_loss, reason='interrupted')
        interrupted = True
        break

common.finish(ctx, log, interrupted, f"{iter_num} steps" + ("" if online else f", best val loss {best_val_loss:.4f}"))
