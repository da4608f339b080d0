"""
Tokenizers, one interface for three kinds:

    bpe   byte-level BPE trained with rustbpe, run with tiktoken (the nanochat approach)
    char  one token per character (the nanoGPT Shakespeare recipe)
    gpt2  tiktoken's GPT-2 encoding (needs its files: online once, or tiktoken's cache)

A tokenizer is saved as plain JSON (never a pickle) next to the data, and the same dict goes into
every checkpoint, so any checkpoint can be sampled on its own.

Chat uses ChatML:  <|im_start|>role\\ncontent<|im_end|>\\n  and render_chat() returns a loss mask
that is 1 only on assistant content and its <|im_end|>, which every fine-tuning stage trains on.
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
            raise ValueError(f"unknown tokenizer kind {self.kind!r} (expected bpe, char or gpt2)")
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
        with open(path) as f:
            return cls(json.load(f))

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
    assert vocab_size >= 256 + n_special, f"vocab_size must be at least {256 + n_special}"
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
