"""dpo_loss's reference-free losses (SimPO, ORPO's odds-ratio term) and sequence_token_counts,
against values worked out by hand with Python floats."""

import math

import pytest
import torch

from dpo_loss import (LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, UNPAIRED_LOSS_TYPES, answer_targets, dpo_loss,
                      kto_loss, kto_metrics, kto_reference_point, orpo_odds_ratio_loss, sequence_token_counts,
                      simpo_loss)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_loss_type_tuples():
    assert REFERENCE_FREE_LOSS_TYPES == ('simpo', 'orpo')
    assert LOSS_TYPES == ('sigmoid', 'ipo', 'hinge')
    assert UNPAIRED_LOSS_TYPES == ('kto',)
    with pytest.raises(ValueError):  # the reference-free ones are not dpo_loss types
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), loss_type='simpo')


def test_simpo_by_hand():
    # beta = 2, gamma = 0.5, chosen -0.5, rejected -1.25:
    #   z = 2 * (-0.5) - 2 * (-1.25) - 0.5 = -1 + 2.5 - 0.5 = 1.0,  loss = -log sigmoid(1) = log(1 + e^-1)
    assert simpo_loss(t(-0.5), t(-1.25), beta=2.0, gamma=0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert math.log1p(math.exp(-1.0)) == pytest.approx(0.3132617, rel=1e-6)
    # beta = 2.5, gamma = 1.25, chosen -2.0 worse than rejected -1.0:
    #   z = 2.5 * (-2) - 2.5 * (-1) - 1.25 = -5 + 2.5 - 1.25 = -3.75,  loss = log(1 + e^3.75)
    assert simpo_loss(t(-2.0), t(-1.0), beta=2.5, gamma=1.25).item() == pytest.approx(math.log1p(math.exp(3.75)), rel=1e-6)
    # a batch with the defaults beta = 2, gamma = 0.5:
    #   equal means: z = -0.5, loss = log(1 + e^0.5);  -0.2 vs -3.0: z = 2 * 2.8 - 0.5 = 5.1, loss = log(1 + e^-5.1)
    got = simpo_loss(t(-1.0, -0.2), t(-1.0, -3.0))
    want = t(math.log1p(math.exp(0.5)), math.log1p(math.exp(-5.1)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    # TRL CPOTrainer's form: -log sigmoid(beta * ((c - r) - simpo_gamma / beta)), the same number
    c, r, beta, gamma = t(-0.7, -1.9), t(-1.1, -0.4), 2.5, 0.8
    trl = -torch.nn.functional.logsigmoid(beta * ((c - r) - gamma / beta))
    torch.testing.assert_close(simpo_loss(c, r, beta=beta, gamma=gamma), trl, rtol=1e-6, atol=1e-7)


def test_simpo_decreases_with_margin_and_gradient_signs():
    rejected = torch.full((13,), -1.5)
    margins = torch.linspace(-3.0, 3.0, 13)
    chosen = (rejected + margins).requires_grad_()
    rejected.requires_grad_()
    losses = simpo_loss(chosen, rejected)
    assert (losses[1:] < losses[:-1]).all(), losses
    losses.sum().backward()
    assert (chosen.grad < 0).all(), chosen.grad
    assert (rejected.grad > 0).all(), rejected.grad
    # d/dc -log sigmoid(z) = -beta * sigmoid(-z); at the first by-hand pair z = 1: -2 / (1 + e)
    c = t(-0.5).requires_grad_()
    simpo_loss(c, t(-1.25)).sum().backward()
    assert c.grad.item() == pytest.approx(-2.0 / (1.0 + math.e), rel=1e-6)


def log_odds(a):
    return a - math.log(1 - math.exp(a))


def test_orpo_by_hand():
    # chosen -0.5, rejected -1.25 (the log1p(-exp) branch):
    #   log odds(-0.5)  = -0.5  - log(1 - e^-0.5)  = -0.5  - log(0.3934693) =  0.4327521
    #   log odds(-1.25) = -1.25 - log(1 - e^-1.25) = -1.25 - log(0.7134952) = -0.9124204
    #   z = 1.3451726, loss = log(1 + e^-z)
    assert log_odds(-0.5) == pytest.approx(-0.5 - math.log(0.3934693), rel=1e-6)
    assert log_odds(-1.25) == pytest.approx(-1.25 - math.log(0.7134952), rel=1e-6)
    z = log_odds(-0.5) - log_odds(-1.25)
    assert z == pytest.approx(1.3451726, rel=1e-6)
    assert orpo_odds_ratio_loss(t(-0.5), t(-1.25)).item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-6)
    # chosen -0.1 worse than rejected -0.05 (both in the log(-expm1) branch, above -log 2):
    #   log odds(-0.1) = -0.1 - log(1 - e^-0.1) = 2.2521685, log odds(-0.05) = -0.05 - log(1 - e^-0.05) = 2.9706281
    z = log_odds(-0.1) - log_odds(-0.05)
    assert z == pytest.approx(2.2521685 - 2.9706281, rel=1e-6)
    got = orpo_odds_ratio_loss(t(-0.5, -0.1, -0.8), t(-1.25, -0.05, -0.8))
    want = t(math.log1p(math.exp(-(log_odds(-0.5) - log_odds(-1.25)))), math.log1p(math.exp(-z)), math.log(2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_orpo_near_zero_is_finite_and_clamped():
    # mean log-probs above -1e-6 (0 included: odds would be infinite) are clamped to -1e-6
    cap = log_odds(-1e-6)  # -1e-6 - log(1 - e^-1e-6) = 13.8155101
    assert cap == pytest.approx(13.8155101, rel=1e-7)
    chosen = t(-1e-8, 0.0, -0.5, -1e-8, 0.0).requires_grad_()
    rejected = t(-0.5, -0.5, -1e-8, -1e-8, -1e-8).requires_grad_()
    loss = orpo_odds_ratio_loss(chosen, rejected)
    z_win = cap - log_odds(-0.5)  # 13.3827579: the near-certain answer is the chosen one
    want = t(math.log1p(math.exp(-z_win)), math.log1p(math.exp(-z_win)), math.log1p(math.exp(z_win)),
             math.log(2), math.log(2))
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=0.0)
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # just below the clamp the value is exact: log(1 - e^a) in float32 by log1p(-exp(a)) would be
    # off by ~2e-4 at a = -1e-4 (1 - exp(a) cancels), shifting this loss by ~3e-8 (2e-4 relative);
    # log(-expm1(a)) is not
    z = log_odds(-1e-4) - log_odds(-0.5)  # 9.2102904 - 0.4327521
    assert orpo_odds_ratio_loss(t(-1e-4), t(-0.5)).item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-5)



def test_orpo_near_zero_in_bfloat16():
    # in bfloat16 exp(a) rounds to 1 for a = -1e-3 (not clamped), so log1p(-exp(a)) is -inf there;
    # the branch that is not used must not leak that into the gradient as nan
    chosen = torch.tensor([0.0, -1e-8, -0.5, -3.0, -1e-3], dtype=torch.bfloat16, requires_grad=True)
    rejected = torch.tensor([-0.5, -0.5, 0.0, -1e-8, -0.5], dtype=torch.bfloat16, requires_grad=True)
    loss = orpo_odds_ratio_loss(chosen, rejected)
    z_win, z_3 = log_odds(-1e-6) - log_odds(-0.5), log_odds(-1e-6) - log_odds(-3.0)
    z_milli = log_odds(chosen[4].item()) - log_odds(-0.5)  # chosen[4] is -1e-3 rounded to bfloat16
    want = torch.tensor([math.log1p(math.exp(-z_win))] * 2 + [math.log1p(math.exp(z_win)), math.log1p(math.exp(z_3)),
                         math.log1p(math.exp(-z_milli))])
    torch.testing.assert_close(loss.float(), want, rtol=2e-2, atol=0.0)
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()

def test_orpo_very_negative():
    # log odds(-50) = -50 - log(1 - e^-50) = -50 + 1.9e-22, i.e. -50 in float32 and in double
    z = log_odds(-0.5) - log_odds(-50.0)  # 50.4327521
    chosen = t(-0.5, -50.0, -50.0, -1000.0).requires_grad_()
    rejected = t(-50.0, -0.5, -50.0, -0.5).requires_grad_()
    loss = orpo_odds_ratio_loss(chosen, rejected)
    want = t(math.log1p(math.exp(-z)), math.log1p(math.exp(z)), math.log(2), 1000.0 + log_odds(-0.5))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0.0)
    assert loss[0].item() == pytest.approx(1.2512e-22, rel=1e-4)  # e^-z, not rounded to 0
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad[1].item() == pytest.approx(-1.0, rel=1e-5)  # d/da log odds(a) = 1 / (1 - e^a) -> 1


def test_sequence_token_counts():
    # token id 0 is a real target; only -1 is masked
    targets = torch.tensor([[-1, 5, 0, -1, 2], [-1, -1, -1, -1, -1], [3, 3, 3, 3, 3]])
    counts = sequence_token_counts(targets)
    assert counts.dtype == torch.float32
    torch.testing.assert_close(counts, t(3.0, 0.0, 5.0), rtol=0.0, atol=0.0)
    # on answer_targets: prompt_len 2, length 5 -> targets at t = 1, 2, 3; prompt_len 3, length 4 -> t = 2
    ids = torch.arange(12).view(2, 6)
    at = answer_targets(ids, torch.tensor([2, 3]), torch.tensor([5, 4]))
    torch.testing.assert_close(sequence_token_counts(at), t(3.0, 1.0), rtol=0.0, atol=0.0)
    # sums / counts are the per-token means
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16)
    logp = logits.log_softmax(-1)
    mean0 = sum(logp[0, i, at[0, i]].item() for i in (1, 2, 3)) / 3
    mean1 = logp[1, 2, at[1, 2]].item()
    sums = -torch.nn.functional.cross_entropy(logits.flatten(0, 1), at.flatten(), ignore_index=-1,
                                              reduction='none').view(at.shape).sum(-1)  # ignored: 0
    torch.testing.assert_close(sums / sequence_token_counts(at), t(mean0, mean1),
                               rtol=1e-5, atol=1e-6)


