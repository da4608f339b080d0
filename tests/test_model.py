"""model.py: every architecture option trains, the KV cache is exact, GQA and MoE do what they claim."""

import itertools
import math
import operator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
from model import GPT, GPTConfig, KVCache, MoE


def tiny_config(**kw):
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


ARCHS = list(itertools.product(['rope', 'learned'], ['rmsnorm', 'layernorm'], ['swiglu', 'gelu'],
                               [0, 4], [4, 2, 1]))


@pytest.mark.parametrize('pos,norm,mlp,n_experts,n_kv_head', ARCHS)
def test_every_architecture_overfits_a_fixed_batch(pos, norm, mlp, n_experts, n_kv_head):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos=pos, norm=norm, mlp=mlp, n_experts=n_experts, n_kv_head=n_kv_head,
                            n_shared_experts=1 if n_experts else 0))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    opt = common.adamw(model.parameters(), 1e-2, 0.0, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), rel=0.1)  # starts near uniform
    assert losses[-1] < losses[0] / 8, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize('kw', [{}, dict(pos='learned', norm='layernorm', mlp='gelu', bias=True),
                                dict(n_kv_head=1, qk_norm=True), dict(n_experts=4, n_shared_experts=1)])
def test_cached_decode_matches_full_forward(kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw)).eval()
    x = torch.randint(0, 64, (3, 20))
    full, _ = model(x)
    cache = KVCache(model.config, 3, 32, 'cpu', torch.float32)
    # a prefill, a chunk after a cached prefix, then one token at a time
    pieces = [model(x[:, :7], kv_cache=cache)[0], model(x[:, 7:12], kv_cache=cache)[0]]
    pieces += [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_chunk_after_cached_prefix_with_per_row_positions():
    """(B, T) positions (each row its own offsets, as a left-padded batch has) on a chunk after a
    cached prefix: the automatic mask is causal by cache slot and the logits match a full forward
    with the same positions (it crashed: the mask was built from the (B, T) positions)."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    x = torch.randint(0, 64, (2, 12))
    positions = torch.arange(12)[None, :] + torch.tensor([[0], [3]])  # row 1 starts at position 3
    full, _ = model(x, positions=positions)
    cache = KVCache(model.config, 2, 32, 'cpu', torch.float32)
    first, _ = model(x[:, :5], positions=positions[:, :5], kv_cache=cache)
    chunk, _ = model(x[:, 5:], positions=positions[:, 5:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, chunk], dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_with_cache_equals_without():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_kv_head=2)).eval()
    prompt = torch.randint(0, 64, (2, 5))
    fast = model.generate(prompt, 20, temperature=0)
    slow = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(fast, slow)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = GPT(tiny_config(n_kv_head=2)).eval()
    mha = GPT(tiny_config(n_kv_head=4)).eval()
    state = gqa.state_dict()
    hs, rep = 32 // 4, 2
    for i in range(2):
        w = state[f'transformer.h.{i}.attn.c_attn.weight']  # rows: 4 q heads, 2 k heads, 2 v heads
        q, k, v = w.view(8, hs, 32).split([4, 2, 2])
        state[f'transformer.h.{i}.attn.c_attn.weight'] = torch.cat(
            [q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)]).reshape(-1, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gqa(x)[0], mha(x)[0])


def test_moe_aux_loss_is_one_for_a_uniform_router_and_larger_when_skewed():
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_experts=4, n_experts_active=2))
    x = torch.randn(2, 16, 32)
    torch.nn.init.zeros_(moe.router.weight)  # every expert equally likely
    _, aux = moe(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        moe.router.weight[0] = 0
        moe.router.weight[0, 0] = 50.0  # a router that favours expert 0 for most tokens
    _, aux = moe(x.abs())
    assert aux.item() > 1.3


def test_moe_gates_are_renormalised_and_dropless_in_eval():
    """In eval, the MoE output equals the explicit per-token sum over its top-k experts."""
    torch.manual_seed(0)
    cfg = tiny_config(n_experts=4, n_experts_active=2, mlp='gelu')
    moe = MoE(cfg).eval()
    x = torch.randn(1, 10, 32)
    out, _ = moe(x)
    probs = torch.softmax(moe.router(x[0]), -1)
    gate, expert = probs.topk(2, -1)
    gate = gate / gate.sum(-1, keepdim=True)
    ref = torch.stack([sum(g * (torch.nn.functional.gelu(x[0, t] @ moe.w_in[e]) @ moe.w_out[e])
                           for g, e in zip(gate[t], expert[t])) for t in range(10)])
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_moe_capacity_drops_overflow_tokens_only_in_training():
    torch.manual_seed(0)
    cfg = tiny_config(n_experts=4, n_experts_active=1, moe_capacity_factor=0.5)
    moe = MoE(cfg)
    torch.nn.init.zeros_(moe.router.weight)  # all tokens pick expert 0 (ties): 16 tokens, capacity 2
    x = torch.randn(1, 16, 32)
    out_train, _ = moe.train()(x)
    out_eval, _ = moe.eval()(x)
    dropped = (out_train.abs().sum(-1) == 0).sum().item()
    assert dropped == 16 - 2 and (out_eval.abs().sum(-1) > 0).all()


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = GPT(tiny_config())
    b = GPT(tiny_config(grad_checkpoint=True))
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    a(x, y)[1].backward()
    b(x, y)[1].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_packed_attention_mask_isolates_documents():
    """A block-diagonal mask with per-document positions gives each document the logits it has alone."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 10))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([0] * 6 + [1] * 10)
    positions = torch.cat([torch.arange(6), torch.arange(10)])
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None]
    logits, _ = model(packed, positions=positions, attn_mask=mask)
    torch.testing.assert_close(logits[:, :6], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 6:], model(b)[0], atol=1e-5, rtol=1e-5)


