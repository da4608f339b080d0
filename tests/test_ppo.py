"""ppo.py end to end on tiny checkpoints: it raises the reward of a toy verifiable task, runs PPO
and GRPO on the built-in arithmetic prompts with TRL's metrics, and resumes where it stopped."""

import json
import os

import pytest
import torch

import tasks
from common import save_checkpoint
from conftest import run_script, write_jsonl
from model import GPT, GPTConfig
from tokenizer import char_tokenizer

TOY_TOKENIZER = char_tokenizer('abcdxyz?\nuserassistant')  # ~25 tokens: a random policy says 'x' now and then


def save_tiny(path, tok, seed=0, **overrides):
    """A random tiny GPT as an SFT out_dir (the keys sft.py saves)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(dict(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=2, n_embd=32), **overrides)))
    save_checkpoint({'model': model.state_dict(), 'model_args': model.config.to_dict(), 'tokenizer': tok.spec,
                     'config': {}, 'stage': 'sft', 'iter_num': 0, 'best_val_loss': float('inf')},
                    os.path.join(path, 'ckpt.pt'))
    return str(path)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """(checkpoint dir, rl_file): prompts whose verifiable answer is the reply x (a whole answer: with
    max_new_tokens=1, the one token x)."""
    root = tmp_path_factory.mktemp('toy')
    prompts = write_jsonl(root / 'toy.jsonl', [{'prompt': f'{c}?', 'answer': 'x'} for c in 'abcd'])
    return save_tiny(root / 'sft', TOY_TOKENIZER), prompts


@pytest.fixture(scope='module')
def suite(tmp_path_factory):
    """(checkpoint dir, data_root) for the built-in task suite, with a char tokenizer over its text."""
    root = tmp_path_factory.mktemp('suite')
    task_dir = tasks.ensure_tasks(str(root / 'tasks'))
    text = ''.join(open(os.path.join(task_dir, f), encoding='utf-8').read() for f in os.listdir(task_dir))
    tok = char_tokenizer(text)
    # a (random) reward model beside it, in rewardmodel.py's layout: the backbone plus 'reward_head'
    rm = save_tiny(root / 'rm', tok, seed=1, block_size=256)
    ckpt = torch.load(os.path.join(rm, 'ckpt.pt'), weights_only=True)
    head = torch.nn.Linear(32, 1)
    save_checkpoint(dict(ckpt, reward_head=head.state_dict(), stage='reward'), os.path.join(rm, 'ckpt.pt'))
    return save_tiny(root / 'sft', tok, block_size=256), str(root)


def rows(out_dir, key='objective/scores'):
    """history.jsonl lines that carry `key` (training lines; eval lines carry val/arith_acc)."""
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return [r for r in map(json.loads, f) if key in r]


TOY = ['--eval_items_per_task=0', '--missing_eos_penalty=0', '--max_new_tokens=3', '--batch_size=8',
       '--learning_rate=3e-3', '--kl_coef=0.0', '--ppo_epochs=2', '--num_minibatches=2', '--eval_interval=1000']


def test_toy_verifiable_task_raises_mean_reward(toy, tmp_path):
    sft, prompts = toy
    out = str(tmp_path / 'grpo')
    run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={out}', *TOY, '--max_new_tokens=1',
               '--algorithm=grpo', '--num_generations=8', '--max_iters=16', '--lr_decay_iters=16')
    h = rows(out, 'objective/verifiable')
    before = sum(r['objective/verifiable'] for r in h[:5]) / 5
    after = sum(r['objective/verifiable'] for r in h[-5:]) / 5
    assert after > before + 0.3 and after > 0.7, (before, after)


@pytest.mark.parametrize('algorithm,args', [
    ('ppo', ['--critic_learning_rate=5e-3']),
    ('ppo', ['--share_backbone=True', '--kl_target=1.0', '--kl_horizon=100', '--kl_estimator=k3', '--target_kl=1e-9',
             '--entropy_coef=0.01', '--micro_batch_size=2', '--loss_norm=sequence', '--whiten_rewards=True']),
    ('ppo', ['--reward_model={root}/rm', '--critic_init=reward', '--verifiable_weight=0', '--reward_model_weight=2']),
    ('grpo', ['--num_generations=4', '--kl_estimator=k3', '--scale_rewards=False']),
], ids=['ppo', 'ppo-shared-adaptive-earlystop', 'ppo-reward-model', 'grpo'])
def test_end_to_end_on_the_builtin_arithmetic_prompts(suite, tmp_path, algorithm, args):
    sft, data_root = suite
    out = str(tmp_path / 'out')
    args = [a.format(root=data_root) for a in args]
    proc = run_script('ppo.py', f'--init_from={sft}', f'--data_root={data_root}', f'--out_dir={out}', f'--algorithm={algorithm}',
                      '--max_iters=2', '--eval_interval=2', '--eval_items_per_task=4', '--batch_size=4',
                      '--num_minibatches=2', '--max_new_tokens=6', '--learning_rate=1e-3', *args)
    h = rows(out)
    assert [r['iter'] for r in h] == [1, 2]
    names = ['objective/kl', 'objective/entropy', 'objective/scores', 'objective/rlhf_reward', 'policy/approxkl_avg',
             'policy/clipfrac_avg', 'loss/policy_avg', 'val/response_length']
    names += ['loss/value_avg', 'val/clipfrac_avg'] if algorithm == 'ppo' else []
    assert all(name in h[-1] for name in names), h[-1]
    assert ('loss/value_avg' in h[-1]) == (algorithm == 'ppo')
    assert [r['iter'] for r in rows(out, 'val/arith_acc')] == [0, 2]  # held-out accuracy before and after
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['stage'] == algorithm and ckpt['iter_num'] == 2 and ckpt['parent'] == os.path.join(sft, 'ckpt.pt')
    reference = torch.load(os.path.join(sft, 'ckpt.pt'), weights_only=True)['model']
    assert any(not torch.equal(ckpt['model'][k], reference[k]) for k in reference)  # the policy moved
    if '--critic_init=reward' in args:  # the value head started as the reward model's head (and moved a little)
        rm_head = torch.load(os.path.join(data_root, 'rm', 'ckpt.pt'), weights_only=True)['reward_head']['weight']
        assert (ckpt['value']['value_head.weight'] - rm_head).abs().max() < 0.05 < rm_head.abs().max()
    if '--critic_learning_rate=5e-3' in args:  # the critic's groups learn at their own rate
        assert sorted({g['lr'] for g in ckpt['optimizer']['param_groups']}) == pytest.approx([1e-3, 5e-3])
    if '--target_kl=1e-9' in args:
        # the first minibatch is at ratio 1 (approx KL 0: it passes); the step it takes moves the
        # policy, so the second minibatch is past any positive threshold and the update stops
        assert 'early stop' in proc.stdout and all(r['update_steps'] == 2 for r in h)
        assert h[1]['kl_coef'] != h[0]['kl_coef']  # the adaptive controller moved beta


def test_resume_continues_the_same_run(toy, tmp_path):
    sft, prompts = toy
    args = [f'--init_from={sft}', f'--rl_file={prompts}', *TOY, '--kl_coef=0.1', '--kl_target=0.5', '--kl_horizon=50',
            '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=2']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_script('ppo.py', *args, f'--out_dir={straight}')
    run_script('ppo.py', *args, f'--out_dir={split}', '--max_iters=2')
    run_script('ppo.py', *args, f'--out_dir={split}', '--init_from=resume')
    a, b = rows(straight), rows(split)
    assert [r['iter'] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ('objective/scores', 'objective/kl', 'loss/policy_avg', 'loss/value_avg', 'kl_coef'):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key
    ckpt = torch.load(os.path.join(split, 'ckpt.pt'), weights_only=True)
    assert ckpt['parent'] == os.path.join(sft, 'ckpt.pt')  # the reference stays the SFT model across resumes
    assert ckpt['config']['init_from'] == 'resume'  # the config as the user ran it


@pytest.mark.parametrize('args,message', [
    (['--temperature=0'], 'RL samples its rollouts'),
    (['--reward_model=x', '--critic_init=reward', '--share_backbone=True'], "critic_init='reward' needs the critic's own"),
    (['--reward_model=x', '--reward_model_weight=0'], "would be unused"),
    (['--verifiable_weight=0', '--reward_model=x', '--reward_model_weight=0', '--critic_init=reward'], 'no reward'),
], ids=['greedy', 'reward-critic-on-shared-backbone', 'unused-reward-model', 'no-reward'])
def test_settings_that_would_be_ignored_or_break_rl_are_refused(toy, tmp_path, args, message):
    sft, prompts = toy
    proc = run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={tmp_path}', *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-500:]


def test_grpo_refuses_the_k1_estimator_in_its_loss(toy, tmp_path):
    sft, prompts = toy
    proc = run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={tmp_path}', '--algorithm=grpo',
                      '--num_generations=2', '--kl_estimator=k1', check=False)
    assert proc.returncode != 0 and "zero expected gradient" in proc.stderr and "kl_estimator='k3'" in proc.stderr


def test_grpo_without_a_group_says_how_to_fix_it(toy, tmp_path):
    sft, prompts = toy
    proc = run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={tmp_path}', '--algorithm=grpo',
                      '--num_generations=1', check=False)
    assert proc.returncode != 0 and 'num_generations >= 2' in proc.stderr
