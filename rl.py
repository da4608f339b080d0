"""
The math of RL fine-tuning, as small pure functions on (B, T) tensors over response tokens, for
ppo.py to tell its story with. `mask` is 1 (True) on real response tokens, 0 on padding after a
response's end; every function leaves padding out.

    masked_whiten                                  whitening over real tokens only (and all ranks)
    kl_penalty                                     k1 / k3 estimators of KL(pi || pi_ref)
    adaptive_kl_coef                               Ziegler et al.'s proportional KL controller
    gae                                            generalised advantage estimation (PPO)
    group_advantages                               GRPO's per-prompt normalised scores
    policy_loss, value_loss                        PPO's clipped objectives, per token
    aggregate                                      token- or sequence-level loss normalisation
    logprobs_from_logits, entropy_from_logits      what the losses are made of

The last section holds the one model-facing piece: ActorCritic, the policy with its value head,
and the forward pass over prompt + response that both the rollout and the update use.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- statistics

def masked_whiten(x, mask, shift_mean=True, eps=1e-8, total=torch.sum):
    """(x - mean) / std over masked positions (unbiased variance, as TRL); padding becomes 0.
    shift_mean=False keeps the mean (whitening rewards must not change their sign on average).
    total(t): the sum of t's elements; under DDP over every rank's batch, so that N ranks whiten
    by the statistics of the whole batch, as one process does."""
    mask = mask.to(x.dtype)
    count = total(mask)
    mean = total(x * mask) / count.clamp(min=1)
    centred = x - mean
    n = count.clamp(min=2)
    var = total(centred ** 2 * mask) / count.clamp(min=1) * n / (n - 1)
    whitened = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ----------------------------------------------------------------------------- KL to the reference

def kl_penalty(logprobs, ref_logprobs, estimator='k1'):
    """Per-token estimate of KL(pi || pi_ref) from tokens x sampled from pi
    (Schulman 2020, "Approximating KL Divergence"). With log r = log pi_ref(x) - log pi(x):
        k1 = -log r               unbiased; one sample may be negative
        k3 = (r - 1) - log r      unbiased too, always >= 0 and lower variance (GRPO's choice)
    Both average to the exact KL over x ~ pi: either serves as a value (PPO's per-token reward).
    As a loss term (GRPO) what counts is the gradient, with the samples held fixed: on-policy
    k1's is E_pi[grad log pi] = 0, a penalty that does nothing; k3's is sum_x (pi - pi_ref) grad
    log pi = grad KL(pi_ref || pi), which pulls pi towards pi_ref. k3's log r is clamped to
    [-20, 20] and the result to at most 10, as verl's low_var_kl does: one token the reference
    finds impossible cannot blow up the loss."""
    log_r = ref_logprobs - logprobs
    if estimator == 'k1':
        return -log_r
    if estimator == 'k3':
        log_r = log_r.clamp(-20.0, 20.0)
        return (torch.expm1(log_r) - log_r).clamp(max=10.0)
    raise ValueError(f"unknown kl_estimator {estimator!r} (k1 or k3)")


def adaptive_kl_coef(coef, kl, target, n_steps, horizon):
    """Adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences", 2.2):
        e = clip(KL / KL_target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    KL is the mean per-sequence KL of the last batch and n_steps the episodes it held: beta grows
    while the policy drifts past the target and shrinks while it stays inside."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


# ----------------------------------------------------------------------------- advantages

def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016), rewards/values/mask (B, T):
        delta_t = r_t + gamma * V_{t+1} - V_t          V after the last real token = 0 (terminal)
        A_t     = sum_{k >= t} (gamma * lam)^(k - t) * delta_k
        returns = A + V                                 the value targets
    The discounted sum is one matmul with an upper-triangular (T, T) table of powers, not a Python
    loop over tokens. Padding has r = V = 0, so it adds nothing."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, T): V_{t+1}, 0 past the end
    deltas = rewards + gamma * next_values - values
    T = rewards.size(1)
    steps = torch.arange(T, device=rewards.device, dtype=rewards.dtype)
    power = steps[None, :] - steps[:, None]  # (T, T): k - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros((), dtype=rewards.dtype))
    advantages = (deltas @ discount.T) * mask  # A[b, t] = sum_k delta[b, k] * discount[t, k]
    return advantages, (advantages + values) * mask


def group_advantages(scores, group_size, scale=True, eps=1e-4):
    """GRPO (Shao et al. 2024, DeepSeekMath, 4.1.2): each prompt's group_size samples are scored
    against each other,  A_i = (r_i - mean(r_group)) / (std(r_group) + eps).  scale=False keeps
    the mean only (Liu et al. 2025, "Dr. GRPO": dividing by the std over-weights easy and hopeless
    prompts). scores (N * group_size,), samples of one prompt adjacent -> (N * group_size,)."""
    groups = scores.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


# ----------------------------------------------------------------------------- losses

def policy_loss(logprobs, old_logprobs, advantages, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss:
        ratio = pi(x) / pi_old(x);   L = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    The max is the pessimistic bound: once the ratio has moved past 1 +- eps in the direction A
    favours, the clipped term wins and the token gives no gradient. Returns the per-token loss and
    where clipping was active (its mean is policy/clipfrac)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def value_loss(values, old_values, returns, cliprange_value):
    """The clipped value loss of PPO's reference implementation (OpenAI baselines ppo2; TRL):
        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L = 0.5 * max((V - R)^2, (V_clip - R)^2)
    per token; the value may move at most eps_v from the rollout's estimate per update. Returns the
    loss and where the clipped term won (val/clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(loss, mask, mode='token', n_tokens=None, n_seqs=None):
    """Per-token losses (B, T) -> a scalar.
        token:    sum of all real tokens' losses / their count (DAPO, Yu et al. 2025: every token
                  weighs the same, so long responses are not diluted)
        sequence: mean over each response's tokens, then over responses (PPO/GRPO as published)
    n_tokens / n_seqs: the count of the whole minibatch when this is one micro-batch of it, so that
    the micro-batch losses add up to the minibatch loss."""
    mask = mask.to(loss.dtype)
    if mode == 'token':
        return (loss * mask).sum() / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)
    if mode == 'sequence':
        per_seq = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (loss.size(0) if n_seqs is None else n_seqs)
    raise ValueError(f"unknown loss_norm {mode!r} (token or sequence)")


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log pi(token) under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T). The
    temperature is the sampler's, so the ratio compares the distributions the tokens came from."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def entropy_from_logits(logits, temperature=1.0):
    """H = logsumexp(z) - sum softmax(z) * z with z = logits / temperature, per position:
    (B, T, V) -> (B, T). The sampler's temperature, as in logprobs_from_logits: the entropy of
    the distribution the tokens came from."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def ended_with(tokens, mask, end_id):
    """(B,) True where a response's last real token is end_id: tokens, mask (B, R). A response cut
    at max_new_tokens, or ended by another stop token (<|endoftext|>), did not end its turn."""
    return tokens.gather(1, last_token_index(mask)[:, None]).squeeze(1).eq(end_id) & mask.any(1)


def last_token_index(mask):
    """Index of each row's last real token, (B, T) -> (B,) (0 for an empty response)."""
    return (mask.long().cumsum(1).argmax(1))


# ----------------------------------------------------------------------------- the trained models

class ActorCritic(nn.Module):
    """What PPO trains, as one module (one optimizer, one DDP wrapper): the policy GPT, and a value
    head on the critic's own GPT or, when critic is None, on the policy's (shared backbone).
    forward(ids, positions, attn_mask, n_query) -> (logits, values, MoE aux loss) for the response
    positions only: (B, R, V) and (B, R), position t predicting response token t from everything
    before it, so the value is that of the state before token t; the aux loss (a scalar, 0 for
    dense models) sums the load-balancing losses of the policy and the critic. GRPO uses it with
    no head at all."""

    def __init__(self, policy, critic=None, value_head=None):
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def forward(self, ids, positions=None, attn_mask=None, n_query=1):
        h, aux_loss = self.policy.hidden_states(ids, positions, attn_mask)  # (B, L, C)
        h = h[:, n_query - 1:-1]  # (B, R, C): the states that predict the response tokens
        logits = self.policy.lm_head(h)  # (B, R, V)
        if self.value_head is None:
            return logits, None, aux_loss
        if self.critic is not None:
            h, critic_aux = self.critic.hidden_states(ids, positions, attn_mask)
            h, aux_loss = h[:, n_query - 1:-1], aux_loss + critic_aux
        return logits, self.value_head(h).squeeze(-1).float(), aux_loss  # (B, R)
