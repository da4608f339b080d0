"""
The DPO family of preference losses as pure functions of sequence log-probabilities, for dpo.py
and its tests. The reference-based losses (LOSS_TYPES) see four numbers per pair: log pi(y_c|x),
log pi(y_r|x) under the policy and the same under the frozen reference, each summed over the
response tokens. The reference-free ones (REFERENCE_FREE_LOSS_TYPES) see two: the policy's
per-token MEAN log-probs of the chosen and the rejected response (the sums / sequence_token_counts).
The sums come from the model: -GPT.forward(ids, targets, reduction='none').sum(-1), chunk by chunk,
never the (B, T, vocab) logits (dpo.answer_logps).

    answer_targets(ids, prompt_len, length) next-token targets on the answer tokens, -1 elsewhere
    sequence_token_counts(targets)          (B, T) -> (B,) answer tokens per row, to turn sums into means
    dpo_loss(pc, pr, rc, rr, beta, type)    per-pair losses (B,): sigmoid | ipo | hinge, label smoothing
    simpo_loss(c_avg, r_avg, beta, gamma)   per-pair SimPO losses (B,), reference-free, on mean log-probs
    orpo_odds_ratio_loss(c_avg, r_avg)      per-pair ORPO odds-ratio term (B,), reference-free; ORPO = NLL + lambda * it
    rpo_nll(chosen_logps, n_tokens)         the SFT term on chosen answers (RPO)
    preference_metrics(pc, pr, rc, rr, beta)  TRL's rewards/* and logps/*
    kto_reference_point(kl_p, kl_r)         KTO's z0: the batch's KL estimate from mismatched pairs
    kto_loss(p, r, labels, z0, beta, ...)   per-example KTO losses (B,), unpaired: desirable or not
    kto_metrics(p, r, labels, z0, beta)     rewards/* and logps/* for KTO
"""

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ('sigmoid', 'ipo', 'hinge')  # reference-based: dpo_loss
REFERENCE_FREE_LOSS_TYPES = ('simpo', 'orpo')  # simpo_loss, orpo_odds_ratio_loss (+ rpo_nll)
UNPAIRED_LOSS_TYPES = ('kto',)  # kto_loss: one completion per example, labelled desirable or not


def answer_targets(ids, prompt_len, length):
    """ids (..., T) right-padded rows of prompt + answer; prompt_len and length broadcast to
    ids' leading shape. Target at t is ids[t + 1] where that token belongs to the answer
    (prompt_len <= t + 1 < length), else -1: the prompt and the pads are masked."""
    pos = torch.arange(ids.size(-1), device=ids.device)
    on_answer = (pos >= prompt_len[..., None] - 1) & (pos < length[..., None] - 1)
    return torch.where(on_answer, ids.roll(-1, dims=-1), -1)


