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

from conftest import REPO, run_script

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
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'train.py', *args, f'--out_dir={ddp}'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
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
    train(tiny_data_dir, out, '--max_iters=40', '--eval_interval=40', '--lr_decay_iters=40', '--dtype=bfloat16',
          '--lr_schedule=wsd')
    h = history(out)
    assert h[40]['val/loss'] < h[0]['val/loss'] - 0.5


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data_dir, tmp_path):
    eager, compiled = str(tmp_path / 'eager'), str(tmp_path / 'compiled')
    args = ['--max_iters=10', '--eval_interval=10', '--lr_decay_iters=10']
    train(tiny_data_dir, eager, *args)
    train(tiny_data_dir, compiled, *args, '--compile_model=True')
    assert history(compiled)[10]['val/loss'] == pytest.approx(history(eager)[10]['val/loss'], rel=1e-3)


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
