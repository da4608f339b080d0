"""GGUF export (gguf_export.py, export.py --export_format=gguf): the file holds our weights under
llama.cpp's names and layouts, llama.cpp's metadata and our tokenizer, checked with gguf's own reader;
transformers' GGUF loader builds our model and our tokenizer from it; llama.cpp's pre-tokenizer
splits text as ours does. All offline: tiny models with random weights, a tokenizer trained here."""

import os
import random
import sysconfig

import pytest
import regex
import torch
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # tiktoken's GPT-2 split

import gguf_export
import hf
from common import save_checkpoint
from conftest import run_script
from model import GPT, GPTConfig, apply_rope, rope_cache
from tokenizer import SPLIT_PATTERN, Tokenizer, char_tokenizer, train_bpe

gguf = pytest.importorskip('gguf')
transformers = pytest.importorskip('transformers')

# every architecture gguf_export writes: (flags, llama.cpp's architecture)
ARCHITECTURES = {
    'llama': (dict(n_kv_head=2), 'llama'),
    'llama-untied-bias-mqa': (dict(n_kv_head=1, bias=True, tie_embeddings=False), 'llama'),
    'qwen2': (dict(n_kv_head=2, qkv_bias=True), 'qwen2'),
    'qwen3': (dict(n_kv_head=2, qk_norm=True, head_dim=32), 'qwen3'),  # head_dim != n_embd / n_head
    'gpt2': (dict(pos='learned', norm='layernorm', mlp='gelu', gelu_approximate='tanh', bias=True), 'gpt2'),
    'gpt2-untied': (dict(pos='learned', norm='layernorm', mlp='gelu', gelu_approximate='tanh',
                         tie_embeddings=False), 'gpt2'),
    'qwen3_moe': (dict(n_kv_head=2, qk_norm=True, n_experts=4, n_experts_active=2, mlp_hidden=32), 'qwen3moe'),
    'mixtral': (dict(n_kv_head=2, n_experts=4, n_experts_active=2, mlp_hidden=32), 'llama'),
}
LOADABLE = [name for name in ARCHITECTURES if name != 'mixtral']  # transformers reads a 'llama' GGUF as dense
MESSAGES = [{'role': 'system', 'content': 'Answer briefly.'}, {'role': 'user', 'content': 'What is 12+30?'},
            {'role': 'assistant', 'content': '12+30 = 42'}, {'role': 'user', 'content': 'Who are you? ünïcode ✓'}]
STDLIB = sysconfig.get_paths()['stdlib']
# none of these trained the tokenizer
SAMPLE = ''.join(open(os.path.join(STDLIB, name), encoding='utf-8').read()
                 for name in ('json/decoder.py', 'calendar.py', 'pprint.py', 'email/_header_value_parser.py'))
EDGE_CASES = [
    "it's IT'S we'll I'M they'Ve you'D 'twas ''s x'\ny don’t", "x = 1234567890 + ３４５ + ٣٤٥ + ½ + Ⅻ",
    "1.5e-10", "naïve café 中文字符 日本語 한국어 Привет мир ελληνικά עברית", "emoji 🙂👍🏽 zero\u200bwidth",
    "e\u0301 n\u0303",
    "tabs\t\tand  spaces   \n\n\r\n  \n\t\n", "trailing   ", "  leading", "\n", " ", "", "a\u00a0b\u2003c\u3000d",
    "line\u2028sep\u0085nel\x0bvt\x0cff", "!!!???...\n\n", " (x)\r\n", "a\r\rb\n\r\nc", "__init__ = {'a': [1, 2]}\n",
    "'", "' '", "'\n", "'1", "'a", "''", "' s", " 's", "\t's", "x' \t\n\t ", "\u00a0\n", "\n\u00a0x",
]


@pytest.fixture(scope='module')
def tok(tiny_data_dir):
    data_root, dataset = tiny_data_dir
    return Tokenizer.load(os.path.join(data_root, dataset, 'tokenizer.json'))


