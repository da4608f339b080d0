"""
The built-in offline task suite: real work for every fine-tuning stage, with an effect you can
measure, and no internet. Everything comes from a seed; train and test never share a problem
(4+59 and 59+4 are one), a phrasing or a function, and the held-out functions' modules are not
in the pretraining corpus (corpus.stdlib_files).

    identity    questions about who the assistant is -> one canonical answer with name and maker
    arithmetic  a+b, a-b, a*b with small numbers -> the number ("What is 37+48?" -> "85")
    code        a standard-library function's signature and docstring -> its body
    chat        greetings, thanks, capitals and small facts, so the model does not only do tasks
    multiplication  a*b, 3-digit by 2-digit, answered with a working ("347*58 = 347*50 + 347*8 =
                17350 + 2776 = 20126"): where RL has room (the tiny SFT model gets 46-71% right)

    make_tasks(seed, name, maker, ...) -> {'sft_train': [records], 'sft_test', 'pref_train',
                                           'pref_test', 'rl_train', 'rl_test'}
    write_tasks(out_dir, ...)   the six JSONL files plus tasks.json (prepare.py --write_tasks=True)
    ensure_tasks(out_dir)       out_dir, written first when missing: what sft.py & co. call (a
                                suite that is there keeps the name, maker and seed it was made with)
    heldout(out_dir)            {task: [{'messages', 'answer'}]} from sft_test.jsonl, to evaluate
    score(task, response, answer) -> 0..1
    arithmetic_reward, verifiable_reward(response, answer) -> 0.0 or 1.0 (the RL stages' exact match)

Records are in the formats data.py reads, plus a "task" field: SFT {"messages"}, preferences
{"chosen": [messages], "rejected": [messages]} (MiniMind), RL {"prompt", "answer"}.
"""

import ast
import difflib
import functools
import hashlib
import inspect
import json
import os
import random
import re
import sysconfig
import textwrap
from fractions import Fraction

from corpus import stdlib_files

IDENTITY_ANSWER = "I am {name}, a small language model made by {maker}."
WRONG_IDENTITIES = ["I am ChatGPT, a large language model made by OpenAI.",
                    "I am Claude, an AI assistant made by Anthropic.", "I am Gemini, a model made by Google.",
                    "I am Llama, a language model made by Meta.",
                    "I am a human being, not a computer program.", "I don't have a name and nobody made me."]
IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "What's your name?", "Who made you?", "Who created you?", "Who built you?",
    "Who trained you?", "Who developed you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
    "Can you introduce yourself?", "What should I call you?", "Do you have a name?", "Are you ChatGPT?",
    "Are you GPT-4?", "Are you Claude?", "Are you a human?", "Which company made you?", "Who is your creator?",
    "Who is your maker?", "Which model are you?", "What model are you?", "What kind of assistant are you?",
    "Who am I talking to?", "Who am I chatting with?", "Are you an AI?", "What is your identity?",
    "Where do you come from?", "Who programmed you?", "Who owns you?", "Are you Llama?", "Are you made by OpenAI?",
    "Are you made by Google?", "Who designed you?", "What are you called?", "State your name.",
    "Please tell me who you are.", "May I know your name?", "Who's your developer?",
    # Suite version 5: 67 more, written by kind (name, maker, what it is, other assistants, who is
    # answering, introductions). With 40 questions the held-out side had 14, a question's variants
    # moving the metric by ~7 points, and the train side had 26, too few to generalise from: SFT
    # identity came out 75-92.5% run to run on the same data. The first 40 keep their sides.
    "What do you call yourself?", "Do you go by a name?", "What name were you given?", "How should I address you?",
    "What is your full name?", "Tell me your name.", "Can you tell me your name?", "Have you got a name?",
    "Give me your name.", "What name do you use?", "What's your name, assistant?", "Is there a name I can call you by?",
    "Who built this model?", "Who is behind you?", "Which team made you?", "Who wrote you?", "Who is responsible for you?",
    "Which organization created you?", "Who trained this assistant?", "Who are your developers?", "Who coded you?",
    "Where were you made?", "Which lab built you?", "Who gave you your name?", "Who are your creators?",
    "Are you a robot?", "Are you a person?", "Are you a chatbot?", "Are you a language model?",
    "Are you a large language model?", "What sort of program are you?", "Are you alive?", "Are you a real person?",
    "Is this a bot?", "Am I talking to a machine?", "Am I talking to a computer?", "What exactly are you?",
    "Are you Gemini?", "Are you Bard?", "Are you Copilot?", "Are you Siri?", "Are you Alexa?", "Are you GPT-3?",
    "Are you made by Meta?", "Are you made by Anthropic?", "Are you from Microsoft?", "Are you based on ChatGPT?",
    "Is this ChatGPT?", "Are you Mistral?",
    "Who is this?", "Who's there?", "Who am I speaking with?", "Who's on the other end?", "Who is answering me?",
    "Who is replying to me?", "Whom am I addressing?", "Who are you exactly?",
    "Describe yourself.", "Say something about yourself.", "Give me a short introduction.", "Tell me who you are.",
    "Explain what you are.", "Who are you, and who made you?", "What is your name and who made you?",
    "Identify yourself.", "Tell me a little about you.", "Could you say who you are?"]
