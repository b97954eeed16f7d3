"""Run under `torchrun --standalone --nproc_per_node 2` by test_distributed.py (gloo on CPU).

    python -m torch.distributed.run ... tests/ddp_worker.py REFERENCE.pt OUT.json

1. Every case of ddp_cases.py, float64, SyncBatchNorm, each process on its half of the global batch:
   the relative difference to the one-process reference on the whole batch (REFERENCE.pt).
2. Every case for three steps in float32 with each script's default (no SyncBatchNorm; MetaSemi's meta
   step per process): whether the processes' parameters are bit-identical afterwards.
The first process writes OUT.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_cases  # noqa: E402
from test_pinned_runs import weights_digest  # noqa: E402
from machinery.distributed import convert_sync_bn, wrap_ddp  # noqa: E402


def main():
    reference_path, out_path = sys.argv[1:3]
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = torch.load(reference_path, weights_only=True)
    def share(t):
        n = len(t)
        return t[rank * n // world:(rank + 1) * n // world]

    def ddp(sync_bn):
        return lambda net: wrap_ddp(net, torch.device('cpu'), sync_buffers=not sync_bn)

    result = {'union': {}, 'identical': {}}
    for name in ddp_cases.CASES:
        got = ddp_cases.run_case(name, share, prepare=convert_sync_bn, forward_of=ddp(True))
        ref = reference[name]
        groups = {}                 # relative error of each group of tensors taken together: the networks'
        for k in ref:               # parameters and buffers ('0.', '1.'), the generator gradient, the cosine
            if ref[k].is_floating_point():
                groups.setdefault(k.split('.')[0], []).append(k)
        errors = {}
        for g, keys in groups.items():
            a, b = (torch.cat([t[k].reshape(-1) for k in keys]) for t in (got, ref))
            errors[g] = ((a - b).norm() / b.norm()).item()
        worst = max(errors, key=errors.get)
        result['union'][name] = {'max_relative_error': errors[worst], 'where': worst,
                                 'compared': sum(map(len, groups.values()))}

    for name in ddp_cases.CASES:
        got = ddp_cases.run_case(name, share, forward_of=ddp(False), dtype=torch.float32, global_d=False, steps=3,
                                 seed=rank * 100)          # different data on each process
        params = {k: v for k, v in got.items() if 'running' not in k and 'num_batches' not in k}
        digests = [None] * world
        dist.all_gather_object(digests, weights_digest(params))
        result['identical'][name] = len(set(digests)) == 1
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(result, f, indent=1)
    dist.barrier()                    # leave together, without tearing the group down (see utils.run_main)
    sys.stdout.flush()
    os._exit(0)


if __name__ == '__main__':
    main()
