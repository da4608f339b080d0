"""
LoRA (Hu et al. 2021): fine-tune a frozen Linear W by a low-rank update,
    y = x W^T + (alpha / r) * dropout(x) A^T B^T,   A: (r, in) random, B: (out, r) zeros,
so training starts exactly at the base model and only r * (in + out) numbers per layer learn.
merge_lora() folds B A into W and gives back plain Linears: the same logits, no extra cost.
adapters_off(model) runs the frozen base alone: DPO's and PPO's reference, with no second copy.
Stage scripts: add_lora() (the config keys lora_rank, lora_alpha, lora_dropout, lora_targets),
load_adapters() on resume, lora_state_dict()/merged_state_dict() for checkpoints (the merged
weights in 'model', so every later stage and sample.py load them as a plain GPT; the adapters
in 'lora', to resume).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.enabled = True  # False: the base layer alone (adapters_off)

    @property
    def weight(self):
        """The frozen base weight (what callers read a layer's device and dtype from)."""
        return self.base.weight

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        # scaled at rank r: r numbers per token to multiply, not out
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A) * self.scale, self.lora_B)

    def merged_weight(self):
        """W + scale * B A, differentiable in A and B: the layer as one matrix, for the losses that
        multiply by a head's weight instead of calling it (model.GPT.head_weight). W alone when off."""
        if not self.enabled:
            return self.base.weight
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)

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
    if 'lm_head' in targets and dropout:
        raise SystemExit("lora_targets has lm_head and lora_dropout > 0: the losses use the head as one matrix, "
                         "W + B A (GPT.head_weight), where dropout on the adapter's input cannot apply; "
                         "set lora_dropout=0 or leave lm_head out")
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


def add_lora(model, rank, alpha, targets, dropout=0.0):
    """apply_lora with the stage config's forms (targets comma-separated: lora_targets); returns
    the number of trainable parameters (rank 0: none added, all of them)."""
    if not rank:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return apply_lora(model, rank, alpha, [t.strip() for t in targets.split(',') if t.strip()], dropout)


@contextmanager
def adapters_off(model):
    """Inside, every adapter of `model` is switched off: it computes exactly its frozen base (the
    same ops on the same weights, so bit for bit), the reference policy of DPO and PPO without a
    second copy of the model. Outside, each adapter is as it was. A model without adapters is
    unchanged. Gradients never reach the adapters inside (they are not used)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


def load_adapters(model, adapters, where, keep=()):
    """Load saved adapters (lora_state_dict's keys, plus any other trainable state named in `keep`,
    e.g. a value head) into a model that add_lora() prepared, strictly: every adapter of the model
    must be in `adapters` and nothing else may be. where: the run they come from, for the error."""
    unexpected = model.load_state_dict(adapters, strict=False).unexpected_keys
    missing = [k for k in model.state_dict() if ('lora_' in k or k.startswith(tuple(keep))) and k not in adapters]
    if unexpected or missing:
        raise SystemExit(f"the LoRA adapters in {where} do not fit this run's lora_targets/lora_rank "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): resume with the settings of the first run")


def check_resume(ckpt, lora_rank, where):
    """A run resumes with LoRA exactly when it was trained with it (the optimizer holds the adapters' moments)."""
    if bool(lora_rank) != ('lora' in ckpt):
        raise SystemExit(f"{where} was trained {'with' if 'lora' in ckpt else 'without'} LoRA, this run has "
                         f"lora_rank={lora_rank}: resume with the lora_rank of the first run")


def share_frozen_weights(model, source):
    """Make every frozen parameter of `model` the very tensor of the same name in `source` (same
    shape and the same values), so both hold one copy: PPO's LoRA critic and policy, whose frozen
    bases are both the SFT weights. Tied weights stay tied. Returns how many numbers are shared."""
    shared, counted = dict(source.named_parameters(remove_duplicate=False)), set()
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        other = shared.get(name)
        if other is None or p.requires_grad or other.requires_grad or other.shape != p.shape or p is other:
            continue
        if torch.equal(p, other):
            module_name, _, attr = name.rpartition('.')
            setattr(model.get_submodule(module_name), attr, other)
            counted.add(id(other))
    return sum(p.numel() for p in source.parameters() if id(p) in counted)


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


def checkpoint_weights(model, state, lora_rank):
    """What a stage saves of a model: (its 'model' weights, the extra checkpoint entries). With LoRA
    the weights merged (any script loads them as a plain GPT) and {'lora': the adapters} to resume;
    without, the state as it is and nothing extra."""
    if not lora_rank:
        return state, {}
    return merged_state_dict(model, state), {'lora': lora_state_dict(state)}


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
