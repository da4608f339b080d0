"""
LoRA (Hu et al. 2021): fine-tune a frozen Linear W by a low-rank update,
    y = x W^T + (alpha / r) * dropout(x) A^T B^T,   A: (r, in) random, B: (out, r) zeros,
so training starts exactly at the base model and only r * (in + out) numbers per layer learn.
merge_lora() folds B A into W and gives back plain Linears: the same logits, no extra cost.
"""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self):
        """The frozen base weight (what callers read a layer's device and dtype from)."""
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """A plain Linear with W + scale * B A."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        self.base.weight.requires_grad_(True)
        return self.base


def apply_lora(model, rank, alpha, targets, dropout=0.0):
    """Freeze every parameter, then wrap each Linear whose own name is one of `targets` (e.g.
    'c_attn', 'c_proj', 'c_fc', 'lm_head'). Returns the number of trainable parameters.
    Mixture-of-experts weights are batched tensors, not Linears: LoRA leaves the experts as they
    are. A head tied to the token embedding cannot take an adapter: merged, the update would land
    in the embedding too."""
    if 'lm_head' in targets and model.config.tie_embeddings:
        raise SystemExit("lora_targets has lm_head, but it is tied to the token embedding (tie_embeddings=True): "
                         "a merged adapter would change the embedding as well; leave lm_head out")
    if 'c_fc' in targets and model.config.n_experts:
        print("note: LoRA adapts attention (and any shared-expert MLP) only: the MoE experts are not Linears")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise SystemExit(f"lora_targets {targets} matched no Linear layer (names: c_attn, c_proj, c_fc, lm_head)")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model):
    """Replace every LoRALinear by its merged Linear, in place; returns the model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(state):
    """Only the adapters of a state dict (what a LoRA checkpoint needs on top of its base model)."""
    return {k: v for k, v in state.items() if 'lora_' in k}


def merged_state_dict(model, state=None):
    """The state dict the merged model would have, without changing `model` (for checkpoints
    that any script can load as a plain GPT while training goes on). state: model's state dict
    as it is to be saved (default model.state_dict(); under FSDP the gathered one)."""
    state = dict(model.state_dict() if state is None else state)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = name + '.' if name else ''
            weight = state.pop(prefix + 'base.weight')
            lora_A, lora_B = state.pop(prefix + 'lora_A'), state.pop(prefix + 'lora_B')
            state[prefix + 'weight'] = weight + module.scale * (lora_B @ lora_A).detach().to(weight.dtype)
            if prefix + 'base.bias' in state:
                state[prefix + 'bias'] = state.pop(prefix + 'base.bias')
    return state
