"""What every stage script gets from the one skeleton in common.py, tested on all five: the fp16
loss scale survives a resume, each DDP rank has its own random stream after a resume, the stop
vote never blocks a step, and the latest/best checkpoint rules."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import common
from conftest import REPO, run_script, run_torchrun, write_jsonl
from test_reward import toy_pairs

STAGES = ['pretrain', 'sft', 'reward', 'dpo', 'ppo']
SCRIPTS = {'pretrain': 'train.py', 'sft': 'sft.py', 'reward': 'reward.py', 'dpo': 'dpo.py', 'ppo': 'ppo.py'}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models: a second thread only adds overhead (and stalls on a busy machine)."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


@pytest.fixture(scope='module')
def stage_args(tiny_data_dir, tiny_checkpoint, tmp_path_factory):
    """Tiny arguments for each stage: 1-step logs, evals every 2 steps, 2 micro-steps per step
    (so 2 DDP ranks split them), data from the tiny fixtures."""
    data_root, dataset = tiny_data_dir
    root = tmp_path_factory.mktemp('stage-data')
    chats = write_jsonl(root / 'chat.jsonl', [{'messages': [{'role': 'user', 'content': f'say {w}'},
                                                           {'role': 'assistant', 'content': f'{w} {w}'}]}
                                              for w in ('tiger', 'lion', 'cat', 'dog', 'owl', 'bee')] * 4)
    pairs = write_jsonl(root / 'pairs.jsonl', toy_pairs())
    prompts = write_jsonl(root / 'prompts.jsonl', [{'prompt': f'{a}+{b}=?', 'answer': str(a + b)} for a in range(4) for b in range(4)])
    common_args = ['--log_interval=2', '--eval_interval=2', '--warmup_iters=0', '--learning_rate=1e-3', '--min_lr=1e-3',
                   f'--data_root={data_root}']
    accum = ['--gradient_accumulation_steps=2', '--batch_size=2']
    return {
        'pretrain': ['--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=64', '--eval_iters=2', f'--dataset={dataset}',
                     '--peak_flops=1e12', '--dropout=0.1', *accum, *common_args],
        'sft': [f'--init_from={tiny_checkpoint}', f'--sft_files={chats}', '--max_seq_len=32', '--eval_iters=2',
                '--eval_items_per_task=0', '--dropout=0.1', *accum, *common_args],
        'reward': [f'--init_from={tiny_checkpoint}', f'--pref_files={pairs}', '--max_seq_len=64', '--eval_pairs=8',
                   '--dropout=0.1', *accum, *common_args],
        'dpo': [f'--init_from={tiny_checkpoint}', f'--pref_files={pairs}', '--max_seq_len=64', '--eval_pairs=8',
                '--eval_items_per_task=0', *accum, *common_args],
        'ppo': [f'--init_from={tiny_checkpoint}', f'--rl_file={prompts}', '--eval_items_per_task=0', '--batch_size=4',
                '--max_new_tokens=4', '--ppo_epochs=1', '--num_minibatches=2', '--lr_decay_iters=100', *common_args],
    }


def run_stage(stage, stage_args, out_dir, *args, ranks=1, probe_dir=None):
    """The stage script, alone or on `ranks` gloo ranks under tests/ddp_probe.py."""
    args = [*stage_args[stage], f'--out_dir={out_dir}', *args]
    if ranks == 1:
        return run_script(SCRIPTS[stage], *args)
    os.makedirs(probe_dir, exist_ok=True)
    run_torchrun(ranks, 'tests/ddp_probe.py', SCRIPTS[stage], *args, env={'PROBE_DIR': str(probe_dir)})
    return [json.load(open(os.path.join(probe_dir, f'rank{r}.json'))) for r in range(ranks)]


def load(out_dir, name='ckpt.pt'):
    return torch.load(os.path.join(out_dir, name), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('stage', STAGES)
def test_fp16_loss_scale_survives_a_resume(stage, stage_args, tmp_path):
    out = str(tmp_path / stage)
    run_stage(stage, stage_args, out, '--dtype=float16', '--max_iters=2')
    # a loss scale the GradScaler had backed off to (its default start is 65536)
    ckpt = load(out)
    ckpt['scaler']['scale'] = 1024.0
    common.save_checkpoint(ckpt, os.path.join(out, 'ckpt.pt'))
    run_stage(stage, stage_args, out, '--dtype=float16', '--max_iters=4', '--init_from=resume')
    scale = load(out)['scaler']['scale']
    assert 0 < scale <= 1024.0, scale  # it went on from 1024 (halving on an overflow), not from 65536


def test_an_fp32_run_resumes_in_fp16(stage_args, tmp_path):
    out = str(tmp_path / 'pre')
    run_stage('pretrain', stage_args, out, '--max_iters=2')
    assert load(out)['scaler'] == {}  # a disabled GradScaler saves nothing
    run_stage('pretrain', stage_args, out, '--max_iters=4', '--init_from=resume', '--dtype=float16')
    assert load(out)['iter_num'] == 4 and 0 < load(out)['scaler']['scale'] <= 65536.0


@pytest.mark.slow
@pytest.mark.parametrize('stage', STAGES)
def test_ddp_stop_vote_is_asynchronous_every_step_and_ranks_keep_their_own_streams(stage, stage_args, tmp_path):
    out = str(tmp_path / stage)
    fresh = run_stage(stage, stage_args, out, '--max_iters=6', ranks=2, probe_dir=tmp_path / 'fresh')
    # one stop vote per step (a PPO iteration: per iteration), started asynchronously: none blocks
    assert [(r['all_reduce_max'], r['all_reduce_max_blocking']) for r in fresh] == [(6, 0)] * 2
    resumed = run_stage(stage, stage_args, out, '--max_iters=8', '--init_from=resume', ranks=2,
                        probe_dir=tmp_path / 'resumed')
    assert [r['all_reduce_max'] for r in resumed] == [2] * 2  # steps 7 and 8
    assert resumed[0]['rng'] != resumed[1]['rng']


@pytest.mark.slow
def test_ckpt_is_the_latest_state_best_pt_the_best_and_the_next_stage_starts_from_the_best(stage_args, tmp_path):
    out = str(tmp_path / 'pre')
    # steps 0-3 learn (val improves at 2 and 4); from step 4 the lr is 0 (cosine down to min_lr=0): no improvement
    no_more_learning = ['--learning_rate=3e-3', '--min_lr=0', '--lr_decay_iters=4']
    run_stage('pretrain', stage_args, out, '--max_iters=8', *no_more_learning)
    latest, best = load(out), load(out, 'best.pt')
    assert latest['iter_num'] == 8 and best['iter_num'] == 4  # the last step reached, and the best
    assert 'optimizer' in latest and 'optimizer' not in best
    assert best['best_val_loss'] == latest['best_val_loss']
    # a resumed run that never improves continues from the latest and leaves the best alone
    run_stage('pretrain', stage_args, out, '--max_iters=12', '--init_from=resume', *no_more_learning)
    assert load(out)['iter_num'] == 12 and load(out, 'best.pt')['iter_num'] == 4
    # the next stage starts from best.pt by default, from ckpt.pt when told; the lineage says which
    for which, name in (('best', 'best.pt'), ('latest', 'ckpt.pt')):
        nxt = str(tmp_path / f'sft-{which}')
        run_stage('sft', stage_args, nxt, f'--init_from={out}', f'--init_checkpoint={which}', '--max_iters=2')
        assert load(nxt)['parent'] == os.path.join(out, name)
        assert load(nxt)['config']['init_from'] == out  # the config as the user ran it


def test_checkpoint_path_rules(tmp_path):
    run = str(tmp_path)
    assert common.checkpoint_path(run) == os.path.join(run, 'ckpt.pt')  # no best kept: the latest
    open(os.path.join(run, 'best.pt'), 'w').close()
    assert common.checkpoint_path(run) == os.path.join(run, 'best.pt')
    assert common.checkpoint_path(run, 'latest') == os.path.join(run, 'ckpt.pt')
    assert common.checkpoint_path('elsewhere/x.pt', 'best') == 'elsewhere/x.pt'


def test_every_model_flag_is_a_pretrain_config_key():
    """train.py derives the model's arguments from GPTConfig's fields: a field without a config
    key would fail at start, not be silently ignored."""
    import dataclasses
    from model import GPTConfig
    source = open(os.path.join(REPO, 'train.py')).read()
    config_block = source[:source.index('config = configure(globals())')]
    missing = [f.name for f in dataclasses.fields(GPTConfig) if f.name != 'vocab_size' and f'\n{f.name} = ' not in config_block]
    assert not missing, missing


def test_resuming_a_checkpoint_without_the_training_state_says_why(tiny_checkpoint, tmp_path):
    """tiny_checkpoint holds weights only (no optimizer, loss scale, RNG or parent)."""
    out = tmp_path / 'old'
    out.mkdir()
    common.save_checkpoint(load(tiny_checkpoint), str(out / 'ckpt.pt'))
    proc = run_script('sft.py', '--init_from=resume', f'--out_dir={out}', check=False)
    assert proc.returncode != 0 and 'cannot be resumed: it has no optimizer, scaler, rng' in proc.stderr, proc.stderr[-500:]


def test_init_from_its_own_out_dir_is_refused(tiny_checkpoint):
    """It would replace the very files it records as its parent (a LoRA base, a DPO reference)."""
    proc = run_script('sft.py', f'--init_from={tiny_checkpoint}', f'--out_dir={tiny_checkpoint}', check=False)
    assert proc.returncode != 0 and "is this run's own out_dir: use --init_from=resume" in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize('name,dtype,peak', [('NVIDIA L40S', 'bfloat16', 362e12), ('NVIDIA L4', 'bfloat16', 121e12),
                                             ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
                                             ('NVIDIA H100 80GB HBM3', 'float32', 494e12),
                                             ('NVIDIA Some Future GPU', 'bfloat16', 0.0)])
def test_gpu_peak_flops_match_the_exact_device_and_the_dtype(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: name)
    assert common.measure_peak_flops('cuda', dtype) == peak


def test_rng_state_keeps_the_current_cuda_device_only(monkeypatch):
    """Saved on 8 GPUs and resumed on 1 (or under CUDA_VISIBLE_DEVICES=0), a list of every
    device's state could not be restored."""
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [torch.tensor([7], dtype=torch.uint8)] * 8)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(state.tolist()))

    def one_device(states):
        if len(states) > 1:
            raise RuntimeError('CUDA error: invalid device ordinal')
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', one_device)
    common.set_rng_state(common.rng_state())
    assert restored == [[7]]


