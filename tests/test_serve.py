"""serve.py as clients use it: the official openai client against a server started here on a tiny
checkpoint, compared with generate.TextGenerator; batching, errors, disconnects, and the chat page in a
headless Chromium (Debian's: apt-get install -y chromium)."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from common import save_checkpoint
from generate import TextGenerator
from model import GPT, GPTConfig
from tokenizer import char_tokenizer, train_bpe

openai = pytest.importorskip('openai', reason="pip install openai fastapi uvicorn")
httpx = pytest.importorskip('httpx', reason="pip install httpx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "the quick brown fox jumps over the lazy dog.\nTHE END?\n"
CONTEXT = 1024
MAX_BATCH = 8
PROMPTS = ['the', 'fox ', 'lazy dog', 'END?', 'quick brown', 'o', 'jumps over the ', 'THE']
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run']


def save(path, model, tok, stage='sft'):
    save_checkpoint({'model': model.state_dict(), 'model_args': model.config.to_dict(), 'tokenizer': tok.spec,
                     'config': {}, 'stage': stage, 'iter_num': 0, 'best_val_loss': 3.0}, os.path.join(path, 'ckpt.pt'))


def random_model(tok):
    """A random tiny GPT with its weights scaled up, so that greedy replies vary with the prompt and
    end (untrained at the usual scale, every prompt gets one letter repeated)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=CONTEXT, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model.eval()


def script_model(tok, prompt_len, script, then):
    """A GPT whose next token depends only on its position (learned positions, blocks that add nothing):
    after a prompt of prompt_len tokens it replies with the ids `script`, and elsewhere emits `then`."""
    C = 1024  # one position per dimension; long enough for a reply that takes a while (to stop it)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=C, n_layer=1, n_head=4, n_embd=C, pos='learned',
                          tie_embeddings=False))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(C))  # the residual stream is one-hot(position)
        head = torch.zeros(tok.n_vocab, C)
        head[then] = 40.0
        for i, token in enumerate(script):  # position prompt_len - 1 + i predicts script[i]
            head[:, prompt_len - 1 + i] = 0.0
            head[token, prompt_len - 1 + i] = 40.0
        model.lm_head.weight.copy_(head / math.sqrt(C))  # the final RMSNorm makes one-hot(p) sqrt(C) * one-hot(p)
    return model.eval()


def start_server(out_dir, log_path, *args):
    """python serve.py on a free port; returns (process, base url) once it accepts connections."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={out_dir}', '--port=0', '--device=cpu',
                                 '--log_interval=0', *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(log_path) as f:
            text = f.read()
        found = re.search(r"serving '.*' on (http://127\.0\.0\.1:\d+)/", text)
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"serve.py did not start in 60 s:\n{text}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """(base url, model name, TextGenerator of the same model): a random tiny model, char tokenizer."""
    path = tmp_path_factory.mktemp('serve-random')
    tok = char_tokenizer(TEXT)
    model = random_model(tok)
    save(str(path), model, tok)
    proc, url = start_server(str(path), str(path / 'log.txt'), f'--max_batch={MAX_BATCH}')
    yield url, path.name, TextGenerator(model, tok)
    stop_server(proc)


@pytest.fixture(scope='module')
def script_server(tmp_path_factory):
    """A model that answers the chat message 'hi' with SCRIPT (a byte-level BPE: 'é' is two tokens) and
    anything else with 'a' until max_tokens: (base url, model name, reply)."""
    path = tmp_path_factory.mktemp('serve-script')
    tok = train_bpe(['abc <b>bold</b> ' * 50], 300)  # no merge involves é: its two bytes are two tokens
    reply = '<b>bold</b> & <i>café</i>'
    script = tok.encode(reply) + [tok.im_end_id]
    assert len(tok.encode('é')) == 2
    prompt_len = len(tok.render_prompt([{'role': 'user', 'content': 'hi'}]))
    save(str(path), script_model(tok, prompt_len, script, tok.encode('a')[0]), tok)
    proc, url = start_server(str(path), str(path / 'log.txt'), '--max_batch=4')
    yield url, path.name, reply
    stop_server(proc)


def client(url):
    return openai.OpenAI(base_url=url + '/v1', api_key='x', max_retries=0, timeout=60)


def health(url):
    return httpx.get(url + '/health').json()


def wait_idle(url, timeout=10):
    """The server's counters once nothing runs or waits (a cancelled request is freed at the next step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = health(url)
        if not stats['running'] and not stats['waiting']:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the server is still busy after {timeout} s: {stats}")


