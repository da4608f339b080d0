"""
Text generation for every stage: sampling, beam search, streaming and chat, on a preallocated KV cache.

    prefill:  the (left-padded) prompts run once, filling the cache
    decode:   one token per step for all rows; a row that emits a stop token or completes a stop
              string is finished (it then emits pad, masked out) and the loop ends when all are

Three levels, each built on the one below:
    sample_token, top_k_filter, top_p_filter, min_p_filter, apply_penalties   pure (B, V) functions
    generate_ids(model, prompt_ids, config, pad_id) -> Generation                ids in, ids out (PPO/GRPO)
    TextGenerator(model, tokenizer).generate / stream / chat                     text in, text out
    TextStream(tokenizer, stop_strings).push(id) -> text                         ids to text as they come

Ragged prompts are left-padded so every row's last prompt token sits in the same column; each row
gets its own positions (its first real token is position 0) and a key mask that hides its pads.
Both are built once per call and sliced per step.
"""

import codecs
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from model import KVCache, compute_dtype  # the cache holds keys/values in the dtype they are computed in (autocast's)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0        # 0 = greedy (argmax)
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0              # nucleus: keep the smallest set with this much mass; 1 = off
    min_p: float = 0.0              # drop tokens less likely than min_p * p(most likely); 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, on prompt and output tokens; 1 = off
    presence_penalty: float = 0.0   # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    num_beams: int = 1              # > 1: deterministic beam search (sampling options are ignored)
    length_penalty: float = 1.0     # beam score = sum log p / length ** length_penalty
    early_stopping: bool = True     # beams: stop a prompt once num_beams hypotheses have finished
    stop_token_ids: Optional[tuple] = None  # TextGenerator: None = the tokenizer's <|endoftext|>, <|im_end|>
    stop_strings: tuple = ()        # generation ends right after the token that completes one
    seed: Optional[int] = None      # None = torch's global RNG
    vocab_size: int = 0             # ids >= this are never produced (the model pads its vocabulary to a
                                    # multiple of 64); 0 = the tokenizer's size when one is given, else all

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
                  (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 = off)"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1) (0 = off)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
                  (self.num_beams >= 1, "num_beams must be >= 1 (1 = no beam search)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GenerationConfig: {message}")
        self.stop_strings = tuple(self.stop_strings)

    @property
    def has_penalties(self):
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Generation:
    """Responses to a batch of prompts, padded on the right to a common length T."""
    tokens: torch.Tensor    # (B, T) response ids; pad_id after a row's end
    mask: torch.Tensor      # (B, T) bool, True on generated tokens (the stop token included)
    logprobs: torch.Tensor  # (B, T) log p(token) under the model's own distribution; 0 where masked
    stopped: torch.Tensor   # (B,) bool, True if the row ended on a stop token/string, not max_new_tokens
    scores: Optional[torch.Tensor] = None  # (B,) beam search: the best hypothesis' length-normalised score

    def rows(self):
        """Each row's generated ids as a list."""
        return [t[m].tolist() for t, m in zip(self.tokens, self.mask)]


# ----------------------------------------------------------------------------- sampling (pure)

def apply_penalties(logits, seen, counts, repetition=1.0, presence=0.0, frequency=0.0):
    """Discourage repeats. logits, counts: (B, V) float; seen: (B, V) bool.
    CTRL repetition penalty (Keskar et al. 2019), on every token seen in prompt or output: a positive
    logit is divided by r, a negative one multiplied by r, so the token gets less likely either way.
    OpenAI presence/frequency penalties, on output counts: logit -= presence * [count > 0] + frequency * count."""
    if repetition != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    if presence or frequency:
        logits = logits - presence * (counts > 0) - frequency * counts
    return logits


def mask_padded_ids(logits, n_real):
    """logits (B, V) with ids >= n_real (the model's vocabulary padding) at -inf; as is when n_real
    is 0 or covers V. Applied before penalties, which would otherwise lift the padding again."""
    if not n_real or n_real >= logits.size(-1):
        return logits
    logits = logits.clone()
    logits[:, n_real:] = float('-inf')
    return logits


def real_vocab_size(config, tokenizer):
    return config.vocab_size or (tokenizer.n_vocab if tokenizer is not None else 0)


