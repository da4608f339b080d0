"""dpo.py and dpo_loss.py: log-probs cover the answer tokens only, the loss is log 2 while the
policy is the reference, each loss type by hand, and dpo.py end to end on a tiny checkpoint: it
separates a separable toy set, a precomputed reference gives the same run as a live one, it
resumes exactly, and it names the file and line of bad data. Online DPO (online=True) on a toy
verifiable task: it raises the reward of its own samples, pairs a best sample against a worst,
resumes exactly, skips a step that gave no pair, and refuses the settings it does not support."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, run_torchrun
from test_ppo import TOY_TOKENIZER, save_tiny
from test_reward import history, make_checkpoint, toy_pairs, write_jsonl

import common
import data
import preference
from dpo_loss import answer_targets, dpo_loss, preference_metrics, rpo_nll


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


TINY = ['--batch_size=8', '--max_seq_len=64', '--log_interval=1', '--warmup_iters=0', '--learning_rate=1e-3',
        '--eval_items_per_task=0']


def run_dpo(init_from, out_dir, *args, **kw):
    return run_script('dpo.py', f'--init_from={init_from}', f'--out_dir={out_dir}', *TINY, *args, **kw)


def toy_batch(sft_dir, n=4):
    """The first n toy pairs as dpo.py batches them: (model, ids (2n, T), targets (2n, T), prompt_len, length)."""
    ckpt = common.load_checkpoint(sft_dir)
    tok, model = common.tokenizer_from_checkpoint(ckpt), common.model_from_checkpoint(ckpt).eval()
    pairs = [data.parse_pref(p) for p in toy_pairs()[:n]]
    split = preference.encode_split(tok, pairs, 64)
    ids, prompt_len, length = split['ids'], split['prompt_len'], split['length']
    targets = answer_targets(ids, prompt_len[:, None], length)
    T = int(length.max())
    flat = lambda t: t[:, :, :T].transpose(0, 1).reshape(2 * n, T)
    return model, flat(ids), flat(targets), prompt_len, length


# ----------------------------------------------------------------------------- log-probs and losses

def sequence_logps(model, ids, targets):
    """What dpo.answer_logps computes: the answer tokens' summed log-probs, (2n,)."""
    return -model(ids, targets, reduction='none')[1].sum(-1)


def test_sequence_logps_sum_the_answer_tokens_only(sft_dir):
    """The model's per-token cross-entropies (reduction='none', chunked: never the logits), summed,
    are the answer tokens' log-probs under the full logits' softmax, nothing from prompt or pads."""
    model, ids, targets, prompt_len, length = toy_batch(sft_dir)
    with torch.no_grad():
        got = sequence_logps(model, ids, targets)
        logp = F.log_softmax(model(ids)[0].float(), -1)
    lengths = length.T.reshape(-1)  # (2n,) chosen rows then rejected rows
    for row in range(ids.size(0)):
        start, end = int(prompt_len[row % len(prompt_len)]), int(lengths[row])  # the answer: tokens start..end-1
        by_hand = sum(logp[row, t - 1, ids[row, t]] for t in range(start, end))
        assert got[row].item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert (targets[row] != -1).sum() == end - start  # nothing from the prompt or the pads


def test_dpo_loss_at_step_zero_is_log_2_when_policy_equals_reference(sft_dir):
    model, ids, targets, _, _ = toy_batch(sft_dir)
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, ids, targets).chunk(2)
    loss = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1).mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    m = preference_metrics(chosen, rejected, chosen, rejected, 0.1)
    assert m['rewards/margins'].item() == 0 and m['rewards/accuracies'].item() == 0


