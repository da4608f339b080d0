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


def test_toy_verifiable_task_raises_mean_reward_and_the_kl_term_holds_it_back(toy, tmp_path):
    """GRPO learns to answer x; with kl_coef > 0 it still learns, and its KL to the reference stays
    below the unpenalised run's: the sign of the KL term in the loss pulls towards the reference
    (flipped, the penalised run's KL reaches the unpenalised one's: 1.15 against 1.18 nats)."""
    sft, prompts = toy
    args = [f'--init_from={sft}', f'--rl_file={prompts}', *TOY, '--max_new_tokens=1', '--algorithm=grpo',
            '--num_generations=8', '--max_iters=16', '--lr_decay_iters=16']
    free, held = str(tmp_path / 'grpo'), str(tmp_path / 'held')
    run_script('ppo.py', *args, f'--out_dir={free}')
    run_script('ppo.py', *args, f'--out_dir={held}', '--kl_coef=0.5')
    mean = lambda out, key, part: sum(r[key] for r in part(rows(out))) / len(part(rows(out)))
    first, last, whole = (lambda h: h[:5]), (lambda h: h[-5:]), (lambda h: h)
    before, after = mean(free, 'objective/verifiable', first), mean(free, 'objective/verifiable', last)
    assert after > before + 0.3 and after > 0.7, (before, after)
    before, after = mean(held, 'objective/verifiable', first), mean(held, 'objective/verifiable', last)
    assert after > before + 0.3, (before, after)  # 0.09 -> 0.72
    assert mean(held, 'objective/kl', whole) < 0.85 * mean(free, 'objective/kl', whole)  # 0.91 against 1.18


def test_grpo_with_one_step_per_batch_takes_its_old_logprobs_from_the_update(toy, tmp_path):
    """The configs' GRPO setting, one optimizer step per rollout batch (ppo_epochs = num_minibatches
    = 1), skips the separate forward for the old log-probs: the update's own forward is the policy
    before the step. The ratio is then exactly 1 (no clipping, approx KL 0), it learns the toy task,
    and the logged KL to the reference is filled in after the update."""
    sft, prompts = toy
    out = str(tmp_path / 'grpo')
    run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', *TOY, '--max_new_tokens=1', '--algorithm=grpo',
               '--num_generations=8', '--max_iters=40', '--lr_decay_iters=40', '--ppo_epochs=1', '--num_minibatches=1',
               '--micro_batch_size=16', '--kl_coef=0.1', f'--out_dir={out}')
    h = rows(out)
    assert all(r['policy/approxkl_avg'] == 0 and r['policy/clipfrac_avg'] == 0 and r['val/ratio'] == 1 for r in h)
    before = sum(r['objective/verifiable'] for r in h[:5]) / 5
    after = sum(r['objective/verifiable'] for r in h[-5:]) / 5
    assert after > before + 0.3, (before, after)
    assert abs(h[0]['objective/kl']) < 1e-6 and 0.01 < h[-1]['objective/kl'] < 5  # the reference is where it starts


def test_ppo_critic_and_gae_learn_the_toy_task_with_a_kl_penalty(toy, tmp_path):
    """PPO's whole path (critic, per-token KL in the reward, the score at each response's last
    token, GAE, whitening) on a toy task whose best answer, x then <|im_end|>, is shorter than
    max_new_tokens=3, from a random policy (1 in 24^2 samples it). It fails if the advantage's
    sign is flipped (the score falls to -1), if the score lands on any other token than the last
    real one (at token 0 <|im_end|> gets no credit; at the last column a 2-token answer's score
    falls on padding). Each of these bugs, put in by hand, kept the score below 0."""
    sft, prompts = toy
    args = [f'--init_from={sft}', f'--rl_file={prompts}', '--eval_items_per_task=0', '--eval_interval=1000',
            '--algorithm=ppo', '--max_new_tokens=3', '--missing_eos_penalty=1', '--batch_size=32', '--learning_rate=3e-3',
            '--critic_learning_rate=3e-3', '--ppo_epochs=2', '--num_minibatches=2', '--max_iters=40', '--lr_decay_iters=40']
    out = str(tmp_path / 'ppo')
    run_script('ppo.py', *args, f'--out_dir={out}', '--kl_coef=0.2')
    h = rows(out)
    before = sum(r['objective/scores'] for r in h[:5]) / 5
    after = sum(r['objective/scores'] for r in h[-5:]) / 5
    assert before < -0.5 and after > 0.5, (before, after)  # from "no <|im_end|>" to "x<|im_end|>"


