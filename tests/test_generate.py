"""generate.py: the cached, batched, ragged decode loop is exact; each sampling option does what it says."""

import math
from dataclasses import replace

import pytest
import torch

from generate import (GenerationConfig, TextGenerator, beam_search, draw, generate_ids, min_p_filter, sample_token,
                      top_k_filter, top_p_filter)
from model import GPT, GPTConfig
from tokenizer import char_tokenizer, train_bpe

CHARS = 'abcdefghijklmnopqrstuvwxyz .,\n'
GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=24)


def random_model(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return GPT(GPTConfig(**{**base, **kw})).eval()


def bigram_model(tok, table):
    """A GPT whose next token depends only on the current one: p(next | cur) = table[cur][next].
    Its block's output projections are zero, so the residual stream is the token embedding; the
    embeddings are one-hot (RMS-normalised to sqrt(C)) and lm_head's column for token i holds
    log p(. | i) / sqrt(C). Unlisted next tokens get log p = -20. Tokens are ids or one-token strings."""
    C = tok.n_vocab + tok.n_vocab % 2
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=1, n_embd=C,
                          tie_embeddings=False))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(tok.n_vocab, C))
        head = torch.full((tok.n_vocab, C), -20.0)
        for cur, nexts in table.items():
            for nxt, p in nexts.items():
                head[token_id(tok, nxt), token_id(tok, cur)] = math.log(p)
        model.lm_head.weight.copy_(head / math.sqrt(C))
    return model.eval()


def token_id(tok, token):
    if isinstance(token, int):
        return token
    (i,) = tok.encode(token, allow_special=True)
    return i


def ids(tok, text):
    return tok.encode(text)


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize('pos', ['rope', 'learned'])
def test_cached_greedy_matches_uncached_greedy(pos):
    model = random_model(48, pos=pos)
    prompt = torch.randint(0, 48, (1, 7))
    out = generate_ids(model, prompt, GREEDY)
    reference = model.generate(prompt, GREEDY.max_new_tokens, temperature=0, use_cache=False)
    assert out.rows()[0] == reference[0, 7:].tolist()


@pytest.mark.parametrize('pos', ['rope', 'learned'])
@pytest.mark.parametrize('extra', [{}, dict(repetition_penalty=1.5, presence_penalty=0.3)])
def test_batched_generation_equals_one_by_one_with_ragged_prompts(pos, extra):
    model = random_model(48, pos=pos)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42, 43]]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=20, **extra)
    stop_id = generate_ids(model, [prompts[0]], cfg).rows()[0][4]  # row 0 stops mid-way, the others later
    cfg = replace(cfg, stop_token_ids=(stop_id,))
    batched = generate_ids(model, prompts, cfg, pad_id=0)
    for row, prompt in enumerate(prompts):
        alone = generate_ids(model, [prompt], cfg)
        assert batched.rows()[row] == alone.rows()[0]
        n = len(alone.rows()[0])
        torch.testing.assert_close(batched.logprobs[row, :n], alone.logprobs[0, :n], atol=1e-4, rtol=1e-4)
    assert batched.stopped[0] and batched.rows()[0][-1] == stop_id


