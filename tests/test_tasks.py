"""tasks.py: the offline task suite is seeded, train/test disjoint, correct, and readable by data.py."""

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig

import pytest

import corpus
import data
import tasks
from conftest import REPO


@pytest.fixture(scope='module')
def suite():
    return tasks.make_tasks(seed=7, name='Robo', maker='ACME Labs')


def prompt_of(record):
    """The last user message of any record kind."""
    if 'prompt' in record:
        return record['prompt']
    messages = record.get('messages') or record['chosen']
    return [m['content'] for m in messages if m['role'] == 'user'][-1]


def problem_key(prompt):
    m = re.search(r'(\d+)\s*([-+*]|plus|minus|times)\s*(\d+)', prompt)
    op = {'plus': '+', 'minus': '-', 'times': '*'}.get(m.group(2), m.group(2))
    return f"{int(m.group(1))}{op}{int(m.group(3))}"


def identity_question(record):
    """An identity record's question without its greeting, case and end punctuation: the unit the split holds out."""
    question = prompt_of(record).lower()  # some variants are lowercased whole, greeting included
    greeting = next((g for g in tasks.GREETING_PREFIXES if g and question.startswith(g.lower())), '')
    return question[len(greeting):].rstrip('?.')


def items(suite, side, task):
    return [r for split in tasks.SPLITS if split.endswith(side) for r in suite[split] if r['task'] == task]


def test_same_seed_same_suite_other_seed_other_suite(suite):
    assert tasks.make_tasks(seed=7, name='Robo', maker='ACME Labs') == suite
    other = tasks.make_tasks(seed=8, name='Robo', maker='ACME Labs')
    assert other['sft_train'] != suite['sft_train'] and other['rl_test'] != suite['rl_test']


def test_a_tasks_size_leaves_the_other_tasks_records_as_they_were(suite):
    """Each task draws from its own random stream: asking for more identity items (suite version 5
    did) must not change which arithmetic or multiplication problems a split holds."""
    more = tasks.make_tasks(seed=7, name='Robo', maker='ACME Labs', sizes={'sft_test': {'identity': 200}})
    def records(s, task):
        return sorted(json.dumps(r, sort_keys=True) for r in items(s, 'sft_test', task))
    for task in ('arithmetic', 'multiplication', 'code', 'chat'):
        assert records(more, task) == records(suite, task), task
    assert len(items(more, 'sft_test', 'identity')) == 200


def test_held_out_identity_spans_enough_questions_for_a_metric_that_moves_in_small_steps():
    """The identity metric's resolution is the number of held-out questions, not items: a model gets a
    question's variants mostly all right or all wrong. With 14 held-out questions one question moved
    SFT identity by ~7 points (suite version 4). The default suite (seed 1337, what the pipeline and
    its reference ranges use) holds out 37 of suite 5's 107 (34 of them in its 120 items) and trains on 70 (another seed's hash
    split holds out ~20%: 23 and 84 at seed 7)."""
    default = tasks.make_tasks()
    held_out = {identity_question(r) for r in items(default, 'sft_test', 'identity')}
    trained = {identity_question(r) for r in items(default, 'sft_train', 'identity')}
    assert len(held_out) >= 30 and len(trained) >= 60, (len(held_out), len(trained))


def test_split_sizes_follow_the_defaults(suite):
    for split, sizes in tasks.SIZES.items():
        for task, n in sizes.items():
            got = sum(r['task'] == task for r in suite[split])
            assert got == n or (task == 'code' and 0.5 * n <= got < n), (split, task, got)


def test_train_and_test_share_no_problem_phrasing_function_or_fact(suite):
    for task, key in [('arithmetic', lambda r: problem_key(prompt_of(r))),
                      ('identity', identity_question),
                      ('multiplication', lambda r: tasks.split_key(*re.fullmatch(r'(\d+)([*])(\d+)', problem_key(prompt_of(r))).groups())),
                      ('code', prompt_of), ('chat', prompt_of)]:
        train = {key(r) for r in items(suite, '_train', task)}
        test = {key(r) for r in items(suite, '_test', task)}
        assert train and test, task
        assert not train & test, (task, sorted(train & test)[:3])


def test_identity_answers_carry_the_configured_name_and_maker(suite):
    answer = "I am Robo, a small language model made by ACME Labs."
    for r in items(suite, '_train', 'identity') + items(suite, '_test', 'identity'):
        if 'messages' in r:
            assert r['messages'][-1]['content'] == answer
        else:
            assert r['chosen'][-1]['content'] == answer and 'Robo' not in r['rejected'][-1]['content']
    assert tasks.identity_reward("Hi, I'm robo, made by acme labs!", answer) == 1.0
    assert tasks.identity_reward("I am Robo.", answer) == 0.5
    assert tasks.identity_reward("I am ChatGPT, made by OpenAI.", answer) == 0.0


