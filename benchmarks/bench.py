"""Seconds per training step of every method, measured on the scripts' own step functions.

For each row: median (and mean) seconds per step after warm-up, images per second, peak memory, the
floating-point operations of one step (counted once per row, on one untimed step, with
torch.utils.flop_counter: matrix products and convolutions, forward and backward) and the TFLOP/s achieved,
and the ratio to the bare forward + backward + SGD step of the same backbone at the same batch (cross-entropy,
plain SGD, a batch already on the device; for sla_rotation the 4 x 128 images it runs, for the MetaSemi rows
128 images, half of their 128 + 128). A script step includes what its loop does per step: drawing
and augmenting the batch on the device, the step function, the optimiser. The eval_* rows are one batch of
the scripts' own evaluation functions (eval mode, no gradients) on test images. Full widths and the
originals' batch sizes, on the synthetic stand-in. Each row runs in its own process (clean peak memory and
compile caches).

--concurrent 1,2,4 starts that many copies of each row at once (separate processes on the same device, as
several seeds run side by side), lines their timed steps up after warm-up, and reports the aggregate
images/s and TFLOP/s over the span from the first copy's first timed step to the last copy's last.

    python benchmarks/bench.py                                  # float32 on the CPU (about 8 minutes)
    python benchmarks/bench.py --amp --channels-last            # the fast paths
    python benchmarks/bench.py --device cuda --amp --channels-last --compile
    python benchmarks/bench.py --only single,maxl_train --steps 10
    python benchmarks/bench.py --device cuda --tf32 false                # strict float32 (TF32 off)
    python benchmarks/bench.py --device cuda --only single --concurrent 1,2,4 --steps 50

Writes the table to stdout and everything to benchmarks/results/<device>-<flags>.json (or --json), which
benchmarks/project.py and reproduce.py list project full runs from; benchmarks/speedup.py builds its rows'
steps from here.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (backbone of the bare step it is compared with, what one step's images are counted in (see
# images_per_step), the original's s/step on a 2-core CPU, goal as (reference row, largest
# ratio) or None)
ROWS = {
    'bare_vgg':            ('bare_vgg', 'maxl', None, None),
    'single':              ('bare_vgg', 'maxl', 1.15, ('bare_vgg', 1.1)),
    'bare_vgg_mt':         ('bare_vgg_mt', 'maxl', None, None),
    'human':               ('bare_vgg_mt', 'maxl', 1.10, ('bare_vgg_mt', 1.1)),
    'maxl_train':          ('bare_vgg_mt', 'maxl', 3.47, ('bare_vgg_mt', 1.4)),
    'maxl_meta2':          ('bare_vgg_mt', 'maxl', 5.65, ('bare_vgg_mt', 4.0)),
    'maxl_meta2_dbl':      ('bare_vgg_mt', 'maxl', 5.65, ('bare_vgg_mt', 4.0)),   # second_order='double_backward'
    'maxl_meta1':          ('bare_vgg_mt', 'maxl', 5.33, ('bare_vgg_mt', 4.0)),
    'bare_resnet32':       ('bare_resnet32', 'sla', None, None),
    'sla_baseline':        ('bare_resnet32', 'sla', 0.41, None),
    'bare_resnet32_x4':    ('bare_resnet32_x4', 'sla_x4', None, None),     # the 4 x 128 images a rotation step runs
    'sla_rotation':        ('bare_resnet32_x4', 'sla', 2.04, ('sla_baseline', 4.4)),
    'bare_convlarge':      ('bare_convlarge', 'semi', None, None),
    'semi_baseline_mixup': ('bare_convlarge', 'semi_pair', 6.40, None),
    'semi_meta_mixup':     ('bare_convlarge', 'semi_pair', 16.2, ('semi_baseline_mixup', 2.5)),
    # one batch of each script's evaluation (what benchmarks/project.py adds to a run)
    'eval_maxl':           ('bare_vgg_mt', 'maxl', None, None),      # model_vgg_single.evaluate, multi-task VGG-16, 100 test images
    'eval_sla':            ('bare_resnet32_x4', 'sla', None, None),  # train_sla.evaluate, 128 test images x 4 rotations
    'eval_semi':           ('bare_convlarge', 'semi_test', None, None),   # train_meta_semi.evaluate, 100 test images
}


def images_per_step(kind):
    """Images of one step, from the scripts' own batch sizes: MAXL's batch, SLA's source images (x4: the
    rotated copies a rotation step runs), MetaSemi's labeled batch (pair: labeled + unlabeled; test: its
    evaluation batch)."""
    import model_vgg_maxl
    import train_meta_semi
    import train_sla
    maxl, sla, semi = (m.HYPERPARAMETERS['batch_size'] for m in (model_vgg_maxl, train_sla, train_meta_semi))
    return {'maxl': maxl, 'sla': sla, 'sla_x4': 4 * sla, 'semi': semi, 'semi_pair': 2 * semi,
            'semi_test': train_meta_semi.HYPERPARAMETERS['test_batch_size']}[kind]


# ---- one row, in a child process ---------------------------------------------------------------------

def build(name, dev, fast, data_root, width=1.0):
    """Returns step(): one training step of row `name` as its script runs it."""
    import torch
    import torch.nn.functional as F
    import create_dataset
    import model_vgg_human
    import model_vgg_maxl
    import model_vgg_single
    import train_meta_semi
    import train_sla
    from machinery.distributed import Wrapped, distributed, wrap_ddp
    from machinery.fast_paths import fast_module
    from machinery.models import VGG16, cifar_resnet, semi_network
    from machinery.options import parse_config
    from machinery.streams import CycledBatches, DeviceData, SampledBatches, device_generator

    def defaults(module):       # a script's hyperparameters and run options, as a run without flags has them
        cfg = parse_config(module.HYPERPARAMETERS, [])[0]
        cfg.width = cfg.width * width           # --width: every network narrower (a quick check of the plumbing)
        return cfg
    single, human, maxl = defaults(model_vgg_single), defaults(model_vgg_human), defaults(model_vgg_maxl)
    sla, semi = defaults(train_sla), defaults(train_meta_semi)

    def fast_net(net, methods=('forward',)):
        return fast_module(net.to(dev), dev, methods=methods, **fast)

    def wrap(net):              # the training forward: under torchrun through DistributedDataParallel
        return wrap_ddp(net, dev) if distributed() else Wrapped(net)

    def bare(net, x, ys):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        forward = wrap(net)

        def step():
            out = forward(x)
            out = (out,) if torch.is_tensor(out) else out
            loss = sum(F.cross_entropy(o, y) for o, y in zip(out, ys))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    rng = device_generator(dev, 0)
    if name in ('bare_vgg', 'single', 'bare_vgg_mt', 'human', 'eval_maxl') or name.startswith('maxl'):
        train = DeviceData(*create_dataset.load('cifar100', data_root, True, synthetic=True), dev,
                           create_dataset.HIERARCHY_MEAN, create_dataset.HIERARCHY_STD)

        levels = create_dataset.LEVEL_CLASSES
        pri, aux = human.primary_level, human.aux_level

        def batch():
            return train.get(torch.randint(len(train), (maxl.batch_size,), device=dev, generator=rng), rng,
                             augment=True)
        x, labels = batch()
        if name == 'eval_maxl':              # one batch of the test pass (model_vgg_single.evaluate), primary head scored
            test_x, test_y = create_dataset.load('cifar100', data_root, False, synthetic=True)
            test = DeviceData(test_x[:maxl.batch_size], test_y[:maxl.batch_size], dev,
                                             model_vgg_maxl.MEAN, model_vgg_maxl.STD)
            net = fast_net(model_vgg_maxl.multi_task_network(maxl.psi, maxl.width))
            return lambda: model_vgg_single.evaluate(net, test, (maxl.primary_level,), maxl.batch_size)
        if name == 'bare_vgg':
            return bare(fast_net(VGG16({'classifier': levels[pri]}, maxl.width)), x, [labels[:, pri]])
        if name == 'bare_vgg_mt':
            return bare(fast_net(VGG16({'classifier1': levels[pri], 'classifier2': levels[aux]}, maxl.width)), x,
                        [labels[:, pri], labels[:, aux]])
        if name == 'single':
            net = fast_net(VGG16({'classifier': levels[single.primary_level]}, single.width))
            optimizer, forward = torch.optim.SGD(net.parameters(), lr=single.lr), wrap(net)

            def step():
                x, labels = batch()
                model_vgg_single.train_step(forward, x, labels[:, single.primary_level], optimizer)
            return step
        if name == 'human':
            net = fast_net(VGG16({'classifier1': levels[pri], 'classifier2': levels[aux]}, human.width))
            optimizer, forward = torch.optim.SGD(net.parameters(), lr=human.lr), wrap(net)

            def step():
                x, labels = batch()
                model_vgg_human.train_step(forward, x, labels[:, pri], labels[:, aux], optimizer)
            return step
        gen = fast_net(model_vgg_maxl.label_generator(maxl.psi, maxl.width))
        net = fast_net(model_vgg_maxl.multi_task_network(maxl.psi, maxl.width))
        forward = wrap(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=maxl.lr)
        gen_optimizer = torch.optim.SGD(gen.parameters(), lr=maxl.gen_lr, weight_decay=maxl.gen_weight_decay)
        mask, heads = model_vgg_maxl.psi_mask(maxl.psi, dev), model_vgg_maxl.head_parameter_names(net)
        counter = [0]
        cos_every = maxl.cos_every
        meta_cfg = parse_config(model_vgg_maxl.HYPERPARAMETERS, [            # the meta step of this row
            '--meta_order', '1' if name == 'maxl_meta1' else '2',
            '--second_order', 'double_backward' if name == 'maxl_meta2_dbl' else maxl.second_order])[0]

        def step():
            x, labels = batch()
            y = labels[:, maxl.primary_level]
            if name == 'maxl_train':
                model_vgg_maxl.train_step(net, gen, x, y, mask, optimizer, heads, counter[0] % cos_every == 0,
                                          forward)
                counter[0] += 1
                return
            model_vgg_maxl.meta_step(net, gen, x, y, mask, optimizer, gen_optimizer, meta_cfg)
        return step

    if name in ('bare_resnet32', 'bare_resnet32_x4', 'sla_baseline', 'sla_rotation', 'eval_sla'):
        train = DeviceData(*create_dataset.load(sla.dataset, data_root, True, synthetic=True), dev,
                                          train_sla.MEAN, train_sla.STD)
        classes, rotation = create_dataset.DATASETS[sla.dataset].num_classes, train_sla.Transformations('rotation', dev)
        if name == 'bare_resnet32':
            x, y = SampledBatches(train, sla.batch_size, 0).next()
            return bare(fast_net(cifar_resnet(sla.model, [classes], sla.width), ('forward', 'features')), x, [y])
        if name == 'bare_resnet32_x4':
            x, y = SampledBatches(train, sla.batch_size * rotation.M, 0).next()
            net = cifar_resnet(sla.model, [classes * rotation.M], sla.width)
            return bare(fast_net(net, ('forward', 'features')), x, [y])
        mode = 'baseline' if name == 'sla_baseline' else 'sla'
        tf = None if mode == 'baseline' else rotation
        net = fast_net(train_sla.build_model(sla.model, mode, classes, tf.M if tf else 1, sla.width),
                       ('forward', 'features'))
        if name == 'eval_sla':               # one batch of an evaluation (val and test splits alike)
            test_x, test_y = create_dataset.load(sla.dataset, data_root, False, synthetic=True)
            test = DeviceData(test_x[:sla.batch_size], test_y[:sla.batch_size], dev, train_sla.MEAN,
                                             train_sla.STD)
            return lambda: train_sla.evaluate(net, test.batches(sla.batch_size), len(test), dev, mode, tf,
                                              sla.temperature, sla.with_large_loss)
        optimizer = torch.optim.SGD(net.parameters(), lr=sla.lr, momentum=sla.momentum, weight_decay=sla.weight_decay)
        forward, stream = wrap(net), SampledBatches(train, sla.batch_size, 0)

        def step():
            x, y = stream.next()
            train_sla.train_step(forward, optimizer, x, y, mode, tf, sla.temperature, sla.with_large_loss)
        return step

    train_x, train_y, test_x, test_y = create_dataset.load_both(semi.dataset, data_root, synthetic=True)
    mean, std = create_dataset.DATASETS[semi.dataset].normalisation
    train = DeviceData(train_x, train_y, dev, mean, std)
    classes, B = create_dataset.DATASETS[semi.dataset].num_classes, semi.batch_size
    if name == 'eval_semi':                  # one batch of the test pass
        T = semi.test_batch_size
        test = DeviceData(test_x[:T], test_y[:T], dev, mean, std)
        model = fast_net(semi_network(semi.architecture, classes, semi.width))
        return lambda: train_meta_semi.evaluate(model, test.batches(T), T, dev)
    if name == 'bare_convlarge':
        x, y = train.get(torch.randint(len(train), (B,), device=dev, generator=rng), rng, augment=True)
        return bare(fast_net(semi_network(semi.architecture, classes, semi.width)), x, [y])
    model = fast_net(semi_network(semi.architecture, classes, semi.width))
    forward = wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=semi.lr, momentum=semi.momentum, weight_decay=semi.weight_decay)
    alpha = torch.tensor(float(semi.alpha), device=dev)
    beta = torch.distributions.Beta(alpha, alpha)
    n_labeled = len(train) // 5         # which images count as labeled does not change a step's cost
    stream = CycledBatches(train, {'labeled': torch.arange(n_labeled, device=dev),
                                  'unlabeled': torch.arange(n_labeled, len(train), device=dev)}, B,
                           {'labeled': 0, 'unlabeled': 1}, 0)

    def step():
        (x_l, y_l), (x_u, y_u) = stream.next(('labeled', 'unlabeled'))
        lam = beta.sample((B, 1))
        train_meta_semi.train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, semi.lr, semi.weight, semi.epsilon,
                                   classes, baseline=name == 'semi_baseline_mixup', forward=forward)   # peak lr, full weight
    return step


def timed_steps(name, steps):
    """maxl_train: at least a whole cycle of its sampled gradient cosine, so its mean is the average step."""
    if name == 'maxl_train':
        import model_vgg_maxl
        return max(steps, model_vgg_maxl.HYPERPARAMETERS['cos_every'])
    return steps


def count_flops(step):
    """Floating-point operations of one call of step() (torch.utils.flop_counter: matrix products,
    convolutions and attention, forward and backward, forward-mode tangents too; elementwise work, batch
    norm and the optimiser are not counted). A multiply-add counts 2."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def wait_for_copies(barrier, copies, timeout=600):
    """--concurrent: this copy is warm; wait until all `copies` are (a file each in the folder `barrier`)."""
    open(os.path.join(barrier, f'ready-{os.getpid()}'), 'w').close()
    end = time.time() + timeout
    while len([f for f in os.listdir(barrier) if f.startswith('ready-')]) < copies:
        if time.time() > end:
            raise RuntimeError(f'--concurrent: the other copies were not ready after {timeout} s')
        time.sleep(0.01)