def top_k_filter(logits, k):
    """Keep the k largest logits per row, -inf elsewhere."""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, [-1]]  # (B, 1)
    return logits.masked_fill(logits < kth, float('-inf'))


def top_p_filter(logits, p):
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass reaches p. A token is dropped when the mass before it already reaches p, so the
    most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float('-inf')))


def min_p_filter(logits, min_p):
    """Min-p (Nguyen et al. 2024): drop tokens with p < min_p * p(most likely token)."""
    probs = F.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float('-inf'))


def draw(probs, uniform):
    """Inverse-CDF sampling: per row, the first token whose cumulative probability passes the
    row's uniform number in [0, 1). One number per row (torch.multinomial draws its own), so the
    rows of a batch split over ranks can take their numbers from one shared stream, and N ranks
    sample exactly what one process would. Tokens with zero probability are never drawn."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None] * total, total.nextafter(torch.zeros_like(total)))  # < total: no rounding past the end
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None, uniform=None):
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else a draw from the softmax of
    logits / temperature after the top-k, top-p and min-p filters (in that order, as in HF).
    uniform: the rows' random numbers (B,) in [0, 1); default drawn from generator."""
    if temperature == 0:  # max's indices, not argmax: the same first maximum, 3-4x faster on the CPU (8 x 4096: 11 vs 43 us)
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p > 0.0:
        logits = min_p_filter(logits, min_p)
    if uniform is None:
        uniform = torch.rand(logits.size(0), generator=generator, device=logits.device)
    return draw(F.softmax(logits, dim=-1), uniform)


