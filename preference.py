"""
Preference pairs, for every stage that learns from them (reward.py, dpo.py): loading with
file/line errors, the train/held-out split, encoding once into right-padded [chosen, rejected]
rows, length-grouped micro-batches, and accuracy per task.

    load_pairs(path)                     [{'prompt_messages', 'chosen', 'rejected', 'margin', 'task'}]
    load_splits(...)                     (train pairs, held-out pairs, held-out task items)
    load_unpaired_splits(...)            the same for KTO: each example as (its completion, another's)
    encode_split(tokenizer, pairs, L)    the pairs as tensors, built once
    train_batches(ctx, split, step, B)   this rank's micro-batches of optimizer step `step`
    eval_batches(split, n, B, device)    the first n held-out pairs, in length order
    response_mask(ids, prompt_len, length), accuracy_by_task(correct, split, rows)
    online_pairs(scores, k)              online DPO: each prompt's best sample against its worst
A batch is (rows, ids, prompt_len, length): B chosen rows then their B rejected rows, (2B, T)
with T the longest of them, so both answers of every pair go through one forward pass.
"""

import math
import os
import random

import torch

import data
import tasks


# ----------------------------------------------------------------------------- loading

def parse_pair(obj):
    """data.parse_pref, plus "margin" (a number, 0 when absent) and "task" (kept for per-task metrics)."""
    margin = obj.get('margin', 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise data.BadField('margin', f"expected a finite number (how much better chosen is), got {margin!r}")
    task = obj.get('task')
    return dict(data.parse_pref(obj), margin=float(margin), task=task if isinstance(task, str) else None)


def load_pairs(path, skip_bad_lines=False):
    """Preference pairs with margins -> [{'prompt_messages', 'chosen', 'rejected', 'margin', 'task'}]."""
    return data.read_jsonl(path, parse_pair, skip_bad_lines, what='preference pair')


def load_splits(pref_files, data_root, val_fraction, seed, skip_bad_lines=False):
    """(train pairs, held-out pairs, held-out task items for generation metrics). pref_files:
    comma-separated JSONL files, val_fraction of them held out (seeded); '' = the built-in task
    suite, with its own test split. A bad line stops here with its file, line and field."""
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


def unpair(pairs):
    """Preference pairs -> unpaired examples: the chosen answer desirable, the rejected one not
    (TRL's unpair_preference_dataset), so KTO can learn from the built-in pairs too."""
    return [dict(prompt_messages=p['prompt_messages'], completion=p[key], label=key == 'chosen', task=p.get('task'))
            for p in pairs for key in ('chosen', 'rejected')]


def with_mismatched(examples):
    """Unpaired examples -> the pairs encode_split lays out, one per example: 'chosen' its own
    completion, 'rejected' the completion of the example before it (the first takes the last's)
    under its prompt: the mismatched pair KTO's reference point z0 is estimated from
    (kto_reference_point; TRL rotates the completions of a batch the same way). 'label' is kept."""
    return [dict(prompt_messages=ex['prompt_messages'], chosen=ex['completion'], rejected=examples[i - 1]['completion'],
                 label=ex['label'], task=ex.get('task')) for i, ex in enumerate(examples)]


def load_unpaired_splits(pref_files, data_root, val_fraction, seed, skip_bad_lines=False):
    """load_splits for KTO: (train, held-out, held-out task items), each example a with_mismatched
    pair. pref_files: comma-separated unpaired JSONL files (data.parse_unpaired: prompt, completion,
    label), shuffled (seeded) before the split and the pairing; '' = the built-in pairs, unpaired."""
    try:
        if pref_files:
            examples = [e for path in pref_files.split(',') for e in data.load_unpaired(path.strip(), skip_bad_lines)]
            random.Random(seed).shuffle(examples)
            n_val = max(1, int(len(examples) * val_fraction))
            return with_mismatched(examples[n_val:]), with_mismatched(examples[:n_val]), {}
        train, val, task_items = load_splits('', data_root, val_fraction, seed)
        shuffled = lambda xs: random.Random(seed).sample(xs, len(xs))  # a pair's two answers apart
        return with_mismatched(shuffled(unpair(train))), with_mismatched(shuffled(unpair(val))), task_items
    except data.DataError as e:
        raise SystemExit(f"bad unpaired data: {e}") from None


# ----------------------------------------------------------------------------- encoding

def encode_reply(tokenizer, prompt_messages, reply):
    """(ids, prompt length): the rendered prompt (ending in the assistant header), then the reply
    and its <|im_end|>, laid out as render_chat lays out an assistant turn."""
    prompt = tokenizer.render_prompt(prompt_messages)
    return prompt + tokenizer.encode(reply) + [tokenizer.im_end_id], len(prompt)


def encode_split(tokenizer, pairs, max_len):
    """Pairs -> a split, built once: ids (N, 2, max_len) with [chosen, rejected] right-padded,
    prompt_len (N,), length (N, 2), longest (N,), margin (N,), task [N], dropped. A pair whose
    longer answer does not fit in max_len is dropped, not cut: cutting could remove the very
    tokens that tell the two answers apart."""
    rows, prompt_lens, kept = [], [], []
    for i, pair in enumerate(pairs):
        (c, n), (r, _) = (encode_reply(tokenizer, pair['prompt_messages'], pair[k]) for k in ('chosen', 'rejected'))
        if max(len(c), len(r)) <= max_len:
            rows.append((c, r))
            prompt_lens.append(n)
            kept.append(i)
    ids = torch.full((len(rows), 2, max_len), tokenizer.pad_id, dtype=torch.long)
    length = torch.zeros((len(rows), 2), dtype=torch.long)
    for i, pair in enumerate(rows):
        for j, seq in enumerate(pair):
            ids[i, j, :len(seq)] = torch.tensor(seq)
            length[i, j] = len(seq)
    return {'ids': ids, 'prompt_len': torch.tensor(prompt_lens, dtype=torch.long), 'length': length,
            'longest': length.max(1).values if len(rows) else torch.zeros(0, dtype=torch.long),
            'margin': torch.tensor([float(pairs[i].get('margin', 0.0)) for i in kept]),
            'label': torch.tensor([bool(pairs[i].get('label', True)) for i in kept]),  # KTO's: desirable or not
            'task': [pairs[i].get('task') for i in kept], 'dropped': len(pairs) - len(kept)}


def encode_splits(ctx, tokenizer, train_pairs, val_pairs, max_len, stage):
    """Both splits encoded, a summary line, and a clear error when a split has no pair that fits."""
    train, val = encode_split(tokenizer, train_pairs, max_len), encode_split(tokenizer, val_pairs, max_len)
    if ctx.master:
        print(f"{stage} data: {len(train['ids']):,} train pairs, {len(val['ids']):,} held out; "
              f"{train['dropped'] + val['dropped']:,} dropped (longer than max_seq_len={max_len}); "
              f"{int(train['length'].sum()):,} train tokens")
    for name, split in (('training', train), ('held-out', val)):
        if len(split['ids']) == 0:
            raise SystemExit(f"no {name} pair fits in max_seq_len={max_len}: raise it (up to the block_size)")
    return train, val


def response_mask(ids, prompt_len, length):
    """(2B, T) True on each row's answer tokens (its <|im_end|> included), False on prompt and pads."""
    pos = torch.arange(ids.size(1), device=ids.device)
    return (pos >= prompt_len[:, None]) & (pos < length[:, None])


# ----------------------------------------------------------------------------- batching

def length_grouped_batch(lengths, batch_size, index, seed, pool=32):
    """Example indices (batch_size,) of micro-batch number `index`: drawn with replacement like
    torch.randint, but a pool of `pool` batches at a time is sorted by length, so that a batch
    holds examples of similar length and pads little (HF's group_by_length). A pure function of
    (index, seed): resuming needs no sampler state, and every rank can compute any batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index // pool)
    ix = torch.randint(len(lengths), (pool * batch_size,), generator=g)
    ix = ix[lengths[ix].argsort(stable=True)].view(pool, batch_size)
    return ix[torch.randperm(pool, generator=g)[index % pool]]


def pair_batch(split, rows, device):
    """Rows (B,) of a split -> (rows, ids (2B, T), prompt_len (2B,), length (2B,)): B chosen then
    B rejected rows, T = the longest of them."""
    T = int(split['length'][rows].max())  # a CPU tensor: no device sync
    ids = split['ids'][rows, :, :T].transpose(0, 1).reshape(-1, T)
    length = split['length'][rows].T.reshape(-1)
    return rows, ids.to(device), split['prompt_len'][rows].repeat(2).to(device), length.to(device)


def train_batches(ctx, split, step, batch_size):
    """This rank's micro-batches of optimizer step `step`, grouped by length (random batches of
    these pairs would be padded to 3x their tokens). A function of the step alone."""
    first = (step * ctx.world_size + ctx.rank) * ctx.accum_per_rank
    return [pair_batch(split, length_grouped_batch(split['longest'], batch_size, first + j, ctx.seed), ctx.device)
            for j in range(ctx.accum_per_rank)]


def eval_batches(split, n, batch_size, device):
    """The first n pairs of a split (the same on every rank), in length order: little padding."""
    order = split['longest'][:n].argsort()
    return [pair_batch(split, rows, device) for rows in order.split(2 * batch_size)]


def accuracy_by_task(correct, split, rows, name):
    """{name + task: share correct} for each task named in the data. correct (N,) bools on the
    pairs `rows` (N,) of split, in that order."""
    correct, row_tasks = correct.cpu(), [split['task'][i] for i in rows.tolist()]
    return {f'{name}{task}': float(correct[torch.tensor([t == task for t in row_tasks])].float().mean())
            for task in sorted({t for t in row_tasks if t})}


def online_pairs(scores, k):
    """Online DPO's pairs (dpo.py online=True) from scored samples: scores (N * k,), k adjacent
    samples per prompt -> (chosen, rejected) index tensors into the N * k samples, one pair per
    prompt whose samples did not all score the same: a best-scored sample (the first of equals)
    against a worst one. A prompt whose samples all tied has no preferred answer: it gives no pair.
    (Self-Rewarding Language Models, Yuan et al. 2024, build their pairs so: the highest- and
    lowest-scored of k samples, a tie discarded; Guo et al. 2024 and TRL's OnlineDPOTrainer let a
    judge order 2 samples.)"""
    groups = scores.view(-1, k)
    offset = torch.arange(len(groups), device=scores.device) * k
    varied = groups.amax(1) > groups.amin(1)
    return (offset + groups.argmax(1))[varied], (offset + groups.argmin(1))[varied]
