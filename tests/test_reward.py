"""reward.py and rewardmodel.py: the reward is read at the last real token however the batch is
padded, the log-likelihood term (lm_coef) and the Bradley-Terry loss and TRL's metrics by hand,
and reward.py end to end on a tiny checkpoint: it separates a separable toy set, resumes exactly,
runs the same on two DDP ranks, freezes the backbone when asked, and names the file and line of
bad data."""

import json
import math
import os
import random

import pytest
import torch

from conftest import run_script, run_torchrun

import common
import preference
from model import GPT, GPTConfig
from rewardmodel import (RewardModel, bradley_terry_loss, load_reward_model, padding_inputs, reward_metrics,
                         score, score_ids)
from tokenizer import train_bpe

WORDS = ['apple', 'river', 'stone', 'cloud', 'tiger', 'maple', 'ocean', 'pixel', 'lemon', 'comet', 'piano', 'delta']


# ----------------------------------------------------------------------------- helpers (test_dpo uses them too)

def toy_pairs(n=64, seed=0):
    """A separable preference set: whatever the prompt, "good ..." is chosen over "bad ..."."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        prompt = [{'role': 'user', 'content': f"Say something about {a} and {b}."}]
        pairs.append({'chosen': prompt + [{'role': 'assistant', 'content': f"good {a}"}],
                      'rejected': prompt + [{'role': 'assistant', 'content': f"bad {b}"}]})
    return pairs


def write_jsonl(path, records):
    with open(path, 'w') as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records)
    return str(path)


def tiny_tokenizer():
    """A byte-level BPE (any text encodes, the built-in task suite included)."""
    text = ' '.join(p['chosen'][0]['content'] + ' good bad ' for p in toy_pairs())
    return train_bpe([text + ' user assistant system What is 12+34? Complete this Python function:'], 300)


def make_checkpoint(out_dir, seed=0, stage='sft'):
    """A tiny random GPT saved as an SFT checkpoint, in sft.py's format."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    common.save_checkpoint({'model': model.state_dict(), 'model_args': config.to_dict(), 'tokenizer': tok.spec,
                            'config': {'init_from': 'scratch'}, 'stage': stage, 'iter_num': 0,
                            'best_val_loss': float('inf'), 'optimizer': None, 'rng': None},
                           os.path.join(out_dir, 'ckpt.pt'))
    return str(out_dir)


def history(out_dir):
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return {row['iter']: row for row in map(json.loads, f) if row['kind'] == 'eval'}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models: a second thread only adds overhead (and stalls on a busy machine)."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')


@pytest.fixture(scope='module')
def sft_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp('sft'))


@pytest.fixture(scope='module')
def toy_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp('toy') / 'toy.jsonl', toy_pairs())


def run_reward(init_from, out_dir, *args, **kw):
    return run_script('reward.py', f'--init_from={init_from}', f'--out_dir={out_dir}', '--batch_size=8',
                      '--max_seq_len=64', '--log_interval=5', '--warmup_iters=5', '--learning_rate=3e-3',
                      *args, **kw)


# ----------------------------------------------------------------------------- the model and the loss

def test_reward_is_read_at_the_last_real_token_right_and_left_padded():
    torch.manual_seed(0)
    model = RewardModel(GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32))).eval()
    seqs = [torch.randint(1, 50, (n,)) for n in (5, 9, 3)]
    alone = torch.stack([model(s[None], torch.tensor([len(s) - 1]))[0][0] for s in seqs])
    T = 12
    for side in ('right', 'left'):
        for pad_value in (0, 7):  # what sits in the pads must not matter
            ids = torch.full((3, T), pad_value)
            mask = torch.zeros(3, T, dtype=torch.bool)
            for i, s in enumerate(seqs):
                span = slice(0, len(s)) if side == 'right' else slice(T - len(s), T)
                ids[i, span], mask[i, span] = s, True
            torch.testing.assert_close(score_ids(model, ids, mask), alone, rtol=1e-5, atol=1e-5)
    # right padding needs no mask at all: the plain forward with each row's last index agrees
    ids = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    torch.testing.assert_close(model(ids, torch.tensor([4, 8, 2]))[0], alone, rtol=1e-5, atol=1e-5)
    assert padding_inputs(torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool))[0].tolist() == [3]