sigmoid = lambda z: 1 / (1 + math.exp(-z))


def test_kto_by_hand():
    # mismatched pairs: policy - reference = 0.5, 0.5, 0  ->  z0 = 1/3
    z0 = kto_reference_point(t(-6.0, -7.0, -5.0), t(-6.5, -7.5, -5.0))
    assert z0.item() == pytest.approx(1 / 3)
    # implicit rewards r = policy - reference = 1, -1, 0; labels desirable, undesirable, undesirable; beta 0.5
    policy = t(-3.0, -5.0, -2.0).requires_grad_()
    reference, labels = t(-4.0, -4.0, -2.0), torch.tensor([True, False, False])
    loss = kto_loss(policy, reference, labels, z0, beta=0.5)
    want = [1 - sigmoid(0.5 * (1 - 1 / 3)),   # desirable: 1 - sigmoid(beta (r - z0))
            1 - sigmoid(0.5 * (1 / 3 + 1)),   # undesirable: 1 - sigmoid(beta (z0 - r))
            1 - sigmoid(0.5 * (1 / 3 - 0))]
    torch.testing.assert_close(loss, t(*want), rtol=1e-6, atol=0.0)
    # lambda_D = 2, lambda_U = 0.5 scale each side
    weighted = kto_loss(policy, reference, labels, z0, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, t(2 * want[0], 0.5 * want[1], 0.5 * want[2]), rtol=1e-6, atol=0.0)
    # the gradient raises the desirable answer's log-prob and lowers the undesirable ones'
    loss.sum().backward()
    assert policy.grad[0] < 0 and policy.grad[1] > 0 and policy.grad[2] > 0
    # at r = z0 every example's loss is lambda / 2
    assert kto_loss(t(0.0), t(0.0), torch.tensor([True]), torch.tensor(0.0)).item() == pytest.approx(0.5)


def test_kto_reference_point_is_clamped_and_detached():
    kl_policy = t(-6.0, -7.0).requires_grad_()
    z0 = kto_reference_point(kl_policy, t(-5.0, -5.0))  # policy below the reference: mean -1.5 -> 0
    assert z0.item() == 0.0 and not z0.requires_grad
    z0 = kto_reference_point(kl_policy, t(-7.0, -8.0))  # mean +1, but no gradient through it
    assert z0.item() == pytest.approx(1.0) and not z0.requires_grad
    m = kto_metrics(t(-3.0, -5.0, -2.0), t(-4.0, -4.0, -2.0), torch.tensor([True, False, False]), torch.tensor(1 / 3), 0.5)
    # rewards 0.5 * (1, -1, 0): desirable 0.5, undesirable mean -0.25; right side of beta z0 = 1/6: 0.5 > 1/6,
    # -0.5 < 1/6, 0 < 1/6
    assert {k: round(v.item(), 6) for k, v in m.items()} == {
        'rewards/chosen': 0.5, 'rewards/rejected': -0.25, 'rewards/margins': 0.75, 'rewards/accuracies': 1.0,
        'logps/chosen': -3.0, 'logps/rejected': -3.5, 'kl': round(1 / 3, 6)}
