"""
Per-token log-probs with their gradient, as DPO and PPO/GRPO need them: ours, chunk by chunk from
the hidden states (GPT.forward(ids, targets, reduction='none'), model.LinearTokenLogProbs), against
the usual way (TRL's): the full logits, log_softmax in fp32, gather. The same model and batch,
forward + backward of the summed log-probs, bf16 autocast where the CPU has native bf16; each
variant in its own process, so each peak is its own.

    python bench/bench_logprobs.py                                          # a GRPO micro-batch of config/grpo_tiny.py
    python bench/bench_logprobs.py --vocab_size=32768 --rows=16 --seq_len=256  # a DPO batch at a 32k vocabulary
"""

import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# ----------------------------------------------------------------------------- config
vocab_size = 4096
rows = 32  # sequences in the batch
seq_len = 67  # tokens per sequence (GRPO: a ~23-token prompt and 44 response tokens)
n_layer, n_embd, n_head, n_kv_head = 4, 128, 4, 2  # config/pretrain_tiny.py
steps = 10  # best of
variant = ''  # internal: the variant a child process measures
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

VARIANTS = ['chunked', 'full logits']


def measure(name):
    """In a fresh process: `steps` forward + backward passes of the summed log-probs; the best
    time, the peak RSS growth and the log-probs' sum (the two variants must agree)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=n_layer, n_head=n_head,
                          n_kv_head=n_kv_head, n_embd=n_embd))
    ids = torch.randint(0, vocab_size, (rows, seq_len))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -1
    bf16 = common.cpu_has_native_bf16()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            if name == 'chunked':
                logp = -model(ids, targets, reduction='none')[1]
            else:
                logits = model(ids)[0]
        if name != 'chunked':
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            logp = logp.masked_fill(targets == -1, 0.0)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({'variant': name, 'peak_mb': (peak - base) / 1024, 'ms': 1000 * min(times),
                      'sum': logp.sum().item(), 'bf16': bf16}))


def main():
    results = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, f'--variant={name}', f'--vocab_size={vocab_size}',
                               f'--rows={rows}', f'--seq_len={seq_len}', f'--steps={steps}'],
                              capture_output=True, text=True, cwd=ROOT)
        line = [l for l in proc.stdout.splitlines() if l.startswith('{')]
        if not line:
            raise SystemExit(proc.stdout + proc.stderr)
        results[name] = json.loads(line[-1])
    print(f"{rows} x {seq_len} tokens, vocabulary {vocab_size}, model ({n_layer}, {n_embd}), "
          f"{'bf16 autocast' if results['chunked']['bf16'] else 'fp32'}, {torch.get_num_threads()} threads")
    print(f"{'variant':<14}{'peak RSS growth':>16}{'ms fwd+bwd':>12}{'sum of log-probs':>18}")
    for name, r in results.items():
        print(f"{name:<14}{r['peak_mb']:>13,.0f} MB{r['ms']:>12,.1f}{r['sum']:>18,.2f}")
    c, f = results['chunked'], results['full logits']
    print(f"chunked / full logits: {c['ms'] / f['ms']:.2f}x the time, {c['peak_mb'] / f['peak_mb']:.2f}x the memory")


if __name__ == '__main__':
    if variant:
        measure(variant)
    else:
        main()
