"""train.py end to end on a tiny dataset: it learns, resumes exactly, DDP equals one process,
and it stops safely on Ctrl-C and on NaN."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, run_torchrun

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64', '--batch_size=4', '--eval_iters=4',
        '--log_interval=5', '--warmup_iters=5', '--learning_rate=3e-3', '--peak_flops=1e12']


def train(data, out_dir, *args, **kw):
    data_root, dataset = data
    return run_script('train.py', f'--data_root={data_root}', f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY, *args, **kw)


def history(out_dir):
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return {row['iter']: row for row in map(json.loads, f) if row['kind'] == 'eval'}


def test_pretraining_lowers_val_loss_and_reports_bpb(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    proc = train(tiny_data_dir, out, '--max_iters=200', '--eval_interval=100', '--lr_decay_iters=200', '--batch_size=8')
    h = history(out)
    assert h[200]['val/loss'] < h[0]['val/loss'] - 1.0, h
    assert 0 < h[200]['val/bpb'] < h[0]['val/bpb']
    assert 'tok/s' in proc.stdout and 'eta' in proc.stdout and 'mfu' in proc.stdout
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 200 and ckpt['stage'] == 'pretrain' and ckpt['tokenizer']['kind'] == 'bpe'
    assert json.load(open(os.path.join(out, 'config.json')))['max_iters'] == 200


@pytest.mark.parametrize('peak_flops', ['1e12', '0'], ids=['given-peak', 'measured-peak'])
def test_resume_continues_same_loss_curve(tiny_data_dir, tmp_path, peak_flops):
    # peak_flops=0 measures the matmul peak at start: that must not draw from dropout's random stream
    common = ['--eval_interval=10', '--lr_decay_iters=30', '--dropout=0.1', f'--peak_flops={peak_flops}']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train(tiny_data_dir, straight, '--max_iters=30', *common)
    train(tiny_data_dir, split, '--max_iters=10', *common)
    train(tiny_data_dir, split, '--max_iters=30', '--init_from=resume', *common)
    a, b = history(straight), history(split)
    for it in (20, 30):
        assert b[it]['val/loss'] == pytest.approx(a[it]['val/loss'], rel=1e-6, abs=1e-6)
        assert b[it]['val/train_split_loss'] == pytest.approx(a[it]['val/train_split_loss'], rel=1e-6, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('arch', [[], ['--n_experts=4', '--n_shared_experts=1']], ids=['dense', 'moe'])
def test_ddp_two_ranks_matches_one_process(tiny_data_dir, tmp_path, arch):
    data_root, dataset = tiny_data_dir
    args = [f'--data_root={data_root}', f'--dataset={dataset}', *TINY, '--max_iters=20', '--eval_interval=10',
            '--lr_decay_iters=20', '--gradient_accumulation_steps=2', *arch]
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    run_script('train.py', *args, f'--out_dir={single}')
    run_torchrun(2, 'train.py', *args, f'--out_dir={ddp}')
    a, b = history(single), history(ddp)
    assert b[20]['val/loss'] == pytest.approx(a[20]['val/loss'], rel=1e-4)
    assert b[20]['val/train_split_loss'] == pytest.approx(a[20]['val/train_split_loss'], rel=1e-4)
    assert a[20]['val/loss'] < a[0]['val/loss']


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_data_dir, tmp_path):
    data_root, dataset = tiny_data_dir
    out = str(tmp_path / 'out')
    proc = subprocess.Popen([sys.executable, 'train.py', f'--data_root={data_root}', f'--dataset={dataset}',
                             f'--out_dir={out}', *TINY, '--max_iters=100000', '--eval_interval=100000',
                             '--log_interval=1'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training steps are running
        if line.startswith('iter 3:'):
            break
    proc.send_signal(signal.SIGINT)
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, output  # saved, but not finished
    assert 'ckpt.pt at step' in output and '(interrupted)' in output
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] >= 3 and not os.path.exists(os.path.join(out, 'ckpt.pt.tmp'))


def test_nan_loss_stops_without_overwriting_the_last_checkpoint(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    train(tiny_data_dir, out, '--max_iters=10', '--eval_interval=10', '--lr_decay_iters=10')
    before = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    # an absurd learning rate with no clipping blows the weights up to inf/NaN within a few steps
    proc = train(tiny_data_dir, out, '--init_from=resume', '--max_iters=200', '--eval_interval=5', '--log_interval=1',
                 '--learning_rate=1e12', '--min_lr=1e12', '--warmup_iters=0', '--grad_clip=0', '--lr_decay_iters=200',
                 check=False)
    assert proc.returncode != 0 and 'loss is nan' in (proc.stdout + proc.stderr).lower()
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert all(torch.isfinite(v).all() for v in after['model'].values())
    assert after['iter_num'] >= before['iter_num']


def test_init_from_another_out_dir_starts_from_its_weights(tiny_data_dir, tmp_path):
    first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
    train(tiny_data_dir, first, '--max_iters=40', '--eval_interval=40', '--lr_decay_iters=40')
    train(tiny_data_dir, second, f'--init_from={first}', '--max_iters=10', '--eval_interval=10', '--lr_decay_iters=10')
    h1, h2 = history(first), history(second)
    assert h2[0]['val/loss'] == pytest.approx(h1[40]['val/loss'], rel=1e-5)  # same weights at step 0
    assert torch.load(os.path.join(second, 'ckpt.pt'), weights_only=True)['iter_num'] == 10


def test_early_stopping_ends_the_run(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    # lr = 0 after warmup: val loss cannot improve, so patience runs out
    proc = train(tiny_data_dir, out, '--max_iters=1000', '--eval_interval=5', '--early_stop_patience=2',
                 '--learning_rate=0', '--min_lr=0', '--lr_decay_iters=1000')
    assert 'early stop' in proc.stdout and max(history(out)) == 10


def test_early_stopping_patience_is_not_spent_by_a_resume(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    args = ['--eval_interval=5', '--early_stop_patience=2', '--learning_rate=0', '--min_lr=0', '--lr_decay_iters=1000']
    train(tiny_data_dir, out, '--max_iters=5', *args)  # evals at 0 (the best) and 5 (no better: 1 of 2)
    proc = train(tiny_data_dir, out, '--max_iters=1000', '--init_from=resume', *args)
    # the resumed run re-evaluates step 5, which must not count again: it stops at 10, as a straight run does
    assert 'early stop' in proc.stdout and max(history(out)) == 10


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    proc = run_script('train.py', f'--data_root={tmp_path}', '--dataset=nothing', check=False)
    assert proc.returncode != 0 and 'python prepare.py --dataset=nothing' in proc.stderr


def test_bf16_autocast_and_wsd_schedule_train(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    proc = train(tiny_data_dir, out, '--max_iters=40', '--eval_interval=40', '--lr_decay_iters=40', '--dtype=bfloat16',
                 '--lr_schedule=wsd')
    h = history(out)
    assert h[40]['val/loss'] < h[0]['val/loss'] - 0.5
    # on a CPU without bf16 instructions (AVX2 only) the run says that bf16 is emulated there
    import common
    assert ('has no bf16 matmul instructions' in proc.stderr) == (not common.cpu_has_native_bf16()), proc.stderr[-1000:]


def test_emulated_bf16_on_a_cpu_warns_and_its_mfu_is_against_the_fp32_peak(monkeypatch):
    """On a CPU without bf16 instructions torch emulates bf16 (a pretrain_tiny step: 8.6 s vs 0.5 s in
    fp32 on a Zen 3): the run warns, and the MFU peak is fp32's, the units that do the work (the
    bf16 peak's own 2048^3 matmul took ~60 s there before the first step)."""
    import common
    made, randn = [], torch.randn
    monkeypatch.setattr(torch, 'randn', lambda *a, **k: made.append(k['dtype']) or randn(*a, **k))
    for native, peak_dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(common, 'cpu_has_native_bf16', lambda cpuinfo=None: native)
        warning = common.emulated_dtype_warning('cpu', 'bfloat16')
        assert (warning is not None and '--dtype=float32' in warning) == (not native)
        made.clear()
        assert common.measure_peak_flops('cpu', 'bfloat16', sizes=(64,), seconds=0.01) > 0
        assert made == [peak_dtype, peak_dtype]
    assert common.emulated_dtype_warning('cpu', 'float32') is None and common.emulated_dtype_warning('cuda', 'bfloat16') is None


