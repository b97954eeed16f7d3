"""Ratios of step times measured in pairs, so that the machine's drift cancels.

bench.py times each row in its own process; on a shared machine whose speed drifts over minutes its
separate rows can disagree by 1.5x. Here one process builds two steps and alternates them (A, B, A, B,
...); a ratio is the median over pairs of (time A / time B) (maxl_train: total A / total B over whole
cycles of its sampled cosine, since the goal is on average).

    python benchmarks/speedup.py                  # fast paths vs float32: bare_vgg, single, bare_vgg_mt, bare_convlarge
    python benchmarks/speedup.py --goals          # each goal row of bench.py's ROWS vs its reference row, float32
    python benchmarks/speedup.py --goals --amp --channels-last
    python benchmarks/speedup.py --rows bare_vgg --compile --pairs 12
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (also puts the repository root on sys.path)
from machinery.options import spellings  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', default='', help='rows of bench.py, comma-separated (default: see above)')
    p.add_argument('--goals', action='store_true',
                   help='pair each goal row with its reference row (both with the flags given; none: float32)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', action='store_true', help='bf16 autocast (without --goals: default on with '
                                                      'channels-last when no flag is given)')
    p.add_argument(*spellings('channels_last'), action='store_true')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--pairs', type=int, default=8, help='timed pairs per row (after 2 warm-up pairs)')
    p.add_argument(*spellings('data_root'), default=os.path.join(bench.ROOT, 'dataset'))
    args = p.parse_args()
    import torch
    from machinery.distributed import pick_device
    dev = pick_device(args.device)
    fast = dict(amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    if not args.goals and not any(fast.values()):
        fast.update(amp=True, channels_last=True)
    flags = '+'.join(k for k, v in fast.items() if v) or 'float32'
    f32 = dict(amp=False, channels_last=False, compile=False)
    names = [r for r in args.rows.split(',') if r]
    bad = [n for n in names if n not in bench.ROWS or (args.goals and not bench.ROWS[n][3])]
    if bad:
        p.exit(2, f'error: rows {bad} are unknown{" or have no goal" if args.goals else ""}; choose from '
                  f'{", ".join(n for n, row in bench.ROWS.items() if row[3] or not args.goals)}\n')
    if args.goals:
        names = names or [n for n, row in bench.ROWS.items() if row[3]]
        pairs = [(n, fast, bench.ROWS[n][3][0], fast) for n in names]
        print(f'{flags}: each row against its goal\'s reference row, alternating\n')
        print('| row | s/step | reference | s/step | ratio (paired) | goal |')
        print('|---|---|---|---|---|---|')
    else:
        names = names or ['bare_vgg', 'single', 'bare_vgg_mt', 'bare_convlarge']
        pairs = [(n, f32, n, fast) for n in names]
        print(f'| row | float32 s/step | {flags} s/step | speed-up (paired) |')
        print('|---|---|---|---|')
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    out = {}
    for a, fast_a, b, fast_b in pairs:
        torch.manual_seed(0)
        steps = [bench.build(a, dev, fast_a, args.data_root), bench.build(b, dev, fast_b, args.data_root)]
        n = bench.timed_steps(a, args.pairs)
        times = [[], []]
        for i in range(n + 2):
            for k, step in enumerate(steps):
                sync()
                t = time.perf_counter()
                step()
                sync()
                if i >= 2:
                    times[k].append(time.perf_counter() - t)
        if a == 'maxl_train':
            ratio = sum(times[0]) / sum(times[1])
        else:
            ratio = statistics.median(x / y for x, y in zip(*times))
        ta, tb = statistics.median(times[0]), statistics.median(times[1])
        if args.goals:
            at_most = bench.ROWS[a][3][1]
            out[a] = dict(versus=b, times_s=times, ratio=ratio, at_most=at_most, met=ratio <= at_most)
            print(f'| {a} | {ta:.3f} | {b} | {tb:.3f} | {ratio:.2f}x | <= {at_most}x: '
                  f'{"met" if ratio <= at_most else "MISSED"} |', flush=True)
        else:
            out[a] = dict(times_s=times, speedup=ratio)
            print(f'| {a} | {ta:.3f} | {tb:.3f} | {ratio:.2f}x |', flush=True)
    kind = 'goals' if args.goals else 'speedup'
    path = os.path.join(bench.ROOT, 'benchmarks', 'results', f'{kind}-{dev.type}-{flags}.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(dict(device=str(dev), torch=torch.__version__, flags=flags, pairs=args.pairs, kind=kind, rows=out), f, indent=1)
    print(f'written to {path}')


if __name__ == '__main__':
    main()
