"""The distributed ladder on CPU (gloo), tiny models: one process, 2 ranks and 8 ranks give the
same losses at the same global batch; a resume under another world size continues the same curve
(8 -> 2 -> 1 ranks); two nodes on one machine match one process; a rank killed mid-run ends the
job quickly with a clear message and leaves a checkpoint that resumes.

PPO/GRPO too: their rollouts are sampled from one stream that every rank shares."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, eval_rows, run_script, run_torchrun
from test_stages import SCRIPTS, stage_args  # noqa: F401 (stage_args is a fixture)

pytestmark = pytest.mark.slow
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # 8 ranks on 2 cores: one thread each


def launch(script, args, nproc, launcher=('--standalone',)):
    """torchrun as a user runs it, in its own process group (so a timeout can kill the ranks too)."""
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *launcher, f'--nproc_per_node={nproc}',
                             script, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait(proc, timeout=300):
    """(returncode, output) of a launched job; kills the whole group if it outlives `timeout`."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun did not finish within {timeout} s:\n{proc.communicate()[0][-3000:]}")
    return proc.returncode, output


def run(stage, stage_args, out_dir, *args, ranks=1):
    """A stage script alone (ranks=1) or under torchrun; its eval rows by step."""
    args = [*stage_args[stage], f'--out_dir={out_dir}', *args]
    if ranks == 1:
        run_script(SCRIPTS[stage], *args, env={'OMP_NUM_THREADS': '1'})
    else:
        run_torchrun(ranks, SCRIPTS[stage], *args, env={'OMP_NUM_THREADS': '1'})
    return eval_rows(out_dir)


# 8 micro-batches of one row (or pair) per optimizer step: one process runs all 8, 2 ranks 4 each,
# 8 ranks one each. No dropout: its noise is drawn per rank.
GLOBAL_BATCH = ['--gradient_accumulation_steps=8', '--batch_size=1', '--max_iters=4', '--eval_interval=4']
CASES = {'pretrain': ['--dropout=0'], 'pretrain-moe': ['--dropout=0', '--n_experts=4', '--n_shared_experts=1'],
         'sft-packed': ['--dropout=0', '--packing=True', '--batch_size=2', '--val_fraction=0.3'], 'reward': ['--dropout=0', '--lm_coef=0.5'],
         'sft-lora': ['--dropout=0', '--lora_rank=4', '--learning_rate=1e-2'], 'dpo': []}


@pytest.mark.parametrize('case', CASES)
def test_one_two_and_eight_ranks_and_fsdp_give_the_same_losses(case, stage_args, tmp_path):
    stage = case.split('-')[0]
    args = [*GLOBAL_BATCH, *CASES[case]]
    runs = {ranks: run(stage, stage_args, str(tmp_path / f'r{ranks}'), *args, ranks=ranks) for ranks in (1, 2, 8)}
    runs['fsdp'] = run(stage, stage_args, str(tmp_path / 'fsdp'), *args, '--parallel=fsdp', ranks=2)
    one = runs[1]
    assert one[4]['val/loss'] != one[0]['val/loss']  # it trained
    for ranks in (2, 8, 'fsdp'):
        for key in ('val/loss', 'val/train_split_loss', 'val/accuracy'):
            if key in one[4]:
                assert runs[ranks][4][key] == pytest.approx(one[4][key], rel=1e-4), (ranks, key)


def same_rl_stat(a, b, key):
    """An RL statistic of a distributed run equals one process's, to float summation order. The
    policy loss is a mean of whitened advantages (unit std) times ratios: O(1) terms that cancel to
    ~0.03, so its error is on the terms' scale, 1e-5, not 1e-4 of the mean (on an AVX-512 CPU the
    1-process and 2-rank runs' sums differ by 2.6e-6 at iteration 6)."""
    return b == pytest.approx(a, rel=1e-4, abs=1e-5 if key == 'loss/policy_avg' else 1e-6)


def train_rows(out_dir):
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return {row['iter']: row for row in map(json.loads, f) if row['kind'] == 'train'}


