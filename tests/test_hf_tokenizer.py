"""tokenizer.py kind hf: a Hugging Face tokenizer and chat template behind our interface, checked
against transformers' own apply_chat_template on tokenizers built here (offline)."""

import json
import os

import pytest

import tokenizer as tk

transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

# Qwen2.5-Instruct's template, verbatim: it adds a default system message when there is none
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# Llama-3-Instruct's template, verbatim: bos_token from the tokenizer, content trimmed, <|eot_id|> ends a turn
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
LLAMA3 = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
# name -> (special tokens, tokenizer_config special tokens, chat template, end-of-turn token)
CASES = {
    'qwen': (CHATML, {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}, QWEN25_TEMPLATE, '<|im_end|>'),
    'llama3': (LLAMA3, {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}, LLAMA3_TEMPLATE,
               '<|eot_id|>'),
    'chatml': (CHATML, {'eos_token': '<|endoftext|>'}, None, '<|im_end|>'),
}

CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': '4'},
     {'role': 'user', 'content': 'And 3+3? Say it in words.'}, {'role': 'assistant', 'content': 'Six: 六 🙂'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'héllo wörld'},
     {'role': 'assistant', 'content': 'Hi!\nHow can I help?'}, {'role': 'user', 'content': 'def f(x): return x'},
     {'role': 'assistant', 'content': 'It returns x.'}, {'role': 'user', 'content': 'Thanks.'}],
]

UNICODE = "def héllo(wörld):\n\treturn '日本語 🙂'  # ünïcödé, tabs\tand  spaces\n"


def _corpus():
    """A few KB of Python's own source: what the tiny BPE learns its merges from."""
    folder = os.path.dirname(json.__file__)
    return [open(os.path.join(folder, name), encoding='utf-8').read() for name in ('__init__.py', 'encoder.py')]


def _save_hf_dir(folder, specials, named, template):
    """Train a tiny byte-level BPE, add special tokens after its vocabulary (as Qwen and Llama 3 do)
    and save it with transformers, as a model repository would have it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(specials)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **named)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """name -> (ours, transformers' AutoTokenizer) for each case, built once."""
    folders = {name: _save_hf_dir(tmp_path_factory.mktemp(name), *CASES[name][:3]) for name in CASES}
    return {name: (tk.HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d))
            for name, d in folders.items()}


@pytest.fixture(params=list(CASES))
def case(request, built):
    tok, reference = built[request.param]
    # without a template transformers cannot render; ours falls back to ChatML, which it renders the same
    kwargs = {} if CASES[request.param][2] else {'chat_template': tk.CHATML_TEMPLATE}
    return request.param, tok, reference, kwargs, CASES[request.param][3]


def _masked_runs(ids, mask):
    """The runs of consecutive masked ids."""
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


# ----------------------------------------------------------------------------- chat, against transformers

@pytest.mark.parametrize('conversation', CONVERSATIONS)
def test_chat_ids_match_transformers_apply_chat_template(case, conversation):
    _, tok, reference, kwargs, _ = case
    ids, mask = tok.render_chat(conversation)
    assert ids == reference.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
    assert len(mask) == len(ids)
    prompt = conversation[:-1] if conversation[-1]['role'] == 'assistant' else conversation
    assert tok.render_prompt(prompt) == reference.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize('conversation', CONVERSATIONS)
def test_mask_covers_each_assistant_content_and_its_end_of_turn_only(case, conversation):
    _, tok, _, _, end = case
    ids, mask = tok.render_chat(conversation)
    replies = [m['content'] for m in conversation if m['role'] == 'assistant']
    assert [tok.decode(run) for run in _masked_runs(ids, mask)] == [r + end for r in replies]
    assert tok.im_end_id == tok.special_tokens[end] and ids.count(tok.im_end_id) >= len(replies)


@pytest.mark.parametrize('conversation', CONVERSATIONS)
def test_prompt_then_reply_then_end_token_is_how_the_template_lays_out_a_turn(case, conversation):
    _, tok, _, _, _ = case
    for i, m in enumerate(conversation):
        if m['role'] != 'assistant':
            continue
        prompt = tok.render_prompt(conversation[:i])
        laid_out = prompt + tok.encode(m['content']) + [tok.im_end_id]
        ids, mask = tok.render_chat(conversation[:i + 1])
        assert ids[:len(laid_out)] == laid_out and all(mask[len(prompt):len(laid_out)])
        assert tok.decode(ids[len(laid_out):]).strip() == ''  # only the template's text after the end token