def sequence_token_counts(targets):
    """Number of positions whose target is not -1 (the response tokens), targets (B, T) -> (B,) in
    float32: a row's summed answer log-probs / sequence_token_counts(targets) is the per-token mean
    log-prob that SimPO, ORPO and TRL's IPO use. A row with no answer token counts 0 (its mean is nan)."""
    return (targets != -1).sum(-1).float()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type='sigmoid',
             label_smoothing=0.0):
    """Per-pair losses (B,). With h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)),
    how much more than the reference the policy prefers the chosen answer:

    sigmoid  DPO (Rafailov et al. 2023, eq. 7):         -log sigmoid(beta * h)
             with label_smoothing = eps, conservative DPO (Mitchell 2023, cDPO: each label is
             wrong with probability eps):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo      IPO (Azar et al. 2023, "A general theoretical paradigm...", eq. 17):   (h - 1 / (2 beta))^2,
             a target gap rather than an unbounded push, so deterministic preferences do not
             drive h to infinity. The paper's h is built from whole-sequence log-probs (sums, as
             above). TRL's DPOTrainer instead divides the log-probs (policy and reference) by the
             completion length when loss_type == 'ipo' (TRL PR #1265, after the IPO authors pointed
             it out to Hugging Face, per their "pref-tuning" blog post; the paper does not say it),
             so h is a difference of per-token means and the target 1 / (2 beta) does not depend on
             the answers' lengths. dpo.py's ipo_length_normalize chooses (True = TRL's normalised
             form); this function uses whichever log-probs it is given.
    hinge    SLiC (Zhao et al. 2023), with the reference term as in RSO (Liu et al. 2023) and
             TRL:                                       max(0, 1 - beta * h)

    At h = 0 (policy == reference): log 2, 1 / (4 beta^2) and 1."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == 'sigmoid':
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == 'ipo':
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == 'hinge':
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=0.5):
    """Per-pair SimPO losses (B,) (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with
    a Reference-Free Reward", eq. 6):

        -log sigmoid(beta * avg_logp(y_c) - beta * avg_logp(y_r) - gamma)

    chosen_avg, rejected_avg: the policy's per-token MEAN log-probs of each response,
    (1/|y|) log pi(y|x), i.e. the summed log-probs / sequence_token_counts. No reference model: the
    length-normalised log-prob is the implicit reward, and gamma > 0 is a target reward margin.
    TRL's CPOTrainer(loss_type='simpo', cpo_alpha=0.0) computes the same thing: it averages the
    log-probs, subtracts simpo_gamma / beta from their difference and scales by beta, so its
    simpo_gamma is this gamma. The authors' README: the preprint used beta 2.0 or 2.5 (sometimes a
    larger beta, e.g. 10, does better); tune gamma / beta, starting at 0.5 and searching 0 to 1.
    At chosen_avg == rejected_avg: log(1 + exp(gamma))."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) above -log 2, where 1 - exp(x) would cancel,
    log1p(-exp(x)) below. Each branch is fed a harmless -1 where it is not used, so its inf (in
    bfloat16 exp(-1e-3) is already 1) cannot turn the gradient into nan through torch.where."""
    near_zero = x > -math.log(2)
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))))


ORPO_MAX_AVG_LOGP = -1e-6  # orpo_odds_ratio_loss clamps mean log-probs to at most this


def orpo_odds_ratio_loss(chosen_avg, rejected_avg):
    """Per-pair ORPO odds-ratio term L_OR (B,) (Hong, Lee, Thorne 2024, "ORPO: Monolithic
    Preference Optimization without Reference Model", eqs. 4-7):

        -log sigmoid(log odds(y_c) - log odds(y_r)),   log odds(y) = a - log(1 - exp(a))

    where a = avg_logp(y) is the policy's per-token MEAN log-prob of the response (ORPO's
    P(y|x) is exp of the mean, as in TRL's ORPOTrainer.odds_ratio_loss, which also computes
    log(1 - exp(a)) as torch.log1p(-torch.exp(a))). The full ORPO objective is
    L_SFT + lambda * L_OR (eq. 6), L_SFT the NLL of the chosen response per token. The caller adds
    it: dpo.py as -chosen_avg per pair, then the mean over pairs (each response's own per-token
    average, as the paper writes L_SFT); TRL's ORPOTrainer pools the tokens of the whole batch
    instead, which weighs long answers more. TRL's ORPOConfig calls lambda beta. No reference model.

    log(1 - exp(a)) is _log1mexp (log1p(-exp(a)) below -log 2, log(-expm1(a)) above it). At a = 0
    (every answer token at probability 1) the odds are infinite, so a is first clamped to at most
    ORPO_MAX_AVG_LOGP = -1e-6: odds at most ~1e6, log odds at most ~13.8, loss and gradient finite
    (the gradient w.r.t. a clamped value is 0). At chosen_avg == rejected_avg: log 2."""
    def log_odds(a):
        a = a.clamp(max=ORPO_MAX_AVG_LOGP)
        return a - _log1mexp(a)
    return -F.logsigmoid(log_odds(chosen_avg) - log_odds(rejected_avg))


def rpo_nll(chosen_logps, n_tokens):
    """RPO's SFT term (Pang et al. 2024, iterative reasoning preference optimisation):
    the negative log-likelihood of the chosen answers per token, -sum log pi(y_c) / |y_c|, here
    over the batch. DPO alone can lower the chosen answer's probability as long as the rejected
    one falls faster; this term holds it up."""
    return -chosen_logps.sum() / n_tokens


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """TRL DPOTrainer's metrics, as tensors (no host sync). The implicit reward of an answer is
    beta * (log pi(y) - log ref(y)); accuracies = share of pairs where chosen's is the larger."""
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return {'rewards/chosen': chosen.mean(), 'rewards/rejected': rejected.mean(),
            'rewards/accuracies': (chosen > rejected).float().mean(), 'rewards/margins': (chosen - rejected).mean(),
            'logps/chosen': policy_chosen.detach().mean(), 'logps/rejected': policy_rejected.detach().mean()}


def kto_reference_point(kl_policy_logps, kl_ref_logps):
    """KTO's reference point z0 (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", section 4.1; TRL's KTOTrainer): an estimate of KL(pi || ref) from the
    batch itself,
        z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)])
    where y'_j is a completion of ANOTHER example paired with prompt x_j (a mismatched pair: what
    the policy would say to x_j in general, not the labelled answer). Clamped at 0 (a KL is not
    negative) and detached: the paper does not backpropagate through it, so the policy cannot
    lower the loss by moving z0. Inputs: summed log-probs (B,) of the mismatched pairs."""
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps, ref_logps, labels, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO losses (B,) (Ethayarajh et al. 2024, section 4.1, the loss TRL's KTOTrainer
    cites as eq. 7; its loss_type='kto', whose batch loss is the mean of these).
    With r = log pi(y|x) - log ref(y|x), the implicit reward, and z0 from kto_reference_point:
        desirable   (label True):   lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable (label False):  lambda_U * (1 - sigmoid(beta * (z0 - r)))
    A desirable answer is pushed above the reference point, an undesirable one below it; the
    sigmoid saturates, so an example already far on its side stops pulling (prospect theory's
    value function, concave in gains). lambda_D = desirable_weight, lambda_U = undesirable_weight:
    the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] with n_D, n_U the numbers of
    desirable and undesirable examples. At r = z0: lambda / 2. labels (B,) bool."""
    labels = labels.bool()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (policy_logps - ref_logps - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - (policy_logps - ref_logps))))
    return torch.where(labels, desirable, undesirable)


def kto_metrics(policy_logps, ref_logps, labels, z0, beta):
    """TRL KTOTrainer's rewards/* and kl, as tensors; rewards/accuracies is the share of examples on
    their label's side of z0 (r > z0 for a desirable one, r < z0 for an undesirable one). A batch
    without desirable (or undesirable) examples gives 0 for their means."""
    labels = labels.bool()
    rewards = beta * (policy_logps - ref_logps).detach()
    mean_of = lambda x, m: (x * m).sum() / m.sum().clamp(min=1)
    chosen, rejected = mean_of(rewards, labels), mean_of(rewards, ~labels)
    right_side = torch.where(labels, rewards > beta * z0, rewards < beta * z0).float()
    return {'rewards/chosen': chosen, 'rewards/rejected': rejected, 'rewards/margins': chosen - rejected,
            'rewards/accuracies': right_side.mean(), 'logps/chosen': mean_of(policy_logps.detach(), labels),
            'logps/rejected': mean_of(policy_logps.detach(), ~labels), 'kl': z0.detach()}