def stop_reason(gen, prompt, **options):
    """'stop' or 'length', and the token count, for what TextGenerator generates."""
    out = gen.generate_ids([prompt], **options)
    return ('stop' if bool(out.stopped[0]) else 'length'), len(out.rows()[0])


# ----------------------------------------------------------------------------- the API, against TextGenerator

def test_models_lists_the_served_model(server):
    url, name, _ = server
    models = client(url).models.list().data
    assert [m.id for m in models] == [name]


@pytest.mark.parametrize('stream', [False, True])
def test_greedy_completion_equals_text_generator_with_usage_and_finish_reason(server, stream):
    url, name, gen = server
    reasons = set()
    for prompt in ['the', 'the lazy', 'quick brown', 'E']:  # two end on a stop token, two at max_tokens
        expected = gen.generate(prompt, temperature=0, max_new_tokens=24)
        reason, n_tokens = stop_reason(gen, prompt, temperature=0, max_new_tokens=24)
        reasons.add(reason)
        if stream:
            chunks = list(client(url).completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0,
                                                         stream=True, stream_options={'include_usage': True}))
            text = ''.join(c.choices[0].text for c in chunks if c.choices)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
            usage = chunks[-1].usage
        else:
            out = client(url).completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
            text, usage = out.choices[0].text, out.usage
            assert out.choices[0].finish_reason == reason and out.object == 'text_completion'
        assert text == expected, prompt
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(gen.encode(prompt)), n_tokens)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reasons == {'stop', 'length'}  # both kinds of ending were checked


@pytest.mark.parametrize('stream', [False, True])
def test_greedy_chat_equals_text_generator_chat(server, stream):
    url, name, gen = server
    messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'the quick fox'},
                {'role': 'assistant', 'content': 'jumps'}, {'role': 'user', 'content': 'over the lazy dog?'}]
    expected = gen.chat(messages, temperature=0, max_new_tokens=40)
    prompt = gen.tokenizer.render_prompt(messages)
    reason, n_tokens = stop_reason(gen, prompt, temperature=0, max_new_tokens=40)
    if stream:
        chunks = list(client(url).chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0,
                                                          stream=True, stream_options={'include_usage': True}))
        assert chunks[0].choices[0].delta.role == 'assistant'
        text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        out = client(url).chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0)
        text, finish, usage = out.choices[0].message.content, out.choices[0].finish_reason, out.usage
        assert out.object == 'chat.completion' and out.choices[0].message.role == 'assistant'
    assert text == expected and finish == reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), n_tokens)


@pytest.mark.parametrize('stream', [False, True])
def test_stop_strings_end_the_text_where_they_begin(server, stream):
    url, name, gen = server
    prompt = 'jumps over the '
    full = gen.generate(prompt, temperature=0, max_new_tokens=30, stop_token_ids=())
    assert len(full) > 12
    for stop in (full[5:8], [full[9:11], full[4:7]], 'never in it'):
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        expected = gen.generate(prompt, temperature=0, max_new_tokens=30, stop_token_ids=(), stop_strings=stops)
        out = client(url).completions.create(model=name, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                             stream=stream, extra_body={'ignore_eos': True})
        chunks = list(out) if stream else [out]
        text = ''.join(c.choices[0].text for c in chunks)
        assert text == expected
        assert chunks[-1].choices[0].finish_reason == ('length' if stop == 'never in it' else 'stop')
    assert expected == full  # the stop that never comes changes nothing


