"""
torch.compile's cost up front, from a cold inductor cache (a fresh machine) and a warm one, and the
steps after it: our model compiled as the training scripts compile it, against the same model with
the chunked loss inlined into its graph (how it compiled before model.chunked_cross_entropy ran
the chunks through one small graph of their own). Each run is its own process with its own
inductor cache directory, one after the other, alternating, so that neither finds the other's
kernels; bf16 autocast, forward + backward + AdamW, as train.py steps.

    python bench/bench_compile.py                                   # pretrain_tiny's shape
    python bench/bench_compile.py --shape=6,256,8,4,256,8 --rounds=2

The first step's time is the compile (the step itself is ~0.15 s at pretrain_tiny's shape).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- config
shape = '4,128,4,2,256,16'  # layers, width, heads, kv heads, T, batch (pretrain_tiny)
vocab_size = 4096
steps = 30  # timed steps after the first (median reported)
rounds = 2  # cold + warm pairs of each variant, alternating
variant = ''  # internal: set in the child processes
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

VARIANTS = {'ours': 'the chunks through one compiled graph', 'inlined': 'the chunk loop inlined in the model graph'}


def child():
    """One run: build, compile, time the first step and then `steps` more; print JSON."""
    import torch
    import model as M
    if variant == 'inlined':  # the loss traced into the model's graph, its loop unrolled per chunk
        def inlined_loss(h, weight, targets):
            dtype = M.compute_dtype(h)
            with torch.autocast('cpu', enabled=False):
                return M.LinearCrossEntropy.apply(h, weight, targets, M.loss_chunk_rows(weight.size(0), 'cpu'), dtype,
                                                  M.chunk_loss_and_grads)
        M.cross_entropy_from_hidden = inlined_loss
    L, C, H, KV, T, B = map(int, shape.split(','))
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(vocab_size=vocab_size, block_size=T, n_layer=L, n_head=H, n_kv_head=KV, n_embd=C))
    compiled = torch.compile(gpt)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, vocab_size, (B, T + 1))

    def step():
        with torch.autocast('cpu', torch.bfloat16):
            _, loss = compiled(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({'first': first, 'step': sorted(times)[len(times) // 2], 'loss': loss}))


def run(name, cache_dir):
    env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': cache_dir}
    out = subprocess.run([sys.executable, __file__, f'--variant={name}', f'--shape={shape}', f'--steps={steps}',
                          f'--vocab_size={vocab_size}'], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    print(f"shape (layers, width, heads, kv heads, T, batch) {shape}, vocab {vocab_size}; bf16 autocast; "
          f"first step (the compile) and the median of {steps} steps after it")
    results = {name: {'cold': [], 'warm': [], 'step': []} for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in VARIANTS:
                cache = os.path.join(tmp, f'{name}-{r}')
                for kind in ('cold', 'warm'):  # the second run finds the first one's cache
                    res = run(name, cache)
                    results[name][kind].append(res['first'])
                    results[name]['step'].append(res['step'])
                    print(f"  {name:8s} {kind}: first step {res['first']:5.1f} s, then {res['step'] * 1000:6.1f} ms/step "
                          f"(loss {res['loss']:.4f})", flush=True)
    mean = statistics.mean
    o, i = results['ours'], results['inlined']
    for name in VARIANTS:
        r = results[name]
        print(f"{name:8s} ({VARIANTS[name]}): cold {mean(r['cold']):.1f} s, warm {mean(r['warm']):.1f} s, "
              f"step {mean(r['step']) * 1000:.1f} ms")
    print(f"ours / inlined: cold compile {mean(o['cold']) / mean(i['cold']):.2f}x, warm {mean(o['warm']) / mean(i['warm']):.2f}x, "
          f"step {mean(o['step']) / mean(i['step']):.2f}x")


if __name__ == '__main__':
    child() if variant else main()