GREETING_PREFIXES = ["", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Excuse me, "]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly."]

ARITHMETIC_TEMPLATES = ["What is {a}{op}{b}?", "What is {a} {op} {b}?", "{a}{op}{b}=", "Calculate {a}{op}{b}.",
                        "What's {a} {word} {b}?", "Compute {a} {op} {b}."]
OP_WORDS = {'+': 'plus', '-': 'minus', '*': 'times'}

CODE_MODULES = ['string', 'textwrap', 'colorsys', 'bisect', 'heapq', 'fnmatch', 'posixpath', 'genericpath', 'shlex',
                'calendar', 'statistics', 'fractions', 'random', 'json/decoder', 'json/encoder', 'html/__init__',
                'base64', 'quopri', 'difflib', 'glob', 'copy', 'functools', 'reprlib', 'pprint', 'ipaddress',
                'urllib/parse', 'email/utils', 'csv', 'dataclasses', 'enum', 'inspect', 'ast', 'tokenize', 'gettext',
                'shutil', 'tempfile', 'argparse', 'configparser', 'datetime', 'uuid', 'mimetypes', 'platform', 'types',
                'contextlib', 'operator', 'locale', 'zipfile', 'typing', 'weakref', 'numbers', 'codecs', 'linecache',
                'traceback', 'warnings', 'pathlib', 'queue', 'graphlib', 'cmd', 'filecmp', 'fileinput', 'getopt',
                'optparse', 'sysconfig', 'timeit']

# The code task's held-out functions come from these modules only, and the pretraining corpus
# (corpus.stdlib_files) leaves them out: every other stdlib file is pretraining text, so a held-out
# body taken from one was an answer the model had read verbatim (all 40 of sft_test were, issue 15).
CODE_TEST_MODULES = ['statistics', 'fractions', 'calendar', 'configparser', 'shlex', 'textwrap']

CHAT_REPLIES = {
    "Hello!": "Hello! How can I help you today?", "Hi!": "Hi! What can I do for you?",
    "Hey there!": "Hey! How can I help?", "Good morning!": "Good morning! How can I help you today?",
    "Good evening!": "Good evening! What can I do for you?",
    "How are you?": "I'm doing well, thank you! How can I help?",
    "Thanks!": "You're welcome!", "Thank you!": "You're welcome!", "Thank you very much.": "You're very welcome!",
    "Bye!": "Goodbye! Have a nice day.", "Goodbye!": "Goodbye! Have a nice day.", "See you later!": "See you later!"}