def test_init_scales_residual_projections():
    model = GPT(tiny_config(n_layer=8))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.15)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_optimizer_decays_matrices_only():
    model = GPT(tiny_config(bias=True, norm='layernorm'))
    decay, no_decay = common.adamw(model.parameters(), 1e-3, 0.1, (0.9, 0.95), 'cpu').param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_param_counts_and_mfu():
    dense = GPT(tiny_config(pos='learned', tie_embeddings=False))
    total = sum(p.numel() for p in dense.parameters())
    assert dense.get_num_params(non_embedding=False) == total
    assert dense.get_num_params() == total - 32 * 32 - 64 * 32  # minus wpe and the untied wte
    moe = GPT(tiny_config(n_experts=8, n_experts_active=2))
    per_expert = moe.transformer.h[0].mlp.w_in[0].numel() + moe.transformer.h[0].mlp.w_out[0].numel()
    assert moe.get_num_params() - moe.get_num_active_params() == 6 * per_expert * 2
    flops_per_token = 6 * dense.get_num_active_params() + 12 * 2 * 4 * 8 * 32
    assert dense.estimate_mfu(1000, 1.0, 1e9) == pytest.approx(flops_per_token * 1000 / 1e9)


def test_crop_block_size_keeps_logits_for_short_inputs():
    torch.manual_seed(0)
    for pos in ('rope', 'learned'):
        model = GPT(tiny_config(pos=pos)).eval()
        x = torch.randint(0, 64, (1, 12))
        before = model(x)[0]
        model.crop_block_size(16)
        assert model.config.block_size == 16
        torch.testing.assert_close(model(x)[0], before)


@pytest.mark.slow
def test_moe_model_compiles_and_matches_eager():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_experts=4, n_shared_experts=1))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    eager_loss = model(x, y)[1]
    compiled_loss = torch.compile(model)(x, y)[1]
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('pos', ['rope', 'learned'])
def test_compiled_backward_on_the_cpu_gives_the_same_gradients_every_time(pos):
    """The same batch through one compiled model four times gives bitwise the same gradients, on 2
    threads: inductor's own embedding backward adds the rows of repeated tokens (and, packed,
    positions) from parallel threads with atomics, in no fixed order (model.embed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the race needs two threads (pytest -n gives each worker one)
    torch._dynamo.reset()  # a fresh compile: past dynamo's recompile limit, earlier tests' graphs would leave it eager
    try:
        torch.manual_seed(0)
        model = GPT(tiny_config(pos=pos, n_layer=1))
        x, y = torch.randint(0, 4, (64, 32)), torch.randint(0, 64, (64, 32))  # 4 tokens: many repeats
        positions = torch.arange(32).remainder(8).expand(64, 32)  # packed rows of 8-token documents
        compiled = torch.compile(model)
        grads = []
        for _ in range(4):
            model.zero_grad()
            compiled(x, y, positions=positions)[1].backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


@pytest.mark.parametrize('k,renormalize', [(1, True), (2, False), (2, True)])
def test_the_router_learns_from_the_lm_loss(k, renormalize):
    """Top-1 (Switch): the gate is the raw router probability. Renormalised over one expert it
    would be g / g = 1, and the router would learn from the load-balancing loss alone."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_experts=4, n_experts_active=k, moe_aux_loss_coef=0.0, moe_renormalize=renormalize))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    _, loss = model(x, y)
    loss.backward()
    router = model.transformer.h[0].mlp.router.weight.grad
    assert router.norm().item() > 1e-4 * model.transformer.h[0].mlp.w_in.grad.norm().item()


