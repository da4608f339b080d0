"""The guides in docs/ run: every command of their ```bash blocks, and every ```python block, is
executed, guide by guide in reading order (GUIDES), in one fresh working copy of the repo, each
command from where the ones before left it (prepare -> train -> sft -> ...). A renamed flag or
script fails here instead of in a reader's terminal.

How a command runs (resolve()):
- `python SCRIPT.py ...` as written plus QUICK[SCRIPT] appended: tiny sizes (2 steps, a few eval
  items), which win over the guide's values of those keys. A fork server runs it: one process
  imports torch and the repo's modules once, then forks, and the child runs the script as __main__
  with the guide's argv (~0.1 s to start instead of ~2 s; see tests/forks.py). Its stdin is two chat
  lines, what a reader types into `sample.py --chat=True`. Python blocks run the same way.
- a command that cannot run here as written (GPUs, the network, pip) is in REDUCED, with what runs
  instead and why. A command that is neither a repo script nor in REDUCED fails the fast test
  below, and so does a REDUCED entry that no guide has.
- `python serve.py` starts in the background on a free port, to which the guide's later
  127.0.0.1:8000 URLs are pointed, and stops at the end of its guide; curl fails on HTTP errors.
- the reader's own files the guides name (notes/, my_sft.jsonl, ...) are made by make_files(), and
  the downloads prepare.py would fetch are small stand-ins in data/downloads/, where it looks first.
- a command already run verbatim in the working copy is not run again.
Run with -s to see each command's wall and CPU time.
"""

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

from conftest import REPO
from forks import ForkServer

DOCS = os.path.join(REPO, 'docs')
GUIDES = ['getting-started.md', 'data.md', 'model.md', 'training.md', 'inference.md', 'alignment.md', 'export.md']

# appended to every command of the script: a few steps and few eval items, the guide's flags otherwise
STEPS = ['--max_iters=2', '--lr_decay_iters=2', '--warmup_iters=1', '--eval_interval=2', '--log_interval=1',
         '--batch_size=4']
QUICK = {
    'prepare.py': [],
    'train.py': STEPS + ['--eval_iters=1', '--peak_flops=1e11', '--compile_model=False'],  # compiling takes ~20 s
    'sft.py': STEPS + ['--eval_iters=1', '--eval_items_per_task=2'],
    'reward.py': STEPS + ['--eval_pairs=8'],
    # precomputing scores all 13k pairs under the reference first (~50 s); test_dpo.py shows it is the same run
    'dpo.py': STEPS + ['--eval_pairs=8', '--eval_items_per_task=2', '--precompute_ref_logps=False'],
    'ppo.py': STEPS + ['--eval_items_per_task=2'],
    'sample.py': ['--max_new_tokens=16'],
    'eval.py': ['--items_per_task=2', '--eval_batches=1'],
    'export.py': [],
    'serve.py': ['--port=0', '--log_interval=0'],
}

# What runs where a guide's command cannot run here as written: guide command -> (stand-in, why).
# The stand-in is a command line, or a function of the working copy.


def requirements_installed(work):
    """pip install -r requirements.txt, offline: every requirement is installed already."""
    from importlib.metadata import PackageNotFoundError, version
    for line in open(os.path.join(work, 'requirements.txt')):
        name = re.split(r'[<>=!\s#\[]', line.strip(), maxsplit=1)[0]
        if name:
            try:
                version(name)
            except PackageNotFoundError:
                raise AssertionError(f"requirements.txt: {name} is not installed") from None


