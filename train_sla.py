"""SLA: Self-supervised Label Augmentation (Lee, Hwang, Shin; ICML 2020) on CIFAR-10/100 with CIFAR ResNets.

Every training image is shown under M self-supervised transformations (rotations, colour permutations).
Instead of predicting the transformation as a separate task, one head learns the JOINT label
(class c, transformation t), C*M classes, so the class is never asked to be invariant to t. At test
time the class is read off the untransformed copy (single inference, SLA+SI), off the mean of the M
copies' joint logits (aggregation, SLA+AG), or off a C-way head distilled from that aggregate during
training (self-distillation, SLA+SD). Baselines: plain training, the transformations as data
augmentation (DA), and multi-task learning with a transformation head (MT).

    python train_sla.py --dataset cifar10 --datadir data/ --batchsize 128 --num-iterations 80000 \
        --val-freq 1000 --model cresnet32 --mode sla --aug rotation           # the paper's setting
    python train_sla.py --synthetic --num-iterations 300 --val-freq 100 --width 0.25 --mode sla+sd
    python train_sla.py --eval-only --resume logs/train_sla/<run>   # test metrics of the best checkpoint
"""
import os
import sys

import torch
import torch.nn.functional as F

import create_dataset
from utils import CRESNET_DEPTHS, Meters, Run, UserError, Wrapped, accuracy_count, all_reduce_sum, check_positive, \
    cifar_resnet, device_generator, hyperparameters, load_checkpoint, run_main, stand_in

# ---- hyperparameters: the paper's setting (CIFAR-10, ResNet-32, SLA with rotations); each is overridable ----
dataset = 'cifar10'          # cifar10 or cifar100
batch_size = 128             # original images per iteration (--batchsize); the network sees batch_size * M copies
total_steps = 80000          # SGD iterations (--num-iterations); the learning rate drops x0.1 at 1/2 and 3/4 of them
eval_every = 1000            # evaluate (train/val/test metrics), keep the best, checkpoint every N iterations (--val-freq)
model = 'cresnet32'          # cresnet20, cresnet32, cresnet44, cresnet56, cresnet110
mode = 'sla'                 # baseline: plain; da: transformed copies as extra data; mt: class head + transformation head; sla: one head over (class, transformation); sla+sd: sla plus a class head self-distilled from the aggregate
aug = 'rotation'             # the self-supervised transformation set (see AUGMENTATIONS; t=0 is always the identity); ignored by baseline
lr = 0.1
momentum = 0.9
weight_decay = 1e-4          # on every parameter, batch norm and biases included, as the original (--wd)
temperature = 1.0            # self-distillation temperature T (sla+sd; the original's --T)
with_large_loss = False      # multiply the joint (da/mt: transformation-averaged) loss by M (the original: for ImageNet)
num_samples_per_class = 0    # > 0: train on this many images per class (limited-data setting); 0: all
val_size = 5000              # validation images held out of the training file (synthetic: at most a tenth of it)
val_indices = ''             # a file of validation indices to use instead of drawing them (.txt or the original's .npy)
width = 1.0                  # channel multiplier of the ResNet (1 = the paper's)
eval_only = False            # with --resume RUN: print the test metrics of the run's best checkpoint, no training
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see utils.RUN_OPTIONS)
HYPERPARAMETERS = hyperparameters(globals())

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)     # the original normalisation: pixels in [-1, 1]
MODES = ['baseline', 'da', 'mt', 'sla', 'sla+sd']


# ---- the self-supervised transformations ---------------------------------------------------------------

IDENTITY = ((0, 1, 2),)
CYCLIC = ((0, 1, 2), (1, 2, 0), (2, 0, 1))
ALL_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

# name: (quarter turns, colour permutations). Transformation t = (rotation index) * P + (permutation index),
# P = the number of permutations: rotation outer, colour inner, as the original; t = 0 is the identity.
# A quarter turn is torch.rot90 over (H, W); permutation (a, b, c) makes channels (R, G, B) = (in[a], in[b], in[c]).
AUGMENTATIONS = {
    'rotation': ((0, 1, 2, 3), IDENTITY),
    'rotation2': ((0, 2), IDENTITY),
    'color_perm': ((0,), ALL_PERMUTATIONS),
    'color_perm3': ((0,), CYCLIC),
    'rot_color_perm6': ((0, 2), CYCLIC),
    'rot_color_perm12': ((0, 1, 2, 3), CYCLIC),
    'rot_color_perm24': ((0, 1, 2, 3), ALL_PERMUTATIONS),
}


