"""
The DPO family of preference losses as pure functions of sequence log-probabilities, for dpo.py
and its tests. Every loss sees four numbers per pair: log pi(y_c|x), log pi(y_r|x) under the
policy and the same under the frozen reference, each summed over the response tokens.

    answer_targets(ids, prompt_len, length) next-token targets on the answer tokens, -1 elsewhere
    sequence_logps(logits, targets)         (B, T, V), (B, T) -> (B,)
    dpo_loss(pc, pr, rc, rr, beta, type)    per-pair losses (B,): sigmoid | ipo | hinge, label smoothing
    rpo_nll(chosen_logps, n_tokens)         the SFT term on chosen answers (RPO)
    preference_metrics(pc, pr, rc, rr, beta)  TRL's rewards/* and logps/*
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ('sigmoid', 'ipo', 'hinge')


def answer_targets(ids, prompt_len, length):
    """ids (..., T) right-padded rows of prompt + answer; prompt_len and length broadcast to
    ids' leading shape. Target at t is ids[t + 1] where that token belongs to the answer
    (prompt_len <= t + 1 < length), else -1: the prompt and the pads are masked."""
    pos = torch.arange(ids.size(-1), device=ids.device)
    on_answer = (pos >= prompt_len[..., None] - 1) & (pos < length[..., None] - 1)
    return torch.where(on_answer, ids.roll(-1, dims=-1), -1)


def sequence_logps(logits, targets):
    """Sum of log p(target) over the positions whose target is not -1 (the response tokens).
    logits (B, T, V), targets (B, T) -> (B,) in float32."""
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction='none')
    return logp.view(targets.shape).sum(-1)  # ignored positions contribute 0


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type='sigmoid',
             label_smoothing=0.0):
    """Per-pair losses (B,). With h = (log pi(y_c) - log pi(y_r)) - (log ref(y_c) - log ref(y_r)),
    how much more than the reference the policy prefers the chosen answer:

    sigmoid  DPO (Rafailov et al. 2023, eq. 7):         -log sigmoid(beta * h)
             with label_smoothing = eps, conservative DPO (Mitchell 2023, cDPO: each label is
             wrong with probability eps):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo      IPO (Azar et al. 2023, "A general theoretical paradigm..."):   (h - 1 / (2 beta))^2,
             a target gap rather than an unbounded push, so deterministic preferences do not
             drive h to infinity
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