def random_checkpoint(tok, stage='sft', **flags):
    """A tiny GPT whose weights are all non-trivial (biases and norm gains too), as a checkpoint dict.
    vocab_size is past the tokenizer's, so the file has unused padding ids too."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64 * (tok.n_vocab // 64 + 1), block_size=128, n_layer=2, n_head=4, n_embd=64, **flags)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, {'model': model.state_dict(), 'model_args': cfg.to_dict(), 'tokenizer': tok.spec, 'stage': stage}


def llama_cpp_split(pattern, text):
    """Text -> pieces as llama.cpp's regex pre-tokenizer cuts them: every match, and every stretch no
    alternative matched as a piece of its own (unicode.cpp, unicode_regex_split_stl)."""
    pieces, end = [], 0
    for m in regex.finditer(pattern, text):
        if m.start() > end:
            pieces.append(text[end:m.start()])
        pieces.append(m.group())
        end = m.end()
    return pieces + ([text[end:]] if end < len(text) else [])


def fuzz_texts(n=3000, seed=0):
    """Random short strings over the characters a split pattern treats differently."""
    alphabet = list("aZé中 1٣½\t\n\r\u00a0\u2003\u0085'’.,(_-!?\"")
    alphabet += ["'s", "'T", "'ll", "'RE", "'ve", "'m", "'d"]
    rng = random.Random(seed)
    return [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def field(reader, key):
    return reader.fields[key].contents()


# ----------------------------------------------------------------------------- the pre-tokenizer

@pytest.mark.parametrize('name,ours', [('qwen2', SPLIT_PATTERN), ('gpt-2', GPT2_PATTERN)])
def test_llama_cpp_pre_tokenizer_splits_like_our_pattern(name, ours):
    """llama.cpp's regex for tokenizer.ggml.pre=NAME (copied from its source) and ours cut the stdlib
    sample, the edge cases and fuzzed strings into the same pieces ('ſ' aside: see the next test)."""
    theirs = gguf_export.LLAMA_CPP_SPLITS[name]
    for text in [SAMPLE] + EDGE_CASES + fuzz_texts():
        assert llama_cpp_split(theirs, text) == regex.findall(ours, text), repr(text[:200])


def test_the_one_qwen2_split_difference_is_a_long_s_contraction():
    """Our contractions are case-insensitive, (?i:[sdmt]|ll|ve|re), and Unicode case folding puts the
    long s 'ſ' (U+017F) with 's'; llama.cpp spells qwen2's out as [sS]. No other character folds onto
    a contraction letter, so "'ſ" + letters is the only text the two split differently."""
    every_code_point = ''.join(map(chr, range(128, 0x110000)))
    folds = set(regex.findall(r'(?i:[sdmtlvre])', every_code_point))
    assert folds == {'ſ'}
    assert regex.findall(SPLIT_PATTERN, "it'ſt") == ['it', "'ſ", 't']
    assert llama_cpp_split(gguf_export.LLAMA_CPP_SPLITS['qwen2'], "it'ſt") == ['it', "'ſt"]


def test_our_bpe_over_llama_cpp_pieces_gives_our_ids(tok):
    """The real engine: tiktoken encoding each of llama.cpp's pieces alone gives the ids it gives the
    whole text (BPE never merges across pieces, so a different cut would show as other ids)."""
    for text in [SAMPLE] + EDGE_CASES:
        pieces = llama_cpp_split(gguf_export.LLAMA_CPP_SPLITS['qwen2'], text)
        assert [i for p in pieces for i in tok.enc.encode_ordinary(p)] == tok.encode(text), repr(text[:200])


# ----------------------------------------------------------------------------- RoPE permutation

@pytest.mark.parametrize('n_head,n_kv_head', [(4, 4), (4, 2), (4, 1)])
def test_permuted_q_k_under_interleaved_rope_give_our_attention_scores(n_head, n_kv_head):
    """llama.cpp's 'llama' RoPE rotates pairs (2i, 2i+1) by p * theta^(-2i/hs) (ggml_rope, mode 0); ours
    rotates (i, hs/2 + i). With q and k rows permuted as the export permutes them, q.k is ours."""
    torch.manual_seed(0)
    T, C, hs = 7, 32, 16
    x = torch.randn(T, C, dtype=torch.float64)
    wq, wk = torch.randn(n_head * hs, C, dtype=torch.float64), torch.randn(n_kv_head * hs, C, dtype=torch.float64)
    cos_table, sin_table = (t.double() for t in rope_cache(T, hs, 10000.0))  # (T, hs): apply_rope's layout
    cos, sin = cos_table[:, :hs // 2], sin_table[:, hs // 2:]  # (T, hs/2): each pair's angle

    def ours(w, n):
        return apply_rope((x @ w.t()).view(T, n, hs), cos_table[:, None], sin_table[:, None]).transpose(0, 1)  # (n, T, hs)

    def llama_cpp(w, n):
        y = (x @ gguf_export.permute_for_llama_rope(w, n).t()).view(T, n, hs).transpose(0, 1)
        even, odd = y[..., 0::2], y[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def scores(q, k):  # (n_head, T, T); query head h reads key head h // (n_head // n_kv_head)
        return q @ k.repeat_interleave(n_head // n_kv_head, dim=0).transpose(1, 2)

    torch.testing.assert_close(scores(llama_cpp(wq, n_head), llama_cpp(wk, n_kv_head)),
                               scores(ours(wq, n_head), ours(wk, n_kv_head)), rtol=1e-12, atol=1e-10)
    assert not torch.allclose(gguf_export.permute_for_llama_rope(wq, n_head), wq)  # it does move rows


# ----------------------------------------------------------------------------- the file

def expected_tensors(model, arch):
    """What llama.cpp expects, written out from our module names: {GGUF name: fp32 tensor}."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    perm = gguf_export.permute_for_llama_rope if arch == 'llama' else (lambda w, n: w)
    out = {'token_embd.weight': sd['transformer.wte.weight'], 'output_norm.weight': sd['transformer.ln_f.weight']}
    if not c.tie_embeddings:
        out['output.weight'] = sd['lm_head.weight']
    if arch == 'gpt2':  # GPT-2 has every bias: ours, or zeros where our model has none
        zeros_or = lambda key, n: sd.get(key, torch.zeros(n))  # noqa: E731
        out['position_embd.weight'] = sd['transformer.wpe.weight']
        out['output_norm.bias'] = zeros_or('transformer.ln_f.bias', c.n_embd)
    for i in range(c.n_layer):
        p, b = f'transformer.h.{i}.', f'blk.{i}.'
        out[b + 'attn_norm.weight'], out[b + 'ffn_norm.weight'] = sd[p + 'ln_1.weight'], sd[p + 'ln_2.weight']
        if arch == 'gpt2':
            for ours, theirs, n in (('ln_1', 'attn_norm', c.n_embd), ('ln_2', 'ffn_norm', c.n_embd),
                                    ('attn.c_attn', 'attn_qkv', 3 * c.n_embd), ('attn.c_proj', 'attn_output', c.n_embd),
                                    ('mlp.c_fc', 'ffn_up', c.mlp_hidden), ('mlp.c_proj', 'ffn_down', c.n_embd)):
                if not ours.startswith('ln'):
                    out[b + theirs + '.weight'] = sd[p + ours + '.weight']
                out[b + theirs + '.bias'] = zeros_or(p + ours + '.bias', n)
            continue
        wq, wk, wv = sd[p + 'attn.c_attn.weight'].split([q, kv, kv])
        out[b + 'attn_q.weight'], out[b + 'attn_k.weight'] = perm(wq, c.n_head), perm(wk, c.n_kv_head)
        out[b + 'attn_v.weight'] = wv
        if c.bias or c.qkv_bias:
            bq, bk, bv = sd[p + 'attn.c_attn.bias'].split([q, kv, kv])
            out[b + 'attn_q.bias'], out[b + 'attn_k.bias'] = perm(bq, c.n_head), perm(bk, c.n_kv_head)
            out[b + 'attn_v.bias'] = bv
        out[b + 'attn_output.weight'] = sd[p + 'attn.c_proj.weight']
        if c.bias:
            out[b + 'attn_output.bias'] = sd[p + 'attn.c_proj.bias']
        if c.qk_norm:
            out[b + 'attn_q_norm.weight'] = sd[p + 'attn.q_norm.weight']
            out[b + 'attn_k_norm.weight'] = sd[p + 'attn.k_norm.weight']
        if c.n_experts:  # ours: w_in (E, C, [gate | up]), w_out (E, H, C)
            gate, up = sd[p + 'mlp.w_in'].chunk(2, dim=-1)
            out[b + 'ffn_gate_inp.weight'] = sd[p + 'mlp.router.weight']
            out[b + 'ffn_gate_exps.weight'], out[b + 'ffn_up_exps.weight'] = gate.transpose(1, 2), up.transpose(1, 2)
            out[b + 'ffn_down_exps.weight'] = sd[p + 'mlp.w_out'].transpose(1, 2)
            continue
        gate, up = sd[p + 'mlp.c_fc.weight'].chunk(2)
        out[b + 'ffn_gate.weight'], out[b + 'ffn_up.weight'] = gate, up
        out[b + 'ffn_down.weight'] = sd[p + 'mlp.c_proj.weight']
        if c.bias:
            out[b + 'ffn_gate.bias'], out[b + 'ffn_up.bias'] = sd[p + 'mlp.c_fc.bias'].chunk(2)
            out[b + 'ffn_down.bias'] = sd[p + 'mlp.c_proj.bias']
    return out


