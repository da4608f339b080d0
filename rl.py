"""
The math of RL fine-tuning, as small pure functions on (B, T) tensors over response tokens, for
ppo.py to tell its story with. `mask` is 1 (True) on real response tokens, 0 on padding after a
response's end; every function leaves padding out.

    masked_whiten                                  whitening over real tokens only (and all ranks)
    kl_penalty                                     k1 / k3 estimators of KL(pi || pi_ref)
    adaptive_kl_coef                               Ziegler et al.'s proportional KL controller
    gae                                            generalised advantage estimation (PPO)
    group_advantages, rloo_advantages              GRPO's and RLOO's per-prompt baselines
    reinforce_pp_advantages                        REINFORCE++'s global-batch normalisation
    varied_groups, overlong_penalty, mask_truncated   DAPO's dynamic sampling and overlong shaping
    policy_loss, value_loss                        PPO's clipped objectives, per token (clip-higher)
    loss_normaliser, aggregate                     LOSS_TYPES: grpo | bnpo | dr_grpo | dapo

The last section holds the one model-facing piece: ActorCritic, the policy with its value head,
and the forward pass over prompt + response, to the response tokens' log-probs, that both the
rollout and the update use.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import token_logprobs_from_hidden


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


def rloo_advantages(scores, group_size):
    """RLOO, REINFORCE with a leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get
    a baseline for free!"; Ahmadian et al. 2024, "Back to Basics", section 3): each sample is scored
    against the mean of the OTHER samples of its prompt,
        A_i = r_i - (sum_j r_j - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean(r_group))
    (TRL's RLOOTrainer and verl's compute_rloo_outcome_advantage). Unlike the group mean, the
    baseline does not contain r_i itself, so the gradient estimate stays unbiased. No std scaling.
    scores (N * G,), samples of one prompt adjacent -> (N * G,)."""
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1)


def reinforce_pp_advantages(scores, mask, total=torch.sum):
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262;
    verl's compute_reinforce_plus_plus_outcome_advantage): no critic and no per-prompt baseline;
    the return of every token is whitened over all response tokens of the GLOBAL batch,
        A_t = (G_t - mean(G)) / std(G),   G_t = sum_{k >= t} r_k = the score (gamma = 1, reward at the end)
    The paper (like PPO) puts -beta * KL_t into r_k; here, as in GRPO, the KL is a loss term
    instead (verl's use_kl_loss), so G_t is the score at every token. Whitening over the whole
    batch, not each prompt's group, is its point: a prompt every sample solves still pushes those
    samples up against the batch. scores (N,), mask (N, T); total: masked_whiten's (all ranks)."""
    returns = scores[:, None].to(torch.float32).expand(mask.shape)
    return masked_whiten(returns, mask, total=total)


# ----------------------------------------------------------------------------- DAPO's sampling and shaping

def varied_groups(scores, group_size):
    """(N,) True for each prompt whose group_size samples did not all score the same: DAPO's
    dynamic sampling (Yu et al. 2025, section 3.2: keep groups with 0 < #correct < G; verl's
    filter_groups) keeps these only. In a group that scored the same, a group baseline makes every
    advantage 0: the group costs a forward and a backward and teaches nothing."""
    groups = scores.view(-1, group_size)
    return (groups != groups[:, :1]).any(dim=1)


def overlong_penalty(lengths, max_len, buffer_len, factor=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, section 3.4, R_length; verl's DAPO reward manager):
        0                                          |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache        L_max - L_cache < |y| <= L_max
    times factor, added to the score. L_max = max_len (max_new_tokens), L_cache = buffer_len: the
    penalty grows linearly from 0 to -factor over the last buffer_len tokens a response may use,
    so the policy learns to finish before it is cut off (a cut response gets -factor). lengths (N,)."""
    excess = lengths.to(torch.float32) - (max_len - buffer_len)
    return -factor * (excess / buffer_len).clamp(min=0.0, max=1.0)


def mask_truncated(mask, stopped):
    """DAPO's overlong filtering (Yu et al. 2025, section 3.4; TRL's mask_truncated_completions): a response
    cut at max_new_tokens (stopped False) is left out of the loss, its every token masked. Its
    low score says nothing about whether its reasoning was wrong, only that it was long."""
    return mask & stopped[:, None]


# ----------------------------------------------------------------------------- losses

def policy_loss(logprobs, old_logprobs, advantages, cliprange, cliprange_high=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss:
        ratio = pi(x) / pi_old(x);   L = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    The max is the pessimistic bound: once the ratio has moved past the clip range in the direction
    A favours, the clipped term wins and the token gives no gradient. eps_low = cliprange and
    eps_high = cliprange_high (None: the same): DAPO's clip-higher (Yu et al. 2025, section 3.1,
    0.2 and 0.28) lets a token with A > 0 grow further, so unlikely tokens can still gain mass and
    the entropy does not collapse. Returns the per-token loss and where clipping was active (its
    mean is policy/clipfrac)."""
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
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


LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo')  # how per-token losses become one number: aggregate


def loss_normaliser(loss_type, mask, n_seqs=None, max_len=None, total=torch.sum, world_size=1):
    """What aggregate divides a minibatch's summed loss by, one number per loss_type (TRL's
    GRPOTrainer._compute_loss; mask (B, T) is this rank's minibatch, whose B = n_seqs rows):
        grpo     B                               (of per-response means: see aggregate)
        bnpo     sum(mask)                       this rank's real tokens
        dr_grpo  B * max_len                     a constant: max_len = max_new_tokens
        dapo     sum(mask over all ranks) / N    every rank's real tokens, as each rank's share
    dapo's count is global because DDP averages the N ranks' gradients: dividing by all tokens / N
    gives every token of the global batch the same weight, as one process would (TRL divides by
    num_items_in_batch / num_processes). bnpo divides by the local count: with ranks holding
    different numbers of tokens, a token weighs more on a rank with fewer. total(t): the sum of
    t's elements over every rank (ppo.py's global_sum)."""
    n_seqs = mask.size(0) if n_seqs is None else n_seqs
    if loss_type == 'grpo':
        return torch.tensor(float(n_seqs))
    if loss_type == 'bnpo':
        return mask.sum().float().clamp(min=1)
    if loss_type == 'dr_grpo':
        return torch.tensor(float(n_seqs * (mask.size(1) if max_len is None else max_len)))
    if loss_type == 'dapo':
        return (total(mask.float()) / world_size).clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")


def aggregate(loss, mask, loss_type='dapo', normaliser=None):
    """Per-token losses (B, T) -> a scalar, with l_{i,t} the loss of token t of response i, |o_i|
    its length, G the responses of the minibatch (its rows over all ranks under dapo):
        grpo     1/G sum_i 1/|o_i| sum_t l_{i,t}       DeepSeekMath (Shao et al. 2024) eq. 3, TRL's
                 'grpo': each response weighs the same, so a long one's tokens weigh less (a long
                 wrong answer is punished less per token: Liu et al. 2025 call it length bias)
        bnpo     sum_{i,t} l_{i,t} / sum_i |o_i|       TRL's 'bnpo', over this rank's batch
        dr_grpo  sum_{i,t} l_{i,t} / (G * L_max)       Dr. GRPO (Liu et al. 2025, "Understanding
                 R1-Zero-Like Training", section 3.1 and its code): a constant, no length in the weights
        dapo     sum_{i,t} l_{i,t} / sum_i |o_i|       DAPO (Yu et al. 2025, section 3.3) and
                 TRL's default: every token of the global batch weighs the same
    normaliser: loss_normaliser's number for the whole minibatch when this is one micro-batch of
    it (the micro-batch losses then add up to the minibatch loss); None = this batch's own."""
    mask = mask.to(loss.dtype)
    if normaliser is None:
        normaliser = loss_normaliser(loss_type, mask)
    if loss_type == 'grpo':
        per_response = (loss * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_response.sum() / normaliser
    if loss_type in LOSS_TYPES:
        return (loss * mask).sum() / normaliser
    raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")


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
    forward(ids, positions, attn_mask, n_query, temperature) -> (logprobs, entropy, values, MoE aux
    loss) for the response tokens ids[:, n_query:]: each (B, R), position t predicting response
    token t from everything before it, so the value is that of the state before token t. The
    log-probs and entropies are those of softmax(logits / temperature), the distribution the
    sampler drew from (so a ratio compares like with like), computed chunk by chunk from the
    hidden states (model.token_logprobs_from_hidden): the (B, R, vocab) logits never exist
    (bench/bench_logprobs.py, a GRPO micro-batch: 0.81x the time and 0.56x the memory of the full
    logits' way). entropy is None with with_entropy=False. The aux loss (a scalar, 0 for dense
    models) sums the load-balancing losses of the policy and the critic. GRPO uses it with no head
    at all."""

    def __init__(self, policy, critic=None, value_head=None):
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def forward(self, ids, positions=None, attn_mask=None, n_query=1, temperature=1.0, with_entropy=True):
        h, aux_loss = self.policy.hidden_states(ids, positions, attn_mask)  # (B, L, C)
        h = h[:, n_query - 1:-1]  # (B, R, C): the states that predict the response tokens
        B, R, C = h.shape
        logprobs, entropy = token_logprobs_from_hidden(h.reshape(B * R, C), self.policy.head_weight(),
                                                       ids[:, n_query:].reshape(B * R), temperature, with_entropy)
        logprobs, entropy = logprobs.view(B, R), entropy if entropy is None else entropy.view(B, R)
        if self.value_head is None:
            return logprobs, entropy, None, aux_loss
        if self.critic is not None:
            h, critic_aux = self.critic.hidden_states(ids, positions, attn_mask)
            h, aux_loss = h[:, n_query - 1:-1], aux_loss + critic_aux
        return logprobs, entropy, self.value_head(h).squeeze(-1).float(), aux_loss  # (B, R)