def test_a_list_of_prompts_gets_n_choices_each_in_order(server):
    url, name, gen = server
    prompts = ['the', 'fox ', 'lazy dog']
    out = client(url).completions.create(model=name, prompt=prompts, n=2, max_tokens=12, temperature=0)
    expected = [gen.generate(p, temperature=0, max_new_tokens=12) for p in prompts for _ in range(2)]
    assert [c.index for c in out.choices] == list(range(6)) and [c.text for c in out.choices] == expected
    assert out.usage.prompt_tokens == sum(len(gen.encode(p)) for p in prompts)  # each prompt once, not n times
    ids = client(url).completions.create(model=name, prompt=[gen.encode('the')], max_tokens=12, temperature=0)
    assert ids.choices[0].text == expected[0]  # token ids as the prompt


def test_n_choices_with_a_seed_are_what_text_generator_samples_with_that_seed(server):
    url, name, gen = server
    prompt, options = 'the lazy', dict(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9)
    for seed in (0, 7):
        expected = gen.generate([prompt] * 3, seed=seed, **options)
        out = client(url).completions.create(model=name, prompt=prompt, n=3, seed=seed, max_tokens=20,
                                             temperature=1.0, top_p=0.9, extra_body={'top_k': 20})
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == expected
        rows = gen.generate_ids([prompt] * 3, seed=seed, **options).rows()
        assert out.usage.completion_tokens == sum(len(r) for r in rows)
    assert len(set(expected)) > 1  # the choices differ
    # streamed, the same seed samples the same; each choice's text comes under its own index
    chunks = client(url).completions.create(model=name, prompt=prompt, n=3, seed=7, max_tokens=20, temperature=1.0,
                                            top_p=0.9, extra_body={'top_k': 20}, stream=True)
    texts = [''] * 3
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == expected


def test_chat_n_choices_stream_and_a_seeded_reply_repeats(server):
    url, name, _ = server
    ask = dict(model=name, messages=[{'role': 'user', 'content': 'fox?'}], max_tokens=16, temperature=1.2, seed=3)
    first = client(url).chat.completions.create(n=2, **ask)
    again = client(url).chat.completions.create(n=2, **ask)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    streamed = [''] * 2
    for c in client(url).chat.completions.create(n=2, stream=True, **ask):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ''
    assert streamed == [c.message.content for c in first.choices]


# ----------------------------------------------------------------------------- batching

def test_concurrent_clients_are_batched_and_get_the_greedy_answers_they_get_alone(server):
    url, name, gen = server
    expected = [gen.generate(p, temperature=0, max_new_tokens=150, stop_token_ids=()) for p in PROMPTS]
    results, errors, start = [None] * len(PROMPTS), [], threading.Barrier(len(PROMPTS))

    def ask(i):
        try:
            start.wait()
            kwargs = dict(model=name, prompt=PROMPTS[i], max_tokens=150, temperature=0, extra_body={'ignore_eos': True})
            if i % 2:  # half of them streamed
                results[i] = ''.join(c.choices[0].text for c in client(url).completions.create(stream=True, **kwargs))
            else:
                results[i] = client(url).completions.create(**kwargs).choices[0].text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == expected
    stats = health(url)
    assert stats['max_batch_seen'] >= MAX_BATCH // 2, stats  # they ran together, not one after another
    assert stats['running'] == 0 and stats['errors'] == 0


def test_a_request_joins_a_running_batch_at_the_next_step(server):
    url, name, gen = server
    body = {'model': name, 'prompt': 'the', 'max_tokens': CONTEXT - 10, 'temperature': 0, 'ignore_eos': True,
            'stream': True}
    with httpx.stream('POST', url + '/v1/completions', json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith('data: '))  # the long request is decoding
        t0 = time.perf_counter()
        short = client(url).completions.create(model=name, prompt='fox ', max_tokens=5, temperature=0)
        waited = time.perf_counter() - t0
        assert health(url)['running'] == 1  # answered while the long one still runs: not queued behind it
    assert short.choices[0].text == gen.generate('fox ', temperature=0, max_new_tokens=5)
    assert waited < 5
    wait_idle(url)  # the long one, abandoned, is freed


