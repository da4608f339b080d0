"""
Sample from a checkpoint of any stage (pretrain, sft, dpo, ppo, ...), or chat with it.

    python sample.py --out_dir=out-tiny                                # 3 samples, each a fresh document
    python sample.py --out_dir=out-tiny --start="def " --temperature=0  # greedy continuation of a prompt
    python sample.py --out_dir=out-tiny --start=FILE:prompt.txt          # the prompt from a file
    python sample.py --out_dir=out-sft --chat=True                       # multi-turn chat in the terminal
    printf 'hi\\nand then?\\n' | python sample.py --out_dir=out-sft --chat=True   # one turn per line

The model, its config and its tokenizer all come from the checkpoint. In chat, '/reset' starts a
new conversation and '/quit' (or the end of the input) leaves.
"""

import os
import sys
import time

import torch

from common import checkpoint_path, inference_precision, load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from configurator import configure
from generate import GenerationConfig, TextGenerator

# -----------------------------------------------------------------------------
# checkpoint
out_dir = 'out'  # a run's folder (its best.pt, else ckpt.pt), or a path to a .pt file
# what to generate
start = ''  # the prompt, or FILE:path to read it from a file; '' starts a fresh document
num_samples = 3
max_new_tokens = 256
# sampling (temperature 0 = greedy)
temperature = 0.8
top_k = 200  # 0 = off
top_p = 1.0  # 1 = off
min_p = 0.0  # 0 = off
repetition_penalty = 1.0  # 1 = off; ~1.1-1.3 helps small models that loop
presence_penalty = 0.0
frequency_penalty = 0.0
num_beams = 1  # > 1: beam search (deterministic; the sampling options above are ignored)
length_penalty = 1.0
stop_strings = []  # e.g. --stop_strings="['\n\n']"; the end-of-text and <|im_end|> tokens always stop
seed = 1337
# chat
chat = False
system = ''  # a system prompt for chat
max_turns = 0  # keep at most this many past turns in the prompt; 0 = as many as fit the context
# system
device = 'auto'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'; auto picks the best available
dtype = 'auto'  # 'float32' | 'bfloat16' | 'float16'; auto = bf16 on GPUs that support it, else fp32
compile_model = False  # torch.compile the decode step: a slow first call, faster long generations
# -----------------------------------------------------------------------------
config = configure(globals())  # overrides from the command line or a config file
# -----------------------------------------------------------------------------

device, ptdtype = inference_precision(device, dtype)  # 'auto': the best device, bf16 on GPUs that have it
torch.manual_seed(seed)

# the checkpoint: weights_only loading (no code runs), then the model and tokenizer it describes
ckpt = load_checkpoint(out_dir)
ckpt_path = checkpoint_path(out_dir)
stage = ckpt.get('stage', 'unknown')
try:
    model = model_from_checkpoint(ckpt, dropout=0.0)
except (TypeError, ValueError, AssertionError, RuntimeError) as e:
    detail = '\n  '.join(str(e).splitlines()[:6])
    raise SystemExit(f"{ckpt_path} (stage {stage!r}) does not match this version of model.py: its model_args "
                     f"and weights cannot build a GPT:\n  {detail}") from None
try:
    tokenizer = tokenizer_from_checkpoint(ckpt)
except (KeyError, ValueError, RuntimeError) as e:
    raise SystemExit(f"{ckpt_path}: its tokenizer cannot be rebuilt: {type(e).__name__}: {e}") from None
if tokenizer.n_vocab > model.config.vocab_size:
    raise SystemExit(f"{ckpt_path}: the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                     f"{model.config.vocab_size}: this model and tokenizer do not belong together")
model.to(device=device, dtype=ptdtype)
print(f"loaded {ckpt_path}: stage {stage}, iter {ckpt.get('iter_num', '?')}, "
      f"{model.get_num_params() / 1e6:.2f}M params, {tokenizer.kind} tokenizer ({tokenizer.n_vocab} tokens), "
      f"context {model.config.block_size}, on {device} in {str(ptdtype).removeprefix('torch.')}")

# the generator and its options; max_new_tokens shrinks to what the context leaves after the prompt
generator = TextGenerator(model, tokenizer, compile=compile_model)
if start.startswith('FILE:'):
    path = start[len('FILE:'):]
    if not os.path.exists(path):
        raise SystemExit(f"start=FILE:{path}: no such file")
    with open(path, encoding='utf-8') as f:
        start = f.read()
block_size = model.config.block_size
room = block_size // 2 if chat else block_size - len(generator.encode(start))  # chat: half for the history
if room < 1:
    raise SystemExit(f"the prompt ({len(generator.encode(start))} tokens) fills the model's whole context "
                     f"({block_size} tokens): shorten it")
if max_new_tokens > room:
    print(f"note: max_new_tokens {max_new_tokens} -> {room}, what the {block_size}-token context leaves")
    max_new_tokens = room
try:
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, num_beams=num_beams, length_penalty=length_penalty,
        stop_strings=tuple(stop_strings))
except ValueError as e:
    raise SystemExit(str(e)) from None


def reply_to(history):
    """Print the assistant's reply to the conversation as it is generated, and return it."""
    ids = generator.chat_prompt(history, system or None, max_new_tokens, max_turns or None)
    print('assistant> ', end='', flush=True)
    if num_beams > 1:  # beam search cannot stream: the best beam is known only at the end
        reply = generator.generate([ids], gen_config)[0]
        print(reply, end='')
    else:
        reply = ''
        for piece in generator.stream(ids, gen_config):
            print(piece, end='', flush=True)
            reply += piece
    print()
    return reply


if not chat:
    # samples: all num_samples prompts go through the model as one batch
    t0 = time.perf_counter()
    try:
        out = generator.generate_ids([start] * num_samples, gen_config)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    dt = time.perf_counter() - t0
    for ids in out.rows():
        print(start + generator.text(ids, gen_config))
        print('---------------')
    n_tokens = int(out.mask.sum())
    print(f"{n_tokens} tokens in {dt:.2f}s ({n_tokens / dt:.0f} tok/s)", file=sys.stderr)
else:
    # chat: one user turn per line of input, a tty or a pipe
    if stage == 'pretrain':
        print("note: this is a pretrain checkpoint; it has not learned to chat (fine-tune it with sft.py first)")
    interactive = sys.stdin.isatty()
    if interactive:
        print("type a message; /reset starts a new conversation, /quit leaves")
    history = []
    while True:
        try:
            line = input('user> ' if interactive else '').strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line == '/quit':
            break
        if line == '/reset':
            history = []
            print('(new conversation)')
            continue
        history.append({'role': 'user', 'content': line})
        try:
            history.append({'role': 'assistant', 'content': reply_to(history)})
        except ValueError as e:  # a message too long for the context
            print(f"error: {e}")
            history.pop()
