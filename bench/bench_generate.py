"""
Decode speed of generate.py against (a) our own model without a KV cache (the whole sequence is
recomputed for every token) and (b) Hugging Face transformers' generate() on a LlamaForCausalLM of
the same shape (RoPE, RMSNorm, SwiGLU, GQA, tied embeddings; random weights, nothing downloaded).
All in one process, greedy, fixed length (no stop token), the same prompt.

    pip install transformers        # for this benchmark only; not a project dependency
    python bench/bench_generate.py                                   # pretrain_tiny's shape, CPU
    python bench/bench_generate.py --n_layer=6 --n_head=6 --n_kv_head=6 --n_embd=384 --threads=1
    python bench/bench_generate.py --device=cuda --compile_model=True

tok/s = new tokens (all rows) / wall time of the whole call, prefill included, best of `repeats`.
"""

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from generate import GenerationConfig, compile_decode_step, generate_ids  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
# model shape (default: config/pretrain_tiny.py, with room for 512 new tokens)
vocab_size = 4096
block_size = 1024
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
# what to measure
prompt_len = 16
new_tokens = 512
batch_sizes = (1, 8)
nocache_batch_sizes = (1,)  # the uncached path is O(T^2): slow by design
repeats = 2  # best of
threads = 0  # torch intra-op threads; 0 = torch's default
device = 'cpu'
compile_model = False  # also time the torch.compile'd decode step
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                   n_kv_head=n_kv_head, n_embd=n_embd)
model = GPT(config).to(device).eval()
prompt = torch.randint(0, vocab_size, (prompt_len,), device=device)
greedy = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens, stop_token_ids=())


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def tokens_per_second(run, batch_size):
    """Best of `repeats` timed runs, after one short warm-up."""
    best = float('inf')
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - t0)
    return batch_size * new_tokens / best


def ours(batch_size, step_fn=None):
    prompts = prompt.expand(batch_size, -1)
    generate_ids(model, prompts, GenerationConfig(temperature=0.0, max_new_tokens=8), step_fn=step_fn)  # warm-up
    return tokens_per_second(lambda: generate_ids(model, prompts, greedy, step_fn=step_fn), batch_size)


@torch.inference_mode()
def ours_no_cache(batch_size):
    prompts = prompt.expand(batch_size, -1)
    return tokens_per_second(lambda: model.generate(prompts, new_tokens, temperature=0, use_cache=False), batch_size)


def hf_llama():
    """A LlamaForCausalLM with our model's shape, or None if transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf_config = LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=config.mlp_hidden,
                            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                            max_position_embeddings=block_size, rms_norm_eps=1e-6, rope_theta=config.rope_theta,
                            tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(hf_config).to(device).eval()
    ours_params, hf_params = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in hf.parameters())
    assert ours_params == hf_params, f"shapes differ: ours {ours_params:,} params, Llama {hf_params:,}"
    return hf


def hf_generate(hf, batch_size):
    ids = prompt.expand(batch_size, -1)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    return tokens_per_second(lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw),
                             batch_size)


# the measurements
print(f"shape: {n_layer} layers, {n_head} heads ({n_kv_head} kv), n_embd {n_embd}, vocab {vocab_size}; "
      f"{model.get_num_params() / 1e6:.2f}M params; {device}, {torch.get_num_threads()} threads, "
      f"torch {torch.__version__}")
print(f"prompt {prompt_len} tokens, {new_tokens} new tokens, greedy, best of {repeats}")
hf = hf_llama()
if hf is None:
    print("note: transformers is not installed (pip install transformers): skipping the HF comparison")
else:
    import transformers
    print(f"transformers {transformers.__version__}")
rows = []
for B in batch_sizes:
    row = {'batch': B, 'ours': ours(B)}
    if compile_model:
        t0 = time.perf_counter()
        step_fn = compile_decode_step(model)  # what TextGenerator(compile=True) does
        generate_ids(model, prompt.expand(B, -1), greedy, step_fn=step_fn)  # pays for (re)compiling
        print(f"(compiled the decode step in {time.perf_counter() - t0:.0f}s)")
        row['compiled'] = ours(B, step_fn)
    row['no cache'] = ours_no_cache(B) if B in nocache_batch_sizes else None
    row['transformers'] = hf_generate(hf, B) if hf is not None else None
    rows.append(row)
    print(f"batch {B}: " + ', '.join(f"{k} {v:,.0f} tok/s" for k, v in row.items() if k != 'batch' and v is not None),
          flush=True)

print("\nspeed-ups (decode tok/s ratios):")
for row in rows:
    for name in ('ours', 'compiled'):
        if row.get(name) is None:
            continue
        ratios = [f"{row[name] / row[other]:5.1f}x {other}" for other in ('no cache', 'transformers') if row[other]]
        print(f"batch {row['batch']}: {name:8s} {row[name]:8,.0f} tok/s = " + ', '.join(ratios))
