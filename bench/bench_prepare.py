"""
prepare.py end to end at scale: MB/s and peak memory on a generated corpus, in a subprocess.

    python bench/bench_prepare.py                          # ~1 GB of many small documents, every core
    python bench/bench_prepare.py --shape=huge             # ~1 GB as one document
    python bench/bench_prepare.py --mb=200 --num_proc=1,2  # the same corpus with 1 and with 2 workers

The corpus is random words (a 20k-word vocabulary, lines of 4-20 words, documents of 0.5-8 KB),
so dedup keeps nearly all of it, written as 64 MB .txt files, documents separated by <|endoftext|> lines
(shape=docs), or as one document in one file (shape=huge), in a temp folder removed afterwards.
Peak memory: prepare.py's own report (main process, largest worker) and the largest sum of
the process tree's resident memory, sampled every 0.2 s (workers share pages with the main
process they were forked from: the sum overstates).
"""

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure  # noqa: E402

mb = 1000  # corpus size in MB
shape = 'docs'  # 'docs' (many small documents) or 'huge' (one document)
num_proc = '0'  # comma-separated: one run each (0 = every core)
extra = ''  # more prepare.py arguments, space-separated
config = configure(globals())


def write_corpus(folder, total_mb, shape, seed=0):
    """Random-word text in 64 MB files; returns the size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz', np.uint8)
    table = np.full((20_000, 8), ord(' '), np.uint8)  # a word: 2-7 letters, padded by spaces to 8 bytes
    for i, n in enumerate(rng.integers(2, 8, len(table))):
        table[i, :n] = rng.choice(letters, n)
    size, k = 0, 0
    while size < total_mb * 1e6:
        words = table[rng.integers(0, len(table), 8_000_000)]  # 64 MB
        words[np.cumsum(rng.integers(4, 21, len(words) // 4)) % len(words), 7] = ord('\n')  # line ends
        text = words.tobytes()
        if shape == 'docs':  # documents of 0.5-8 KB, cut at line ends
            lines = text.split(b'\n')
            cuts = np.cumsum(rng.integers(5, 80, len(lines) // 5))
            cuts = cuts[cuts < len(lines)]
            text = b'\n<|endoftext|>\n'.join(b'\n'.join(lines[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(lines)]))
        with open(os.path.join(folder, f'part_{k if shape == "docs" else 0:04d}.txt'), 'ab') as f:  # huge: one file
            f.write(text)
        size, k = size + len(text), k + 1
    return size


def run(source, out, n):
    cmd = [sys.executable, 'prepare.py', f'--data_root={out}', '--dataset=bench', f'--sources={source}',
           f'--num_proc={n}', *extra.split()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    top, peak_sum = psutil.Process(proc.pid), 0
    t0 = time.time()
    while proc.poll() is None:
        try:
            peak_sum = max(peak_sum, sum(p.memory_info().rss for p in [top] + top.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.time() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(output[-3000:])
    stats = json.load(open(os.path.join(out, 'bench', 'stats.json')))
    return wall, peak_sum / 1e6, stats, output.strip().splitlines()[-1]


with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'corpus')
    os.makedirs(folder)
    # written by a child process: its memory is gone before prepare.py starts (a child's peak RSS
    # starts from its parent's at the fork, exec or not)
    writer = multiprocessing.get_context('fork').Process(target=write_corpus, args=(folder, mb, shape))
    writer.start()
    writer.join()
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"corpus: {size / 1e6:,.0f} MB of random words, shape={shape}, {len(os.listdir(folder))} file(s); "
          f"{os.cpu_count()} cores")
    for n in num_proc.split(','):
        wall, peak_sum, stats, last = run(folder, os.path.join(tmp, f'out{n}'), int(n))
        t = stats['timing']
        print(last)
        print(f"num_proc={n}: {size / 1e6 / wall:.1f} MB/s end to end ({wall:.0f} s: clean {t['clean_s']:.0f} s, "
              f"tokenizer {t['tokenizer_s']:.0f} s, tokenise {t['tokenise_s']:.0f} s at {t['tokenise_mb_per_s']} MB/s, "
              f"write {t['write_s']:.0f} s); peak RSS: main {t['peak_rss_mb']['main']:,} MB, largest worker "
              f"{t['peak_rss_mb']['largest_worker']:,} MB, whole tree (sampled sum) {peak_sum:,.0f} MB; "
              f"{stats['total']['docs_out']:,} documents kept of {stats['total']['docs_in']:,}")
