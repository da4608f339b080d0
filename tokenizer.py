"""
Tokenizers, one interface for four kinds:

    bpe   byte-level BPE trained with rustbpe, run with tiktoken (the nanochat approach)
    char  one token per character (the nanoGPT Shakespeare recipe)
    gpt2  tiktoken's GPT-2 encoding (needs its files: online once, or tiktoken's cache)
    hf    a Hugging Face model's own tokenizer (tokenizer.json) and chat template, to fine-tune it

A tokenizer is saved as plain JSON (never a pickle) next to the data, and the same dict goes into
every checkpoint, so any checkpoint can be sampled on its own: from_spec(spec) rebuilds either class.

Chat uses ChatML:  <|im_start|>role\\ncontent<|im_end|>\\n  and render_chat() returns a loss mask
that is 1 only on assistant content and its <|im_end|>, which every fine-tuning stage trains on.
Kind hf renders with the model's Jinja template instead, with the same mask on its end-of-turn token.
"""

import base64
import hashlib
import json
import os

import tiktoken

# GPT-4's split pattern with one change: numbers split into single digits (\p{N} instead of
# \p{N}{1,3}). A small model learns arithmetic from single-digit tokens far more easily.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

# Document separator, the ChatML markers, a pad token, and spare slots for later use (tools etc.)
SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|pad|>'] + [f'<|reserved_{i}|>' for i in range(4)]


class Tokenizer:
    """Wraps a tiktoken Encoding (bpe, gpt2) or a character table (char) built from `spec`,
    the JSON-able dict that fully describes the tokenizer."""

    def __init__(self, spec):
        self.spec = spec
        self.kind = spec['kind']
        self.special_tokens = dict(spec['special_tokens'])  # name -> id
        if self.kind == 'char':
            self.stoi = {ch: i for i, ch in enumerate(spec['chars'])}
            self.itos = {i: ch for ch, i in self.stoi.items()}
            self.itos.update({i: name for name, i in self.special_tokens.items()})
            self.enc = None
        elif self.kind == 'bpe':
            ranks = {base64.b64decode(b): r for b, r in spec['mergeable_ranks']}
            self.enc = tiktoken.Encoding(name=spec.get('name', 'bpe'), pat_str=spec['pattern'],
                                         mergeable_ranks=ranks, special_tokens=self.special_tokens)
        elif self.kind == 'gpt2':
            base = _tiktoken_gpt2()
            self.enc = tiktoken.Encoding(name='gpt2_chat', pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                         special_tokens=self.special_tokens)
        else:
            raise ValueError(f"unknown tokenizer kind {self.kind!r} (expected bpe, char or gpt2; "
                             "build kind hf with from_spec)")
        self.n_vocab = max(self.special_tokens.values()) + 1
        self.eot_id = self.special_tokens['<|endoftext|>']
        self.im_start_id = self.special_tokens['<|im_start|>']
        self.im_end_id = self.special_tokens['<|im_end|>']
        self.pad_id = self.special_tokens.get('<|pad|>', self.eot_id)

    # --------------------------------------------------------------------- encode / decode

    def encode(self, text, allow_special=False):
        """Text -> ids. Special-token strings in `text` are plain text unless allow_special."""
        if self.enc is not None:
            return self.enc.encode(text, allowed_special='all' if allow_special else set(), disallowed_special=())
        ids = []
        for piece, is_special in self._split_special(text, allow_special):
            ids.extend([self.special_tokens[piece]] if is_special else self._char_ids(piece))
        return ids

    def encode_batch(self, texts, num_threads=8):
        """Many documents at once, no special tokens (tiktoken runs them on threads)."""
        if self.enc is not None:
            return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self._char_ids(t) for t in texts]

    def decode(self, ids):
        if self.enc is not None:
            return self.enc.decode(list(ids))
        return ''.join(self.itos[i] for i in ids)

    def decode_bytes(self, ids):
        """Raw bytes of ids (a multi-byte character may span tokens: stream by decoding bytes)."""
        if self.enc is not None:
            return self.enc.decode_bytes(list(ids))
        return self.decode(ids).encode('utf-8')

    def _char_ids(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary") from None

    def _split_special(self, text, allow_special):
        if not allow_special:
            return [(text, False)]
        pieces, i = [], 0
        while i < len(text):
            hits = [(text.find(s, i), s) for s in self.special_tokens if text.find(s, i) >= 0]
            if not hits:
                break
            j, s = min(hits)
            pieces += [(text[i:j], False), (s, True)]
            i = j + len(s)
        return pieces + [(text[i:], False)]

    # --------------------------------------------------------------------- chat

    def render_chat(self, messages, max_len=None):
        """ChatML messages [{'role', 'content'}] -> (ids, mask). mask is 1 on the tokens the model
        is trained to produce: assistant content and the <|im_end|> that ends it."""
        ids, mask = [], []
        for m in messages:
            header = [self.im_start_id] + self.encode(m['role'] + '\n')
            body = self.encode(m['content']) + [self.im_end_id]
            newline = self.encode('\n')
            train = 1 if m['role'] == 'assistant' else 0
            ids += header + body + newline
            mask += [0] * len(header) + [train] * len(body) + [0] * len(newline)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def render_prompt(self, messages):
        """Messages up to a user turn, then the assistant header: what generation continues."""
        ids, _ = self.render_chat(messages)
        return ids + [self.im_start_id] + self.encode('assistant\n')

    # --------------------------------------------------------------------- files and identity

    def save(self, path):
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.spec, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        """Either class, by the kind the file names."""
        with open(path) as f:
            return from_spec(json.load(f))

    @property
    def identity(self):
        """kind + a short hash of the spec: tells two tokenizers apart in checkpoints and data."""
        digest = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.kind}-{self.n_vocab}-{digest}"