def test_dynamic_sampling_fills_the_batch_with_groups_that_teach(toy, tmp_path):
    """DAPO's dynamic sampling on the toy task, where most groups of a random policy all score 0:
    it samples more prompts until the batch holds only groups whose scores differ (up to
    max_sampling_tries), and training on them runs, with clip-higher and masking of cut responses on."""
    sft, prompts = toy
    out = str(tmp_path / 'dapo')
    run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={out}', *TOY, '--max_new_tokens=2',
               '--algorithm=grpo', '--num_generations=8', '--batch_size=2', '--max_iters=3', '--loss_type=dapo',
               '--dynamic_sampling=True', '--max_sampling_tries=20', '--epsilon_high=0.28',
               '--mask_truncated_completions=True')
    h = rows(out)
    assert h[0]['rollout/tries'] > 1  # a random policy: most groups of 8 score the same
    assert all(r['val/frac_reward_zero_std'] == 0 for r in h if r['rollout/tries'] < 20), h


@pytest.mark.parametrize('algorithm,args', [
    ('ppo', ['--critic_learning_rate=5e-3']),
    ('ppo', ['--share_backbone=True', '--kl_target=1.0', '--kl_horizon=100', '--kl_estimator=k3', '--target_kl=1e-9',
             '--entropy_coef=0.01', '--micro_batch_size=2', '--loss_type=grpo', '--whiten_rewards=True']),
    ('ppo', ['--reward_model={root}/rm', '--critic_init=reward', '--verifiable_weight=0', '--reward_model_weight=2']),
    ('grpo', ['--num_generations=4', '--kl_estimator=k3', '--scale_rewards=False']),
    ('grpo', ['--num_generations=4', '--loss_type=dr_grpo', '--advantage=rloo', '--micro_batch_size=3']),
    ('grpo', ['--num_generations=1', '--loss_type=bnpo', '--advantage=reinforce_pp', '--overlong_buffer_len=2']),
    ('ppo', ['--reward_model={root}/rm', '--critic_init=reward', '--verifiable_weight=0', '--reward_model_weight=2',
             '--lora_rank=4']),
    ('grpo', ['--num_generations=4', '--lora_rank=4', '--dtype=bfloat16']),
], ids=['ppo', 'ppo-shared-adaptive-earlystop', 'ppo-reward-model', 'grpo', 'grpo-rloo-dr_grpo', 'reinforce_pp-bnpo',
        'ppo-lora-reward-critic', 'grpo-lora-bf16-rollouts'])
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
    if '--lora_rank=4' in args:  # merged weights in 'model'; the adapters (and the critic's, and its head) saved apart
        assert set(ckpt['lora']) and all('lora_' in k or k.startswith('value_head.') for k in ckpt['value'])
        assert torch.equal(ckpt['model']['transformer.wte.weight'], reference['transformer.wte.weight'])
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