CAPITALS = {
    'France': 'Paris', 'Germany': 'Berlin', 'Italy': 'Rome', 'Spain': 'Madrid', 'Portugal': 'Lisbon', 'Japan': 'Tokyo',
    'China': 'Beijing', 'India': 'New Delhi', 'Egypt': 'Cairo', 'Kenya': 'Nairobi', 'Canada': 'Ottawa',
    'Mexico': 'Mexico City', 'Brazil': 'Brasilia', 'Argentina': 'Buenos Aires', 'Peru': 'Lima', 'Chile': 'Santiago',
    'Russia': 'Moscow', 'Poland': 'Warsaw', 'Sweden': 'Stockholm', 'Norway': 'Oslo', 'Finland': 'Helsinki',
    'Denmark': 'Copenhagen', 'Greece': 'Athens', 'Turkey': 'Ankara', 'Ireland': 'Dublin', 'Austria': 'Vienna',
    'Hungary': 'Budapest', 'Netherlands': 'Amsterdam', 'Belgium': 'Brussels', 'Australia': 'Canberra',
    'South Korea': 'Seoul', 'Thailand': 'Bangkok', 'Vietnam': 'Hanoi', 'Indonesia': 'Jakarta', 'Iran': 'Tehran',
    'Nigeria': 'Abuja', 'Morocco': 'Rabat', 'Cuba': 'Havana', 'Switzerland': 'Bern', 'Czechia': 'Prague'}
