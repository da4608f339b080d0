"""
The plumbing every stage script shares, as plain functions. A stage script (train.py, sft.py,
reward.py, dpo.py, ppo.py) runs, top to bottom:

    ctx = setup(...)                          DDP, device, per-rank seed, autocast + GradScaler
    ckpt, parent = start_from(ctx, ...)       the previous stage's checkpoint (or its own, to resume)
    ... its model and data ...
    shard(ctx, model)                         parallel='fsdp' only: FSDP2, before the optimizer
    optimizer = adamw(params, ...)            decay on matrices only (train.py: build_optimizer, AdamW or Muon)
    resume_training(ctx, ckpt, optimizer)     optimizer, loss scale, random streams
    model = wrap(ctx, model, compile_model)   torch.compile, then DDP
    log, stop = start_logging(ctx, ...)       config.json, history.jsonl, wandb (or a no-op), Ctrl-C
    while True:                               the loop stays in the script
        set_lr; evaluate -> after_eval (log, save); micro-steps; optimizer_step; log_step; stop.requested
    finish(ctx, log, interrupted, summary)

Checkpoints: out_dir/ckpt.pt is always the latest state (what init_from=resume continues);
out_dir/best.pt the best by validation loss, never overwritten by a worse model. The next stage
starts from best.pt by default (init_checkpoint='latest' takes ckpt.pt). Each checkpoint names
its `parent`: the checkpoint file its run started from (DPO's and PPO's reference, LoRA's base).
"""

import ctypes
import datetime
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, Block, GPTConfig
from tokenizer import from_spec


# ----------------------------------------------------------------------------- device and DDP

def autodetect_device():
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """True on a CPU with bf16 matmul instructions (AVX-512 BF16 or AMX, read from /proc/cpuinfo on
    Linux), where bf16 autocast is the fast path (here ~6x the fp32 matmul peak); elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16'}) and torch.backends.mkldnn.is_available()


def emulated_dtype_warning(device_type, dtype):
    """A warning when dtype is bf16 or fp16 on a CPU without bf16 matmul instructions (AVX2-only
    x86, e.g. AMD Zen 3), else None. There torch emulates the half-precision matmuls: on a Zen 3
    core pair, 2026-12-07, bf16 matmuls ran at 0.3-15 GFLOP/s against fp32's 65-145 and a
    pretrain_tiny step took 8.6 s in bf16 against 0.5 s in fp32. It is the user's choice, so warn."""
    if device_type != 'cpu' or dtype not in ('bfloat16', 'float16') or cpu_has_native_bf16():
        return None
    return (f"warning: dtype={dtype} on this CPU, which has no bf16 matmul instructions (AVX-512 BF16 or AMX): "
            "torch emulates it, and a training step runs many times slower than in float32 (17x on a Zen 3 "
            "CPU). Use --dtype=float32 (or auto).")


def inference_precision(device, dtype):
    """(device, torch dtype) to sample or serve in: device 'auto' = the best available; dtype 'auto'
    = bf16 on GPUs that support it, else fp32 (weights are cast, no autocast: nothing is trained)."""
    if device == 'auto':
        device = autodetect_device()
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
    if ptdtype is None:
        raise SystemExit(f"dtype={dtype!r}: expected float32, bfloat16, float16 or auto")
    warning = emulated_dtype_warning(device.split(':')[0], dtype)
    if warning:
        print(warning, file=sys.stderr)
    return device, ptdtype


DIST_TIMEOUT = datetime.timedelta(minutes=10)  # longer than any eval or save rank 0 makes the others wait for


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
    # a collective that waits longer than this for a peer fails (default 30 min); see README, Multi-node
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo', timeout=DIST_TIMEOUT)
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


# Datasheet dense matmul peaks, (bf16/fp16, tf32) FLOP/s, by the exact name torch reports (NVIDIA's
# product pages; no sparsity). 'NVIDIA L4' must not match the L40S, nor an H100 PCIe the SXM part.
GPU_PEAK_FLOPS = {
    'NVIDIA H200': (989e12, 494e12), 'NVIDIA H100 80GB HBM3': (989e12, 494e12), 'NVIDIA H100 PCIe': (756e12, 378e12),
    'NVIDIA A100-SXM4-80GB': (312e12, 156e12), 'NVIDIA A100-SXM4-40GB': (312e12, 156e12),
    'NVIDIA A100-PCIE-40GB': (312e12, 156e12), 'NVIDIA A100 80GB PCIe': (312e12, 156e12),
    'NVIDIA L40S': (362e12, 183e12), 'NVIDIA L4': (121e12, 60e12), 'NVIDIA A10': (125e12, 62.5e12),
    'NVIDIA GeForce RTX 4090': (165e12, 82.6e12), 'NVIDIA GeForce RTX 3090': (71e12, 35.6e12),
}


