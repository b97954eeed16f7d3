"""Run under `torchrun --standalone --nproc_per_node 2` by test_equivalence.py (gloo on CPU):

    python -m torch.distributed.run ... tests/ddp_scripts.py JOBS.json

JOBS.json: a list of [script module, argv, patch]. Each job is the script's own main(argv), as
`python script.py argv` under torchrun runs it, one after the other in one process group (two processes
that import torch once, not once a job). `patch` names one of PATCHES (or is null), applied for that job
only, as the test applies it to its one-process run. Each job's exit code, message and seconds land in
<its --run_dir>/exit.json (written by the first process)."""
import contextlib
import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from machinery.options import UserError  # noqa: E402


@contextlib.contextmanager
def convlarge_without_dropout():
    """ConvLarge without its channel dropout. Dropout draws its masks from each process's global random
    state, which is the same on every process (seeded alike, for the shared draws: mixup's lambda, the
    weights), for that process's rows only: two processes of B rows draw the same B masks twice, one
    process of 2B rows draws 2B masks. No seed makes those equal."""
    from machinery import models
    import train_meta_semi
    saved = train_meta_semi.semi_network
    train_meta_semi.semi_network = lambda arch, n, width=1.0: (models.ConvLarge(n, width, stochastic=False)
                                                                if arch == 'convlarge' else saved(arch, n, width))
    try:
        yield
    finally:
        train_meta_semi.semi_network = saved


PATCHES = {'convlarge_without_dropout': convlarge_without_dropout}


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    dist.init_process_group = lambda *a, **kw: None     # each Run joins the group made here
    os.chdir(ROOT)
    for module, argv, patch in jobs:
        code, message, start = 0, '', time.perf_counter()
        try:
            with PATCHES[patch]() if patch else contextlib.nullcontext():
                importlib.import_module(module).main(argv)
        except UserError as e:
            code, message = e.exit_code, str(e)
        dist.barrier()
        if dist.get_rank() == 0:
            run_dir = argv[argv.index('--run_dir') + 1]
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, 'exit.json'), 'w') as f:
                json.dump({'code': code, 'message': message, 'seconds': time.perf_counter() - start}, f)
    dist.barrier()                    # leave together, without tearing the group down (see utils.run_main)
    sys.stdout.flush()
    os._exit(0)


if __name__ == '__main__':
    main()