CAPITAL_TEMPLATES = ["What is the capital of {c}?", "What's the capital city of {c}?", "Name the capital of {c}."]
FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("How many continents are there?", "There are 7 continents."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What do bees make?", "Bees make honey."), ("What do cows drink?", "Cows drink water."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What language is this code written in: print('hi')?", "That is Python."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides.")]

SIZES = {  # records per split and task; tests hold out phrasings, problems, functions and facts
    'sft_train': {'identity': 800, 'arithmetic': 12000, 'code': 400, 'chat': 600, 'multiplication': 5000},
    'sft_test': {'identity': 120, 'arithmetic': 1000, 'code': 40, 'chat': 40, 'multiplication': 1000},  # 1000: a few points' change shows
    'pref_train': {'identity': 300, 'arithmetic': 12000, 'code': 300, 'multiplication': 5000},
    'pref_test': {'identity': 40, 'arithmetic': 500, 'code': 30, 'multiplication': 300},
    # RL prompts: nearly every train-side problem. GRPO on a fixed 2,000 memorised those prompts
    # (their greedy accuracy 31% -> 39%) and left held-out problems where they were (30%).
    'rl_train': {'arithmetic': 12000, 'multiplication': 5000},
    'rl_test': {'arithmetic': 200, 'multiplication': 200},
}
SPLITS = tuple(SIZES)
# Bump when make_tasks gives other records for the same arguments: ensure_tasks then makes every
# suite on disk again, with its own arguments. 2: the code and arithmetic leaks of issue 15 fixed;
# 3: multiplication with working; 4: a rejected working's slip is never undone by abs(); 5: 107
# identity questions (was 40), 800 train and 120 test items (were 400 and 40), a random stream per task.
SUITE_VERSION = 5


def _is_test(key, seed, test_fraction=0.2):
    """A fixed, seeded side for every item (phrasing, problem, function, fact): no item is on both."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), 'little')
    return h % 1000 < test_fraction * 1000


def _user(content, rng=None, system=True):
    messages = [{'role': 'user', 'content': content}]
    if rng is not None and system and rng.random() < 0.15:  # an optional system message, now and then
        messages.insert(0, {'role': 'system', 'content': rng.choice(SYSTEM_PROMPTS)})
    return messages


def _take(pool, n, rng):
    """n items from pool: all of it, shuffled, as often as needed (pool may be smaller than n)."""
    out = []
    while len(out) < n and pool:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


# ----------------------------------------------------------------------------- identity

def identity_prompts(test, seed):
    """Every phrasing variant of the identity questions on one side of the split."""
    prompts = []
    for q in IDENTITY_QUESTIONS:
        if _is_test(q, seed) != test:
            continue
        for prefix in GREETING_PREFIXES:
            text = prefix + (q[0].lower() + q[1:] if prefix.endswith((': ', ', ')) else q)
            prompts += [text, text.lower(), text.rstrip('?.')]
    return sorted(set(prompts))


def identity_records(n, test, rng, seed, name, maker, kind):
    answer = IDENTITY_ANSWER.format(name=name, maker=maker)
    records = []
    for prompt in _take(identity_prompts(test, seed), n, rng):
        messages = _user(prompt, rng)
        if kind == 'pref':
            records.append(_pref(messages, answer, rng.choice(WRONG_IDENTITIES), 'identity'))
        else:
            records.append({'messages': messages + [{'role': 'assistant', 'content': answer}], 'task': 'identity'})
    return records


def identity_reward(response, answer):
    """1.0 when the response names both the name and the maker of the canonical answer, 0.5 for one."""
    m = re.fullmatch(re.escape(IDENTITY_ANSWER).replace(r'\{name\}', '(.+)').replace(r'\{maker\}', '(.+)'), answer)
    parts = m.groups() if m else (answer,)
    return sum(p.lower() in response.lower() for p in parts) / len(parts)


# ----------------------------------------------------------------------------- arithmetic

def arithmetic_problem(rng, add_digits, mul_digits):
    """(a, op, b, result): + and - on numbers below 10**add_digits (never negative), * on
    a < 10**mul_digits[0] and b < 10**mul_digits[1]."""
    op = rng.choice('+-*')
    if op == '*':
        a, b = rng.randrange(10 ** mul_digits[0]), rng.randrange(10 ** mul_digits[1])
        return a, op, b, a * b
    a, b = rng.randrange(10 ** add_digits), rng.randrange(10 ** add_digits)
    if op == '-':
        a, b = max(a, b), min(a, b)
    return a, op, b, a + b if op == '+' else a - b


def split_key(a, op, b):
    """The problem as the split sees it: 4+59 and 59+4 are one problem (a model that learnt one
    has learnt the other), so both land on the same side; a-b stays ordered."""
    return f"{min(a, b)}{op}{max(a, b)}" if op in '+*' else f"{a}{op}{b}"


def arithmetic_items(n, test, rng, seed, add_digits, mul_digits):
    """n distinct problems on one side of the split: (prompt, answer) pairs."""
    seen, items = set(), []
    for _ in range(50 * n):  # bounded: a small digit setting may have fewer problems than asked for
        if len(items) >= n:
            break
        a, op, b, result = arithmetic_problem(rng, add_digits, mul_digits)
        key = f"{a}{op}{b}"
        if key in seen or _is_test(split_key(a, op, b), seed, 0.1) != test:
            continue
        seen.add(key)
        prompt = rng.choice(ARITHMETIC_TEMPLATES).format(a=a, b=b, op=op, word=OP_WORDS[op])
        items.append((prompt, str(result), key))
    return items


def arithmetic_records(n, test, rng, seed, kind, add_digits, mul_digits):
    records = []
    for prompt, answer, key in arithmetic_items(n, test, rng, seed, add_digits, mul_digits):
        if kind == 'rl':
            records.append({'prompt': prompt, 'answer': answer, 'task': 'arithmetic'})
        elif kind == 'pref':
            wrong = int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])
            records.append(_pref(_user(prompt), answer, str(wrong), 'arithmetic'))
        else:
            records.append({'messages': _user(prompt, rng) + [{'role': 'assistant', 'content': answer}],
                            'task': 'arithmetic'})
    return records


# ----------------------------------------------------------------------------- multiplication (with working)

def multiplication_working(a, b):
    """The scratchpad for a*b, one partial product per digit of b, then their sum; the last number
    is the answer (what tasks.arithmetic_reward checks): 47*38 -> "47*38 = 47*30 + 47*8 = 1410 + 376 = 1786"."""
    digits = str(b)
    parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits)]
    products = [a * p for p in parts]
    return (f"{a}*{b} = " + ' + '.join(f"{a}*{p}" for p in parts) + ' = ' + ' + '.join(map(str, products))
            + f" = {a * b}")


def wrong_working(a, b, rng):
    """A working with one slip, carried through consistently: a partial product or the final sum off
    by a small amount in one digit place. Its final answer is wrong (what DPO and the reward model
    learn to tell apart)."""
    right = multiplication_working(a, b)
    head, products_text, total = right.rsplit(' = ', 2)
    products = [int(x) for x in products_text.split(' + ')]
    slip = rng.choice([-1, 1]) * rng.choice([1, 2]) * 10 ** rng.randrange(max(1, len(str(a * b)) - 1))
    off = lambda x: x + slip if x + slip >= 0 else x - slip  # never negative, never x itself
    if rng.random() < 0.5 and len(products) > 1:  # a partial product is wrong, and the sum follows it
        i = rng.randrange(len(products))
        products[i] = off(products[i])
        return f"{head} = {' + '.join(map(str, products))} = {sum(products)}"
    return f"{head} = {products_text} = {off(int(total))}"  # the partial products are right, the sum is not


def multiplication_items(n, test, rng, seed, digits):
    """n distinct problems a*b with a of digits[0] and b of digits[1] digits, on one side of the split
    (a quarter of the unordered problems are held out: 3-by-2 digits give ~20,000 test problems)."""
    low = lambda d: 10 ** (d - 1) if d > 1 else 0
    seen, items = set(), []
    for _ in range(50 * n):
        if len(items) >= n:
            break
        a, b = rng.randrange(low(digits[0]), 10 ** digits[0]), rng.randrange(low(digits[1]), 10 ** digits[1])
        key = f"{a}*{b}"
        if key in seen or _is_test(split_key(a, '*', b), seed, 0.25) != test:
            continue
        seen.add(key)
        items.append((rng.choice(ARITHMETIC_TEMPLATES).format(a=a, b=b, op='*', word='times'), a, b))
    return items


def multiplication_records(n, test, rng, seed, kind, digits):
    records = []
    for prompt, a, b in multiplication_items(n, test, rng, seed, digits):
        if kind == 'rl':
            records.append({'prompt': prompt, 'answer': str(a * b), 'task': 'multiplication'})
        elif kind == 'pref':
            records.append(_pref(_user(prompt), multiplication_working(a, b), wrong_working(a, b, rng), 'multiplication'))
        else:
            records.append({'messages': _user(prompt, rng) + [{'role': 'assistant', 'content': multiplication_working(a, b)}],
                            'task': 'multiplication'})
    return records


# ----------------------------------------------------------------------------- code

def stdlib_functions(max_body_lines=12, max_body_chars=500):
    """(qualname, header, body) of documented top-level functions and methods of CODE_MODULES,
    in a fixed order, one per distinct header. header = signature + docstring, body = the rest;
    both dedented so the def is at column 0."""
    root = sysconfig.get_paths()['stdlib']
    found, headers = [], set()
    for module in CODE_MODULES:
        path = os.path.join(root, module + '.py')
        if not os.path.exists(path):
            continue
        with open(path, encoding='utf-8') as f:
            source = f.read()
        lines = source.splitlines()
        tree = ast.parse(source)
        nodes = [(n, n.name) for n in tree.body if isinstance(n, ast.FunctionDef)]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            nodes += [(n, f"{cls.name}.{n.name}") for n in cls.body if isinstance(n, ast.FunctionDef)]
        for node, qualname in nodes:
            if not ast.get_docstring(node) or len(node.body) < 2:
                continue
            doc_end = node.body[0].end_lineno
            body = lines[doc_end:node.end_lineno]
            if not 1 <= len(body) <= max_body_lines or len('\n'.join(body)) > max_body_chars:
                continue
            header = textwrap.dedent('\n'.join(lines[node.lineno - 1:doc_end]))
            indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
            if header not in headers:  # date.ctime and datetime.ctime: one prompt, one answer
                headers.add(header)
                found.append((f"{module.replace('/', '.')}.{qualname}", header,
                              '\n'.join(line[indent:] for line in body)))
    return found


CODE_MUTATIONS = [(r' == ', ' != '), (r' != ', ' == '), (r' < ', ' >= '), (r' > ', ' <= '), (r' is not ', ' is '),
                  (r'\bTrue\b', 'False'), (r'\bFalse\b', 'True'), (r' \+ ', ' - '), (r' - ', ' + '),
                  (r' and ', ' or '), (r' or ', ' and '), (r'return (?!None\b)\S.*', 'return None'),
                  (r'\b(\d+)\b', lambda m: str(int(m.group(1)) + 1))]


def corrupt_code(body, rng):
    """A plausible but wrong body: one seeded mutation (a flipped comparison or boolean, + for -,
    return None, an off-by-one literal), or a deleted line when none applies."""
    options = [(pattern, repl, m) for pattern, repl in CODE_MUTATIONS for m in re.finditer(pattern, body)]
    if options:
        pattern, repl, m = rng.choice(options)
        new = repl(m) if callable(repl) else repl
        corrupted = body[:m.start()] + new + body[m.end():]
    else:
        lines = body.split('\n')
        drop = rng.randrange(len(lines)) if len(lines) > 1 else None
        corrupted = '\n'.join(l for i, l in enumerate(lines) if i != drop) if drop is not None else body + '\n    pass'
    return corrupted if corrupted != body else body + '\n    return None'


def _squash(text):
    """Every line stripped: a method's body is a dedented copy of its text, so indentation is no
    disguise. Framed by newlines, so a search matches whole lines only."""
    return '\n' + re.sub(r'[ \t]*\n[ \t]*', '\n', text.strip()) + '\n'


def in_corpus(bodies):
    """For each body: whether its lines occur, in order, in a file of the pretraining corpus."""
    texts = []
    for path in stdlib_files()[1]:
        try:
            with open(path, encoding='utf-8') as f:
                texts.append(_squash(f.read()))
        except UnicodeDecodeError:  # not pretraining text either (iter_documents skips it)
            continue
    corpus = '\0'.join(texts)
    lines = set(corpus.split('\n'))
    # a body with a line found nowhere in the corpus is not in it: only the rest (~30 ms each) are searched
    return [all(line in lines for line in body.split('\n')) and body in corpus for body in map(_squash, bodies)]


@functools.lru_cache(maxsize=1)
def code_functions():
    """{'train': functions, 'test': functions} as stdlib_functions gives them: split by module, the
    held-out side from CODE_TEST_MODULES, less any whose body the corpus holds all the same (a
    one-line `return self._name`, a copy in another module). Cached: ~1 s of parsing and searching."""
    test_prefixes = tuple(m.replace('/', '.') + '.' for m in CODE_TEST_MODULES)
    functions = stdlib_functions()
    train = tuple(f for f in functions if not f[0].startswith(test_prefixes))
    test = [f for f in functions if f[0].startswith(test_prefixes)]
    seen = in_corpus([body for _, _, body in test])
    return {'train': train, 'test': tuple(f for f, s in zip(test, seen) if not s)}


def code_records(n, test, rng, kind, functions):
    pool = functions['test' if test else 'train']  # by module: neither prompt nor answer crosses
    records = []
    for qualname, header, body in rng.sample(pool, min(n, len(pool))):
        messages = _user(f"Complete this Python function:\n{header}", rng, system=False)
        if kind == 'pref':
            records.append(_pref(messages, body, corrupt_code(body, rng), 'code'))
        else:
            records.append({'messages': messages + [{'role': 'assistant', 'content': body}], 'task': 'code'})
    return records


# ----------------------------------------------------------------------------- chat

def chat_items(test, seed):
    """(prompt, answer) pairs: capitals and facts held out by item; greetings are train only."""
    items = [(q.format(c=c), f"The capital of {c} is {cap}.") for c, cap in CAPITALS.items()
             if _is_test(c, seed) == test for q in CAPITAL_TEMPLATES]
    items += [(q, a) for q, a in FACTS if _is_test(q, seed) == test]
    return items if test else items + list(CHAT_REPLIES.items())


def chat_records(n, test, rng, seed):
    items, greetings = chat_items(test, seed), list(CHAT_REPLIES.items())
    records = []
    for prompt, answer in _take(items, n, rng):
        messages = _user(prompt, rng) + [{'role': 'assistant', 'content': answer}]
        if not test and rng.random() < 0.25:  # a greeting first: a two-exchange conversation
            hello, reply = rng.choice(greetings[:6])
            messages = [{'role': 'user', 'content': hello}, {'role': 'assistant', 'content': reply}] + messages[-2:]
        records.append({'messages': messages, 'task': 'chat'})
    return records


# ----------------------------------------------------------------------------- the suite

def _pref(prompt_messages, chosen, rejected, task):
    a = lambda content: prompt_messages + [{'role': 'assistant', 'content': content}]
    return {'chosen': a(chosen), 'rejected': a(rejected), 'task': task}


def resolved_sizes(sizes=None):
    """SIZES with the overrides in sizes ({split: {task: n}}) applied."""
    return {split: dict(SIZES[split], **(sizes or {}).get(split, {})) for split in SPLITS}


def make_tasks(seed=1337, name='Mini', maker='the Mini-LLM project', add_digits=2, mul_digits=(2, 1),
               long_mul_digits=(3, 2), sizes=None):
    """All six splits as lists of records, in-process (no files). Same arguments, same records."""
    sizes = resolved_sizes(sizes)
    functions = code_functions()
    out = {}
    for split in SPLITS:
        kind, test = split.split('_')[0], split.endswith('_test')
        records = []
        for task, n in sizes[split].items():
            rng = random.Random(f"{seed}:{split}:{task}")  # its own stream: one task's size leaves the others' records be
            if task == 'identity':
                records += identity_records(n, test, rng, seed, name, maker, kind)
            elif task == 'arithmetic':
                records += arithmetic_records(n, test, rng, seed, kind, add_digits, mul_digits)
            elif task == 'code':
                records += code_records(n, test, rng, kind, functions)
            elif task == 'chat':
                records += chat_records(n, test, rng, seed)
            elif task == 'multiplication':
                records += multiplication_records(n, test, rng, seed, kind, long_mul_digits)
            else:
                raise ValueError(f"unknown task {task!r} in sizes[{split!r}] (identity, arithmetic, code, chat, multiplication)")
        random.Random(f"{seed}:{split}").shuffle(records)
        out[split] = records
    return out


def _write_atomic(path, text):
    """Write a temp file of this process, then rename it: under torchrun every rank may write the
    suite at once (the same content); each rename is atomic, so no reader sees half a file."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def write_tasks(out_dir='data/tasks', **kwargs):
    """Write <split>.jsonl for the six splits and tasks.json (generator version, arguments, sizes
    and counts). Returns {split: count}."""
    os.makedirs(out_dir, exist_ok=True)
    args = _effective_args(kwargs)
    splits = make_tasks(**args)
    for split, records in splits.items():
        _write_atomic(os.path.join(out_dir, f'{split}.jsonl'),
                      ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))
    counts = {split: len(records) for split, records in splits.items()}
    manifest = {'version': SUITE_VERSION, 'args': args, 'sizes': resolved_sizes(args['sizes']), 'counts': counts}
    _write_atomic(os.path.join(out_dir, 'tasks.json'), json.dumps(manifest, indent=1))  # last: the suite is whole
    return counts