@pytest.mark.parametrize('algorithm', ['ppo', 'grpo'])
def test_rl_on_one_two_and_eight_ranks_and_fsdp_samples_and_learns_the_same(algorithm, stage_args, tmp_path):
    """8 prompts per iteration in all: one process with batch_size=8, 2 ranks with 4, 8 with 1.
    The rollouts are sampled from one stream every rank shares (each its rows), advantages are
    whitened over all ranks, the token-level loss normalised by all ranks' tokens. One minibatch
    per epoch: with several, each rank shuffles its own rollouts into them. The FSDP run also
    evaluates by generation on the task suite (every rank joins those forwards)."""
    # GRPO: an untrained policy's rewards are all equal (no advantage); the entropy bonus moves it
    grpo = ['--algorithm=grpo', '--num_generations=2', '--kl_coef=0.1', '--entropy_coef=0.1']
    args = ['--max_iters=3', '--eval_interval=3', '--log_interval=1', '--num_minibatches=1', '--ppo_epochs=2',
            *(grpo if algorithm == 'grpo' else [])]
    runs = {ranks: str(tmp_path / f'r{ranks}') for ranks in (1, 2, 8)}
    for ranks, out in runs.items():
        run('ppo', stage_args, out, *args, f'--batch_size={8 // ranks}', ranks=ranks)
    runs['fsdp'] = str(tmp_path / 'fsdp')
    run('ppo', stage_args, runs['fsdp'], *args, '--batch_size=4', '--parallel=fsdp', '--eval_items_per_task=2',
        f'--data_root={tmp_path / "data"}', ranks=2)
    one = train_rows(runs[1])
    keys = ['objective/scores', 'objective/kl', 'loss/policy_avg', 'policy/approxkl_avg', 'val/response_length',
            *(['loss/value_avg'] if algorithm == 'ppo' else [])]
    assert one[3]['policy/approxkl_avg'] > 0  # the policy moved
    for ranks in (2, 8, 'fsdp'):
        other = train_rows(runs[ranks])
        for it in (1, 3):
            for key in keys:
                assert same_rl_stat(one[it][key], other[it][key], key), (ranks, it, key, one[it][key], other[it][key])


@pytest.mark.parametrize('stage', ['pretrain', 'sft'])
def test_a_resume_under_another_world_size_continues_the_same_curve(stage, stage_args, tmp_path):
    args = ['--gradient_accumulation_steps=8', '--batch_size=1', '--eval_interval=2', '--dropout=0',
            '--lr_decay_iters=6', '--learning_rate=3e-3', '--min_lr=3e-4']
    straight = run(stage, stage_args, str(tmp_path / 'straight'), *args, '--max_iters=6')
    split = str(tmp_path / 'split')
    run(stage, stage_args, split, *args, '--max_iters=2', ranks=8)
    run(stage, stage_args, split, *args, '--max_iters=4', '--init_from=resume', ranks=2)
    resumed = run(stage, stage_args, split, *args, '--max_iters=6', '--init_from=resume')
    for step in (4, 6):
        assert resumed[step]['val/loss'] == pytest.approx(straight[step]['val/loss'], rel=1e-4), step
    assert straight[6]['val/loss'] < straight[0]['val/loss']


def test_checkpoints_move_between_fsdp_ddp_and_one_process(stage_args, tmp_path):
    """FSDP gathers its shards into the one checkpoint layout: a run continues the same curve
    when it switches FSDP -> DDP -> FSDP, and one process samples from the result."""
    args = ['--gradient_accumulation_steps=2', '--eval_interval=2', '--dropout=0', '--lr_decay_iters=6',
            '--learning_rate=3e-3', '--min_lr=3e-4']
    straight = run('pretrain', stage_args, str(tmp_path / 'straight'), *args, '--max_iters=6')
    out = str(tmp_path / 'switched')
    run('pretrain', stage_args, out, *args, '--max_iters=2', '--parallel=fsdp', ranks=2)
    run('pretrain', stage_args, out, *args, '--max_iters=4', '--init_from=resume', ranks=2)
    switched = run('pretrain', stage_args, out, *args, '--max_iters=6', '--init_from=resume', '--parallel=fsdp', ranks=2)
    for step in (4, 6):
        assert switched[step]['val/loss'] == pytest.approx(straight[step]['val/loss'], rel=1e-4), step
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert not any(type(v) is not torch.Tensor for v in ckpt['model'].values())  # whole tensors, no DTensor shards
    proc = run_script('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=8', '--start=def ',
                      '--device=cpu')
    assert proc.stdout.strip()


