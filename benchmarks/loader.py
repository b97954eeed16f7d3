"""The ImageNet input pipeline alone beside the training step it feeds, in images per second, so a reader
sees which one bounds an epoch.

Loader rows: large_datasets.Batches (the scripts' own pipeline) over JPEGs of ImageNet's typical size
(500 x 375 or 375 x 500, quality 90, written here), MetaSemi's training transform (random-resized crop of
area 0.1-1 and aspect 0.8-1.25 to --size, flip) or the evaluation one; decoding and augmenting in 0, 1,
2, ... DataLoader workers on the CPU ('cpu'; workers 0 = the main process alone: the figure per CPU core)
and, on CUDA, with nvJPEG in batches on the GPU ('gpu'). Step rows: the MetaSemi ImageNet step
(train_meta_semi.train_step, meta + mixup, labeled + unlabeled batch) and the labeled-only baseline on
torchvision's ResNet-18 at --size, a batch already on the device. The projection: seconds per ImageNet
epoch (1,281,167 images, 10% labeled; meta: an epoch is a pass over the 1,153,050 unlabeled images) on
one process, from max(step, loader) per step; for 8 GPUs divide by 8 (each has its own loader).

    python benchmarks/loader.py                         # CPU: batch 16, small step figures (about 3 minutes)
    python benchmarks/loader.py --device cuda --batch 64 --workers 0,4,8,15 --json out.json

Timings are only meaningful on an otherwise idle machine.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machinery import large_datasets as cd  # noqa: E402
import train_meta_semi  # noqa: E402
from machinery.distributed import pick_device  # noqa: E402
from machinery.models import torchvision_resnet  # noqa: E402
from machinery.options import spellings  # noqa: E402

IMAGENET_TRAIN, IMAGENET_UNLABELED = 1_281_167, 1_153_050


def write_jpegs(folder, n, classes=10, seed=0):
    """n JPEGs of ImageNet's typical sizes in train/<class>/ (content: the stand-in's pictures)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(n):
        c = k % classes
        h, w = (375, 500) if k % 3 else (500, 375)
        path = os.path.join(folder, 'train', f'n{c:08d}', f'{k}.JPEG')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(cd.synthetic_picture(c, classes, h, w, rng)).save(path, 'JPEG', quality=90)
    return cd.image_folder(os.path.join(folder, 'train'))


def loader_rate(files, device, batch, workers, decode_on, train, size, batches):
    aug = (cd.Augment(True, size, scale=(0.1, 1.0), ratio=(0.8, 1.25)) if train else cd.Augment(False, size))
    plan = cd.BatchPlan(np.arange(len(files)), batch, 0, 'cycle')
    stream = cd.Batches(files, plan, aug, device, 0, 0, batches + 2, workers=workers, decode_on=decode_on)
    it = iter(stream)
    for _ in range(2):                        # workers started, first batches in flight
        next(it)
    sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    sync(device)
    return batches * batch / (time.perf_counter() - t)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def step_rate(device, batch, size, baseline, steps):
    torch.manual_seed(0)
    model = torchvision_resnet('resnet18', 1000).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x_l, x_u = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    y_l, y_u = (torch.randint(0, 1000, (batch,), device=device) for _ in range(2))
    lam = torch.distributions.Beta(1.0, 1.0).sample((batch, 1)).to(device)
    times = []
    for k in range(steps + 2):
        sync(device)
        t = time.perf_counter()
        if baseline:
            train_meta_semi.train_step(model, opt, x_l, y_l, None, None, None, 0.1, 1.0, 0.01, 1000, baseline=True)
        else:
            train_meta_semi.train_step(model, opt, x_l, y_l, x_u, y_u, lam, 0.1, 1.0, 0.01, 1000)
        sync(device)
        if k >= 2:
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return seconds, (1 if baseline else 2) * batch / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='auto')
    p.add_argument('--batch', *spellings('batch_size'), dest='batch', type=int, default=0, help='images per batch (default: 64 on CUDA, 16 on the CPU)')
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--workers', default='0,1,2', help='worker counts of the CPU-decoding rows')
    p.add_argument('--images', type=int, default=128, help='JPEGs written (the loader cycles over them)')
    p.add_argument('--batches', type=int, default=6, help='batches timed per loader row')
    p.add_argument('--steps', type=int, default=3, help='steps timed per step row (median)')
    p.add_argument('--json', default='')
    args = p.parse_args(argv)
    device = pick_device(args.device)
    batch = args.batch or (64 if device.type == 'cuda' else 16)
    torch.set_num_threads(1 if device.type == 'cpu' else torch.get_num_threads())
    out = {'device': str(device), 'gpu': torch.cuda.get_device_name() if device.type == 'cuda' else None,
           'torch': torch.__version__, 'cpu_cores': os.cpu_count(), 'platform': platform.platform(),
           'batch': batch, 'size': args.size, 'date': time.strftime('%Y-%m-%d'), 'loader': [], 'step': []}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(tmp, args.images)
        rows = [('cpu', int(w), True) for w in args.workers.split(',')] + [('cpu', 0, False)]
        if device.type == 'cuda':
            rows += [('gpu', int(w), True) for w in args.workers.split(',')]
        for decode_on, workers, train in rows:
            rate = loader_rate(files, device, batch, workers, decode_on, train, args.size, args.batches)
            out['loader'].append(dict(decode_on=decode_on, workers=workers, transform='train' if train else 'eval',
                                      images_per_s=rate))
            print(f'loader  decode on {decode_on:3s}  {workers:2d} workers  {"train" if train else "eval ":5s}  '
                  f'{rate:8.1f} images/s', flush=True)
    for baseline in (False, True):
        seconds, rate = step_rate(device, batch, args.size, baseline, args.steps)
        name = 'baseline' if baseline else 'meta+mixup'
        out['step'].append(dict(step=name, seconds=seconds, images_per_s=rate))
        print(f'step    ResNet-18 {name:10s} batch {batch}{"" if baseline else " + " + str(batch)}  '
              f'{seconds:.3f} s/step  {rate:8.1f} images/s', flush=True)
    best = max(r['images_per_s'] for r in out['loader'] if r['transform'] == 'train')
    for s in out['step']:
        images = IMAGENET_TRAIN // 10 if s['step'] == 'baseline' else IMAGENET_UNLABELED
        per_image = max(1 / s['images_per_s'], 1 / best) * (1 if s['step'] == 'baseline' else 2)
        s['epoch_seconds_1_process'] = images * per_image
        bound = 'the step' if s['images_per_s'] < best else 'the loader'
        print(f'epoch   {s["step"]:10s} one process: {images * per_image / 3600:.2f} h '
              f'(8 processes: {images * per_image / 8 / 3600:.2f} h); bound by {bound}')
        s['bound_by'] = bound
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