# policy chosen/rejected -3, -7; reference -4, -5: h = (-3 + 7) - (-4 + 5) = 3
@pytest.mark.parametrize('loss_type,smoothing,expected', [
    ('sigmoid', 0.0, math.log(1 + math.exp(-0.5 * 3))),
    ('sigmoid', 0.2, 0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5))),  # conservative DPO
    ('ipo', 0.0, (3 - 1 / (2 * 0.5)) ** 2),
    ('hinge', 0.0, max(0.0, 1 - 0.5 * 3)),
])
def test_each_loss_type_matches_a_hand_computed_value(loss_type, smoothing, expected):
    args = [torch.tensor([x]) for x in (-3.0, -7.0, -4.0, -5.0)]
    got = dpo_loss(*args, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    h = torch.tensor([0.0])  # policy == reference
    at_zero = dpo_loss(h, h, h, h, beta=0.5, loss_type=loss_type).item()
    assert at_zero == pytest.approx({'sigmoid': math.log(2), 'ipo': 1 / (4 * 0.25), 'hinge': 1.0}[loss_type])


def test_rpo_term_and_metrics_by_hand():
    assert rpo_nll(torch.tensor([-6.0, -2.0]), torch.tensor(4)).item() == pytest.approx(2.0)
    m = preference_metrics(torch.tensor([-3.0, -9.0]), torch.tensor([-7.0, -5.0]),
                           torch.tensor([-4.0, -8.0]), torch.tensor([-5.0, -6.0]), beta=0.5)
    # implicit rewards: chosen 0.5 * (1, -1), rejected 0.5 * (-2, 1)
    assert {k: round(v.item(), 6) for k, v in m.items()} == {
        'rewards/chosen': 0.0, 'rewards/rejected': -0.25, 'rewards/accuracies': 0.5, 'rewards/margins': 0.25,
        'logps/chosen': -6.0, 'logps/rejected': -6.0}


# ----------------------------------------------------------------------------- dpo.py end to end

def test_dpo_py_raises_rewards_accuracies_above_09_on_a_separable_toy_set(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'dpo')
    proc = run_dpo(sft_dir, out, f'--pref_files={toy_file}', '--val_fraction=0.25', '--max_iters=30',
                   '--eval_interval=15', '--lr_decay_iters=30')
    h = history(out)
    assert h[0]['val/loss'] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert 'iter 1: loss 0.6931' in proc.stdout  # the first training batch too
    assert h[30]['val/rewards/accuracies'] > 0.9 and h[30]['val/rewards/margins'] > 0, h[30]
    assert h[30]['val/rewards/chosen'] > h[30]['val/rewards/rejected']
    assert {'val/logps/chosen', 'val/logps/rejected'} <= set(h[30])
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['stage'] == 'dpo' and ckpt['parent'] == os.path.join(sft_dir, 'ckpt.pt')
    assert ckpt['config']['init_from'] == sft_dir  # the config as the user ran it
    assert common.model_from_checkpoint(ckpt) is not None  # loads as a plain policy (sample.py, ppo.py)


@pytest.mark.parametrize('method', [['--loss_type=simpo', '--beta=2.0'], ['--loss_type=orpo'],
                                    ['--loss_type=sigmoid', '--reference=none', '--max_iters=90', '--lr_decay_iters=90'],
                                    ['--loss_type=ipo', '--ipo_length_normalize=True']],
                         ids=['simpo', 'orpo', 'reference-free-dpo', 'ipo-normalized'])
def test_every_method_separates_a_separable_toy_set(sft_dir, toy_file, tmp_path, method):
    out = str(tmp_path / 'run')
    proc = run_dpo(sft_dir, out, f'--pref_files={toy_file}', '--val_fraction=0.25', '--max_iters=30',
                   '--eval_interval=15', '--lr_decay_iters=30', *method)
    h = history(out)
    last = h[max(h)]  # summed log-probs with no reference start from the answers' length bias: it takes longer
    assert last['val/rewards/accuracies'] > 0.9 and last['val/loss'] < h[0]['val/loss'], last
    reference_free = 'ipo' not in method[0]
    assert ('reference none' in proc.stdout) == reference_free
    assert ('reference log-probs of' in proc.stdout) != reference_free  # no reference model was scored


def test_precomputed_reference_logps_give_the_same_run_as_a_live_reference(sft_dir, toy_file, tmp_path):
    args = [f'--pref_files={toy_file}', '--max_iters=6', '--eval_interval=3', '--lr_decay_iters=6']
    pre, live = str(tmp_path / 'pre'), str(tmp_path / 'live')
    run_dpo(sft_dir, pre, *args, '--precompute_ref_logps=True')
    run_dpo(sft_dir, live, *args, '--precompute_ref_logps=False')
    a, b = history(pre), history(live)
    for it in (3, 6):
        for key in ('val/loss', 'val/rewards/margins', 'val/logps/chosen'):
            assert b[it][key] == pytest.approx(a[it][key], rel=1e-4, abs=1e-5), (it, key)


def test_resume_reaches_the_same_metrics(sft_dir, toy_file, tmp_path):
    args = [f'--pref_files={toy_file}', '--eval_interval=5', '--lr_decay_iters=10']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_dpo(sft_dir, straight, '--max_iters=10', *args)
    run_dpo(sft_dir, split, '--max_iters=5', *args)
    run_dpo('resume', split, '--max_iters=10', *args)  # the reference comes from the saved init_from
    a, b = history(straight)[10], history(split)[10]
    for key in ('val/loss', 'val/rewards/accuracies', 'val/rewards/margins', 'val/logps/rejected'):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def run_alone_and_on_two_ranks(args, tmp_path):
    """dpo.py with args in one process and on 2 ranks under torchrun: their two out_dirs."""
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    run_script('dpo.py', *args, f'--out_dir={single}')
    run_torchrun(2, 'dpo.py', *args, f'--out_dir={ddp}')
    return single, ddp


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(sft_dir, toy_file, tmp_path):
    args = [f'--init_from={sft_dir}', *TINY, f'--pref_files={toy_file}', '--max_iters=4', '--eval_interval=4',
            '--lr_decay_iters=4', '--gradient_accumulation_steps=2']
    single, ddp = run_alone_and_on_two_ranks(args, tmp_path)
    a, b = history(single)[4], history(ddp)[4]
    assert b['val/loss'] == pytest.approx(a['val/loss'], rel=1e-4) and a['val/loss'] < math.log(2)


def test_dpo_py_on_the_built_in_task_suite_reports_task_accuracy(sft_dir, tmp_path):
    out = str(tmp_path / 'builtin')
    run_dpo(sft_dir, out, f'--data_root={tmp_path}', '--max_seq_len=128', '--max_iters=1', '--eval_interval=1',
            '--eval_items_per_task=2', '--loss_type=ipo', '--rpo_alpha=0.5', '--eval_pairs=40')
    h = history(out)
    assert h[0]['val/loss'] == pytest.approx(1 / (4 * 0.1 ** 2), rel=1e-4)  # IPO's value at policy == reference
    assert {'val/arith_acc', 'val/identity_acc', 'val/rewards/accuracies'} <= set(h[1])


def test_nan_loss_stops_without_overwriting_the_last_checkpoint(sft_dir, toy_file, tmp_path):
    out = str(tmp_path / 'out')
    run_dpo(sft_dir, out, f'--pref_files={toy_file}', '--max_iters=2', '--eval_interval=2')
    # an absurd learning rate with no clipping blows the weights up to inf/NaN within a few steps
    proc = run_dpo('resume', out, f'--pref_files={toy_file}', '--max_iters=50', '--eval_interval=5',
                   '--learning_rate=1e12', '--min_lr=1e12', '--grad_clip=0', check=False)
    assert proc.returncode != 0 and 'loss is nan' in (proc.stdout + proc.stderr).lower()
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert all(torch.isfinite(v).all() for v in after['model'].values())


def test_malformed_preference_data_names_file_line_and_field(sft_dir, tmp_path):
    good = json.dumps({'prompt': 'q', 'chosen': 'a', 'rejected': 'b'})
    path = write_jsonl(tmp_path / 'bad.jsonl', [good, good, '{"prompt": "q", "chosen": "a", "rejected": ""}'])
    proc = run_dpo(sft_dir, str(tmp_path / 'out'), f'--pref_files={path}', check=False)
    assert proc.returncode != 0
    assert f'{path}:3' in proc.stderr and "'rejected'" in proc.stderr and 'Traceback' not in proc.stderr


def test_unknown_loss_type_names_the_choices(sft_dir, tmp_path):
    proc = run_dpo(sft_dir, str(tmp_path / 'out'), '--loss_type=bco', check=False)
    assert proc.returncode != 0 and "sigmoid, ipo, hinge, simpo, orpo, kto" in proc.stderr


def unpaired(pairs):
    """TRL's unpaired format from preference pairs: the chosen answer desirable, the rejected one not."""
    return [{'prompt': p['chosen'][:-1], 'completion': [p[key][-1]], 'label': key == 'chosen'}
            for p in pairs for key in ('chosen', 'rejected')]


def test_kto_on_unpaired_toy_feedback_lowers_the_loss(sft_dir, tmp_path):
    path = write_jsonl(tmp_path / 'kto.jsonl', unpaired(toy_pairs()))
    out = str(tmp_path / 'kto')
    run_dpo(sft_dir, out, f'--pref_files={path}', '--loss_type=kto', '--val_fraction=0.25', '--max_iters=30',
            '--eval_interval=15', '--lr_decay_iters=30')
    h = history(out)
    assert h[0]['val/loss'] == pytest.approx(0.5, abs=1e-5)  # policy == reference: r = z0 = 0, 1 - sigmoid(0)
    assert h[30]['val/loss'] < h[0]['val/loss'] - 0.01, h[30]
    assert h[30]['val/rewards/chosen'] > h[30]['val/rewards/rejected'] and 'val/kl' in h[30]


def test_malformed_unpaired_data_names_file_line_and_field(sft_dir, tmp_path):
    good = json.dumps({'prompt': 'q', 'completion': 'a', 'label': True})
    path = write_jsonl(tmp_path / 'bad.jsonl', [good, good, '{"prompt": "q", "completion": "a", "label": "yes"}'])
    proc = run_dpo(sft_dir, str(tmp_path / 'out'), f'--pref_files={path}', '--loss_type=kto', check=False)
    assert proc.returncode != 0
    assert f'{path}:3' in proc.stderr and "'label'" in proc.stderr and 'Traceback' not in proc.stderr
    with pytest.raises(data.DataError, match=r"bad2.jsonl:1: field 'completion'"):
        data.load_unpaired(write_jsonl(tmp_path / 'bad2.jsonl', [{'prompt': 'q', 'label': False}]))


def test_lora_dpo_trains_adapters_only_against_the_base_with_adapters_off_and_resumes(sft_dir, toy_file, tmp_path):
    """(a) adapters only train; (b) the loss falls from log 2; (c) the reference is the base with
    the adapters off, with no second model, bit for bit; a resumed run scoring it live (precompute
    off) reaches the metrics of the straight run, which precomputed it; (d) the merged
    checkpoint loads as a plain policy (ppo.py, sample.py)."""
    from test_reward import assert_lora_checkpoint, lora_model
    args = [f'--pref_files={toy_file}', '--val_fraction=0.25', '--eval_interval=5', '--lr_decay_iters=10',
            '--learning_rate=1e-2', '--lora_rank=4', '--lora_alpha=8']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    proc = run_dpo(sft_dir, straight, '--max_iters=10', *args)
    assert 'LoRA rank 4' in proc.stdout
    run_dpo(sft_dir, split, '--max_iters=5', *args)
    run_dpo('resume', split, '--max_iters=10', '--precompute_ref_logps=False', *args)
    h, b = history(straight), history(split)
    assert h[0]['val/loss'] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is the reference
    assert h[10]['val/loss'] < h[0]['val/loss'] - 0.05 and h[10]['val/rewards/accuracies'] > 0.9, h[10]
    for key in ('val/loss', 'val/rewards/margins', 'val/logps/chosen', 'val/logps/rejected'):
        assert b[10][key] == pytest.approx(h[10][key], rel=1e-5, abs=1e-6), key
    model, _, ckpt = lora_model(sft_dir, straight)
    assert ckpt['stage'] == 'dpo' and ckpt['parent'] == os.path.join(sft_dir, 'ckpt.pt')
    assert_lora_checkpoint(sft_dir, ckpt, model, torch.randint(0, 100, (2, 12)))


# ----------------------------------------------------------------------------- online DPO

@pytest.fixture(scope='module')
def online_toy(tmp_path_factory):
    """test_ppo.py's toy task for online DPO: (a random char-level policy, its RL prompts, held-out
    pairs). Prompts a?..d? (task 'toy') are answered right by the reply x, z? (task 'never') by
    zzzz, which one token cannot say; the pairs prefer x over y under the toy prompts."""
    root = tmp_path_factory.mktemp('online')
    prompts = write_jsonl(root / 'prompts.jsonl', [{'prompt': f'{c}?', 'answer': 'x', 'task': 'toy'} for c in 'abcd']
                          + [{'prompt': 'z?', 'answer': 'zzzz', 'task': 'never'}])
    pairs = write_jsonl(root / 'pairs.jsonl', [{'prompt': f'{c}?', 'chosen': 'x', 'rejected': 'y'} for c in 'abcd'])
    return save_tiny(root / 'sft', TOY_TOKENIZER), prompts, pairs


def online_args(online_toy, task='toy'):
    """One token per sample, 8 samples of each of 8 prompts per step; scored by exact match alone."""
    _, prompts, pairs = online_toy
    return ['--online=True', f'--rl_file={prompts}', f'--rl_tasks={task}', f'--pref_files={pairs}', '--val_fraction=0.5',
            '--max_new_tokens=1', '--missing_eos_penalty=0', '--online_samples=8', '--temperature=1.0']


def train_rows(out_dir):
    """{iter: the training row of history.jsonl}."""
    with open(os.path.join(out_dir, 'history.jsonl')) as f:
        return {row['iter']: row for row in map(json.loads, f) if row['kind'] == 'train'}


def test_online_pairs_take_a_best_sample_against_a_worst_and_drop_ties():
    scores = torch.tensor([0., 1., 1., 0.,  2., 2., 2., 2.,  -1., .5, 3., -1.,  0., 0., 0., 1.])
    chosen, rejected = preference.online_pairs(scores, 4)
    assert chosen.tolist() == [1, 10, 15] and rejected.tolist() == [0, 8, 12]  # the group of 2s: no pair
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any scores: one pair per varied group, its best against its worst
        scores = torch.randint(0, 3, (6 * 5,), generator=g).float()
        groups = scores.view(6, 5)
        chosen, rejected = preference.online_pairs(scores, 5)
        varied = [i for i in range(6) if groups[i].max() > groups[i].min()]
        assert (chosen // 5).tolist() == varied and (rejected // 5).tolist() == varied
        assert (scores[chosen] == groups[varied].amax(1)).all() and (scores[rejected] == groups[varied].amin(1)).all()


def test_online_dpo_raises_the_reward_of_its_own_samples(online_toy, tmp_path):
    """From a random policy (x in ~1 of 25 samples) to x in nearly all: each step pairs a sample
    that said x against one that did not. With chosen and rejected swapped it fails: the share of
    x falls to 0 (0.10 -> 0.00 over the same 30 steps, against 0.10 -> 0.96 here)."""
    out = str(tmp_path / 'online')
    proc = run_dpo(online_toy[0], out, *online_args(online_toy), '--max_iters=30', '--eval_interval=30',
                   '--lr_decay_iters=30', '--learning_rate=1e-2')
    rows = train_rows(out)
    assert 'online: 4 prompts' in proc.stdout  # rl_tasks kept the toy prompts only
    assert rows[1]['train/loss'] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference at step 1
    mean = lambda its: sum(rows[i]['train/online_verifiable'] for i in its) / len(its)
    before, after = mean(range(1, 6)), mean(range(26, 31))
    assert after > before + 0.5 and after > 0.8, (before, after)
    # a prompt pairs when its samples differ: some at first, few once nearly all say x
    assert all(0 <= r['train/online_pair_frac'] <= 1 for r in rows.values()) and rows[1]['train/online_pair_frac'] > 0
    h = history(out)  # the held-out pairs prefer x over y: the implicit reward agrees now
    assert h[30]['val/rewards/margins'] > 0 and h[30]['val/rewards/accuracies'] == 1, h[30]
    # the fixed held-out pairs' loss is not what online DPO trains on: no best.pt by it, the latest is the model
    assert os.path.exists(os.path.join(out, 'ckpt.pt')) and not os.path.exists(os.path.join(out, 'best.pt'))


def test_online_dpo_resume_continues_the_same_run(online_toy, tmp_path):
    args = [*online_args(online_toy), '--eval_interval=4', '--lr_decay_iters=8']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_dpo(online_toy[0], straight, '--max_iters=8', *args)
    run_dpo(online_toy[0], split, '--max_iters=4', *args)
    run_dpo('resume', split, '--max_iters=8', *args)  # the same prompts and samples: they are seeded by the step
    a, b = train_rows(straight), train_rows(split)
    for it in range(5, 9):
        for key in ('train/online_score', 'train/online_pair_frac', 'train/loss', 'train/rewards/margins'):
            assert b[it][key] == pytest.approx(a[it][key], rel=1e-5, abs=1e-6), (it, key)
    for key in ('val/loss', 'val/rewards/margins'):
        assert history(split)[8][key] == pytest.approx(history(straight)[8][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_online_ddp_two_ranks_match_one_process_accumulating_two(online_toy, tmp_path):
    """Each rank samples its own rows, a slice of the step's one stream: 2 ranks sample and learn
    what one process with 2 micro-batches does."""
    args = [f'--init_from={online_toy[0]}', *TINY, *online_args(online_toy), '--max_iters=4', '--eval_interval=4',
            '--lr_decay_iters=4', '--gradient_accumulation_steps=2']
    single, ddp = run_alone_and_on_two_ranks(args, tmp_path)
    a, b = train_rows(single), train_rows(ddp)
    for it in range(1, 5):
        assert b[it]['train/online_score'] == pytest.approx(a[it]['train/online_score'], rel=1e-6), it
        assert b[it]['train/loss'] == pytest.approx(a[it]['train/loss'], rel=1e-4), it
    assert history(ddp)[4]['val/loss'] == pytest.approx(history(single)[4]['val/loss'], rel=1e-4)


def test_online_adds_the_reward_models_score_and_trains_lora_adapters(online_toy, tmp_path):
    """reward_model: a (random) reward model's score is added to each sample's, so scores are no
    longer the exact match alone; with LoRA the reference is the base with the adapters off."""
    rm = save_tiny(tmp_path / 'rm', TOY_TOKENIZER, seed=1)  # rewardmodel.py's layout: a backbone and 'reward_head'
    ckpt = torch.load(os.path.join(rm, 'ckpt.pt'), weights_only=True)
    torch.manual_seed(0)
    common.save_checkpoint(dict(ckpt, reward_head=torch.nn.Linear(32, 1).state_dict(), stage='reward'),
                           os.path.join(rm, 'ckpt.pt'))
    out = str(tmp_path / 'rm-lora')
    proc = run_dpo(online_toy[0], out, *online_args(online_toy), f'--reward_model={rm}', '--reward_model_weight=10',
                   '--lora_rank=4', '--max_iters=3', '--eval_interval=3')
    assert f'+ 10 x {rm}' in proc.stdout and 'LoRA rank 4' in proc.stdout
    rows = train_rows(out)
    assert all(r['train/online_pair_frac'] == 1 for r in rows.values())  # real-valued scores: no ties
    assert rows[1]['train/online_score'] != rows[1]['train/online_verifiable']
    assert rows[1]['train/loss'] == pytest.approx(math.log(2), abs=1e-4)  # adapters start at 0: the policy is the base
    assert 'lora' in torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)


def test_online_step_without_a_pair_is_skipped_and_counted(online_toy, tmp_path):
    """Every sample of z? scores 0 (its answer takes 4 tokens): no pair, no update, the run goes on."""
    out = str(tmp_path / 'never')
    run_dpo(online_toy[0], out, *online_args(online_toy, task='never'), '--max_iters=3', '--eval_interval=3')
    rows = train_rows(out)
    assert sorted(rows) == [1, 2, 3] and all(r['train/online_pair_frac'] == 0 and 'train/loss' not in r for r in rows.values())
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    before = torch.load(os.path.join(online_toy[0], 'ckpt.pt'), weights_only=True)
    assert after['iter_num'] == 3 and all(torch.equal(after['model'][k], v) for k, v in before['model'].items())


def test_online_config_runs_on_the_built_in_multiplication_prompts(sft_dir, tmp_path):
    """config/dpo_online_tiny.py, a step of it: the built-in RL prompts, multiplication only."""
    out = str(tmp_path / 'config')
    proc = run_script('dpo.py', 'config/dpo_online_tiny.py', f'--init_from={sft_dir}', f'--out_dir={out}',
                      f'--data_root={tmp_path}', '--max_iters=1', '--eval_interval=1', '--batch_size=2',
                      '--eval_items_per_task=2', '--eval_pairs=8', '--log_interval=1', '--precompute_ref_logps=False')
    assert 'online: 5,000 prompts' in proc.stdout, proc.stdout[-2000:]
    rows = train_rows(out)
    assert set(rows) == {1} and 0 <= rows[1]['train/online_pair_frac'] <= 1 and 'val/mul_acc' in history(out)[1]


@pytest.mark.parametrize('args,message', [
    (['--loss_type=simpo'], "loss_type='simpo' is not supported"),
    (['--loss_type=orpo'], "loss_type='orpo' is not supported"),
    (['--loss_type=kto'], "loss_type='kto' is not supported"),
    (['--parallel=fsdp'], "use parallel='ddp'"),
    (['--online_samples=1'], "online_samples >= 2"),
    (['--online=False', '--rl_tasks=toy'], "set online=True"),
], ids=['simpo', 'orpo', 'kto', 'fsdp', 'one-sample', 'rl-keys-offline'])
def test_online_refuses_what_it_does_not_support(online_toy, tmp_path, args, message):
    proc = run_dpo(online_toy[0], str(tmp_path / 'out'), *online_args(online_toy), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
