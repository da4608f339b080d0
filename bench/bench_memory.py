"""
Peak memory (RSS) and time of a training step: our GPT vs transformers' Llama of the same shape,
each with and without activation (gradient) checkpointing. Every variant runs in its own process,
so each peak is its own.

    pip install transformers   # for this benchmark only
    python bench/bench_memory.py
    python bench/bench_memory.py --dtype=bfloat16   # bf16 autocast, as the scripts train on a CPU with native bf16
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- config
shape = (6, 256, 8, 4, 512, 8)  # (n_layer, n_embd, n_head, n_kv_head, block_size, batch_size)
vocab_size = 4096
steps = 3
dtype = 'float32'  # 'float32' | 'bfloat16' (autocast, both models)
variant = ''  # internal: the variant a child process measures
config = configure(globals())  # overrides from --key=value arguments
if dtype not in ('float32', 'bfloat16'):
    raise SystemExit(f"dtype={dtype!r}: use float32 or bfloat16")
# -----------------------------------------------------------------------------

VARIANTS = ['ours', 'ours+checkpointing', 'hf', 'hf+checkpointing']


def measure(name):
    """In a fresh process: build the model, run `steps` training steps, report peak RSS growth."""
    sys.argv = sys.argv[:1]  # bench_train reads its own config from the command line on import
    import bench_train  # the same model pair as the throughput bench
    bench_train.vocab_size = vocab_size
    n_layer, n_embd, n_head, n_kv_head, block_size, batch_size = shape
    ours, theirs, _ = bench_train.build_pair(n_layer, n_embd, n_head, n_kv_head, block_size)
    is_ours = name.startswith('ours')
    model = ours if is_ours else theirs
    del theirs, ours
    if name.endswith('checkpointing'):
        if is_ours:
            model.config.grad_checkpoint = True
        else:
            model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (batch_size, block_size))
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, x)[1] if is_ours else model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'variant': name, 'peak_mb': (peak - base) / 1024, 'ms_per_step': 1000 * min(times)}))


def main():
    print(f"shape (L,C,H,KV,T,B) = {shape}, vocab {vocab_size}, {dtype}, {torch.get_num_threads()} threads")
    results = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, f'--variant={name}', f'--shape={shape}',
                               f'--dtype={dtype}'],
                              capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__)))
        line = [l for l in proc.stdout.splitlines() if l.startswith('{')]
        if not line:
            raise SystemExit(proc.stdout + proc.stderr)
        results[name] = json.loads(line[-1])
    print(f"{'variant':<22}{'peak RSS growth':>16}{'ms/step':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['peak_mb']:>13,.0f} MB{r['ms_per_step']:>10,.0f}")
    o, h = results['ours'], results['hf']
    oc = results['ours+checkpointing']
    print(f"memory ours/hf: {o['peak_mb'] / h['peak_mb']:.2f}x; checkpointing (ours): "
          f"{oc['peak_mb'] / o['peak_mb']:.2f}x memory, {oc['ms_per_step'] / o['ms_per_step']:.2f}x time")


if __name__ == '__main__':
    if variant:
        measure(variant)
    else:
        main()
