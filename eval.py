"""
Evaluate any stage's checkpoint on equal terms: held-out loss and bits per byte on a prepared
dataset's val.bin, and the task metrics on the built-in suite's held-out items.
    python eval.py --out_dir=out-sft
    python eval.py --out_dir=out-tiny --score_tasks=False --json_out=eval.json
    python eval.py --out_dir=out-qwen-id --score_tasks=False --chat_file=held_out.jsonl --expect=Nova

chat_file scores your own held-out chat JSONL (OpenAI "messages" or MiniMind "conversations"):
each conversation up to its last assistant turn is the prompt, and the greedy reply is compared
with that turn (file_exact) and, with expect, must contain that text (file_contains).
"""

import json
import math
import os
import time

import numpy as np
import torch

import common
import corpus
import data
import heldout
import tasks as task_suite
from configurator import configure

# ----------------------------------------------------------------------------- config
out_dir = 'out-sft'  # the checkpoint to evaluate
dataset = ''  # prepared dataset for loss/bpb; '' = the one the checkpoint's lineage pretrained on
data_root = 'data'
eval_batches = 20  # batches of batch_size x block_size tokens from val.bin
batch_size = 8
score_tasks = True  # task metrics by greedy generation on the held-out suite
items_per_task = 1000
chat_file = ''  # your own held-out chat JSONL, scored by greedy generation
expect = ''  # chat_file: text every reply should contain (e.g. the assistant's new name)
max_new_tokens = 64  # chat_file replies
json_out = ''  # also write the metrics here
device = 'auto'
seed = 1337
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

device = common.autodetect_device() if device == 'auto' else device
ckpt = common.load_checkpoint(out_dir, device='cpu')
model = common.model_from_checkpoint(ckpt).to(device).eval()
tokenizer = common.tokenizer_from_checkpoint(ckpt)
metrics = {'out_dir': out_dir, 'stage': ckpt.get('stage', '?'), 'iter': ckpt.get('iter_num')}
t0 = time.time()


@torch.no_grad()
def val_loss(data_path):
    """Mean loss over fixed random windows of the val tokens, and bits per byte from meta.json."""
    with open(os.path.join(data_path, 'meta.json')) as f:
        meta = json.load(f)
    if meta['tokenizer_identity'] != tokenizer.identity:
        print(f"note: {data_path} uses another tokenizer than {out_dir}; skipping loss/bpb")
        return {}
    # the largest val shard (one, unless val passed prepare.py's shard_tokens): windows never cross shards
    path, _ = max(corpus.token_shards(data_path, meta, 'val'), key=lambda shard: shard[1])
    val = np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')
    T = model.config.block_size
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(eval_batches):
        ix = torch.randint(len(val) - T - 1, (batch_size,), generator=generator).tolist()
        chunk = torch.from_numpy(np.stack([val[i:i + T + 1] for i in ix]).astype(np.int64)).to(device)
        losses.append(model(chunk[:, :-1], chunk[:, 1:])[1].item())
    loss = sum(losses) / len(losses)
    bpb = loss / math.log(2) / (meta['val_bytes'] / meta['val_tokens']) if meta.get('val_bytes') else float('nan')
    return {'val_loss': loss, 'val_bpb': bpb}


# held-out loss / bits per byte
name = dataset or ckpt.get('dataset') or 'stdlib'  # stages carry their pretraining dataset forward
data_path = os.path.join(data_root, name)
if os.path.exists(os.path.join(data_path, 'meta.json')):
    metrics.update(val_loss(data_path))
else:
    print(f"note: no prepared dataset at {data_path}; skipping loss/bpb (python prepare.py --dataset={name})")

# task metrics
if score_tasks:
    items = task_suite.heldout(task_suite.ensure_tasks(os.path.join(data_root, 'tasks')))
    per_item = {}  # each item's score, in order: pipeline.py's report pairs them between stages (McNemar)
    metrics.update(heldout.task_metrics(model, tokenizer, items, items_per_task, per_item=per_item))

# your own held-out conversations
if chat_file:
    metrics.update(heldout.chat_file_metrics(model, tokenizer, data.load_sft([chat_file]), expect, max_new_tokens))

metrics['eval_seconds'] = time.time() - t0
print(json.dumps(metrics, indent=1))
if json_out:
    with open(json_out, 'w') as f:
        json.dump({**metrics, 'per_item': per_item} if score_tasks else metrics, f, indent=1)
