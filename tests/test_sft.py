"""sft.py: assistant-only loss, truncation, packing without leakage, LoRA, and a real learning run."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import eval_rows, run_script, write_jsonl
from generate import GenerationConfig, generate_ids
from lora import apply_lora, merge_lora, merged_state_dict
from model import GPT, GPTConfig
from tokenizer import char_tokenizer

TOK = char_tokenizer('abcdefghijklmnopqrstuvwxyz ?.!,0123456789\nABCDEFGHIJKLMNOPQRSTUVWXYZ')
CHAT = [{'role': 'system', 'content': 'be kind'}, {'role': 'user', 'content': 'hi'},
        {'role': 'assistant', 'content': 'hello'}, {'role': 'user', 'content': 'bye'},
        {'role': 'assistant', 'content': 'see you'}]
IDENTITY = [{'role': 'user', 'content': 'Who are you?'}, {'role': 'assistant', 'content': 'I am Zed, made by Qux Labs.'}]


def test_targets_are_next_assistant_tokens_only_on_multi_turn():
    ids, targets = common.encode_conversation(TOK, CHAT, 200)
    learned = [t for t in targets if t != -1]
    assert learned == TOK.encode('hello') + [TOK.im_end_id] + TOK.encode('see you') + [TOK.im_end_id]
    full, _ = TOK.render_chat(CHAT)
    assert ids == full[:-1] and all(t == -1 or t == full[i + 1] for i, t in enumerate(targets))


def test_truncation_that_leaves_no_assistant_token_is_dropped():
    assert common.encode_conversation(TOK, CHAT, 30) is None  # cut inside the first user turn
    ids, targets = common.encode_conversation(TOK, CHAT, 41)  # cut inside the first reply
    assert len(ids) == 41 and [TOK.decode([t]) for t in targets if t != -1] == list('hell')


def test_packed_rows_give_each_conversation_its_own_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    convs = [CHAT, IDENTITY, CHAT[1:3]]
    encoded = [common.encode_conversation(TOK, c, 256) for c in convs]
    ids, tgt, doc = common.pack_rows(encoded, 256, TOK.pad_id, packing=True)
    assert ids.size(0) == 1 and doc.max() == 2  # all three share one row
    positions, mask = common.packed_attention(doc)
    packed = F.cross_entropy(model(ids, positions=positions, attn_mask=mask)[0][0], tgt[0], ignore_index=-1, reduction='none')
    start = 0
    for i, t in encoded:
        alone = F.cross_entropy(model(torch.tensor([i]))[0][0], torch.tensor(t), ignore_index=-1, reduction='none')
        torch.testing.assert_close(packed[start:start + len(i)], alone, atol=1e-5, rtol=1e-5)
        start += len(i)


def test_lora_merge_gives_the_same_logits_as_base_plus_adapter():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    n = apply_lora(model, rank=4, alpha=8, targets=['c_attn', 'c_proj', 'c_fc'])
    assert n == sum(p.numel() for name, p in model.named_parameters() if 'lora_' in name)
    assert not any(p.requires_grad for name, p in model.named_parameters() if 'lora_' not in name)
    for name, p in model.named_parameters():
        if 'lora_B' in name:
            p.data.normal_()  # a trained adapter
    x = torch.randint(0, 64, (2, 16))
    with_adapter = model(x)[0]
    plain = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(x)[0], with_adapter, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merge_lora(model)(x)[0], with_adapter, atol=1e-5, rtol=1e-5)


def test_lora_on_an_untied_head_merges_exactly_and_a_tied_head_is_refused():
    torch.manual_seed(0)
    config = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False)
    model = GPT(GPTConfig(**config))
    apply_lora(model, rank=4, alpha=8, targets=['c_attn', 'lm_head'])
    for name, p in model.named_parameters():
        if 'lora_B' in name:
            p.data.normal_()
    x = torch.randint(0, 64, (2, 16))
    plain = GPT(GPTConfig(**config))
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(x)[0], model(x)[0], atol=1e-4, rtol=1e-4)  # logits ~10 here
    assert generate_ids(model, [[1, 2]], GenerationConfig(max_new_tokens=2)).tokens.shape == (1, 2)
    with pytest.raises(SystemExit, match='tied to the token embedding'):
        apply_lora(GPT(GPTConfig(**dict(config, tie_embeddings=True))), rank=4, alpha=8, targets=['c_attn', 'lm_head'])


def sft(ckpt_dir, out, data_file, *args, **kw):
    return run_script('sft.py', f'--init_from={ckpt_dir}', f'--out_dir={out}', f'--sft_files={data_file}',
                      '--val_fraction=0.1', '--max_seq_len=64', '--batch_size=8', '--eval_iters=2',
                      '--eval_items_per_task=0', '--warmup_iters=5', '--log_interval=5', *args, **kw)


def greedy_reply(out_dir, messages):
    from generate import TextGenerator
    ckpt = common.load_checkpoint(out_dir)
    model = common.model_from_checkpoint(ckpt)
    return TextGenerator(model, common.tokenizer_from_checkpoint(ckpt)).chat(messages, temperature=0, max_new_tokens=40)


def test_tiny_sft_run_teaches_a_reply_the_base_model_did_not_give(tiny_checkpoint, tmp_path):
    data_file = write_jsonl(tmp_path / 'id.jsonl', [{'messages': IDENTITY}] * 40)
    question = IDENTITY[:1]
    assert greedy_reply(tiny_checkpoint, question) != IDENTITY[1]['content']
    out = str(tmp_path / 'sft')
    proc = sft(tiny_checkpoint, out, data_file, '--max_iters=80', '--eval_interval=40', '--learning_rate=3e-3',
               '--lr_decay_iters=80')
    assert '0 dropped' in proc.stdout
    assert greedy_reply(out, question) == IDENTITY[1]['content']
    rows = list(eval_rows(out).values())
    assert rows[-1]['val/loss'] < 0.1 < rows[0]['val/loss']


def test_sft_reports_conversations_dropped_by_truncation(tiny_checkpoint, tmp_path):
    long_prompt = [{'role': 'user', 'content': 'x' * 100}, {'role': 'assistant', 'content': 'ok'}]
    data_file = write_jsonl(tmp_path / 'mix.jsonl', [{'messages': IDENTITY}] * 20 + [{'messages': long_prompt}] * 7)
    proc = sft(tiny_checkpoint, str(tmp_path / 'sft'), data_file, '--max_iters=2', '--eval_interval=2',
               '--val_fraction=0.01', '--sft_weights=1')
    assert '7 dropped' in proc.stdout


def test_sft_resume_continues_same_curve(tiny_checkpoint, tmp_path):
    data_file = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': IDENTITY}, {'messages': CHAT[1:]}] * 20)
    args = ['--eval_interval=10', '--lr_decay_iters=30']
    straight, split = str(tmp_path / 'a'), str(tmp_path / 'b')
    sft(tiny_checkpoint, straight, data_file, '--max_iters=30', *args)
    sft(tiny_checkpoint, split, data_file, '--max_iters=10', *args)
    sft(tiny_checkpoint, split, data_file, '--max_iters=30', *args, '--init_from=resume')
    a, b = eval_rows(straight), eval_rows(split)
    assert b[30]['val/loss'] == pytest.approx(a[30]['val/loss'], rel=1e-5)


def test_lora_sft_trains_adapters_only_and_saves_merged_weights(tiny_checkpoint, tmp_path):
    data_file = write_jsonl(tmp_path / 'id.jsonl', [{'messages': IDENTITY}] * 40)
    out = str(tmp_path / 'lora')
    proc = sft(tiny_checkpoint, out, data_file, '--max_iters=60', '--eval_interval=30', '--learning_rate=3e-2',
               '--lr_decay_iters=60', '--lora_rank=8', '--lora_alpha=16')
    assert 'LoRA rank 8' in proc.stdout
    base = common.load_checkpoint(tiny_checkpoint)['model']
    ckpt = common.load_checkpoint(out)
    assert set(ckpt['lora']) and all('lora_' in k for k in ckpt['lora'])
    assert torch.equal(ckpt['model']['transformer.wte.weight'], base['transformer.wte.weight'])  # frozen
    assert not torch.equal(ckpt['model']['transformer.h.0.attn.c_attn.weight'], base['transformer.h.0.attn.c_attn.weight'])
    rows = list(eval_rows(out).values())
    assert rows[-1]['val/loss'] < rows[0]['val/loss'] - 0.5  # adapters on an untrained base learn slowly, but learn