def measure(name, device, fast, warmup, steps, data_root, tf32=True, barrier='', copies=1, width=1.0):
    import torch
    import torch.distributed as dist
    from machinery.distributed import pick_device
    from machinery.fast_paths import set_tf32
    set_tf32(tf32)
    torch.manual_seed(0)
    dev = pick_device(device)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1:                        # under torchrun (--processes): one process per device, as the scripts
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    step = build(name, dev, fast, data_root, width)

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize()
    steps = timed_steps(name, steps)
    t0 = time.perf_counter()
    # The FLOPs of one step, counted on an untimed step before the warm-up. torch.compile does not change
    # which products a step computes, so with --compile they are counted on an eager build of the row.
    flops = count_flops(build(name, dev, dict(fast, compile=False), data_root, width) if fast.get('compile') else step)
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if barrier:
        wait_for_copies(barrier, copies)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    window_start = time.time()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    window_end = time.time()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if world > 1:
        dist.barrier()
    return dict(row=name, device=str(dev), processes=world, median_s=statistics.median(times),
                mean_s=statistics.mean(times), times_s=times, warmup_s=warm_s, peak_mb=peak,
                peak_kind='max allocated (CUDA)' if dev.type == 'cuda' else 'peak RSS of the process',
                flops_per_step=flops, window=[window_start, window_end],
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                float32_matmul_precision=torch.get_float32_matmul_precision())


