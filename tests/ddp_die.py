"""train_meta_semi.py whose second process dies (os._exit(3)) at its third step, first writing the time of
its death (time.time()) into the file $DDP_DIE_STAMP: used by test_distributed.py to check that torchrun
takes the whole job down instead of leaving the first process waiting."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_meta_semi  # noqa: E402
from utils import run_main  # noqa: E402

step = train_meta_semi.train_step
calls = []


def dying_step(*args, **kwargs):
    calls.append(1)
    if os.environ.get('RANK') == '1' and len(calls) == 3:
        with open(os.environ['DDP_DIE_STAMP'], 'w') as f:
            f.write(repr(time.time()))
        os._exit(3)
    return step(*args, **kwargs)


train_meta_semi.train_step = dying_step
run_main(train_meta_semi.main, sys.argv[1:])