def test_top2_gates_sum_to_one_when_renormalised_and_are_the_probabilities_otherwise():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 32)
    for renormalize in (True, False):
        moe = MoE(tiny_config(n_experts=4, n_experts_active=2, moe_renormalize=renormalize, mlp_hidden=8)).eval()
        probs = torch.softmax(moe.router(x.view(-1, 32)), -1)
        gate, _ = moe.gates(probs)
        expected = probs.topk(2, -1).values
        torch.testing.assert_close(gate, expected / expected.sum(-1, keepdim=True) if renormalize else expected)


class LargestTensor(TorchDispatchMode):
    """Inside `with LargestTensor() as seen:`, seen.largest is the element count of the largest
    tensor any op returned."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class AttentionDtypes(TorchDispatchMode):
    """Inside `with AttentionDtypes() as seen:`, seen.dtypes is the set of query dtypes the
    attention kernels (forward and backward) ran with, as the kernel sees them: after autocast."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if 'scaled_dot_product' in func.__name__:
            self.dtypes.add(args[1].dtype if 'backward' in func.__name__ else args[0].dtype)  # backward: grad_out, query
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('head_dim,expected', [(8, torch.float32), (64, torch.bfloat16)])
def test_cpu_bf16_autocast_runs_small_heads_attention_in_fp32(monkeypatch, head_dim, expected):
    """Where bf16 attention goes to SDPA on the CPU (past softmax_attention's score budget, set to 0
    here), model.attention computes heads of <= 32 dims in fp32 (faster there, backward included).
    Under bf16 autocast, which casts SDPA's inputs to bf16, it did not: the kernels ran in bf16
    while the code said fp32. Within the budget no SDPA kernel runs, causal or packed."""
    import model as model_module
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=4 * head_dim))
    x = torch.randint(0, 64, (2, 16))
    positions, mask = common.packed_attention(torch.arange(16).repeat(2, 1) // 5)  # documents of 5 tokens
    for budget, dtypes in ((0, {expected}), (model_module.SOFTMAX_ATTENTION_MAX_SCORES, set())):
        monkeypatch.setattr(model_module, 'SOFTMAX_ATTENTION_MAX_SCORES', budget)
        for kw in ({}, {'positions': positions, 'attn_mask': mask}):
            with AttentionDtypes() as seen:
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    _, loss = model(x, x, **kw)
                loss.backward()
            assert seen.dtypes == dtypes, (budget, kw.keys())


# ----------------------------------------------------------------------------- the chunked loss

def reference_loss(h, weight, targets):
    return torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)