# ----------------------------------------------------------------------------- constructors

def _specials_from(first_id):
    return {name: first_id + i for i, name in enumerate(SPECIAL_TOKENS)}


def train_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Train a byte-level BPE on an iterable of strings. vocab_size counts the 256 bytes, the
    merges and the special tokens. rustbpe stops early, silently, when the text runs out of pairs
    to merge: we say so and keep the smaller vocabulary."""
    import rustbpe
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {256 + n_special} "
                         f"(the 256 bytes and {n_special} special tokens), and a few hundred merges to be useful")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - n_special, pattern=pattern)
    ranks = bpe.get_mergeable_ranks()  # [(bytes, rank)], ranks 0..n-1
    if len(ranks) < vocab_size - n_special:
        print(f"note: BPE training stopped at {len(ranks) + n_special} tokens, short of vocab_size={vocab_size} "
              f"(the text has no more pairs to merge); using the smaller vocabulary")
    spec = {'kind': 'bpe', 'pattern': pattern,
            'mergeable_ranks': [[base64.b64encode(b).decode('ascii'), r] for b, r in ranks],
            'special_tokens': _specials_from(len(ranks))}
    return Tokenizer(spec)


def char_tokenizer(text):
    """One id per distinct character of `text` (sorted), then the special tokens."""
    chars = sorted(set(text))
    return Tokenizer({'kind': 'char', 'chars': chars, 'special_tokens': _specials_from(len(chars))})


def _tiktoken_gpt2():
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise RuntimeError(
            "tokenizer_type=gpt2 needs tiktoken's GPT-2 files, which could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Run once online, or point "
            "TIKTOKEN_CACHE_DIR at a cache that has them; offline, use --tokenizer_type=bpe or char.") from None


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE, with our chat tokens after its <|endoftext|> (50256)."""
    base = _tiktoken_gpt2()
    specials = {'<|endoftext|>': base.eot_token}
    specials.update({name: base.eot_token + i for i, name in enumerate(SPECIAL_TOKENS) if i > 0})
    return Tokenizer({'kind': 'gpt2', 'special_tokens': specials})


# ----------------------------------------------------------------------------- Hugging Face (kind hf)

# The special-token attributes transformers passes to every chat template (bos_token, eos_token, ...)
HF_NAMED_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')

# The template transformers documents for ChatML; the same layout as Tokenizer.render_chat
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def from_spec(spec):
    """The tokenizer a spec describes (a tokenizer.json of ours, or a checkpoint's 'tokenizer')."""
    return HFTokenizer(spec) if spec['kind'] == 'hf' else Tokenizer(spec)