def test_a_client_that_disconnects_frees_its_slot(server):
    url, name, _ = server
    before = wait_idle(url)
    body = {'model': name, 'prompt': 'the', 'max_tokens': CONTEXT - 10, 'temperature': 0, 'ignore_eos': True,
            'stream': True}
    with httpx.stream('POST', url + '/v1/completions', json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith('data: ') and json.loads(line[6:])['choices'][0]['text']:
                break  # one piece of text arrived: hang up
    # a non-streamed request whose client gives up waiting
    body['stream'] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + '/v1/completions', json=body, timeout=0.3)
    deadline = time.time() + 10
    while time.time() < deadline and health(url)['cancelled'] < before['cancelled'] + 2:
        time.sleep(0.02)
    after = wait_idle(url)
    assert after['cancelled'] == before['cancelled'] + 2, after
    assert after['tokens'] - before['tokens'] < 2 * (CONTEXT - 10)  # both stopped early
    assert client(url).completions.create(model=name, prompt='the', max_tokens=3).choices[0].text is not None


# ----------------------------------------------------------------------------- bad requests

LONG = 'the quick brown fox ' * 60  # 1200 characters: more than the 1024-token context
BAD = [  # (endpoint, body, status, param)
    ('completions', b'{"prompt": "the", ', 400, None),
    ('completions', b'\xff\xfe not utf-8', 400, None),
    ('completions', [1, 2], 400, None),
    ('completions', b'[' * 100000, 400, None),
    ('completions', {'prompt': 'the', 'model': 'gpt-4'}, 404, 'model'),
    ('completions', {'prompt': 'the', 'model': 7}, 400, 'model'),
    ('completions', {}, 400, 'prompt'),
    ('completions', {'prompt': {'text': 'the'}}, 400, 'prompt'),
    ('completions', {'prompt': [10 ** 6]}, 400, 'prompt'),
    ('completions', {'prompt': 'unknown characters: €'}, 400, 'prompt'),
    ('completions', {'prompt': LONG}, 400, 'prompt'),
    ('completions', {'prompt': 'the', 'max_tokens': CONTEXT}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'max_tokens': 0}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'max_tokens': -3}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'max_tokens': '12'}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'max_tokens': True}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'n': 0}, 400, 'n'),
    ('completions', {'prompt': 'the', 'n': MAX_BATCH + 1}, 400, 'n'),
    ('completions', {'prompt': ['the', 'fox'], 'n': MAX_BATCH}, 400, 'n'),
    ('completions', {'prompt': 'the', 'temperature': 'hot'}, 400, 'temperature'),
    ('completions', {'prompt': 'the', 'temperature': -0.5}, 400, 'temperature'),
    ('completions', {'prompt': 'the', 'temperature': 3}, 400, 'temperature'),
    ('completions', b'{"prompt": "the", "temperature": 1e400}', 400, 'temperature'),
    ('completions', {'prompt': 'the', 'temperature': 10 ** 400}, 400, 'temperature'),
    ('completions', {'prompt': 'the', 'max_tokens': 10 ** 30}, 400, 'max_tokens'),
    ('completions', {'prompt': 'the', 'top_p': 0}, 400, 'top_p'),
    ('completions', {'prompt': 'the', 'top_p': 1.5}, 400, 'top_p'),
    ('completions', {'prompt': 'the', 'top_k': 'all'}, 400, 'top_k'),
    ('completions', {'prompt': 'the', 'stop': 5}, 400, 'stop'),
    ('completions', {'prompt': 'the', 'seed': 'lucky'}, 400, 'seed'),
    ('completions', {'prompt': 'the', 'stream': 'yes'}, 400, 'stream'),
    ('completions', {'prompt': 'the', 'logprobs': 5}, 400, 'logprobs'),
    ('chat/completions', {}, 400, 'messages'),
    ('chat/completions', {'messages': 'hi'}, 400, 'messages'),
    ('chat/completions', {'messages': []}, 400, 'messages'),
    ('chat/completions', {'messages': ['hi']}, 400, 'messages[0]'),
    ('chat/completions', {'messages': [{'role': 'robot', 'content': 'hi'}]}, 400, 'messages[0].role'),
    ('chat/completions', {'messages': [{'role': 'user', 'content': 5}]}, 400, 'messages[0].content'),
    ('chat/completions', {'messages': [{'role': 'user', 'content': LONG}]}, 400, 'messages'),
    ('chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 0}, 400, 'max_tokens'),
    ('chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}], 'top_p': -1}, 400, 'top_p'),
    ('chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}], 'model': 'nope'}, 404, 'model'),
]


def test_bad_requests_get_openai_errors_naming_the_field_and_the_server_lives_on(server):
    url, name, _ = server
    for endpoint, body, status, param in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f'{url}/v1/{endpoint}', content=content, headers={'Content-Type': 'application/json'})
        assert r.status_code == status, (endpoint, body, r.text)
        error = r.json()['error']
        assert set(error) == {'message', 'type', 'param', 'code'} and error['message'], error
        assert error['param'] == param, (body, error)
        if param is not None and '[' not in param:
            assert param in error['message'], error
    # the same through the openai client: its exceptions carry the fields
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model=name, prompt='the', temperature=5)
    assert e.value.param == 'temperature' and e.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model='gpt-4', messages=[{'role': 'user', 'content': 'hi'}])
    assert e.value.param == 'model' and e.value.code == 'model_not_found'
    assert httpx.get(url + '/v1/nothing').status_code == 404
    assert httpx.get(url + '/v1/completions').status_code == 405
    assert health(url)['status'] == 'ok'
    assert client(url).completions.create(model=name, prompt='the', max_tokens=2).choices[0].finish_reason