# ---- the table -------------------------------------------------------------------------------------------

def aggregate(copies, images, processes=1):
    """--concurrent: what `copies` (the results of copies of one row run at once, each with its timed window
    [start, end] in wall-clock seconds) did together. Aggregate images/s and TFLOP/s count every timed step
    of every copy over the span from the first copy's first timed step to the last copy's last one; overlap_s
    is how long all of them were timing at once."""
    start = min(c['window'][0] for c in copies)
    end = max(c['window'][1] for c in copies)
    span = end - start
    steps = sum(len(c['times_s']) for c in copies)
    flops = copies[0].get('flops_per_step')
    return dict(copies=len(copies), span_s=span, overlap_s=max(0.0, min(c['window'][1] for c in copies)
                                                                 - max(c['window'][0] for c in copies)),
                timed_steps=steps, images_per_step=images * processes,
                aggregate_images_per_s=images * processes * steps / span,
                aggregate_tflops_per_s=None if flops is None else flops * processes * steps / span / 1e12,
                per_copy_median_s=[c['median_s'] for c in copies],
                per_copy_images_per_s=[images * processes / c['median_s'] for c in copies])


def row_command(name, args, flags, barrier='', copies=1):
    launch = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
               str(args.processes)] if args.processes > 1 else [sys.executable])
    cmd = launch + [os.path.abspath(__file__), '--row', name, '--device', args.device, '--warmup', str(args.warmup),
                    '--steps', str(args.steps), '--data-root', args.data_root, '--tf32', str(args.tf32).lower(),
                    '--width', str(args.width)]
    cmd += [f'--{f.replace("_", "-")}' for f in flags if f != 'no_tf32']
    if barrier:
        cmd += ['--barrier', barrier, '--copies', str(copies)]
    return cmd


