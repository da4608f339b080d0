"""Hugging Face export (hf.py, export.py): what transformers loads is our model, token for token.
All offline: tiny models with random weights, tokenizers trained here."""

import json
import os
import sysconfig

import pytest
import torch

import hf
from common import save_checkpoint
from conftest import run_script
from generate import TextGenerator
from model import GPT, GPTConfig
from tokenizer import Tokenizer, char_tokenizer

transformers = pytest.importorskip('transformers')

# every architecture our flags map onto
ARCHITECTURES = {
    'llama': dict(n_kv_head=2),
    'llama-untied-bias': dict(n_kv_head=2, tie_embeddings=False, bias=True),
    'qwen2': dict(n_kv_head=2, qkv_bias=True),
    'qwen3': dict(n_kv_head=2, qk_norm=True, head_dim=32),  # head_dim != n_embd / n_head, as in Qwen3
    'gpt2': dict(pos='learned', norm='layernorm', mlp='gelu'),
    'gpt2-tanh-bias-untied': dict(pos='learned', norm='layernorm', mlp='gelu', bias=True, gelu_approximate='tanh',
                                  tie_embeddings=False),
    'mixtral': dict(n_experts=4, n_experts_active=2),
    'qwen3_moe': dict(n_experts=4, n_experts_active=2, qk_norm=True, moe_renormalize=False),
}
MESSAGES = [{'role': 'system', 'content': 'Answer briefly.'}, {'role': 'user', 'content': 'What is 12+30?'},
            {'role': 'assistant', 'content': '12+30 = 42'}, {'role': 'user', 'content': 'Who are you? ünïcode ✓'}]


@pytest.fixture(scope='module')
def tok(tiny_data_dir):
    data_root, dataset = tiny_data_dir
    return Tokenizer.load(os.path.join(data_root, dataset, 'tokenizer.json'))