def test_the_cpu_peak_is_the_best_rate_over_matmul_sizes(monkeypatch):
    """The MFU peak is the best of a few sizes' matmul rates, each timed for its share of the time:
    on a 2-core Zen 4 the 2048^3 matmul alone read 141 GFLOP/s fp32, the training shapes' matmuls
    ran faster, and MFU read 103-107% (these are that machine's rates)."""
    import common
    rates, timed = {512: 168e9, 1024: 147e9, 2048: 141e9}, []
    monkeypatch.setattr(common, 'matmul_rate', lambda n, dtype, seconds: timed.append((n, dtype, seconds)) or rates[n])
    assert common.measure_peak_flops('cpu', 'float32', seconds=0.3) == 168e9
    assert timed == [(n, torch.float32, pytest.approx(0.1)) for n in (512, 1024, 2048)]


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data_dir, tmp_path):
    eager, compiled = str(tmp_path / 'eager'), str(tmp_path / 'compiled')
    args = ['--max_iters=10', '--eval_interval=10', '--lr_decay_iters=10']
    train(tiny_data_dir, eager, *args)
    proc = train(tiny_data_dir, compiled, *args, '--compile_model=True', env={'TORCH_LOGS': 'recompiles'})
    assert history(compiled)[10]['val/loss'] == pytest.approx(history(eager)[10]['val/loss'], rel=1e-3)
    # on a CPU the evals (at steps 0 and 10) run the eager module: one compiled graph, the training
    # step's, and no second one for no_grad (7-14 s of inductor's compile from a cold cache)
    assert 'Recompiling' not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_compiled_training_on_two_threads_is_reproducible(tiny_data_dir, tmp_path):
    """Two compiled runs of one command give the same checkpoint bit for bit (model.embed: inductor's
    own embedding backward added rows from two threads in no fixed order, and runs drifted apart)."""
    runs = [str(tmp_path / name) for name in ('first', 'second')]
    for out in runs:
        train(tiny_data_dir, out, '--max_iters=6', '--eval_interval=6', '--lr_decay_iters=6', '--batch_size=16',
              '--compile_model=True', env={'OMP_NUM_THREADS': '2'})
    first, second = (torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model'] for out in runs)
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different


def test_wandb_without_api_key_logs_offline_and_keeps_the_metrics(tiny_data_dir, tmp_path):
    """wandb is installed (requirements.txt); with no key a run logs offline, and the offline run
    directory holds its metrics (`wandb sync` uploads them later)."""
    out = str(tmp_path / 'out')
    env = {'WANDB_API_KEY': '', 'HOME': str(tmp_path), 'WANDB_DIR': str(tmp_path), 'WANDB_MODE': ''}
    proc = train(tiny_data_dir, out, '--max_iters=5', '--eval_interval=5', '--log_interval=1', '--lr_decay_iters=5',
                 '--wandb_log=True', env=env)
    assert 'wandb runs offline' in proc.stdout
    assert os.path.exists(os.path.join(out, 'ckpt.pt'))
    runs = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(runs) == 1, os.listdir(tmp_path)
    # the run file is a log of protobuf records; each history item holds its key and its value as JSON text
    records = open(runs[0], 'rb').read()
    rows = list(map(json.loads, open(os.path.join(out, 'history.jsonl'))))
    for key in ('val/loss', 'train/loss', 'lr'):
        logged = [r[key] for r in rows if key in r]
        assert logged and all(json.dumps(v).encode() in records for v in logged), key


def test_lr_schedules():
    from common import get_lr
    assert get_lr(0, 1.0, 0.1, 10, 100) < get_lr(9, 1.0, 0.1, 10, 100) < 1.0  # warmup
    assert get_lr(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert get_lr(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)  # cosine midpoint
    assert get_lr(200, 1.0, 0.1, 10, 100) == 0.1
    assert get_lr(70, 1.0, 0.1, 10, 100, 'wsd', 0.2) == 1.0  # stable phase
    assert get_lr(90, 1.0, 0.1, 10, 100, 'wsd', 0.2) == pytest.approx(0.55)  # halfway down


@pytest.mark.slow
def test_ddp_eval_with_fewer_eval_batches_than_ranks_does_not_hang(tiny_data_dir, tmp_path):
    """With eval_iters=1 rank 1 gets no eval batch: nothing in a forward may wait for it (DDP's
    buffer broadcast did, and deadlocked)."""
    data_root, dataset = tiny_data_dir
    args = [f'--data_root={data_root}', f'--dataset={dataset}', *TINY, '--max_iters=4', '--eval_interval=2',
            '--eval_iters=1', '--gradient_accumulation_steps=2', f'--out_dir={tmp_path / "ddp"}']
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        raise AssertionError("2 ranks with eval_iters=1 hung (a collective that rank 1 never joins)")
    assert proc.returncode == 0 and 'step 4: val/loss' in output, output[-3000:]
    assert 'deprecated' not in output, output[-3000:]  # DDP's old broadcast_buffers argument warned on each rank


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_well_within_its_kill_window(tiny_data_dir, tmp_path):
    """torchrun forwards a SIGINT to every rank and SIGKILLs them 30 s later: the ranks must agree
    to stop and save well before that, even when the next log step is far away (they agreed at
    log steps only, so a run with a long log_interval was killed unsaved)."""
    data_root, dataset = tiny_data_dir
    out = str(tmp_path / 'ddp')
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', f'--data_root={data_root}', f'--dataset={dataset}', f'--out_dir={out}', *TINY,
                             '--max_iters=1000000', '--eval_interval=1000000', '--log_interval=1000000',
                             '--gradient_accumulation_steps=2'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, start_new_session=True)
    try:
        for line in proc.stdout:  # rank 0 has evaluated step 0: the ranks are in the loop
            if line.startswith('step 0:'):
                break
        time.sleep(2)  # some steps
        t0 = time.time()
        proc.send_signal(signal.SIGINT)  # to torchrun only: it forwards the signal to the ranks
        output, _ = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert '(interrupted)' in output, output[-3000:]
    assert elapsed < 15, f"took {elapsed:.0f} s to stop (torchrun kills at 30 s)"
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] > 0