def read_tensors(reader):
    """{name: (GGML type, fp32 tensor in torch's dim order)} of a GGUF file."""
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))  # ggml lists dims innermost first
        out[t.name] = (t.tensor_type, torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(shape))
    return out


def expected_tokens(tok, vocab_size):
    """Our ids in order, spelled in GPT-2's byte-to-unicode alphabet; then the padding ids."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spell = bytes_to_unicode()
    by_id = {r: ''.join(spell[b] for b in token) for token, r in tok.enc._mergeable_ranks.items()}
    by_id.update({i: name for name, i in tok.special_tokens.items()})
    return [by_id.get(i, f'[PAD{i}]') for i in range(vocab_size)]


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_gguf_holds_our_weights_and_metadata(tok, tmp_path, name):
    flags, arch = ARCHITECTURES[name]
    model, ckpt = random_checkpoint(tok, **flags)
    c = model.config
    path = gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf'))
    reader = gguf.GGUFReader(path)

    # every tensor, nothing else (a tied head has no output.weight)
    expected, stored = expected_tensors(model, arch), read_tensors(reader)
    assert sorted(stored) == sorted(expected)
    for key, (qtype, tensor) in stored.items():
        assert qtype == gguf.GGMLQuantizationType.F32, key
        assert torch.equal(tensor, expected[key]), key

    # the model's metadata, under the keys llama.cpp reads
    meta = lambda key: field(reader, f'{arch}.{key}')  # noqa: E731
    assert field(reader, 'general.architecture') == arch and field(reader, 'general.name') == 'model'
    assert field(reader, 'general.file_type') == gguf.LlamaFileType.ALL_F32
    assert (meta('context_length'), meta('embedding_length'), meta('block_count'), meta('feed_forward_length'),
            meta('attention.head_count'), meta('attention.head_count_kv'), meta('vocab_size')) == \
        (c.block_size, c.n_embd, c.n_layer, c.mlp_hidden, c.n_head, c.n_kv_head, c.vocab_size)
    if arch == 'gpt2':
        assert meta('attention.layer_norm_epsilon') == pytest.approx(c.norm_eps, rel=1e-6)
    else:
        assert meta('attention.key_length') == meta('attention.value_length') == c.head_dim
        assert meta('rope.dimension_count') == c.head_dim
        assert meta('rope.freq_base') == c.rope_theta
        assert meta('attention.layer_norm_rms_epsilon') == pytest.approx(c.norm_eps, rel=1e-6)
    if c.n_experts:
        assert (meta('expert_count'), meta('expert_used_count'), meta('expert_feed_forward_length')) == \
            (c.n_experts, c.n_experts_active, c.mlp_hidden)

    # the tokenizer: byte-level BPE, our ids, specials CONTROL, padding UNUSED, merges that make our tokens
    # (transformers' TikTokenConverter recovers them from tiktoken's ranks: every pair that makes a token)
    tokens, types = field(reader, 'tokenizer.ggml.tokens'), field(reader, 'tokenizer.ggml.token_type')
    assert field(reader, 'tokenizer.ggml.model') == 'gpt2' and field(reader, 'tokenizer.ggml.pre') == 'qwen2'
    assert tokens == expected_tokens(tok, c.vocab_size)
    special = set(tok.special_tokens.values())
    assert types == [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i < tok.n_vocab
                     else gguf.TokenType.UNUSED for i in range(c.vocab_size)]
    merged = [a + b for a, b in (m.split(' ') for m in field(reader, 'tokenizer.ggml.merges'))]
    assert set(merged) == set(tokens[256:len(tok.enc._mergeable_ranks)])  # every learned token, nothing else
    assert (field(reader, 'tokenizer.ggml.bos_token_id'), field(reader, 'tokenizer.ggml.eos_token_id'),
            field(reader, 'tokenizer.ggml.eot_token_id'), field(reader, 'tokenizer.ggml.padding_token_id')) == \
        (tok.eot_id, tok.eot_id, tok.im_end_id, tok.pad_id)
    assert field(reader, 'tokenizer.ggml.add_bos_token') is False
    assert field(reader, 'tokenizer.chat_template') == hf.CHATML_TEMPLATE


@pytest.mark.parametrize('name', LOADABLE)
def test_transformers_gguf_loader_gives_our_logits(tok, tmp_path, name):
    model, ckpt = random_checkpoint(tok, **ARCHITECTURES[name][0])
    loaded = gguf_export.load_exported(gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf')))
    prompt = torch.tensor([tok.render_prompt(MESSAGES)])
    random_ids = torch.randint(0, tok.n_vocab, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ids in (prompt, random_ids):
            assert (model(ids)[0] - loaded(ids).logits).abs().max().item() <= 1e-4


def test_transformers_cannot_load_a_mixtral_gguf_and_says_so(tok, tmp_path):
    _, ckpt = random_checkpoint(tok, **ARCHITECTURES['mixtral'][0])
    path = gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf'))
    with pytest.raises(NotImplementedError, match='Mixtral.*--check=False'):
        gguf_export.load_exported(path)


def test_transformers_tokenizer_from_the_gguf_has_our_ids_and_chat_template(tok, tmp_path):
    _, ckpt = random_checkpoint(tok)
    gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf'))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='model.gguf')
    for text in [SAMPLE] + EDGE_CASES:
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), repr(text[:200])
    chat = tok.decode(tok.render_prompt(MESSAGES))
    assert theirs.encode(chat, add_special_tokens=False) == tok.encode(chat, allow_special=True)
    assert theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == chat


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('name', ['llama-untied-bias-mqa', 'gpt2', 'qwen3_moe'])
def test_half_precision_file_holds_half_matrices_and_f32_vectors(tok, tmp_path, name, dtype):
    """Matrices in f16/bf16; 1-D tensors, norms, the router and GPT-2's position table in f32, as
    convert_hf_to_gguf keeps them; every value our weight rounded to dtype."""
    flags, arch = ARCHITECTURES[name]
    model, ckpt = random_checkpoint(tok, **flags)
    path = gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf'), dtype)
    reader = gguf.GGUFReader(path)
    half = {'float16': gguf.GGMLQuantizationType.F16, 'bfloat16': gguf.GGMLQuantizationType.BF16}[dtype]
    assert field(reader, 'general.file_type') == {'float16': 1, 'bfloat16': 32}[dtype]
    expected = expected_tensors(model, arch)
    for key, (qtype, tensor) in read_tensors(reader).items():
        full = (tensor.dim() == 1 or key.endswith('_norm.weight') or 'ffn_gate_inp' in key
                or key.startswith('position_embd'))
        assert qtype == (gguf.GGMLQuantizationType.F32 if full else half), key
        assert torch.equal(tensor, expected[key].to(getattr(torch, dtype)).float()), key
    rounded = model
    with torch.no_grad():  # our weights as the file rounds them (parameters only: RoPE's tables stay fp32)
        for p in rounded.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    ids = torch.tensor([tok.render_prompt(MESSAGES)])
    with torch.no_grad():
        assert (rounded(ids)[0] - gguf_export.load_exported(path)(ids).logits).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- what is refused

@pytest.mark.parametrize('flags,error,message', [
    (dict(pos='learned', norm='layernorm', mlp='gelu'), ValueError, "gelu_approximate=tanh"),
    (dict(qk_norm=True, qkv_bias=True), ValueError, "qwen3 has no attention biases"),
    (dict(qk_norm=True, n_experts=4, moe_renormalize=False), ValueError, "always renormalises"),
    (dict(norm='layernorm'), ValueError, "has no transformers architecture"),
    (dict(n_experts=4, n_shared_experts=1), ValueError, "n_shared_experts"),
])
def test_flags_llama_cpp_cannot_run_exactly_are_refused_with_the_reason(tok, tmp_path, flags, error, message):
    _, ckpt = random_checkpoint(tok, **flags)
    path = str(tmp_path / 'model.gguf')
    with pytest.raises(error, match=message):
        gguf_export.save_gguf(ckpt, path)
    assert not os.path.exists(path) and not os.path.exists(path + '.tmp')


def test_tokenizers_llama_cpp_has_no_equivalent_for_are_refused(tok, tmp_path):
    _, ckpt = random_checkpoint(tok)
    path = str(tmp_path / 'model.gguf')
    char = char_tokenizer("some text\n")
    with pytest.raises(ValueError, match='char tokenizer has no llama.cpp equivalent'):
        gguf_export.save_gguf({**ckpt, 'tokenizer': char.spec}, path)
    with pytest.raises(NotImplementedError, match="kind 'hf'.*not supported yet"):
        gguf_export.save_gguf({**ckpt, 'tokenizer': {'kind': 'hf', 'special_tokens': {}}}, path)
    other_split = train_bpe([SAMPLE[:20000]], 300, pattern=r"\S+|\s+")
    with pytest.raises(ValueError, match='no llama.cpp pre-tokenizer'):
        gguf_export.save_gguf({**ckpt, 'tokenizer': other_split.spec}, path)
    with pytest.raises(ValueError, match="dtype='int8'"):
        gguf_export.save_gguf(ckpt, path, 'int8')
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_export_script_writes_a_gguf_that_passes_its_own_check(tok, tmp_path, dtype):
    _, ckpt = random_checkpoint(tok, **ARCHITECTURES['llama-untied-bias-mqa'][0])
    save_checkpoint(ckpt, str(tmp_path / 'run' / 'ckpt.pt'))
    path = tmp_path / 'out.gguf'
    proc = run_script('export.py', f'--out_dir={tmp_path / "run"}', '--export_format=gguf', f'--export_path={path}',
                      f'--dtype={dtype}', env={'OMP_NUM_THREADS': '1'}, timeout=300)
    assert f'wrote {path}' in proc.stdout and 'check: max |logit difference|' in proc.stdout, proc.stdout
    reader = gguf.GGUFReader(str(path))
    assert field(reader, 'general.architecture') == 'llama' and field(reader, 'general.name') == 'out'


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_llama_cpp_greedy_decodes_our_tokens(tok, tmp_path, name):
    """llama.cpp itself (llama-cpp-python) runs the file: greedy decoding gives our tokens."""
    llama_cpp = pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed '
                                                        '(pip install llama-cpp-python)')
    model, ckpt = random_checkpoint(tok, **ARCHITECTURES[name][0])
    llm = llama_cpp.Llama(model_path=gguf_export.save_gguf(ckpt, str(tmp_path / 'model.gguf')), n_ctx=128,
                          verbose=False)
    prompt = tok.render_prompt(MESSAGES)
    ours = model.generate(torch.tensor([prompt]), 8, temperature=0)[0, len(prompt):].tolist()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
    assert llm.tokenize(SAMPLE[:5000].encode(), add_bos=False, special=False) == tok.encode(SAMPLE[:5000])
