"""rl.py: the RL math against hand-computed values and exact expectations, and the model-facing
forward against the KV-cache rollout it must agree with."""

import math

import pytest
import torch

import rl
from generate import GenerationConfig, generate_ids, pad_prompts, ragged_inputs
from model import GPT, GPTConfig


def test_gae_matches_hand_computed_example():
    # row 0: gamma 0.9, lam 0.5, reward 1 at the end
    #   deltas: t2 = 1 + 0 - 0.7 = 0.3;  t1 = 0 + 0.9 * 0.7 - 0.6 = 0.03;  t0 = 0.9 * 0.6 - 0.5 = 0.04
    #   A2 = 0.3;  A1 = 0.03 + 0.45 * 0.3 = 0.165;  A0 = 0.04 + 0.45 * 0.165 = 0.11425
    # row 1: one real token, then padding whose values (9.0) must not leak in: A0 = 2 - 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    advantages, returns = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.11425, 0.165, 0.3], [1.5, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.61425, 0.765, 1.0], [2.0, 0.0, 0.0]]))


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    advantages, returns = rl.gae(rewards, values, mask, gamma=0.8, lam=1.0)
    expected = torch.stack([sum(0.8 ** (k - t) * rewards[:, k] for k in range(t, 6)) for t in range(6)], dim=1)
    torch.testing.assert_close(returns, expected)


def test_whitening_gives_zero_mean_unit_variance_on_real_tokens_only():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(rl.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rl.masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_clipped_policy_loss_matches_hand_computed_values():
    # ratio 1.5 and 0.5 with advantage +1 and -1, eps = 0.2:
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped: no incentive past 1.2)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: the pessimistic bound)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5 (unclipped)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8 (clipped)
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = rl.policy_loss(new, old, advantages, cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]
    loss.sum().backward()  # d/dlogp (-A r) = -A r where unclipped; 0 where clipped
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5, 1.5, 0.0]))


def test_clipped_value_loss_matches_hand_computed_values():
    # V_old = 1, R = 2, eps_v = 0.2.  V = 1.5: clipped to 1.2; max(0.25, 0.64) = 0.64 -> 0.32
    #                                 V = 1.1: inside the clip;  (1.1 - 2)^2 = 0.81   -> 0.405
    #                                 V = 0.5: clipped to 0.8;  max(2.25, 1.44) = 2.25 -> 1.125
    values = torch.tensor([1.5, 1.1, 0.5])
    loss, clipped = rl.value_loss(values, torch.ones(3), torch.full((3,), 2.0), cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.405, 1.125]))
    assert clipped.tolist() == [True, False, False]


def test_kl_estimators_average_to_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum()
    logp, logq = p.log(), q.log()
    for estimator in ('k1', 'k3'):
        k = rl.kl_penalty(logp, logq, estimator)  # the estimate at each outcome x
        torch.testing.assert_close((p * k).sum(), exact)  # E_{x~p}[k(x)] = KL(p || q): unbiased
    assert (rl.kl_penalty(logp, logq, 'k1') < 0).any() and (rl.kl_penalty(logp, logq, 'k3') >= 0).all()
    # and from samples, as in training: both close to the exact value, k3 with less spread
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = rl.kl_penalty(logp[x], logq[x], 'k1'), rl.kl_penalty(logp[x], logq[x], 'k3')
    assert abs(k1.mean() - exact) < 0.01 and abs(k3.mean() - exact) < 0.01
    assert k3.std() < k1.std()


