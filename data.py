"""
User records, the one place every stage reads them from: chat, preference and RL-prompt files
(JSONL, one record a line, optionally .gz/.zst), read as users already have them and normalised to
plain Python structures:

    load_sft(paths)      -> [messages, ...]                       messages = [{'role', 'content'}, ...]
    load_pref(path)      -> [{'prompt_messages', 'chosen', 'rejected'}, ...]    chosen/rejected: str
    load_unpaired(path)  -> [{'prompt_messages', 'completion', 'label'}, ...]   (KTO)
    load_rl(path)        -> [{'messages', 'answer'}, ...]         messages end with a user turn;
                                                                  answer: str or None

A bad line raises DataError naming the file, the line and the field; skip_bad_lines=True skips
such lines and says how many. An empty file, or one with no good line, is always an error.

The pretraining corpus pipeline (sources, cleaning, deduplication, mixing, tokenising, token
shards) is corpus.py; the verifiable rewards are in tasks.py, beside the task suite's scoring.
"""

import gzip
import io
import json
import os
import random
import re
import zlib

ROLES = ('system', 'user', 'assistant')


class _Names(dict):
    """A dict whose get() gives the default for a key that cannot be a name (a list or an object
    from the JSON): a bad role then becomes a bad-field error, not "TypeError: unhashable type"."""

    def get(self, key, default=None):
        return super().get(key, default) if isinstance(key, str) else default