def run_copies(name, args, flags, n):
    """n copies of row `name` started at once; their results (None for each that failed), their errors."""
    import tempfile
    with tempfile.TemporaryDirectory() as barrier:
        procs = [subprocess.Popen(row_command(name, args, flags, barrier if n > 1 else '', n), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
        results, errors = [], []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=args.row_timeout or None)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, err = proc.communicate()
                err += f'\n(killed after --row-timeout {args.row_timeout} s)'
            if proc.returncode:
                results.append(None)
                errors.append(err[-3000:])
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
    return results, errors


def flag_names(fast, tf32):
    return [f for f in ('amp', 'channels_last', 'compile') if fast[f]] + ([] if tf32 else ['no_tf32'])


def precision_text(device, flags, tf32):
    fast = [f for f in flags if f != 'no_tf32']
    text = '+'.join(fast) if fast else 'float32'
    if device.startswith('cuda') and 'amp' not in fast:
        text += ' (cuDNN convolutions may use TF32)' if tf32 else ' (strict float32: TF32 off)'
    return text


def table(results, processes):
    """The markdown table of `results` (row -> measurement); adds the derived figures to each row."""
    header = ('| row | images/step | median s/step | mean s/step | images/s | GFLOP/step | TFLOP/s | peak MB | '
              'x bare step | goal | original s/step (2-core CPU) |')
    lines = [header, '|' + '---|' * 11]
    for name, r in results.items():
        bare_row, kind, original, goal = ROWS[name]
        images = images_per_step(kind)
        base = results.get(bare_row)
        use = 'mean_s' if name == 'maxl_train' else 'median_s'
        r['images_per_s'] = images * processes / r['median_s']
        r['tflops_per_s'] = r['flops_per_step'] * processes / r['median_s'] / 1e12
        r['x_bare'] = r[use] / base['median_s'] if base and bare_row != name else None
        goal_text = ''
        if goal:
            ref = results.get(goal[0])
            if ref:
                ratio = r[use] / ref['median_s']
                r['goal'] = dict(versus=goal[0], ratio=ratio, at_most=goal[1], met=ratio <= goal[1])
                goal_text = f'{ratio:.2f}x {goal[0]} (goal <= {goal[1]}x: {"met" if ratio <= goal[1] else "MISSED"})'
        lines.append(f'| {name} | {images} | {r["median_s"]:.4f} | {r["mean_s"]:.4f} | {r["images_per_s"]:.0f} | '
                     f'{r["flops_per_step"] / 1e9:.1f} | {r["tflops_per_s"]:.2f} | {r["peak_mb"]:.0f} | '
                     f'{"" if r["x_bare"] is None else format(r["x_bare"], ".2f")} | '
                     f'{goal_text} | {"" if original is None else original} |')
    return '\n'.join(lines)


def concurrent_table(results):
    lines = ['| row | copies | aggregate images/s | x 1 copy | aggregate TFLOP/s | per-copy median s/step | '
             'span s | all timing at once s |', '|' + '---|' * 8]
    for name, by_n in results.items():
        one = by_n.get('1')
        for n, a in by_n.items():
            a['x_one_copy'] = a['aggregate_images_per_s'] / one['aggregate_images_per_s'] if one else None
            lines.append(f'| {name} | {n} | {a["aggregate_images_per_s"]:.0f} | '
                         f'{"" if a["x_one_copy"] is None else format(a["x_one_copy"], ".2f")} | '
                         f'{"" if a["aggregate_tflops_per_s"] is None else format(a["aggregate_tflops_per_s"], ".2f")} | '
                         f'{", ".join(format(m, ".4f") for m in a["per_copy_median_s"])} | {a["span_s"]:.2f} | '
                         f'{a["overlap_s"]:.2f} |')
    return '\n'.join(lines)


def write(out, info):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + '.tmp', 'w') as f:
        json.dump(info, f, indent=1)
    os.replace(out + '.tmp', out)


