"""tests/forks.py, the fork server run_script uses: a script run in a fork gives what its own
process gives (output, exit code, files, the trained weights), and a run past its timeout is
killed with its children."""

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, fork_server, run_script, script_env, without_fork_env


def own_process(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=script_env())


def test_a_forked_training_run_is_the_run_its_own_process_makes(tiny_data_dir, tmp_path):
    assert without_fork_env(script_env()) == fork_server().env  # so run_script below forks
    data_root, dataset = tiny_data_dir
    args = [f'--data_root={data_root}', f'--dataset={dataset}', '--n_layer=1', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--batch_size=2', '--max_iters=3', '--eval_interval=3', '--eval_iters=1',
            '--dropout=0.1', '--compile_model=False']
    forked = run_script('train.py', *args, f'--out_dir={tmp_path / "forked"}')
    alone = own_process('train.py', *args, f'--out_dir={tmp_path / "alone"}')
    assert alone.returncode == forked.returncode == 0, alone.stderr
    a, b = (torch.load(tmp_path / name / 'ckpt.pt', weights_only=True)['model'] for name in ('forked', 'alone'))
    assert all(torch.equal(a[k], b[k]) for k in b)  # same seeds, same data order, same dropout draws
    assert forked.stdout.splitlines()[0] == alone.stdout.splitlines()[0]
    # a script's error: the same message and exit code
    forked, alone = run_script('sft.py', '--no_such_key=1', check=False), own_process('sft.py', '--no_such_key=1')
    assert forked.returncode == alone.returncode == 1 and forked.stderr == alone.stderr != ''


def test_exit_codes_open_files_and_atexit_as_in_a_process_of_its_own(tmp_path):
    # the file sits in a reference cycle: only the collector closes (and so flushes) it on the way out
    code = ("import atexit, sys; box = [open(sys.argv[1], 'w')]; box.append(box); box[0].write('left open'); "
            "atexit.register(lambda: print('atexit ran')); sys.exit(3)")
    alone = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'own')], capture_output=True, text=True)
    out, err = tmp_path / 'out', tmp_path / 'err'
    answer = fork_server().run(['-c', code, str(tmp_path / 'forked')], str(out), str(err))
    assert answer['rc'] == alone.returncode == 3
    assert out.read_text() == alone.stdout == 'atexit ran\n'
    assert (tmp_path / 'forked').read_text() == (tmp_path / 'own').read_text() == 'left open'
    # an uncaught exception: exit code 1 and its traceback
    answer = fork_server().run(['-c', 'raise ValueError("boom")'], str(out), str(err))
    alone = subprocess.run([sys.executable, '-c', 'raise ValueError("boom")'], capture_output=True, text=True)
    assert answer['rc'] == alone.returncode == 1
    assert err.read_text().splitlines()[-1] == alone.stderr.splitlines()[-1] == 'ValueError: boom'


def test_a_run_past_its_timeout_is_killed_with_its_children(tmp_path):
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(child.pid, flush=True); time.sleep(600)")
    out = tmp_path / 'out'
    t0 = time.time()
    with pytest.raises(subprocess.TimeoutExpired):
        fork_server().run(['-c', code], str(out), str(tmp_path / 'err'), timeout=3)
    assert time.time() - t0 < 30
    grandchild = int(out.read_text())
    for _ in range(50):  # killed with the group; gone once init has reaped it
        if not os.path.exists(f'/proc/{grandchild}') or open(f'/proc/{grandchild}/stat').read().split()[2] == 'Z':
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the run's child {grandchild} outlived the timeout")
    assert run_script('sample.py', '--no_such_key=1', check=False).returncode == 1  # the server goes on


def test_an_answer_that_arrives_with_the_pid_is_not_waited_for(tmp_path):
    """A job that ends before the client reads its pid: both answers are in the pipe at once, and
    the client must not have read the second into a buffer that select() cannot see."""
    server, files = fork_server(), (str(tmp_path / 'out'), str(tmp_path / 'err'))
    server.run(['-c', 'pass'], *files)  # the server is up (its imports take seconds)
    server.submit({'argv': ['-c', 'pass'], 'stdout': files[0], 'stderr': files[1], 'stdin': os.devnull})
    time.sleep(1)  # the server has written the pid and, the child done, its exit status
    assert server.wait(['-c', 'pass'], timeout=5)['rc'] == 0


def test_the_script_s_folder_is_first_on_its_path_as_python_sets_it(tmp_path):
    """A script outside the repo does not find the repo's modules unless it adds them, in a fork
    too (configurator: one the server does not preload; one it does is in sys.modules already)."""
    script = tmp_path / 'outside.py'
    script.write_text("import sys; print(sys.path[0]); import configurator\n")
    forked, alone = run_script(str(script), check=False), own_process(str(script))
    assert forked.stdout == alone.stdout == f'{tmp_path}\n'
    assert forked.returncode == alone.returncode == 1 and "No module named 'configurator'" in forked.stderr
