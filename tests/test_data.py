"""data.py, corpus.py and tasks.py's rewards: chat/preference/RL loaders, rewards, cleaning, dedup, mixing,
tokenising, download."""

import json
import os
import random
import unicodedata

import numpy as np
import pytest

import corpus
import data
import tasks
from tokenizer import char_tokenizer, train_bpe


def write_jsonl(path, records):
    with open(path, 'w', encoding='utf-8') as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write('\n')
    return str(path)


U = lambda text: {'role': 'user', 'content': text}
A = lambda text: {'role': 'assistant', 'content': text}
S = lambda text: {'role': 'system', 'content': text}


# ----------------------------------------------------------------------------- SFT

def test_sft_reads_openai_minimind_and_sharegpt_formats_alike(tmp_path):
    path = write_jsonl(tmp_path / 'sft.jsonl', [
        {'messages': [U('hi'), A('hello')]},
        {'conversations': [U('hi'), A('hello')]},
        {'conversations': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'hello'}]},
        {'messages': [S('be brief'), U('hi'), A('hello')]},
        {'system': 'be brief', 'messages': [U('hi'), A('hello')]},
    ])
    convs = data.load_sft(path)
    assert convs[:3] == [[U('hi'), A('hello')]] * 3
    assert convs[3] == convs[4] == [S('be brief'), U('hi'), A('hello')]


def test_sft_file_weights_multiply_records(tmp_path):
    a = write_jsonl(tmp_path / 'a.jsonl', [{'messages': [U(f'a{i}'), A('x')]} for i in range(10)])
    b = write_jsonl(tmp_path / 'b.jsonl', [{'messages': [U(f'b{i}'), A('x')]} for i in range(10)])
    convs = data.load_sft({a: 2, b: 0.5}, seed=1)
    users = [c[0]['content'] for c in convs]
    assert sum(u.startswith('a') for u in users) == 20 and sum(u.startswith('b') for u in users) == 5
    assert len(set(u for u in users if u.startswith('b'))) == 5  # a random half, no repeats
    assert data.load_sft({a: 2, b: 0.5}, seed=1) == convs  # seeded
    assert len(data.load_sft(f"{a},{b}")) == 20  # comma-separated paths, weight 1 each


# ----------------------------------------------------------------------------- preferences

def test_pref_reads_minimind_trl_and_hh_formats_alike(tmp_path):
    path = write_jsonl(tmp_path / 'pref.jsonl', [
        {'chosen': [U('2+2?'), A('4')], 'rejected': [U('2+2?'), A('5')]},              # MiniMind
        {'prompt': '2+2?', 'chosen': '4', 'rejected': '5'},                              # TRL strings
        {'prompt': [U('2+2?')], 'chosen': [A('4')], 'rejected': [A('5')]},              # TRL conversational
        {'chosen': '\n\nHuman: 2+2?\n\nAssistant: 4', 'rejected': '\n\nHuman: 2+2?\n\nAssistant: 5'},  # HH
    ])
    pairs = data.load_pref(path)
    assert pairs == [{'prompt_messages': [U('2+2?')], 'chosen': '4', 'rejected': '5'}] * 4


def test_pref_keeps_multi_turn_prompt_and_system(tmp_path):
    conv = [S('sys'), U('hi'), A('hello'), U('2+2?')]
    path = write_jsonl(tmp_path / 'p.jsonl', [{'chosen': conv + [A('4')], 'rejected': conv + [A('5')]}])
    assert data.load_pref(path) == [{'prompt_messages': conv, 'chosen': '4', 'rejected': '5'}]


# ----------------------------------------------------------------------------- RL prompts

def test_rl_reads_prompt_strings_and_messages_with_optional_answers(tmp_path):
    path = write_jsonl(tmp_path / 'rl.jsonl', [
        {'prompt': 'What is 2+3?', 'answer': '5'},
        {'prompt': 'What is 2+3?', 'answer': 5},
        {'messages': [S('sys'), U('What is 2+3?')]},
        {'conversations': [U('What is 2+3?'), A('')]},  # MiniMind RLAIF: trailing placeholder turn dropped
        {'prompt': 'What is 2*3?', 'answer': '6', 'task': 'multiplication'},
    ])
    prompts = data.load_rl(path)
    assert prompts[0] == prompts[1] == {'messages': [U('What is 2+3?')], 'answer': '5', 'task': None}
    assert prompts[2] == {'messages': [S('sys'), U('What is 2+3?')], 'answer': None, 'task': None}
    assert prompts[3] == {'messages': [U('What is 2+3?')], 'answer': None, 'task': None}
    assert prompts[4]['task'] == 'multiplication'