def test_a_step_with_a_non_finite_gradient_is_skipped_on_the_device_and_counted(tmp_path):
    from model import GPT, GPTConfig
    ctx = common.setup('cpu', 'float32', 0, str(tmp_path))
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    params = list(model.parameters())
    optimizer = common.adamw(params, 1e-2, 0.1, (0.9, 0.95), 'cpu')
    assert optimizer.defaults['fused']  # the fused kernel on the CPU too; the skip is on the host there
    x = torch.randint(0, 64, (2, 16))

    def step(poison):
        model(x, x)[1].backward()
        if poison:
            params[0].grad[0, 0] = float('nan')
        return common.optimizer_step(ctx, optimizer, params, grad_clip=1.0)

    step(False)
    before = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]['exp_avg'].clone() for p in params]
    assert not torch.isfinite(step(True))
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # weights untouched
    assert all(torch.equal(m, optimizer.state[p]['exp_avg']) for m, p in zip(moments, params))  # moments too
    assert ctx.steps == 2 and ctx.skipped_steps.item() == 1
    step(False)
    assert not torch.equal(before[0], params[0]) and ctx.skipped_steps.item() == 1  # training goes on


def test_non_finite_weights_are_never_saved(tmp_path):
    ctx = common.setup('cpu', 'float32', 0, str(tmp_path))
    with pytest.raises(SystemExit, match='are not finite: not saved'):
        common.save(ctx, lambda: {'model': {'w': torch.tensor([1.0, float('inf')])}, 'iter_num': 3}, 1.0)
    assert not os.path.exists(os.path.join(tmp_path, 'ckpt.pt'))


