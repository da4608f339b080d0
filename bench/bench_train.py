"""
Training throughput of our GPT vs transformers' LlamaForCausalLM of identical shape (same dims,
GQA, RoPE, SwiGLU, RMSNorm, tied embeddings), side by side in one process: one training step =
forward + backward + AdamW step. Prints tokens/s, the ratio ours/transformers, and MFU against the
matmul peak measured here in the same run.

    pip install transformers   # for this benchmark only
    python bench/bench_train.py                      # all shapes, eager, fp32 and bf16
    python bench/bench_train.py --compile_model=True       # also torch.compile (first compile ~20 s each)
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from configurator import configure  # noqa: E402
from common import measure_peak_flops  # noqa: E402

# ----------------------------------------------------------------------------- config
# (n_layer, n_embd, n_head, n_kv_head, block_size, batch_size)
shapes = [(4, 128, 4, 2, 256, 8), (6, 256, 8, 4, 256, 8), (8, 512, 8, 2, 512, 4)]
vocab_size = 4096
dtypes = ('float32', 'bfloat16')
compile_model = False
steps = 8  # timed steps per measurement (after warmup)
repeats = 3  # ours/theirs measured alternately this many times; the best of each is kept
fused_adamw = True  # both models' AdamW fused, as our scripts run it (transformers' Trainer: optim='adamw_torch_fused')
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def build_pair(n_layer, n_embd, n_head, n_kv_head, block_size):
    hidden = 64 * ((8 * n_embd // 3 + 63) // 64)
    ours = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                         n_kv_head=n_kv_head, n_embd=n_embd, mlp_hidden=hidden, norm='rmsnorm', pos='rope',
                         mlp='swiglu', tie_embeddings=True, bias=False))
    theirs = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=block_size,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, rope_theta=10000.0,
        attn_implementation='sdpa'))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"parameter counts differ: {n_ours} vs {n_theirs}"
    return ours, theirs, n_ours


def make_step(model, is_ours, dtype, use_compile):
    """A closure running one training step on a fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw)
    fwd = torch.compile(model) if use_compile else model
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

    def step(x, y):
        with autocast:
            loss = fwd(x, y)[1] if is_ours else fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def tokens_per_second(step, x, y):
    for _ in range(2):  # warmup (and compile)
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return x.numel() * steps / (time.perf_counter() - t0)


def main():
    torch.manual_seed(0)
    peaks = {d: measure_peak_flops('cpu', d, seconds=1.0) for d in dtypes}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak: "
          + ", ".join(f"{d} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items())
          + f"; AdamW {'fused' if fused_adamw else 'foreach'} for both")
    print(f"{'shape (L,C,H,KV,T,B)':<26}{'mode':<18}{'ours tok/s':>12}{'hf tok/s':>12}{'ratio':>8}{'MFU ours':>10}{'MFU hf':>8}")
    modes = [(d, False) for d in dtypes] + ([(d, True) for d in dtypes] if compile_model else [])
    for shape in shapes:
        n_layer, n_embd, n_head, n_kv_head, block_size, batch_size = shape
        ours, theirs, n_params = build_pair(n_layer, n_embd, n_head, n_kv_head, block_size)
        x = torch.randint(0, vocab_size, (batch_size, block_size))
        y = torch.roll(x, -1, dims=1)
        # 6 FLOPs per parameter per token (the tied head counted once), plus attention
        flops_per_token = 6 * n_params + 12 * n_layer * n_embd * block_size
        for dtype, use_compile in modes:
            step_ours = make_step(ours, True, dtype, use_compile)
            step_theirs = make_step(theirs, False, dtype, use_compile)
            best_ours = best_theirs = 0.0
            for _ in range(repeats):  # alternate so background load hits both alike
                best_ours = max(best_ours, tokens_per_second(step_ours, x, y))
                best_theirs = max(best_theirs, tokens_per_second(step_theirs, x, y))
            mode = f"{dtype}{' compiled' if use_compile else ' eager'}"
            mfu = [t * flops_per_token / peaks[dtype] * 100 for t in (best_ours, best_theirs)]
            print(f"{str(shape):<26}{mode:<18}{best_ours:>12,.0f}{best_theirs:>12,.0f}{best_ours / best_theirs:>7.2f}x"
                  f"{mfu[0]:>9.1f}%{mfu[1]:>7.1f}%", flush=True)


if __name__ == '__main__':
    main()