def random_checkpoint(tok, stage='sft', **flags):
    """A tiny GPT whose weights are all non-trivial (biases and norm gains too), as a checkpoint dict."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64 * -(-tok.n_vocab // 64), block_size=128, n_layer=2, n_head=4, n_embd=64, **flags)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, {'model': model.state_dict(), 'model_args': cfg.to_dict(), 'tokenizer': tok.spec, 'stage': stage,
                   'iter_num': 7}


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_export_loads_in_transformers_with_our_logits(tok, tmp_path, name):
    model, ckpt = random_checkpoint(tok, **ARCHITECTURES[name])
    hf.save_hf(ckpt, str(tmp_path))
    config = json.load(open(tmp_path / 'config.json'))
    assert config['model_type'] == name.split('-')[0]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = torch.tensor([tok.render_prompt(MESSAGES)])
    random_ids = torch.randint(0, tok.n_vocab, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ids in (prompt, random_ids):
            assert (model(ids)[0] - loaded(ids).logits).abs().max().item() <= 1e-4


def test_export_replaces_an_earlier_one_whole(tok, tmp_path):
    path = tmp_path / 'export'
    path.mkdir()
    (path / 'stale.txt').write_text('from an earlier export')
    _, ckpt = random_checkpoint(tok)
    hf.save_hf(ckpt, str(path))
    assert not (path / 'stale.txt').exists() and (path / 'model.safetensors').exists()
    assert os.listdir(tmp_path) == ['export']  # no temp directory left behind


def test_exported_tokenizer_has_our_ids_and_renders_our_chatml(tok, tmp_path):
    _, ckpt = random_checkpoint(tok)
    hf.save_hf(ckpt, str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    stdlib = sysconfig.get_paths()['stdlib']
    for name in ('json/decoder.py', 'calendar.py', 'pprint.py'):  # none of these trained the tokenizer
        text = open(os.path.join(stdlib, name), encoding='utf-8').read()
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), name
    for messages in (MESSAGES, MESSAGES[1:3], [{'role': 'user', 'content': 'tabs\tand\nnewlines  '}]):
        for gen_prompt in (True, False):
            ours = tok.render_prompt(messages) if gen_prompt else tok.render_chat(messages)[0]
            text = theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            assert text == tok.decode(ours)  # byte for byte
            assert theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt)['input_ids'] == ours
    special = '<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|pad|>'
    assert theirs.encode(special, add_special_tokens=False) == tok.encode(special, allow_special=True)
    assert theirs.decode(tok.encode('déjà vu ✓')) == 'déjà vu ✓'
    assert theirs.eos_token == '<|endoftext|>' and theirs.pad_token == '<|pad|>'


def test_exported_char_tokenizer_has_our_ids(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = char_tokenizer(text)
    _, ckpt = random_checkpoint(tok, pos='learned', norm='layernorm', mlp='gelu')
    hf.save_hf(ckpt, str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
    assert theirs.decode(tok.encode(text)) == text


def test_greedy_generate_in_transformers_is_our_greedy_text(tok, tmp_path):
    model, ckpt = random_checkpoint(tok, n_kv_head=2)
    hf.save_hf(ckpt, str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = tok.render_prompt(MESSAGES)
    ours = TextGenerator(model, tok).generate([prompt], temperature=0.0, max_new_tokens=20, stop_token_ids=())[0]
    out = loaded.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert tok.decode(out[0, len(prompt):].tolist()) == ours


def test_export_script_writes_checks_and_converts_dtype(tiny_checkpoint, tmp_path):
    out = tmp_path / 'hf'
    proc = run_script('export.py', f'--out_dir={tiny_checkpoint}', f'--export_path={out}')
    assert 'check: max |logit difference|' in proc.stdout and '-> llama' in proc.stdout
    for name in ('config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'):
        assert (out / name).exists(), name
    generation = json.load(open(out / 'generation_config.json'))
    tok = Tokenizer(torch.load(os.path.join(tiny_checkpoint, 'ckpt.pt'), weights_only=True)['tokenizer'])
    assert sorted(generation['eos_token_id']) == sorted({tok.im_end_id, tok.eot_id})
    run_script('export.py', f'--out_dir={tiny_checkpoint}', f'--export_path={tmp_path / "bf16"}', '--dtype=bfloat16')
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'bf16' / 'model.safetensors'), 'pt') as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_flags_without_a_transformers_architecture_are_refused_by_name(tok, tmp_path):
    for flags, words in ((dict(pos='learned'), "pos='learned', norm='rmsnorm'"),
                         (dict(n_experts=4, n_shared_experts=1), 'n_shared_experts'),
                         (dict(n_experts=4, n_experts_active=1), 'Switch'),
                         (dict(pos='learned', norm='layernorm', mlp='gelu', n_kv_head=2), 'GQA')):
        _, ckpt = random_checkpoint(tok, **flags)
        save_checkpoint(ckpt, str(tmp_path / 'ckpt.pt'))
        proc = run_script('export.py', f'--out_dir={tmp_path}', check=False)
        assert proc.returncode != 0 and words in proc.stderr, proc.stderr
        assert not os.path.exists(f'{tmp_path}-hf')


def test_lm_eval_hf_backend_loads_the_export(tok, tmp_path):
    """lm-eval-harness's `hf` model (what `lm_eval --model hf --model_args pretrained=DIR` builds)
    loads the export and scores a continuation exactly as our model does."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model, ckpt = random_checkpoint(tok)
    hf.save_hf(ckpt, str(tmp_path))
    lm = HFLM(pretrained=str(tmp_path), device='cpu', batch_size=1, dtype='float32')
    context, continuation = 'def add(a, b):', '\n    return a + b'
    request = Instance(request_type='loglikelihood', doc={}, arguments=(context, continuation), idx=0)
    (logprob, _), = lm.loglikelihood([request])
    context_ids = tok.encode(context)  # lm-eval: the context's tokens, then the whole text's tokens after as many
    continuation_ids = tok.encode(context + continuation)[len(context_ids):]
    ids, n = torch.tensor([context_ids + continuation_ids]), len(continuation_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0, :-1].float(), -1)
    ours = logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()
    assert abs(logprob - ours) < 1e-3