def test_arithmetic_answers_are_correct_and_short_and_digits_are_configurable(suite):
    for r in items(suite, '_train', 'arithmetic') + items(suite, '_test', 'arithmetic'):
        a, op, b = re.fullmatch(r'(\d+)([-+*])(\d+)', problem_key(prompt_of(r))).groups()
        truth = str(eval(f"{a}{op}{b}"))
        answer = r.get('answer') or (r['messages'] if 'messages' in r else r['chosen'])[-1]['content']
        assert answer == truth and int(truth) >= 0
        assert int(a) < 100 and int(b) < 100 and (op != '*' or int(b) < 10)
        if 'rejected' in r:
            assert tasks.arithmetic_reward(r['rejected'][-1]['content'], truth) == 0.0
    small = tasks.make_tasks(seed=1, add_digits=1, mul_digits=(1, 1), sizes={'rl_train': {'arithmetic': 50}})
    assert all(int(x) < 10 for r in small['rl_train'] if r['task'] == 'arithmetic'
               for x in re.findall(r'\d+', r['prompt']))


def evaluate_working(text):
    """Check a working step by step: every '=' joins expressions of equal value; the last number."""
    sides = text.split(' = ')
    values = [eval(side) for side in sides]  # digits, * and + only (asserted below)
    assert all(re.fullmatch(r'[\d*+ ]+', side) for side in sides), text
    return values, int(sides[-1])


def test_multiplication_workings_are_right_and_rejected_ones_end_wrong(suite):
    import random
    assert tasks.multiplication_working(47, 38) == "47*38 = 47*30 + 47*8 = 1410 + 376 = 1786"
    records = items(suite, '_train', 'multiplication') + items(suite, '_test', 'multiplication')
    for r in records:
        a, b = map(int, re.fullmatch(r'(\d+)\*(\d+)', problem_key(prompt_of(r))).groups())
        assert 100 <= a < 1000 and 10 <= b < 100  # long_mul_digits=(3, 2)
        if 'prompt' in r:  # RL: the answer alone, rewarded on the working's last number
            assert r['answer'] == str(a * b)
            continue
        working = (r['messages'] if 'messages' in r else r['chosen'])[-1]['content']
        values, last = evaluate_working(working)
        assert set(values) == {a * b} and last == a * b and working.startswith(f"{a}*{b} = ")
        assert tasks.arithmetic_reward(working, str(a * b)) == 1.0
        if 'rejected' in r:
            rejected = r['rejected'][-1]['content']
            assert rejected.split(' = ')[:2] == working.split(' = ')[:2]  # the same problem and plan, a slip after
            assert tasks.arithmetic_reward(rejected, str(a * b)) == 0.0
    # a slip below zero was folded back by abs(): 100 - 200 -> 100, the right partial product of 100*11
    for seed in range(300):
        rng = random.Random(seed)
        for a, b in [(100, 11), (100, 21), (101, 10), (999, 99), (105, 50), (0, 0)]:
            wrong = tasks.wrong_working(a, b, rng)
            assert tasks.arithmetic_reward(wrong, str(a * b)) == 0.0, (a, b, seed, wrong)


def test_code_items_are_real_stdlib_functions_and_rejected_bodies_differ(suite):
    root = sysconfig.get_paths()['stdlib']
    sources = {m: open(os.path.join(root, m + '.py'), encoding='utf-8').read() for m in tasks.CODE_MODULES
               if os.path.exists(os.path.join(root, m + '.py'))}
    records = items(suite, '_train', 'code')[:60] + items(suite, '_test', 'code')
    for r in records:
        header = prompt_of(r).split('\n', 1)[1]
        body = (r['messages'] if 'messages' in r else r['chosen'])[-1]['content']
        ast.parse(header + '\n' + body)  # signature + docstring + body is a whole function
        assert any(header.split('\n')[0].strip() in src for src in sources.values())
        if 'rejected' in r:
            assert r['rejected'][-1]['content'] != body