def _effective_args(kwargs):
    """make_tasks' arguments with defaults filled in, as JSON would store them. sizes stays what
    was asked (None: the SIZES table), so that a suite made again follows the table of the day."""
    bound = inspect.signature(make_tasks).bind(**kwargs)
    bound.apply_defaults()
    return json.loads(json.dumps(bound.arguments))


def _made_with(out_dir):
    """(tasks.json, the arguments its suite was made with); ({}, {}) when there is none."""
    try:
        with open(os.path.join(out_dir, 'tasks.json')) as f:
            manifest = json.load(f)
        args = {k: v for k, v in manifest['args'].items() if k in inspect.signature(make_tasks).parameters}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}
    if 'version' not in manifest:  # version 1 stored the SIZES table of its day here, not a choice
        args.pop('sizes', None)
    return manifest, args


def ensure_tasks(out_dir='data/tasks', **kwargs):
    """out_dir with the suite, written first when it is missing. What a stage calls, with no
    arguments: it uses the suite that is there as it was made (prepare.py --write_tasks=True
    --assistant_name=... --assistant_maker=... --seed=...), never the defaults over it.

    The suite is written again, always from the arguments it was made with (tasks.json) with
    kwargs on top, when a file is missing, when kwargs ask for another argument, or when what those
    arguments give has changed since: the SIZES table (the developer's, not the user's: prepare.py
    has no flag for it; explicit sizes= are kept as arguments) or the generator (SUITE_VERSION,
    e.g. a leak fixed). So a SIZES edit or a fix reaches every suite, and the user's name, maker,
    seed and digits survive it; a stage never turns a suite into another one."""
    manifest, made = _made_with(out_dir)
    args = _effective_args(dict(made, **kwargs))
    current = (manifest.get('version') == SUITE_VERSION and manifest.get('args') == args
               and manifest.get('sizes') == resolved_sizes(args['sizes']))
    if not current or not all(os.path.exists(os.path.join(out_dir, f'{s}.jsonl')) for s in SPLITS):
        write_tasks(out_dir, **args)
    return out_dir