TORCHRUN_CPU = 'torchrun --standalone --nproc_per_node=2 train.py config/pretrain_tiny.py --gradient_accumulation_steps=2'
REDUCED = {
    'pip install -r requirements.txt': (requirements_installed, "offline: the requirements are checked instead"),
    'torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py':
        (TORCHRUN_CPU, "no GPUs: 2 CPU ranks on gloo, the tiny model"),
    'torchrun --standalone --nproc_per_node=8 train.py config/pretrain_small.py --parallel=fsdp':
        (TORCHRUN_CPU + ' --parallel=fsdp --out_dir=out-fsdp', "no GPUs: 2 CPU ranks on gloo, the tiny model"),
    'lm_eval --model hf --model_args pretrained=out-sft-hf,dtype=float32 --tasks hellaswag,arc_easy --device cpu --batch_size 8':
        ('python -c "from lm_eval.api.instance import Instance; from lm_eval.models.huggingface import HFLM; '
         "lm = HFLM(pretrained='out-sft-hf', dtype='float32', device='cpu', batch_size=8); "
         "print(lm.loglikelihood([Instance('loglikelihood', {}, ('What is 2+2?', ' 4'), 0)]))\"",
         "offline, and lm_eval takes ~15 s to index its tasks: the model its hf backend builds from these "
         "arguments scores a continuation"),
}
SHELL = {'|', '||', '&&', ';', '&', '>', '>>', '<'}
CHAT_INPUT = 'Who are you?\nWhat is 2+3?\n'  # what a reader types into sample.py --chat=True


# ----------------------------------------------------------------------------- reading the guides

