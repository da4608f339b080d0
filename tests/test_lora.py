"""lora.py: adapters_off computes the frozen base bit for bit (the reference of DPO and PPO),
share_frozen_weights holds one copy of a frozen base for two models, resuming checks the adapters
fit, and a LoRA policy generates under bf16 autocast (PPO's rollouts)."""

import copy

import pytest
import torch

from generate import GenerationConfig, generate_ids
from lora import (LoRALinear, add_lora, adapters_off, check_resume, load_adapters, lora_state_dict,
                  merged_state_dict, share_frozen_weights)
from model import GPT, GPTConfig

CONFIG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


def trained_lora(base, targets='c_attn,c_proj,c_fc', seed=1):
    """A LoRA copy of `base` whose adapters look trained (B != 0)."""
    model = copy.deepcopy(base)
    add_lora(model, 4, 8.0, targets)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if 'lora_B' in name:
            p.data.normal_()
    return model


def test_adapters_off_computes_exactly_the_base_and_restores_the_adapters():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CONFIG, tie_embeddings=False)).eval()
    model = trained_lora(base, 'c_attn,c_proj,c_fc,lm_head').eval()
    x = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        want, adapted = base(x)[0], model(x)[0]
        assert not torch.allclose(adapted, want)
        with adapters_off(model):
            assert torch.equal(model(x)[0], want)  # bit for bit: the reference is the base
            with adapters_off(model):  # nested: still off, and the outer one still restores
                assert torch.equal(model(x)[0], want)
            assert torch.equal(model(x)[0], want)
        assert torch.equal(model(x)[0], adapted)
        with pytest.raises(RuntimeError), adapters_off(model):
            raise RuntimeError  # an error inside does not leave the adapters off
        assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))
    with adapters_off(base):  # no adapters: nothing to switch
        assert torch.equal(base(x)[0], want)


def test_no_gradient_reaches_the_adapters_through_the_reference():
    torch.manual_seed(0)
    model = trained_lora(GPT(GPTConfig(**CONFIG)))
    with adapters_off(model):
        out = model(torch.randint(0, 64, (2, 8)))[0]
    assert not out.requires_grad  # the base is frozen and the adapters unused: nothing to train through it


def test_share_frozen_weights_holds_one_copy_and_keeps_ties_and_adapters_apart():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CONFIG))  # tied: lm_head.weight is the embedding
    policy, critic = trained_lora(base, seed=1), trained_lora(base, seed=2)
    shared = share_frozen_weights(critic, policy)
    assert shared == sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    frozen = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    for name, p in critic.named_parameters():
        assert (p is frozen.get(name)) == (not p.requires_grad), name  # adapters stay each model's own
    assert critic.lm_head.weight is critic.transformer.wte.weight is policy.transformer.wte.weight
    other = trained_lora(GPT(GPTConfig(**CONFIG)))  # another base: only the equal norm gains (all ones) are shared
    norms = sum(p.numel() for n, p in other.named_parameters() if 'ln' in n or 'norm' in n)
    assert share_frozen_weights(other, policy) == norms
    assert other.transformer.wte.weight is not policy.transformer.wte.weight


def test_load_adapters_refuses_adapters_of_another_shape_or_target():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CONFIG))
    saved = lora_state_dict(trained_lora(base).state_dict())
    model = copy.deepcopy(base)
    add_lora(model, 4, 8.0, 'c_attn,c_proj,c_fc')
    load_adapters(model, saved, 'out-x')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    fewer = copy.deepcopy(base)
    add_lora(fewer, 4, 8.0, 'c_attn')
    with pytest.raises(SystemExit, match='out-x do not fit'):
        load_adapters(fewer, saved, 'out-x')  # unexpected adapters
    more = copy.deepcopy(base)
    add_lora(more, 4, 8.0, 'c_attn,c_proj,c_fc')
    with pytest.raises(SystemExit, match='missing'):
        load_adapters(more, {k: v for k, v in saved.items() if 'c_fc' not in k}, 'out-x')
    with pytest.raises(SystemExit, match='lora_rank of the first run'):
        check_resume({'model': {}}, 4, 'out-x')
    with pytest.raises(SystemExit, match='trained with LoRA'):
        check_resume({'lora': {}}, 0, 'out-x')


def test_merged_checkpoint_gives_the_lora_models_logits():
    torch.manual_seed(0)
    model = trained_lora(GPT(GPTConfig(**CONFIG)))
    plain = GPT(GPTConfig(**CONFIG))
    plain.load_state_dict(merged_state_dict(model))
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(plain(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_a_lora_policy_samples_under_bf16_autocast_as_ppo_rollouts_do():
    torch.manual_seed(0)
    model = trained_lora(GPT(GPTConfig(**CONFIG))).eval()
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        gen = generate_ids(model, [[1, 2, 3], [4, 5]], config)
    assert gen.tokens.shape == (2, 6) and torch.isfinite(gen.logprobs).all()


def test_an_adapter_on_an_untied_head_is_in_the_loss_and_gets_its_gradient():
    """The loss multiplies by the head's weight rather than calling the head (it never forms the
    logits): an adapter on lm_head must be in that weight. It was not: the loss was the base's,
    and the head's adapter never learned."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CONFIG, tie_embeddings=False))
    model = trained_lora(base, targets='c_attn,lm_head')
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())  # from the head's own logits
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.lm_head.lora_A.grad.abs().sum() > 0 and model.lm_head.lora_B.grad.abs().sum() > 0
    with adapters_off(model):  # off: the base alone, in the loss as in the logits
        torch.testing.assert_close(model(x, y)[1], base(x, y)[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(SystemExit, match='lora_dropout'):
        add_lora(copy.deepcopy(base), 4, 8.0, 'lm_head', dropout=0.1)