def _byte_decoder():
    """GPT-2's byte-level table, reversed: the printable character that stands for each byte -> byte."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_BYTE_DECODER = _byte_decoder()


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (the `tokenizers` library) and its chat template behind our
    interface. spec: {'kind': 'hf', 'tokenizer_json': the file's text, 'chat_template': Jinja text or
    None, 'special_token_strings': {'bos_token': ..., 'eos_token': ..., ...}}."""

    def __init__(self, spec):
        from tokenizers import Tokenizer as RustTokenizer
        self.spec, self.kind = spec, 'hf'
        self.tok = RustTokenizer.from_str(spec['tokenizer_json'])
        self.named = dict(spec['special_token_strings'])  # what the template sees as bos_token, eos_token, ...
        added = self.tok.get_added_tokens_decoder()  # id -> AddedToken
        self.added_text = {i: t.content for i, t in added.items()}  # decoded verbatim, not through the byte table
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        named_ids = {s: self.tok.token_to_id(s) for s in self.named.values()}  # some are in the base vocab (</s>)
        self.special_tokens.update({s: i for s, i in named_ids.items() if i is not None})
        self.n_vocab = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.byte_level = 'ByteLevel(' in repr(self.tok.decoder)  # alone or in a Sequence
        has_chatml = {'<|im_start|>', '<|im_end|>'} <= set(self.special_tokens)
        self.chat_template = spec['chat_template'] or (CHATML_TEMPLATE if has_chatml else None)
        self.turn_start, self.turn_end = self._turn_tokens() if self.chat_template else (None, None)
        eos = self.named.get('eos_token')
        self.eot_id = self.special_tokens.get(eos, self.special_tokens.get(self.turn_end))
        if self.eot_id is None:
            raise ValueError("this Hugging Face tokenizer names no eos_token (tokenizer_config.json) and has no chat "
                             "template to take an end-of-turn token from: set eos_token")
        # without a chat template generation still needs a stop token: the end of the document
        self.im_end_id = self.special_tokens[self.turn_end] if self.turn_end else self.eot_id
        self.im_start_id = self.special_tokens.get(self.turn_start)
        self.pad_id = self.special_tokens.get(self.named.get('pad_token'), self.eot_id)

    @classmethod
    def from_dir(cls, path):
        """A Hugging Face model or tokenizer directory: tokenizer.json, tokenizer_config.json (special
        tokens, chat_template), chat_template.jinja (where transformers 5 saves the template, and
        which wins over the config's, as in transformers) and special_tokens_map.json if present."""
        def read(name):
            file = os.path.join(path, name)
            if os.path.exists(file):
                with open(file, encoding='utf-8') as f:
                    return f.read()
        tokenizer_json = read('tokenizer.json')
        if tokenizer_json is None:
            raise FileNotFoundError(
                f"{path} has no tokenizer.json: only Hugging Face fast tokenizers (tokenizer.json) are supported. "
                "transformers writes one for most slow tokenizers: "
                "AutoTokenizer.from_pretrained(path).save_pretrained(path)")
        config = json.loads(read('tokenizer_config.json') or '{}')
        legacy = json.loads(read('special_tokens_map.json') or '{}')  # only fills what the config leaves out
        named = {k: config.get(k) or legacy.get(k) for k in HF_NAMED_TOKENS}
        named = {k: v['content'] if isinstance(v, dict) else v for k, v in named.items() if v}
        template = config.get('chat_template')
        if isinstance(template, list):  # named ones: [{'name': 'default', 'template': ...}, {'name': 'tool_use', ...}]
            template = {t['name']: t['template'] for t in template}.get('default')
        template = read('chat_template.jinja') or template
        return cls({'kind': 'hf', 'tokenizer_json': tokenizer_json, 'chat_template': template,
                    'special_token_strings': named})

    def to_transformers(self):
        """The same tokenizer as a transformers PreTrainedTokenizerFast (for hf.py's export), with the
        template this class renders: the ChatML fallback included, so the export chats as we trained."""
        import transformers
        from tokenizers import Tokenizer as RustTokenizer
        fast = RustTokenizer.from_str(self.spec['tokenizer_json'])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=fast, chat_template=self.chat_template,
                                                    **self.named)

    # --------------------------------------------------------------------- encode / decode

    def encode(self, text, allow_special=False):
        """Text -> ids. Special-token strings in `text` are plain text unless allow_special."""
        self.tok.encode_special_tokens = not allow_special  # True: split them like any other text
        return self.tok.encode(text, add_special_tokens=False).ids  # no post-processor BOS: templates add it

    def encode_batch(self, texts, num_threads=8):
        """Many documents at once, no special tokens. The `tokenizers` thread pool is process-wide
        (RAYON_NUM_THREADS), so num_threads is not used."""
        self.tok.encode_special_tokens = True
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids):
        """Raw bytes of ids. A byte-level BPE token is a string of stand-in characters, one per byte:
        map them back, so that a character split over two tokens arrives whole once both have."""
        if not self.byte_level:
            return self.decode(ids).encode('utf-8')
        return b''.join(self.added_text[i].encode('utf-8') if i in self.added_text
                        else bytes(_BYTE_DECODER[c] for c in self.tok.id_to_token(i)) for i in ids)

    # --------------------------------------------------------------------- chat

    def render_chat(self, messages, max_len=None):
        """Messages [{'role', 'content'}] -> (ids, mask) as the model's chat template lays them out.
        mask is 1 on each assistant message's content and the end-of-turn token after it."""
        ids, mask = [], []
        for text, plain, train in self._pieces(messages):
            piece = self.encode(text, allow_special=not plain)
            ids += piece
            mask += [train] * len(piece)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def render_prompt(self, messages):
        """The conversation, then the template's generation prompt: what generation continues."""
        return [i for text, plain, _ in self._pieces(messages, add_generation_prompt=True)
                for i in self.encode(text, allow_special=not plain)]

    def _render(self, messages, add_generation_prompt=False):
        """The template's text for `messages`, rendered exactly as transformers' apply_chat_template
        renders it (the named special tokens passed as variables)."""
        if self.chat_template is None:
            raise ValueError("this Hugging Face tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens, "
                             "so it cannot render chats: use a chat model's tokenizer, or add a chat_template to "
                             "its tokenizer_config.json (or a chat_template.jinja)")
        from transformers.utils.chat_template_utils import render_jinja_template
        texts, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                         add_generation_prompt=add_generation_prompt, **self.named)
        return texts[0]

    def _pieces(self, messages, add_generation_prompt=False):
        """The rendering split into [(text, plain, train)]: template text (special tokens parsed), each
        message's content (plain text, as our ChatML encodes it), and after assistant content its
        end-of-turn token; train is 1 on those two. Tokenized piece by piece, the mask's edges are exact.

        The template runs twice: with each content replaced by a mark, to see where it puts it, and as
        is, to check it puts the content there verbatim (or stripped: Llama 3 trims it); and once more
        per assistant message, to check the prompt before it (_check_reply)."""
        marks = [f'\ue000{i}\ue001' for i in range(len(messages))]  # private-use characters: no template touches them
        rest = self._render([{**m, 'content': k} for m, k in zip(messages, marks)], add_generation_prompt)
        full = self._render(messages, add_generation_prompt)
        pieces, pos, done = [], 0, 0  # pos: how far `full` is matched; done: how far it is in pieces
        for i, (m, mark) in enumerate(zip(messages, marks)):
            before, found, rest = rest.partition(mark)
            if not found or mark in rest or not full.startswith(before, pos):
                raise ValueError(f"the chat template does not render message {i}'s content once, as given (it "
                                 "drops, repeats or rewrites it), so its tokens cannot be found in the rendering")
            pos += len(before)
            content = next((c for c in (m['content'], m['content'].strip()) if full.startswith(c, pos)), None)
            if content is None:
                raise ValueError(f"the chat template changes message {i}'s content beyond stripping it")
            train = m['role'] == 'assistant'
            if train:
                self._check_reply(messages, i, full, pos, content)
            pieces += [(full[done:pos], False, 0), (content, True, int(train))]
            pos = done = pos + len(content)
            if train:
                pieces.append((self.turn_end, False, 1))
                done += len(self.turn_end)
        if full[pos:] != rest:
            raise ValueError("the chat template renders the conversation's end differently once contents change")
        return pieces + [(full[done:], False, 0)]

    def _check_reply(self, messages, i, full, start, content):
        """Assistant message i must read as render_prompt(messages[:i]) + its content + the end-of-turn
        token: that is how generation, reward.py and dpo.py lay out a reply."""
        if full[:start] != self._render(messages[:i], add_generation_prompt=True):
            raise ValueError(f"the chat template does not render assistant message {i} after the prompt that "
                             f"messages[:{i}] with add_generation_prompt renders: it rewrites earlier turns or the "
                             "assistant header (e.g. adds a thinking block), so a model would be trained on a "
                             "layout it never sees when generating")
        if not full.startswith(self.turn_end, start + len(content)):
            raise ValueError(f"the chat template does not end assistant message {i} with its end-of-turn token "
                             f"{self.turn_end!r}")

    def _turn_tokens(self):
        """(start, end) of a turn, as strings: the first special token of the generation prompt, and
        the first special token the template puts after an assistant reply."""
        marker = '\ue000reply\ue001'
        user = [{'role': 'user', 'content': 'A'}]
        text = self._render(user + [{'role': 'assistant', 'content': marker}])
        end = self._first_special(text.partition(marker)[2])
        if end is None:
            raise ValueError(f"the chat template puts no special token after an assistant reply ({text!r}), so "
                             "there is no end-of-turn token to train on and stop at")
        prompt, generation = self._render(user), self._render(user, add_generation_prompt=True)
        return self._first_special(generation.removeprefix(prompt)), end

    def _first_special(self, text):
        hits = [(text.find(s), -len(s), s) for s in self.special_tokens if s in text]
        return min(hits)[2] if hits else None
