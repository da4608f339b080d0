"""
The whole transformer in one file: a GPT with the modern options behind flags.

    pos:   'rope' (rotary, Su et al. 2021) | 'learned' (GPT-2 absolute positions)
    norm:  'rmsnorm' | 'layernorm'
    mlp:   'swiglu' (Shazeer 2020) | 'gelu' (GPT-2)
    attn:  multi-head, grouped-query (n_kv_head < n_head) or multi-query (n_kv_head == 1)
    moe:   token-choice top-k mixture of experts with optional shared experts (n_experts > 0)

A preallocated KVCache makes generation cost O(T) per token; `generate()` is a plain reference
decode loop (generate.py has the full-featured one that the stages use).
"""

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0 -> n_head (MHA); 1 -> MQA; in between -> GQA
    n_embd: int = 768
    head_dim: int = 0             # 0 -> n_embd // n_head (imported models may differ, e.g. Qwen3: 128)
    dropout: float = 0.0
    bias: bool = False            # bias in Linears and LayerNorms
    qkv_bias: bool = False        # bias in the q, k, v projection only (Qwen2)
    norm: str = 'rmsnorm'         # 'rmsnorm' | 'layernorm'
    norm_eps: float = 0.0         # 0 -> 1e-6 for rmsnorm, 1e-5 for layernorm
    pos: str = 'rope'             # 'rope' | 'learned'
    rope_theta: float = 10000.0
    mlp: str = 'swiglu'           # 'swiglu' | 'gelu'
    gelu_approximate: str = 'none'  # 'none' (exact erf) | 'tanh' (GPT-2's original "gelu_new")
    mlp_hidden: int = 0           # 0 -> 4*n_embd for gelu, ~8/3*n_embd (multiple of 64) for swiglu
    qk_norm: bool = False         # normalise q and k per head before attention (stabilises training)
    tie_embeddings: bool = True   # share the token embedding with the output head
    n_experts: int = 0            # 0 = dense MLP in every block
    n_experts_active: int = 2     # top-k experts per token
    moe_renormalize: bool = True  # k > 1: the k gates renormalised to sum to 1 (Mixtral); k = 1 never (Switch)
    n_shared_experts: int = 0     # experts every token always goes through
    moe_aux_loss_coef: float = 0.01
    moe_capacity_factor: float = 1.25  # training only; eval is dropless
    grad_checkpoint: bool = False  # recompute activations in backward: less memory, ~30% more time

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.mlp_hidden == 0:
            self.mlp_hidden = 4 * self.n_embd if self.mlp == 'gelu' else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.norm_eps == 0:
            self.norm_eps = 1e-6 if self.norm == 'rmsnorm' else 1e-5
        if self.head_dim == 0:
            assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head (or set head_dim)"
            self.head_dim = self.n_embd // self.n_head
        assert self.n_head % self.n_kv_head == 0, "n_head must be divisible by n_kv_head"
        assert self.norm in ('rmsnorm', 'layernorm') and self.pos in ('rope', 'learned')
        assert self.mlp in ('swiglu', 'gelu') and self.gelu_approximate in ('none', 'tanh')
        assert self.n_experts == 0 or 1 <= self.n_experts_active <= self.n_experts

    def to_dict(self):
        return asdict(self)


