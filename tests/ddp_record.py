"""A script run as `python SCRIPT.py ARGS` under torchrun would run, that also tells the test what each
process did: used by test_distributed.py as

    torchrun ... tests/ddp_record.py OUT_DIR SCRIPT.py ARGS

Each process writes OUT_DIR/pid<rank> (its process id) when it starts and OUT_DIR/rank<rank>.json when it
leaves: its exit code and how many training steps it ran. With RECORD_POISON=<rank>:<step>, that process's
step <step> (counted from 1 in this run) reports a NaN loss, as if its share of the batch had diverged; its
weights and the other processes are untouched."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import run_main  # noqa: E402

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get('RANK', '0'))
with open(os.path.join(out, f'pid{rank}'), 'w') as f:
    f.write(str(os.getpid()))
module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
step, steps = module.train_step, []
poison = os.environ.get('RECORD_POISON', '')
poison_rank, poison_step = map(int, poison.split(':')) if poison else (-1, -1)


def counted_step(*a, **kw):
    steps.append(1)
    sums = step(*a, **kw)
    if rank == poison_rank and len(steps) == poison_step:
        key = next(iter(sums))
        sums = dict(sums) | {key: sums[key] * float('nan')}
    return sums


module.train_step = counted_step
real_exit = os._exit


def recorded_exit(code):
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump({'code': code, 'steps': len(steps)}, f)
    real_exit(code)


os._exit = recorded_exit                 # run_main leaves a torchrun job with os._exit(code)
run_main(module.main, args)
