"""sample.py end to end, as a user runs it, on a tiny checkpoint saved here."""

import os
import subprocess
import sys

import pytest
import torch

from common import save_checkpoint
from generate import TextGenerator
from model import GPT, GPTConfig
from tokenizer import char_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "the quick brown fox jumps over the lazy dog.\nTHE END?\n"


def tiny_checkpoint(path, stage='pretrain', **model_args):
    """Save a random tiny GPT + char tokenizer in the format every stage writes; return (model, tokenizer)."""
    torch.manual_seed(0)
    tok = char_tokenizer(TEXT)
    config = GPTConfig(**{**dict(vocab_size=tok.n_vocab, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=32), **model_args})
    model = GPT(config).eval()
    save_checkpoint({'model': model.state_dict(), 'model_args': config.to_dict(), 'tokenizer': tok.spec,
                     'optimizer': {}, 'iter_num': 10, 'best_val_loss': 3.0, 'config': {}, 'stage': stage},
                    os.path.join(path, 'ckpt.pt'))
    return model, tok


def sample(*args, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, 'sample.py', *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_sample_prints_num_samples_and_reads_the_prompt_from_a_file(tmp_path):
    model, tok = tiny_checkpoint(str(tmp_path))
    prompt = "the lazy "
    (tmp_path / 'prompt.txt').write_text(prompt)
    proc = sample(f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path / "prompt.txt"}', '--num_samples=2',
                  '--max_new_tokens=12', '--temperature=0', '--device=cpu')
    assert proc.returncode == 0, proc.stderr
    expected = prompt + TextGenerator(model, tok).generate(prompt, temperature=0, max_new_tokens=12)
    assert proc.stdout.count(expected + '\n---------------\n') == 2, proc.stdout
    assert 'stage pretrain' in proc.stdout


def test_sample_with_default_options_runs_and_fits_the_context(tmp_path):
    tiny_checkpoint(str(tmp_path))
    proc = sample(f'--out_dir={tmp_path}', '--num_samples=1', '--top_p=0.9', '--repetition_penalty=1.2')
    assert proc.returncode == 0, proc.stderr
    assert 'max_new_tokens 256 -> 127' in proc.stdout  # block_size 128, minus the 1-token empty prompt


def test_chat_answers_each_line_of_piped_stdin(tmp_path):
    model, tok = tiny_checkpoint(str(tmp_path), stage='sft')
    proc = sample(f'--out_dir={tmp_path}', '--chat=True', '--temperature=0', '--max_new_tokens=10',
                  '--system=be brief', stdin="hello fox\n\nthe end\n/reset\nthe dog\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line[len('assistant> '):] for line in proc.stdout.splitlines() if line.startswith('assistant> ')]
    assert len(replies) == 3 and '(new conversation)' in proc.stdout
    first = TextGenerator(model, tok).chat([{'role': 'user', 'content': 'hello fox'}], system='be brief',
                                           temperature=0, max_new_tokens=10)
    assert replies[0] == first.split('\n')[0]


@pytest.mark.parametrize('case,message', [
    ('missing', 'no checkpoint at'),
    ('wrong_shapes', 'does not match this version of model.py'),
    ('not_a_checkpoint', 'is not a Mini-LLM checkpoint'),
])
def test_sample_says_what_is_wrong_with_a_bad_checkpoint(tmp_path, case, message):
    path = str(tmp_path / 'ckpt.pt')
    if case == 'wrong_shapes':
        model, tok = tiny_checkpoint(str(tmp_path))
        ckpt = torch.load(path, weights_only=True)
        ckpt['model_args']['n_embd'] = 64
        save_checkpoint(ckpt, path)
    elif case == 'not_a_checkpoint':
        save_checkpoint({'weights': torch.zeros(3)}, path)
    proc = sample(f'--out_dir={tmp_path}', '--max_new_tokens=4')
    assert proc.returncode != 0
    assert message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
