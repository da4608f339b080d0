"""
The plumbing every stage script shares, as plain functions: device and DDP setup, autocast,
learning-rate schedules, atomic checkpoints, signal handling, wandb, and log formatting.
"""

import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- device and DDP

def autodetect_device():
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def setup_distributed(device):
    """Under torchrun (RANK set) start a process group: nccl on CUDA, gloo on CPU.
    Returns (ddp, rank, local_rank, world_size, device)."""
    if device == 'auto':
        device = autodetect_device()
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, local_rank, world_size, device


def cleanup_distributed(ddp):
    if ddp:
        # wait for every rank (rank 0 may still be saving): tearing gloo down while a peer is
        # still connected can abort the process
        dist.barrier()
        dist.destroy_process_group()


def autocast_context(device_type, dtype):
    """(context manager for forward passes, GradScaler). dtype: 'float32' | 'bfloat16' | 'float16'.
    'auto' is bf16 on GPUs that support it, else fp32 (fp32 is the CPU default: bf16 autocast on
    CPU is faster only on CPUs with AMX/AVX-512 bf16, so it is opt-in)."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    return ctx, scaler, dtype


def measure_peak_flops(device_type, dtype, n=2048, seconds=0.3):
    """Matmul FLOP/s this machine reaches in `dtype`: the denominator of MFU. On GPUs we take the
    datasheet's dense bf16 figure when known (measuring would need a warm, idle GPU)."""
    if device_type == 'cuda':
        name = torch.cuda.get_device_name()
        table = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, '4090': 165e12, '3090': 71e12}
        return next((v for k, v in table.items() if k in name), 0.0)
    ptdtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
    a, b = torch.randn(n, n, dtype=ptdtype), torch.randn(n, n, dtype=ptdtype)
    a @ b  # warm up
    t0, count = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- LR schedule

def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, schedule='cosine', decay_frac=0.2):
    """Linear warmup, then
    cosine: cosine decay to min_lr at lr_decay_iters (GPT-3, nanoGPT);
    wsd:    warmup-stable-decay, constant until the last decay_frac of lr_decay_iters, then linear
            to min_lr (MiniCPM, Hu et al. 2024);
    constant: no decay."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == 'constant':
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    if schedule == 'wsd':
        decay_start = lr_decay_iters - int(decay_frac * lr_decay_iters)
        if it < decay_start:
            return learning_rate
        return learning_rate + (min_lr - learning_rate) * (it - decay_start) / max(1, lr_decay_iters - decay_start)
    assert schedule == 'cosine', f"unknown lr schedule {schedule!r} (cosine, wsd, constant)"
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """Write to a temp file, then rename: a crash or Ctrl-C mid-save leaves the last good one."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(out_dir, device='cpu'):
    """Load out_dir/ckpt.pt (or a path to a .pt file) safely (weights_only: no code runs)."""
    path = out_dir if out_dir.endswith('.pt') else os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train that stage first, or check init_from/out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ('model', 'model_args', 'tokenizer') if k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a Mini-LLM checkpoint (missing {', '.join(missing)})")
    return ckpt


def model_from_checkpoint(ckpt, **overrides):
    """Rebuild the GPT of a checkpoint and load its weights. overrides change config fields that
    do not affect the weights (dropout, grad_checkpoint, ...)."""
    args = dict(ckpt['model_args'], **overrides)
    model = GPT(GPTConfig(**args))
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in ckpt['model'].items()}
    model.load_state_dict(state)
    return model


def tokenizer_from_checkpoint(ckpt):
    return Tokenizer(ckpt['tokenizer'])


