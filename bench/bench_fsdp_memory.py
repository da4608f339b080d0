"""
Training-state memory per rank, DDP vs FSDP2 (parallel='fsdp'), side by side in one torchrun job:
the bytes each rank holds in parameters, gradients and AdamW moments after one training step of
the same model (the tensors this rank stores; for FSDP, its shards). FSDP should hold about 1/N
of DDP's with N ranks; activations are the same in both and not counted.

    torchrun --standalone --nproc_per_node=4 bench/bench_fsdp_memory.py
    torchrun --standalone --nproc_per_node=2 bench/bench_fsdp_memory.py --n_layer=12 --n_embd=768
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# ----------------------------------------------------------------------------- config
n_layer = 8
n_embd = 512
n_head = 8
vocab_size = 8192
block_size = 128
batch_size = 2
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------


def local_bytes(tensors):
    """Bytes this rank stores for `tensors` (a DTensor: its local shard only)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def training_state_bytes(parallel, rank, world_size):
    """(parameters, gradients, optimizer moments) bytes on this rank after one step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    ctx = SimpleNamespace(fsdp=parallel == 'fsdp', sharded=None, device_type='cpu', dtype='float32')
    common.shard(ctx, model)
    params = list(model.parameters())
    optimizer = common.adamw(params, 1e-4, 0.1, (0.9, 0.95), 'cpu')
    wrapped = model if ctx.fsdp else DDP(model, broadcast_buffers=False)
    x = torch.randint(vocab_size, (batch_size, block_size), generator=torch.Generator().manual_seed(rank))
    _, loss = wrapped(x, x)
    loss.backward()
    grads = local_bytes(p.grad for p in params)
    optimizer.step()
    moments = local_bytes(t for s in optimizer.state.values() for k, t in s.items() if k != 'step')
    return local_bytes(params), grads, moments


def main():
    dist.init_process_group('gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = {}
    for parallel in ('ddp', 'fsdp'):
        sizes = torch.tensor(training_state_bytes(parallel, rank, world_size), dtype=torch.float64)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # the fullest rank
        rows[parallel] = sizes.tolist()
    if rank == 0:
        n = sum(p.numel() for p in GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                                                 n_head=n_head, n_embd=n_embd)).parameters())
        print(f"{n / 1e6:.1f}M parameters, {world_size} ranks; MiB per rank (the largest), fp32")
        print(f"{'':6} {'params':>8} {'grads':>8} {'adam':>8} {'total':>8}")
        for parallel, sizes in rows.items():
            print(f"{parallel:6} " + " ".join(f"{s / 2 ** 20:8.1f}" for s in sizes) + f" {sum(sizes) / 2 ** 20:8.1f}")
        print(f"fsdp / ddp: {sum(rows['fsdp']) / sum(rows['ddp']):.3f} (1/N = {1 / world_size:.3f})")
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