def test_rollout_logprobs_match_a_full_forward_and_mask_marks_generated_tokens():
    model = random_model(48)
    prompts = [[3, 4], [7, 8, 9, 10, 11]]
    out = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12, seed=0, stop_token_ids=(5,)), pad_id=0)
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape and out.stopped.shape == (2,)
    for row, prompt in enumerate(prompts):
        response = out.rows()[row]
        assert out.mask[row].sum() == len(response) and out.mask[row, :len(response)].all()
        assert bool(out.stopped[row]) == (response[-1] == 5)
        full = torch.tensor([prompt + response])
        logits, _ = model(full)
        logp = torch.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)  # predicts response tokens
        logp = logp.gather(-1, full[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(out.logprobs[row, :len(response)], logp, atol=1e-4, rtol=1e-4)
        assert (out.logprobs[row, len(response):] == 0).all()


def test_generation_past_block_size_is_a_clear_error():
    model = random_model(48)
    with pytest.raises(ValueError, match='block_size'):
        generate_ids(model, [[1] * 60], GenerationConfig(max_new_tokens=10))


# ----------------------------------------------------------------------------- sampling options

def test_top_k_1_equals_greedy():
    model = random_model(48)
    prompts = [[1, 2, 3], [9]]
    greedy = generate_ids(model, prompts, GREEDY).rows()
    top_k_1 = GenerationConfig(temperature=1.5, top_k=1, max_new_tokens=24, seed=1)
    assert generate_ids(model, prompts, top_k_1).rows() == greedy


def test_very_small_top_p_equals_greedy():
    model = random_model(48)
    prompts = [[1, 2, 3], [9]]
    greedy = generate_ids(model, prompts, GREEDY).rows()
    tiny_top_p = GenerationConfig(temperature=1.5, top_p=1e-6, max_new_tokens=24, seed=1)
    assert generate_ids(model, prompts, tiny_top_p).rows() == greedy


def test_min_p_near_one_equals_greedy():
    model = random_model(48)
    greedy = generate_ids(model, [[4, 5]], GREEDY).rows()
    assert generate_ids(model, [[4, 5]], GenerationConfig(min_p=0.999, max_new_tokens=24, seed=1)).rows() == greedy


def test_filters_keep_exactly_the_tokens_they_promise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()
    assert kept(top_k_filter(logits, 2)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.5)) == [True, False, False, False]   # 0.5 reaches 0.5
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False]    # 0.5 + 0.3 reaches 0.7
    assert kept(top_p_filter(logits, 0.9)) == [True, True, True, False]
    assert kept(min_p_filter(logits, 0.25)) == [True, True, True, False]    # 0.05 < 0.25 * 0.5
    assert sample_token(logits, temperature=0).tolist() == [0]


def test_same_seed_same_sample_and_different_seed_different_sample():
    model = random_model(48)
    cfg = lambda seed: GenerationConfig(max_new_tokens=24, seed=seed)
    a, b, c = (generate_ids(model, [[1, 2]], cfg(s)).rows() for s in (7, 7, 8))
    assert a == b and a != c


def test_draw_samples_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw(probs.expand(len(u), -1), u), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = probs[0] * len(u)
    chi2 = ((counts - expected)[[1, 3, 4]] ** 2 / expected[[1, 3, 4]]).sum()
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    # the ends of [0, 1), and probabilities that sum to a little less than 1 (rounding)
    edges = torch.tensor([0.0, 1.0 - 2 ** -24, 0.5])
    tokens = draw(torch.tensor([[0.0, 0.3, 0.0, 0.6999, 0.0]]).expand(3, -1), edges)
    assert tokens.tolist() == [1, 3, 3]


def test_a_batch_split_over_ranks_samples_what_one_process_samples():
    """rows=(first, total): each part of a batch draws its slice of one shared stream, so the
    rows of a batch sampled in two halves (two ranks) equal the whole batch sampled at once."""
    model = random_model(40)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)
    whole = generate_ids(model, prompts, config)
    halves = [generate_ids(model, prompts[i:i + 2], config, rows=(i, 4)) for i in (0, 2)]
    assert [r for h in halves for r in h.rows()] == whole.rows()
    assert generate_ids(model, prompts[2:], config).rows() != whole.rows()[2:]  # without rows: other numbers


def test_repetition_penalty_lowers_repeats():
    tok = char_tokenizer(CHARS)
    letters = 'abcdefghijklmnopqrstuvwxyz'
    # every letter prefers itself (0.6), then the next letter (0.3)
    table = {c: {c: 0.6, letters[(i + 1) % 26]: 0.3, letters[(i + 2) % 26]: 0.1} for i, c in enumerate(letters)}
    model = bigram_model(tok, table)
    repeats = lambda out: sum(a == b for a, b in zip(out, out[1:]))
    plain = generate_ids(model, [ids(tok, 'a')], GenerationConfig(temperature=0, max_new_tokens=16)).rows()[0]
    assert tok.decode(plain) == 'a' * 16
    # CTRL's penalty covers the prompt too; presence/frequency count output tokens only, so each
    # letter is emitted twice before its penalty applies
    for penalty, at_most in ((dict(repetition_penalty=3.0), 0), (dict(frequency_penalty=1.0), 8),
                             (dict(presence_penalty=1.0), 8)):
        cfg = GenerationConfig(temperature=0, max_new_tokens=16, **penalty)
        out = generate_ids(model, [ids(tok, 'a')], cfg).rows()[0]
        assert repeats(out) <= at_most < repeats(plain), (penalty, tok.decode(out))


# ----------------------------------------------------------------------------- beam search

