"""
serve.py under load: the same requests from 1, 4 and 16 concurrent clients, against the server with
continuous batching (max_batch slots) and against the same server serving one request at a time
(max_batch=1), side by side in one run; plus our TextGenerator called in-process, one request at a
time, as the floor without HTTP. Each request streams a completion of a stdlib snippet with a fixed
length (ignore_eos), so every configuration generates the same tokens.

    pip install fastapi uvicorn httpx
    python bench/bench_serve.py                                   # a random tiny model (pretrain_tiny's shape)
    python bench/bench_serve.py --out_dir=out-sft                 # and a real checkpoint
    python bench/bench_serve.py --n_layer=8 --n_embd=512 --n_head=8 --threads=2

tok/s = completion tokens of all requests / wall time from the first request to the last answer.
TTFT = time to first token: from sending a request to its first streamed text, p50 and p90 over the
requests (queueing included: with one slot, a request waits for those before it).
"""

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import load_checkpoint, model_from_checkpoint, save_checkpoint, tokenizer_from_checkpoint  # noqa: E402
from configurator import configure  # noqa: E402
from generate import TextGenerator  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import train_bpe  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ''  # a real checkpoint to bench as well (a run's folder, a .pt file or hf:PATH); '' = the tiny model only
# the tiny random model (config/pretrain_tiny.py's shape)
vocab_size = 4096
block_size = 512
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
# the load
n_requests = 32
prompt_chars = 200  # each prompt: a snippet of stdlib source this long (~60 tokens with the tiny model's BPE)
max_tokens = 128  # generated per request (ignore_eos: always this many)
stream = True  # False: one JSON answer per request, no per-token events (TTFT is then the whole latency)
clients = (1, 4, 16)
max_batch = 16  # the batched server's slots
threads = 1  # torch threads of the server (the clients share the machine with it)
device = 'cpu'
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------


def stdlib_snippets(n, chars):
    names = ['textwrap.py', 'string.py', 'bisect.py', 'heapq.py', 'fnmatch.py', 'functools.py', 'argparse.py']
    text = ''.join(open(os.path.join(sysconfig.get_paths()['stdlib'], name), encoding='utf-8').read() for name in names)
    step = (len(text) - chars) // n
    return text, [text[i * step:i * step + chars] for i in range(n)]


def tiny_checkpoint(path, corpus):
    """A random GPT of the configured shape with a BPE tokenizer trained on the corpus, saved as a run."""
    tok = train_bpe([corpus], vocab_size)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_kv_head=n_kv_head, n_embd=n_embd))
    save_checkpoint({'model': model.state_dict(), 'model_args': model.config.to_dict(), 'tokenizer': tok.spec,
                     'config': {}, 'stage': 'pretrain', 'iter_num': 0, 'best_val_loss': 0.0},
                    os.path.join(path, 'ckpt.pt'))
    return path


def start_server(checkpoint, slots, log_path):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={checkpoint}', '--port=0',
                                 f'--device={device}', f'--max_batch={slots}', '--log_interval=0'],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        with open(log_path) as f:
            text = f.read()
        found = re.search(r"serving '.*' on (http://[^/]+)/", text)
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"serve.py did not start:\n{text}")


FIRST_TEXT = re.compile(rb'"text": ?"[^"]')  # a chunk with some text


def one_request(http, url, prompt):
    """One completion, streamed (or not); returns (time to first text, completion tokens)."""
    body = {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True, 'stream': stream,
            'stream_options': {'include_usage': True} if stream else None}
    t0, ttft, tail = time.perf_counter(), None, b''
    with http.stream('POST', url + '/v1/completions', json=body) as response:
        response.raise_for_status()
        for data in response.iter_raw():  # bytes as they come: lighter than parsing every event (the
            if ttft is None and FIRST_TEXT.search(data):  # clients share the machine with the server)
                ttft = time.perf_counter() - t0
            tail = (tail + data)[-4096:]
    tokens = int(re.search(rb'"completion_tokens": ?(\d+)', tail).group(1))
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


def load(url, prompts, n_clients):
    """All prompts, n_clients at a time (each client sends its next one when answered): (tok/s, TTFTs)."""
    queue, lock, ttfts, tokens = list(prompts), threading.Lock(), [], [0]

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop(0)
                ttft, n = one_request(http, url, prompt)
                with lock:
                    ttfts.append(ttft)
                    tokens[0] += n
    one_request(httpx.Client(timeout=600), url, prompts[0])  # warm-up
    workers = [threading.Thread(target=client) for _ in range(n_clients)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return tokens[0] / (time.perf_counter() - t0), sorted(ttfts)


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def in_process(checkpoint, prompts):
    """TextGenerator in this process, one prompt at a time, greedy, max_tokens each: tok/s."""
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    model, tok = model_from_checkpoint(ckpt).to(device).eval(), tokenizer_from_checkpoint(ckpt)
    gen = TextGenerator(model, tok)
    options = dict(temperature=0, max_new_tokens=max_tokens, stop_token_ids=())
    gen.generate(prompts[0], **options)  # warm-up
    t0 = time.perf_counter()
    for p in prompts:
        gen.generate(p, **options)
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def bench(name, checkpoint, prompts, workdir):
    print(f"\n{name}: {n_requests} requests of {max_tokens} tokens{', streamed' if stream else ''}, server with "
          f"{threads} torch thread(s) on {device}")
    results = {}
    for slots in (max_batch, 1):
        proc, url = start_server(checkpoint, slots, os.path.join(workdir, f'server-{slots}.log'))
        try:
            for c in clients:
                results[slots, c] = load(url, prompts, c)
            seen = httpx.get(url + '/health').json()['max_batch_seen']
        finally:
            proc.terminate()
            proc.wait()
        if slots == max_batch:
            print(f"(batched server: at most {seen} rows decoded together)")
    floor = in_process(checkpoint, prompts)
    print(f"{'clients':>7} | {'batched tok/s':>13} | {'one at a time':>13} | {'ratio':>6} | "
          f"{'TTFT p50/p90 batched':>20} | {'TTFT p50/p90 one at a time':>26}")
    for c in clients:
        (tps, ttft), (tps1, ttft1) = results[max_batch, c], results[1, c]
        print(f"{c:>7} | {tps:>13,.0f} | {tps1:>13,.0f} | {tps / tps1:>5.2f}x | "
              f"{pct(ttft, .5):>8.0f} / {pct(ttft, .9):>6.0f} ms | {pct(ttft1, .5):>14.0f} / {pct(ttft1, .9):>6.0f} ms")
    base = results[max_batch, clients[0]][0]
    print(f"batched server, {clients[-1]} clients vs {clients[0]}: {results[max_batch, clients[-1]][0] / base:.2f}x; "
          f"TextGenerator in-process, one at a time: {floor:,.0f} tok/s "
          f"(the server with {clients[0]} client(s): {base / floor:.2f}x)")


corpus, prompts = stdlib_snippets(n_requests, prompt_chars)
with tempfile.TemporaryDirectory() as workdir:
    bench(f"tiny random model ({n_layer} layers, {n_embd} wide, vocab {vocab_size})", tiny_checkpoint(workdir, corpus),
          prompts, workdir)
    if out_dir:
        bench(out_dir, out_dir, prompts, workdir)