def test_as_a_loss_only_k3_pulls_the_policy_towards_the_reference():
    """The expected gradient of each estimator as GRPO uses it: x ~ pi, the estimate at x
    differentiated through log pi(x)."""
    torch.manual_seed(0)
    logits, ref = torch.randn(6, requires_grad=True), torch.randn(6)
    logp, logq = logits.log_softmax(-1), ref.log_softmax(-1)
    weights = logp.exp().detach()  # the on-policy sampling distribution, held fixed
    grads = {est: torch.autograd.grad((weights * rl.kl_penalty(logp, logq, est)).sum(), logits, retain_graph=True)[0]
             for est in ('k1', 'k3')}
    reverse_kl = (logq.exp() * (logq - logp)).sum()  # KL(ref || pi)
    target = torch.autograd.grad(reverse_kl, logits)[0]
    torch.testing.assert_close(grads['k1'], torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(grads['k3'], target)
    assert target.norm() > 0.1


def test_k3_is_clamped_where_the_reference_finds_a_token_impossible():
    k3 = rl.kl_penalty(torch.tensor([0.0, -1.0]), torch.tensor([-1e4, 1e4]), 'k3')
    assert torch.isfinite(k3).all() and k3.max() <= 10.0


def test_log_probs_and_entropy_are_the_sampling_distributions():
    """ActorCritic's log-probs and entropies, from the hidden states chunk by chunk, are those of
    softmax(logits / temperature), the distribution the sampler drew from."""
    model = tiny_model()
    ids = torch.randint(0, 40, (3, 9))
    logprobs, entropy, values, _ = rl.ActorCritic(model)(ids, n_query=4, temperature=0.7)
    logq = torch.log_softmax(model(ids)[0][:, 3:-1] / 0.7, dim=-1)  # (3, 5, V)
    torch.testing.assert_close(logprobs, logq.gather(-1, ids[:, 4:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(logq.exp() * logq).sum(-1))
    assert values is None


def test_a_turn_ends_with_im_end_only():
    IM_END, EOT, PAD = 5, 6, 0
    tokens = torch.tensor([[1, 2, IM_END, PAD], [1, EOT, PAD, PAD], [1, 2, 3, 4], [PAD] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert rl.ended_with(tokens, mask, IM_END).tolist() == [True, False, False, False]


def test_adaptive_kl_controller_moves_towards_the_target():
    assert rl.adaptive_kl_coef(0.1, 6.0, 6.0, 100, 1000) == pytest.approx(0.1)
    assert rl.adaptive_kl_coef(0.1, 12.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at 0.2
    assert rl.adaptive_kl_coef(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_grpo_advantages_sum_to_zero_per_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    for scale in (True, False):
        a = rl.group_advantages(scores, group_size=4, scale=scale).view(3, 4)
        torch.testing.assert_close(a.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    a = rl.group_advantages(scores, group_size=4, scale=True).view(3, 4)
    assert a[1].abs().max() == 0  # a group that all scored the same teaches nothing (and gives no NaN)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    torch.testing.assert_close(rl.group_advantages(scores, 4, scale=False).view(3, 4)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


LOSS = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 7.0, 7.0, 7.0]])
LOSS_MASK = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)  # 5 real tokens, summing to 7


@pytest.mark.parametrize('loss_type,expected', [
    ('grpo', (4 / 4 + 3 / 1) / 2),  # mean per response (1 and 3), then over the 2 responses
    ('bnpo', 7 / 5),  # the token sum over this batch's 5 tokens
    ('dr_grpo', 7 / (2 * 4)),  # the token sum over a constant: 2 responses x max_len 4 (the width here)
    ('dapo', 7 / 5),  # one process: the global count is this batch's
])
def test_each_loss_type_matches_a_hand_computed_value(loss_type, expected):
    assert rl.aggregate(LOSS, LOSS_MASK, loss_type).item() == pytest.approx(expected)
    # micro-batches given the minibatch's normaliser add up to the minibatch's loss
    norm = rl.loss_normaliser(loss_type, LOSS_MASK)
    parts = sum(rl.aggregate(LOSS[i:i + 1], LOSS_MASK[i:i + 1], loss_type, norm) for i in range(2))
    assert parts.item() == pytest.approx(expected)


def test_loss_normalisers_under_two_ranks_and_a_longer_max_len():
    # dr_grpo divides by max_new_tokens, not the batch's width: 7 / (2 x 8)
    norm = rl.loss_normaliser('dr_grpo', LOSS_MASK, max_len=8)
    assert rl.aggregate(LOSS, LOSS_MASK, 'dr_grpo', norm).item() == pytest.approx(7 / 16)
    # two ranks, the other holding 3 tokens: dapo divides by all 8 tokens / 2 ranks (DDP then
    # averages the two ranks' gradients: each token weighs 1/8); bnpo by this rank's 5
    other_rank = lambda t: t.sum() + 3
    dapo = rl.loss_normaliser('dapo', LOSS_MASK, total=other_rank, world_size=2)
    assert dapo.item() == 4 and rl.aggregate(LOSS, LOSS_MASK, 'dapo', dapo).item() == pytest.approx(7 / 4)
    assert rl.loss_normaliser('bnpo', LOSS_MASK, total=other_rank, world_size=2).item() == 5
    with pytest.raises(ValueError, match='unknown loss_type'):
        rl.aggregate(LOSS, LOSS_MASK, 'token')


def test_rloo_baseline_leaves_each_sample_out():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    a = rl.rloo_advantages(scores, group_size=4).view(3, 4)
    # [1, 0, 0, 1]: a 1 against (0 + 0 + 1) / 3, a 0 against (1 + 0 + 1) / 3
    torch.testing.assert_close(a[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # [3, 1, 2, 2]: 3 - 5/3, 1 - 7/3, 2 - 6/3, 2 - 6/3
    torch.testing.assert_close(a[1], torch.tensor([4 / 3, -4 / 3, 0.0, 0.0]))
    assert a[2].abs().max() == 0  # the same score everywhere: no signal
    # = G / (G - 1) x the group-mean advantage
    torch.testing.assert_close(a.view(-1), 4 / 3 * rl.group_advantages(scores, 4, scale=False))


def test_reinforce_pp_whitens_the_score_over_every_token_of_the_batch():
    scores = torch.tensor([1.0, 0.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    # the tokens' returns: 1, 1 | 0 | 2, 2: mean 6/5; squared deviations 0.04 + 0.04 + 1.44 + 0.64 + 0.64
    # = 2.8, unbiased variance 2.8 / 4 = 0.7
    std = math.sqrt(0.7)
    expected = torch.tensor([[-0.2, -0.2], [-1.2, 0.0], [0.8, 0.8]]) / std
    torch.testing.assert_close(rl.reinforce_pp_advantages(scores, mask), expected)
    # over all ranks: with a second rank holding the same batch the mean stays 6/5, and the unbiased
    # variance over its 10 tokens is 2 x 2.8 / 9
    twice = lambda t: 2 * t.sum()
    torch.testing.assert_close(rl.reinforce_pp_advantages(scores, mask, total=twice),
                               torch.tensor([[-0.2, -0.2], [-1.2, 0.0], [0.8, 0.8]]) / math.sqrt(5.6 / 9))


def test_clip_higher_lets_a_favoured_token_grow_further():
    # eps_low 0.2, eps_high 0.28 (DAPO):
    #   A=+1, r=1.25: max(-1.25, -1.25) = -1.25, inside [0.8, 1.28]: not clipped (symmetric 0.2 clips at -1.2)
    #   A=+1, r=1.5:  max(-1.5, -1.28)  = -1.28 (clipped at 1 + eps_high)
    #   A=-1, r=0.5:  max( 0.5,  0.8)   =  0.8  (clipped at 1 - eps_low, unchanged)
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.25, 1.5, 0.5]))
    advantages = torch.tensor([1.0, 1.0, -1.0])
    loss, clipped = rl.policy_loss(new, old, advantages, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.25, -1.28, 0.8]))
    assert clipped.tolist() == [False, True, True]
    symmetric, _ = rl.policy_loss(new, old, advantages, 0.2)
    torch.testing.assert_close(symmetric, torch.tensor([-1.2, -1.2, 0.8]))


def test_dynamic_sampling_keeps_only_groups_whose_scores_differ():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.5])
    assert rl.varied_groups(scores, 4).tolist() == [False, True, False, True]
    # the dropped ones are exactly those whose group advantages are all zero
    a = rl.group_advantages(scores, 4).view(4, 4)
    assert (a.abs().sum(1) > 0).tolist() == [False, True, False, True]


def test_overlong_shaping_and_masking():
    # L_max 8, L_cache 4, factor 0.5: no penalty up to 4 tokens, then -0.5 * (|y| - 4) / 4
    lengths = torch.tensor([2, 4, 5, 7, 8])
    torch.testing.assert_close(rl.overlong_penalty(lengths, max_len=8, buffer_len=4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5]))
    # a response cut at max_new_tokens (not stopped) leaves the loss entirely; the others keep their tokens
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    stopped = torch.tensor([True, True, False])
    kept = rl.mask_truncated(mask, stopped)
    assert kept.tolist() == [[True, True, True], [True, True, False], [False, False, False]]
    loss = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 9.0], [50.0, 50.0, 50.0]])
    assert rl.aggregate(loss, kept, 'dapo').item() == pytest.approx(7 / 5)  # the cut response's 150 is gone