def test_beam_width_1_equals_greedy():
    model = random_model(48)
    prompts = [[1, 2, 3], [9], [20, 21, 22, 23, 24]]
    free = generate_ids(model, prompts, GREEDY).rows()
    stop = (free[0][3],)  # make at least one row stop early
    greedy = generate_ids(model, prompts, replace(GREEDY, stop_token_ids=stop))
    beam = beam_search(model, prompts, GenerationConfig(num_beams=1, max_new_tokens=24, stop_token_ids=stop))
    assert beam.rows() == greedy.rows()
    assert beam.stopped.tolist() == greedy.stopped.tolist()


def test_beam_search_finds_a_more_likely_sequence_than_greedy():
    tok = char_tokenizer(CHARS)
    # greedy takes 'a' (0.5) and then faces a 5-way split (0.2): p = 0.1;
    # 'b' (0.4) is followed by 'h' almost surely (0.95): p = 0.38
    table = {'x': {'a': 0.5, 'b': 0.4, 'c': 0.1},
             'a': {c: 0.2 for c in 'cdefg'},
             'b': {'h': 0.95, 'c': 0.05}}
    model = bigram_model(tok, table)
    greedy = generate_ids(model, [ids(tok, 'x')], GenerationConfig(temperature=0, max_new_tokens=2))
    beam = generate_ids(model, [ids(tok, 'x')], GenerationConfig(num_beams=3, max_new_tokens=2))
    assert tok.decode(greedy.rows()[0])[0] == 'a' and tok.decode(beam.rows()[0]) == 'bh'
    assert beam.logprobs.sum() > greedy.logprobs.sum() + 1.0
    assert beam.logprobs.sum().item() == pytest.approx(math.log(0.4 * 0.95), abs=1e-3)


def test_batched_beam_search_equals_one_by_one_with_ragged_prompts():
    model = random_model(48)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [30, 31, 32]]
    cfg = GenerationConfig(num_beams=3, max_new_tokens=10, length_penalty=0.8, stop_token_ids=(7, 11))
    batched = generate_ids(model, prompts, cfg)
    for row, prompt in enumerate(prompts):
        alone = generate_ids(model, [prompt], cfg)
        assert batched.rows()[row] == alone.rows()[0]
        assert batched.scores[row].item() == pytest.approx(alone.scores[0].item(), abs=1e-4)


# ----------------------------------------------------------------------------- stopping

def chain_model():
    """x -> a -> b -> c -> d -> e -> ... deterministically."""
    tok = char_tokenizer(CHARS)
    chain = 'xabcdefghijklmnop'
    return tok, bigram_model(tok, {c: {n: 0.99} for c, n in zip(chain, chain[1:])})


def test_stop_token_ends_generation_exactly():
    tok, model = chain_model()
    out = generate_ids(model, [ids(tok, 'x')], GenerationConfig(temperature=0, max_new_tokens=20,
                                                                  stop_token_ids=tuple(ids(tok, 'd'))))
    assert tok.decode(out.rows()[0]) == 'abcd' and out.mask.sum() == 4 and out.stopped.all()
    gen = TextGenerator(model, tok)
    assert gen.generate('x', temperature=0, max_new_tokens=20, stop_token_ids=tuple(ids(tok, 'd'))) == 'abc'
    # without a stop, it runs to max_new_tokens and says so
    out = generate_ids(model, [ids(tok, 'x')], GenerationConfig(temperature=0, max_new_tokens=5))
    assert tok.decode(out.rows()[0]) == 'abcde' and not out.stopped.any()


def test_stop_string_ends_generation_exactly():
    tok, model = chain_model()
    gen = TextGenerator(model, tok)
    cfg = GenerationConfig(temperature=0, max_new_tokens=20, stop_strings=('def', 'zz'))
    out = gen.generate_ids(['x', 'b'], cfg)
    assert [tok.decode(r) for r in out.rows()] == ['abcdef', 'cdef']  # ends on the token completing it
    assert out.stopped.all()
    assert gen.generate(['x', 'b'], cfg) == ['abc', 'c']                # the text stops before it
    assert ''.join(gen.stream('x', cfg)) == 'abc'
    beam = gen.generate_ids(['x'], cfg, num_beams=2)
    assert tok.decode(beam.rows()[0]) == 'abcdef' and beam.stopped.all()


# ----------------------------------------------------------------------------- streaming and chat

def test_streaming_text_equals_final_text():
    tok = train_bpe(['héllo wörld, 日本語 and émojis 🙂 ' * 20, 'plain ascii text ' * 20], 300)
    model = random_model(tok.n_vocab)
    gen = TextGenerator(model, tok)
    for seed in range(4):
        cfg = GenerationConfig(max_new_tokens=40, seed=seed, stop_strings=('ll',))
        assert ''.join(gen.stream('h', cfg)) == gen.generate('h', cfg)