def test_lm_coef_adds_the_mean_log_likelihood_of_the_response_however_padded():
    torch.manual_seed(0)
    backbone = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32))
    plain, model = RewardModel(backbone).eval(), RewardModel(backbone, lm_coef=2.0).eval()
    model.head.load_state_dict(plain.head.state_dict())
    seqs, n_prompt = [torch.randint(1, 50, (n,)) for n in (6, 9, 4)], [2, 5, 1]
    expected = []
    for s, n in zip(seqs, n_prompt):  # by hand: the head, plus 2 x the mean of log p(s[t] | s[:t]) for t >= n
        logp = backbone(s[None])[0][0, :-1].log_softmax(-1).gather(-1, s[1:, None]).squeeze(-1)
        expected.append(plain(s[None], torch.tensor([len(s) - 1]))[0][0] + 2.0 * logp[n - 1:].mean())
    expected = torch.stack(expected)
    T = 12
    for side in ('right', 'left', 'both'):  # both: ppo.py's left-padded prompt, right-padded response
        ids, mask, response = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool), \
            torch.zeros(3, T, dtype=torch.bool)
        for i, (s, n) in enumerate(zip(seqs, n_prompt)):
            start = {'right': 0, 'left': T - len(s), 'both': (T - len(s)) // 2}[side]
            ids[i, start:start + len(s)], mask[i, start:start + len(s)] = s, True
            response[i, start + n:start + len(s)] = True
        torch.testing.assert_close(score_ids(model, ids, mask, response), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='response_mask='):
        model(ids, torch.tensor([T - 1] * 3))


def test_bradley_terry_loss_matches_hand_computed_values():
    r_c, r_r = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5])
    plain = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(plain, rel=1e-6)
    with_margin = (math.log(1 + math.exp(-(1.0 - 0.5))) + math.log(1 + math.exp(1.5 + 2.0))) / 2
    assert bradley_terry_loss(r_c, r_r, torch.tensor([0.5, 2.0])).item() == pytest.approx(with_margin, rel=1e-6)
    centered = plain + 0.01 * ((2.0 + 1.0) ** 2 + (-1.0 + 0.5) ** 2) / 2
    assert bradley_terry_loss(r_c, r_r, center_coef=0.01).item() == pytest.approx(centered, rel=1e-6)


def test_reward_metrics_have_trl_names_and_values():
    m = reward_metrics(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([1.0, 0.5, -2.0]))
    assert {k: round(v.item(), 6) for k, v in m.items()} == {
        'accuracy': round(2 / 3, 6), 'margin': round((1.0 - 1.5 + 5.0) / 3, 6), 'mean_reward': round(3.5 / 6, 6),
        'min_reward': -2.0, 'max_reward': 3.0}


# ----------------------------------------------------------------------------- reward.py end to end

def test_reward_py_separates_a_separable_toy_set_and_saves_a_loadable_reward_model(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'rm')
    proc = run_reward(sft_dir, out, f'--pref_files={toy_file}', '--val_fraction=0.25', '--max_iters=40',
                      '--eval_interval=20', '--lr_decay_iters=40')
    h = history(out)
    assert h[0]['val/accuracy'] < 0.9 and h[40]['val/accuracy'] > 0.9, h
    assert h[40]['val/loss'] < h[0]['val/loss'] - 0.3
    assert {'val/margin', 'val/mean_reward', 'val/min_reward', 'val/max_reward'} <= set(h[40])
    assert 'accuracy' in proc.stdout and 'pairs/s' in proc.stdout and 'eta' in proc.stdout
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['stage'] == 'reward' and set(ckpt['reward_head']) == {'weight', 'bias'}
    assert common.model_from_checkpoint(ckpt) is not None  # the backbone loads as a plain GPT

    model, tok = load_reward_model(out)
    prompts = [[{'role': 'user', 'content': f"Say something about {w} and {w}."}] for w in ('tiger', 'lemon')]
    good = score(model, tok, prompts, ['good tiger', 'good lemon'])
    bad = score(model, tok, prompts, ['bad tiger', 'bad lemon'])
    assert good.shape == (2,) and (good > bad).all()
    with pytest.raises(SystemExit, match='not a reward model'):
        load_reward_model(sft_dir)