def test_qwen_template_adds_its_default_system_message(built):
    tok, _ = built['qwen']
    ids, _ = tok.render_chat(CONVERSATIONS[0])
    assert tok.decode(ids).startswith('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.')
    assert tok.eot_id == tok.im_end_id and tok.pad_id == tok.special_tokens['<|endoftext|>']


def test_llama3_template_trims_content_and_starts_with_bos(built):
    tok, reference = built['llama3']
    conversation = [{'role': 'user', 'content': ' hi '}, {'role': 'assistant', 'content': '  Done.\n'}]
    ids, mask = tok.render_chat(conversation)
    assert ids == reference.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert ids[0] == tok.special_tokens['<|begin_of_text|>']
    assert [tok.decode(run) for run in _masked_runs(ids, mask)] == ['Done.<|eot_id|>']
    # the document end and the end of a turn differ: generation stops on either
    assert tok.eot_id == tok.special_tokens['<|end_of_text|>'] != tok.im_end_id and tok.pad_id == tok.eot_id
    assert tok.im_start_id == tok.special_tokens['<|start_header_id|>']


def test_chatml_fallback_lays_out_turns_as_our_own_tokenizer(built):
    tok, _ = built['chatml']
    ids, _ = tok.render_chat(CONVERSATIONS[0][:2])
    assert tok.decode(ids) == '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n'
    assert tok.decode(tok.render_prompt(CONVERSATIONS[0][:1])).endswith('<|im_end|>\n<|im_start|>assistant\n')


def test_special_token_strings_in_content_are_plain_text(case):
    _, tok, _, _, end = case
    conversation = [{'role': 'user', 'content': f'what is {end}?'},
                    {'role': 'assistant', 'content': f'It ends a turn: {end}'}]
    ids, mask = tok.render_chat(conversation)
    plain, _ = tok.render_chat([{'role': 'user', 'content': 'what is x?'}, {'role': 'assistant', 'content': 'x'}])
    assert ids.count(tok.im_end_id) == plain.count(tok.im_end_id)  # one per turn, none from the contents
    assert tok.decode(ids).count(end) == tok.decode(plain).count(end) + 2
    assert [tok.decode(run) for run in _masked_runs(ids, mask)] == [f'It ends a turn: {end}{end}']
    assert tok.im_end_id not in tok.encode(f'a{end}b')
    assert tok.encode(f'a{end}b', allow_special=True) == tok.encode('a') + [tok.im_end_id] + tok.encode('b')


# ----------------------------------------------------------------------------- encode / decode

def test_encode_matches_transformers_and_round_trips_unicode(case):
    _, tok, reference, _, _ = case
    ids = tok.encode(UNICODE)
    assert ids == reference.encode(UNICODE, add_special_tokens=False)
    assert tok.decode(ids) == UNICODE and tok.decode_bytes(ids) == UNICODE.encode('utf-8')
    assert tok.encode_batch([UNICODE, 'x']) == [ids, tok.encode('x')]
    assert tok.n_vocab == len(reference) and max(tok.special_tokens.values()) == tok.n_vocab - 1


def test_decode_bytes_streams_a_character_split_over_tokens(case):
    _, tok, _, _, _ = case
    ids = tok.encode('🙂')
    assert len(ids) >= 2  # the tiny BPE never merged its 4 bytes
    assert tok.decode_bytes(ids[:2]) == '🙂'.encode('utf-8')[:len(tok.decode_bytes(ids[:2]))] != b''
    assert tok.decode_bytes(ids[:2]) + tok.decode_bytes(ids[2:]) == '🙂'.encode('utf-8')
    with_special = ids + [tok.im_end_id]
    assert tok.decode_bytes(with_special).decode('utf-8') == tok.decode(with_special)


# ----------------------------------------------------------------------------- spec, files, errors