def test_streaming_shows_a_multibyte_character_whole_once_its_last_byte_arrives():
    tok = train_bpe(['abc ' * 50], 300)  # no merges involving é: its two bytes are two tokens
    c3, a9 = tok.encode('é')  # each lone byte is its own token
    model = bigram_model(tok, {'x': {c3: 0.99}, c3: {a9: 0.99}, a9: {'<|endoftext|>': 0.99}})
    gen = TextGenerator(model, tok)
    pieces = list(gen.stream('x', temperature=0, max_new_tokens=10))
    assert pieces == ['é'], pieces


def test_chat_history_truncation_keeps_the_newest_turns():
    tok = char_tokenizer(CHARS)
    model = random_model(tok.n_vocab, block_size=160)
    gen = TextGenerator(model, tok)
    messages = []
    for i in range(6):
        messages += [{'role': 'user', 'content': f'question {"abcdef"[i]}'},
                     {'role': 'assistant', 'content': f'answer {"abcdef"[i]}'}]
    messages = messages[:-1]  # ends with the user's question f
    prompt = tok.decode(gen.chat_prompt(messages, system='be brief', max_new_tokens=20))
    assert len(tok.encode(prompt, allow_special=True)) <= 160 - 20
    assert prompt.startswith('<|im_start|>system\nbe brief')
    assert 'question f' in prompt and 'answer e' in prompt and 'question a' not in prompt
    kept = [c for c in 'abcdef' if f'question {c}' in prompt]
    assert kept == list('abcdef'[-len(kept):])  # a contiguous run of the newest turns
    leading = tok.decode(gen.chat_prompt([{'role': 'system', 'content': 'be brief'}] + messages, max_new_tokens=20))
    assert leading == prompt  # a leading system message is the system prompt, kept like one
    one = tok.decode(gen.chat_prompt(messages, max_new_tokens=20, max_turns=1))
    assert 'question f' in one and 'question e' not in one
    with pytest.raises(ValueError, match='does not fit'):
        gen.chat_prompt(messages, max_new_tokens=150)
    reply = gen.chat(messages, system='be brief', max_new_tokens=8, temperature=0)
    assert isinstance(reply, str)



@pytest.mark.parametrize('penalties', [{}, {'repetition_penalty': 1.3, 'presence_penalty': 0.5}], ids=['plain', 'penalties'])
def test_padded_vocabulary_ids_are_never_sampled_without_a_tokenizer(penalties):
    """The model's vocabulary is padded to a multiple of 64; ppo.py samples through generate_ids
    with no tokenizer. Here the padded ids (40..63) are made the likeliest."""
    model = random_model(64)
    with torch.no_grad():
        model.lm_head.weight[40:] *= 30
    prompts = [[1, 2, 3]] * 16
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=0, **penalties)
    assert generate_ids(model, prompts, cfg).tokens.max() >= 40  # the test can fail: unmasked, they win
    for config in (replace(cfg, vocab_size=40), replace(cfg, vocab_size=40, num_beams=2)):
        assert generate_ids(model, prompts, config).tokens.max() < 40



@pytest.mark.parametrize('num_beams', [1, 3])
def test_max_new_tokens_zero_gives_empty_responses(num_beams):
    gen = generate_ids(random_model(64), [[1, 2, 3], [4]], GenerationConfig(max_new_tokens=0, num_beams=num_beams))
    assert gen.tokens.shape == (2, 0) and not gen.stopped.any()


# ----------------------------------------------------------------------------- the compiled static decode step

def test_compiled_static_decode_matches_eager():
    """The compiled step over the static cache decodes the same tokens and log-probs as the eager
    step: ragged prompts, and 8 unpadded ones (no key mask; fp32 attention's kernel for 8 rows or
    more), greedy and sampling with a seed."""
    from generate import compile_decode_step
    model = random_model(48)
    step = compile_decode_step(model)
    ragged = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [7]]
    unpadded = [[b, b + 1, b + 2, b + 3] for b in range(1, 9)]
    for prompts in (ragged, unpadded):
        for config in (GREEDY, GenerationConfig(temperature=1.0, top_k=20, max_new_tokens=24, seed=3)):
            eager = generate_ids(model, prompts, config)
            compiled = generate_ids(model, prompts, config, step_fn=step)
            assert torch.equal(compiled.tokens, eager.tokens)
            torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)