# ----------------------------------------------------------------------------- the model-facing forward

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=32))


def rollout(model, prompts, cfg, pad_id=0):
    """What ppo.py does: sample with the cache, then lay out prompt + response for a full forward."""
    gen = generate_ids(model.eval(), prompts, cfg, pad_id)
    query, pad = pad_prompts(prompts, pad_id, 'cpu')
    ids = torch.cat([query, gen.tokens], dim=1)
    positions, mask, _ = ragged_inputs(pad, ids.size(1), ids.size(1))
    return gen, ids, positions, mask, query.size(1)


def test_rollout_logprobs_with_the_cache_equal_a_full_forward_without_it():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]  # ragged: left-padded
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, stop_token_ids=(39,), seed=0)
    gen, ids, positions, mask, Tq = rollout(model, prompts, cfg)
    full = rl.ActorCritic(model.train())(ids, positions, mask, Tq)[0]
    torch.testing.assert_close(full * gen.mask, gen.logprobs, atol=1e-5, rtol=1e-5)
    # greedy tokens equal the no-cache decode of each prompt alone
    greedy = generate_ids(model.eval(), prompts, GenerationConfig(max_new_tokens=8, temperature=0.0))
    for p, tokens in zip(prompts, greedy.tokens):
        alone = model.generate(torch.tensor([p]), 8, temperature=0, use_cache=False)[0, len(p):]
        assert tokens.tolist() == alone.tolist()