def dropout(x, p, training):
    """F.dropout, or x itself when it would do nothing: a no-op call (or an nn.Identity module in its
    place) still costs a dispatch or a module call, which is most of a decode step's time on a CPU."""
    return F.dropout(x, p, training) if training and p > 0 else x


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (as Llama's), the result in x's dtype.
    Written out rather than F.rms_norm: on the CPU that is a composite of ~15 small ops, two of them
    copies of Python numbers into tensors, and costs 1.4x these five when decoding one token (each
    op's dispatch is most of a step there) and 1.25x fwd+bwd at (8, 256, 256); the same values
    (bitwise when the width is a power of two: 1/dim is exact). Shaped as nn.RMSNorm's: `weight`."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        # eps as a 0-dim tensor: torch.add(eps, ...) with a Python float copies it into a tensor
        # at every call, 4 us of a 14 us norm when decoding one token. A buffer, so .to(device)
        # moves it with the model (as the RoPE tables; a bf16 model rounds it to 9.98e-7);
        # persistent=False: not in checkpoints
        self.register_buffer('eps', torch.tensor(eps, dtype=torch.float32), persistent=False)

    def forward(self, x):
        xf = x.float()  # no copy when x is fp32 already (the residual stream)
        sum_sq = (xf * xf).sum(-1, keepdim=True)
        inv_rms = torch.rsqrt(torch.add(self.eps, sum_sq, alpha=1 / x.size(-1)))  # eps + mean(x^2)
        return (xf * inv_rms * self.weight).to(x.dtype)


def Norm(config, dim=None):
    dim = dim or config.n_embd
    if config.norm == 'rmsnorm':
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def embed(table, idx):
    """table(idx): rows of an nn.Embedding. Inside a compiled graph that will be differentiated, on
    the CPU, the lookup runs outside the graph (a graph break at the model's start): inductor
    compiles its backward into threads adding the rows of repeated tokens into the gradient with
    atomics, in no fixed order, so two runs of one seed drifted apart (SFT's loss at step 100:
    1.4083, 1.4530, 1.4160 in three runs); eager's backward adds them in a fixed order. Steps as
    fast (alternating runs, bf16: sft_tiny 77-93 against 78-88 ms, pretrain_tiny 112 against 117-119)."""
    if torch.compiler.is_compiling() and idx.is_cpu and torch.is_grad_enabled() and table.weight.requires_grad:
        return torch.compiler.disable(F.embedding)(idx, table.weight)
    return table(idx)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_cache(seq_len, head_dim, theta):
    """cos/sin tables, (seq_len, head_dim) each, in apply_rope's layout: position p rotates the pair
    (i, i + head_dim/2) by p * theta^(-2i/d); cos repeats over both halves, sin is negated on the first."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, T, nh, hs), the heads in the matmul's own layout; cos/sin from rope_cache, broadcast
    over the heads: (T, 1, hs) or (B, T, 1, hs), in x's dtype (as Llama does: no fp32 copies of q, k).
    Rotates the two halves of each head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with `roll`
    swapping the halves: four ops, not the ten of chunk, four products and cat, and the same values."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values, one (B, n_kv_head, max_len, head_dim) tensor per layer in k and v.
    `pos` is how many positions are filled; GPT.forward writes at [pos, pos+T) and advances it.

    Static mode (`slot` set, a (1,) tensor): one token is written at cache slot `slot` and attention
    reads the first `length` slots, which the caller keeps to the filled ones. The slot is a tensor
    and the length a size, so one graph compiled with dynamic shapes serves every step
    (generate.compile_decode_step). (A tensor per layer, not one for all: a
    compiled graph that writes into a slice of an input copies the whole input, 1.6 ms a step
    here, where writing into a whole input is done in place.)"""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0
        self.slot = None
        self.length = max_len

    def update(self, layer, k, v):
        """Store this step's k, v (B, nkv, T, hs) for `layer`; return all keys/values so far."""
        keys, values = self.k[layer], self.v[layer]
        if self.slot is not None:
            keys.index_copy_(2, self.slot, k)
            values.index_copy_(2, self.slot, v)
            return keys.narrow(2, 0, self.length), values.narrow(2, 0, self.length)
        start, end = self.pos, self.pos + k.size(2)  # narrow, not [:, :, a:b]: one call, no index parsing
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def reorder(self, index):
        """Keep/duplicate batch rows (beam search)."""
        self.k, self.v = [k[index] for k in self.k], [v[index] for v in self.v]


# ----------------------------------------------------------------------------- attention

# Self-attention in bf16 on the CPU is written out (softmax_attention) when its scores number at
# most this many: they are kept for backward, 2 bytes each (32 MB a call); beyond, SDPA
SOFTMAX_ATTENTION_MAX_SCORES = 2 ** 24


def attention(q, k, v, attn_mask, is_causal, dropout, cached):
    """Scaled dot-product attention, q (B, nh, T, hs), k/v (B, nkv, S, hs), with the kernel that is
    fastest for the device, dtype and shape. Where that differs from SDPA's own choice, on the CPU:
    - self-attention in bf16 of up to 512 tokens is written out (softmax_attention), causal in
      blocks of 128 queries (causal_attention_in_parts): SDPA's bf16 flash kernel is 1.4-3x slower
      there, fwd+bwd (B 8, 8 heads of 64, T 256: 29.2 vs 9.6 ms; B 16, 4 heads of 32, T 256:
      11.8 vs 7.8 ms against the fp32 upcast below; packed rows, B 16, 4 heads of 32, T 192:
      7.2 vs 5.4 ms; AVX-512 bf16, Zen 5);
    - other bf16 attention with heads of <= 32 dims runs in fp32, whose flash kernel is 1.35x
      faster, backward included (AVX-512 bf16, T=256: 13.5 vs 18.1 ms for B=8, 8 heads, 4 kv
      heads; at 64 dims bf16 wins, 27 vs 37 ms); fp32 causal self-attention of 129-512 tokens is
      SDPA in halves;
    - decoding against a cache stays in the cache's dtype, and one fp32 query per row against it,
      for 8 rows or more, is written out too (B=8, S=272: 37 vs 51 us a layer; B=128: 0.59 vs
      1.0 ms; not at 1 row, 15 vs 6 us, nor in bf16, where SDPA's kernel is the fast one)."""
    # the checks cheapest first: a decode step pays for each (q.device.type alone builds an object)
    if cached and q.dtype == torch.float32 and q.is_cpu and q.size(2) == 1 and q.size(0) >= 8:
        return softmax_attention(q, k, v, attn_mask)
    T = q.size(2)
    self_attention_cpu = q.is_cpu and k.size(2) == T  # not a decode step against a cache
    causal = is_causal and attn_mask is None
    if (self_attention_cpu and q.dtype == torch.bfloat16 and T <= 512
            and q.numel() // q.size(-1) * T <= SOFTMAX_ATTENTION_MAX_SCORES):
        if not causal:
            return softmax_attention(q, k, v, attn_mask, dropout)  # packed or padded rows: their own mask

        def attend(q, k, v, mask):
            mask = causal_mask(q.size(2), k.size(2), q.device) if mask is None else mask
            return softmax_attention(q, k, v, mask, dropout)
        return causal_attention_in_parts(q, k, v, attend, n_parts=-(-T // 128))
    out_dtype = q.dtype
    upcast = out_dtype == torch.bfloat16 and not cached and q.is_cpu and q.size(-1) <= 32
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    # autocast would cast the fp32 q, k, v straight back to bf16 (SDPA is on its lower-precision
    # list): off around the call. With it on, the bf16 backward took 17.5 ms against 3 ms in fp32
    # for a PPO micro-batch (32 rows of 67 tokens, 4 heads of 32).
    gqa = q.size(1) != k.size(1)  # SDPA's GQA: no repeat_interleave copies of k and v

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and is_causal,
                                              dropout_p=dropout, enable_gqa=gqa)
    in_halves = causal and self_attention_cpu and 128 < T <= 512
    with torch.autocast(q.device.type, enabled=False) if upcast else nullcontext():
        y = causal_attention_in_parts(q, k, v, sdpa, n_parts=2) if in_halves else sdpa(q, k, v, attn_mask)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def causal_mask(n_queries, n_keys, device):
    """(n_queries, n_keys) bool, True = may attend, for the last n_queries of n_keys positions:
    query i sees keys <= n_keys - n_queries + i."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def causal_attention_in_parts(q, k, v, attend, n_parts):
    """Causal self-attention over T queries and keys as n_parts calls of attend(q, k, v, mask) (mask
    None: a causal square; else bool, True = may attend): each consecutive block of queries against
    the keys up to its last one, so the scores above the diagonal's blocks are never computed.
    - SDPA in halves: its CPU flash kernel takes up to 512 keys as one block and computes the whole
      square for causal attention (it costs what unmasked attention does; measured). fwd+bwd, GQA:
      B 8, 8 heads of 32, T 256, fp32: 12.1 -> 10.3-10.7 ms; B 4, 8 heads of 64, T 512, bf16: 36.7
      -> 28.9 ms. In quarters, the backward's extra calls cost more than they save.
    - The written-out softmax_attention in blocks of 128 queries: at T 512 a sixth less is
      computed than in halves (a step 1-3% faster; eighths were slower: docs/history/performance.md)."""
    T = q.size(2)
    bounds = [T * i // n_parts for i in range(n_parts + 1)]
    outs = [attend(q[:, :, :bounds[1]], k[:, :, :bounds[1]], v[:, :, :bounds[1]], None)]  # a causal square
    for a, b in zip(bounds[1:-1], bounds[2:]):
        outs.append(attend(q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal_mask(b - a, b, q.device)))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def softmax_attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v written out, q (B, nh, T, hs) against k/v (B, nkv, S, hs); mask
    None or bool, True = may attend, (T, S) or (B or 1, 1, T, S). Each kv head's query heads are the
    rows of one matmul (GQA without copies). All in the inputs' dtype: in bf16 the probabilities
    are rounded to bf16 before the second matmul, as transformers' eager attention does (the
    softmax itself accumulates in fp32), and kept for backward in bf16. The mask is added as 0 or
    -inf, not written with masked_fill: the same values, but backward passes the gradient through
    where masked_fill's fills it again (a step 4-6% faster: docs/history/performance.md)."""
    B, nh, T, hs = q.shape
    nkv, S = k.size(1), k.size(2)
    group = nh // nkv
    scores = ((q.reshape(B, nkv, group * T, hs) * hs ** -0.5) @ k.transpose(-1, -2)).view(B, nkv, group, T, S)
    if mask is not None:
        blocked = ~(mask if mask.dim() == 2 else mask[:, None])  # (T, S) or (B or 1, 1, 1, T, S)
        scores = scores + scores.new_zeros(blocked.shape).masked_fill_(blocked, float('-inf'))
    probs = F.dropout(scores.softmax(-1), dropout_p) if dropout_p > 0 else scores.softmax(-1)
    return (probs.view(B, nkv, group * T, S) @ v).view(B, nh, T, hs)


class Attention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        # q, k and v in one matmul: rows are n_head query heads, then n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.q_norm = Norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = Norm(config, self.head_dim) if config.qk_norm else None
        self.dropout = config.dropout  # on the attention weights and on the output

    def forward(self, x, rope, attn_mask, kv_cache):
        B, T, _ = x.size()
        nh, nkv = self.n_head, self.n_kv_head
        # Split, normed and rotated in the matmul's layout (B, T, heads, hs), then transposed to
        # (B, heads, T, hs) as views: backward's gradients then land in that layout with no copy (split
        # after the transpose, each layer's backward copied its (B, T, heads, hs) gradient once more:
        # ~1% of a step at nanoGPT's Shakespeare shape, bench_nanogpt.py)
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, self.head_dim)
        if rope is None and self.q_norm is None:
            q, k, v = qkv.split([nh, nkv, nkv], dim=2)
        else:
            qk, v = qkv.split([nh + nkv, nkv], dim=2)
            if self.q_norm is not None:
                q, k = qk.split([nh, nkv], dim=2)
                qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
            if rope is not None:
                qk = apply_rope(qk, *rope)  # q and k rotated together: half the ops of one call each
            q, k = qk.split([nh, nkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs), S = cached + T
        # With no explicit mask, causal attention over a square T x T; the cache/packing paths pass one.
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and T > 1,
                      dropout=self.dropout if self.training else 0.0, cached=kv_cache is not None)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return dropout(self.c_proj(y), self.dropout, self.training)


# ----------------------------------------------------------------------------- feed-forward

class MLP(nn.Module):

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.mlp_hidden
        self.swiglu = config.mlp == 'swiglu'
        self.gelu_approximate = config.gelu_approximate
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.dropout = config.dropout

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return dropout(self.c_proj(h), self.dropout, self.training)


class MoE(nn.Module):
    """Token-choice top-k mixture of experts (Switch/Mixtral style), batched over experts.

    Each token picks its top-k experts from a softmax router. With k > 1 the k gate weights are
    renormalised to sum to 1 (Mixtral; moe_renormalize=False keeps the raw probabilities). With
    k = 1 the gate is the raw probability (Switch Transformer): renormalised it would be g / g = 1
    and the router would get no gradient from the LM loss, only from the balancing loss. Tokens are scattered into a fixed (n_experts, capacity, C) buffer so that all
    experts run as one batched matmul: static shapes (torch.compile friendly) and every expert's
    parameters are used every step (DDP needs no find_unused_parameters). In training, tokens past
    an expert's capacity are dropped (they still pass through the residual); in eval capacity is
    the busiest expert's token count, so nothing is dropped and cached decoding is exact (one host
    sync per layer to read that count).

    Load-balancing loss (Switch Transformer, Fedus et al. 2021): E * sum_e f_e * P_e, where f_e is
    the fraction of routing slots sent to expert e and P_e the mean router probability of e.
    It is 1 when routing is uniform and grows as routing collapses onto few experts.
    """

    def __init__(self, config):
        super().__init__()
        E, C, H = config.n_experts, config.n_embd, config.mlp_hidden
        self.n_experts, self.top_k = E, config.n_experts_active
        self.renormalize = config.moe_renormalize and config.n_experts_active > 1
        self.capacity_factor = config.moe_capacity_factor
        self.swiglu = config.mlp == 'swiglu'
        self.gelu_approximate = config.gelu_approximate
        self.router = nn.Linear(C, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, C, (2 if self.swiglu else 1) * H) * 0.02)
        self.w_out = nn.Parameter(torch.randn(E, H, C) * 0.02)  # GPT re-initialises both
        self.w_out.residual_proj = True
        self.shared = MLP(config, config.n_shared_experts * H) if config.n_shared_experts else None
        self.dropout = config.dropout

    def gates(self, probs):
        """Router probabilities (N, E) -> the top-k gate weights and expert ids, (N, k) each."""
        gate, expert = probs.topk(self.top_k, dim=-1)
        return (gate / gate.sum(dim=-1, keepdim=True) if self.renormalize else gate), expert

    def forward(self, x):
        B, T, C = x.size()
        x_flat = x.view(-1, C)  # (N, C)
        N, E, k = x_flat.size(0), self.n_experts, self.top_k
        probs = F.softmax(self.router(x_flat).float(), dim=-1)  # (N, E)
        gate, expert = self.gates(probs)  # (N, k) each

        # load-balancing loss
        slots = F.one_hot(expert.view(-1), E).float()  # (N*k, E)
        aux_loss = E * (slots.mean(0) * probs.mean(0)).sum()

        # position of each (token, expert) pair in its expert's queue; earlier tokens first
        rank = (slots.cumsum(0) * slots).sum(-1).long() - 1  # (N*k,)
        if self.training:
            capacity = min(N, math.ceil(self.capacity_factor * N * k / E))
        else:  # dropless: as many rows as the busiest expert needs (not N each: E/k x the FLOPs, and memory)
            capacity = int(slots.sum(0).max().item())
        keep = rank < capacity
        # dropped pairs go to one spare row at the end, which is discarded
        slot = torch.where(keep, expert.view(-1) * capacity + rank, E * capacity)
        token = torch.arange(N, device=x.device).repeat_interleave(k)
        buf = x_flat.new_zeros(E * capacity + 1, C).index_put((slot,), x_flat[token])
        h = buf[:-1].view(E, capacity, C)

        h = torch.bmm(h, self.w_in.to(h.dtype))  # (E, cap, H or 2H)
        if self.swiglu:
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        y = torch.bmm(h, self.w_out.to(h.dtype)).view(E * capacity, C)  # (E*cap, C)
        y = torch.cat([y, y.new_zeros(1, C)])  # the spare row reads as zero

        weight = (gate.view(-1) * keep).to(y.dtype)  # (N*k,)
        out = (y[slot] * weight[:, None]).view(N, k, C).sum(1)  # (N, C)
        out = dropout(out.view(B, T, C), self.dropout, self.training)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, aux_loss


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = Norm(config)
        self.moe = config.n_experts > 0
        self.mlp = MoE(config) if self.moe else MLP(config)

    def forward(self, x, rope, attn_mask, kv_cache):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache)
        if self.moe:
            h, aux = self.mlp(self.ln_2(x))
        else:
            h, aux = self.mlp(self.ln_2(x)), None  # no MoE load-balancing loss
        return x + h, aux


# ----------------------------------------------------------------------------- the loss

def loss_chunk_rows(vocab_size, device_type):
    """Rows of logits per chunk: ~1M fp32 logits (4 MB, cache-sized) on the CPU, where the win is
    staying in cache, but at least 128 rows: each chunk adds its (vocab, C) product into the head's
    fp32 gradient, and at 32 rows that memory traffic, not the matmuls, took the time (a 32k-vocab
    batch of 2,048 x 256, bf16: 1.62 -> 0.82 s with 128 rows; 16 MB more memory). ~64M logits on a
    GPU, where the win is memory and fewer, larger launches."""
    return max(128, (2 ** 20 if device_type == 'cpu' else 2 ** 26) // vocab_size)


def compute_dtype(x):
    """The dtype matmuls run in here: autocast's when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def chunk_logits(h, w, temperature):
    """Logits h @ w.T in fp32, / temperature: fp32 first, in place (log_softmax reading bf16 and
    writing fp32 itself is ~8x slower on the CPU than the cast and an fp32 pass)."""
    z = (h @ w.t()).float()
    return z if temperature == 1.0 else z.div_(temperature)


def chunk_log_probs(h, weight, targets):
    """Log-probabilities of one chunk (rows, V) in fp32 and each row's loss (0 where ignored)."""
    logp = F.log_softmax(chunk_logits(h, weight, 1.0), dim=-1)
    losses = -logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return logp, losses.masked_fill(targets == -1, 0.0)


def chunk_loss_and_grads(h_c, w, t_c):
    """One chunk of LinearCrossEntropy: its rows' summed loss and that sum's gradients with respect
    to h_c and w (d loss / d logits = softmax - one_hot, rows of ignored targets zero)."""
    logp, losses = chunk_log_probs(h_c, w, t_c)
    grad = logp.exp_()  # softmax, in place
    grad[torch.arange(grad.size(0), device=grad.device), t_c.clamp(min=0)] -= 1
    grad = grad.masked_fill_((t_c == -1)[:, None], 0.0).to(h_c.dtype)
    return losses.sum(), grad @ w, grad.t() @ h_c


@functools.cache
def compiled_chunk_loss_and_grads():
    return torch.compile(chunk_loss_and_grads)  # built on first use: eager runs never compile it


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weight.T against targets (-1 = ignored), `chunk` rows
    at a time, so the (N, vocab) logits never exist at once: the fused linear + cross-entropy of
    Liger-Kernel (Hsu et al. 2024). The gradients are computed in the forward pass, chunk by chunk,
    while the chunk's logits are at hand (d loss / d logits = softmax - one_hot, rows of ignored
    targets zero); backward only scales them by 1/count. Matmuls run in `dtype` (bf16 under
    autocast), the softmax in fp32, and weight's gradient accumulates in fp32. chunk_fn is
    chunk_loss_and_grads, or its compiled graph (chunked_cross_entropy)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, chunk_fn):
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for start in range(0, h.size(0), chunk):
            loss, grad_h_c, grad_w_c = chunk_fn(h[start:start + chunk].to(dtype), w, targets[start:start + chunk])
            total += loss
            grad_h[start:start + chunk] = grad_h_c
            grad_w += grad_w_c
        n = (targets != -1).sum().clamp(min=1)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), n)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n
        return grad_h * scale.to(grad_h.dtype), grad_w * scale, None, None, None, None