def rng_state(data_generator):
    state = {'torch': torch.get_rng_state(), 'data': data_generator.get_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, data_generator):
    torch.set_rng_state(state['torch'].cpu())
    data_generator.set_state(state['data'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


# ----------------------------------------------------------------------------- chat batches

def encode_conversation(tokenizer, messages, max_len):
    """Messages -> (input ids, targets) of at most max_len tokens, targets = next token where it
    is an assistant token (content or <|im_end|>) and -1 elsewhere. None when truncation left no
    assistant token to learn (the caller drops and counts it)."""
    ids, mask = tokenizer.render_chat(messages, max_len=max_len + 1)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    if all(t == -1 for t in targets):
        return None
    return ids[:-1], targets


def pack_rows(encoded, max_len, pad_id, packing=True):
    """[(ids, targets)] -> tensors (rows, max_len): ids, targets, doc. Packed: sequences are laid
    end to end, in order, a new row when the next does not fit; padded: one per row. doc numbers
    the sequences within a row (-1 on padding), for packed_attention()."""
    rows, cur = [], None
    for ids, targets in encoded:
        if cur is None or not packing or len(cur[0]) + len(ids) > max_len:
            cur = ([], [], [])  # a new row
            rows.append(cur)
        doc_id = cur[2][-1] + 1 if cur[2] else 0
        cur[0].extend(ids)
        cur[1].extend(targets)
        cur[2].extend([doc_id] * len(ids))
    ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), max_len), -1, dtype=torch.long)
    doc = torch.full((len(rows), max_len), -1, dtype=torch.long)
    for r, (i, t, d) in enumerate(rows):
        ids[r, :len(i)], tgt[r, :len(t)], doc[r, :len(d)] = torch.tensor(i), torch.tensor(t), torch.tensor(d)
    return ids, tgt, doc


def packed_attention(doc):
    """doc ids (B, T) -> positions (B, T) restarting at 0 for each sequence, and a block-diagonal
    causal mask (B, 1, T, T): a token attends to earlier tokens of its own sequence only."""
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    idx = torch.arange(T, device=doc.device).expand_as(doc)
    positions = idx - torch.where(starts, idx, 0).cummax(dim=1).values
    return positions, mask[:, None]


# ----------------------------------------------------------------------------- stopping

class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop checks it between steps, saves and exits cleanly
    (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.stop = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting")
        self.stop = True

    def should_stop(self, ddp, device):
        """True on every rank if any rank was signalled (ranks must leave the loop together)."""
        if not ddp:
            return self.stop
        flag = torch.tensor([float(self.stop)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------- logging

def init_wandb(enabled, project, run_name, config):
    """Start wandb if asked. With no API key it runs offline (one line says so) rather than
    failing; if wandb is missing or cannot start, training goes on without it."""
    if not enabled:
        return None
    try:
        import wandb
    except ImportError:
        print("note: wandb_log=True but wandb is not installed (pip install wandb); logging to stdout only")
        return None
    has_key = os.environ.get('WANDB_API_KEY') or os.path.exists(os.path.expanduser('~/.netrc'))
    if not has_key and os.environ.get('WANDB_MODE') not in ('offline', 'disabled'):
        print("note: no wandb API key found; wandb runs offline (sync later with `wandb sync`)")
        os.environ['WANDB_MODE'] = 'offline'
    try:
        return wandb.init(project=project, name=run_name, config=config)
    except Exception as e:
        print(f"note: wandb could not start ({type(e).__name__}: {e}); logging to stdout only")
        return None


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- preference pairs

def encode_reply(tokenizer, prompt_messages, reply):
    """(ids, prompt length): the rendered prompt (ending in the assistant header), then the reply
    and its <|im_end|>, laid out as render_chat lays out an assistant turn."""
    prompt = tokenizer.render_prompt(prompt_messages)
    return prompt + tokenizer.encode(reply) + [tokenizer.im_end_id], len(prompt)


def encode_pairs(tokenizer, pairs, max_len):
    """Preference pairs [{'prompt_messages', 'chosen', 'rejected'}] -> tensors, built once:
    ids (N, 2, max_len) with [chosen, rejected] right-padded, prompt_len (N,), length (N, 2),
    and the indices of the pairs kept. A pair whose longer answer does not fit in max_len is
    dropped, not cut: cutting could remove the very tokens that tell the two answers apart."""
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
    return ids, torch.tensor(prompt_lens, dtype=torch.long), length, kept


def length_grouped_batch(lengths, batch_size, index, seed, pool=32):
    """Example indices (batch_size,) of micro-batch number `index`: drawn with replacement like
    torch.randint, but a pool of `pool` batches at a time is sorted by length, so that a batch
    holds examples of similar length and pads little (HF's group_by_length). A pure function of
    (index, seed): resuming needs no sampler state, and every rank can compute any batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index // pool)
    ix = torch.randint(len(lengths), (pool * batch_size,), generator=g)
    ix = ix[lengths[ix].argsort(stable=True)].view(pool, batch_size)
    return ix[torch.randperm(pool, generator=g)[index % pool]]