def test_the_skeleton_imports_fsdp_only_when_a_run_uses_it():
    """FSDP2, DTensor and distributed checkpointing cost ~0.8 s to import (2.2 against 1.4 s for
    `import common`): every script start and every test that runs one paid it, FSDP or not."""
    probe = ("import sys, common; heavy = [m for m in ('torch.distributed.fsdp', 'torch.distributed.tensor', "
             "'torch.distributed.checkpoint') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="common.keep_freed_memory tunes glibc's malloc only")
def test_on_the_cpu_the_skeleton_keeps_freed_memory_for_the_next_tensor(tmp_path):
    """After common.setup on the CPU, a large tensor freed and allocated again reuses the process's
    memory: without it glibc maps fresh pages for each one (page faults on every touch) and hands
    them back after, which made GRPO's eager iteration 7% slower (1.45 against 1.35 s)."""
    probe = f"""
import resource, torch, common
def faults():
    for _ in range(20):
        torch.ones(10 << 20)  # 40 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
faults()
before = faults(); after = faults()
common.setup('cpu', 'float32', 0, {str(tmp_path)!r})
faults()
tuned_before = faults(); tuned_after = faults()
print(after - before, tuned_after - tuned_before)"""
    out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    default, tuned = map(int, out.split()[-2:])
    assert default > 20 * 5000 and tuned < 1000, (default, tuned)  # a 40 MB tensor is ~10,000 pages of 4 KB