def chunked_inputs(monkeypatch, rows=64):
    """Hidden states (1000, 48), a head (300, 48) and targets with every 7th ignored, in chunks of
    64 rows: 16 chunks, the last one partial (rows >= 1000: one chunk, plain autograd)."""
    import model
    monkeypatch.setattr(model, 'loss_chunk_rows', lambda vocab, device: rows)
    torch.manual_seed(0)
    targets = torch.randint(0, 300, (1000,))
    targets[::7] = -1
    return torch.randn(1000, 48, requires_grad=True), torch.randn(300, 48, requires_grad=True), targets


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('rows', [64, 1000])
def test_chunked_cross_entropy_matches_full_logits(monkeypatch, autocast, rows):
    """Loss and both gradients equal F.cross_entropy on the full logits, over several chunks, a
    last partial chunk and ignored targets, or in one chunk (exact in fp32, to bf16 rounding under
    autocast)."""
    import model
    h, weight, targets = chunked_inputs(monkeypatch, rows)
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        want = reference_loss(h, weight, targets)
        got = model.cross_entropy_from_hidden(h, weight, targets)
    want_grads = torch.autograd.grad(want * 3, (h, weight))
    got_grads = torch.autograd.grad(got * 3, (h, weight))  # the upstream gradient is applied too
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **tol)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):  # eval path
        torch.testing.assert_close(model.cross_entropy_from_hidden(h, weight, targets), want.detach(), **tol)


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('uses', ['logprobs', 'entropy', 'both'])
def test_chunked_token_logprobs_match_full_logits(monkeypatch, autocast, uses):
    """Per-row log p(target) and entropy at a temperature, and the gradients of any weighting of
    them, equal those of log_softmax on the full logits: several chunks, a last partial one,
    ignored targets (log-prob 0, no gradient). Exact in fp32, to bf16 rounding under autocast."""
    import model
    h, weight, targets = chunked_inputs(monkeypatch)
    a, b = torch.randn(1000), torch.randn(1000)  # what the loss weighs each row's terms by (advantages, ...)
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-4, rtol=1e-4)  # sums over 1000 rows
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        logq = torch.log_softmax((h @ weight.t()).float() / 0.7, dim=-1)
        want = (logq.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(targets == -1, 0.0),
                -(logq.exp() * logq).sum(-1))
        got = model.token_logprobs_from_hidden(h, weight, targets, temperature=0.7)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, **tol)

    def loss(logprobs, entropy):
        return ((logprobs * a).sum() if uses != 'entropy' else 0) + ((entropy * b).sum() if uses != 'logprobs' else 0)
    for g, w in zip(torch.autograd.grad(loss(*got), (h, weight)), torch.autograd.grad(loss(*want), (h, weight))):
        assert g.dtype == torch.float32
        if autocast:  # sums of 1000 rows' bf16 products: each element to bf16's ~3 digits, not better
            assert (g - w).norm() / w.norm() < 1e-2
        else:
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.slow
def test_compiled_model_runs_its_loss_chunks_through_one_small_graph(monkeypatch):
    """Under torch.compile the chunk loop stays out of the model's graph (inlined, it unrolled one
    copy of the chunk's kernels per chunk: 16 in pretrain_tiny, ~14 s of its first compile); each
    chunk runs one compiled graph of its own, and the loss and gradients equal the eager ones,
    the last partial chunk and ignored targets included."""
    import model
    monkeypatch.setattr(model, 'loss_chunk_rows', lambda vocab, device: 24)  # 64 rows: 24 + 24 + 16
    torch.manual_seed(0)
    gpt = GPT(tiny_config())
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    y[:, ::5] = -1
    _, eager_loss = gpt(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(gpt.parameters()))

    graphs = []  # what the model's own compile captures: with the loss inlined, its chunk matmuls

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    _, loss = torch.compile(gpt, backend=backend)(x, y)
    grads = torch.autograd.grad(loss, list(gpt.parameters()))
    matmuls = [n for gm in graphs for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
               for n in sub.graph.nodes if n.target in (torch.matmul, operator.matmul)]  # subgraphs too
    assert graphs and not matmuls, matmuls
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for g, want in zip(grads, eager_grads):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    # the chunks ran the inductor-compiled chunk function (full chunks and the partial last one)
    assert model.compiled_chunk_loss_and_grads.cache_info().currsize == 1


def test_chunked_cross_entropy_all_targets_ignored_is_zero():
    import model
    h, weight = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True)
    loss = model.cross_entropy_from_hidden(h, weight, torch.full((8,), -1))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_training_step_never_holds_the_full_logits():
    """No tensor of a forward + backward is as large as the (B*T, vocab) logits: a 32k-vocab batch
    costs chunk-sized memory for its loss, not GBs."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=32768, block_size=64))
    x = torch.randint(0, 32768, (32, 64))
    with LargestTensor() as seen:
        _, loss = model(x, x)
        loss.backward()
    n_logits = x.numel() * 32768
    assert seen.largest <= n_logits // 8, f"a tensor of {seen.largest} elements (logits: {n_logits})"


def test_moe_eval_is_dropless_without_padding_every_expert_to_all_tokens():
    """In eval each expert gets as many rows as the busiest one needs, not one per token: at 64
    experts, top-2, the old E x N buffer was 32x the routed work (and ran out of memory at scale)."""
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_experts=64, n_experts_active=2)).eval()
    x = torch.randn(2, 32, 32)  # N = 64 tokens, C = 32
    with torch.no_grad(), LargestTensor() as seen:
        moe(x)
    padded = 64 * moe.w_in.size(-1) * 64  # E x N rows of the (gate, up) hidden
    assert seen.largest < padded // 4, (seen.largest, padded)


def attention_output_and_grads(attend, q, k, v, grad_out):
    """attend(q, k, v)'s output and the gradients of (output * grad_out).sum() for q, k and v."""
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    y = attend(*inputs)
    y.backward(grad_out)
    return [y.detach()] + [t.grad for t in inputs]


