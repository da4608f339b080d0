"""Data at real scale (issue 15): malformed input is a bad line that names its file, line and
field, or just works; nothing is lost silently; a failed prepare.py run leaves the dataset whole."""

import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import corpus
import data
from conftest import REPO, run_script
from tokenizer import char_tokenizer, train_bpe


def write_lines(path, lines):
    """Lines as given: str is written as UTF-8, bytes as they are (to plant bytes that are not UTF-8)."""
    with open(path, 'wb') as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode('utf-8')) + b'\n')
    return str(path)


def prepare(tmp_path, *args, check=True):
    return run_script('prepare.py', f'--data_root={tmp_path}', *args, check=check, timeout=300)


def sentences(n, seed):
    rng = random.Random(seed)
    vocab = 'the a model learns small data from text clean token every source file line word near copy'.split()
    return [' '.join(rng.choice(vocab) for _ in range(rng.randrange(20, 60))) + f' {seed}-{i}.' for i in range(n)]


def jsonl_text(path, docs):
    path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    return str(path)


GOOD = {'sft': '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
        'pref': '{"prompt": "q", "chosen": "a", "rejected": "b"}', 'rl': '{"prompt": "q", "answer": "1"}'}
LOADERS = {'sft': data.load_sft, 'pref': data.load_pref, 'rl': data.load_rl}