def cpu_peak_dtype(dtype):
    """The dtype whose matmul peak bounds a CPU step in `dtype`: bf16 where the CPU has bf16
    instructions, else fp32 (emulated bf16 runs on the fp32 units)."""
    return 'bfloat16' if dtype == 'bfloat16' and cpu_has_native_bf16() else 'float32'


def measure_peak_flops(device_type, dtype, sizes=(512, 1024, 2048), seconds=0.3):
    """Matmul FLOP/s this machine reaches in `dtype`: the denominator of MFU. On GPUs we take the
    datasheet's dense figure for the dtype (bf16/fp16, else tf32) when the device's exact name is
    in GPU_PEAK_FLOPS, else 0 (MFU unknown): measuring would need a warm, idle GPU. On a CPU, the
    best rate of square matmuls of a few sizes, `seconds` in all: where the cache holds a 512^2
    problem but not a 2048^2 one, the largest alone reads low (a 2-core Zen 4 VM, fp32: 166-168
    against 133-160 GFLOP/s) and MFU read over 100%. Without bf16 instructions bf16 is emulated
    in fp32 units: the fp32 peak is the hardware's (one emulated 2048^3 bf16 matmul took ~60 s)."""
    if device_type == 'cuda':
        half, tf32 = GPU_PEAK_FLOPS.get(torch.cuda.get_device_name().strip(), (0.0, 0.0))
        return half if dtype in ('bfloat16', 'float16') else tf32
    ptdtype = getattr(torch, cpu_peak_dtype(dtype))
    return max(matmul_rate(n, ptdtype, seconds / len(sizes)) for n in sizes)


def matmul_rate(n, dtype, seconds):
    """FLOP/s of an n x n by n x n matmul in `dtype` on the CPU, timed over ~`seconds`."""
    g = torch.Generator().manual_seed(0)  # not the global stream: a resumed run's dropout must not shift
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
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


def load_checkpoint(out_dir, device='cpu', which='best'):
    """Load a checkpoint safely (weights_only: no code runs): a .pt path, or an out_dir's best.pt
    (which='best', when the run kept one) or its ckpt.pt, the latest state (which='latest').
    'hf:PATH' imports a transformers model directory (hf.py) as a checkpoint of stage 'hf'."""
    if out_dir.startswith('hf:'):
        import hf
        return hf.checkpoint_from_hf(out_dir.removeprefix('hf:'))
    path = checkpoint_path(out_dir, which)
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
    """Ours (bpe, char, gpt2) or an imported model's own (hf), by the spec's kind."""
    return from_spec(ckpt['tokenizer'])


