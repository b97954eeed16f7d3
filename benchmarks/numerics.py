"""How exact the meta-gradients are: the relative error against float64 of MetaSemi's finite-difference
G (ConvLarge; ResNet-18 at 224 px) and of MAXL's generator gradient (first order by finite differences,
second order exact), each computed by the scripts' own functions from the same initial weights and batch.

Settings: float32 with the device's default TF32 state (PyTorch's: cuDNN convolutions may use TF32 on
GPUs since Ampere), float32 with --tf32 false, and --amp (the bf16 fast path). Each is computed as the
scripts compute it (the meta steps in float32 whatever --amp says, the finite differences in strict
float32 whatever --tf32 says) and without that guard (what the scripts computed before it), so the size
of the bf16 and TF32 effects shows. The error is ||g - g_ref|| / ||g_ref|| over all entries, against
float64 and against plain strict float32 (the papers' precision).

    .venv/bin/python benchmarks/numerics.py                     # CPU: smaller batches (about 2 minutes)
    python benchmarks/numerics.py --device cuda --json numerics.json       # the sizes of the GPU check
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import model_vgg_maxl  # noqa: E402
import train_meta_semi  # noqa: E402
from machinery.fast_paths import fast_module, strict_float32  # noqa: E402
from machinery.models import semi_network, torchvision_resnet  # noqa: E402
from machinery.options import spellings  # noqa: E402

# case: (network, image size, batch on CUDA, batch on the CPU)
CASES = {
    'semi_G_convlarge': ('convlarge', 32, 128, 32),
    'semi_G_resnet18': ('resnet18', 224, 64, 4),
    'maxl_first_order': ('vgg16', 32, 100, 16),
    'maxl_second_order': ('vgg16', 32, 100, 16),
}


def no_guard(*nets, strict=False):
    """In place of fast_paths.float32_meta: the region runs as the network's fast paths say."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def unguarded():
    """The meta steps without their float32 guard (as they ran before it)."""
    off = no_guard
    saved = model_vgg_maxl.float32_meta, train_meta_semi.float32_meta
    model_vgg_maxl.float32_meta = train_meta_semi.float32_meta = off
    try:
        yield
    finally:
        model_vgg_maxl.float32_meta, train_meta_semi.float32_meta = saved


def tf32_state(tf32):
    """PyTorch's default TF32 state (tf32=True, as the scripts leave it) or strict float32 (--tf32 false)."""
    return contextlib.nullcontext() if tf32 else strict_float32()


def make_case(name, device, batch, width):
    """(networks, inputs, compute(networks, inputs, dtype) -> list of tensors) for one case."""
    arch, size, _, _ = CASES[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name.startswith('semi'):
        classes = 10 if arch == 'convlarge' else 1000
        net = semi_network(arch, classes, width) if arch == 'convlarge' else torchvision_resnet(arch, classes, width)
        inputs = dict(x=torch.randn(batch, 3, size, size, generator=g), x_u=torch.randn(batch, 3, size, size, generator=g),
                      y=torch.randint(0, classes, (batch,), generator=g))

        def compute(nets, inp, dtype):
            _, G, _, _ = train_meta_semi.pseudo_label_gradient(nets[0], inp['x'], inp['y'], inp['x_u'], 1e-2)
            return [G]
        return [net.to(device)], inputs, compute
    psi = model_vgg_maxl.HYPERPARAMETERS['psi']
    nets = [model_vgg_maxl.multi_task_network(psi, width).to(device), model_vgg_maxl.label_generator(psi, width).to(device)]
    inputs = dict(x=torch.randn(batch, 3, size, size, generator=g), y=torch.randint(0, len(psi), (batch,), generator=g))

    def compute(nets, inp, dtype):
        net, gen = nets
        optimizer = torch.optim.SGD(net.parameters(), lr=model_vgg_maxl.HYPERPARAMETERS['lr'])
        mask = model_vgg_maxl.psi_mask(psi, inp['x'].device, dtype)
        if name == 'maxl_first_order':
            grads, _ = model_vgg_maxl.meta_gradient_first_order(net, gen, inp['x'], inp['y'], mask, optimizer, 0.2, 0.01)
        else:
            grads, _ = model_vgg_maxl.meta_gradient_second_order(net, gen, inp['x'], inp['y'], mask, optimizer, 0.2)
        return list(grads)
    return nets, inputs, compute


def relative_error(got, ref):
    num = sum(((a.double() - b) ** 2).sum() for a, b in zip(got, ref))
    den = sum((b ** 2).sum() for b in ref)
    return float((num / den).sqrt())


def measure(name, device, batch, width):
    nets, inputs, compute = make_case(name, device, batch, width)

    def run(dtype, amp=False):
        copies = [copy.deepcopy(n).to(dtype) for n in nets]
        if amp:
            copies = [fast_module(n, device, amp=True) for n in copies]
        inp = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        return [t.detach() for t in compute(copies, inp, dtype)]

    ref = run(torch.float64)
    with tf32_state(False):
        strict = run(torch.float32)                   # plain strict float32: the second reference
    against = {'float64': ref, 'strict float32': [t.double() for t in strict]}
    out = {k: {} for k in against}
    settings = [('float32', True, False), ('amp', True, True)]
    if device.type == 'cuda':
        settings.insert(1, ('float32 --tf32 false', False, False))
    for label, tf32, amp in settings:
        for guard in ('', ' (unguarded)'):
            with tf32_state(tf32), (unguarded() if guard else contextlib.nullcontext()):
                got = run(torch.float32, amp)
            for k, r in against.items():
                out[k][label + guard] = relative_error(got, r)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--only', default='', help='comma-separated cases (default all): ' + ', '.join(CASES))
    p.add_argument('--batch', *spellings('batch_size'), dest='batch', type=int, default=0, help='batch of every case (default: the table above)')
    p.add_argument('--width', type=float, default=1.0, help='channel multiplier of every network')
    p.add_argument('--json', default='')
    args = p.parse_args()
    device = torch.device(args.device)
    names = [n for n in args.only.split(',') if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.exit(2, f'error: unknown cases {unknown}; choose from {", ".join(CASES)}\n')
    torch.backends.cudnn.benchmark = False
    results = {'device': str(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
               'torch': torch.__version__, 'width': args.width, 'cases': {}}
    for name in names:
        batch = args.batch or CASES[name][2 if device.type == 'cuda' else 3]
        start = time.perf_counter()
        errors = measure(name, device, batch, args.width)
        results['cases'][name] = dict(batch=batch, image_size=CASES[name][1], errors=errors,
                                      seconds=time.perf_counter() - start)
        print(f'{name} (batch {batch}, {CASES[name][1]} px, width {args.width}), relative error', flush=True)
        for against, row in errors.items():
            print(f'  against {against}: ' + ', '.join(f'{k} {v:.2e}' for k, v in row.items()), flush=True)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
