"""
Tokenising speed: prepare.py's whole tokenising step (corpus.tokenise_task on a pool of num_proc
worker processes, results in order: read the text spool, encode, prefix <|endoftext|>, cast,
write) against raw tiktoken encode_ordinary_batch on num_proc threads, on the same cleaned
standard-library text, in the same run, best of `repeats`.

    python bench/bench_tokenize.py                   # every core
    python bench/bench_tokenize.py --num_proc=2 --repeats=5

Prints both MB/s and the ratio (target: >= 0.8), and checks the two give identical ids.
"""

import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpus  # noqa: E402
from configurator import configure  # noqa: E402
from tokenizer import Tokenizer, train_bpe  # noqa: E402

num_proc = 0  # 0 = every core
repeats = 3
tokenizer = 'data/stdlib/tokenizer.json'  # made by `python prepare.py`; trained here when missing
config = configure(globals())  # overrides from --key=value arguments
num_proc = num_proc or os.cpu_count()
pool = corpus.make_pool(num_proc)  # forked before the text is read, as prepare.py does

# the text prepare.py tokenises: the cleaned standard library
root, files = corpus.stdlib_files()
counts = corpus.Cleaner.new_counts()
texts = [t for t, _ in corpus.Cleaner(min_chars=32).run(corpus.iter_documents(files), counts)]
tok = Tokenizer.load(tokenizer) if os.path.exists(tokenizer) else train_bpe(texts[::5], 4096)
raw = b''.join(t.encode('utf-8') for t in texts)
offsets = np.concatenate(([0], np.cumsum([len(t.encode('utf-8')) for t in texts])))
mb = len(raw) / 1e6
dtype = corpus.token_dtype(tok.n_vocab)
print(f"{len(texts):,} documents, {mb:.1f} MB, tokenizer {tok.identity}, {num_proc} threads / worker processes")

times_raw, times_ours = [], []
with tempfile.TemporaryDirectory() as tmp:
    spool, tok_path, out = os.path.join(tmp, 'text.bin'), os.path.join(tmp, 'tokenizer.json'), os.path.join(tmp, 'tokens.bin')
    with open(spool, 'wb') as f:
        f.write(raw)
    tok.save(tok_path)
    groups = np.split(np.arange(len(texts)), np.flatnonzero(np.diff(offsets[1:] // (1 << 20))) + 1)  # ~1 MB tasks
    tasks = [(spool, tok_path, dtype, offsets[g[0]:g[-1] + 2], np.ones(len(g), bool)) for g in groups]
    for r in range(repeats):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        ids = tok.enc.encode_ordinary_batch(texts, num_threads=num_proc)
        times_raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(out, 'wb') as f:
            for tokens, _ in corpus.ordered_map(pool, corpus.tokenise_task, tasks, 16):
                f.write(tokens)
        times_ours.append(time.perf_counter() - t0)
        print(f"run {r}: raw {mb / times_raw[-1]:.1f} MB/s, prepare.py step {mb / times_ours[-1]:.1f} MB/s")
    expected = np.concatenate([np.array([tok.eot_id] + x, dtype) for x in ids])
    same = np.array_equal(np.fromfile(out, dtype), expected)

best_raw, best_ours = min(times_raw), min(times_ours)
print(f"raw tiktoken encode_ordinary_batch: {mb / best_raw:.1f} MB/s (best of {repeats})")
print(f"prepare.py tokenising step:         {mb / best_ours:.1f} MB/s (best of {repeats}; incl. <|endoftext|> "
      f"prefixes, {np.dtype(dtype).name} cast, write)")
print(f"ratio: {best_raw / best_ours:.2f} best-to-best, {np.median(np.array(times_raw) / np.array(times_ours)):.2f} "
      f"median of the pairs (target >= 0.8); identical ids: {same}")