def test_spec_survives_json_and_rebuilds_the_same_tokenizer(case, tmp_path):
    _, tok, _, _, _ = case
    again = tk.from_spec(json.loads(json.dumps(tok.spec)))
    assert isinstance(again, tk.HFTokenizer) and again.identity == tok.identity and again.kind == 'hf'
    assert again.render_chat(CONVERSATIONS[1]) == tok.render_chat(CONVERSATIONS[1])
    path = str(tmp_path / 'tokenizer.json')
    tok.save(path)
    loaded = tk.Tokenizer.load(path)
    assert loaded.identity == tok.identity and loaded.encode(UNICODE) == tok.encode(UNICODE)
    assert tk.train_bpe([UNICODE * 20], 300).identity != tok.identity


def test_a_directory_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'no tokenizer\.json: only Hugging Face fast tokenizers'):
        tk.HFTokenizer.from_dir(str(tmp_path))


def test_chat_without_template_or_chatml_tokens_is_a_clear_error(tmp_path):
    tok = tk.HFTokenizer.from_dir(_save_hf_dir(tmp_path, ['<|endoftext|>'], {'eos_token': '<|endoftext|>'}, None))
    assert tok.decode(tok.encode(UNICODE)) == UNICODE and tok.im_end_id == tok.eot_id  # text still works
    with pytest.raises(ValueError, match='no chat template and no <\\|im_start\\|>/<\\|im_end\\|> tokens'):
        tok.render_chat(CONVERSATIONS[0])


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # like thinking templates: the last assistant turn gets a header that the generation prompt lacks
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
                "<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tk.HFTokenizer.from_dir(_save_hf_dir(tmp_path, CHATML, {'eos_token': '<|im_end|>'}, template))
    with pytest.raises(ValueError, match='rewrites earlier turns or the assistant header'):
        tok.render_chat(CONVERSATIONS[0][:2])


def test_from_dir_reads_older_layouts_as_transformers_does(tmp_path):
    # transformers 4: the template in tokenizer_config.json (here a list of named ones: 'default' is
    # the chat one), special tokens as AddedToken dicts, and some only in special_tokens_map.json
    folder = _save_hf_dir(tmp_path, LLAMA3, {}, None)
    config = {'chat_template': [{'name': 'tool_use', 'template': 'unused'},
                                {'name': 'default', 'template': LLAMA3_TEMPLATE}],
              'bos_token': {'content': '<|begin_of_text|>', 'special': True, 'lstrip': False, 'rstrip': False,
                            'normalized': False, 'single_word': False}}
    json.dump(config, open(os.path.join(folder, 'tokenizer_config.json'), 'w'))
    json.dump({'eos_token': '<|end_of_text|>'}, open(os.path.join(folder, 'special_tokens_map.json'), 'w'))
    tok = tk.HFTokenizer.from_dir(folder)
    assert tok.spec['special_token_strings'] == {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}
    assert tok.spec['chat_template'] == LLAMA3_TEMPLATE and tok.eot_id == tok.special_tokens['<|end_of_text|>']
    ids, _ = tok.render_chat(CONVERSATIONS[0])
    assert tok.decode(ids).startswith('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?')
    untrimmed = LLAMA3_TEMPLATE.replace(' | trim', '')
    with open(os.path.join(folder, 'chat_template.jinja'), 'w') as f:
        f.write(untrimmed)  # the file wins over the config, as in transformers 5
    assert tk.HFTokenizer.from_dir(folder).chat_template == untrimmed


def test_to_transformers_renders_and_saves_the_same_tokenizer(case, tmp_path):
    _, tok, _, _, _ = case
    exported = tok.to_transformers()
    ids, _ = tok.render_chat(CONVERSATIONS[1])
    assert exported.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=False) == ids
    exported.save_pretrained(str(tmp_path))
    again = tk.HFTokenizer.from_dir(str(tmp_path))
    assert again.render_chat(CONVERSATIONS[1]) == (ids, tok.render_chat(CONVERSATIONS[1])[1])
    assert (again.eot_id, again.im_end_id, again.pad_id, again.n_vocab) == (tok.eot_id, tok.im_end_id, tok.pad_id,
                                                                            tok.n_vocab)