def count_sdpa_calls(monkeypatch):
    import torch.nn.functional as F
    sdpa, seen = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **kw: (seen.append(1), sdpa(*a, **kw))[1])
    return seen


def model_attention(q, k, v):
    import model
    return model.attention(q, k, v, None, is_causal=True, dropout=0.0, cached=False)


@pytest.mark.parametrize('T,calls', [(128, 1), (129, 2), (256, 2), (257, 2), (512, 2), (513, 1), (1024, 1)])
def test_causal_attention_on_the_cpu_runs_in_halves_up_to_512_keys(monkeypatch, T, calls):
    """fp32 causal self-attention of 129-512 tokens on the CPU is two SDPA calls (the first half of
    the queries against the first half of the keys alone): the same output and gradients as one
    causal call, GQA included; one call outside that range, where halving does not pay."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    qkv = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    grad_out = torch.randn(2, 4, T, 16)
    want = attention_output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True), *qkv, grad_out)
    seen = count_sdpa_calls(monkeypatch)
    got = attention_output_and_grads(model_attention, *qkv, grad_out)
    assert len(seen) == calls
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('T,calls', [(64, 0), (256, 0), (257, 0), (512, 0), (513, 1)])
def test_bf16_causal_attention_on_the_cpu_is_written_out_up_to_512_tokens(monkeypatch, T, calls):
    """bf16 causal self-attention of up to 512 tokens on the CPU runs no SDPA kernel (softmax_attention,
    in blocks of 128 queries above 128; 257 tokens: three uneven blocks): output and gradients as
    close to fp64 SDPA's as bf16 SDPA's own, within the rounding of the probabilities to bf16 (2-3x
    SDPA's error here, as transformers' eager attention has); SDPA past 512."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    qkv = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    check_bf16_attention(monkeypatch, model_attention, qkv, torch.randn(2, 4, T, 16), calls,
                         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def check_bf16_attention(monkeypatch, attend, qkv, grad_out, sdpa_calls, reference):
    """attend(q, k, v) in bf16 runs sdpa_calls SDPA kernels, and its output and gradients are bf16 and
    within 4x bf16 SDPA's own error (+1e-3) of the reference SDPA call in fp64."""
    exact = attention_output_and_grads(reference, *(t.double() for t in qkv), grad_out.double())
    bf16 = [t.bfloat16() for t in qkv]
    sdpa_bf16 = attention_output_and_grads(reference, *bf16, grad_out.bfloat16())
    sdpa_errors = [(g.double() - e).abs().max() for g, e in zip(sdpa_bf16, exact)]
    seen = count_sdpa_calls(monkeypatch)
    got = attention_output_and_grads(attend, *bf16, grad_out.bfloat16())
    assert len(seen) == sdpa_calls
    for g, e, sdpa_error in zip(got, exact, sdpa_errors):
        assert g.dtype == torch.bfloat16
        assert (g.double() - e).abs().max() <= 4 * sdpa_error + 1e-3


def test_bf16_attention_beyond_the_score_budget_is_sdpa(monkeypatch):
    """The written-out attention keeps its scores for backward: past SOFTMAX_ATTENTION_MAX_SCORES
    a call goes to SDPA (in halves: two calls), whose kernel keeps none."""
    import model
    q, k, v = (torch.randn(2, heads, 256, 16).bfloat16() for heads in (4, 2, 2))
    seen = count_sdpa_calls(monkeypatch)
    model_attention(q, k, v)
    assert len(seen) == 0  # 2 x 4 x 256 x 256 scores: within the budget
    monkeypatch.setattr(model, 'SOFTMAX_ATTENTION_MAX_SCORES', 2 * 4 * 256 * 256 - 1)
    model_attention(q, k, v)
    assert len(seen) == 2