# ----------------------------------------------------------------------------- the malformed-input corpus
# (kind, line 3 of a file of good lines, what the error must name). bytes = not UTF-8.
BAD_LINES = [
    ('sft', b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', 'not UTF-8'),
    ('pref', b'{"prompt": "q", "chosen": "\xff", "rejected": "b"}', 'not UTF-8'),
    ('rl', b'\xc3(', 'not UTF-8'),
    ('sft', '{"messages": [{"role": ["user"], "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "'messages[0].role'"),
    ('sft', '{"conversations": [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]}',
     "'conversations[0].role'"),
    ('sft', '{"messages": [{"role": {"r": 1}, "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "'messages[0].role'"),
    ('pref', '{"chosen": [{"role": "user", "content": "q"}, {"role": ["assistant"], "content": "a"}], '
             '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
     "'chosen[1].role'"),
    ('rl', '{"messages": [{"role": "user", "content": "q"}, {"role": ["assistant"], "content": ""}]}',
     "'messages[1].role'"),
    ('rl', '{"conversations": [{"from": "human", "value": "q"}, {"from": {"x": 1}, "value": ""}]}',
     "'conversations[1].role'"),
]


@pytest.mark.parametrize('kind,line,named', BAD_LINES)
def test_malformed_line_is_one_bad_line_naming_file_line_and_field_and_can_be_skipped(tmp_path, kind, line, named):
    path = write_lines(tmp_path / f'{kind}.jsonl', [GOOD[kind], GOOD[kind], line, GOOD[kind]])
    with pytest.raises(data.DataError) as e:
        LOADERS[kind](path)
    assert f"{path}:3:" in str(e.value) and named in str(e.value)
    assert len(LOADERS[kind](path, skip_bad_lines=True)) == 3  # the lines after the bad one are read too
    counts, errors = data.validate_file(path, kind)
    assert counts['records'] == 3 and len(errors) == 1 and f"{path}:3:" in errors[0]


def test_read_lines_splits_and_translates_newlines_as_open_does(tmp_path):
    path = tmp_path / 'nl.txt'
    path.write_bytes('a\r\nb\rc\n{"t": "x\u2028y\x0cz"}\n\nlast'.encode('utf-8'))
    assert [line for _, line, _ in data.read_lines(str(path))] == list(open(path, encoding='utf-8'))


# ----------------------------------------------------------------------------- pretraining files

def test_text_file_with_a_bad_byte_loses_that_line_only_and_says_where(tmp_path, capsys):
    big = ''.join(f'line {i} of a long document\n' for i in range(2000))  # ~55 KB: many read buffers
    path = write_lines(tmp_path / 'notes.txt', [b'caf\xe9 au lait', 'first doc', '<|endoftext|>', big.rstrip('\n'),
                                                b'\xff\xfe', 'tail'])
    assert list(corpus.read_text_file(path)) == ['first doc\n', big + 'tail\n']
    assert f"{path}: dropped 2 bad line(s); first: {path}:1: not UTF-8" in capsys.readouterr().out
    bad = []
    list(corpus.read_text_file(path, bad))
    assert len(bad) == 2 and f"{path}:1: not UTF-8" in bad[0] and f"{path}:2004:" in bad[1]
    counts = corpus.Cleaner.new_counts()
    assert len(list(corpus.iter_documents([path, path], counts=counts))) == 4 and counts['bad_lines'] == 4


def test_pretraining_jsonl_bad_bytes_are_a_bad_line(tmp_path):
    path = write_lines(tmp_path / 'p.jsonl', ['{"text": "a"}', b'{"text": "\xe9"}', '{"text": "b"}'])
    with pytest.raises(data.DataError, match=r"p.jsonl:2: not UTF-8"):
        list(corpus.read_jsonl_text(path))
    bad = []
    assert list(corpus.read_jsonl_text(path, skip_bad_lines=True, bad=bad)) == ['a', 'b'] and len(bad) == 1


def test_parquet_without_text_column_or_with_null_texts_names_file_row_and_field(tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    no_text = str(tmp_path / 'no_text.parquet')
    pq.write_table(pa.table({'content': ['a', 'b']}), no_text)
    with pytest.raises(data.DataError, match=r"no_text.parquet: no 'text' column \(it has content\)"):
        list(corpus.read_file(no_text))
    nulls = str(tmp_path / 'nulls.parquet')
    pq.write_table(pa.table({'text': ['a', None, 'b']}), nulls)
    with pytest.raises(data.DataError, match=r"nulls.parquet: row 1 .*field 'text'.*null"):
        list(corpus.read_file(nulls))
    bad = []
    assert list(corpus.read_file(nulls, skip_bad_lines=True, bad=bad)) == ['a', 'b'] and len(bad) == 1
    not_parquet = tmp_path / 'x.parquet'
    not_parquet.write_text('hello')
    with pytest.raises(data.DataError, match='not a readable parquet file'):
        list(corpus.read_file(str(not_parquet)))


def test_directory_source_skips_broken_symlinks_and_a_file_that_cannot_be_read_is_a_data_error(tmp_path, capsys):
    folder = tmp_path / 'notes'
    folder.mkdir()
    (folder / 'a.txt').write_text('alpha')
    (folder / 'gone.txt').write_text('soon deleted')
    os.symlink(tmp_path / 'nowhere.txt', folder / '.#a.txt')  # an editor's lock file: a dangling link
    where, files = corpus.resolve_source(str(folder), str(tmp_path / 'dl'))
    assert files == [str(folder / 'a.txt'), str(folder / 'gone.txt')]
    assert 'skipped 1 name(s) that are not files' in capsys.readouterr().out
    os.remove(folder / 'gone.txt')  # gone between listing and reading
    with pytest.raises(data.DataError, match=r"gone.txt: cannot read it \(No such file or directory\)"):
        list(corpus.iter_documents(files))


def test_unreadable_file_in_a_directory_source_is_a_clear_error(tmp_path):
    folder = tmp_path / 'notes'
    folder.mkdir()
    (folder / 'a.txt').write_text('alpha')
    (folder / 'secret.txt').write_text('no')
    os.chmod(folder / 'secret.txt', 0)
    try:
        open(folder / 'secret.txt').close()
        pytest.skip('this user reads files without read permission (root): nothing to deny')
    except PermissionError:
        pass
    with pytest.raises(SystemExit, match=r"secret.txt; fix their permissions"):
        corpus.resolve_source(str(folder), str(tmp_path / 'dl'))


# ----------------------------------------------------------------------------- cleaning and mixing

def test_minhash_and_near_dedup_work_on_batches_of_fewer_words_than_a_shingle():
    lines = ['你好，世界', '今天天气很好']  # CJK without spaces: one "word" each, 2 words in the batch
    sigs, has_words = corpus.minhash_signatures(lines)
    alone = corpus.minhash_signatures(lines + [' '.join(f'w{i}' for i in range(50))])[0][:2]
    assert has_words.all() and np.array_equal(sigs, alone)  # a document's signature does not depend on its batch
    kept = list(corpus.Cleaner(min_chars=0).run(lines + lines[:1], corpus.Cleaner.new_counts()))
    assert [t for t, _ in kept] == lines
    assert corpus.NearDuplicates().keep(['a b', 'c']) == [True, True]


def test_weighted_mixing_never_repeats_a_document_through_float_rounding():
    doc_tokens = {'a': np.array([1, 1, 1]), 'b': np.arange(1, 50)}  # 3 / (0.1 / 0.2) * 0.1 / 0.2 = 3.0000000000000004
    chosen = corpus.mix_documents(doc_tokens, corpus.parse_sampling({'a': 0.1, 'b': 0.1}, ['a', 'b']))
    assert sorted(chosen['a'].tolist()) == [0, 1, 2]  # the scarcest source whole, once


def test_a_weighted_source_without_training_documents_is_an_error_naming_it():
    doc_tokens = {'a': np.zeros(0, np.int64), 'b': np.full(10, 5)}
    with pytest.raises(SystemExit, match="gives 'a' a weight, but it has no training documents"):
        corpus.mix_documents(doc_tokens, corpus.parse_sampling({'a': 1, 'b': 1}, ['a', 'b']))


@pytest.mark.parametrize('sampling,field', [
    ({'a': '3'}, "dataset_sampling['a']: expected a number"),
    ({'a': [1]}, "dataset_sampling['a']: expected a number"),
    ({'a': None}, "dataset_sampling['a']: expected a number"),
    ({'a': True}, "dataset_sampling['a']: expected a number"),
    ({'a': {'weight': '1'}}, "dataset_sampling['a']['weight']: expected a number >= 0, got str '1'"),
    ({'a': {'target_tokens': float('inf')}}, "dataset_sampling['a']['target_tokens']"),
    ({'a': {'max_samples': 2.5}}, "dataset_sampling['a']['max_samples']: expected a whole number"),
    ({'a': {'max_samples': -1}}, "dataset_sampling['a']['max_samples']"),
    ('a', "dataset_sampling: expected a dict"),
])
def test_wrong_typed_sampling_values_name_the_field(sampling, field):
    with pytest.raises(SystemExit) as e:
        corpus.parse_sampling(sampling, ['a'])
    assert field in str(e.value)


# ----------------------------------------------------------------------------- tokenizers

def test_validate_with_a_char_tokenizer_names_the_field_with_an_unknown_character(tmp_path):
    tok = char_tokenizer('abcdefghijklmnopqrstuvwxyz\n ')
    cafe = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "caf\\u00e9"}]}'
    path = write_lines(tmp_path / 'v.jsonl', [GOOD['sft'], cafe, GOOD['sft']])
    counts, errors = data.validate_file(path, 'sft', tok)
    assert counts['records'] == 2 and counts['tokens'] > 0
    assert len(errors) == 1 and f"{path}:2: field 'messages[1].content': character 'é'" in errors[0]


def test_validate_script_reports_an_unknown_character_as_a_bad_line(tmp_path):
    os.makedirs(tmp_path / 'chars')
    char_tokenizer('abcdefghijklmnopqrstuvwxyz\n ').save(str(tmp_path / 'chars' / 'tokenizer.json'))
    path = write_lines(tmp_path / 'rl.jsonl', [GOOD['rl'], '{"prompt": "Qué?"}'])
    proc = prepare(tmp_path, '--dataset=chars', f'--validate={path}', '--kind=rl', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert f"{path}:2: field 'prompt': character 'Q'" in proc.stdout and '1 bad line(s)' in proc.stdout


def test_vocab_size_below_the_minimum_is_a_clear_error():
    with pytest.raises(ValueError, match='vocab_size=100 is too small.*at least 264'):
        train_bpe(['some text'], 100)


def test_prepare_refuses_a_too_small_vocab_size_before_reading_anything(tmp_path):
    proc = prepare(tmp_path, '--dataset=v', '--sources=/no/such/file.txt', '--vocab_size=100', check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert '--vocab_size=100 is too small' in proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- downloads (a local server)

class Server(http.server.ThreadingHTTPServer):
    """Serves self.files {path: bytes} with byte ranges, as a CDN does; '/hang' never answers."""
    daemon_threads = True

    def __init__(self):
        super().__init__(('127.0.0.1', 0), RangeHandler)
        self.files, self.requests = {}, []
        self.hanging, self.release = threading.Event(), threading.Event()
        self.url = f'http://127.0.0.1:{self.server_address[1]}'


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        rng = self.headers.get('Range')
        self.server.requests.append((self.path, rng))
        if self.path == '/hang':
            self.server.hanging.set()
            self.server.release.wait(60)
            return
        body = self.server.files.get(self.path)
        if body is None:
            return self.send_error(404)
        start = int(rng[len('bytes='):-1]) if rng else 0
        if start >= len(body):  # as nginx/S3 answer a range past the end
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(body)}')
            self.send_header('Content-Length', '0')
            return self.end_headers()
        self.send_response(206 if rng else 200)
        self.send_header('Accept-Ranges', 'bytes')
        self.send_header('Content-Length', str(len(body) - start))
        if rng:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    s = Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.release.set()
    s.shutdown()
    s.server_close()


def test_http_416_on_a_resumed_download_finishes_or_restarts_it_not_offline(tmp_path, server, capsys):
    body = bytes(range(256)) * 40
    server.files['/f.bin'] = body
    whole = str(tmp_path / 'whole.bin')  # the part file is complete: a run stopped before renaming it
    (tmp_path / 'whole.bin.part').write_bytes(body)
    assert corpus.download(server.url + '/f.bin', whole) == whole and open(whole, 'rb').read() == body
    stale = str(tmp_path / 'stale.bin')  # the part file is longer than the file now on the server
    (tmp_path / 'stale.bin.part').write_bytes(body + b'old tail')
    assert corpus.download(server.url + '/f.bin', stale, size=len(body)) == stale and open(stale, 'rb').read() == body
    assert 'HTTP 416' in capsys.readouterr().out and not os.path.exists(stale + '.part')
    assert server.requests == [('/f.bin', f'bytes={len(body)}-'), ('/f.bin', f'bytes={len(body) + 8}-'),
                               ('/f.bin', None)]


def test_http_error_names_the_status_instead_of_offline(tmp_path, server):
    with pytest.raises(SystemExit) as e:
        corpus.download(server.url + '/missing.txt', str(tmp_path / 'm.txt'))
    assert 'HTTP 404' in str(e.value) and 'offline' not in str(e.value) and '--sources=PATH' in str(e.value)


def test_download_cache_is_keyed_by_url_not_file_name(tmp_path, server):
    server.files['/a/input.txt'] = b'first corpus\n'
    server.files['/b/input.txt'] = b'second corpus\n'
    _, (a,) = corpus.resolve_source(server.url + '/a/input.txt', str(tmp_path))
    _, (b,) = corpus.resolve_source(server.url + '/b/input.txt', str(tmp_path))
    assert a != b and open(a, 'rb').read() == b'first corpus\n' and open(b, 'rb').read() == b'second corpus\n'
    assert os.path.basename(a).startswith('input-') and a.endswith('.txt')
    assert corpus.resolve_source(server.url + '/a/input.txt', str(tmp_path))[1] == [a] and len(server.requests) == 2


# ----------------------------------------------------------------------------- prepare.py end to end

def snapshot(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_a_failed_or_interrupted_run_leaves_the_existing_dataset_whole(tmp_path, server):
    src = jsonl_text(tmp_path / 'a.jsonl', sentences(60, 1))
    args = ['--dataset=keep', '--vocab_size=300']
    prepare(tmp_path, *args, f'--sources={src}')
    before = snapshot(tmp_path / 'keep')
    assert 'meta.json' in before
    # 1) a typo in --sources; 2) a failure after cleaning (no such tokenizer file); 3) Ctrl-C mid-download
    proc = prepare(tmp_path, *args, f'--sources={src}x', check=False)
    assert proc.returncode != 0 and 'not a file, directory, glob or URL' in proc.stderr
    assert snapshot(tmp_path / 'keep') == before
    proc = prepare(tmp_path, *args, f'--sources={src}', '--tokenizer_type=typo.json', check=False)
    assert proc.returncode != 0 and 'clean ' in proc.stdout and 'typo.json' in proc.stderr
    assert snapshot(tmp_path / 'keep') == before
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}

    def as_a_background_job():  # SIGINT ignored and blocked, as a parent may leave it: Ctrl-C must still work
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    proc = subprocess.Popen([sys.executable, 'prepare.py', f'--data_root={tmp_path}', *args,
                             f'--sources={server.url}/hang'], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_a_background_job)
    assert server.hanging.wait(60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and 'KeyboardInterrupt' in err
    assert snapshot(tmp_path / 'keep') == before
    assert not os.path.exists(tmp_path / 'keep.tmp')


def test_same_source_twice_is_refused_with_the_way_to_repeat_it(tmp_path):
    src = jsonl_text(tmp_path / 'a.jsonl', sentences(30, 2))
    proc = prepare(tmp_path, '--dataset=twice', f'--sources={src},{src}', '--vocab_size=300', check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert f"gives '{src}' twice" in proc.stderr and 'target_tokens' in proc.stderr


def test_source_emptied_by_cleaning_counts_zero_documents_not_minus_one(tmp_path):
    good = jsonl_text(tmp_path / 'good.jsonl', sentences(20, 3))
    short = jsonl_text(tmp_path / 'short.jsonl', ['tiny', 'also tiny'])
    proc = prepare(tmp_path, '--dataset=empty', f'--sources={good},{short}', '--vocab_size=300', '--min_chars=20')
    stats = json.load(open(tmp_path / 'empty' / 'stats.json'))
    s = stats['sources'][short]
    assert (s['docs_out'], s['train_docs'], s['val_docs'], s['train_tokens'], s['val_tokens']) == (0, 0, 0, 0, 0)
    assert stats['total']['docs_out'] == stats['total']['train_docs'] + stats['total']['val_docs'] == 20
    assert f"nothing of {short} is left after cleaning" in proc.stdout


def test_a_bad_byte_in_a_text_source_costs_one_line_and_is_counted_in_stats(tmp_path):
    good = tmp_path / 'good.txt'
    docs = sentences(20, 4)
    with open(good, 'wb') as f:  # < 8 KB: one bad byte used to drop the whole file
        f.write(docs[0].encode() + b'\n\xff\n<|endoftext|>\n' + '\n<|endoftext|>\n'.join(docs[1:]).encode())
    proc = prepare(tmp_path, '--dataset=bytes', f'--sources={good}', '--vocab_size=300')
    assert f"{good}: dropped 1 bad line(s); first: {good}:2: not UTF-8" in proc.stdout
    s = json.load(open(tmp_path / 'bytes' / 'stats.json'))['sources'][str(good)]
    assert s['bad_lines'] == 1 and s['docs_in'] == s['docs_out'] == 20