def test_rl_tasks_trains_on_the_prompts_of_those_tasks_only(toy, tmp_path):
    sft, _ = toy
    prompts = write_jsonl(tmp_path / 'mixed.jsonl', [{'prompt': f'{c}?', 'answer': 'x', 'task': 'keep'} for c in 'abc']
                          + [{'prompt': 'd?', 'answer': 'y', 'task': 'other'}, {'prompt': 'a?', 'answer': 'x'}])
    proc = run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={tmp_path / "out"}', *TOY,
                      '--max_iters=1', '--rl_tasks=keep')
    assert 'rl data: 3 prompts' in proc.stdout
    proc = run_script('ppo.py', f'--init_from={sft}', f'--rl_file={prompts}', f'--out_dir={tmp_path / "out2"}', *TOY,
                      '--max_iters=1', '--rl_tasks=keep,kept', check=False)  # a typo is refused, not ignored
    assert proc.returncode != 0 and "no prompt has the \"task\" 'kept' (the file's tasks: None, keep, other)" in proc.stderr
    import data  # names are stripped: 'keep, other' is both
    loaded = data.load_rl(prompts)
    assert len(data.prompts_of_tasks(loaded, 'keep, other')) == 4 and data.prompts_of_tasks(loaded, '') == loaded


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


def test_lora_ppo_learns_with_adapters_only_a_critic_on_the_same_base_and_resumes(toy, tmp_path):
    """PPO with lora_rank > 0 on the toy task (the one token x): (a) only the adapters of policy and
    critic and the value head train, the critic's frozen base being the policy's; (b) the score
    rises from ~0 to ~1; (c) the reference is the base with the adapters off, bit for bit; (d) a
    resumed run continues the same curve, and the merged policy loads as a plain GPT. The head is
    untied and adapted: a random tied head has logits too small for any adapter to move much."""
    from lora import add_lora, adapters_off, load_adapters, merged_state_dict
    _, prompts = toy
    sft = save_tiny(tmp_path / 'sft', TOY_TOKENIZER, tie_embeddings=False)
    args = [f'--init_from={sft}', f'--rl_file={prompts}', *TOY, '--max_new_tokens=1', '--batch_size=16',
            '--learning_rate=3e-2', '--critic_learning_rate=1e-2', '--kl_coef=0.05', '--max_iters=10',
            '--lr_decay_iters=10', '--lora_rank=4', '--lora_alpha=8', '--lora_targets=c_attn,lm_head']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    proc = run_script('ppo.py', *args, f'--out_dir={straight}')
    assert 'LoRA rank 4' in proc.stdout and 'adapters off' in proc.stdout and "its frozen base the policy's" in proc.stdout
    run_script('ppo.py', *args, f'--out_dir={split}', '--max_iters=5')
    run_script('ppo.py', *args, f'--out_dir={split}', '--init_from=resume')
    a, b = rows(straight), rows(split)
    assert sum(r['objective/scores'] for r in a[:3]) / 3 < 0.2 and a[-1]['objective/scores'] > 0.8, a
    for ra, rb in zip(a[5:], b[5:]):
        for key in ('objective/scores', 'objective/kl', 'loss/policy_avg', 'loss/value_avg'):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key

    ckpt = torch.load(os.path.join(straight, 'ckpt.pt'), weights_only=True)
    assert set(ckpt['value']) == {k for k in ckpt['value'] if k.startswith('critic.') and 'lora_' in k} | {
        'value_head.weight', 'value_head.bias'} and any(k.startswith('critic.') for k in ckpt['value'])
    base_state = torch.load(os.path.join(sft, 'ckpt.pt'), weights_only=True)
    base = GPT(GPTConfig(**base_state['model_args'])).eval()
    base.load_state_dict(base_state['model'])
    policy = GPT(GPTConfig(**base_state['model_args'])).eval()
    policy.load_state_dict(base_state['model'])
    add_lora(policy, 4, 8.0, 'c_attn,lm_head')
    load_adapters(policy, ckpt['lora'], straight)
    merged = merged_state_dict(policy)
    assert all(torch.equal(ckpt['model'][k], v) for k, v in merged.items())  # = base + B A: the base did not move
    x = torch.randint(0, TOY_TOKENIZER.n_vocab, (2, 6))
    with torch.no_grad():
        with adapters_off(policy):
            assert torch.equal(policy(x)[0], base(x)[0])
        plain = GPT(GPTConfig(**ckpt['model_args'])).eval()
        plain.load_state_dict(ckpt['model'])  # what sample.py and a next stage load
        torch.testing.assert_close(plain(x)[0], policy(x)[0], atol=1e-4, rtol=1e-4)