def test_first_minibatch_has_ratio_one_and_no_gradient_from_clipping():
    model = tiny_model()
    head = torch.nn.Linear(32, 1)
    ac = rl.ActorCritic(model, None, head)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]] * 2
    gen, ids, positions, mask, Tq = rollout(model, prompts, GenerationConfig(max_new_tokens=6, seed=1))
    ac.train()
    with torch.no_grad():  # the rollout's log-probs, whole batch at once
        old = ac(ids, positions, mask, Tq)[0]
    advantages = torch.randn(old.shape) * gen.mask
    index = torch.tensor([5, 0, 2])  # a shuffled minibatch
    new = ac(ids[index], positions[index], mask[index], Tq)[0]
    m = gen.mask[index]
    ratio = torch.exp(new - old[index])[m]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    loss, clipped = rl.policy_loss(new, old[index], advantages[index], cliprange=0.2)
    assert not clipped[m].any()
    grad_clipped = torch.autograd.grad(rl.aggregate(loss, m), model.transformer.wte.weight, retain_graph=True)[0]
    surrogate = -advantages[index] * torch.exp(new - old[index])  # the objective without clipping
    grad_plain = torch.autograd.grad(rl.aggregate(surrogate, m), model.transformer.wte.weight)[0]
    torch.testing.assert_close(grad_clipped, grad_plain)
    assert grad_plain.abs().sum() > 0


def test_shared_backbone_values_come_from_the_policy_hidden_states():
    model = tiny_model()
    head = torch.nn.Linear(32, 1)
    ids = torch.randint(0, 40, (2, 9))
    logprobs, _, values, _ = rl.ActorCritic(model, None, head)(ids, n_query=4)
    h, _ = model.hidden_states(ids)
    torch.testing.assert_close(values, head(h[:, 3:-1]).squeeze(-1))
    logq = torch.log_softmax(model(ids)[0][:, 3:-1], dim=-1)
    torch.testing.assert_close(logprobs, logq.gather(-1, ids[:, 4:, None]).squeeze(-1))



def test_the_moe_load_balancing_loss_reaches_ppo():
    """ActorCritic returns the policy's and the critic's aux losses (ppo.py weighs them into its loss)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=32, n_experts=4)
    policy, critic = GPT(config), GPT(config)
    ids = torch.randint(0, 40, (2, 9))
    _, _, _, aux = rl.ActorCritic(policy, critic, torch.nn.Linear(32, 1))(ids, n_query=4)
    expected = policy.hidden_states(ids)[1] + critic.hidden_states(ids)[1]
    torch.testing.assert_close(aux, expected)
    assert aux.item() > 0 and torch.autograd.grad(aux, policy.transformer.h[0].mlp.router.weight)[0].abs().sum() > 0