# ----------------------------------------------------------------------------- rows: doc_mask, align_to_docs, sampling

FEED_PROBE = '''
"""Runs train.py (argv[1:]) and saves what every forward was fed to $FEED_FILE<rank>."""
import os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())  # the repo root
import common, model
fed, forward = [], model.GPT.forward


def recording_forward(self, idx, targets=None, positions=None, attn_mask=None, **kwargs):
    fed.append({'train': self.training, 'x': idx.cpu(), 'positions': positions, 'attn_mask': attn_mask})
    return forward(self, idx, targets, positions, attn_mask, **kwargs)


def saving_cleanup(ddp, _cleanup=common.cleanup_distributed):
    torch.save(fed, os.environ['FEED_FILE'] + os.environ.get('RANK', '0'))  # before DDP's os._exit
    _cleanup(ddp)


model.GPT.forward, common.cleanup_distributed = recording_forward, saving_cleanup
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.fixture(scope='module')
def short_docs(tiny_data_dir, tmp_path_factory):
    """The paragraphs of two stdlib modules as documents (~11k tokens, median 80 tokens, so a 64-token
    row often holds two and some documents need two rows), with the tiny dataset's tokenizer."""
    import sysconfig
    from conftest import write_token_dataset
    from tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(*tiny_data_dir, 'tokenizer.json'))
    stdlib = sysconfig.get_paths()['stdlib']
    docs = [p for name in ('textwrap.py', 'bisect.py') for p in open(os.path.join(stdlib, name)).read().split('\n\n') if p.strip()]
    root = tmp_path_factory.mktemp('short')
    write_token_dataset(str(root / 'short'), tok, docs[:-20], docs[-20:])
    return str(root), 'short'


def tokens(data, split):
    import numpy as np
    meta = json.load(open(os.path.join(*data, 'meta.json')))
    return np.fromfile(os.path.join(*data, f'{split}.bin'), dtype=meta['dtype']).astype(np.int64)


def bos(data):
    from tokenizer import Tokenizer
    return Tokenizer.load(os.path.join(*data, 'tokenizer.json')).eot_id


def aligned_starts(ids, bos_id, T=64):
    """What align_to_docs promises: each document's start, and every T tokens into a longer one
    (a shard that starts inside a document: from the shard's start)."""
    docs = sorted({0} | {i for i in range(len(ids)) if ids[i] == bos_id}) + [len(ids)]
    return [s for a, b in zip(docs, docs[1:]) for s in range(a, b, T) if s + T + 1 <= len(ids)]


def offsets(ids, row):
    """Where a row of tokens occurs in the split (bisect.py repeats a few lines: some rows twice)."""
    import numpy as np
    return set(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids, len(row)) == np.asarray(row)).all(1)).tolist())


def fed_to_model(tmp_path, data, out_dir, *args, ranks=1):
    """train.py run under FEED_PROBE: per rank, every forward's {'train', 'x', 'positions', 'attn_mask'}."""
    probe = tmp_path / 'feed_probe.py'
    probe.write_text(FEED_PROBE)
    data_root, dataset = data
    args = [f'--data_root={data_root}', f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY, *args]
    env = {'OMP_NUM_THREADS': '1', 'FEED_FILE': str(tmp_path / f'{os.path.basename(out_dir)}-fed')}
    if ranks == 1:
        run_script(str(probe), 'train.py', *args, env=env, timeout=300)
    else:
        run_torchrun(ranks, str(probe), 'train.py', *args, env=env)
    return [torch.load(env['FEED_FILE'] + str(r), weights_only=True) for r in range(ranks)]


def test_doc_mask_keeps_a_rows_documents_apart(short_docs, tmp_path):
    """doc_mask: train.py feeds each row with positions restarting at every bos and a block-diagonal
    causal mask, so a token's logits do not depend on the previous document's tokens."""
    from model import GPT, GPTConfig
    bos_id = bos(short_docs)
    fed = fed_to_model(tmp_path, short_docs, str(tmp_path / 'out'), '--doc_mask=True', '--max_iters=2',
                       '--eval_interval=2', '--batch_size=8')[0]
    train = [f for f in fed if f['train']]
    assert len(train) == 2 and all(f['attn_mask'] is not None for f in train)
    # the eval: train and val split in the training's layout (masked), then val plainly (val/plain_loss)
    assert [f['attn_mask'] is not None for f in fed if not f['train']][:12] == [True] * 8 + [False] * 4
    x, positions, mask = (torch.cat([f[k] for f in train]) for k in ('x', 'positions', 'attn_mask'))
    # 1) positions count from each row's start and from every bos; a token sees its own document only
    doc = torch.cumsum(x == bos_id, dim=1)
    for b in range(len(x)):
        starts = [0] + [t for t in range(1, x.size(1)) if x[b, t] == bos_id]
        expected = [t - max(s for s in starts if s <= t) for t in range(x.size(1))]
        assert positions[b].tolist() == expected
        same_doc = doc[b][:, None] == doc[b][None, :]
        assert torch.equal(mask[b, 0], same_doc & torch.ones_like(same_doc).tril())
    # 2) a row whose second document starts at k: change the first one's tokens, the second's logits stay
    b, k = next((b, t) for b in range(len(x)) for t in range(8, 48) if x[b, t] == bos_id)
    end = next((t for t in range(k + 1, x.size(1)) if x[b, t] == bos_id), x.size(1))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    changed = x[b:b + 1].clone()
    changed[0, :k] = torch.randint(0, 256, (k,))  # other tokens (bytes), no bos among them
    with torch.no_grad():
        logits = {name: model(row, positions=positions[b:b + 1], attn_mask=mask[b:b + 1])[0][0]
                  for name, row in (('row', x[b:b + 1]), ('changed', changed))}
        alone = model(x[b:b + 1, k:end])[0][0]  # the second document in a row of its own, default positions
        plain = model(changed)[0][0] - model(x[b:b + 1])[0][0]  # without the mask the change reaches it
    assert torch.allclose(logits['changed'][k:], logits['row'][k:], atol=1e-5)
    assert not torch.allclose(logits['changed'][:k], logits['row'][:k], atol=1e-3)
    assert torch.allclose(logits['row'][k:end], alone, atol=1e-5)
    assert plain[k:].abs().max() > 1e-3


def test_align_to_docs_rows_start_at_document_starts(short_docs, tmp_path):
    """align_to_docs: every training and eval row starts at a document's bos, or block_size tokens
    on inside a document longer than a row; both kinds occur."""
    bos_id, train_ids, val_ids = bos(short_docs), tokens(short_docs, 'train'), tokens(short_docs, 'val')
    fed = fed_to_model(tmp_path, short_docs, str(tmp_path / 'out'), '--align_to_docs=True', '--max_iters=5',
                       '--eval_interval=5', '--batch_size=8')[0]
    train = torch.cat([f['x'] for f in fed if f['train']])
    val = torch.cat([f['x'] for f in fed if not f['train']][4:8])  # eval_iters=4: train split, then val
    assert all(f['attn_mask'] is None for f in fed)  # no doc_mask: plain causal attention
    for rows, ids in ((train, train_ids), (val, val_ids)):
        starts = set(aligned_starts(ids, bos_id))
        found = [offsets(ids, row) & starts for row in rows.numpy()]
        assert all(found)  # every row is one that starts at an aligned start
        at_doc = [row[0] == bos_id for row in rows.tolist()]  # the others start block_size tokens into a document
        assert len(rows) // 4 <= sum(at_doc) < len(rows)


@pytest.mark.parametrize('layout', [[], ['--align_to_docs=True', '--doc_mask=True']], ids=['windows', 'aligned'])
def test_epoch_sampling_visits_every_row_once_per_epoch(short_docs, tmp_path, layout):
    """sampling='epoch': the first epoch is every row once (the non-overlapping windows, or the
    aligned starts), in a shuffled order; the second is every row once again, in another order."""
    from collections import Counter
    import numpy as np
    ids = tokens(short_docs, 'train')
    starts = aligned_starts(ids, bos(short_docs)) if layout else list(range(0, len(ids) - 64, 64))
    n, rows_per_iter = len(starts), 16  # batch 8 x 2 micro-steps
    iters = -(-2 * n // rows_per_iter)  # two epochs
    fed = fed_to_model(tmp_path, short_docs, str(tmp_path / 'out'), '--sampling=epoch', *layout, f'--max_iters={iters}',
                       f'--eval_interval={iters}', '--batch_size=8', '--gradient_accumulation_steps=2')[0]
    rows = [tuple(row) for f in fed if f['train'] for row in f['x'].tolist()]
    assert len(rows) == iters * rows_per_iter
    every_row = Counter(tuple(ids[s:s + 64].tolist()) for s in starts)
    first, second = rows[:n], rows[n:2 * n]
    assert Counter(first) == every_row and Counter(second) == every_row
    assert first != second and first != [tuple(ids[s:s + 64].tolist()) for s in starts]  # shuffled, each epoch anew
    assert len(set(rows[2 * n:])) == len(rows[2 * n:])  # the third epoch has begun, without repeats
    assert np.isfinite(history(str(tmp_path / 'out'))[iters]['val/loss'])


def test_epoch_sampling_resumes_in_the_same_order(short_docs, tmp_path):
    """A run stopped in its second epoch and resumed trains on the rows a straight run does, in the
    same order, and ends on the same weights."""
    args = ['--sampling=epoch', '--align_to_docs=True', '--doc_mask=True', '--batch_size=8',
            '--gradient_accumulation_steps=2', '--lr_decay_iters=30', '--eval_interval=15']
    straight = fed_to_model(tmp_path, short_docs, str(tmp_path / 'straight'), *args, '--max_iters=30')[0]
    split = str(tmp_path / 'split')
    fed_to_model(tmp_path, short_docs, split, *args, '--max_iters=15')  # 240 rows: into the second epoch
    assert torch.load(os.path.join(split, 'ckpt.pt'), weights_only=True)['data_position'] == 15 * 16
    resumed = fed_to_model(tmp_path, short_docs, split, *args, '--max_iters=30', '--init_from=resume')[0]
    train = [f['x'] for f in straight if f['train']]
    assert len(train) == 60 and all(torch.equal(a, b) for a, b in zip(train[30:], [f['x'] for f in resumed if f['train']]))
    assert history(split)[30]['val/loss'] == pytest.approx(history(str(tmp_path / 'straight'))[30]['val/loss'], rel=1e-6)


def test_doc_mask_eval_also_reports_the_plain_loss(short_docs, tmp_path):
    """With doc_mask or align_to_docs, val/loss is measured in the training's layout and
    val/plain_loss in the default one: for the same weights it is the default run's val/loss."""
    plain = str(tmp_path / 'plain')
    train(short_docs, plain, '--max_iters=30', '--eval_interval=30', '--lr_decay_iters=30')
    evals = {}
    for name, flags in (('plain', []), ('masked', ['--doc_mask=True']),
                        ('aligned', ['--doc_mask=True', '--align_to_docs=True'])):
        out = str(tmp_path / f'eval-{name}')
        train(short_docs, out, f'--init_from={plain}', '--init_checkpoint=latest', '--eval_only=True', *flags)
        evals[name] = history(out)[0]
    assert evals['plain']['val/loss'] == pytest.approx(history(plain)[30]['val/loss'], rel=1e-6)
    assert 'val/plain_loss' not in evals['plain']
    for name in ('masked', 'aligned'):
        assert evals[name]['val/plain_loss'] == pytest.approx(evals['plain']['val/loss'], rel=1e-6)
        assert evals[name]['val/plain_bpb'] == pytest.approx(evals['plain']['val/bpb'], rel=1e-6)
        assert abs(evals[name]['val/loss'] - evals['plain']['val/loss']) > 1e-4


@pytest.mark.slow
def test_ddp_two_ranks_draw_the_epoch_rows_one_process_does(short_docs, tmp_path):
    """sampling='epoch' (aligned, masked) on 2 ranks: rank r's micro-batch of each step is the one
    process's micro-step r, and the losses match."""
    args = ['--sampling=epoch', '--align_to_docs=True', '--doc_mask=True', '--batch_size=8', '--dropout=0',
            '--gradient_accumulation_steps=2', '--max_iters=12', '--eval_interval=12', '--lr_decay_iters=12']
    one = [f['x'] for f in fed_to_model(tmp_path, short_docs, str(tmp_path / 'one'), *args)[0] if f['train']]
    ranks = [[f['x'] for f in fed if f['train']]
             for fed in fed_to_model(tmp_path, short_docs, str(tmp_path / 'two'), *args, ranks=2)]
    assert len(one) == 24 and all(len(r) == 12 for r in ranks)
    for step in range(12):
        for r in range(2):
            assert torch.equal(ranks[r][step], one[2 * step + r]), (step, r)
    a, b = history(str(tmp_path / 'one')), history(str(tmp_path / 'two'))
    assert b[12]['val/loss'] == pytest.approx(a[12]['val/loss'], rel=1e-4)


# ----------------------------------------------------------------------------- token shards (issue 15)

@pytest.fixture(scope='module')
def sharded_docs(short_docs, tmp_path_factory):
    """short_docs in prepare.py's sharded layout: train in shards of 1,000 tokens (cut anywhere,
    documents running on into the next shard, the last shorter), val in two."""
    meta = json.load(open(os.path.join(*short_docs, 'meta.json')))
    folder = tmp_path_factory.mktemp('sharded') / 'sharded'
    folder.mkdir()
    shards = {}
    for split, size in (('train', 1000), ('val', -(-meta['val_tokens'] // 2))):
        ids = tokens(short_docs, split).astype(meta['dtype'])
        shards[split] = []
        for k, lo in enumerate(range(0, len(ids), size)):
            ids[lo:lo + size].tofile(folder / f'{split}_{k:06d}.bin')
            shards[split].append({'file': f'{split}_{k:06d}.bin', 'tokens': len(ids[lo:lo + size]), 'documents': 0})
    json.dump({**meta, 'shard_tokens': 1000, 'shards': shards}, open(folder / 'meta.json', 'w'))
    (folder / 'tokenizer.json').write_bytes(open(os.path.join(*short_docs, 'tokenizer.json'), 'rb').read())
    return str(folder.parent), 'sharded'


def shard_tokens(data):
    import numpy as np
    meta = json.load(open(os.path.join(*data, 'meta.json')))
    return [np.fromfile(os.path.join(*data, s['file']), meta['dtype']).astype(np.int64) for s in meta['shards']['train']]


@pytest.mark.parametrize('layout', [[], ['--align_to_docs=True', '--doc_mask=True'], ['--sampling=epoch'],
                                    ['--sampling=epoch', '--align_to_docs=True']],
                         ids=['random', 'aligned', 'epoch', 'epoch-aligned'])
def test_rows_come_from_inside_one_shard(sharded_docs, tmp_path, layout):
    """On a sharded dataset every training row lies inside one shard (a row across a boundary
    would be found in none); aligned rows start at a document or block_size into one, per shard;
    an epoch visits every row of every shard once."""
    from collections import Counter
    shards = shard_tokens(sharded_docs)
    assert len(shards) >= 10
    starts = [set(aligned_starts(ids, bos(sharded_docs))) if '--align_to_docs=True' in layout else None for ids in shards]
    every = [tuple(ids[s:s + 64]) for k, ids in enumerate(shards)  # an epoch's rows
             for s in (sorted(starts[k]) if starts[k] is not None else range(0, len(ids) - 64, 64))]
    iters = -(-len(every) // 8) if '--sampling=epoch' in layout else 12
    fed = fed_to_model(tmp_path, sharded_docs, str(tmp_path / 'out'), *layout, f'--max_iters={iters}',
                       f'--eval_interval={iters}', '--batch_size=8')[0]
    rows = [row for f in fed if f['train'] for row in f['x'].numpy()]
    for row in rows:
        found = [offsets(ids, row) & starts[k] if starts[k] is not None else offsets(ids, row)
                 for k, ids in enumerate(shards)]
        assert any(found)
    if '--sampling=epoch' in layout:
        assert Counter(map(tuple, rows[:len(every)])) == Counter(every)


def test_training_on_shards_lowers_the_loss_as_on_one_file(sharded_docs, short_docs, tmp_path):
    args = ['--max_iters=60', '--eval_interval=60', '--lr_decay_iters=60', '--batch_size=8']
    train(sharded_docs, str(tmp_path / 'sharded'), *args)
    h = history(str(tmp_path / 'sharded'))
    assert h[60]['val/loss'] < h[0]['val/loss'] - 1.0


def test_a_missing_or_cut_short_shard_is_an_error_naming_it(sharded_docs, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(os.path.join(*sharded_docs), root / 'broken')
    shard = root / 'broken' / 'train_000003.bin'
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = run_script('train.py', f'--data_root={root}', '--dataset=broken', f'--out_dir={tmp_path / "out"}', *TINY,
                      check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert f'{shard} has 1,990 bytes, but meta.json says 1,000 uint16 tokens' in proc.stderr
    shard.unlink()
    proc = run_script('train.py', f'--data_root={root}', '--dataset=broken', f'--out_dir={tmp_path / "out"}', *TINY,
                      check=False)
    assert proc.returncode != 0 and f'{shard} is missing (train shard 4 of' in proc.stderr


# ----------------------------------------------------------------------------- Muon

def test_muon_trains_and_resumes_the_same_curve(tiny_data_dir, tmp_path):
    """optim='muon' lowers the loss as AdamW does, and a resumed run continues its exact curve
    (both optimizers' states are in the checkpoint)."""
    args = ['--optim=muon', '--eval_interval=10', '--lr_decay_iters=30']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train(tiny_data_dir, straight, '--max_iters=30', *args)
    train(tiny_data_dir, split, '--max_iters=10', *args)
    train(tiny_data_dir, split, '--max_iters=30', '--init_from=resume', *args)
    a, b = history(straight), history(split)
    assert a[30]['val/loss'] < a[0]['val/loss'] - 0.4, a  # AdamW: 6.26 -> 5.57 in these 30 steps
    for it in (20, 30):
        assert b[it]['val/loss'] == pytest.approx(a[it]['val/loss'], rel=1e-6, abs=1e-6)


def test_resuming_with_the_other_optimizer_says_which_to_use(tiny_data_dir, tmp_path):
    out = str(tmp_path / 'out')
    train(tiny_data_dir, out, '--max_iters=2', '--eval_interval=2', '--optim=muon')
    proc = train(tiny_data_dir, out, '--max_iters=4', '--init_from=resume', '--optim=adamw', check=False)
    assert proc.returncode != 0 and 'resume with --optim=muon' in proc.stderr and 'Traceback' not in proc.stderr
    out = str(tmp_path / 'adamw')
    train(tiny_data_dir, out, '--max_iters=2', '--eval_interval=2')
    proc = train(tiny_data_dir, out, '--max_iters=4', '--init_from=resume', '--optim=muon', check=False)
    assert proc.returncode != 0 and 'resume with --optim=adamw' in proc.stderr and 'Traceback' not in proc.stderr


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tmp_path):
    import common
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=2))
    ctx = common.setup('cpu', 'float32', 0, str(tmp_path))
    opt = common.build_optimizer(ctx, 'muon', model, list(model.parameters()), 1e-3, 0.1, (0.9, 0.95))
    muon = {id(p) for g in opt.muon.param_groups for p in g['params']}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {f'transformer.h.{i}.attn.{w}.weight' for i in range(2) for w in ('c_attn', 'c_proj')}
    assert all(id(p) in muon or any(p is q for g in opt.adamw.param_groups for q in g['params'])
               for p in model.parameters())
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