def test_every_file_loads_with_the_data_loaders(tmp_path):
    out = str(tmp_path / 'tasks')
    counts = tasks.write_tasks(out, seed=3)
    for split, n in counts.items():
        path = os.path.join(out, f'{split}.jsonl')
        loader = {'sft': data.load_sft, 'pref': data.load_pref, 'rl': data.load_rl}[split.split('_')[0]]
        assert len(loader(path)) == n
    rl = data.load_rl(os.path.join(out, 'rl_test.jsonl'))
    assert all(tasks.verifiable_reward(p['answer'], p['answer']) == 1.0 for p in rl)
    assert json.load(open(os.path.join(out, 'tasks.json')))['counts'] == counts


def test_ensure_tasks_writes_once_and_rewrites_when_arguments_change(tmp_path):
    out = str(tmp_path / 't')
    assert tasks.ensure_tasks(out, seed=5) == out
    path = os.path.join(out, 'sft_train.jsonl')
    first = os.stat(path).st_mtime_ns
    tasks.ensure_tasks(out, seed=5, name='Mini')  # the default, spelled out: same arguments
    assert os.stat(path).st_mtime_ns == first
    tasks.ensure_tasks(out, seed=5, name='Other')
    assert 'Other' in open(path).read()


def test_ensure_tasks_rewrites_when_the_sizes_table_is_edited(tmp_path, monkeypatch):
    out = str(tmp_path / 't')
    tasks.ensure_tasks(out, seed=5)
    monkeypatch.setitem(tasks.SIZES, 'rl_test', {'arithmetic': 7})  # what a user editing SIZES does
    tasks.ensure_tasks(out, seed=5)
    assert sum(1 for _ in open(os.path.join(out, 'rl_test.jsonl'))) == 7


def test_heldout_items_score_one_when_answered_exactly(tmp_path):
    out = str(tmp_path / 'h')
    tasks.write_tasks(out, seed=5)
    held = tasks.heldout(out)
    assert set(held) == {'identity', 'arithmetic', 'code', 'chat', 'multiplication'}
    assert len(held['multiplication']) >= 1000  # a few points' change is significant (McNemar)
    for task, entries in held.items():
        for item in entries[:20]:
            assert item['messages'][-1]['role'] == 'user'
            assert tasks.score(task, item['answer'], item['answer']) == 1.0
    assert tasks.score('arithmetic', 'It is 3.', '4') == 0.0
    assert 0.0 < tasks.score('code', 'return x', '    return x + 1') < 1.0


def test_corrupt_code_changes_the_body_deterministically():
    import random
    body = "    if n == 0:\n        return True\n    return n + 1"
    a = tasks.corrupt_code(body, random.Random(0))
    assert a != body and a == tasks.corrupt_code(body, random.Random(0))
    assert tasks.corrupt_code("    pass", random.Random(0)) != "    pass"


