"""Run a stage script as torchrun runs it, and report what the tests cannot see from outside:
how many all-reduces each rank made (the stop votes are the only MAX ones; `max_blocking` counts
those that were not asynchronous) and a digest of the
rank's torch random state at exit. Writes $PROBE_DIR/rank<R>.json.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py sft.py --key=value ...
"""

import hashlib
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402 (the stage script imports this same module)
counts = {'max': 0, 'max_blocking': 0, 'other': 0}
_all_reduce = dist.all_reduce


def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
    counts['max' if op == dist.ReduceOp.MAX else 'other'] += 1
    counts['max_blocking'] += op == dist.ReduceOp.MAX and not kwargs.get('async_op')
    return _all_reduce(tensor, op, *args, **kwargs)


def report():
    rank = os.environ.get('RANK', '0')
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    with open(os.path.join(os.environ['PROBE_DIR'], f'rank{rank}.json'), 'w') as f:
        json.dump({'all_reduce_max': counts['max'], 'all_reduce_max_blocking': counts['max_blocking'],
                   'all_reduce_other': counts['other'], 'rng': digest}, f)


def reporting_cleanup(ddp, _cleanup=common.cleanup_distributed):
    report()  # a stage under torchrun leaves by os._exit after this: atexit handlers would not run
    _cleanup(ddp)


dist.all_reduce = counting_all_reduce
common.cleanup_distributed = reporting_cleanup
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(REPO, script), run_name='__main__')