# ----------------------------------------------------------------------------- malformed lines

BAD_LINES = [  # (kind, line, field named in the error)
    ('rl', '{"prompt": "hi", "task": 3}', "'task'"),
    ('sft', '{"messages": [', 'not valid JSON'),
    ('sft', '[1, 2]', "'(record)'"),
    ('sft', '{"text": "hi"}', "'messages'"),
    ('sft', '{"messages": []}', "'messages'"),
    ('sft', '{"messages": [{"role": "bot", "content": "x"}]}', "'messages[0].role'"),
    ('sft', '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "'messages[0].content'"),
    ('sft', '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "'messages[0].content'"),
    ('sft', '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}', "'messages[1].role'"),
    ('sft', '{"conversations": [{"role": "user", "content": "a"}]}', "'conversations'"),
    ('sft', '{"messages": ["hi"]}', "'messages[0]'"),
    ('sft', '{"system": 5, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "'system'"),
    ('pref', '{"prompt": "q", "chosen": "a"}', "'rejected'"),
    ('pref', '{"prompt": "q", "chosen": "", "rejected": "b"}', "'chosen'"),
    ('pref', '{"prompt": "", "chosen": "a", "rejected": "b"}', "'prompt'"),
    ('pref', '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
             '"rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}', "'rejected'"),
    ('pref', '{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}', "'chosen'"),
    ('pref', '{"chosen": "no transcript here", "rejected": "x"}', "'chosen'"),
    ('rl', '{"answer": "5"}', "'prompt'"),
    ('rl', '{"prompt": "q", "answer": [5]}', "'answer'"),
    ('rl', '{"messages": [{"role": "system", "content": "s"}]}', "'messages'"),
    ('rl', '{"prompt": "   "}', "'prompt'"),
]
GOOD = {'sft': {'messages': [U('hi'), A('hello')]}, 'pref': {'prompt': 'q', 'chosen': 'a', 'rejected': 'b'},
        'rl': {'prompt': 'q', 'answer': '1'}}
LOADERS = {'sft': data.load_sft, 'pref': data.load_pref, 'rl': data.load_rl}


@pytest.mark.parametrize('kind,line,field', BAD_LINES)
def test_bad_line_error_names_file_line_and_field(tmp_path, kind, line, field):
    path = write_jsonl(tmp_path / f'{kind}.jsonl', [GOOD[kind], GOOD[kind], line, GOOD[kind]])
    with pytest.raises(data.DataError) as e:
        LOADERS[kind](path)
    assert f"{path}:3:" in str(e.value) and field in str(e.value)
    assert len(LOADERS[kind](path, skip_bad_lines=True)) == 3


def test_skip_bad_lines_reports_the_count(tmp_path, capsys):
    path = write_jsonl(tmp_path / 's.jsonl', [GOOD['sft'], '{bad', '', GOOD['sft'], '{"messages": 1}'])
    assert len(data.load_sft(path, skip_bad_lines=True)) == 2
    assert 'skipped 2 bad line(s) of 4' in capsys.readouterr().out


def test_empty_and_all_bad_files_are_errors_even_when_skipping(tmp_path):
    empty = write_jsonl(tmp_path / 'empty.jsonl', [])
    with pytest.raises(data.DataError, match='empty'):
        data.load_sft(empty, skip_bad_lines=True)
    bad = write_jsonl(tmp_path / 'bad.jsonl', ['{bad', '{"text": 1}'])
    with pytest.raises(data.DataError, match='no usable'):
        data.load_rl(bad, skip_bad_lines=True)
    with pytest.raises(data.DataError, match='no such file'):
        data.load_pref(str(tmp_path / 'missing.jsonl'))


def test_validate_file_counts_records_turns_tokens_and_lists_every_bad_line(tmp_path):
    tok = char_tokenizer('abcdefghijklmnopqrstuvwxyz\nhello ')
    path = write_jsonl(tmp_path / 'v.jsonl', [GOOD['sft'], '{bad', GOOD['sft'], '{"messages": 1}'])
    counts, errors = data.validate_file(path, 'sft', tok)
    per_record = len(tok.render_chat(data.parse_sft(GOOD['sft']))[0])
    assert counts == {'records': 2, 'turns': 4, 'tokens': 2 * per_record}
    assert len(errors) == 2 and f"{path}:2:" in errors[0] and f"{path}:4:" in errors[1]


# ----------------------------------------------------------------------------- rewards

@pytest.mark.parametrize('response,answer,reward', [
    ('85', '85', 1.0), ('The answer is 85.', '85', 1.0), ('37+48=85', 85, 1.0), ('85.0', '85', 1.0),
    ('-11', '-11', 1.0), ('1,234', '1234', 1.0), ('86', '85', 0.0), ('eighty-five', '85', 0.0), ('', '85', 0.0),
    ('85 or maybe 86', '85', 0.0),
])
def test_arithmetic_reward_is_exact_match_of_the_final_number(response, answer, reward):
    assert tasks.arithmetic_reward(response, answer) == reward


def test_verifiable_reward_numbers_exact_text_contained():
    assert tasks.verifiable_reward('It is 12.', '12') == 1.0
    assert tasks.verifiable_reward('I am  MINI, made by X.', 'mini') == 1.0
    assert tasks.verifiable_reward('I am GPT.', 'Mini') == 0.0
    assert tasks.verifiable_reward('anything', None) == 0.0


# ----------------------------------------------------------------------------- cleaning

def test_clean_text_normalises_strips_controls_and_drops_boilerplate_lines():
    decomposed = unicodedata.normalize('NFD', 'café\r\n')
    text = decomposed + 'a\x00b\x07c\ufeff\nAll Rights Reserved 2024\n  TODO  \nkeep this todo line\n'
    out, counts = corpus.clean_text(text)
    assert out == 'café\nabc\nkeep this todo line\n'
    assert counts == {'normalized': 1, 'control_chars': 3, 'boilerplate_lines': 2}
    off, counts = corpus.clean_text(text, normalize='', strip_control=False, drop_boilerplate=False)
    assert off == text and counts == {'normalized': 0, 'control_chars': 0, 'boilerplate_lines': 0}


def words(n, rng):
    vocab = [f"w{i}" for i in range(5000)]
    return [rng.choice(vocab) for _ in range(n)]


def test_minhash_estimates_jaccard_of_word_5grams():
    rng = random.Random(0)
    a = words(400, rng)
    b = list(a)
    for i in rng.sample(range(400), 20):  # 20 changed words -> ~100 of ~396 shingles differ
        b[i] = 'changed'
    shingles = lambda ws: {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}
    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    sigs, has_words = corpus.minhash_signatures([' '.join(a), ' '.join(b)], num_perm=256)
    assert has_words.all()
    assert abs(np.mean(sigs[0] == sigs[1]) - true) < 0.1


def test_cleaner_drops_planted_duplicates_and_near_duplicates_and_counts_them():
    rng = random.Random(1)
    originals = [' '.join(words(300, rng)) for _ in range(20)]
    near = originals[3].split()
    near[150] = 'edited'  # one word: Jaccard ~0.97
    docs = originals + [originals[5], originals[5], ' '.join(near), 'tiny', originals[7].upper()]
    cleaner = corpus.Cleaner(min_chars=10, near_dedup_threshold=0.8)
    counts = corpus.Cleaner.new_counts()
    kept = [t for t, _ in cleaner.run(docs, counts)]
    assert kept == originals
    assert counts['dropped'] == {'too_short': 1, 'too_long': 0, 'exact_duplicate': 2, 'near_duplicate': 2}
    assert counts['docs_in'] == 25 and counts['docs_out'] == 20
    off = corpus.Cleaner(min_chars=0, exact_dedup=False, near_dedup=False)
    assert len(list(off.run(docs, corpus.Cleaner.new_counts()))) == 25
    strict = corpus.Cleaner(min_chars=10, near_dedup_threshold=0.995)  # the one-word edit survives 0.995
    assert [t for t, _ in strict.run(docs, corpus.Cleaner.new_counts())] == originals + [' '.join(near)]


def test_near_dedup_keeps_distinct_documents_across_batches():
    rng = random.Random(2)
    docs = [' '.join(words(200, rng)) for _ in range(300)]
    cleaner = corpus.Cleaner(min_chars=0, batch_chars=10_000)  # many MinHash batches
    assert len(list(cleaner.run(docs + docs[:5], corpus.Cleaner.new_counts()))) == 300


# ----------------------------------------------------------------------------- mixing

def test_mixing_weights_give_token_shares_and_are_seeded():
    rng = np.random.default_rng(0)
    doc_tokens = {'a': rng.integers(50, 150, 4000), 'b': rng.integers(50, 150, 1000)}
    rules = corpus.parse_sampling({'a': 1, 'b': 3}, ['a', 'b'])
    chosen = corpus.mix_documents(doc_tokens, rules, seed=1)
    got = {s: doc_tokens[s][chosen[s]].sum() for s in chosen}
    assert abs(got['b'] / (got['a'] + got['b']) - 0.75) < 0.01
    assert got['b'] >= 0.99 * doc_tokens['b'].sum()  # the limiting source is used (almost) whole
    assert len(np.unique(chosen['a'])) == len(chosen['a'])  # weights never repeat a document
    again = corpus.mix_documents(doc_tokens, rules, seed=1)
    other = corpus.mix_documents(doc_tokens, rules, seed=2)
    assert all(np.array_equal(chosen[s], again[s]) for s in chosen)
    assert not np.array_equal(chosen['a'], other['a'])


def test_target_tokens_upsamples_a_small_source_and_untouched_sources_stay_whole():
    doc_tokens = {'small': np.full(10, 100), 'rest': np.full(7, 5)}
    chosen = corpus.mix_documents(doc_tokens, corpus.parse_sampling({'small': {'target_tokens': 3000}}, ['small', 'rest']))
    assert doc_tokens['small'][chosen['small']].sum() == 3000  # three epochs of 1000 tokens
    assert np.bincount(chosen['small']).tolist() == [3] * 10
    assert chosen['rest'].tolist() == list(range(7))


def test_bad_sampling_rules_say_how_to_fix_them():
    with pytest.raises(SystemExit, match='not a source'):
        corpus.parse_sampling({'nope': 1}, ['a'])
    with pytest.raises(SystemExit, match='weight, target_tokens or max_samples'):
        corpus.parse_sampling({'a': {'wieght': 1}}, ['a'])
    with pytest.raises(SystemExit, match='not both'):
        corpus.parse_sampling({'a': {'weight': 1, 'target_tokens': 5}}, ['a'])


# ----------------------------------------------------------------------------- tokenising

def test_token_dtype_is_uint16_below_65536_ids_then_uint32():
    assert corpus.token_dtype(4096) == np.uint16 and corpus.token_dtype(65535) == np.uint16
    assert corpus.token_dtype(65536) == np.uint32  # the contract: uint16 only when n_vocab < 65536


def spool_of(texts):
    raw = [t.encode('utf-8') for t in texts]
    return b''.join(raw), np.concatenate(([0], np.cumsum([len(r) for r in raw])))


@pytest.mark.parametrize('chunk_bytes', [50, 16_000_000])
def test_tokenise_spool_streams_in_chunks_smaller_than_the_text_with_identical_ids(tmp_path, chunk_bytes):
    rng = random.Random(3)
    texts = [' '.join(words(rng.randrange(1, 60), rng)) + ' <|endoftext|> é€😀' for _ in range(200)]
    tok = train_bpe(texts, 300)
    spool, offsets = spool_of(texts)
    ids = np.arange(0, 200, 2)  # every other document
    lengths = corpus.tokenise_spool(tok, spool, offsets, ids, str(tmp_path / 't.bin'), np.uint16, num_threads=2,
                                  chunk_bytes=chunk_bytes, group_bytes=100, log_every=0)
    expected = [[tok.eot_id] + tok.encode(texts[i]) for i in ids]  # '<|endoftext|>' in text stays text
    assert lengths.tolist() == [len(e) for e in expected]
    assert np.fromfile(tmp_path / 't.bin', np.uint16).tolist() == [t for e in expected for t in e]


def test_tokenise_spool_char_kind_matches_encode_and_rejects_unknown_characters(tmp_path):
    texts = ['hello world', 'low', 'héllo']
    tok = char_tokenizer(''.join(texts))
    spool, offsets = spool_of(texts)
    corpus.tokenise_spool(tok, spool, offsets, [0, 1, 2], str(tmp_path / 'c.bin'), np.uint16, log_every=0)
    expected = [i for t in texts for i in [tok.eot_id] + tok.encode(t)]
    assert np.fromfile(tmp_path / 'c.bin', np.uint16).tolist() == expected
    other = char_tokenizer('helo wrd')
    with pytest.raises(SystemExit, match='not in the char tokenizer'):
        corpus.tokenise_spool(other, spool, offsets, [2], str(tmp_path / 'd.bin'), np.uint16, log_every=0)


def test_copy_documents_copies_selected_spans_in_order(tmp_path):
    src = np.arange(20, dtype=np.uint16)
    offsets = np.array([0, 3, 5, 10, 20])
    with open(tmp_path / 'o.bin', 'wb') as f:
        n = corpus.copy_documents(src, offsets, [2, 0, 1, 1, 3], f, chunk_tokens=4)
    out = np.fromfile(tmp_path / 'o.bin', np.uint16).tolist()
    assert out == list(range(5, 10)) + [0, 1, 2, 3, 4, 3, 4] + list(range(10, 20)) and n == len(out)


# ----------------------------------------------------------------------------- sources

def test_unreachable_url_is_one_clear_line_and_leaves_no_file(tmp_path):
    dest = tmp_path / 'dl' / 'x.txt'
    with pytest.raises(SystemExit) as e:
        corpus.download('http://127.0.0.1:9/x', str(dest), timeout=5)
    message = str(e.value)
    assert 'http://127.0.0.1:9/x' in message and '--sources=PATH' in message and '\n' not in message
    assert not dest.exists() and os.listdir(tmp_path / 'dl') == []


def test_download_checks_size_and_renames_only_when_complete(tmp_path):
    src = tmp_path / 'src.txt'
    src.write_text('hello world\n')
    url = src.resolve().as_uri()  # file:// exercises the same streaming path, no network
    with pytest.raises(SystemExit, match='corrupt'):
        corpus.download(url, str(tmp_path / 'bad.txt'), size=999)
    assert sorted(os.listdir(tmp_path)) == ['src.txt']  # neither bad.txt nor bad.txt.part
    assert corpus.download(url, str(tmp_path / 'ok.txt'), size=12) == str(tmp_path / 'ok.txt')
    assert (tmp_path / 'ok.txt').read_text() == 'hello world\n' and not (tmp_path / 'ok.txt.part').exists()


def test_stdlib_source_is_sorted_and_excludes_site_packages_and_test_fixtures():
    root, files = corpus.stdlib_files()
    rel = [os.path.relpath(f, root) for f in files]
    assert len(files) > 500 and all(f.endswith('.py') for f in files)
    assert not any('site-packages' in r or '__pycache__' in r for r in rel)
    assert not any(r.startswith(os.path.join('test', 'tokenizedata')) for r in rel)
    assert 'os.py' in rel and corpus.stdlib_files()[1] == files


def test_text_files_split_on_endoftext_lines_and_jsonl_reads_text_field(tmp_path):
    (tmp_path / 'stories.txt').write_text('one\nstory\n<|endoftext|>\ntwo\n<|endoftext|>\nthree\n')
    assert list(corpus.read_text_file(str(tmp_path / 'stories.txt'))) == ['one\nstory\n', 'two\n', 'three\n']
    path = write_jsonl(tmp_path / 'p.jsonl', [{'text': 'a'}, {'text': 'b', 'id': 1}, '{"txt": "c"}'])
    with pytest.raises(data.DataError, match=r"p.jsonl:3: field 'text'"):
        list(corpus.read_jsonl_text(path))
    assert list(corpus.read_jsonl_text(path, skip_bad_lines=True)) == ['a', 'b']


class FakeResponse:
    """What urlopen returns, serving `body` from byte `start`; breaks off after `fail_after` bytes."""

    def __init__(self, body, start=0, ranges=True, fail_after=None):
        self.body, self.pos, self.fail_after = body[start:], 0, fail_after
        self.status = 206 if start else 200
        self.headers = {'Accept-Ranges': 'bytes'} if ranges else {}

    def read(self, n):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError('connection reset')
        chunk = self.body[self.pos:self.pos + min(n, self.fail_after or n)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize('ranges', [True, False])
def test_broken_download_keeps_a_part_file_only_when_the_server_can_resume_then_resumes(tmp_path, monkeypatch, ranges):
    body = bytes(range(256)) * 10
    requests = []

    def urlopen(request, timeout):
        requests.append(request.get_header('Range'))
        start = int(request.get_header('Range')[6:-1]) if request.get_header('Range') else 0
        return FakeResponse(body, start, ranges, fail_after=1000 if len(requests) == 1 else None)

    monkeypatch.setattr(corpus.urllib.request, 'urlopen', urlopen)
    dest = str(tmp_path / 'f.bin')
    with pytest.raises(SystemExit, match='resume' if ranges else 'retry'):
        corpus.download('http://example.invalid/f.bin', dest, size=len(body))
    assert os.path.exists(dest + '.part') == ranges and not os.path.exists(dest)
    corpus.download('http://example.invalid/f.bin', dest, size=len(body))
    assert open(dest, 'rb').read() == body and not os.path.exists(dest + '.part')
    assert requests == [None, 'bytes=1000-' if ranges else None]


def test_download_checks_content_length_when_no_size_is_known(tmp_path, monkeypatch):
    def urlopen(request, timeout):
        response = FakeResponse(b'short')
        response.headers['Content-Length'] = '10'
        return response
    monkeypatch.setattr(corpus.urllib.request, 'urlopen', urlopen)
    with pytest.raises(SystemExit, match='corrupt .got 5 bytes; expected 10'):
        corpus.download('http://example.invalid/x', str(tmp_path / 'x'))
    assert os.listdir(tmp_path) == []