def blocks(path):
    """(line, language, text) of each ```bash and ```python block of a guide."""
    out, lang, start, lines = [], None, 0, []
    for i, line in enumerate(open(path, encoding='utf-8'), 1):
        fence = line.strip().startswith('```')
        if fence and lang is None:
            lang, start, lines = line.strip()[3:].strip() or 'text', i, []
        elif fence:
            if lang in ('bash', 'python'):
                out.append((start + 1, lang, ''.join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def commands(guide):
    """(line, argv or None, python code or None) of every command of a guide, in order: one per
    line of a bash block (a trailing backslash continues it; comments dropped), a python block whole."""
    out = []
    for start, lang, text in blocks(os.path.join(DOCS, guide)):
        if lang == 'python':
            out.append((start, None, text))
            continue
        pending, first = '', start
        for i, line in enumerate(text.splitlines(), start):
            if not pending:
                first = i
            if line.rstrip().endswith('\\'):  # continued on the next line
                pending += line.rstrip()[:-1] + ' '
                continue
            pending += line
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # a quote that spans lines (python -c "...")
                pending += '\n'
                continue
            if argv:
                out.append((first, argv, None))
            pending = ''
    return out


def resolve(argv):
    """A guide's command -> (kind, argv, script): how it runs here. kind: 'fork' (a repo script),
    'server' (serve.py, in the background), 'process' (curl), 'call' (a function).
    Raises ValueError for a command with no runner."""
    for text, (stand_in, _) in REDUCED.items():
        if shlex.split(text) == argv:
            if callable(stand_in):
                return 'call', stand_in, None
            argv = shlex.split(stand_in)
            break
    if SHELL & set(argv):
        raise ValueError("shell syntax (pipes, &&, redirections): write one plain command per line")
    if argv[0] == 'python' and argv[1:2] == ['-c']:
        return 'fork', argv[1:], None
    if argv[0] == 'python' and len(argv) > 1 and argv[1].endswith('.py'):
        script = argv[1]
        if script not in QUICK:
            raise ValueError(f"{script} has no QUICK entry (its tiny-size flags)")
        return ('server' if script == 'serve.py' else 'fork'), argv[1:] + QUICK[script], script
    if argv[0] == 'torchrun':  # the launcher forks from the server; the ranks are processes of their own
        script = next(a for a in argv if a.endswith('.py'))
        return 'fork', ['-m', 'torch.distributed.run', *argv[1:], *QUICK[script]], script
    if argv[0] == 'curl':  # an HTTP error fails it
        return 'process', argv + ['-sS', '--fail-with-body'], None
    raise ValueError("no runner: add it to REDUCED in tests/test_docs.py with the form it can run in here")


def config_keys(script):
    """The keys configurator.py accepts for a script: its top-level assignments before configure()."""
    keys = set()
    for node in ast.parse(open(os.path.join(REPO, script)).read()).body:
        if 'configure(' in ast.unparse(node):
            return keys
        if isinstance(node, ast.Assign):
            keys |= {t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith('_')}
    raise AssertionError(f"{script} does not call configure()")


def test_every_command_in_the_guides_has_a_runner():
    """Fast, without running anything: each guide is in GUIDES, each command resolves, its script
    and config files exist, its --keys are the script's config keys (QUICK's too), each python block
    compiles, and each REDUCED entry is a command of a guide."""
    assert sorted(GUIDES) == sorted(n for n in os.listdir(DOCS) if n.endswith('.md')), "add the new guide to GUIDES"
    seen, problems = set(), []
    for guide in GUIDES:
        for line, argv, code in commands(guide):
            if argv is None:
                compile(code, f'{guide}:{line}', 'exec')
                continue
            seen.add(shlex.join(argv))
            try:
                kind, args, script = resolve(argv)
            except ValueError as e:
                problems.append(f"{guide}:{line}: {shlex.join(argv)}: {e}")
                continue
            if script is None:
                continue
            keys = config_keys(script)
            for arg in args[args.index(script) + 1:]:
                if arg.startswith('--') and arg[2:].split('=')[0] not in keys:
                    problems.append(f"{guide}:{line}: {arg} is not a config key of {script}")
                elif not arg.startswith('--') and not os.path.exists(os.path.join(REPO, arg)):
                    problems.append(f"{guide}:{line}: {arg}: no such file")
    problems += [f"REDUCED[{text!r}]: no guide has this command" for text in REDUCED
                 if shlex.join(shlex.split(text)) not in seen]
    assert not problems, '\n'.join(problems)


# ----------------------------------------------------------------------------- the working copy

def sample_docs(n, words=300):
    """n distinct documents of standard-library source, ~words words each."""
    text = ''.join(open(os.path.join(sysconfig.get_paths()['stdlib'], name), encoding='utf-8').read()
                   for name in ('argparse.py', 'textwrap.py', 'dataclasses.py'))
    tokens = text.split(' ')
    return [' '.join(tokens[i * words:(i + 1) * words]) for i in range(n)]


def write(path, text):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({'text': docs}), path)


def make_files(work):
    """The reader's own files the guides name, and stand-ins for the downloads, in the working copy."""
    import corpus
    docs = sample_docs(120)
    write(f'{work}/path/to/input.txt', '\n'.join(docs[:20]))
    for i in range(4):
        write(f'{work}/notes/note{i}.md', docs[20 + i])
        write(f'{work}/books/part{i % 2}/book{i}.txt', docs[24 + i])
    write(f'{work}/extra.txt', docs[28])
    write(f'{work}/web.jsonl', ''.join(json.dumps({'text': d}) + '\n' for d in docs[29:40]))
    for i in range(2):
        write_parquet(f'{work}/fineweb/shard_0000{i}.parquet', docs[40 + 10 * i:50 + 10 * i])
    import datasets  # a folder as Dataset.save_to_disk writes it
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({'text': docs[50:60]}).save_to_disk(f'{work}/saved_dataset')
    chats = [{'messages': [{'role': 'user', 'content': f'What is {a}+{a}?'}, {'role': 'assistant', 'content': str(2 * a)}]}
             for a in range(20)]
    write(f'{work}/my_sft.jsonl', ''.join(json.dumps(c) + '\n' for c in chats))
    pairs = [{'prompt': f'What is {a}+{a}?', 'chosen': str(2 * a), 'rejected': str(2 * a + 1)} for a in range(20)]
    write(f'{work}/my_prefs.jsonl', ''.join(json.dumps(p) + '\n' for p in pairs))
    # downloads: every built-in remote source and every URL a guide names, by its file type
    urls = [(r['url'], name) for name, r in corpus.REMOTE.items()]
    for guide in GUIDES:
        for _, argv, _ in commands(guide):
            urls += [(u, None) for a in argv or [] for u in re.findall(r'https?://[^,\s\'"]+', a)]
    for url, name in urls:
        path = corpus.download_path(url, f'{work}/data/downloads', name)
        if path.endswith('.parquet'):
            write_parquet(path, docs[60:80])
        elif path.endswith('.txt'):
            write(path, '\n<|endoftext|>\n'.join(docs[80:120]))


def working_copy(root):
    """The repo's scripts and configs in a fresh folder: what a reader's checkout holds."""
    work = os.path.join(root, 'repo')
    os.makedirs(work)
    for name in os.listdir(REPO):
        if name.endswith(('.py', '.html', '.txt')) and os.path.isfile(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), work)
    shutil.copytree(os.path.join(REPO, 'config'), os.path.join(work, 'config'))
    make_files(work)
    return work


