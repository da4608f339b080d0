"""
How much of an eager decode step is Python and op dispatch rather than arithmetic: our model's
cached one-token forward (what generate.py runs when not compiled) against the same math written
flat, in one process, alternating, on the same cache contents.

    model  GPT.forward with a KVCache: the modules, as generation calls them
    flat   the same blocks without the module calls: F.linear on each layer's weights and
           model.py's own helpers (apply_rope, KVCache.update, attention)
    bare   the fewest ops we could write: weights transposed once, 2-D activations, the cache
           written by indexing, SDPA called directly (one row; at 8 rows model.attention's kernel)

Neither flat nor bare is used by the project (a second copy of the forward, for the default flags
only, bypassing the module calls that LoRA and FSDP hook into); they measure what the eager
decode goals against transformers would need. The logits of all three are checked equal.

    python bench/bench_decode_dispatch.py                       # pretrain_tiny's shape
    python bench/bench_decode_dispatch.py --batch_sizes="(1, 8, 32)"
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402
from generate import GenerationConfig, generate_ids  # noqa: E402
from model import GPT, GPTConfig, KVCache, apply_rope, attention  # noqa: E402

# -----------------------------------------------------------------------------
# model shape (default: config/pretrain_tiny.py, as bench_generate.py)
vocab_size = 4096
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
# what to measure
prompt_len = 16
steps = 500  # decode steps per timed run (positions prompt_len .. prompt_len + steps)
batch_sizes = (1, 8)
repeats = 5  # rounds of the three variants, alternating; the best of each reported
threads = 0  # torch intra-op threads; 0 = torch's default
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
config = GPTConfig(vocab_size=vocab_size, block_size=prompt_len + steps, n_layer=n_layer, n_head=n_head,
                   n_kv_head=n_kv_head, n_embd=n_embd)
model = GPT(config).eval()
nh, nkv, hs = config.n_head, config.n_kv_head, config.head_dim


def rms_norm(x, norm):
    """model.RMSNorm's arithmetic on its weight and eps."""
    xf = x.float()
    inv_rms = torch.rsqrt(torch.add(norm.eps, (xf * xf).sum(-1, keepdim=True), alpha=1 / x.size(-1)))
    return (xf * inv_rms * norm.weight).to(x.dtype)


def flat_step(token, position, cache):
    """One token per row through every block, without module calls; token (B, 1), position (1,)."""
    B = token.size(0)
    x = F.embedding(token, model.transformer.wte.weight)  # (B, 1, C)
    cos, sin = model.rope_cos[position, None], model.rope_sin[position, None]  # (1, 1, hs)
    for i, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        qkv = F.linear(rms_norm(x, block.ln_1), attn.c_attn.weight).view(B, 1, nh + 2 * nkv, hs)
        qk = apply_rope(qkv[:, :, :nh + nkv], cos, sin)
        k, v = cache.update(i, qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2))
        y = attention(qk[:, :, :nh].transpose(1, 2), k, v, None, is_causal=False, dropout=0.0, cached=True)
        x = x + F.linear(y.view(B, 1, nh * hs), attn.c_proj.weight)
        gate, up = F.linear(rms_norm(x, block.ln_2), mlp.c_fc.weight).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, mlp.c_proj.weight)
    cache.pos += 1
    return F.linear(rms_norm(x, model.transformer.ln_f), model.lm_head.weight)  # (B, 1, V)


def bare_weights():
    """Per layer: the norms' weights and the matmuls' weights transposed to (in, out), once."""
    return [(b.ln_1.weight, b.attn.c_attn.weight.t().contiguous(), b.attn.c_proj.weight.t().contiguous(),
             b.ln_2.weight, b.mlp.c_fc.weight.t().contiguous(), b.mlp.c_proj.weight.t().contiguous())
            for b in model.transformer.h]


