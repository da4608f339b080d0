"""A fork server for the tests' script runs: one process imports torch and the repo's modules
once, then runs each script in a fork of itself, as `python SCRIPT args` would run it (as
__main__, from the same folder, with the same environment). A fresh `python train.py` spends
~2 s importing torch before its first line; the suite runs a few hundred scripts, so this is
minutes of its time on 2 cores.

Forking is safe here: the imports start no threads (torch's thread pools start at its first op,
in the child), and the server does nothing else. The environment is fixed when the server
starts: torch and OpenMP read some variables at import, so a run that needs another environment
is not sent here (conftest.run_script starts a process of its own for it).

Protocol: one JSON job per line on the server's stdin: {"argv", "stdout", "stderr", "stdin"
(paths), "env" (variables no import reads, set in the child)}. The server answers {"pid"} once
it has forked and {"rc", "cpu"} when the child is done."""

import atexit
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback

# What the scripts import, some of it lazily: torch (~2 s), torch._dynamo (1.4 s) on the first
# torch.optim use, transformers' model classes on the first export or import
PRELOAD = ['torch', 'torch._dynamo', 'numpy', 'tiktoken', 'common', 'model', 'tokenizer', 'data', 'tasks',
           'generate', 'heldout', 'preference', 'rewardmodel', 'dpo_loss', 'rl', 'lora', 'hf', 'gguf_export',
           'transformers', 'transformers.models.llama.modeling_llama', 'safetensors.torch']


def serve(cwd):
    """The server's loop (run in a process of its own, see ForkServer): preload, then fork per job."""
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # before the '' of `python -c`: sys.path[:2] in the child
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # the script that imports it fails the same way, with its own traceback
            pass
    gc.freeze()  # the preloaded objects: the children's collections skip them (and leave their pages shared)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_child(job)
        print(json.dumps({'pid': pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'cpu': usage.ru_utime + usage.ru_stime}), flush=True)


def run_child(job):
    """In the forked child: the script (or `-c` code, or `-m` module) as __main__ with the job's
    argv, its output to the job's files; exits with the script's exit code."""
    os.setsid()  # its own process group: a timeout kills the script's children too
    os.dup2(os.open(job['stdout'], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 1)
    os.dup2(os.open(job['stderr'], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
    os.dup2(os.open(job['stdin'], os.O_RDONLY), 0)  # not the server's pipe, for the child's own children too
    sys.stdin = open(job['stdin'])
    os.environ.update(job.get('env') or {})
    sys.argv = job['argv']
    # sys.path[0] as python sets it (the server's is the cwd, for its imports): the script's folder
    # for a script, '' for -c, the cwd for -m
    sys.path[:2] = [{'-c': '', '-m': os.getcwd()}.get(sys.argv[0], os.path.dirname(os.path.abspath(sys.argv[0])))]
    code = 1
    try:
        if sys.argv[0] == '-c':
            source, sys.argv = sys.argv[1], ['-c', *sys.argv[2:]]  # as `python -c CODE args` sets it
            exec(compile(source, job.get('where', '<string>'), 'exec'), {'__name__': '__main__'})
        elif sys.argv[0] == '-m':
            sys.argv = sys.argv[1:]
            runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:  # sys.exit(n), or a script's error message
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        # What the interpreter does on its way out: wait for the script's threads, run its atexit
        # functions (prepare.py removes its temp folder there), flush; then leave at once.
        threading._shutdown()
        atexit._run_exitfuncs()
        gc.collect()  # closes (and so flushes) files the script left open
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkServer:
    """The client: start the server in `cwd` with `env`, run() jobs one at a time, close()."""

    def __init__(self, cwd, env, stderr_path=os.devnull):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import forks; sys.path.pop(0); forks.serve({cwd!r})"
        self.env, self.lock = env, threading.Lock()
        # Unbuffered pipes, read a byte at a time: a buffered reader could take the exit status in
        # with the pid, and select() would then wait on an empty pipe for an answer already read.
        self.proc = subprocess.Popen([sys.executable, '-c', code], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(stderr_path, 'w'), bufsize=0,
                                     start_new_session=True)

    def run(self, argv, stdout, stderr, stdin=os.devnull, env=None, timeout=600, where='<string>'):
        """Run argv (as after `python`) to completion: {"rc", "cpu"}. On a timeout the job's process
        group is killed and subprocess.TimeoutExpired raised, as subprocess.run would."""
        with self.lock:
            self.submit({'argv': argv, 'stdout': stdout, 'stderr': stderr, 'stdin': stdin, 'env': env, 'where': where})
            return self.wait(argv, timeout)

    def submit(self, job):
        self.proc.stdin.write(json.dumps(job).encode() + b'\n')

    def wait(self, argv, timeout):
        """The submitted job's {"rc", "cpu"}, or kill it and raise after `timeout` seconds."""
        pid = self.answer()['pid']
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.killpg(pid, signal.SIGKILL)
            self.answer()  # its exit status
            raise subprocess.TimeoutExpired(argv, timeout)
        return self.answer()

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server is gone (exit code {self.proc.poll()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