def test_ppo_checkpoints_move_between_fsdp_and_ddp(stage_args, tmp_path):
    """PPO (policy, critic transformer, value head) switched FSDP -> DDP -> FSDP on 2 ranks
    continues the curve of one process with the same 8 prompts per iteration."""
    args = ['--eval_interval=2', '--log_interval=1', '--num_minibatches=1', '--ppo_epochs=2']
    straight = str(tmp_path / 'straight')
    run('ppo', stage_args, straight, *args, '--batch_size=8', '--max_iters=6')
    out = str(tmp_path / 'switched')
    run('ppo', stage_args, out, *args, '--batch_size=4', '--max_iters=2', '--parallel=fsdp', ranks=2)
    run('ppo', stage_args, out, *args, '--batch_size=4', '--max_iters=4', '--init_from=resume', ranks=2)
    run('ppo', stage_args, out, *args, '--batch_size=4', '--max_iters=6', '--init_from=resume', '--parallel=fsdp', ranks=2)
    a, b = train_rows(straight), train_rows(out)
    for it in (3, 6):
        for key in ('objective/kl', 'loss/policy_avg', 'loss/value_avg', 'policy/approxkl_avg'):
            assert same_rl_stat(a[it][key], b[it][key], key), (it, key, a[it][key], b[it][key])


def test_fsdp_evaluates_by_generation_as_one_process_on_a_fresh_task_suite(tiny_checkpoint, tmp_path):
    """SFT on the built-in suite, which both ranks generate at once on first use; the task
    metrics by greedy generation need every rank under FSDP (each forward is a collective)."""
    args = [f'--init_from={tiny_checkpoint}', f'--data_root={tmp_path / "data"}', '--max_seq_len=128', '--batch_size=2',
            '--gradient_accumulation_steps=2', '--max_iters=2', '--eval_interval=2', '--eval_iters=2',
            '--eval_items_per_task=3']
    code, output = wait(launch('sft.py', [*args, '--parallel=fsdp', f'--out_dir={tmp_path / "fsdp"}'], 2))
    assert code == 0, output[-3000:]
    run_script('sft.py', *args, f'--out_dir={tmp_path / "one"}', env={'OMP_NUM_THREADS': '1'})
    fsdp, one = eval_rows(tmp_path / 'fsdp')[2], eval_rows(tmp_path / 'one')[2]
    for key in ('val/loss', 'val/code_loss', 'val/arith_acc', 'val/identity_acc'):
        assert fsdp[key] == pytest.approx(one[key], rel=1e-4), key


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_match_one_process(stage_args, tmp_path):
    """The multi-node command of the README, with both nodes on 127.0.0.1 (one rank each)."""
    args = [*stage_args['pretrain'], *GLOBAL_BATCH, '--dropout=0', f'--out_dir={tmp_path / "nodes"}']
    port = free_port()
    nodes = [launch('train.py', args, 1, ('--nnodes=2', f'--node_rank={rank}', f'--rdzv_endpoint=127.0.0.1:{port}'))
             for rank in (0, 1)]
    for node in nodes:
        code, output = wait(node)
        assert code == 0, output[-3000:]
    one = run('pretrain', stage_args, str(tmp_path / 'one'), *GLOBAL_BATCH, '--dropout=0')
    assert eval_rows(tmp_path / 'nodes')[4]['val/loss'] == pytest.approx(one[4]['val/loss'], rel=1e-4)


def rank_pid(torchrun_pid, rank):
    """The pid of a rank: the torchrun child whose environment says RANK=rank."""
    children = subprocess.run(['pgrep', '-P', str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            if f'RANK={rank}'.encode() in f.read().split(b'\0'):
                return int(pid)
    raise AssertionError(f"no rank {rank} among the children {children} of torchrun")


def test_a_rank_killed_mid_run_ends_the_job_and_the_checkpoint_resumes(stage_args, tmp_path):
    out = str(tmp_path / 'ddp')
    args = [*stage_args['pretrain'], f'--out_dir={out}', '--max_iters=100000', '--log_interval=1']
    proc = launch('train.py', args, 2)
    for line in proc.stdout:  # a checkpoint exists (step 2) and training went on
        if line.startswith('iter 5:'):
            break
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    t0 = time.time()
    code, output = wait(proc, timeout=120)
    elapsed = time.time() - t0
    # torchrun stops the other rank (SIGTERM, then SIGKILL after 30 s) and names the failure
    assert code != 0 and 'SIGKILL' in output, output[-3000:]
    assert elapsed < 45, f"the job took {elapsed:.0f} s to end after a rank died"
    step = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num']
    assert step >= 2
    code, output = wait(launch('train.py', [*args[:-2], f'--max_iters={step + 2}', '--init_from=resume'], 2))
    assert code == 0 and f'step {step + 2}: val/loss' in output, output[-3000:]
