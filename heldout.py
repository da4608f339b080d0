"""
Task metrics on held-out items of the built-in suite, the same for every stage so that stages
compare on equal terms:
    identity_acc   greedy reply == the canonical identity answer
    arith_acc      exact match of the final number
    mul_acc        exact match of the final number after the working (47*38 = 47*30 + 47*8 = ...)
    chat_acc       the expected fact/reply appears
    code_loss      mean loss on the reference function bodies (generation of code is too long to
                   score by exact match on a tiny model; its loss still moves with training)
"""

import math

import torch

import common
import tasks
from generate import TextGenerator

GENERATED_TASKS = {'identity': 'identity_acc', 'arithmetic': 'arith_acc', 'chat': 'chat_acc', 'multiplication': 'mul_acc'}


@torch.no_grad()
def task_metrics(model, tokenizer, items, per_task=100, max_new_tokens=48, batch_size=128, per_item=None):
    """items: {task: [{'messages', 'answer'}]} (tasks.heldout). Greedy generation, batched (128 rows:
    1,000 arithmetic and 1,000 multiplication problems in 2.7 s against 3.3 s in batches of 64, the
    same answers; the pipeline evaluates ~20 times). per_item: a dict to receive each task's item
    scores, in order (for McNemar between checkpoints)."""
    was_training = model.training
    model.eval()
    generator = TextGenerator(model, tokenizer)
    metrics = {}
    for task, name in GENERATED_TASKS.items():
        chosen = items.get(task, [])[:per_task]
        if not chosen:
            continue
        scores = []
        for i in range(0, len(chosen), batch_size):
            batch = chosen[i:i + batch_size]
            prompts = [tokenizer.render_prompt(it['messages']) for it in batch]
            replies = generator.generate(prompts, temperature=0.0, max_new_tokens=max_new_tokens)
            scores += [tasks.score(task, reply, it['answer']) for reply, it in zip(replies, batch)]
        metrics[name] = sum(scores) / len(scores)
        if per_item is not None:
            per_item[task] = scores
    code = items.get('code', [])[:per_task]
    if code:
        metrics['code_loss'] = reply_loss(model, tokenizer, code)
    model.train(was_training)
    return metrics


def stage_metrics(ctx, model, tokenizer, items, per_task):
    """task_metrics as a training stage logs them (val/arith_acc, ...): greedy decoding in the
    stage's dtype, on rank 0, or on every rank under FSDP (where each forward is a collective);
    {} on the other ranks and when there is nothing to evaluate."""
    if not per_task or not items or not (ctx.master or ctx.fsdp):
        return {}
    with ctx.autocast:  # decode in the stage's dtype, as it trains
        return {f'val/{k}': v for k, v in task_metrics(model, tokenizer, items, per_task).items()}


def mcnemar(before, after):
    """McNemar's test on paired right/wrong outcomes of the same items (McNemar 1947): gained = right
    only after, lost = right only before. z = (gained - lost) / sqrt(gained + lost); p is the exact
    two-sided binomial p-value (gained ~ Binomial(gained + lost, 1/2) when nothing changed), right
    for the small counts a tiny model's change gives. Returns (gained, lost, z, p)."""
    assert len(before) == len(after), "McNemar needs the same items before and after"
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    n = gained + lost
    if n == 0:
        return 0, 0, 0.0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return gained, lost, (gained - lost) / math.sqrt(n), min(1.0, 2 * tail)


@torch.no_grad()
def chat_file_metrics(model, tokenizer, conversations, expect='', max_new_tokens=64, batch_size=32):
    """Your own held-out conversations: the greedy reply to each conversation up to its last
    assistant turn, against that turn. file_exact: the share equal to it (whitespace stripped);
    file_contains (with expect): the share that contain `expect`. Prints a few replies."""
    items = [(c[:max(i for i, m in enumerate(c) if m['role'] == 'assistant')], c) for c in conversations
             if any(m['role'] == 'assistant' for m in c)]
    if not items:
        raise SystemExit("chat_file has no conversation with an assistant turn to compare against")
    was_training = model.training
    model.eval()
    generator = TextGenerator(model, tokenizer)
    replies = []
    for i in range(0, len(items), batch_size):
        prompts = [tokenizer.render_prompt(prompt) for prompt, _ in items[i:i + batch_size]]
        replies += generator.generate(prompts, temperature=0.0, max_new_tokens=max_new_tokens)
    model.train(was_training)
    references = [conv[len(prompt)]['content'] for prompt, conv in items]
    for (prompt, _), reply in list(zip(items, replies))[:3]:
        print(f"{prompt[-1]['content']!r} -> {reply!r}")
    metrics = {'file_items': len(items),
               'file_exact': sum(r.strip() == ref.strip() for r, ref in zip(replies, references)) / len(items)}
    if expect:
        metrics['file_contains'] = sum(expect in r for r in replies) / len(items)
    return metrics


@torch.no_grad()
def reply_loss(model, tokenizer, items, batch_size=16):
    """Mean per-token loss of the reference answers (assistant tokens only)."""
    block = model.config.block_size - 1
    encoded = [common.encode_conversation(tokenizer, it['messages'] + [{'role': 'assistant', 'content': it['answer']}], block)
               for it in items]
    encoded = [e for e in encoded if e is not None]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        ids, tgt, _ = common.pack_rows(encoded[i:i + batch_size], max(len(e[0]) for e in encoded[i:i + batch_size]),
                                       tokenizer.pad_id, packing=False)
        logits, _ = model(ids.to(device))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.to(device).flatten(),
                                                 ignore_index=-1, reduction='sum')
        total += loss.item()
        count += (tgt != -1).sum().item()
    return total / max(count, 1)