def test_lm_coef_is_saved_and_scored_with(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'rm-lm')
    run_reward(sft_dir, out, f'--pref_files={toy_file}', '--max_iters=4', '--eval_interval=4', '--lm_coef=0.5')
    model, tok = load_reward_model(out)
    assert model.lm_coef == 0.5
    prompt = [[{'role': 'user', 'content': "Say something about tiger and tiger."}]]
    head_only = RewardModel(model.backbone).eval()
    head_only.head.load_state_dict(model.head.state_dict())
    ids, n = preference.encode_reply(tok, prompt[0], "good tiger")
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        logp = model.backbone(x)[0][0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None]).squeeze(-1)[n - 1:].mean()
        want = head_only(x, torch.tensor([len(ids) - 1]))[0] + 0.5 * logp
    torch.testing.assert_close(score(model, tok, prompt, ['good tiger']), want, rtol=1e-5, atol=1e-5)


def test_resume_with_another_lm_coef_is_an_error(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'rm-lm')
    run_reward(sft_dir, out, f'--pref_files={toy_file}', '--max_iters=2', '--eval_interval=2', '--lm_coef=0.5')
    proc = run_reward('resume', out, f'--pref_files={toy_file}', '--max_iters=4', check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'lm_coef=0.5' in output and 'resume with the same --lm_coef' in output


def test_freeze_backbone_trains_only_the_head(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'frozen')
    proc = run_reward(sft_dir, out, f'--pref_files={toy_file}', '--max_iters=10', '--eval_interval=10',
                      '--freeze_backbone=True')
    assert 'head only' in proc.stdout
    before = torch.load(os.path.join(sft_dir, 'ckpt.pt'), weights_only=True)['model']
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert all(torch.equal(before[k], after['model'][k]) for k in before)
    h = history(out)
    assert h[10]['val/loss'] < h[0]['val/loss']  # the head alone learned something


def test_resume_reaches_the_same_metrics(sft_dir, toy_file, tmp_path):
    args = [f'--pref_files={toy_file}', '--eval_interval=10', '--lr_decay_iters=20']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_reward(sft_dir, straight, '--max_iters=20', *args)
    run_reward(sft_dir, split, '--max_iters=10', *args)
    run_reward('resume', split, '--max_iters=20', *args)
    a, b = history(straight)[20], history(split)[20]
    for key in ('val/loss', 'val/accuracy', 'val/margin', 'val/mean_reward'):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_the_lm_term(sft_dir, toy_file, tmp_path):
    args = [f'--pref_files={toy_file}', '--max_iters=4', '--eval_interval=4', '--lr_decay_iters=4',
            '--gradient_accumulation_steps=2', '--lm_coef=0.5']
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    run_reward(sft_dir, single, *args)
    run_torchrun(2, 'reward.py', f'--init_from={sft_dir}', f'--out_dir={ddp}', '--batch_size=8', '--max_seq_len=64',
                 '--warmup_iters=5', '--learning_rate=3e-3', *args)
    a, b = history(single), history(ddp)
    assert a[4]['val/loss'] < a[0]['val/loss']
    for key in ('val/loss', 'val/accuracy', 'val/margin'):
        assert b[4][key] == pytest.approx(a[4][key], rel=1e-4, abs=1e-5), key


def test_reward_py_on_the_built_in_task_suite_reports_accuracy_per_task(sft_dir, tmp_path):
    out = str(tmp_path / 'builtin')
    run_reward(sft_dir, out, f'--data_root={tmp_path}', '--max_iters=2', '--eval_interval=2', '--max_seq_len=128')
    h = history(out)[2]
    assert {'val/accuracy_arithmetic', 'val/accuracy_identity'} <= set(h) and 0 <= h['val/accuracy'] <= 1


@pytest.mark.parametrize('line,field', [
    ('{"chosen": "a", "prompt": "q"}', "'rejected'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin'")])
def test_malformed_preference_data_names_file_line_and_field(sft_dir, tmp_path, line, field):
    good = json.dumps({'prompt': 'q', 'chosen': 'a', 'rejected': 'b'})
    path = write_jsonl(tmp_path / 'bad.jsonl', [good, good, line, good])
    proc = run_reward(sft_dir, str(tmp_path / 'out'), f'--pref_files={path}', '--max_iters=1', check=False)
    assert proc.returncode != 0
    assert f'{path}:3' in proc.stderr and field in proc.stderr and 'Traceback' not in proc.stderr


# ----------------------------------------------------------------------------- LoRA

def lora_model(base_dir, out_dir, wrap=lambda m: m):
    """The model of a LoRA run rebuilt as it trained: its parent's weights (the base) under the saved
    adapters; wrap(GPT) adds what the stage puts around the backbone. -> (model, base GPT, checkpoint)."""
    from lora import add_lora, load_adapters
    ckpt = common.load_checkpoint(out_dir, which='latest')
    base = common.model_from_checkpoint(common.load_checkpoint(base_dir)).eval()
    backbone = common.model_from_checkpoint(common.load_checkpoint(base_dir))
    add_lora(backbone, ckpt['config']['lora_rank'], ckpt['config']['lora_alpha'], ckpt['config']['lora_targets'])
    load_adapters(backbone, ckpt['lora'], out_dir)
    return wrap(backbone).eval(), base, ckpt


def assert_lora_checkpoint(base_dir, ckpt, model, x):
    """(a) only adapters trained: the merged 'model' is the base plus the adapters' B A, the
    embedding untouched; (c) with the adapters off the model is the base, bit for bit; and the
    merged weights load as a plain GPT with the LoRA model's logits (the next stage, sample.py)."""
    from lora import adapters_off, merged_state_dict
    base_state = common.load_checkpoint(base_dir)['model']
    backbone = model.backbone if hasattr(model, 'backbone') else model
    assert set(ckpt['lora']) and all('lora_' in k for k in ckpt['lora'])
    merged = merged_state_dict(backbone)
    assert all(torch.equal(ckpt['model'][k], merged[k]) for k in merged)
    assert torch.equal(ckpt['model']['transformer.wte.weight'], base_state['transformer.wte.weight'])
    assert not torch.equal(ckpt['model']['transformer.h.0.attn.c_attn.weight'], base_state['transformer.h.0.attn.c_attn.weight'])
    base = common.model_from_checkpoint(common.load_checkpoint(base_dir)).eval()
    with torch.no_grad(), adapters_off(backbone):
        assert torch.equal(backbone(x)[0], base(x)[0])
    with torch.no_grad():
        torch.testing.assert_close(common.model_from_checkpoint(ckpt).eval()(x)[0], backbone(x)[0], atol=1e-5, rtol=1e-5)


def test_lora_reward_model_trains_adapters_and_head_resumes_and_loads_for_ppo(sft_dir, toy_file, tmp_path):
    """(a) the backbone's adapters and the head train, nothing else; (b) the loss falls; (c) adapters
    off is the SFT model; (d) a resumed run reaches the same metrics, and load_reward_model reads the
    merged checkpoint as any reward model."""
    args = [f'--pref_files={toy_file}', '--val_fraction=0.25', '--eval_interval=5', '--lr_decay_iters=10',
            '--lora_rank=4', '--lora_alpha=8']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    proc = run_reward(sft_dir, straight, '--max_iters=10', *args)
    assert 'LoRA rank 4 + head' in proc.stdout
    run_reward(sft_dir, split, '--max_iters=5', *args)
    run_reward('resume', split, '--max_iters=10', *args)
    h, b = history(straight), history(split)
    assert h[10]['val/loss'] < h[0]['val/loss'] - 0.3 and h[10]['val/accuracy'] > 0.9, h
    for key in ('val/loss', 'val/accuracy', 'val/margin'):
        assert b[10][key] == pytest.approx(h[10][key], rel=1e-5, abs=1e-6), key

    model, _, ckpt = lora_model(sft_dir, straight, lambda backbone: RewardModel(backbone))
    model.head.load_state_dict(ckpt['reward_head'])
    assert not torch.equal(ckpt['reward_head']['weight'], RewardModel(model.backbone).head.weight)
    assert_lora_checkpoint(sft_dir, ckpt, model, torch.randint(0, 100, (2, 12)))
    rm, tok = load_reward_model(straight)  # merged: the reward model ppo.py loads, unchanged
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(rm(ids, torch.tensor([11, 11]))[0], model(ids, torch.tensor([11, 11]))[0], atol=1e-5, rtol=1e-5)
    prompts = [[{'role': 'user', 'content': "Say something about tiger and lemon."}]]
    assert (score(rm, tok, prompts, ['good tiger']) > score(rm, tok, prompts, ['bad lemon'])).all()