def test_bf16_packed_attention_on_the_cpu_is_written_out(monkeypatch):
    """bf16 self-attention with a mask (packed documents) runs no SDPA kernel on the CPU either:
    softmax_attention under that mask, output and gradients as close to fp64 SDPA's as the causal
    case (test above) allows."""
    import torch.nn.functional as F
    import model
    from common import packed_attention
    torch.manual_seed(0)
    qkv = torch.randn(2, 4, 96, 16), torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
    mask = packed_attention(torch.randint(0, 4, (2, 96)).sort(dim=1).values)[1]
    check_bf16_attention(monkeypatch, lambda q, k, v: model.attention(q, k, v, mask, False, dropout=0.0, cached=False),
                         qkv, torch.randn(2, 4, 96, 16), 0,
                         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


@pytest.mark.parametrize('n_kv_head', [4, 2, 1])
def test_softmax_attention_matches_sdpa(n_kv_head):
    """The written-out attention equals SDPA's, with GQA: one query per row against a cache (the
    fp32 decode kernel from 8 rows up) with no mask and with a key mask hiding some slots of each
    row (padding); 37 queries under a causal (T, S) mask and under a packed (B, 1, T, S) one,
    gradients included."""
    import torch.nn.functional as F
    from common import packed_attention
    from model import causal_mask, softmax_attention
    torch.manual_seed(0)
    gqa = n_kv_head != 4
    q, k, v = torch.randn(8, 4, 1, 16), torch.randn(8, n_kv_head, 37, 16), torch.randn(8, n_kv_head, 37, 16)
    mask = torch.rand(8, 1, 1, 37) > 0.3
    mask[..., -1] = True  # the step's own slot is always visible
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
        torch.testing.assert_close(softmax_attention(q, k, v, m), want, atol=1e-5, rtol=1e-5)
    qkv = torch.randn(8, 4, 37, 16), k, v
    packed = packed_attention(torch.randint(0, 3, (8, 37)).sort(dim=1).values)[1]  # (8, 1, 37, 37)
    for m in (causal_mask(37, 37, 'cpu'), packed):
        want = attention_output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa),
                                          *qkv, torch.ones(8, 4, 37, 16))
        got = attention_output_and_grads(lambda q, k, v: softmax_attention(q, k, v, m), *qkv, torch.ones(8, 4, 37, 16))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('width', [128, 96])
def test_rmsnorm_matches_torch_rms_norm(width):
    """model.RMSNorm (written out for speed) gives F.rms_norm's values and gradients: bitwise at a
    power-of-two width (1/width is exact), within an ulp otherwise; a bf16 input comes back bf16."""
    import torch.nn.functional as F
    from model import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, width, requires_grad=True)
    grad_out = torch.randn(3, 5, width)
    ours = norm(x)
    ours.backward(grad_out)
    ours_grads = x.grad, norm.weight.grad
    x.grad, norm.weight.grad = None, None
    want = F.rms_norm(x, (width,), norm.weight, 1e-6)
    want.backward(grad_out)
    tol = dict(rtol=0, atol=0) if width == 128 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, want, **tol)
    torch.testing.assert_close(ours_grads[0], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grads[1], norm.weight.grad, rtol=1e-5, atol=1e-6)
    x_bf16 = x.detach().bfloat16()
    assert norm(x_bf16).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x_bf16), F.rms_norm(x_bf16, (width,), norm.weight, 1e-6), rtol=0, atol=0)


def test_rope_rotates_each_pair_of_halves_by_its_angle():
    """apply_rope with rope_cache's tables rotates the pair (i, i + hs/2) of each head by
    p * theta^(-2i/hs) (Su et al. 2021 in Llama's halves layout), so q(m).k(n) depends on m - n only."""
    from model import apply_rope, rope_cache
    torch.manual_seed(0)
    T, H, hs, theta = 11, 3, 8, 10000.0
    cos, sin = rope_cache(T, hs, theta)  # (T, hs) each
    x = torch.randn(T, H, hs, dtype=torch.float64)
    ours = apply_rope(x, cos[:, None].double(), sin[:, None].double())
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    c, s = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, hs/2)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    torch.testing.assert_close(ours, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1), rtol=1e-6, atol=1e-6)
    q, k = torch.randn(hs, dtype=torch.float64), torch.randn(hs, dtype=torch.float64)
    rq = apply_rope(q.expand(T, 1, hs), cos[:, None].double(), sin[:, None].double())[:, 0]  # q at every position
    rk = apply_rope(k.expand(T, 1, hs), cos[:, None].double(), sin[:, None].double())[:, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[9] @ rk[6])  # both 3 apart
    torch.testing.assert_close(rq[0] @ rk[0], q @ k)
