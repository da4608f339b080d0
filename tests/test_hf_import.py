"""Import (`--init_from=hf:PATH`): a transformers model directory becomes our GPT with its own
tokenizer and chat template; every stage fine-tunes it; the result exports back. Offline: tiny
randomly initialised transformers models, with a tokenizer trained here, saved to disk."""

import json
import os
import random

import pytest
import torch

import common
import hf
import tasks
from conftest import eval_rows, run_script, write_jsonl
from tokenizer import Tokenizer

transformers = pytest.importorskip('transformers')

# Qwen2.5-Instruct's chat template without its tool-call branches: ChatML, and a default system
# message when the conversation has none.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
MESSAGES = [{'role': 'user', 'content': 'What is 12+30?'}, {'role': 'assistant', 'content': '12+30 = 42'},
            {'role': 'user', 'content': 'Who are you?'}]


def hf_configs(vocab_size):
    """Tiny configs of each architecture we import, with the options real checkpoints use."""
    size = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    rope = {'rope_type': 'default', 'rope_theta': 1e6}
    return {
        'llama': transformers.LlamaConfig(**size, rms_norm_eps=1e-5, tie_word_embeddings=False),  # SmolLM2-like
        'qwen2': transformers.Qwen2Config(**size, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=rope),
        'qwen3': transformers.Qwen3Config(**size, head_dim=32, tie_word_embeddings=True, rope_parameters=rope),
        'mixtral': transformers.MixtralConfig(**size, num_local_experts=4, num_experts_per_tok=2),
        'gpt2': transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                        activation_function='gelu_new'),
    }