def main():
    from machinery.options import parse_bool, spellings
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N (default cpu)')
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as the scripts\' --amp)')
    p.add_argument(*spellings('channels_last'), action='store_true', help='channels-last memory format')
    p.add_argument('--compile', action='store_true', help='torch.compile the forward passes')
    p.add_argument('--tf32', type=parse_bool, default=True, metavar='BOOL',
                   help="as the scripts' --tf32: true (default) leaves PyTorch's default (cuDNN convolutions may "
                        'use TF32 on CUDA); false: strict float32')
    p.add_argument('--warmup', type=int, default=2, help='steps before timing (more with --compile)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per row (maxl_train: at least cos_every)')
    p.add_argument('--rounds', type=int, default=1,
                   help='run every row this many times, in turn, and keep the fastest round of each (the '
                        'machine\'s speed drifts over minutes; the best round is the least disturbed)')
    p.add_argument('--processes', type=int, default=1,
                   help='run each row under torchrun with this many processes (per-process batch as the scripts; '
                        'images/s counts all processes)')
    p.add_argument('--concurrent', default='',
                   help='N or a list such as 1,2,4: run N copies of each row at once (separate processes, the same '
                        'device) and report their aggregate images/s (instead of the ratio table)')
    p.add_argument(*spellings('row_timeout'), type=float, default=0,
                   help='seconds a row (all its copies) may take before it is killed and reported failed (0: no limit)')
    p.add_argument('--only', default='', help='comma-separated rows (default all): ' + ', '.join(ROWS))
    p.add_argument(*spellings('data_root'), default=os.path.join(ROOT, 'dataset'))
    p.add_argument('--width', type=float, default=1.0, help='channel multiplier of every network (default 1: the '
                   "papers' networks; a smaller one checks the plumbing quickly, its times mean nothing)")
    p.add_argument('--json', default='', help='output file (default benchmarks/results/<device>-<flags>.json)')
    p.add_argument('--row', default='', help=argparse.SUPPRESS)       # internal: measure one row here
    p.add_argument('--barrier', default='', help=argparse.SUPPRESS)   # internal: --concurrent's meeting folder
    p.add_argument('--copies', type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    fast = dict(amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    if args.row:
        r = measure(args.row, args.device, fast, args.warmup, args.steps, args.data_root, args.tf32, args.barrier,
                    args.copies, args.width)
        if os.environ.get('RANK', '0') == '0':
            print(json.dumps(r), flush=True)
        if int(os.environ.get('WORLD_SIZE', '1')) > 1:
            os._exit(0)                   # leave without tearing the process group down (see utils.run_main)
        return
    names = [n for n in args.only.split(',') if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.exit(2, f'error: unknown rows {unknown}; choose from {", ".join(ROWS)}\n')
    try:
        counts = [int(n) for n in args.concurrent.split(',') if n]
    except ValueError:
        counts = [0]
    if any(n < 1 for n in counts):
        p.exit(2, f'error: --concurrent takes positive counts such as 2 or 1,2,4, got {args.concurrent!r}\n')
    if counts and (args.processes > 1 or args.rounds > 1):
        p.exit(2, 'error: --concurrent runs single-process copies, one round: drop --processes / --rounds\n')
    flags = flag_names(fast, args.tf32)
    import torch
    info = dict(device=args.device, flags=flags, tf32=args.tf32, precision=precision_text(args.device, flags, args.tf32),
                processes=args.processes, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(),
                gpu=torch.cuda.get_device_name() if args.device.startswith('cuda') and torch.cuda.is_available() else None,
                date=time.strftime('%Y-%m-%d'), warmup=args.warmup, steps=args.steps, rounds=args.rounds, width=args.width,
                complete=False, failed={})
    out = args.json or os.path.join(ROOT, 'benchmarks', 'results', f'{args.device.replace(":", "")}-'
                                    f'{"-".join(flags) or "float32"}{f"-x{args.processes}" if args.processes > 1 else ""}'
                                    f'{"-concurrent" if counts else ""}.json')
    print(f'device {args.device}, {info["precision"]}, {args.processes} process(es), '
          f'torch threads: default{" (torchrun: 1 per process)" if args.processes > 1 else ""}; '
          f'{args.warmup} warm-up + {args.steps} timed steps per row, '
          + (f'{"/".join(map(str, counts))} concurrent copies' if counts else f'best of {args.rounds} round(s)'),
          flush=True)

    if counts:                            # aggregate images/s of copies run at once
        info.update(concurrent=counts, rows={})
        for name in names:
            images = images_per_step(ROWS[name][1])
            for n in counts:
                copies, errors = run_copies(name, args, flags, n)
                if errors:
                    print(f'{name}, {n} copies: {len(errors)} failed\n{errors[0]}', flush=True)
                    info['failed'][f'{name} x{n}'] = errors[0]
                    continue
                a = aggregate(copies, images)
                a['copy_results'] = copies
                info['rows'].setdefault(name, {})[str(n)] = a
                print(f'  {name}, {n} copies: {a["aggregate_images_per_s"]:.0f} images/s together', flush=True)
                info['table'] = concurrent_table(info['rows'])
                write(out, info)
        info['table'] = concurrent_table(info['rows'])
    else:
        # the bare and reference rows the ratios need
        needed = set(names) | {ROWS[n][0] for n in names} | {ROWS[n][3][0] for n in names if ROWS[n][3]}
        names = [n for n in ROWS if n in needed]
        results = info['rows'] = {}
        for round_ in range(args.rounds):
            for name in names:
                (r,), errors = run_copies(name, args, flags, 1)
                if r is None:
                    print(f'{name}: failed\n{errors[0]}', flush=True)
                    info['failed'][name] = errors[0]
                    continue
                use = 'mean_s' if name == 'maxl_train' else 'median_s'
                rounds = results.get(name, {}).get('rounds_s', []) + [r[use]]
                if name not in results or r[use] < results[name][use]:
                    results[name] = r
                results[name]['rounds_s'] = rounds
                print(f'  round {round_ + 1}, {name}: median {r["median_s"]:.4f} s/step, mean {r["mean_s"]:.4f}, '
                      f'{r["flops_per_step"] / 1e9:.1f} GFLOP/step', flush=True)
                info['table'] = table(results, args.processes)
                write(out, info)                  # as it goes: a later hang keeps the rows measured so far
        info['table'] = table(results, args.processes)
    info['complete'] = True
    print(info['table'])
    write(out, info)
    print(f'written to {out}')
    if info['failed']:
        sys.exit(f'failed: {", ".join(info["failed"])}')


if __name__ == '__main__':
    main()