# ----------------------------------------------------------------------------- running commands

ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='disabled',
           TOKENIZERS_PARALLELISM='false')


class Guides:
    """Runs the guides' commands in one working copy: the fork server, servers, other processes."""

    def __init__(self, work):
        self.work, self.done, self.server, self.port, self.times, self.cpu = work, set(), None, None, [], 0.0
        self.forks = ForkServer(work, ENV, stderr_path=f'{work}/fork-server.log')
        write(f'{work}/chat-input.txt', CHAT_INPUT)

    def run(self, guide, line, argv, code):
        """One command of a guide (argv) or one python block (code); fails with its output."""
        where = f"{guide}:{line}"
        kind, args, _ = ('fork', ['-c', code], None) if code is not None else resolve(argv)
        if kind != 'call':
            args = [self.local(a) for a in args]
        key = json.dumps(args, default=str)
        if key in self.done:  # the same command ran already, in this working copy
            return
        self.done.add(key)
        log = f"{self.work}/logs/{guide}-{line}.log"
        write(log, f"$ {shlex.join(argv) if argv else 'the python block'}\n# run as {args}\n")
        t0, cpu0 = time.time(), self.cpu
        if kind == 'call':
            args(self.work)
            rc = 0
        elif kind == 'fork':
            rc = self.fork(args, log, where)
        elif kind == 'server':
            rc = self.start_server(args, log)
        else:
            with open(log, 'a') as f:
                rc = subprocess.run(args, cwd=self.work, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
        self.times.append((time.time() - t0, self.cpu - cpu0, where))
        if rc != 0:
            raise AssertionError(f"{where} failed (exit code {rc}):\n{open(log).read()[-5000:]}")

    def local(self, text):
        """The guide's 127.0.0.1:8000 is the port the server got here."""
        return text.replace('127.0.0.1:8000', f'127.0.0.1:{self.port}') if self.port else text

    def fork(self, args, log, where, timeout=300):
        try:
            answer = self.forks.run(args, log, log, stdin=f'{self.work}/chat-input.txt', timeout=timeout, where=where)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{where}: no answer within {timeout} s:\n{open(log).read()[-3000:]}")
        self.cpu += answer['cpu']
        return answer['rc']

    def start_server(self, args, log):
        self.stop_server()
        self.server = subprocess.Popen([sys.executable, *args], cwd=self.work, env=ENV, stdout=open(log, 'a'),
                                       stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and self.server.poll() is None:
            found = re.search(r'serving .* on http://127\.0\.0\.1:(\d+)/', open(log).read())
            if found:
                self.port = int(found.group(1))
                return 0
            time.sleep(0.2)
        return self.server.poll() or 1

    def stop_server(self):
        server, self.server, self.port = self.server, None, None
        if server:
            server.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                assert server.wait(timeout=30) in (0, -signal.SIGINT, 130), "serve.py did not stop cleanly on Ctrl-C"
            finally:
                server.kill()

    def close(self):
        self.stop_server()
        self.forks.close()


@pytest.mark.slow
def test_the_guides_run_as_written(tmp_path):
    """Every guide, in reading order, each command from where the ones before left the working copy."""
    guides = Guides(working_copy(str(tmp_path)))
    try:
        for guide in GUIDES:
            try:
                for line, argv, code in commands(guide):
                    guides.run(guide, line, argv, code)
            finally:
                guides.stop_server()
    finally:
        guides.close()
        print('\nwall s  cpu s  command (cpu: forked commands only)')
        print('\n'.join(f"{t:6.1f}  {cpu:5.1f}  {where}" for t, cpu, where in sorted(guides.times, reverse=True)))