def token_logprobs(logits, tokens):
    """log p(tokens) under the unmodified model, (B, V), (B,) -> (B,): what a PPO ratio compares against."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- ragged prompts

def pad_prompts(prompts, pad_id, device):
    """Prompts (lists or 1-D tensors of ids, any lengths) -> left-padded ids (B, T) and each row's
    pad count (B,)."""
    rows = [p.tolist() if torch.is_tensor(p) else list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (start an empty one with tokenizer.eot_id)")
    T = max(len(r) for r in rows)
    idx = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)
    return idx, pad


def ragged_inputs(pad, T, max_len):
    """Positions and masks for left-padded prompts, built once per call and sliced per step.
    Returns positions (B, max_len), the prefill mask (B, 1, T, T) and the key mask (B, 1, 1, max_len);
    when no row is padded: positions (max_len,) and no masks (plain causal attention, the fast path)."""
    steps = torch.arange(max_len, device=pad.device)
    if not bool(pad.any()):
        return steps, None, None
    positions = (steps[None, :] - pad[:, None]).clamp(min=0)  # (B, max_len): a row's first real token is 0
    key_mask = (steps[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, max_len): pads are never keys
    causal = torch.ones(T, T, dtype=torch.bool, device=pad.device).tril()
    # a pad query attends to itself: a query with no key at all would give NaN, and NaN keys/values
    # in the cache poison every row through 0 * NaN in the attention sum
    eye = torch.eye(T, dtype=torch.bool, device=pad.device)
    prefill_mask = (causal & key_mask[..., :T]) | eye  # (B, 1, T, T)
    return positions, prefill_mask, key_mask


def check_fits(model, prompt_len, max_new_tokens):
    block_size = model.config.block_size
    if prompt_len + max_new_tokens > block_size:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"block_size ({block_size}): shorten the prompt or lower max_new_tokens")


def penalty_state(idx, pad, V):
    """What the penalties look at: seen (B, V) bool, the prompt's tokens (pads excluded), and
    counts (B, V) float of output tokens, zero so far."""
    real = (torch.arange(idx.size(1), device=idx.device) >= pad[:, None]).float()  # (B, T)
    seen = torch.zeros(idx.size(0), V, device=idx.device).scatter_add_(1, idx, real) > 0
    return seen, torch.zeros(idx.size(0), V, device=idx.device)


def completes_stop_string(ids, stop_bytes, decode_bytes):
    """True if the last token of `ids` completes one of the stop strings (as UTF-8 bytes). Each token
    is at least one byte, so a string of n bytes that ends in the last token lies in the last n tokens."""
    return any(s in decode_bytes(ids[-len(s):]) for s in stop_bytes)


# ----------------------------------------------------------------------------- decoding

def prefill(model, idx, positions, prefill_mask, max_len):
    """Run the prompts idx (B, T) into a new KVCache of max_len slots: (last logits (B, 1, V), cache).
    Identical prompts (num_samples copies of one, GRPO's groups) run once and their cache rows are
    copied: the prompt is prefilled once and shared."""
    B, T = idx.shape
    unique, copy_of = torch.unique(idx, dim=0, return_inverse=True)  # row b is unique row copy_of[b]
    if len(unique) == B:
        rows = None
    else:  # one representative row per distinct prompt
        rows = torch.empty(len(unique), dtype=torch.long, device=idx.device).scatter_(
            0, copy_of, torch.arange(B, device=idx.device))
        idx = idx[rows]
        positions = positions if positions.dim() == 1 else positions[rows]
        prefill_mask = None if prefill_mask is None else prefill_mask[rows]
    cache = KVCache(model.config, idx.size(0), max_len, idx.device, compute_dtype(model.lm_head.weight))
    logits, _ = model(idx, positions=positions[..., :T], attn_mask=prefill_mask, kv_cache=cache, last_only=True)
    if rows is not None:
        cache.reorder(copy_of)
        logits = logits[copy_of]
    return logits, cache


def static_decode_step(model, token, positions, key_mask, cache):
    """One decode step on the static cache (see KVCache): the token goes in cache slot cache.slot
    and attends to the first cache.length slots, which the caller keeps to the filled ones (this
    step's included). token (B, 1); positions (max_len,) or (B, max_len); key_mask None or
    (B, 1, 1, max_len), hiding pads. Returns logits (B, 1, V)."""
    mask = None if key_mask is None else key_mask[..., :cache.length]
    position = positions.index_select(-1, cache.slot)  # (1,) or (B, 1)
    return model(token, positions=position, attn_mask=mask, kv_cache=cache, last_only=True)[0]


def compile_decode_step(model):
    """static_decode_step compiled for `model` with dynamic shapes: the attended length, the
    cache's length and the batch size are symbols, so one graph replays for every step and call of
    a kind. The kinds: one row (dynamo keeps sizes of 1 fixed), 2-7 rows and 8 or more (in fp32 on
    the CPU model.attention switches kernels at 8 rows), each with padded prompts or not. With fixed
    shapes, one graph per attended length of 256, 512, 1024, ..., a step read ~1.5x the filled slots
    on average and at 32 rows was slower than the eager one (0.83-1.00x; now 1.11-1.16x), and the
    first calls for batches of 1, 8 and 32 compiled in 42 s from a cold inductor cache, now 25 s
    (bench_generate.py, Zen 5). On a GPU, CUDA graphs (mode='reduce-overhead') would record one
    graph per length; we have not measured it."""
    # dynamo falls back to eager after recompile_limit graphs of one function (8 by default): every
    # model compiled here shares the lambda's code, and each needs a graph per kind above
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(lambda *args: static_decode_step(model, *args), dynamic=True)


def fix_head_sizes(cache):
    """Mark the cache's head count and head size static for the compiled step. Dynamic shapes give
    equal sizes one symbol: a first batch of 2 rows with 2 kv heads tied the batch to the head
    count, and the next batch size compiled a new graph."""
    for t in cache.k + cache.v:  # (B, n_kv_head, max_len, head_dim)
        torch._dynamo.mark_static(t, 1)
        torch._dynamo.mark_static(t, 3)


@torch.inference_mode()
def decode_steps(model, prompts, config, pad_id=0, tokenizer=None, step_fn=None, rows=None, all_done=None):
    """The sampling loop, one yield per new token: (token, logprob, live, done), each (B,).
    live: the row was still generating (token is real); done: the row has ended (after this token).
    The model should be in eval mode. tokenizer is needed only for stop strings; step_fn, from
    compile_decode_step(model), runs the decode steps (prefill stays eager). rows = (first,
    total): these prompts are rows first.. of a batch of `total` split over ranks: every step
    draws `total` random numbers (from config.seed, the same on every rank) and uses this batch's
    slice. all_done(done) decides when the loop ends (default: when every row here is done; under
    FSDP, where each forward is a collective, when every rank's rows are)."""
    cfg, step_fn = config, (model if step_fn is None else step_fn)
    device = model.lm_head.weight.device
    idx, pad = pad_prompts(prompts, pad_id, device)  # (B, T)
    B, T = idx.shape
    check_fits(model, T, cfg.max_new_tokens)
    max_len = T + cfg.max_new_tokens
    positions, prefill_mask, key_mask = ragged_inputs(pad, T, max_len)
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop_ids = list(cfg.stop_token_ids or ())
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    stop_bytes = [s.encode('utf-8') for s in cfg.stop_strings if s]
    assert not stop_bytes or tokenizer is not None, "stop strings need the tokenizer"
    history = [[] for _ in range(B)] if stop_bytes else None  # generated ids, for stop strings
    can_stop = bool(stop_ids or stop_bytes)

    logits, cache = prefill(model, idx, positions, prefill_mask, max_len)
    if step_fn is not model:  # the compiled decode steps write at cache slot `slot` (static mode)
        cache.slot = torch.zeros(1, dtype=torch.long, device=device)
        fix_head_sizes(cache)
    if cfg.has_penalties:
        seen, counts = penalty_state(idx, pad, logits.size(-1))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_real = real_vocab_size(cfg, tokenizer)
    first, total = rows or (0, B)
    for t in range(cfg.max_new_tokens):
        logits = logits[:, -1].float()  # (B, V)
        processed = mask_padded_ids(logits, n_real)  # never an id the tokenizer lacks
        if cfg.has_penalties:
            processed = apply_penalties(processed, seen, counts, cfg.repetition_penalty,
                                        cfg.presence_penalty, cfg.frequency_penalty)
        uniform = torch.rand(total, generator=generator, device=device)[first:first + B] if cfg.temperature else None
        token = sample_token(processed, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, uniform=uniform)  # (B,)
        logprob = token_logprobs(logits, token)
        live = ~done
        token = token.masked_fill(done, pad_id)
        done = done | torch.isin(token, stops)
        if history is not None:
            ended = []
            for b, (tok, alive) in enumerate(zip(token.tolist(), live.tolist())):
                if alive:
                    history[b].append(tok)
                    if completes_stop_string(history[b], stop_bytes, tokenizer.decode_bytes):
                        ended.append(b)
            done[ended] = True
        yield token, logprob, live, done
        if t == cfg.max_new_tokens - 1 or (can_stop and (all_done(done) if all_done else bool(done.all()))):
            return
        if cfg.has_penalties:
            seen.scatter_(1, token[:, None], True)
            counts.scatter_add_(1, token[:, None], torch.ones_like(logprob)[:, None])
        i = T + t  # cache slot of this token
        if step_fn is model:
            logits, _ = model(token[:, None], positions=positions[..., i:i + 1],
                              attn_mask=None if key_mask is None else key_mask[..., :i + 1], kv_cache=cache)
        else:  # the compiled step: one graph, the attended length a symbol in it
            cache.slot.fill_(i)
            cache.length = i + 1
            logits = step_fn(token[:, None], positions, key_mask, cache)


def generate_ids(model, prompts, config=None, pad_id=0, tokenizer=None, step_fn=None, rows=None, all_done=None):
    """Prompt ids (ragged) -> Generation(tokens, mask, logprobs, stopped): the batched entry point for
    rollouts and evals. Sampling or greedy per `config`, beam search when config.num_beams > 1; rows
    stop on config.stop_token_ids (here None = none) and, given the tokenizer, on config.stop_strings.
    rows, all_done: see decode_steps (a batch split over ranks)."""
    cfg = config or GenerationConfig()
    if cfg.num_beams > 1:
        return beam_search(model, prompts, cfg, pad_id, tokenizer)
    steps = list(decode_steps(model, prompts, cfg, pad_id, tokenizer, step_fn, rows, all_done))
    if not steps:
        return empty_generation(len(prompts), model.lm_head.weight.device)
    tokens, logprobs, mask, done = (torch.stack(x, dim=1) for x in zip(*steps))  # (B, T) each
    return Generation(tokens, mask, logprobs.masked_fill(~mask, 0.0), done[:, -1])


def empty_generation(n, device):
    """The Generation of n prompts with no new token (max_new_tokens=0)."""
    empty = torch.zeros(n, 0, dtype=torch.long, device=device)
    return Generation(empty, empty.bool(), empty.float(), empty.new_zeros(n, dtype=torch.bool))


@torch.inference_mode()
def beam_search(model, prompts, config, pad_id=0, tokenizer=None):
    """Keep the num_beams best partial responses per prompt, ranked by summed log-probability. A beam
    that emits a stop token (or completes a stop string) becomes a finished hypothesis with score
    sum log p / length ** length_penalty (length counts the stop token). A prompt is done when it
    has num_beams hypotheses (early_stopping) or, without early stopping, when no running beam can
    beat the worst of them at its current length (the HF heuristic). At max_new_tokens the running
    beams join the hypotheses; each prompt returns its best. Penalties apply; sampling options don't."""
    cfg, W = config, config.num_beams
    device = model.lm_head.weight.device
    if cfg.max_new_tokens == 0:  # nothing to rank (a hypothesis of length 0 has no length-normalised score)
        return empty_generation(len(prompts), device)
    idx, pad = pad_prompts(prompts, pad_id, device)
    B, T = idx.shape
    check_fits(model, T, cfg.max_new_tokens)
    # prompt b's beams are rows b*W .. b*W+W-1; beams move only within their prompt's rows, so the
    # positions and masks (per prompt) never need reordering, only the cache does
    idx, pad = idx.repeat_interleave(W, dim=0), pad.repeat_interleave(W, dim=0)  # (B*W, T)
    max_len = T + cfg.max_new_tokens
    positions, prefill_mask, key_mask = ragged_inputs(pad, T, max_len)
    cache = KVCache(model.config, B * W, max_len, device, compute_dtype(model.lm_head.weight))
    stop_set = set(cfg.stop_token_ids or ())
    stop_bytes = [s.encode('utf-8') for s in cfg.stop_strings if s]
    beam_scores = torch.full((B, W), float('-inf'), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    beam_tokens = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    beam_logprobs = torch.zeros(B * W, 0, device=device)
    hyps = [[] for _ in range(B)]  # per prompt: (score, tokens, logprobs, stopped), best first
    done = [False] * B
    if cfg.has_penalties:
        seen, counts = penalty_state(idx, pad, model.config.vocab_size)

    def add_hyp(b, score_sum, tokens, logprobs, length, stopped):
        hyps[b].append((score_sum / length ** cfg.length_penalty, tokens, logprobs, stopped))
        hyps[b].sort(key=lambda h: -h[0])
        del hyps[b][W:]

    logits, _ = model(idx, positions=positions[..., :T], attn_mask=prefill_mask, kv_cache=cache, last_only=True)
    n_real = real_vocab_size(cfg, tokenizer)
    for t in range(cfg.max_new_tokens):
        raw = mask_padded_ids(logits[:, -1].float(), n_real)  # (B*W, V), no padded ids
        V = raw.size(-1)
        logp_raw = F.log_softmax(raw, dim=-1)
        logp = logp_raw
        if cfg.has_penalties:
            logp = F.log_softmax(apply_penalties(raw, seen, counts, cfg.repetition_penalty,
                                                 cfg.presence_penalty, cfg.frequency_penalty), dim=-1)
        # 1 + n_stop candidates per beam: even if stops take some, W beams can continue
        k = min((1 + len(stop_set) + len(stop_bytes)) * W, W * V)
        cand_scores, cand = (beam_scores.view(-1, 1) + logp).view(B, W * V).topk(k, dim=-1)  # (B, k)
        cand_src = (cand // V + torch.arange(B, device=device)[:, None] * W).tolist()  # flat source row
        cand_tok, cand_scores = (cand % V).tolist(), cand_scores.tolist()
        history = beam_tokens.tolist() if stop_bytes else None
        next_src, next_tok, next_scores = [], [], []
        for b in range(B):
            chosen = []
            for rank, (score, src, tok) in enumerate(zip(cand_scores[b], cand_src[b], cand_tok[b])):
                if done[b] or len(chosen) == W or score == float('-inf'):
                    break
                stops = tok in stop_set or (history is not None and completes_stop_string(
                    history[src] + [tok], stop_bytes, tokenizer.decode_bytes))
                if not stops:
                    chosen.append((src, tok, score))
                elif rank < W:  # a finished beam counts only if it ranks among the W best
                    tokens = beam_tokens[src].tolist() + [tok]
                    logprobs = beam_logprobs[src].tolist() + [logp_raw[src, tok].item()]
                    add_hyp(b, score, tokens, logprobs, t + 1, True)
            if not done[b] and len(hyps[b]) == W:
                best_running = chosen[0][2] if chosen else float('-inf')
                done[b] = cfg.early_stopping or hyps[b][-1][0] >= best_running / (t + 1) ** cfg.length_penalty
            chosen += [(b * W, pad_id, float('-inf'))] * (W - len(chosen))  # finished prompts / no candidates
            for src, tok, score in chosen:
                next_src.append(src), next_tok.append(tok), next_scores.append(score)
        src = torch.tensor(next_src, device=device)
        token = torch.tensor(next_tok, device=device)  # (B*W,)
        beam_scores = torch.tensor(next_scores, device=device).view(B, W)
        beam_tokens = torch.cat([beam_tokens[src], token[:, None]], dim=1)
        beam_logprobs = torch.cat([beam_logprobs[src], logp_raw[src, token][:, None]], dim=1)
        if all(done) or t == cfg.max_new_tokens - 1:
            break
        cache.reorder(src)
        if cfg.has_penalties:
            seen, counts = seen[src].scatter_(1, token[:, None], True), counts[src]
            counts.scatter_add_(1, token[:, None], torch.ones_like(counts[:, :1]))
        i = T + t
        logits, _ = model(token[:, None], positions=positions[..., i:i + 1],
                          attn_mask=None if key_mask is None else key_mask[..., :i + 1], kv_cache=cache)

    # prompts still running at max_new_tokens: their beams become hypotheses, unstopped
    L = beam_tokens.size(1)
    for b in range(B):
        if not done[b]:
            for w in range(W):
                score = beam_scores[b, w].item()
                if score > float('-inf'):
                    add_hyp(b, score, beam_tokens[b * W + w].tolist(), beam_logprobs[b * W + w].tolist(), L, False)
    best = [h[0] for h in hyps]
    T_out = max(len(h[1]) for h in best)
    tokens = torch.full((B, T_out), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, T_out, device=device)
    mask = torch.zeros(B, T_out, dtype=torch.bool, device=device)
    for b, (_, toks, lps, _) in enumerate(best):
        tokens[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        logprobs[b, :len(toks)] = torch.tensor(lps)
        mask[b, :len(toks)] = True
    stopped = torch.tensor([h[3] for h in best], device=device)
    scores = torch.tensor([h[0] for h in best], device=device)
    return Generation(tokens, mask, logprobs, stopped, scores)


# ----------------------------------------------------------------------------- text level

class TextStream:
    """Generated ids -> text, one token at a time: what stream() and the server (serve.py) show as
    tokens arrive. Bytes go through an incremental UTF-8 decoder, so a character split over tokens
    appears whole once its last byte arrives; special tokens are left out; text that might be the
    start of a stop string is held back until it is known not to be, and the text ends where a stop
    string begins (then `stopped` is True). The pieces join to what TextGenerator.text() gives."""

    def __init__(self, tokenizer, stop_strings=(), special_ids=()):
        self.tokenizer, self.special_ids = tokenizer, set(special_ids)
        self.stop_strings = [s for s in stop_strings if s]
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.held, self.stopped = '', False

    def push(self, tok):
        """One more token id -> the text that can be shown now ('' if none)."""
        if self.stopped or tok in self.special_ids:
            return ''
        self.held += self.decoder.decode(self.tokenizer.decode_bytes([tok]))
        cuts = [self.held.find(s) for s in self.stop_strings if s in self.held]
        if cuts:
            self.stopped = True
            return self.held[:min(cuts)]
        keep = max([n for s in self.stop_strings for n in range(1, len(s)) if self.held.endswith(s[:n])], default=0)
        piece = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return piece

    def finish(self):
        """The text still held back, once no token follows."""
        if self.stopped:
            return ''
        piece, self.held = self.held + self.decoder.decode(b'', final=True), ''
        return piece


class TextGenerator:
    """Text in, text out, for a model and its tokenizer. Options come from a GenerationConfig, and
    keyword overrides of its fields on each call:  gen.generate(["Once", "Hi"], temperature=0)."""

    def __init__(self, model, tokenizer, compile=False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.special_tokens.values())  # not text: left out of what we return
        # compile the decode step only: a prefill runs once per call, and its shapes change with every prompt
        self.step_fn = compile_decode_step(model) if compile else None

    def config(self, config=None, **overrides):
        """The options of one call; stop_token_ids None means the tokenizer's end-of-text and <|im_end|>."""
        cfg = replace(config or GenerationConfig(), **overrides)
        if cfg.stop_token_ids is None:
            cfg = replace(cfg, stop_token_ids=(self.tokenizer.eot_id, self.tokenizer.im_end_id))
        return cfg

    def encode(self, prompt):
        """Text (special-token strings allowed) or ids -> ids; empty text starts a fresh document."""
        if not isinstance(prompt, str):
            return list(prompt)
        return self.tokenizer.encode(prompt, allow_special=True) if prompt else [self.tokenizer.eot_id]

    def generate_ids(self, prompts, config=None, **overrides):
        """Prompts (str or ids) -> a Generation: the ids, masks and log-probs behind generate()."""
        cfg = self.config(config, **overrides)
        return generate_ids(self.model, [self.encode(p) for p in prompts], cfg, self.tokenizer.pad_id,
                            self.tokenizer, self.step_fn)

    def generate(self, prompts, config=None, **overrides):
        """One prompt (str) -> its completion; a list of prompts (str or ids) -> a list of completions."""
        single = isinstance(prompts, str)
        cfg = self.config(config, **overrides)
        out = self.generate_ids([prompts] if single else prompts, cfg)
        texts = [self.text(ids, cfg) for ids in out.rows()]
        return texts[0] if single else texts

    def text(self, ids, cfg):
        """Generated ids -> text, without the stop token or other special tokens, and cut where a
        stop string begins."""
        cfg = self.config(cfg)
        if ids and ids[-1] in cfg.stop_token_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode([i for i in ids if i not in self.special_ids])
        cuts = [text.find(s) for s in cfg.stop_strings if s and s in text]
        return text[:min(cuts)] if cuts else text

    def stream(self, prompt, config=None, **overrides):
        """Yield the completion of one prompt piece by piece as tokens arrive; the pieces join to
        exactly what generate() returns (see TextStream)."""
        cfg = self.config(config, **overrides)
        assert cfg.num_beams == 1, "stream() samples one sequence; beam search needs generate()"
        text = TextStream(self.tokenizer, cfg.stop_strings, self.special_ids)
        for token, _, live, _ in decode_steps(self.model, [self.encode(prompt)], cfg, self.tokenizer.pad_id,
                                              self.tokenizer, self.step_fn):
            tok = token.item()
            if not live[0] or tok in cfg.stop_token_ids:
                break
            piece = text.push(tok)
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.finish()
        if piece:
            yield piece

    def chat_prompt(self, messages, system=None, max_new_tokens=256, max_turns=None):
        """ChatML prompt ids for a conversation ending in a user message: the system prompt (always
        kept), then the newest turns that fit in block_size - max_new_tokens, at most max_turns of
        them (a turn starts at a user message). Raises if the last user message alone does not fit.
        The system prompt is `system`, or else a leading system message."""
        head = [{'role': 'system', 'content': system}] if system else []
        if messages and messages[0]['role'] == 'system':
            head, messages = head or list(messages[:1]), messages[1:]
        turn_starts = [i for i, m in enumerate(messages) if m['role'] == 'user']
        if not turn_starts:
            raise ValueError("chat needs at least one user message")
        if max_turns:
            turn_starts = turn_starts[-max_turns:]
        budget = self.model.config.block_size - max_new_tokens
        for start in turn_starts:  # oldest first: the first that fits keeps the most history
            ids = self.tokenizer.render_prompt(head + list(messages[start:]))
            if len(ids) <= budget:
                return ids
        raise ValueError(f"the last message ({len(ids)} tokens with the system prompt) does not fit the "
                         f"{budget} tokens left for the prompt (block_size {self.model.config.block_size} - "
                         f"max_new_tokens {max_new_tokens}): shorten it or lower max_new_tokens")

    def chat(self, messages, system=None, config=None, max_turns=None, **overrides):
        """The assistant's reply to a conversation [{'role', 'content'}, ...] ending in a user message."""
        cfg = self.config(config, **overrides)
        ids = self.chat_prompt(messages, system, cfg.max_new_tokens, max_turns)
        return self.generate([ids], cfg)[0]