class Transformations:
    """x [B,3,H,W] -> [B*M,3,H,W], image-major: row b*M + t is image b under transformation t.
    Tensor ops on the device (one channel gather, one rot90 per rotation), no per-image Python."""

    def __init__(self, name, device):
        self.name = name
        self.rotations, perms = AUGMENTATIONS[name]
        self.M = len(self.rotations) * len(perms)
        self.perms = None if perms == IDENTITY else torch.tensor(perms, device=device)

    def __call__(self, x):
        copies = x[:, None] if self.perms is None else x[:, self.perms]           # [B, P, 3, H, W]
        copies = torch.stack([torch.rot90(copies, k, dims=(3, 4)) if k else copies for k in self.rotations], 1)
        return copies.flatten(0, 2)                                                # [B*R*P, 3, H, W]


def joint_labels(y, M):
    """Joint label of image b under transformation t: y_b * M + t, in the image-major order of the copies."""
    return (y[:, None] * M + torch.arange(M, device=y.device)).flatten()


# ---- reading class predictions off the joint head --------------------------------------------------------

def single_logits(joint_logits, M):
    """SLA+SI: the untransformed copy's logits of (class c, transformation 0): [B*M, C*M] -> [B, C]."""
    return joint_logits.view(joint_logits.shape[0] // M, M, -1, M)[:, 0, :, 0]


def aggregated_logits(joint_logits, M):
    """SLA+AG: (1/M) sum_t  copy t's logit of (class c, transformation t) -> [B, C]. The mean of raw
    logits (the original's aggregation), i.e. the normalised product of the M per-copy distributions."""
    z = joint_logits.view(joint_logits.shape[0] // M, M, -1, M)                  # [b, t, c, t']
    return z.diagonal(dim1=1, dim2=3).mean(-1)                                    # t' = t, mean over t


def self_distillation_loss(student_logits, teacher_logits, T):
    """T^2 * KL( softmax(teacher / T) || softmax(student / T) ), mean over the batch. The teacher (the
    aggregated joint prediction) is detached: this term trains the student head only."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits.detach() / T, dim=1),
                    reduction='batchmean') * T * T


CHOICES = {'dataset': ['cifar10', 'cifar100'], 'mode': MODES, 'model': list(CRESNET_DEPTHS),
           'aug': list(AUGMENTATIONS) + ['none']}


# ---- the network and the five objectives -----------------------------------------------------------------

def build_model(name, mode, n_classes, M, width):
    """Shared ResNet trunk with the heads of `mode`: baseline/da [C], mt [C, M], sla [C*M], sla+sd [C*M, C]."""
    heads = {'baseline': [n_classes], 'da': [n_classes], 'mt': [n_classes, M],
             'sla': [n_classes * M], 'sla+sd': [n_classes * M, n_classes]}[mode]
    return cifar_resnet(name, heads, width)


METRICS = {        # per mode, in print order; total_* are over the B*M copies (joint labels for sla, sla+sd)
    'baseline': ['single_loss', 'single_acc'],
    'da': ['total_loss', 'total_acc', 'single_loss', 'single_acc', 'agg_loss', 'agg_acc'],
    'mt': ['total_loss', 'total_acc', 'trans_loss', 'trans_acc', 'single_loss', 'single_acc', 'agg_loss', 'agg_acc'],
    'sla': ['total_loss', 'total_acc', 'single_loss', 'single_acc', 'agg_loss', 'agg_acc'],
    'sla+sd': ['total_loss', 'total_acc', 'single_loss', 'single_acc', 'agg_loss', 'agg_acc'],
}


def objective(model, x, y, mode, tf, T=1.0, large_loss=False):
    """The loss of `mode` on B images and its metrics as sums over the B images (a metric = sum / images).

    baseline  CE(f(x), y)
    da        mean over the B*M copies of CE(f(t(x)), y)                            (transformations as data)
    mt        mean over copies of CE(u(t(x)), y) + CE(v(t(x)), t)                   (class head u, transformation head v)
    sla       mean over copies of CE(z(t(x)), y*M + t)                              (joint head z)
    sla+sd    sla + CE(s(x), y) + T^2 KL(softmax(agg/T) || softmax(s(x)/T))        (class head s, teacher = aggregate)
    With large_loss the transformation-averaged term is multiplied by M (a sum over transformations).
    single_* scores the untransformed copy, agg_* the mean of the copies' logits (both C-way).
    """
    B = len(y)
    if mode == 'baseline':
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {'single_loss': loss.detach() * B, 'single_acc': accuracy_count(logits, y)}
    M = tf.M
    scale = M if large_loss else 1
    h = model.features(tf(x))                                  # features of the B*M copies, image-major
    m = {}
    if mode in ('da', 'mt'):
        logits = model.classifiers[0](h)                       # class head on every copy
        y_copies = y.repeat_interleave(M)
        loss = F.cross_entropy(logits, y_copies) * scale
        m['total_acc'] = accuracy_count(logits, y_copies) / M
        if mode == 'mt':
            t = torch.arange(M, device=y.device).repeat(B)
            trans_logits = model.classifiers[1](h)             # transformation head on every copy
            trans_loss = F.cross_entropy(trans_logits, t) * scale
            loss = loss + trans_loss
            m['trans_loss'], m['trans_acc'] = trans_loss.detach() * B, accuracy_count(trans_logits, t) / M
        single, agg = logits[0::M], logits.view(B, M, -1).mean(1)
    else:
        joint = model.classifiers[0](h)                        # [B*M, C*M]
        target = joint_labels(y, M)
        loss = F.cross_entropy(joint, target) * scale
        m['total_acc'] = accuracy_count(joint, target) / M
        single, agg = single_logits(joint, M), aggregated_logits(joint, M)
        if mode == 'sla+sd':
            single = model.classifiers[1](h[0::M])             # C-way head on the untransformed copy
            loss = loss + F.cross_entropy(single, y) + self_distillation_loss(single, agg, T)
    single, agg = single.detach(), agg.detach()
    m['total_loss'] = loss.detach() * B
    m['single_loss'] = F.cross_entropy(single, y, reduction='sum')
    m['single_acc'] = accuracy_count(single, y)
    m['agg_loss'] = F.cross_entropy(agg, y, reduction='sum')
    m['agg_acc'] = accuracy_count(agg, y)
    return loss, m


def sample_batch(train, batch_size, generator):
    """A batch of distinct training images (i.i.d. across iterations), cropped (4-pixel padding) and flipped;
    under torchrun batch_size is the global batch, of which this process gets its share."""
    index = torch.randperm(len(train), device=train.device, generator=generator)[:batch_size]
    return train.get(index, generator, augment=True)


def train_step(model, optimizer, x, y, mode, tf, T=1.0, large_loss=False):
    """One SGD step on the objective of `mode`; returns its metrics (sums over the batch, on the device).
    `model`: the network, or run.wrap(network) (under torchrun: gradients averaged over processes)."""
    forward = model if isinstance(model, Wrapped) else Wrapped(model)
    loss, m = forward.call(objective, x, y, mode, tf, T, large_loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return m


@torch.no_grad()
def evaluate(model, data, mode, tf, batch_size, T=1.0, large_loss=False):
    """Eval-mode pass over a split (every test image under all M transformations); metric means per image."""
    model.eval()
    names = METRICS[mode]
    sums = torch.zeros(len(names), device=data.device)
    for x, y in data.batches(batch_size):
        _, m = objective(model, x, y, mode, tf, T, large_loss)
        sums += torch.stack([m[k] for k in names])
    model.train()
    return dict(zip(names, (all_reduce_sum(sums) / len(data)).tolist()))     # over every process's share


def line(iteration, split, metrics):
    return f'[iteration {iteration}] [{split}] ' + ' '.join(f'[{k} {v:.4f}]' for k, v in metrics.items())


# ---- the run ---------------------------------------------------------------------------------------------

def validate(cfg):
    if cfg.mode != 'baseline' and cfg.aug not in AUGMENTATIONS:
        raise UserError(f'--mode {cfg.mode} needs a transformation set: --aug {" | ".join(AUGMENTATIONS)}.')
    check_positive(cfg, 'batch_size', 'total_steps', 'eval_every', 'val_size', 'num_samples_per_class', 'lr',
                   'weight_decay', 'temperature', 'width', allow_zero=('num_samples_per_class', 'weight_decay'))
    if not 0 <= cfg.momentum < 1:
        raise UserError(f'--momentum must be in [0, 1), got {cfg.momentum}.')
    if cfg.eval_only and not cfg.resume:
        raise UserError('--eval-only evaluates a trained run: give it with --resume logs/train_sla/<run>.')
    n_classes = create_dataset.DATASETS[cfg.dataset].num_classes
    if cfg.num_samples_per_class and cfg.num_samples_per_class * n_classes < cfg.batch_size:
        raise UserError(f'--num-samples-per-class {cfg.num_samples_per_class} leaves '
                        f'{cfg.num_samples_per_class * n_classes} training images, fewer than --batch-size '
                        f'{cfg.batch_size} (a batch holds distinct images): lower --batch-size.')
    if cfg.val_indices and not os.path.isfile(cfg.val_indices):
        raise UserError(f'--val-indices {cfg.val_indices!r} is not a file.')
    create_dataset.check_data_present(cfg.dataset, cfg.data_root, cfg.synthetic, cfg.download)


def load_split(cfg, train):
    images, labels = create_dataset.load(cfg.dataset, cfg.data_root, train, stand_in(cfg), cfg.download)
    return images, create_dataset.DATASETS[cfg.dataset].primary_labels(labels)     # CIFAR-100: the 100 fine classes


def split_indices(cfg, run_dir, labels, write=True):
    """Train / val indices into the training file. A new run draws the validation images with the seed
    (or loads --val-indices) and writes them to the run folder; a resumed run reads them back from there."""
    n = len(labels)
    val_file, train_file = os.path.join(run_dir, 'val_indices.txt'), os.path.join(run_dir, 'train_indices.txt')
    if os.path.isfile(val_file):
        val = create_dataset.sla_load_indices(val_file, n)
    elif cfg.val_indices:
        val = create_dataset.sla_load_indices(cfg.val_indices, n)
    else:
        val = create_dataset.sla_draw_val_indices(n, create_dataset.sla_val_size(n, cfg.val_size, cfg.synthetic),
                                                  cfg.seed)
    if len(val) >= n:
        raise UserError(f'the validation indices cover all {n} training images: nothing is left to train on.')
    train, val = create_dataset.sla_splits(labels, len(val), cfg.seed, cfg.num_samples_per_class, val)
    if os.path.isfile(train_file):
        train = create_dataset.sla_load_indices(train_file, n)
    if write:                                   # under torchrun: the first process; all drew the same
        create_dataset.write_indices(val_file, val)
        if cfg.num_samples_per_class:
            create_dataset.write_indices(train_file, train)
    return train, val


def main(argv=None):
    run = Run('train_sla', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=validate, choices=CHOICES)
    cfg, dev, log = run.cfg, run.device, run.log
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    n_classes = create_dataset.DATASETS[cfg.dataset].num_classes
    tf = None if cfg.mode == 'baseline' else Transformations(cfg.aug, dev)
    M = tf.M if tf else 1
    net = run.network(build_model(cfg.model, cfg.mode, n_classes, M, cfg.width), methods=('forward', 'features'))
    forward = run.wrap(net)                               # under torchrun: gradients averaged in backward
    evaluate_kw = dict(mode=cfg.mode, tf=tf, batch_size=cfg.batch_size, T=cfg.temperature, large_loss=cfg.with_large_loss)
    test_x, test_y = load_split(cfg, train=False)
    test = create_dataset.DeviceData(test_x, test_y, dev, MEAN, STD, shard=run.shard)

    # ---- evaluation only: the role of the original test.py ----
    if cfg.eval_only:
        path = os.path.join(run.dir, run.BEST)
        if not os.path.isfile(path):
            raise UserError(f'{path} does not exist: the run has not evaluated a checkpoint yet '
                            '(it is written at the first validation, after --val-freq iterations).')
        best = load_checkpoint(path, dev)
        net.load_state_dict(best['state']['model'])
        metrics = evaluate(net, test, **evaluate_kw)
        log.print(line(best['best']['iteration'], 'test', metrics) + ' (best checkpoint, eval-only)')
        then = {k: best['row'][f'test_{k}'] for k in metrics}
        differ = {k: (v, then[k]) for k, v in metrics.items() if abs(v - then[k]) > 1e-4}
        log.print('the same test metrics as logged at that iteration' if not differ else
                  f'differs from the metrics logged at that iteration (now, then): {differ}')
        return

    # ---- data: 45,000 train / 5,000 val from the training file, the official test set ----
    train_x, train_y = load_split(cfg, train=True)
    train_idx, val_idx = split_indices(cfg, run.dir, train_y, write=run.rank == 0)
    train = create_dataset.DeviceData(train_x[train_idx], train_y[train_idx], dev, MEAN, STD, shard=run.shard)
    val = create_dataset.DeviceData(train_x[val_idx], train_y[val_idx], dev, MEAN, STD, shard=run.shard)
    global_batch = cfg.batch_size * run.world              # batch_size per process, as the original's per GPU
    if global_batch > len(train):
        raise UserError(f'--batch-size {cfg.batch_size} x {run.world} process(es) exceeds the {len(train)} training '
                        'images (a batch holds distinct images): lower it.')

    # ---- optimiser: SGD, lr x0.1 at 1/2 and 3/4 of the iterations (stepped every iteration) ----
    N = cfg.total_steps
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[N // 2, 3 * N // 4], gamma=0.1)
    data_rng = device_generator(dev, cfg.seed)        # batch indices, crops and flips
    objects = dict(model=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects, iteration=0, total_steps=N)
    if 'data_rng' in state:
        data_rng.set_state(state['data_rng'].cpu())
    for group in optimizer.param_groups:    # --weight-decay / --momentum typed with --resume take effect (lr: the schedule)
        group['weight_decay'], group['momentum'] = cfg.weight_decay, cfg.momentum
    if state['total_steps'] != N:
        log.print(f'note: training now runs to {N} iterations; the learning-rate milestones stay those of the '
                  f'saved run ({sorted(scheduler.milestones)})')
    it = state['iteration']
    names = METRICS[cfg.mode]
    n_params = sum(p.numel() for p in net.parameters())
    log.print(f'{cfg.mode} on {cfg.dataset}{" (synthetic)" if cfg.synthetic else ""}: {cfg.model} width {cfg.width} '
              f'({n_params:,} parameters), {"no transformations" if tf is None else f"{cfg.aug} (M={M})"}, '
              f'{len(train)} train / {len(val)} val / {len(test)} test images, {N} iterations of {cfg.batch_size}')

    # ---- training: i.i.d. batches of distinct images, with replacement across iterations ----
    run.describe([net], {'train': len(train), 'val': len(val), 'test': len(test)}, N - it, unit='iterations')
    # a run stopped between two evaluations (Ctrl-C) continues its running metrics
    meters, first_it = Meters.from_state(state.get('meters')), state.get('first_it', it + 1)

    def stretch(it):                            # the iterations from it to the next evaluation
        end = min(N, (it // cfg.eval_every + 1) * cfg.eval_every)
        return run.progress(end - it, f'to iteration {end}', it, N)
    bar = stretch(it)
    net.train()
    run.timer.lap()
    while it < N:
        x, y = sample_batch(train, global_batch, data_rng)
        meters.add(len(y), **train_step(forward, optimizer, x, y, cfg.mode, tf, cfg.temperature, cfg.with_large_loss))
        scheduler.step()
        it += 1
        bar.update()
        if it % cfg.eval_every and it != N:
            run.stop_if_asked(objects, it, iteration=it, data_rng=data_rng.get_state(), total_steps=N,
                              meters=meters.state_dict(), first_it=first_it)      # Ctrl-C / SIGTERM
            continue
        bar.close()

        # ---- every eval_every iterations: train/val/test metrics, the best model, a checkpoint ----
        run.check_finite(meters, first_it, scheduler.get_last_lr()[0], unit='iteration')
        seconds_per_iteration = run.timer.lap() / meters.counts[names[0]] * cfg.batch_size
        lr_now = scheduler.get_last_lr()[0]
        train_means = meters.means()
        run.sync_buffers(net)
        metrics = {'train': {k: train_means[k] for k in names}, 'val': evaluate(net, val, **evaluate_kw),
                   'test': evaluate(net, test, **evaluate_kw)}
        eval_seconds = run.timer.lap()
        row = {'iteration': it, 'lr': lr_now, 'seconds_per_iteration': seconds_per_iteration,
               **{f'{s}_{k}': v for s, values in metrics.items() for k, v in values.items()}}

        def lines(improved):
            out = [line(it, split, values) for split, values in metrics.items()]
            if improved:
                out.append(f'[iteration {it}] [BEST] [val {row["val_single_acc"]:.4f}] '
                           f'[test {row["test_single_acc"]:.4f}]'
                           + (f' [test agg {row["test_agg_acc"]:.4f}]' if 'test_agg_acc' in row else ''))
            return out + [f'[iteration {it}] [lr {lr_now:g}] [{seconds_per_iteration:.3f} s/iteration] '
                          f'[eval {eval_seconds:.1f} s]']

        run.evaluate_and_save(objects, row, 'val_single_acc', keep=[k for k in ('test_single_acc', 'test_agg_acc')
                                                                    if k in row],
                              lines=lines, iteration=it, data_rng=data_rng.get_state(), total_steps=N)
        meters, first_it = Meters(), it + 1
        run.stop_if_asked()                   # Ctrl-C / SIGTERM at an evaluation: its checkpoint is written
        bar = stretch(it)
        run.timer.lap()

    best = run.best
    if best is not None:
        log.print(f'done: best val single_acc {best["val_single_acc"]:.4f} at iteration {best["iteration"]}, '
                  f'test single_acc {best["test_single_acc"]:.4f}'
                  + (f', test agg_acc {best["test_agg_acc"]:.4f}' if 'test_agg_acc' in best else ''))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