def chunked_cross_entropy(h, weight, targets, chunk, dtype, compiled):
    """LinearCrossEntropy; compiled=True: called from a compiled graph, which it stays outside of
    (cross_entropy_from_hidden). A model compiled whole inlined its chunk loop into its graph, one
    copy of the chunk's kernels per chunk; here every chunk runs one small compiled graph instead:
    pretrain_tiny's first step from a cold inductor cache 43 -> 28 s (16 chunks; 6.8 -> 5.6 s from
    a warm one), (6, 256, 8, 4, 256, 8) 37 -> 31 s; the steps as fast (bench/bench_compile.py)."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk, dtype,
                                    compiled_chunk_loss_and_grads() if compiled else chunk_loss_and_grads)


def cross_entropy_from_hidden(h, weight, targets):
    """Mean cross-entropy of the logits h @ weight.T (h: (N, C), weight: (V, C), targets: (N,),
    -1 = ignored) without materialising the (N, V) logits. With no gradient needed (eval) the
    chunks are just summed."""
    dtype = compute_dtype(h)
    chunk = loss_chunk_rows(weight.size(0), h.device.type)
    with torch.autocast(h.device.type, enabled=False):  # dtypes are handled by hand inside
        if h.size(0) <= chunk and h.size(0) * weight.size(0) <= 2 ** 20:  # one chunk of <= 4 MB of fp32 logits:
            # plain autograd has fewer ops (nanoGPT's Shakespeare loss, 768 x 65: 0.65 -> 0.37 ms), and holding
            # such logits for backward costs nothing
            losses = F.cross_entropy(chunk_logits(h.to(dtype), weight.to(dtype), 1.0), targets, ignore_index=-1,
                                     reduction='sum')
            return losses / (targets != -1).sum().clamp(min=1)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            if torch.compiler.is_compiling():  # a graph break: the loss runs outside the model's graph
                # (torch.compiler.disable here, not on the def: at import it would load dynamo, ~1 s)
                return torch.compiler.disable(chunked_cross_entropy)(h, weight, targets, chunk, dtype, True)
            return chunked_cross_entropy(h, weight, targets, chunk, dtype, False)
        w = weight.to(dtype)
        total = sum(chunk_log_probs(h[i:i + chunk].to(dtype), w, targets[i:i + chunk])[1].sum()
                    for i in range(0, h.size(0), chunk))
        return total / (targets != -1).sum().clamp(min=1)


class LinearTokenLogProbs(torch.autograd.Function):
    """Per row of the logits z = h @ weight.T / temperature: log p(target) (0 where the target is
    -1) and, with_entropy, the entropy of softmax(z), both fp32, `chunk` rows at a time, so the
    (N, vocab) logits never exist at once: the per-token log-probs of RL and DPO, whose losses
    weigh each token by a gradient known only in backward. So backward recomputes each chunk's
    logits (one more matmul of the head) and forms
        d log p(t) / dz = one_hot(t) - p,    d H / dz = -p * (log p + H),
    in place on one (chunk, vocab) block: the passes over such blocks are what cost here."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk, dtype, with_entropy):
        ctx.set_materialize_grads(False)  # an unused output (the entropy, mostly) gets None, not zeros
        w = weight.to(dtype)
        logp = torch.empty(h.size(0), device=h.device, dtype=torch.float32)
        entropy = torch.empty_like(logp) if with_entropy else None
        for start in range(0, h.size(0), chunk):
            rows, t = slice(start, start + chunk), targets[start:start + chunk]
            log_q = torch.log_softmax(chunk_logits(h[rows].to(dtype), w, temperature), dim=-1)
            logp[rows] = log_q.gather(1, t.clamp(min=0)[:, None]).squeeze(1).masked_fill_(t == -1, 0.0)
            if with_entropy:
                entropy[rows] = -torch.linalg.vecdot(log_q.exp(), log_q)
        ctx.save_for_backward(h, weight, targets, entropy)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, targets, entropy = ctx.saved_tensors
        T = ctx.temperature
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, h.size(0), ctx.chunk):
            rows, t = slice(start, start + ctx.chunk), targets[start:start + ctx.chunk]
            h_c = h[rows].to(ctx.dtype)
            z = chunk_logits(h_c, w, T)
            # d/dlogits = d/dz / T: the 1/T goes into the per-row weights g
            g = torch.zeros(len(t), device=h.device) if grad_logp is None else grad_logp[rows].masked_fill(t == -1, 0.0) / T
            if grad_entropy is None:
                grad = torch.softmax(z, dim=-1).mul_(-g[:, None])  # -p * g
            else:
                log_q = torch.log_softmax(z, dim=-1)
                grad = log_q.exp() * -(g[:, None] + grad_entropy[rows, None] / T * (log_q + entropy[rows, None]))
            grad[torch.arange(len(t), device=t.device), t.clamp(min=0)] += g  # + one_hot * g
            grad = grad.to(ctx.dtype)
            grad_h[rows] = grad @ w
            grad_w += grad.t() @ h_c
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None


