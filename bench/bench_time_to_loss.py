"""
Wall time to a validation loss, ours against nanoGPT, each run alone on this machine, one after
the other: nanoGPT's README CPU recipe for character-level Shakespeare (its train.py, 2,000 steps,
4 layers x 128, block 64, batch 12) and our config/shakespeare_char.py. The target is the final
val loss nanoGPT reaches in the same run. Time counts from each process's start (imports, data,
evaluations included), to the first evaluation at or below the target.
Ours runs twice: once evaluating every `eval_interval` steps, to find the first step S whose
evaluation is at or below the target; then as a user who stops there would run it, with the
config's own evaluation cadence (every 250 steps, as nanoGPT's) and --max_iters=S (the learning
rate schedule is unchanged: it decays over lr_decay_iters), timed to its evaluation at S. The
first run's time is printed too: its 5x more frequent evaluations are the measuring's cost.

nanoGPT is not a dependency: point the benchmark at a clone of it, and at Shakespeare's text.
    git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT
    python bench/bench_time_to_loss.py --nanogpt_dir=/path/to/nanoGPT --text_file=/path/to/input.txt
(NANOGPT_DIR works too; input.txt is tinyshakespeare, which nanoGPT's prepare.py would download.)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------- config
nanogpt_dir = os.environ.get('NANOGPT_DIR', '')
text_file = ''  # tinyshakespeare's input.txt
eval_interval = 50  # ours: how often it looks for the crossing
threads = 2  # OMP threads for both runs
config = configure(globals())  # overrides from --key=value arguments
# -----------------------------------------------------------------------------

# nanoGPT's README: "python train.py config/train_shakespeare_char.py --device=cpu --compile=False ..."
NANOGPT_ARGS = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False', '--eval_iters=20',
                '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128',
                '--max_iters=2000', '--lr_decay_iters=2000', '--dropout=0.0']


def timed_evals(cmd, cwd, pattern):
    """Run cmd; return [(seconds since start, step, val loss)] for each output line matching
    pattern (groups: step, loss), and the total wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    evals, tail = [], []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        m = re.search(pattern, line)
        if m:
            evals.append((time.time() - t0, int(m.group(1)), float(m.group(2))))
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(tail)}")
    return evals, time.time() - t0


def first_at_or_below(evals, target):
    return next(((t, step, loss) for t, step, loss in evals if loss <= target), None)


def main():
    if not nanogpt_dir or not os.path.exists(os.path.join(nanogpt_dir, 'train.py')):
        raise SystemExit("nanoGPT not found: git clone https://github.com/karpathy/nanoGPT and pass "
                         "--nanogpt_dir=PATH (or set NANOGPT_DIR)")
    if not text_file or not os.path.exists(text_file):
        raise SystemExit("pass --text_file=PATH/input.txt (tinyshakespeare); nothing is downloaded")
    work = tempfile.mkdtemp(prefix='time_to_loss_')
    try:
        # the same text for both: nanoGPT's prepare.py reads input.txt beside it
        data_dir = os.path.join(nanogpt_dir, 'data', 'shakespeare_char')
        if not os.path.exists(os.path.join(data_dir, 'input.txt')):
            shutil.copy(text_file, os.path.join(data_dir, 'input.txt'))
        subprocess.run([sys.executable, 'prepare.py'], cwd=data_dir, check=True, capture_output=True)
        subprocess.run([sys.executable, 'prepare.py', '--dataset=shakespeare_char', f'--sources={text_file}',
                        '--tokenizer_type=char', f'--data_root={work}/data'], cwd=ROOT, check=True, capture_output=True)

        theirs, theirs_total = timed_evals([sys.executable, 'train.py', *NANOGPT_ARGS, f'--out_dir={work}/nanogpt'],
                                           nanogpt_dir, r'^step (\d+): train loss [\d.]+, val loss ([\d.]+)')
        if not theirs:
            raise SystemExit("no evaluations parsed from nanoGPT's train.py output")
        target = theirs[-1][2]
        t_theirs, step_theirs, _ = first_at_or_below(theirs, target)
        print(f"{threads} threads; target: nanoGPT's final val loss {target:.4f}")
        print(f"nanoGPT: reaches it at step {step_theirs} in {t_theirs:.1f} s (whole run {theirs_total:.1f} s)")

        ours_cmd = [sys.executable, 'train.py', 'config/shakespeare_char.py', f'--data_root={work}/data']
        pattern = r'^step (\d+): val/loss ([\d.]+)'
        ours, ours_total = timed_evals([*ours_cmd, f'--eval_interval={eval_interval}', f'--out_dir={work}/ours'],
                                       ROOT, pattern)
        if not ours:
            raise SystemExit("no evaluations parsed from our train.py output")
        crossing = first_at_or_below(ours, target)
        if crossing is None:
            print(f"ours: never reaches it (best {min(l for _, _, l in ours):.4f}; whole run {ours_total:.1f} s)")
            return
        t_often, step_ours, _ = crossing
        print(f"ours, evaluating every {eval_interval} steps: first at or below it at step {step_ours} in {t_often:.1f} s "
              f"(whole run {ours_total:.1f} s, final val {ours[-1][2]:.4f}): {t_often / t_theirs:.2f}x")
        stopped, _ = timed_evals([*ours_cmd, f'--max_iters={step_ours}', f'--out_dir={work}/ours_stopped'], ROOT, pattern)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t_ours, step, loss = stopped[-1]
    if step != step_ours or loss > target:
        raise SystemExit(f"the run stopped at step {step_ours} evaluated {loss:.4f} at step {step}, not the first run's "
                         f"{crossing[2]:.4f}: training is not deterministic here; use the first run's figure")
    print(f"ours, its config's evaluations, stopped at step {step_ours}: val {loss:.4f} in {t_ours:.1f} s")
    print(f"time to nanoGPT's final val loss: ours takes {t_ours / t_theirs:.2f}x nanoGPT's wall time")


if __name__ == '__main__':
    main()