SHAREGPT_ROLES = _Names({'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                         'system': 'system'})


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names file, line and field."""


class BadField(Exception):
    """A parser's complaint about one field; read_jsonl turns it into a DataError with file and line."""

    def __init__(self, field, problem):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


# ----------------------------------------------------------------------------- reading JSONL

_LINES = re.compile(r'[^\n]*\n|[^\n]+\Z')  # lines split at \n only (str.splitlines also splits at \x0c, U+2028, ...)


COMPRESSION = {'.gz': 'gzip', '.zst': 'zstd', '.zstd': 'zstd'}  # a file name ending -> how it is compressed


def split_compression(path):
    """'web.jsonl.gz' -> ('web.jsonl', 'gzip'); a name without a compression ending -> (path, None)."""
    for ending, kind in COMPRESSION.items():
        if path.endswith(ending):
            return path[:-len(ending)], kind
    return path, None


def open_binary(path):
    """path opened for reading bytes, decompressed when its name ends in .gz (Python's gzip) or
    .zst/.zstd (Zstandard, through pyarrow, which parquet sources need anyway: no other package).
    Concatenated gzip members and zstd frames read as one stream, as the command-line tools do."""
    kind = split_compression(path)[1]
    if kind == 'gzip':  # a large buffer: GzipFile's own readline is ~1.6x slower
        return io.BufferedReader(gzip.GzipFile(path, 'rb'), 1 << 20)
    if kind == 'zstd':
        try:
            import pyarrow as pa
        except ImportError:
            raise SystemExit(f"{path} is Zstandard-compressed: reading it needs pyarrow "
                             f"(pip install pyarrow)") from None
        return io.BufferedReader(pa.input_stream(path, compression='zstd'), 1 << 20)
    return open(path, 'rb')


def read_lines(path):
    """Yield (line_number, line or None, error text or None) for each line of a text file (.gz and
    .zst files decompressed, see open_binary), decoded line by line: a byte that is not UTF-8 spoils
    its own line only. (A decoding file object raises mid-file instead, and what its 8 KB buffer
    held is gone with the rest of the file.) Newlines come as open() gives them: \r\n and a lone
    \r become \n. A compressed file that is corrupt or cut short raises DataError where that shows."""
    lineno = 0
    with open_binary(path) as f:
        try:
            for lineno, line, error in decode_lines(f, path, lineno):
                yield lineno, line, error
        except (EOFError, OSError, zlib.error) as e:  # gzip: EOFError (cut short), BadGzipFile; pyarrow: OSError
            decompress_error(path, e, lineno)
            raise  # a plain file that fails mid-read: iter_documents names it


def decode_lines(raw_lines, path, lineno):
    """(line number, line or None, error or None) for each line of an iterable of raw lines."""
    for raw in raw_lines:
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            lineno += 1
            yield lineno, None, (f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}: {e.reason}); re-save the file as UTF-8")
            continue
        lines = [text]
        if '\r' in text:  # old Mac files end lines with a lone \r: split there too, as open() does
            lines = _LINES.findall(text.replace('\r\n', '\n').replace('\r', '\n'))
        for line in lines:
            lineno += 1
            yield lineno, line, None


def decompress_error(path, error, lineno):
    """Raise DataError for a compressed file that fails to decompress; return for a plain file."""
    kind = split_compression(path)[1]
    if kind is not None:
        raise DataError(f"{path}: cannot decompress it as {kind} after line {lineno:,} ({error}): the file is corrupt "
                        f"or cut short (an interrupted download?); fetch or compress it again") from None


def scan_jsonl(path, parse):
    """Yield (line_number, parsed record or None, error text or None) for each non-blank line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    for lineno, line, error in read_lines(path):
        if error is not None:  # bytes that are not UTF-8: a bad line like any other
            yield lineno, None, error
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise BadField('(record)', f"expected a JSON object {{...}}, got {type(obj).__name__}")
            yield lineno, parse(obj), None
        except json.JSONDecodeError as e:
            yield lineno, None, f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
        except BadField as e:
            yield lineno, None, f"{path}:{lineno}: field {e.field!r}: {e.problem}"


def read_jsonl(path, parse, skip_bad_lines=False, what='record'):
    """All parsed records of a JSONL file. The first bad line raises DataError, unless
    skip_bad_lines, which skips bad lines and prints how many. No good line at all is an error."""
    records, bad = [], []
    for _, record, error in scan_jsonl(path, parse):
        if error is None:
            records.append(record)
        elif skip_bad_lines:
            bad.append(error)
        else:
            raise DataError(error + " (fix the line, or pass skip_bad_lines=True to skip bad lines)")
    if bad:
        print(f"{path}: skipped {len(bad)} bad line(s) of {len(records) + len(bad)}; first: {bad[0]}")
    if not records:
        raise DataError(f"{path}: no usable {what}" + (f" ({len(bad)} bad lines, first: {bad[0]})" if bad else
                                                      " (the file is empty)"))
    return records


# ----------------------------------------------------------------------------- record formats

def parse_messages(value, field):
    """[{'role', 'content'}] (OpenAI/HF/MiniMind) or [{'from', 'value'}] (ShareGPT) -> messages.
    A system message may only come first; user and assistant content must be non-empty strings."""
    if not isinstance(value, list) or not value:
        raise BadField(field, "expected a non-empty list of {\"role\": ..., \"content\": ...} messages")
    messages = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise BadField(where, f"expected a {{\"role\", \"content\"}} object, got {type(m).__name__}")
        if 'role' not in m and 'from' in m:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(m['from'], m['from']), m.get('value')
        else:
            role, content = m.get('role'), m.get('content')
        if role not in ROLES:
            raise BadField(where + '.role', f"{role!r} is not a role (expected system, user or assistant)")
        if not isinstance(content, str):
            raise BadField(where + '.content', f"expected a string, got {type(content).__name__}")
        if role == 'system' and i > 0:
            raise BadField(where + '.role', "a system message may only come first")
        if role != 'system' and not content.strip():
            raise BadField(where + '.content', f"empty {role} message")
        messages.append({'role': role, 'content': content})
    return messages


def _with_system(obj, messages):
    """A top-level "system" string becomes the first message (when there is none already)."""
    system = obj.get('system')
    if system is None or (messages and messages[0]['role'] == 'system'):
        return messages
    if not isinstance(system, str):
        raise BadField('system', f"expected a string, got {type(system).__name__}")
    return [{'role': 'system', 'content': system}] + messages


def parse_sft(obj):
    """{"messages": [...]} (OpenAI/HF) or {"conversations": [...]} (MiniMind, ShareGPT), with an
    optional leading system message or top-level "system" -> messages."""
    key = 'messages' if 'messages' in obj else 'conversations' if 'conversations' in obj else None
    if key is None:
        raise BadField('messages', "missing: an SFT record needs \"messages\" (OpenAI/HF) or \"conversations\" "
                                    "(MiniMind), a list of {\"role\", \"content\"}")
    messages = _with_system(obj, parse_messages(obj[key], key))
    if not any(m['role'] == 'assistant' for m in messages):
        raise BadField(key, "no assistant message: nothing to train on")
    return messages


def parse_hh(text, field):
    """Anthropic HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    parts = re.split(r'\n\n?(Human|Assistant): ', '\n\n' + text.lstrip('\n'))
    if len(parts) < 3 or parts[0].strip():
        raise BadField(field, "expected a string of \"\\n\\nHuman: ...\\n\\nAssistant: ...\" turns, "
                               "or give \"prompt\" alongside \"chosen\" and \"rejected\"")
    roles = {'Human': 'user', 'Assistant': 'assistant'}
    return [{'role': roles[r], 'content': c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _reply(value, field):
    """A preference answer: a string, or a list of messages whose last is the assistant's."""
    if isinstance(value, str):
        if not value.strip():
            raise BadField(field, "empty answer")
        return value
    messages = parse_messages(value, field)
    if messages[-1]['role'] != 'assistant':
        raise BadField(field, "the last message must be the assistant's answer")
    return messages[-1]['content']


def _prompt_messages(prompt):
    """A "prompt" field: a string (one user turn) or messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadField('prompt', "empty prompt")
        return [{'role': 'user', 'content': prompt}]
    return parse_messages(prompt, 'prompt')


def parse_pref(obj):
    """Preference pair -> {'prompt_messages': [...], 'chosen': str, 'rejected': str}. Accepts
    {"chosen": [messages], "rejected": [messages]} (MiniMind; same prompt, different last answer),
    {"prompt", "chosen", "rejected"} with strings or messages (TRL), and HH transcripts."""
    for key in ('chosen', 'rejected'):
        if key not in obj:
            raise BadField(key, "missing: a preference record needs \"chosen\" and \"rejected\"")
    if 'prompt' in obj:
        pair = {'prompt_messages': _with_system(obj, _prompt_messages(obj['prompt'])),
                'chosen': _reply(obj['chosen'], 'chosen'), 'rejected': _reply(obj['rejected'], 'rejected')}
    else:
        convs = {}
        for key in ('chosen', 'rejected'):
            value = obj[key]
            convs[key] = parse_hh(value, key) if isinstance(value, str) else parse_messages(value, key)
            if convs[key][-1]['role'] != 'assistant':
                raise BadField(key, "the last message must be the assistant's answer")
        if convs['chosen'][:-1] != convs['rejected'][:-1]:
            raise BadField('rejected', "its prompt (all messages but the last) differs from chosen's")
        pair = {'prompt_messages': _with_system(obj, convs['chosen'][:-1]),
                'chosen': convs['chosen'][-1]['content'], 'rejected': convs['rejected'][-1]['content']}
    if not any(m['role'] == 'user' for m in pair['prompt_messages']):
        raise BadField('prompt', "no user message before the answers")
    return pair


def parse_unpaired(obj):
    """Unpaired feedback (TRL's KTO format) -> {'prompt_messages': [...], 'completion': str, 'label': bool}.
    {"prompt": str or messages, "completion": str or messages ending with the assistant's answer,
    "label": true (a desirable completion) or false (an undesirable one)}."""
    for key in ('prompt', 'completion', 'label'):
        if key not in obj:
            raise BadField(key, "missing: an unpaired record needs \"prompt\", \"completion\" and \"label\"")
    prompt_messages = _prompt_messages(obj['prompt'])
    if not any(m['role'] == 'user' for m in prompt_messages):
        raise BadField('prompt', "no user message before the completion")
    if not isinstance(obj['label'], bool):
        raise BadField('label', f"expected true (desirable) or false (undesirable), got {obj['label']!r}")
    return {'prompt_messages': _with_system(obj, prompt_messages), 'completion': _reply(obj['completion'], 'completion'),
            'label': obj['label']}


def parse_rl(obj):
    """RL prompt -> {'messages': [... ending with a user turn], 'answer': str or None, 'task': str or None}. Accepts
    {"prompt": str or messages} and {"messages"/"conversations": [...]}; a final assistant turn
    (MiniMind's RLAIF files carry a placeholder one) is dropped. "answer" (str or number, not
    empty) is what verifiable_reward checks against."""
    if 'prompt' in obj:
        prompt = obj['prompt']
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadField('prompt', "empty prompt")
            messages = [{'role': 'user', 'content': prompt}]
        else:
            messages = parse_messages(prompt, 'prompt')
        key = 'prompt'
    else:
        key = 'messages' if 'messages' in obj else 'conversations' if 'conversations' in obj else None
        if key is None:
            raise BadField('prompt', "missing: an RL record needs \"prompt\" (a string) or \"messages\"")
        value = obj[key]
        last = value[-1] if isinstance(value, list) and len(value) > 1 else None
        if isinstance(last, dict) and SHAREGPT_ROLES.get(last.get('role', last.get('from'))) == 'assistant':
            value = value[:-1]  # may be an empty placeholder: dropped before it is checked
        messages = parse_messages(value, key)
    messages = _with_system(obj, messages)
    if not messages or messages[-1]['role'] != 'user':
        raise BadField(key, "the prompt must end with a user message")
    answer = obj.get('answer')
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        raise BadField('answer', f"expected a string or a number, got {type(answer).__name__}")
    if isinstance(answer, str) and not answer.strip():  # '' is in every response: it would reward them all
        raise BadField('answer', "empty; leave \"answer\" out for a prompt with nothing to check")
    task = obj.get('task')  # optional: which task of a mixed file it is (ppo.py --rl_tasks picks by it)
    if task is not None and not isinstance(task, str):
        raise BadField('task', f"expected a string, got {type(task).__name__}")
    return {'messages': messages, 'answer': None if answer is None else str(answer), 'task': task}


# ----------------------------------------------------------------------------- loaders

def _as_weights(paths, weights):
    if isinstance(paths, dict):
        return [(p, float(w)) for p, w in paths.items()]
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(',') if p.strip()]
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"{len(paths)} files but {len(weights)} weights")
    return list(zip(paths, weights))


def load_sft(paths, weights=None, skip_bad_lines=False, seed=1337):
    """Conversations from one or several files -> [messages, ...].

    paths: a path, a comma-separated string, a list, or a dict {path: weight}. A file's weight
    multiplies its records: 2 = every record twice, 0.5 = a random half (seeded), 1.5 = all
    once plus a random half again. Order: file by file, records in file order."""
    rng = random.Random(seed)
    out = []
    for path, weight in _as_weights(paths, weights):
        if weight < 0:
            raise ValueError(f"{path}: weight {weight} must be >= 0")
        records = read_jsonl(path, parse_sft, skip_bad_lines, what='conversation')
        whole, frac = int(weight), weight - int(weight)
        out += records * whole
        out += [records[i] for i in sorted(rng.sample(range(len(records)), round(frac * len(records))))]
    return out


def load_pref(path, skip_bad_lines=False):
    """Preference pairs -> [{'prompt_messages': [...], 'chosen': str, 'rejected': str}, ...]."""
    return read_jsonl(path, parse_pref, skip_bad_lines, what='preference pair')


def load_unpaired(path, skip_bad_lines=False):
    """Unpaired feedback -> [{'prompt_messages': [...], 'completion': str, 'label': bool}, ...] (KTO)."""
    return read_jsonl(path, parse_unpaired, skip_bad_lines, what='unpaired example')


def load_rl(path, skip_bad_lines=False):
    """RL prompts -> [{'messages': [... user], 'answer': str or None}, ...]."""
    return read_jsonl(path, parse_rl, skip_bad_lines, what='prompt')


def prompts_of_tasks(prompts, names):
    """The RL prompts whose "task" is one of names (comma-separated; '' = all of them). A name no
    prompt carries is an error, so a typo never trains on less than was asked for."""
    if not names:
        return prompts
    wanted = [name.strip() for name in names.split(',') if name.strip()]
    found = sorted({str(p['task']) for p in prompts})
    missing = [name for name in wanted if name not in found]
    if missing:
        raise SystemExit(f"rl_tasks={names!r}: no prompt has the \"task\" {', '.join(map(repr, missing))} "
                         f"(the file's tasks: {', '.join(found)})")
    return [p for p in prompts if p['task'] in wanted]


def rl_prompts(path, names, tokenizer, max_new_tokens, max_len, skip_bad_lines=False):
    """The RL prompts of path whose task is one of names (prompts_of_tasks), each with 'ids', its
    chat prefix as the policy continues it, and only those whose prefix + max_new_tokens fit
    max_len. Returns (prompts, how many were too long)."""
    prompts = prompts_of_tasks(load_rl(path, skip_bad_lines=skip_bad_lines), names)
    for p in prompts:
        p['ids'] = tokenizer.render_prompt(p['messages'])
    fits = [p for p in prompts if len(p['ids']) + max_new_tokens <= max_len]
    return fits, len(prompts) - len(fits)


PARSERS = {'sft': parse_sft, 'pref': parse_pref, 'rl': parse_rl}


def validate_file(path, kind, tok=None):
    """Check a chat file without training: returns (counts dict, [every bad line's error]). With a
    tokenizer, a record it cannot encode (a char tokenizer lacks one of its characters) is a bad
    line too: training would stop on it."""
    if kind not in PARSERS:
        raise ValueError(f"unknown kind {kind!r}: use sft, pref or rl")
    counts, errors = {'records': 0, 'turns': 0, 'tokens': 0 if tok else None}, []
    if not os.path.isfile(path):
        return counts, [f"{path}: no such file"]

    def parse(obj):  # -> (record, its conversations as rendered, their tokens), in scan_jsonl's try
        record = PARSERS[kind](obj)
        if kind == 'sft':
            conversations = [record]
        elif kind == 'pref':
            p = record['prompt_messages']
            conversations = [p + [{'role': 'assistant', 'content': record[k]}] for k in ('chosen', 'rejected')]
        else:
            conversations = [record['messages']]
        return record, conversations, _chat_tokens(tok, conversations, obj) if tok is not None else None

    for _, parsed, error in scan_jsonl(path, parse):
        if error:
            errors.append(error)
            continue
        record, conversations, tokens = parsed
        counts['records'] += 1
        counts['turns'] += len(conversations[0])
        if kind == 'rl':
            counts['with_answer'] = counts.get('with_answer', 0) + (record['answer'] is not None)
        if tok is not None:
            counts['tokens'] += tokens
    if counts['records'] == 0 and not errors:
        errors.append(f"{path}: no records (the file is empty)")
    return counts, errors


_TEXT_FIELDS = ('system', 'messages', 'conversations', 'prompt', 'chosen', 'rejected', 'role', 'content', 'value')


def _chat_tokens(tok, conversations, obj):
    """Tokens of the rendered conversations. A character the tokenizer has no id for (kind char)
    is a bad field of the record as the user wrote it: the first text field that holds one."""
    try:
        return sum(len(tok.render_chat(c)[0]) for c in conversations)
    except ValueError as e:
        field = _field_with_unknown_char(obj, getattr(tok, 'stoi', {}), '')
        raise BadField(field or '(record)', f"{e}: the dataset's tokenizer cannot encode this record") from None


def _field_with_unknown_char(value, known, field):
    """The path ('messages[1].content') of the first string under the text fields of a JSON value
    that holds a character not in `known`, or None."""
    if isinstance(value, str):
        return field if any(c not in known for c in value) else None
    if isinstance(value, list):
        items = [(f"{field}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{field}.{k}" if field else k, v) for k, v in value.items() if k in _TEXT_FIELDS]
    else:
        return None
    return next((hit for sub, v in items if (hit := _field_with_unknown_char(v, known, sub))), None)