def bare_step(weights, token, p, cache):
    """flat_step with 2-D activations (B, C), the position a Python int and fewer ops."""
    B = token.size(0)
    eps = config.norm_eps

    def norm(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w
    x = model.transformer.wte.weight[token.view(B)]  # (B, C)
    cos, sin = model.rope_cos[p], model.rope_sin[p]  # (hs,)
    for i, (w1, w_qkv, w_o, w2, w_fc, w_down) in enumerate(weights):
        qkv = norm(x, w1) @ w_qkv  # (B, (nh + 2 nkv) hs)
        qk = qkv[:, :(nh + nkv) * hs].view(B, nh + nkv, hs)
        qk = qk * cos + qk.roll(hs // 2, dims=-1) * sin
        cache.k[i][:, :, p] = qk[:, nh:]
        cache.v[i][:, :, p] = qkv[:, (nh + nkv) * hs:].view(B, nkv, hs)
        q, k, v = qk[:, :nh, None], cache.k[i][:, :, :p + 1], cache.v[i][:, :, :p + 1]
        if B == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            y = attention(q, k, v, None, is_causal=False, dropout=0.0, cached=True)
        x = x + y.view(B, nh * hs) @ w_o
        gate, up = (norm(x, w2) @ w_fc).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w_down
    return norm(x, model.transformer.ln_f.weight) @ model.lm_head.weight.t()  # (B, V)


def prefilled_cache(prompts):
    cache = KVCache(config, prompts.size(0), config.block_size, 'cpu', torch.float32)
    model(prompts, kv_cache=cache)
    return cache


@torch.inference_mode()
def check_equal(prompts, weights):
    caches = [prefilled_cache(prompts) for _ in range(3)]
    token = prompts[:, -1:]
    for p in range(prompt_len, prompt_len + 4):
        ref = model(token, positions=torch.tensor([p]), kv_cache=caches[0])[0]
        for name, logits in (('flat', flat_step(token, torch.tensor([p]), caches[1])),
                             ('bare', bare_step(weights, token, p, caches[2]).unsqueeze(1))):
            err = (logits - ref).abs().max().item()
            assert err < 1e-4, f"{name} step differs from the model's by {err:.2e}"


@torch.inference_mode()
def time_variant(name, prompts, weights):
    """Seconds per decode step over `steps` steps, from a freshly prefilled cache."""
    cache = prefilled_cache(prompts)
    token = prompts[:, -1:]
    positions = [torch.tensor([p]) for p in range(prompt_len, prompt_len + steps)]  # built before the clock
    t0 = time.perf_counter()
    for i, pos in enumerate(positions):
        if name == 'model':
            model(token, positions=pos, kv_cache=cache)
        elif name == 'flat':
            flat_step(token, pos, cache)
        else:
            bare_step(weights, token, prompt_len + i, cache)
    return (time.perf_counter() - t0) / steps


def generate_step_time(prompts):
    """Seconds per new token of generate_ids (greedy, no stop token): the forward plus the loop."""
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=steps, stop_token_ids=())
    generate_ids(model, prompts, GenerationConfig(temperature=0.0, max_new_tokens=8))  # warm-up
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_ids(model, prompts, greedy)
        best = min(best, time.perf_counter() - t0)
    return best / steps


print(f"shape: {n_layer} layers, {n_head} heads ({n_kv_head} kv), n_embd {n_embd}, vocab {vocab_size}; "
      f"{torch.get_num_threads()} threads, torch {torch.__version__}; {steps} decode steps after a "
      f"{prompt_len}-token prompt, best of {repeats} alternating rounds")
weights = bare_weights()
for B in batch_sizes:
    prompts = torch.randint(0, vocab_size, (B, prompt_len))
    check_equal(prompts, weights)
    best = {name: float('inf') for name in ('model', 'flat', 'bare')}
    for name in best:
        time_variant(name, prompts, weights)  # warm-up
    for _ in range(repeats):
        for name in best:
            best[name] = min(best[name], time_variant(name, prompts, weights))
    gen = generate_step_time(prompts)
    loop = gen - best['model']  # sampling, log-probs, bookkeeping
    print(f"batch {B}: model step {best['model'] * 1e6:.0f} us, flat {best['flat'] * 1e6:.0f} us "
          f"({best['flat'] / best['model']:.2f}x), bare {best['bare'] * 1e6:.0f} us ({best['bare'] / best['model']:.2f}x); "
          f"generate_ids {gen * 1e6:.0f} us a token, so with the flat step {gen / (loop + best['flat']):.2f}x "
          f"and the bare one {gen / (loop + best['bare']):.2f}x its speed", flush=True)
