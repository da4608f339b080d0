"""
Our GPT against nanoGPT's, per training step, side by side in one process, at nanoGPT's own
architecture (our flags: learned positions, LayerNorm, GELU, tied embeddings, no bias) and its CPU
Shakespeare shape (README: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128,
65 characters). One step = forward + backward + AdamW step, fp32, eager; best of `repeats` rounds,
the two models alternating so background load hits both alike.

nanoGPT is not a dependency: point the benchmark at a clone of it.
    git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT
    python bench/bench_nanogpt.py --nanogpt_dir=/path/to/nanoGPT     # or NANOGPT_DIR=/path/to/nanoGPT
"""

import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig  # noqa: E402
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- config
nanogpt_dir = os.environ.get('NANOGPT_DIR', '')
vocab_size = 65
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
steps = 50  # timed steps per round
repeats = 5
threads = 0  # 0 = torch's default
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------


def nanogpt_model_module():
    path = os.path.join(nanogpt_dir, 'model.py')
    if not nanogpt_dir or not os.path.exists(path):
        raise SystemExit("nanoGPT not found: git clone https://github.com/karpathy/nanoGPT and pass "
                         "--nanogpt_dir=PATH (or set NANOGPT_DIR)")
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(model, optimizer, x, y):
    def step():
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def ms_per_step(step):
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    if threads:
        torch.set_num_threads(threads)
    nano = nanogpt_model_module()
    torch.manual_seed(0)
    theirs = nano.GPT(nano.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                                     n_embd=n_embd, dropout=0.0, bias=False))
    ours = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         pos='learned', norm='layernorm', mlp='gelu', bias=False, tie_embeddings=True))
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, f"parameter counts differ: {n_ours:,} vs {n_theirs:,}"
    x = torch.randint(0, vocab_size, (batch_size, block_size))
    y = torch.randint(0, vocab_size, (batch_size, block_size))
    # nanoGPT's train.py optimizer settings for this recipe (fused AdamW is CUDA-only there)
    step_theirs = make_step(theirs, theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu'), x, y)
    step_ours = make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), x, y)
    for step in (step_ours, step_theirs):  # warm-up
        for _ in range(5):
            step()
    best_ours = best_theirs = float('inf')
    for _ in range(repeats):
        best_ours = min(best_ours, ms_per_step(step_ours))
        best_theirs = min(best_theirs, ms_per_step(step_theirs))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape L={n_layer} C={n_embd} H={n_head} "
          f"T={block_size} B={batch_size}, {n_ours / 1e6:.2f}M params, fp32 eager")
    print(f"ours {best_ours:.2f} ms/step, nanoGPT {best_theirs:.2f} ms/step: ours takes "
          f"{best_ours / best_theirs:.2f}x nanoGPT's time per step")


if __name__ == '__main__':
    main()
