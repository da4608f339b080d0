"""Shared test helpers: run a stage script as a user would, and a tiny prepared dataset."""

import atexit
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n N: N workers share the cores, one torch thread each
    os.environ['OMP_NUM_THREADS'] = '1'


def run_script(script, *args, env=None, check=True, timeout=600):
    """Run `python script args...` from the repo root (scripts exec configurator.py from there).
    It runs in a fork of a process that has imported torch already (tests/forks.py), unless it
    needs another environment than that process started with, or is in OWN_PROCESS: then in a
    process of its own."""
    full_env = script_env(env)
    if script not in OWN_PROCESS and without_fork_env(full_env) == fork_server().env:
        proc = run_forked([script, *args], {k: full_env[k] for k in FORK_ENV if k in full_env}, timeout)
    else:
        proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(nproc, script, *args, env=None, timeout=300):
    """`torchrun --standalone --nproc_per_node=nproc script args...`, as run_script runs a script
    (the launcher in a fork; the ranks are processes of their own, which torchrun starts)."""
    return run_script('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script, *args,
                      env=env, timeout=timeout)


def script_env(env=None):
    return {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2'), **(env or {})}


# prepare.py imports no torch (it starts in 0.2 s) and forks workers whose memory a test bounds
OWN_PROCESS = {'prepare.py'}
# Set by pytest for each test, and the probes' output paths: no preloaded module reads them, so a
# run that differs only in these still forks, and the fork sets them before the script starts
FORK_ENV = ['PYTEST_CURRENT_TEST', 'PROBE_DIR', 'FEED_FILE']
FORKS = []  # this pytest process's fork server, started at its first run_script


def without_fork_env(env):
    return {k: v for k, v in env.items() if k not in FORK_ENV}


def fork_server():
    if not FORKS:
        from forks import ForkServer
        FORKS.append(ForkServer(REPO, without_fork_env(script_env())))
        atexit.register(FORKS[0].close)
    return FORKS[0]


def run_forked(argv, env, timeout):
    """argv run by the fork server: a CompletedProcess, as subprocess.run(capture_output=True, text=True) gives."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
        answer = fork_server().run(argv, out, err, env=env, timeout=timeout)
        with open(out, errors='replace') as f_out, open(err, errors='replace') as f_err:
            return subprocess.CompletedProcess([sys.executable, *argv], answer['rc'], f_out.read(), f_err.read())


def write_token_dataset(path, tokenizer, train_docs, val_docs):
    """The prepare.py output format: {train,val}.bin (eot-prefixed docs), tokenizer.json, meta.json."""
    os.makedirs(path, exist_ok=True)
    dtype = np.uint16 if tokenizer.n_vocab < 2 ** 16 else np.uint32
    counts = {}
    for split, docs in (('train', train_docs), ('val', val_docs)):
        ids = []
        for doc in docs:
            ids += [tokenizer.eot_id] + tokenizer.encode(doc)
        np.array(ids, dtype=dtype).tofile(os.path.join(path, f'{split}.bin'))
        counts[split] = len(ids)
    tokenizer.save(os.path.join(path, 'tokenizer.json'))
    meta = {'dataset': os.path.basename(path), 'tokenizer': 'tokenizer.json', 'tokenizer_kind': tokenizer.kind,
            'tokenizer_identity': tokenizer.identity, 'vocab_size': tokenizer.n_vocab, 'dtype': np.dtype(dtype).name,
            'train_tokens': counts['train'], 'val_tokens': counts['val'],
            'val_bytes': sum(len(d.encode('utf-8')) for d in val_docs)}
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return meta


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
    """data/<name> with ~300 KB of standard-library source and a 512-token BPE: (data_dir, dataset)."""
    from tokenizer import train_bpe
    stdlib = sysconfig.get_paths()['stdlib']
    names = ['textwrap.py', 'string.py', 'bisect.py', 'heapq.py', 'fnmatch.py', 'colorsys.py', 'shlex.py',
             'functools.py', 'dataclasses.py', 'argparse.py']
    docs = [open(os.path.join(stdlib, n), encoding='utf-8').read() for n in names]
    tok = train_bpe(docs, 512)
    root = tmp_path_factory.mktemp('data')
    write_token_dataset(str(root / 'tiny'), tok, docs[:-1], docs[-1:])
    return str(root), 'tiny'


@pytest.fixture(scope='session')
def tiny_checkpoint(tiny_data_dir, tmp_path_factory):
    """An untrained tiny GPT saved as a pretrain out_dir, with the tiny dataset's tokenizer."""
    import torch
    from common import save_checkpoint
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer
    data_root, dataset = tiny_data_dir
    tok = Tokenizer.load(os.path.join(data_root, dataset, 'tokenizer.json'))
    torch.manual_seed(0)
    args = dict(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=64)
    model = GPT(GPTConfig(**args))
    out = str(tmp_path_factory.mktemp('pretrain'))
    save_checkpoint({'model': model.state_dict(), 'model_args': model.config.to_dict(), 'tokenizer': tok.spec,
                     'config': {}, 'stage': 'pretrain', 'iter_num': 0, 'best_val_loss': float('inf')},
                    os.path.join(out, 'ckpt.pt'))
    return out


def write_jsonl(path, records):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    return str(path)


def eval_rows(out_dir):
    """{iter: row} of the eval rows of a run's history.jsonl (training rows have kind 'train')."""
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return {row['iter']: row for row in map(json.loads, f) if row['kind'] == 'eval'}


def pytest_collection_modifyitems(items):
    """The quick pipeline (the longest test by far, ~7 min on one thread) first: under pytest -n it
    then runs on one worker while the others take the rest, instead of starting last."""
    items.sort(key=lambda item: 'test_pipeline.py' not in item.nodeid)
