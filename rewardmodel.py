"""
The reward model: a GPT backbone and a scalar head read at the last real token of a sequence,
plus (lm_coef > 0) the backbone's own mean log-likelihood of the response.
reward.py trains it; ppo.py (or anyone) loads it and scores (prompt, response) pairs:

    model, tokenizer = load_reward_model('out-reward', device)
    rewards = score(model, tokenizer, prompts_messages, responses)     # (N,) float32

    RewardModel(backbone, lm_coef) forward(idx, last, positions, attn_mask, response_mask) -> (rewards (B,), aux loss)
    padding_inputs(mask)           last real index, positions and attention mask of a padded batch
    score_ids(model, ids, mask, response_mask)  rewards of token ids, padded on either side (or both)
    bradley_terry_loss, reward_metrics
(preference pairs are loaded and batched by preference.py)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import preference
from model import token_logprobs_from_hidden


class RewardModel(nn.Module):
    """reward = Linear(C, 1)(the backbone's state at the last real token)
              + lm_coef * mean log p(response token | what precedes it), under the backbone's LM head.

    The head alone is TRL's and InstructGPT's reward model. It starts at N(0, 1/(C+1)), as in
    Stiennon et al. 2020 (learning to summarize), so the first rewards have unit scale.
    The log-likelihood term is SimPO's reference-free implicit reward (Meng et al. 2024). It is
    here for what a last-token head finds hard: to see that one digit of "57" is wrong, the head's
    state must redo the sum and compare; the LM already scores each digit where it predicts it.
    On the built-in held-out arithmetic pairs the head alone reached 75% (3,000 steps), with the
    term 92% (600 steps; config/reward_tiny.py)."""

    def __init__(self, backbone, lm_coef=0.0):
        super().__init__()
        self.backbone = backbone
        self.lm_coef = lm_coef
        C = backbone.config.n_embd
        self.head = nn.Linear(C, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(C + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, last, positions=None, attn_mask=None, response_mask=None):
        """idx (B, T); last (B,) index of each row's last real token; response_mask (B, T) True on
        the response's tokens (its <|im_end|> included), needed when lm_coef > 0. Right-padded rows
        need no positions or mask (causal attention never looks ahead at the pads); any other
        padding passes those of padding_inputs()."""
        h, aux_loss = self.backbone.hidden_states(idx, positions, attn_mask)  # (B, T, C)
        B = idx.size(0)
        reward = self.head(h[torch.arange(B, device=idx.device), last]).squeeze(-1).float()  # (B,)
        if self.lm_coef:
            if response_mask is None:
                raise ValueError("this reward model adds the response's log-likelihood (lm_coef > 0): "
                                 "pass response_mask=")
            # position t predicts token t + 1: the log-probs only where that token is the response's,
            # chunk by chunk (all positions' logits would be a (B, T, vocab) tensor: gigabytes with a
            # 32k vocabulary; even the response's alone are (N, vocab))
            row, col = response_mask[:, 1:].nonzero(as_tuple=True)
            logp, _ = token_logprobs_from_hidden(h[row, col], self.backbone.head_weight(), idx[row, col + 1],
                                                 with_entropy=False)  # (N,)
            total = torch.zeros(B, device=idx.device).index_add_(0, row, logp)
            reward = reward + self.lm_coef * total / response_mask[:, 1:].sum(1).clamp(min=1)
        return reward, aux_loss


def padding_inputs(mask):
    """mask (B, T), True on real tokens, padded anywhere (left, right, or both, as a left-padded
    prompt followed by a right-padded response is) -> last (B,), positions (B, T) counting real
    tokens only, attention mask (B, 1, T, T) that hides pad keys. Every query also sees itself,
    so a pad row is never all-masked (that would be NaN in attention)."""
    B, T = mask.shape
    last = T - 1 - mask.flip(1).int().argmax(1)  # (B,)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    attn = (causal & mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=mask.device)  # (B, T, T)
    return last, positions, attn[:, None]


# ----------------------------------------------------------------------------- loss and metrics

def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0):
    """Pairwise reward loss, mean over pairs (Bradley & Terry 1952; InstructGPT, Ouyang et al.
    2022, eq. 1), with Llama 2's margin (Touvron et al. 2023, eq. 2) and TRL's reward centering
    (center_rewards_coefficient, after Eisenstein et al. 2023):
        loss = -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2
    m says how much better chosen is (0 = just better); centering pins the rewards' mean near 0
    without changing their differences, so a PPO that adds them up sees a stable scale."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def reward_metrics(r_chosen, r_rejected):
    """TRL RewardTrainer's metrics, as tensors (no host sync): accuracy = share of pairs with
    r_c > r_r; margin = mean r_c - r_r; mean/min/max over all rewards."""
    rewards = torch.cat([r_chosen, r_rejected])
    return {'accuracy': (r_chosen > r_rejected).float().mean(), 'margin': (r_chosen - r_rejected).mean(),
            'mean_reward': rewards.mean(), 'min_reward': rewards.min(), 'max_reward': rewards.max()}


# ----------------------------------------------------------------------------- loading and scoring

def load_reward_model(out_dir, device='cpu'):
    """(RewardModel in eval mode on device, tokenizer) from a reward.py out_dir (or ckpt path)."""
    ckpt = common.load_checkpoint(out_dir)
    if 'reward_head' not in ckpt:
        raise SystemExit(f"{out_dir} holds a {ckpt.get('stage', 'unknown')}-stage checkpoint, not a reward model: "
                         f"train one first, e.g. python reward.py --init_from={out_dir}")
    model = RewardModel(common.model_from_checkpoint(ckpt), ckpt.get('reward_lm_coef', 0.0))
    model.head.load_state_dict(ckpt['reward_head'])
    return model.to(device).eval(), common.tokenizer_from_checkpoint(ckpt)


@torch.no_grad()
def score_ids(model, ids, mask, response_mask=None):
    """Rewards (B,) of token ids (B, T) with mask (B, T) True on real tokens, padded anywhere;
    response_mask (B, T) True on the response's tokens (for a model with lm_coef > 0)."""
    last, positions, attn_mask = padding_inputs(mask)
    return model(ids, last, positions, attn_mask, response_mask)[0]


@torch.no_grad()
def score(model, tokenizer, prompts_messages, responses, batch_size=32):
    """Rewards (N,) for N (prompt messages, response text) pairs, rendered as in training (prompt,
    assistant header, response, <|im_end|>). A sequence longer than the context keeps its end."""
    device = next(model.parameters()).device
    block = model.backbone.config.block_size
    rows = []
    for p, r in zip(prompts_messages, responses, strict=True):
        row, n_prompt = preference.encode_reply(tokenizer, p, r)
        rows.append((row[-block:], max(0, n_prompt - max(0, len(row) - block))))  # (ids, prompt tokens kept)
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        ids = torch.full((len(batch), max(len(row) for row, _ in batch)), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        response_mask = torch.zeros(ids.shape, dtype=torch.bool)
        for j, (row, n_prompt) in enumerate(batch):
            ids[j, :len(row)], mask[j, :len(row)], response_mask[j, n_prompt:len(row)] = torch.tensor(row), True, True
        out.append(score_ids(model, ids.to(device), mask.to(device), response_mask.to(device)))
    return torch.cat(out) if out else torch.zeros(0, device=device)