def test_ranks_generating_the_suite_at_once_all_succeed(tmp_path):
    """Under torchrun every rank of a stage calls ensure_tasks on a fresh data_root at once: they
    raced on one temp file name (FileNotFoundError on the loser's rename)."""
    code = f"import sys; sys.path.insert(0, {REPO!r}); import tasks; tasks.ensure_tasks({str(tmp_path / 'tasks')!r})"
    procs = [subprocess.Popen([sys.executable, '-c', code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(errors)
    assert sorted(os.listdir(tmp_path / 'tasks')) == sorted([f'{s}.jsonl' for s in tasks.SPLITS] + ['tasks.json'])


# ----------------------------------------------------------------------------- leaks and silent errors (issue 15)

def test_a_stage_uses_the_suite_the_user_asked_for_and_never_reverts_it(tmp_path, monkeypatch):
    """prepare.py --write_tasks=True --assistant_name=Robo --seed=5 made the suite; every stage then
    called ensure_tasks(dir) with the defaults and wrote a 'Mini' suite of seed 1337 over it."""
    out = str(tmp_path / 't')
    tasks.write_tasks(out, seed=5, name='Robo', maker='ACME Labs')  # what prepare.py does
    path = os.path.join(out, 'sft_train.jsonl')
    first = (os.stat(path).st_mtime_ns, open(path).read())
    tasks.ensure_tasks(out)  # what sft.py, preference.py, ppo.py and eval.py do
    assert (os.stat(path).st_mtime_ns, open(path).read()) == first
    os.remove(os.path.join(out, 'rl_test.jsonl'))  # a missing file is written again, as the suite was made
    tasks.ensure_tasks(out)
    assert open(path).read() == first[1] and os.path.exists(os.path.join(out, 'rl_test.jsonl'))
    monkeypatch.setitem(tasks.SIZES, 'rl_test', {'arithmetic': 7})  # a developer's edit of the table
    tasks.ensure_tasks(out)
    assert sum(1 for _ in open(os.path.join(out, 'rl_test.jsonl'))) == 7
    assert 'Robo' in open(path).read() and 'Mini' not in open(path).read()
    args = json.load(open(os.path.join(out, 'tasks.json')))['args']
    assert (args['seed'], args['name'], args['maker']) == (5, 'Robo', 'ACME Labs')


def test_a_suite_from_an_older_generator_is_remade_with_its_own_arguments(tmp_path):
    """A suite written before a fix to the generator (a leak) is made again, name and seed kept."""
    out = str(tmp_path / 't')
    tasks.write_tasks(out, seed=5, name='Robo')
    manifest = os.path.join(out, 'tasks.json')
    old = json.load(open(manifest))
    old.pop('version')
    open(manifest, 'w').write(json.dumps(old))
    open(os.path.join(out, 'sft_test.jsonl'), 'w').write('{"stale": true}\n')
    tasks.ensure_tasks(out)
    assert json.load(open(manifest))['version'] == tasks.SUITE_VERSION
    assert 'stale' not in open(os.path.join(out, 'sft_test.jsonl')).read()
    assert 'Robo' in open(os.path.join(out, 'sft_test.jsonl')).read()


def squash_lines(text):
    """Indentation and trailing spaces removed from every line: a method's body is a dedented copy."""
    return '\n' + '\n'.join(line.strip() for line in text.splitlines()) + '\n'


def test_heldout_code_bodies_are_not_in_the_pretraining_corpus(suite):
    """All 40 sft_test code records appeared verbatim in data/stdlib, which prepare.py builds from
    corpus.stdlib_files(): the model had pretrained on every held-out answer."""
    texts = []
    for path in corpus.stdlib_files()[1]:
        try:
            texts.append(squash_lines(open(path, encoding='utf-8').read()))
        except UnicodeDecodeError:
            continue
    text = '\0'.join(texts)
    lines = set(text.split('\n'))
    held_out = items(suite, '_test', 'code')
    assert len(held_out) >= 35
    for r in held_out:
        body = squash_lines((r['messages'] if 'messages' in r else r['chosen'])[-1]['content'])
        # a body with a line found nowhere in the corpus is not in it; the rest are searched whole
        assert not all(line in lines for line in body.split('\n')[1:-1]) or body not in text, body


def test_no_heldout_arithmetic_problem_or_its_commuted_twin_is_trained_on(suite):
    """4+59 and 59+4 were two problems, split apart: 43% of sft_test had its twin in a train split."""
    train = {problem_key(prompt_of(r)) for r in items(suite, '_train', 'arithmetic')}
    for split in (s for s in tasks.SPLITS if s.endswith('_test')):
        for r in (r for r in suite[split] if r['task'] == 'arithmetic'):
            a, op, b = re.fullmatch(r'(\d+)([-+*])(\d+)', problem_key(prompt_of(r))).groups()
            twins = {f"{a}{op}{b}"} | ({f"{b}{op}{a}"} if op in '+*' else set())
            assert not twins & train, (split, twins & train)


def test_an_empty_rl_answer_is_refused_with_file_line_and_field(tmp_path):
    """'' in every response is True: an empty answer rewarded every completion."""
    for empty in ('', '  '):
        path = tmp_path / 'rl.jsonl'
        path.write_text(''.join(json.dumps({'prompt': 'q', 'answer': a}) + '\n' for a in ('1', empty)))
        with pytest.raises(data.DataError, match=re.escape(f"{path}:2: field 'answer': empty")):
            data.load_rl(str(path))
    with pytest.raises(ValueError, match='empty answer'):
        tasks.verifiable_reward('anything at all', '')


@pytest.mark.parametrize('response,answer,reward', [
    ('The capital of France is Paris.', 'Paris', 1.0), ('paris', 'Paris', 1.0), ('NEW   delhi!', 'New Delhi', 1.0),
    ('Parisian food', 'Paris', 0.0), ('Romania', 'Rome', 0.0), ('I like C++ a lot', 'C++', 1.0), ('(C++)', 'C++', 1.0),
    ('C', 'C++', 0.0), ('a cat', 'cat', 1.0), ('concatenate', 'cat', 0.0), ('x', 'x', 1.0), ('xyz', 'x', 0.0),
    ('It is 12.', '12', 1.0), ('It is 112.', '12', 0.0), ('12, no: 13', '12', 0.0),
])
def test_verifiable_reward_matches_whole_answers(response, answer, reward):
    assert tasks.verifiable_reward(response, answer) == reward