def token_logprobs_from_hidden(h, weight, targets, temperature=1.0, with_entropy=True):
    """(log p(target), entropy or None), each (N,) in fp32, of the rows of softmax(h @ weight.T /
    temperature), h (N, C), weight (V, C), targets (N,) (-1: log-prob 0, no gradient); chunked,
    never the (N, V) logits (LinearTokenLogProbs). Matmuls in autocast's dtype, as the model's."""
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # dtypes are handled by hand inside
        return LinearTokenLogProbs.apply(h, weight, targets, float(temperature),
                                         loss_chunk_rows(weight.size(0), h.device.type), dtype, with_entropy)


# ----------------------------------------------------------------------------- the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos == 'learned' else None,
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos == 'rope':
            # persistent=False: derived from the config, so not stored in checkpoints
            cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 * n_layer)
        # so the residual's variance does not grow with depth.
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, nn.Linear):
            std = resid_std if getattr(module, 'residual_proj', False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MoE):
            nn.init.normal_(module.w_in, mean=0.0, std=0.02)
            nn.init.normal_(module.w_out, mean=0.0, std=resid_std)

    # --------------------------------------------------------------------- sizes

    def get_num_params(self, non_embedding=True):
        """Parameters; with non_embedding the position table (and an untied token table) are left
        out, as is usual when quoting model size, since lookups cost no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def get_num_active_params(self):
        """Non-embedding parameters one token goes through (MoE: only its top-k experts)."""
        n = self.get_num_params()
        cfg = self.config
        if cfg.n_experts:
            # from the sizes, not by indexing: under FSDP the weights are sharded and indexing is a collective
            per_expert = sum((b.mlp.w_in.numel() + b.mlp.w_out.numel()) // cfg.n_experts for b in self.transformer.h)
            n -= (cfg.n_experts - cfg.n_experts_active) * per_expert
        return n

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops`. Training costs 6 FLOPs per
        parameter per token plus attention's 12 * L * H * hs * T (PaLM paper, appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        flops_per_token = 6 * self.get_num_active_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to fine-tune a checkpoint at a shorter length)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.transformer.wpe is not None:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    # --------------------------------------------------------------------- forward

    def hidden_states(self, idx, positions=None, attn_mask=None, kv_cache=None):
        """Final normalised hidden states (B, T, C) and the summed MoE aux loss.

        positions: (T,) or (B, T) token positions; default: consecutive from the cache position.
        attn_mask: bool (B or 1, 1, T, S), True = may attend; default: causal.
            Packed or left-padded batches pass their own.
        kv_cache:  a KVCache; this call's keys/values are appended to it."""
        B, T = idx.size()
        static = kv_cache is not None and kv_cache.slot is not None
        assert not static or positions is not None, "a static cache step needs positions"
        start = kv_cache.pos if kv_cache is not None and not static else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        if attn_mask is None and kv_cache is not None and start > 0 and T > 1:
            # a chunk after a cached prefix: the query in cache slot start+i sees slots 0..start+i.
            # By slot, not by position: (B, T) positions (left-padded rows) are not slots.
            attn_mask = causal_mask(T, start + T, idx.device)  # (T, S), the same for every row
        assert start + T <= self.config.block_size, f"sequence of length {start + T} exceeds block_size {self.config.block_size}"

        x = embed(self.transformer.wte, idx)  # (B, T, C)
        rope = None
        if self.config.pos == 'learned':
            x = x + embed(self.transformer.wpe, positions)
        else:
            dtype = compute_dtype(x)  # cast once here, not in every layer
            rope = (self.rope_cos[positions, None].to(dtype), self.rope_sin[positions, None].to(dtype))  # (T, 1, hs) or (B, T, 1, hs)
        x = dropout(x, self.config.dropout, self.training)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        recompute = self.config.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:
                x, aux = checkpoint(block, x, rope, attn_mask, kv_cache, use_reentrant=False)
            else:
                x, aux = block(x, rope, attn_mask, kv_cache)
            if aux is not None:
                aux_loss = aux_loss + aux
        if kv_cache is not None and not static:
            kv_cache.pos += T
        return self.transformer.ln_f(x), aux_loss

    def forward(self, idx, targets=None, positions=None, attn_mask=None, kv_cache=None,
                last_only=False, return_aux=False, reduction='mean'):
        """Logits (B, T, vocab), or with targets (-1 = ignored) logits=None and the mean
        cross-entropy plus the weighted MoE load-balancing loss (computed in chunks, never the full
        logits); reduction='none': each position's cross-entropy, -log p(target), (B, T), 0 where
        ignored (DPO sums them per answer), no aux loss. last_only computes logits for the last
        position only (generation). return_aux adds the unweighted aux loss as a third value."""
        x, aux_loss = self.hidden_states(idx, positions, attn_mask, kv_cache)
        if last_only:
            x = x[:, -1:, :]  # a view: indexing with [-1] built a tensor and copied
        logits = loss = None
        if targets is None:
            logits = self.lm_head(x)
        elif reduction == 'none':
            logp, _ = token_logprobs_from_hidden(x.flatten(0, 1), self.head_weight(), targets.reshape(-1),
                                                 with_entropy=False)
            loss = -logp.view(targets.shape)
        else:  # the loss without the logits: they would be the largest tensor of the step
            loss = cross_entropy_from_hidden(x.flatten(0, 1), self.head_weight(), targets.reshape(-1))
            if self.config.n_experts and self.training:  # eval losses stay pure cross-entropy
                loss = loss + self.config.moe_aux_loss_coef * aux_loss
        return (logits, loss, aux_loss) if return_aux else (logits, loss)

    def head_weight(self):
        """The output head's weight as the losses use it: they never call the head (its logits
        would be the largest tensor of the step), they multiply by its weight chunk by chunk. A
        LoRA-adapted head (lora.py) gives its base weight plus its adapter's update."""
        head = self.lm_head
        return head.merged_weight() if hasattr(head, 'merged_weight') else head.weight

    # --------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). With use_cache the prompt is run once (prefill)
        and then one token per step against the KV cache; without it the whole sequence is
        recomputed every step (the reference the cache is tested against). temperature=0 is greedy.
        Rows that emit stop_token keep emitting it; the loop ends when all rows have."""
        B, T = idx.size()
        max_len = T + max_new_tokens
        assert max_len <= self.config.block_size, f"prompt + new tokens ({max_len}) exceed block_size"
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, max_len, idx.device, self.lm_head.weight.dtype)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else idx, kv_cache=cache, last_only=True)
            next_token = sample_next(logits[:, -1, :], temperature, top_k)  # (B,)
            if stop_token is not None:
                next_token = torch.where(done, stop_token, next_token)
                done |= next_token == stop_token
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if stop_token is not None and bool(done.all()):
                break
        return idx


def sample_next(logits, temperature=1.0, top_k=None):
    """logits (B, V) -> token ids (B,). temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float('-inf'))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(-1)