def rng_state(data_generator=None):
    """The random streams of this process: torch's (dropout, sampling) and the data generator's."""
    state = {'torch': torch.get_rng_state()}
    if data_generator is not None:
        state['data'] = data_generator.get_state()
    if torch.cuda.is_available():  # this rank's device only: a resume may run on other or fewer GPUs
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, data_generator=None):
    torch.set_rng_state(state['torch'].cpu())
    if data_generator is not None:
        data_generator.set_state(state['data'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())  # onto the current device


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
    """Set by SIGINT/SIGTERM; the training loop asks requested() after every step, then saves and
    exits cleanly. Alone, a second Ctrl-C interrupts at once. Under torchrun a rank gets the
    signal twice (from the terminal, then forwarded by torchrun), and torchrun kills every rank
    30 s later: there repeats are ignored, and the ranks must agree on the step they stop at
    well within those 30 s, whatever log_interval is."""

    def __init__(self, ddp=False):
        self.stop, self.ddp = False, ddp
        self.vote, self.pending = None, None  # under DDP: the vote in flight (see requested)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.stop and not self.ddp:
            raise KeyboardInterrupt
        if not self.stop:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting")
        self.stop = True

    def requested(self, ctx):
        """True on every rank if any rank was signalled: ranks must leave the loop together.
        Under DDP every step starts a vote (an all-reduce of one CPU number over gloo,
        asynchronous: no GPU sync, no stall) and reads the vote of the step before, which has long
        finished: all ranks read the same result at the same step, one step after the signal."""
        if not ctx.ddp:
            return self.stop
        decided = self._result()
        if not decided:
            self.vote = torch.tensor([float(self.stop)])
            self.pending = dist.all_reduce(self.vote, op=dist.ReduceOp.MAX, group=ctx.stop_group, async_op=True)
        return decided

    def _result(self):
        if self.pending is None:
            return False
        self.pending.wait()
        self.pending = None
        return bool(self.vote.item())

    def close(self):
        """Finish the vote in flight (every rank started it) before the process group goes."""
        self._result()


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


# ----------------------------------------------------------------------------- a stage's life

def keep_freed_memory(limit=1 << 30):
    """glibc malloc: blocks up to `limit` bytes come from the heap and freed memory stays in the
    process for the next allocation, instead of a fresh mmap (and its page faults) for every large
    tensor of an eager step and memory handed back to the OS after it. What jemalloc or tcmalloc
    give, and torch.backends.xeon.run_cpu sets up. Measured here in bf16: GRPO's iteration
    (config/grpo_tiny.py) 1.45 -> 1.35 s, pretrain_tiny's eager step 178 -> 170 ms, Shakespeare's
    unchanged (30 ms); peak memory +2%. The resident size stays near its peak. No-op without glibc."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, limit)
    libc.mallopt(M_TRIM_THRESHOLD, limit)


def setup(device, dtype, seed, out_dir, gradient_accumulation_steps=None, parallel='ddp'):
    """The process group (under torchrun), the device, a per-rank seed (dropout and sampling
    differ per rank; data order comes from seeded generators that every rank shares), TF32 on
    CUDA, autocast and GradScaler, out_dir. gradient_accumulation_steps is the total over ranks
    (as in nanoGPT), so a run's batch does not depend on the number of ranks. parallel: 'ddp'
    (each rank holds the whole model and optimizer) | 'fsdp' (FSDP2: sharded over the ranks, see
    shard()). Returns a namespace of these facts; ctx.ddp is True under torchrun either way."""
    if parallel not in ('ddp', 'fsdp'):
        raise SystemExit(f"parallel={parallel!r}: use 'ddp' or 'fsdp'")
    ddp, rank, local_rank, world_size, device = setup_distributed(device)
    if parallel == 'fsdp' and not ddp:
        raise SystemExit("parallel='fsdp' shards the model over the ranks of torchrun: launch with "
                         "`torchrun --nproc_per_node=N` (N=1 works), or use parallel='ddp'")
    if parallel == 'fsdp' and dtype == 'float16':
        raise SystemExit("parallel='fsdp' with dtype='float16' is not supported (the loss scaler would skip steps per "
                         "shard): use dtype='bfloat16'")
    # the stop vote runs on CPU tensors (see StopFlag): where training uses nccl it needs a gloo group
    stop_group = dist.new_group(backend='gloo') if ddp and dist.get_backend() != 'gloo' else None
    accum_per_rank = None
    if gradient_accumulation_steps is not None:
        if gradient_accumulation_steps % world_size:
            raise SystemExit(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by "
                             f"the number of ranks ({world_size})")
        accum_per_rank = gradient_accumulation_steps // world_size
    device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
    torch.manual_seed(seed + rank)
    if device_type == 'cpu':
        keep_freed_memory()
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast, scaler, dtype = autocast_context(device_type, dtype)
    if rank == 0:
        warning = emulated_dtype_warning(device_type, dtype)
        if warning:
            print(warning, file=sys.stderr)
        os.makedirs(out_dir, exist_ok=True)
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0,
                           device=device, device_type=device_type, autocast=autocast, scaler=scaler, dtype=dtype,
                           accum_per_rank=accum_per_rank, seed=seed, out_dir=out_dir, stop_group=stop_group,
                           fsdp=parallel == 'fsdp', sharded=None,  # shard(): the FSDP root module
                           steps=0, skipped_steps=torch.zeros((), device=device))  # optimizer steps taken/skipped


def checkpoint_path(path, which='best'):
    """A .pt path (or an 'hf:' model) as it is; an out_dir -> its best.pt (which='best', when the run
    kept one) or ckpt.pt."""
    if path.endswith('.pt') or path.startswith('hf:'):
        return path
    best = os.path.join(path, 'best.pt')
    return best if which == 'best' and os.path.exists(best) else os.path.join(path, 'ckpt.pt')


def start_from(ctx, init_from, init_checkpoint='best'):
    """(checkpoint, parent) a stage starts from. init_from='resume': out_dir's ckpt.pt (the latest
    state) and the parent it recorded. Otherwise the run in init_from: its best.pt (or ckpt.pt,
    with init_checkpoint='latest' or when it kept no best); that file is the parent."""
    if init_checkpoint not in ('best', 'latest'):
        raise SystemExit(f"init_checkpoint={init_checkpoint!r}: use 'best' or 'latest'")
    if init_from == 'resume':
        ckpt = load_checkpoint(ctx.out_dir, which='latest')
        missing = [k for k in ('optimizer', 'scaler', 'rng', 'iter_num', 'parent') if k not in ckpt]
        if missing:
            raise SystemExit(f"{ctx.out_dir}/ckpt.pt cannot be resumed: it has no {', '.join(missing)} (written by an "
                             f"older version, or not by a training stage); start the stage again from its init_from")
        return ckpt, ckpt['parent']
    source_dir = os.path.dirname(init_from) if init_from.endswith('.pt') else init_from
    if os.path.abspath(source_dir) == os.path.abspath(ctx.out_dir):
        raise SystemExit(f"init_from={init_from!r} is this run's own out_dir: use --init_from=resume to continue it, "
                         f"or another out_dir (its files would be replaced by this run's)")
    path = checkpoint_path(init_from, init_checkpoint)
    return load_checkpoint(path), path


def adamw(params, learning_rate, weight_decay, betas, device_type, scaled=(), lr_scale=1.0, fused=True):
    """AdamW with weight decay on matrices (Linear weights, embeddings, expert weights) and none on
    vectors (biases, norm gains), as in GPT-2/nanoGPT. `scaled` parameters learn at lr_scale x the
    learning rate (PPO's critic); set_lr applies each group's lr_scale. The fused kernel on CUDA and
    the CPU: one kernel for all parameters. On the CPU it is ~6x faster at the optimizer step (1.3M
    params: 3.6 -> 0.6 ms; 5.5M: 16.1 -> 2.3 ms) and agrees with the foreach one to 2e-8 over 200
    steps. It was off on the CPU after one SFT run's arithmetic came out at 60% (2026-12-01); from
    one pretrained model, five fused SFT runs (2026-12-06/07, task suites 4 and 5) gave arithmetic
    90.9-96.3% and multiplication 68.4-79.4%, against 86.6-94.4% and 57.7-79.3% for eleven foreach
    runs, and identity on suite 5 97.9-98.3% against 93.3-99.6%. (optimizer_step still skips a
    non-finite step on the host on the CPU: the norm is computed already, so the check costs nothing.)"""
    groups = []
    for members, scale in ((list(params), 1.0), (list(scaled), lr_scale)):
        groups += [{'params': [p for p in members if p.dim() >= 2], 'weight_decay': weight_decay, 'lr_scale': scale},
                   {'params': [p for p in members if p.dim() < 2], 'weight_decay': 0.0, 'lr_scale': scale}]
    fused = fused and device_type in ('cuda', 'cpu')
    return torch.optim.AdamW([g for g in groups if g['params']], lr=learning_rate, betas=betas, fused=fused)


class MuonAdamW:
    """Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/; torch.optim.Muon) for
    the transformer blocks' weight matrices, AdamW for everything else (embeddings, the head, norm
    gains, biases, 3-D expert weights), as nanochat and modded-nanogpt split them. Muon's update is
    the momentum orthogonalised by Newton-Schulz; adjust_lr_fn='match_rms_adamw' (Moonshot's
    "Muon is Scalable for LLM Training") scales it to AdamW's update RMS, so the stage's learning
    rate, schedule and weight decay apply to both. One object with the optimizer interface the
    stage skeleton uses (param_groups, step, zero_grad, state_dict), so nothing else changes."""

    def __init__(self, muon_params, adamw_params, learning_rate, weight_decay, betas, momentum=0.95):
        self.muon = torch.optim.Muon(muon_params, lr=learning_rate, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn='match_rms_adamw')
        # unfused on any device: optimizer_step then skips a non-finite step on the host, for both
        self.adamw = adamw(adamw_params, learning_rate, weight_decay, betas, 'cpu', fused=False)
        self.defaults = {}

    @property
    def param_groups(self):  # read each time: load_state_dict replaces the optimizers' group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict()}

    def load_state_dict(self, state):
        if set(state) != {'muon', 'adamw'}:
            raise SystemExit("the checkpoint's optimizer state is AdamW's: resume with --optim=adamw")
        self.muon.load_state_dict(state['muon'])
        self.adamw.load_state_dict(state['adamw'])


def build_optimizer(ctx, name, model, params, learning_rate, weight_decay, betas):
    """optim='adamw' | 'muon' (MuonAdamW: Muon on the 2-D weights inside the blocks)."""
    if name == 'adamw':
        return adamw(params, learning_rate, weight_decay, betas, ctx.device_type)
    if name != 'muon':
        raise SystemExit(f"optim={name!r}: use 'adamw' or 'muon'")
    if ctx.fsdp or ctx.scaler.is_enabled():
        raise SystemExit("optim='muon' runs without FSDP (it orthogonalises whole matrices) and without "
                         "float16's loss scaling: use parallel='ddp' and dtype bfloat16 or float32")
    trainable = {id(p) for p in params}
    hidden = [p for block in model.transformer.h for name, p in block.named_parameters()
              if p.dim() == 2 and 'router' not in name and id(p) in trainable]  # an MoE router stays with AdamW
    hidden_ids = {id(p) for p in hidden}
    return MuonAdamW(hidden, [p for p in params if id(p) not in hidden_ids], learning_rate, weight_decay, betas)


def set_lr(optimizer, it, config):
    """The learning rate of step `it` from the stage's schedule keys (learning_rate, min_lr,
    warmup_iters, lr_decay_iters, lr_schedule, wsd_decay_frac), set on every group x its lr_scale."""
    lr = get_lr(it, config['learning_rate'], config['min_lr'], config['warmup_iters'], config['lr_decay_iters'],
                config['lr_schedule'], config['wsd_decay_frac'])
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr


def resume_training(ctx, ckpt, optimizer, generator=None):
    """Restore what makes a resumed run continue the same curve: the optimizer, the fp16 loss scale
    the GradScaler had reached, the random streams. Only rank 0's torch stream is saved, so under
    DDP each rank is re-seeded (by rank and step): ranks never share a stream (dropout).
    Returns (iter_num, best_val_loss) to continue from."""
    load_optimizer_state(ctx, optimizer, ckpt['optimizer'])
    if ckpt['scaler']:  # empty from a run outside fp16 (a disabled GradScaler saves nothing): start fresh
        ctx.scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'], generator)
    if ctx.ddp:
        torch.manual_seed(ctx.seed + ctx.world_size * ckpt['iter_num'] + ctx.rank)
    return ckpt['iter_num'], ckpt['best_val_loss']


def shard(ctx, model):
    """parallel='fsdp': FSDP2 shards the parameters, gradients and optimizer state over the ranks
    (each holds 1/N), in place. Each transformer block is its own unit, gathered just before it
    runs and freed after; the embedding, head and final norm form the root unit (torchtitan's
    recipe). On the GPU in bf16, parameters are cast to bf16 for compute and gradients reduced in
    fp32. Call it before the optimizer is built: the parameters become sharded DTensors. Under
    DDP it does nothing (wrap() adds DDP)."""
    if not ctx.fsdp:
        return model
    # FSDP's modules are imported here, where they are used: at the top they add ~0.7 s to the start
    # of every script (and of every test that runs one), FSDP or not
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    with torch.no_grad():  # rank 0's weights everywhere (each rank initialised with its own seed), as DDP does
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    half = ctx.device_type == 'cuda' and ctx.dtype == 'bfloat16'
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    ctx.sharded = model
    return model


@contextmanager
def gathered(ctx):
    """Under FSDP: the root unit's parameters (embedding, head, final norm) gathered for calls that
    bypass the root module's forward, e.g. generating with the policy inside PPO's ActorCritic
    (each block gathers its own). The root must have run one forward first (FSDP picks its root
    at the first forward)."""
    if not ctx.fsdp:
        yield
        return
    ctx.sharded.unshard()
    try:
        yield
    finally:
        ctx.sharded.reshard()


# No buffer sync in the forward: the only buffers (the RoPE tables, RMSNorm's eps) are the same on
# every rank, and the sync would cost a collective per forward and hang an eval where some rank has
# no batch. torch 2.13 renamed the argument (the old name warns on every rank); older torch has only that.
NO_BUFFER_SYNC = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                  else {'broadcast_buffers': False})


def wrap(ctx, model, compile_model):
    """torch.compile (optional), then DDP under torchrun (FSDP: shard() did it). Keep the
    unwrapped model for saving."""
    if compile_model:
        if ctx.master:
            print("compiling the model (the first step takes a while)...")
        model = torch.compile(model)
    if ctx.ddp and not ctx.fsdp:
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device_type == 'cuda' else None, **NO_BUFFER_SYNC)
    return model


def eval_module(ctx, model, raw_model):
    """The module a stage's evaluations call: on a CPU the unwrapped, uncompiled one. Compiled, an
    eval (no_grad, eval mode) builds a second graph. From a cold inductor cache, eager evals saved
    pretrain_tiny 7 s net (147 -> 140 s; its seven evals ~0.8 s slower each) and sft_tiny 14 s in
    200 steps (78 -> 64 s). On a GPU, whose evals are larger, `model` as it is."""
    return raw_model if ctx.device_type == 'cpu' else model


def sync_grads(ctx, model, last_micro_step):
    """Gradients are all-reduced (DDP) or reduce-scattered (FSDP) on the last micro-step of an
    optimizer step only."""
    if ctx.fsdp:
        ctx.sharded.set_requires_gradient_sync(last_micro_step)
    elif ctx.ddp:
        model.require_backward_grad_sync = last_micro_step


def optimizer_step(ctx, optimizer, params, grad_clip):
    """Unscale (fp16), clip to grad_clip (0 = no clipping), step, update the loss scale, zero the
    grads. Returns the gradient norm before clipping (a tensor: no host sync).
    A step whose gradient is not finite (a NaN or inf loss, an overflow) is skipped, weights and
    moments left as they were. On the GPU with no host sync: the fused AdamW reads `found_inf`
    (as it does under the fp16 GradScaler, which skips with its own). On the CPU the norm is
    already computed when it is read, so the check costs no stall. ctx counts the skipped steps;
    log_step reports them."""
    ctx.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float('inf'))
    if ctx.fsdp:  # the norm is a DTensor: its value over all shards, the same on every rank
        norm = norm.full_tensor()
    found_inf = (~torch.isfinite(norm)).float()
    if ctx.scaler.is_enabled():
        ctx.scaler.step(optimizer)  # skips a non-finite step itself
    elif optimizer.defaults.get('fused') and norm.device.type != 'cpu':
        optimizer.found_inf = found_inf
        optimizer.step()
    elif not found_inf.item():
        optimizer.step()
    ctx.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ctx.steps += 1
    ctx.skipped_steps += found_inf
    return norm


def sum_over_ranks(ctx, x):
    """x (a tensor) summed over the ranks (a collective: call it on every rank)."""
    if ctx.ddp:
        x = x.clone()
        dist.all_reduce(x)
    return x


def rank_share(ctx, items):
    """This rank's share of `items` (every world_size-th) as (item, weight) pairs, weight 1. Under
    FSDP every forward is a collective, so every rank must make as many: a rank short of one
    gets the first item again with weight 0 (its result is not counted)."""
    mine = [(item, 1.0) for item in items[ctx.rank::ctx.world_size]]
    if ctx.fsdp:
        mine += [(items[0], 0.0)] * (-(-len(items) // ctx.world_size) - len(mine))
    return mine


def mean_over_ranks(ctx, x):
    """x (a tensor) averaged over the ranks (a collective: call it on every rank)."""
    return sum_over_ranks(ctx, x) / ctx.world_size


def model_state(ctx, module):
    """module.state_dict() with whole tensors: under FSDP each sharded tensor is gathered from the
    ranks (a collective: every rank calls it), so any single process can load the checkpoint."""
    state = module.state_dict()
    if ctx.fsdp:
        from torch.distributed.tensor import DTensor  # imported where used (see shard)
        state = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}
    return state


def optimizer_state(ctx, optimizer):
    """optimizer.state_dict(), the same layout under FSDP (where the state is gathered from the
    shards, a collective): parameters numbered in param_groups order. So a checkpoint resumes
    under FSDP, DDP or alone, whatever wrote it."""
    if not ctx.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # see shard
    full = get_optimizer_state_dict(ctx.sharded, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.master:
        return None  # only rank 0 receives the gathered state
    index, groups = {}, []
    for group in full['param_groups']:
        groups.append({**group, 'params': [index.setdefault(name, len(index)) for name in group['params']]})
    return {'state': {index[name]: s for name, s in full['state'].items()}, 'param_groups': groups}


def load_optimizer_state(ctx, optimizer, state):
    """The inverse of optimizer_state: under FSDP each rank keeps its shard of the saved state."""
    if set(state) == {'muon', 'adamw'} and not isinstance(optimizer, MuonAdamW):
        raise SystemExit("the checkpoint's optimizer state is Muon's (optim='muon'): resume with --optim=muon")
    if not ctx.fsdp:
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # see shard
    name_of = {id(p): name for name, p in ctx.sharded.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group['params']]
    full = {'state': {names[i]: s for i, s in state['state'].items()},
            'param_groups': [{**group, 'params': [names[i] for i in group['params']]} for group in state['param_groups']]}
    set_optimizer_state_dict(ctx.sharded, optimizer, full, options=StateDictOptions(full_state_dict=True))


def checkpoint(ctx, stage, model_state, model_args, tokenizer, config, parent, dataset, optimizer, iter_num,
               generator=None, **extra):
    """The one checkpoint layout: what a sample needs (model, model_args, tokenizer, stage), the
    lineage (config as the user ran it, parent, the pretraining dataset), what a resume needs
    (optimizer, loss scale, random streams, iter_num; save() adds best_val_loss), and the stage's
    extras (reward head, LoRA adapters, value head, ...). model_state: from model_state()."""
    return {'stage': stage, 'model': model_state, 'model_args': model_args, 'tokenizer': tokenizer.spec,
            'tokenizer_identity': tokenizer.identity, 'config': config, 'parent': parent, 'dataset': dataset,
            'optimizer': optimizer_state(ctx, optimizer), 'scaler': ctx.scaler.state_dict(), 'rng': rng_state(generator),
            'iter_num': iter_num, **extra}


def save(ctx, state_fn, best_val_loss, best=False, reason='latest'):
    """Rank 0 builds the checkpoint (state_fn(): the stage's checkpoint(...) call) and writes it to
    out_dir/ckpt.pt (the latest) and, when best, to out_dir/best.pt without the optimizer (the
    weights the next stage starts from). Each write is atomic. Under FSDP every rank builds it
    (gathering the shards is a collective); rank 0 writes it."""
    if not ctx.master and not ctx.fsdp:
        return
    state = state_fn()
    if not ctx.master:
        return
    if not all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point()):
        raise SystemExit(f"the weights at step {state['iter_num']} are not finite: not saved; the last good checkpoint "
                         f"in {ctx.out_dir} is intact. Lower learning_rate or raise warmup_iters.")
    state['best_val_loss'] = best_val_loss
    save_checkpoint(state, os.path.join(ctx.out_dir, 'ckpt.pt'))
    if best:
        save_checkpoint({k: v for k, v in state.items() if k != 'optimizer'}, os.path.join(ctx.out_dir, 'best.pt'))
    print(f"saved {ctx.out_dir}/ckpt.pt{' and best.pt' if best else ''} at step {state['iter_num']} ({reason})")


def after_eval(ctx, log, iter_num, metrics, best_val_loss, trained, state):
    """Log an eval, then the one save decision: once this run has trained a step, ckpt.pt (the
    latest) at every eval, and best.pt as well when val/loss improved on the best so far.
    state() builds the checkpoint. Returns the best val loss so far."""
    log_eval(ctx, log, iter_num, metrics)
    improved, best_val_loss = metrics['val/loss'] < best_val_loss, min(best_val_loss, metrics['val/loss'])
    if trained:
        save(ctx, state, best_val_loss, best=improved, reason='val loss improved' if improved else 'latest')
    return best_val_loss


class NoWandb:
    """Stands in for a wandb run when there is none, so loops never ask `if wandb_run:`."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def start_logging(ctx, config, resume, iter_num, wandb_log, wandb_project, wandb_run_name):
    """Rank 0 writes config.json; a fresh run starts history.jsonl anew and drops a best.pt left
    by an earlier run in out_dir (a resumed run appends and keeps it). Returns (log, stop flag):
    log holds the history path, the wandb run (or a no-op) and the step timer."""
    history = os.path.join(ctx.out_dir, 'history.jsonl')
    if ctx.master:
        with open(os.path.join(ctx.out_dir, 'config.json'), 'w') as f:
            json.dump(config, f, indent=2)
        if not resume:
            open(history, 'w').close()
            if os.path.exists(os.path.join(ctx.out_dir, 'best.pt')):
                os.remove(os.path.join(ctx.out_dir, 'best.pt'))
    wandb_run = init_wandb(wandb_log and ctx.master, wandb_project, wandb_run_name, config) or NoWandb()
    now = time.time()
    stop = StopFlag(ctx.ddp)
    log = SimpleNamespace(history=history, wandb=wandb_run, t_start=now, t_last=now, iter_last=iter_num,
                          steps_last=ctx.steps, skipped_last=0, stop=stop)
    return log, stop


def _write_history(log, iter_num, kind, metrics):
    with open(log.history, 'a') as f:
        f.write(json.dumps({'iter': iter_num, 'kind': kind, **metrics, 'time': time.time() - log.t_start}) + '\n')


def log_eval(ctx, log, iter_num, metrics):
    """An eval's metrics (floats, named 'val/...'): one console line, a history.jsonl row, wandb.
    A non-finite val/loss stops the run (the last good checkpoint stays as it was)."""
    if ctx.master and metrics:
        print(f"step {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        _write_history(log, iter_num, 'eval', metrics)
        log.wandb.log(metrics, step=iter_num)
    if not math.isfinite(metrics.get('val/loss', 0.0)):
        raise SystemExit(f"val loss is {metrics['val/loss']} at step {iter_num}; the last good checkpoint in "
                         f"{ctx.out_dir} was kept. Lower learning_rate, raise warmup_iters, or use "
                         f"dtype=bfloat16/float32.")


def step_time(log, iter_num):
    """Seconds per step since the previous call (the first call: since logging started)."""
    now = time.time()
    dt = (now - log.t_last) / max(iter_num - log.iter_last, 1)
    log.t_last, log.iter_last = now, iter_num
    return dt


def log_step(ctx, log, iter_num, max_iters, metrics, dt, per_step=None, show=None):
    """Training metrics of a log step (floats; 'train/loss' first): one console line with the
    speed and the ETA (of the keys in `show`, default all), a history.jsonl row, wandb.
    per_step = (count, unit) processed per step, e.g. (tokens, 'tok'), shown per second.
    Skipped steps (non-finite gradients) are counted in train/skipped_steps. When the loss is not
    finite and every optimizer step since the last log was skipped, training is stuck and stops
    unsaved. (With a finite loss they are the fp16 GradScaler finding its scale, or a passing spike.)"""
    loss, skipped = metrics.get('train/loss', 0.0), int(ctx.skipped_steps.item())
    window, window_skipped = ctx.steps - log.steps_last, skipped - log.skipped_last
    log.steps_last, log.skipped_last = ctx.steps, skipped
    if not math.isfinite(loss) and window and window_skipped == window:
        raise SystemExit(f"train loss is {loss} at step {iter_num}, and all {window} optimizer steps since the last log "
                         f"had non-finite gradients (skipped): stopping without saving; the last good checkpoint in "
                         f"{ctx.out_dir} is intact. Lower learning_rate or raise warmup_iters.")
    metrics = {**metrics, 'train/skipped_steps': float(skipped)}
    if not ctx.master:
        return
    if window_skipped:
        print(f"warning: {window_skipped} of the last {window} optimizer steps had non-finite gradients and were skipped")
    speed = f", {per_step[0] / dt:,.0f} {per_step[1]}/s" if per_step else ''
    shown = [(k.split('/')[-1], v) for k, v in metrics.items()
             if (show is None or k in show) and not (k == 'train/skipped_steps' and not v)]
    fields = ", ".join(f"{name} {v:.2e}" if name == 'lr' else f"{name} {v:.4f}" for name, v in shown)
    print(f"iter {iter_num}: {fields}, {dt * 1000:.0f} ms/step{speed}, eta {format_eta((max_iters - iter_num) * dt)}")
    _write_history(log, iter_num, 'train', metrics)
    log.wandb.log(metrics, step=iter_num)


def finish(ctx, log, interrupted, summary):
    """The end of every stage: a summary line, wandb finished, DDP torn down, and exit code 130
    when interrupted (saved, but not finished: a pipeline must not take the stage as done)."""
    if ctx.master:
        print(f"done: {summary} in {time.time() - log.t_start:.1f} s")
        log.wandb.finish()
    log.stop.close()
    cleanup_distributed(ctx.ddp)
    code = 130 if interrupted else 0
    if ctx.ddp:
        # leave without the interpreter's teardown: the model still holds the process group, and
        # gloo's threads can hold tensors whose release there needs the GIL and aborts the rank
        # now and then ("terminate called without an active exception"; see pytorch#179291)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if interrupted:
        sys.exit(code)
