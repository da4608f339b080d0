"""tokenizer.py: BPE/char round trips, special tokens, digit splitting, the chat loss mask, files."""

import json

import pytest

import tokenizer as tk

TEXT = ("def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b  # 12345 + 678\n"
        "Unicode: héllo wörld, 日本語, emoji 🙂.\n") * 20


@pytest.fixture(scope='module')
def bpe():
    return tk.train_bpe([TEXT], 400)


def test_bpe_round_trips_text_and_compresses(bpe):
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode('utf-8')) / 2  # merges were learned


def test_numbers_split_into_single_digits(bpe):
    assert [bpe.decode([i]) for i in bpe.encode('12345')] == list('12345')


def test_special_tokens_are_text_unless_allowed(bpe):
    s = 'a<|im_end|>b'
    assert bpe.im_end_id not in bpe.encode(s)
    assert bpe.encode(s, allow_special=True) == bpe.encode('a') + [bpe.im_end_id] + bpe.encode('b')
    assert bpe.decode(bpe.encode(s, allow_special=True)) == s
    assert bpe.eot_id == bpe.n_vocab - len(tk.SPECIAL_TOKENS)  # specials follow the merges


def test_bpe_reports_a_short_vocabulary(capsys):
    tok = tk.train_bpe(['ab ab ab'], 1000)
    assert tok.n_vocab < 1000 and 'stopped at' in capsys.readouterr().out


def test_char_tokenizer_round_trips_with_specials():
    tok = tk.char_tokenizer('hello world\n')
    ids = tok.encode('hello<|im_start|>world', allow_special=True)
    assert tok.decode(ids) == 'hello<|im_start|>world' and tok.im_start_id in ids
    assert tok.n_vocab == len(set('hello world\n')) + len(tk.SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode('z')


def test_saved_file_is_json_and_reloads_identically(bpe, tmp_path):
    path = str(tmp_path / 'tok.json')
    bpe.save(path)
    json.load(open(path))  # plain JSON, no pickle
    again = tk.Tokenizer.load(path)
    assert again.identity == bpe.identity and again.encode(TEXT) == bpe.encode(TEXT)
    assert tk.char_tokenizer('abc').identity != bpe.identity


def test_chat_mask_covers_assistant_content_and_end_token_only(bpe):
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'},
                {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'add 2+2'},
                {'role': 'assistant', 'content': '4'}]
    ids, mask = bpe.render_chat(messages)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == bpe.encode('hello') + [bpe.im_end_id] + bpe.encode('4') + [bpe.im_end_id]
    text = bpe.decode(ids)
    assert text.startswith('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n')
    assert text.endswith('<|im_start|>assistant\n4<|im_end|>\n')


def test_chat_content_cannot_inject_special_tokens(bpe):
    ids, _ = bpe.render_chat([{'role': 'user', 'content': '<|im_end|>'}])
    assert ids.count(bpe.im_end_id) == 1  # only the real end marker


def test_render_prompt_ends_with_assistant_header(bpe):
    ids = bpe.render_prompt([{'role': 'user', 'content': 'hi'}])
    assert bpe.decode(ids).endswith('<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')


def test_gpt2_offline_error_says_what_to_do(monkeypatch):
    def offline(name):
        raise ConnectionError('Name or service not known')
    monkeypatch.setattr(tk.tiktoken, 'get_encoding', offline)
    with pytest.raises(RuntimeError, match='tokenizer_type=gpt2 needs .* offline, use --tokenizer_type=bpe or char'):
        tk.gpt2_tokenizer()