# ----------------------------------------------------------------------------- text and the page

def test_a_character_split_over_tokens_streams_whole(script_server):
    url, name, reply = script_server
    pieces = [c.choices[0].delta.content for c in client(url).chat.completions.create(
        model=name, messages=[{'role': 'user', 'content': 'hi'}], temperature=0, stream=True) if c.choices]
    pieces = [p for p in pieces if p]
    assert ''.join(pieces) == reply and '\ufffd' not in ''.join(pieces)
    assert 'é' in pieces or any(p.endswith('é') for p in pieces)  # shown whole, never one byte at a time


def test_chat_page_streams_a_reply_as_text_and_stop_frees_the_slot(script_server, tmp_path):
    url, _, reply = script_server
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium (and pip install playwright; "
                    "no `playwright install` needed)")
    sync_api = pytest.importorskip('playwright.sync_api',
                                   reason="pip install playwright (the browser is Debian's chromium)")
    page_html = httpx.get(url + '/').text
    assert '<script src=' not in page_html and 'http://' not in page_html and 'https://' not in page_html  # offline
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={'width': 900, 'height': 600})
            page.goto(url + '/')
            page.fill('#input', 'hi')
            page.press('#input', 'Enter')
            page.wait_for_selector('.note', timeout=10000)  # the token count after the reply
            bubbles = page.locator('.msg.assistant')
            assert bubbles.count() == 1 and bubbles.first.text_content() == reply  # the tags are text...
            assert page.locator('#log b, #log i').count() == 0  # ...and never elements
            assert page.evaluate('conversation') == [{'role': 'user', 'content': 'hi'},
                                                     {'role': 'assistant', 'content': reply}]
            shot = tmp_path / 'chat.png'
            page.screenshot(path=str(shot))
            # a long reply (any other message gets 'a' until max_tokens), stopped
            page.fill('#max_tokens', '900')
            page.fill('#input', 'and more')
            page.press('#input', 'Enter')
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1]?.textContent.length > 0")
            page.click('#stop')
            page.wait_for_selector('text=(stopped)', timeout=10000)
            partial = page.locator('.msg.assistant').nth(1).text_content()
            assert 0 < len(partial) < 900 and set(partial) == {'a'}
            assert page.evaluate('conversation.length') == 4  # the history goes on, with the reply so far
        finally:
            browser.close()
    from PIL import Image
    colors = Image.open(shot).convert('RGB').getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20  # a rendered page, not a blank one
    assert wait_idle(url)['cancelled'] >= 1