def test_compiled_decode_is_one_graph_for_every_step_prompt_length_and_batch_size(monkeypatch):
    """Dynamic shapes: every decode step of a call, and calls whose prompts and batches differ in
    size, reuse one graph per kind: 2-7 rows, 8 or more (fp32 attention switches kernels at 8),
    one row (dynamo keeps sizes of 1 fixed). The first batch has as many rows as the model has kv
    heads: without fix_head_sizes the two sizes shared a symbol and the next batch recompiled.
    Counted with a backend that records each compile."""
    import generate
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # graphs another test compiled for this code would be reused uncounted
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: real_compile(fn, **kw, backend=counting_backend))
    model = random_model(48)
    assert model.config.n_kv_head == 2
    step = generate.compile_decode_step(model)
    for rows in (2, 3, 5):
        for prompt_len in (3, 5, 9):
            generate_ids(model, [list(range(1, prompt_len + 1))] * rows, GREEDY, step_fn=step)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled"
    for rows in (8, 9, 16):
        generate_ids(model, [[1, 2, 3]] * rows, GREEDY, step_fn=step)
    assert len(graphs) == 2, f"{len(graphs)} graphs compiled"
    generate_ids(model, [[1, 2, 3]], GREEDY, step_fn=step)
    generate_ids(model, [[1, 2, 3, 4]], GREEDY, step_fn=step)
    assert len(graphs) == 3, f"{len(graphs)} graphs compiled"


def test_static_decode_attends_to_the_filled_slots_only(monkeypatch):
    """The compiled path's step attends to the filled slots, not to all max_len (which made it
    slower than eager at 32 rows), and decodes what the eager step does. The step runs uncompiled
    here, so a spy can see the keys' length; decode_steps takes it for the compiled path (a
    step_fn other than the model)."""
    import generate
    import model as model_module
    model = random_model(48, block_size=1024)
    prompt, config = [list(range(1, 17))], GenerationConfig(temperature=0.0, max_new_tokens=300)
    eager = generate_ids(model, prompt, config)
    attended = []
    real_attention = model_module.attention
    monkeypatch.setattr(model_module, 'attention', lambda q, k, v, *a, **kw: (attended.append(k.size(2)),
                                                                                real_attention(q, k, v, *a, **kw))[1])
    static = generate_ids(model, prompt, config, step_fn=lambda *args: generate.static_decode_step(model, *args))
    assert torch.equal(static.tokens, eager.tokens)
    per_step = attended[2:]  # the prefill's two layers first; then each decode step's two layers
    assert per_step[::2] == per_step[1::2] == [16 + step + 1 for step in range(299)]  # prompt, tokens so far, this one


def test_identical_prompts_are_prefilled_once_and_decode_as_alone(monkeypatch):
    """num_samples copies of a prompt (or GRPO's groups) run through the prefill once; each copy
    then decodes exactly as the prompt would alone."""
    model = random_model(48)
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [1, 2, 3]]
    prefill_rows = []
    forward = model.forward
    monkeypatch.setattr(model, 'forward', lambda idx, **kw: (prefill_rows.append(idx.shape) if idx.size(1) > 1 else None,
                                                              forward(idx, **kw))[1])
    out = generate_ids(model, prompts, GREEDY)
    assert prefill_rows == [(2, 3)]  # two distinct prompts, left-padded to 3
    for row, prompt in zip(out.tokens, prompts):
        assert torch.equal(row, generate_ids(model, [prompt], GREEDY).tokens[0])


def test_generation_under_bf16_autocast_keeps_its_cache_in_bf16(monkeypatch):
    """Rollouts and evals in a stage's dtype: under autocast the keys/values are computed in bf16
    and the cache holds them as such (not an fp32 copy cast back every step)."""
    import generate
    from model import KVCache
    caches = []

    def recording_cache(*args):
        caches.append(KVCache(*args))
        return caches[-1]

    monkeypatch.setattr(generate, 'KVCache', recording_cache)
    model = random_model(48)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = generate_ids(model, [[1, 2, 3], [4, 5]], GREEDY)
    fp32 = generate_ids(model, [[1, 2, 3], [4, 5]], GREEDY)
    assert caches[0].k[0].dtype == torch.bfloat16 and caches[1].k[0].dtype == torch.float32
    assert (bf16.tokens == fp32.tokens).float().mean() > 0.5  # a random model's near-ties may flip a few