def save_hf_model(path, arch, tok, template=QWEN_TEMPLATE, config=None):
    """A randomly initialised transformers model (all weights non-trivial) and a tokenizer with
    `template`, as save_pretrained writes them. Returns the transformers model."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config or hf_configs(64 * -(-tok.n_vocab // 64))[arch])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    fast = hf.hf_tokenizer(tok)
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return model.eval()


@pytest.fixture(scope='module')
def tok(tiny_data_dir):
    data_root, dataset = tiny_data_dir
    return Tokenizer.load(os.path.join(data_root, dataset, 'tokenizer.json'))


@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'qwen3', 'mixtral', 'gpt2'])
def test_import_gives_the_transformers_models_logits_and_chat_format(tok, tmp_path, arch):
    theirs = save_hf_model(tmp_path, arch, tok)
    ckpt = common.load_checkpoint(f'hf:{tmp_path}')
    model = common.model_from_checkpoint(ckpt).eval()
    tokenizer = common.tokenizer_from_checkpoint(ckpt)
    assert tokenizer.kind == 'hf' and ckpt['stage'] == 'hf'
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tokenizer.render_prompt(MESSAGES)
    assert prompt == auto.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids']
    assert 'You are Qwen' in tokenizer.decode(prompt)  # the model's own template, default system message included
    random_ids = torch.randint(0, tok.n_vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ids in (torch.tensor([prompt]), random_ids):
            assert (model(ids)[0] - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize('change, words', [
    (lambda c: setattr(c, 'rope_parameters', {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0,
                                              'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                              'original_max_position_embeddings': 64}), "RoPE scaling 'llama3'"),
    (lambda c: setattr(c, 'hidden_act', 'gelu'), "hidden_act='gelu'"),
])
def test_import_refuses_what_it_cannot_run_by_name(tok, tmp_path, change, words):
    config = hf_configs(576)['llama']
    change(config)
    save_hf_model(tmp_path, 'llama', tok, config=config)
    with pytest.raises(SystemExit, match=words):
        common.load_checkpoint(f'hf:{tmp_path}')


def test_import_refuses_an_unknown_architecture_and_a_missing_directory(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt_neox', 'architectures': ['GPTNeoXForCausalLM']}))
    with pytest.raises(SystemExit, match="model_type 'gpt_neox' is not supported"):
        common.load_checkpoint(f'hf:{tmp_path}')
    with pytest.raises(SystemExit, match='no config.json'):
        common.load_checkpoint(f'hf:{tmp_path}/nowhere')


@pytest.fixture(scope='module')
def qwen_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp('qwen')
    save_hf_model(path, 'qwen2', tok)
    return str(path)


def test_every_stage_fine_tunes_an_imported_model_and_sft_exports_back(qwen_dir, tiny_data_dir, tmp_path):
    data_root, _ = tiny_data_dir
    chats = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': [{'role': 'user', 'content': f'say {w}'},
                                                                {'role': 'assistant', 'content': f'{w} {w}'}]}
                                                  for w in ('tiger', 'lion', 'cat', 'dog', 'owl', 'bee')] * 4)
    pairs = write_jsonl(tmp_path / 'pairs.jsonl', [{'prompt': f'say {w}', 'chosen': f'{w} {w}', 'rejected': 'no'}
                                                   for w in ('tiger', 'lion', 'cat', 'dog', 'owl', 'bee')] * 2)
    prompts = write_jsonl(tmp_path / 'prompts.jsonl', [{'prompt': f'{a}+{b}=?', 'answer': str(a + b)}
                                                       for a in range(4) for b in range(4)])
    common_args = [f'--init_from=hf:{qwen_dir}', '--max_iters=4', '--eval_interval=2', '--log_interval=1',
                   '--warmup_iters=0', '--batch_size=4', f'--data_root={data_root}']
    out = {stage: str(tmp_path / stage) for stage in ('sft', 'sft-lora', 'reward', 'dpo', 'grpo')}
    sft_args = [f'--sft_files={chats}', '--max_seq_len=128', '--eval_iters=2', '--eval_items_per_task=0']
    run_script('sft.py', *common_args, *sft_args, f'--out_dir={out["sft"]}')
    run_script('sft.py', *common_args, *sft_args, '--lora_rank=4', '--learning_rate=1e-2', f'--out_dir={out["sft-lora"]}')
    run_script('reward.py', *common_args, f'--pref_files={pairs}', '--max_seq_len=128', '--eval_pairs=4',
               f'--out_dir={out["reward"]}')
    run_script('dpo.py', *common_args, f'--pref_files={pairs}', '--max_seq_len=128', '--eval_pairs=4',
               '--eval_items_per_task=0', f'--out_dir={out["dpo"]}')
    run_script('ppo.py', *common_args, f'--rl_file={prompts}', '--algorithm=grpo', '--num_generations=2',
               '--max_new_tokens=4', '--eval_items_per_task=0', '--lr_decay_iters=4', f'--out_dir={out["grpo"]}')
    for stage, path in out.items():
        ckpt = common.load_checkpoint(path, which='latest')
        assert ckpt['iter_num'] == 4 and ckpt['parent'] == f'hf:{qwen_dir}', stage
        assert common.tokenizer_from_checkpoint(ckpt).kind == 'hf'
    assert eval_rows(out['sft'])[4]['val/loss'] < eval_rows(out['sft'])[0]['val/loss']  # it learned

    # every fine-tuned model (LoRA merged, the reward model's backbone) goes back out as the
    # architecture it came in with, its logits checked by export.py
    for stage, path in out.items():
        proc = run_script('export.py', f'--out_dir={path}', f'--export_path={tmp_path / "back" / stage}')
        assert '-> qwen2' in proc.stdout and 'check: max |logit difference|' in proc.stdout, stage
    lora = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'back' / 'sft-lora'))
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert not torch.equal(lora.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(lora.model.embed_tokens.weight, base.model.embed_tokens.weight)  # not a LoRA target
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'back' / 'sft'))
    original = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert back.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids'] == \
        original.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids']


@pytest.mark.slow
def test_qwen_identity_recipe(qwen_dir, tmp_path):
    """The README's recipe on a tiny Qwen2-architecture model: SFT on an identity file (OpenAI
    messages format) with the model's own template; held-out phrasings answer with the new name;
    the export answers the same in transformers."""
    name, maker = 'Nova', 'Acme Labs'
    rng = random.Random(0)
    train = tasks.identity_records(200, False, rng, 1337, name, maker, 'sft')
    held_out = tasks.identity_records(40, True, rng, 1337, name, maker, 'sft')
    assert not {r['messages'][-2]['content'] for r in train} & {r['messages'][-2]['content'] for r in held_out}
    train_file = write_jsonl(tmp_path / 'identity.jsonl', [{'messages': r['messages']} for r in train])
    held_file = write_jsonl(tmp_path / 'identity_test.jsonl', [{'messages': r['messages']} for r in held_out])
    out = str(tmp_path / 'out-identity')
    run_script('sft.py', f'--init_from=hf:{qwen_dir}', f'--sft_files={train_file}', f'--out_dir={out}',
               '--max_iters=150', '--eval_interval=50', '--eval_iters=2', '--eval_items_per_task=0', '--batch_size=8',
               '--learning_rate=3e-3', '--min_lr=3e-4', '--warmup_iters=10', '--lr_decay_iters=150', '--max_seq_len=128')
    proc = run_script('eval.py', f'--out_dir={out}', '--score_tasks=False', f'--chat_file={held_file}',
                      f'--expect={name}', f'--json_out={tmp_path / "eval.json"}')
    metrics = json.load(open(tmp_path / 'eval.json'))
    assert metrics['file_items'] == 40 and metrics['file_contains'] >= 0.9, proc.stdout

    run_script('export.py', f'--out_dir={out}', f'--export_path={tmp_path / "nova"}')
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'nova'), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'nova'))
    question = held_out[0]['messages'][:-1]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors='pt')['input_ids']
    reply = tokenizer.decode(model.generate(ids, do_sample=False, max_new_tokens=64)[0, ids.size(1):],
                             skip_special_tokens=True)
    assert reply == held_out[0]['messages'][-1]['content'], reply  # the whole answer, then <|im_end|> stops it