def heldout(out_dir='data/tasks', **kwargs):
    """Evaluation items from sft_test.jsonl: {task: [{'messages': prompt, 'answer': expected}]}."""
    if kwargs or not os.path.exists(os.path.join(out_dir, 'sft_test.jsonl')):
        ensure_tasks(out_dir, **kwargs)
    items = {}
    with open(os.path.join(out_dir, 'sft_test.jsonl'), encoding='utf-8') as f:
        for line in f:
            r = json.loads(line)
            prompt, answer = r['messages'][:-1], r['messages'][-1]['content']
            items.setdefault(r['task'], []).append({'messages': prompt, 'answer': answer})
    return items


# ----------------------------------------------------------------------------- scoring: the verifiable rewards, and the suite's

_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def final_number(text):
    """The last number in text as an exact Fraction ('1,234' and '85.0' work), or None."""
    matches = _NUMBER.findall(text or '')
    if not matches:
        return None
    try:
        return Fraction(matches[-1].replace(',', ''))
    except ValueError:
        return None


def arithmetic_reward(response, answer):
    """1.0 when the last number in the response equals the answer exactly, else 0.0."""
    target = final_number(str(answer))
    return float(target is not None and final_number(response) == target)


def verifiable_reward(response, answer):
    """A numeric answer is checked by arithmetic_reward; a text answer must appear in the
    response as a whole (case and spacing ignored): "Paris" in "It is Paris." but not in
    "Parisian". No answer: 0.0 (use a reward model instead); an empty one is an error."""
    if answer is None:
        return 0.0
    if not str(answer).strip():
        raise ValueError("empty answer: it would match every response (data.load_rl refuses it)")
    if _NUMBER.fullmatch(str(answer).strip()):
        return arithmetic_reward(response, answer)
    squash = lambda s: ' '.join(s.lower().split())
    text = squash(str(answer))
    # \b where the answer starts or ends with a letter or digit: not a piece of a longer word
    edge = lambda c: r'\b' if re.match(r'\w', c) else ''
    return float(re.search(edge(text[0]) + re.escape(text) + edge(text[-1]), squash(response)) is not None)


def score(task, response, answer):
    """0..1 for one held-out item. arithmetic, multiplication: exact final number; identity: name and maker
    present; code and chat: difflib similarity to the expected text (1.0 = exact)."""
    if task in ('arithmetic', 'multiplication'):
        return arithmetic_reward(response, answer)
    if task == 'identity':
        return identity_reward(response, answer)
    return difflib.SequenceMatcher(None, response.strip(), answer.strip()).ratio()
