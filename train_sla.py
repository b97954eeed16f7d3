"""SLA: Self-supervised Label Augmentation (Lee, Hwang, Shin; ICML 2020) on CIFAR-10/100 (also SVHN and
Fashion-MNIST) with CIFAR ResNets, and on the large datasets (ImageNet and its class subsets, tiny-ImageNet,
iNaturalist 2018, CUB-200, MIT-67, Stanford Dogs) with torchvision ResNets.

Every training image is shown under M self-supervised transformations (rotations, colour permutations).
Instead of predicting the transformation as a separate task, one head learns the JOINT label
(class c, transformation t), C*M classes, so the class is never asked to be invariant to t. At test
time the class is read off the untransformed copy (single inference, SLA+SI), off the mean of the M
copies' joint logits (aggregation, SLA+AG), or off a C-way head distilled from that aggregate during
training (self-distillation, SLA+SD). Baselines: plain training, the transformations as data
augmentation (DA), and multi-task learning with a transformation head (MT). Its step is timed by
benchmarks/bench.py and its full run projected by benchmarks/project.py.

    python train_sla.py --dataset cifar10 --datadir data/ --batchsize 128 --num-iterations 80000 \
        --val-freq 1000 --model cresnet32 --mode sla --aug rotation           # the paper's setting
    python train_sla.py --synthetic --num-iterations 300 --val-freq 100 --width 0.25 --mode sla+sd
    python train_sla.py --eval-only --resume logs/train_sla/<run>   # test metrics of the best checkpoint
    torchrun --nproc_per_node 8 train_sla.py --dataset imagenet --datadir /path/to/ILSVRC/Data/CLS-LOC \
        --batchsize 16 --mode sla+sd --aug rotation --with-large-loss     # ResNet-18, 900,000 iterations of 128
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import create_dataset
from machinery import large_datasets, splits
from machinery.checkpoints import load_checkpoint
from machinery.distributed import Wrapped, all_reduce_sum, dist_env
from machinery.models import CRESNET_DEPTHS, ImageNetResNet, TORCHVISION_RESNETS, accuracy_count, cifar_resnet
from machinery.options import UserError, check_positive, hyperparameters, stand_in
from machinery.streams import Splits
from utils import Run, read_config, run_main

# ---- hyperparameters: the paper's setting (CIFAR-10, ResNet-32, SLA with rotations); each is overridable ----
dataset = 'cifar10'          # cifar10, cifar100, or a large dataset: imagenet, imagenetN (N of its classes, e.g. imagenet100), tiny-imagenet, inat, cub200, indoor, dogs (their own defaults: LARGE, IMAGENET below)
batch_size = 128             # original images per iteration (--batchsize; under torchrun per process); the network sees batch_size * M copies
total_steps = 80000          # SGD iterations (--num-iterations); the learning rate drops x0.1 at 1/2 and 3/4 of them (imagenet, inat: every third)
eval_every = 1000            # evaluate (train/val/test metrics; large datasets: train/test), keep the best, checkpoint every N iterations (--val-freq)
model = 'cresnet32'          # CIFAR: cresnet20, cresnet32, cresnet44, cresnet56, cresnet110; large datasets: a torchvision ResNet (resnet18 .. resnet152, resnext*, wide_resnet*)
mode = 'sla'                 # baseline: plain; da: transformed copies as extra data; mt: class head + transformation head; sla: one head over (class, transformation); sla+sd: sla plus a class head self-distilled from the aggregate
aug = 'rotation'             # the self-supervised transformation set (see AUGMENTATIONS; t=0 is always the identity); ignored by baseline
lr = 0.1
momentum = 0.9
weight_decay = 1e-4          # on every parameter, batch norm and biases included, as the original (--wd)
temperature = 1.0            # self-distillation temperature T (sla+sd; the original's --T)
with_large_loss = False      # multiply the joint (da/mt: transformation-averaged) loss by M (the original: for ImageNet)
num_samples_per_class = 0    # > 0: train on this many images per class (limited-data setting); 0: all
imbalance_ratio = 1.0        # CIFAR, R > 1: the common long-tailed CIFAR-LT (Cui et al. 2019), class i keeps floor(n_max * R^(-i/(C-1))) of all n_max images a class has; validation: up to val_size / C of every class from the images the tail leaves unused (the first class: none); 1: off
val_size = 5000              # CIFAR: validation images held out of the training file (synthetic: at most a tenth of it)
val_indices = ''             # CIFAR: a file of validation indices to use instead of drawing them (.txt or the original's .npy)
width = 1.0                  # channel multiplier of the ResNet (1 = the paper's)
eval_only = False            # with --resume RUN: print the test metrics of the run's best checkpoint, no training
class_list = ''              # imagenetN: a file naming its N classes, one class folder name (wnid) a line (default: drawn with the seed)
image_size = 224             # ImageNet: training crop size (evaluation: shorter side to size*256/224, centre crop)
workers = 4                  # ImageNet: DataLoader worker processes per process (file reading; decoding on the CPU path)
decode_on = 'auto'           # ImageNet: decode and augment JPEGs on the gpu (nvJPEG, when training on CUDA) or the cpu workers
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)     # CIFAR: the original normalisation, pixels in [-1, 1] (large: ImageNet's)
MODES = ['baseline', 'da', 'mt', 'sla', 'sla+sd']
SMALL = list(create_dataset.DATASETS)       # held whole on the device: CIFAR-10/100, SVHN, Fashion-MNIST

# A large dataset's own defaults, taken for every value not typed on the command line: the original's
# default network (torchvision's ResNet-18) and, for ImageNet, its first public schedule (train.py's
# --num-iterations 900000 --val-freq 10000).
LARGE = dict(model='resnet18')
IMAGENET = dict(total_steps=900000, eval_every=10000)


def presets(cfg, typed):
    """A new run on a large dataset: its own defaults for the values not typed."""
    if large_datasets.is_large(cfg.dataset):
        for name, value in (LARGE | (IMAGENET if cfg.dataset == 'imagenet' else {})).items():
            if name not in typed:
                setattr(cfg, name, value)


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


CHOICES = {'mode': MODES, 'model': list(CRESNET_DEPTHS) + TORCHVISION_RESNETS, 'aug': list(AUGMENTATIONS) + ['none'],
           'decode_on': ['auto', 'gpu', 'cpu']}          # --dataset: checked in validate (imagenetN)


# ---- the network and the five objectives -----------------------------------------------------------------

def build_model(name, mode, n_classes, M, width):
    """Shared ResNet trunk with the heads of `mode`: baseline/da [C], mt [C, M], sla [C*M], sla+sd [C*M, C].
    A CIFAR ResNet (cresnet*) or, for the large datasets, a torchvision ResNet's trunk (resnet18, ...)."""
    heads = {'baseline': [n_classes], 'da': [n_classes], 'mt': [n_classes, M],
             'sla': [n_classes * M], 'sla+sd': [n_classes * M, n_classes]}[mode]
    if name in CRESNET_DEPTHS:
        return cifar_resnet(name, heads, width)
    return ImageNetResNet(name, heads, width)


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
def evaluate(model, batches, n, device, mode, tf, T=1.0, large_loss=False):
    """Eval-mode pass over a split (every image under all M transformations): `batches` are this process's
    share of it, n the images of the whole split; metric means per image, over every process's share."""
    model.eval()
    names = METRICS[mode]
    sums = torch.zeros(len(names), device=device)
    for x, y in batches:
        _, m = objective(model, x, y, mode, tf, T, large_loss)
        sums += torch.stack([m[k] for k in names])
    model.train()
    return dict(zip(names, (all_reduce_sum(sums) / n).tolist()))     # over every process's share


def line(iteration, split, metrics):
    return f'[iteration {iteration}] [{split}] ' + ' '.join(f'[{k} {v:.4f}]' for k, v in metrics.items())


def lr_scheduler(optimizer, dataset, total_steps):
    """The original's learning-rate schedule, stepped every iteration: ImageNet and iNaturalist x0.1 every
    third of the iterations (StepLR; at least every iteration, where the original divides by zero in runs
    under 3 iterations), every other dataset x0.1 at 1/2 and 3/4 of them (MultiStepLR). The original's
    latest train.py tests the two names exactly (`dataset not in ['imagenet', 'inat']`), so imagenetN,
    tiny-imagenet, cub200, indoor and dogs get the MultiStep schedule. (Its first public train.py tested
    dataset.startswith('imagenet'), which gave imagenetN StepLR; the latest sets no class count for
    imagenetN at all, so neither version has trained imagenetN as published.)"""
    N = total_steps
    if dataset in ('imagenet', 'inat'):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(N // 3, 1), gamma=0.1)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[N // 2, 3 * N // 4], gamma=0.1)


# ---- the run ---------------------------------------------------------------------------------------------

# ---- how results.py tables and plots this script's runs ----

UNIT = 'iterations'            # what the first column of metrics.csv counts
PAPER = 'SLA (ICML 2020)'      # the runs of one paper share a panel of results.py's plot
HEADLINE = ['model', 'width', 'num_samples_per_class']     # the settings a results row always shows
METHOD_OPTIONS = ['mode', 'aug']                           # the settings the method's name says
TIME_NOTE = ('Σ `seconds_per_iteration` × the iterations of each evaluation interval (training only; the '
             'evaluations are not counted)')


def reported(cfg):
    """[(method, metrics column, selection)]: the test accuracy at the best validation single_acc (the large
    datasets, which have no validation split: at the best test single_acc), single or aggregated."""
    mode, aug = cfg.get('mode'), cfg.get('aug')
    if mode == 'baseline':
        return [('Baseline', 'test_single_acc', 'at best val')]
    if mode == 'sla':
        return [(f'SLA+SI, {aug}', 'test_single_acc', 'at best val'), (f'SLA+AG, {aug}', 'test_agg_acc', 'at best val')]
    return [({'da': 'DA', 'mt': 'MT', 'sla+sd': 'SLA+SD'}.get(mode, mode) + f', {aug}', 'test_single_acc', 'at best val')]


def unused_options(cfg):
    """The options of `cfg` (config.json's dict) that do not decide a run's numbers, by its mode and dataset
    (how the large datasets' files are read does not change them either)."""
    get, out = cfg.get, {'workers', 'decode_on', 'eval_only'}
    if get('mode') == 'baseline':
        out.add('aug')
    if get('mode') != 'sla+sd':
        out.add('temperature')
    if get('dataset') in SMALL:
        out |= {'class_list', 'image_size'}
    else:                                       # the large datasets: no held-out split, no long tail
        out |= {'val_size', 'val_indices', 'imbalance_ratio'}
    return out & set(cfg)


def run_seconds(rows, log=''):
    """A run's training time from its metrics rows (TIME_NOTE)."""
    total, previous = 0.0, 0
    for r in rows:
        total += r['seconds_per_iteration'] * (r['iteration'] - previous)
        previous = r['iteration']
    return total


def check(cfg):
    large = large_datasets.is_large(cfg.dataset)
    if not large and cfg.dataset not in SMALL:
        known = ', '.join(SMALL + list(large_datasets.LARGE_DATASETS))
        raise UserError(f'--dataset {cfg.dataset!r} is not one of: {known}, or imagenetN (N of ImageNet\'s classes, '
                        'e.g. imagenet100).')
    if large != (cfg.model in TORCHVISION_RESNETS):
        fix = (f'a torchvision ResNet: --model resnet18 (or {", ".join(TORCHVISION_RESNETS[1:])})' if large else
               f'a CIFAR ResNet: --model cresnet32 (or {", ".join(m for m in CRESNET_DEPTHS if m != "cresnet32")})')
        raise UserError(f'--model {cfg.model} does not go with --dataset {cfg.dataset}: '
                        f'{"the large datasets train" if large else "the 32-pixel datasets train"} {fix}.')
    if cfg.mode != 'baseline' and cfg.aug not in AUGMENTATIONS:
        raise UserError(f'--mode {cfg.mode} needs a transformation set: --aug {" | ".join(AUGMENTATIONS)}.')
    check_positive(cfg, 'batch_size', 'total_steps', 'eval_every', 'val_size', 'num_samples_per_class', 'lr',
                   'weight_decay', 'temperature', 'width', 'image_size', 'workers',
                   allow_zero=('num_samples_per_class', 'weight_decay', 'workers'))
    if not 0 <= cfg.momentum < 1:
        raise UserError(f'--momentum must be in [0, 1), got {cfg.momentum}.')
    if not 1 <= cfg.imbalance_ratio < math.inf:
        raise UserError(f'--imbalance_ratio must be at least 1 (1: the balanced training set; R > 1: the first class '
                        f'R times the last), got {cfg.imbalance_ratio}.')
    if cfg.imbalance_ratio > 1:
        if large:
            raise UserError(f'--imbalance_ratio makes long-tailed CIFAR-10/100; --dataset {cfg.dataset} has no such '
                            'setting here: drop --imbalance_ratio, or train on --dataset cifar10 or cifar100.')
        if cfg.num_samples_per_class:
            raise UserError('--imbalance_ratio and --num-samples-per-class both set how many images every class '
                            'keeps: give one of the two.')
        if cfg.val_indices:
            raise UserError('--imbalance_ratio draws the validation images itself, from the images the long tail '
                            'leaves unused, so that no validation image is taken out of the tail: drop --val-indices.')
    if cfg.eval_only and not cfg.resume:
        raise UserError('--eval-only evaluates a trained run: give it with --resume logs/train_sla/<run>.')
    if cfg.class_list and not (large and large_datasets.large_record(cfg.dataset)[1]):
        raise UserError(f'--class-list names the classes of an ImageNet subset (--dataset imagenetN, e.g. '
                        f'imagenet100); --dataset {cfg.dataset} has no class list: drop --class-list.')
    if large and cfg.val_indices:
        raise UserError('--val-indices picks CIFAR\'s validation images; the large datasets have no held-out '
                        'validation split (their official validation set is the test split, as in the '
                        'original): drop --val-indices.')
    if not large:
        create_dataset.check_data_present(cfg.dataset, cfg.data_root, stand_in(cfg), cfg.download)


def choose_images(cfg, kept):
    """Which images train, validate and test, chosen before anything is written (a bad input stops here): a
    resumed run's own (`kept`: its folder, read back), else drawn with the seed. CIFAR: --val-size images
    held out of the training file (or --val-indices), the rest for training (or --num-samples-per-class of
    every class, or a long tail: --imbalance_ratio); the official test set. A large dataset: its training
    images (or K per class; imagenetN: N classes) and its official validation set as test, no held-out split
    (as the original)."""
    if large_datasets.is_large(cfg.dataset):
        chosen = large_datasets.choose(cfg.dataset, cfg.data_root, cfg.synthetic, cfg.seed, cfg.class_list,
                                       cfg.num_samples_per_class, kept, with_train=not cfg.eval_only)
    else:
        train_x, train_y, test_x, test_y = create_dataset.load_both(cfg.dataset, cfg.data_root, stand_in(cfg), cfg.download)
        n_val = splits.validation_size(len(train_y), cfg.val_size, cfg.synthetic)
        train, val, lists = splits.held_out(train_y, cfg.seed, n_val, cfg.val_indices, cfg.num_samples_per_class,
                                            cfg.imbalance_ratio, kept)
        chosen = dict(arrays={'train': (train_x[train], train_y[train]), 'val': (train_x[val], train_y[val]),
                              'test': (test_x, test_y)}, lists=lists,
                      n_classes=create_dataset.DATASETS[cfg.dataset].num_classes)
    if not cfg.eval_only:
        n_train = len(chosen['pools']['train']) if 'pools' in chosen else len(chosen['arrays']['train'][1])
        splits.check_batch(cfg.batch_size, dist_env()[2], n_train)
    return chosen


def place_images(chosen, cfg, run):
    """The chosen images where the run reads them: CIFAR whole on the device, augmented per batch; a large
    dataset streamed from its files, decoded and augmented as the original's transforms. A new run writes the
    lists it keeps into its folder."""
    where = run.keep_lists(chosen['lists'])
    if 'files' in chosen:
        run.log.print(f'image files in {chosen["path"]}' + (f'; kept in {where}' if where else ''))
        return large_datasets.FileSplits(chosen['files'], chosen['n_classes'], run.device, run.shard, cfg.workers,
                                         cfg.decode_on, large_datasets.Augment(True, cfg.image_size, jitter=large_datasets.large_record(cfg.dataset)[0].jitter),
                                         large_datasets.Augment(False, cfg.image_size), pools=chosen['pools'])
    if cfg.imbalance_ratio > 1:
        counts = np.bincount(chosen['arrays']['train'][1], minlength=chosen['n_classes'])
        run.log.print(f'long-tailed training set (--imbalance_ratio {cfg.imbalance_ratio:g}): {counts[0]:,} images of '
                      f'class 0 down to {counts[-1]:,} of class {len(counts) - 1}, {counts.sum():,} in all')
    return Splits.on_device(chosen['arrays'], chosen['n_classes'], run.device, MEAN, STD,
                            flip=create_dataset.DATASETS[cfg.dataset].flip, shard=run.shard)


def evaluate_best(run, net, data, evaluate_kw):
    """--eval-only (the role of the original test.py): the test metrics of the run's best.pt, compared with
    the ones logged at its iteration."""
    path = os.path.join(run.dir, 'best.pt')
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist: the run has not evaluated a checkpoint yet '
                        '(it is written at the first validation, after --val-freq iterations).')
    best = load_checkpoint(path, run.device)
    net.load_state_dict(best['state']['model'])
    metrics = evaluate(net, *data.evaluation('test', run.cfg.batch_size), **evaluate_kw)
    run.log.print(line(best['best']['iteration'], 'test', metrics) + ' (best checkpoint, eval-only)')
    then = {k: best['row'][f'test_{k}'] for k in metrics}
    differ = {k: (v, then[k]) for k, v in metrics.items() if abs(v - then[k]) > 1e-4}
    run.log.print('the same test metrics as logged at that iteration' if not differ else
                  f'differs from the metrics logged at that iteration (now, then): {differ}')


def main(argv=None):
    cfg, cli = read_config('train_sla', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    if not cli.resumed:
        presets(cfg, cli.typed)
    check(cfg)
    if cli.resumed and cfg.imbalance_ratio != cli.resumed.saved.get('imbalance_ratio', 1.0):
        raise UserError(f'--imbalance_ratio cannot change on --resume (the run was started with '
                        f'{cli.resumed.saved.get("imbalance_ratio", 1.0):g}): start a new run for another ratio.')
    chosen = choose_images(cfg, cli.resumed and cli.resumed.dir)      # which images train, validate and test

    run = Run('train_sla', cfg, cli)
    dev, log, large = run.device, run.log, large_datasets.is_large(cfg.dataset)
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    data = place_images(chosen, cfg, run)                 # on the device (CIFAR), or streamed from their files

    # ---- the network: a shared ResNet trunk with the heads of the mode ----
    tf = None if cfg.mode == 'baseline' else Transformations(cfg.aug, dev)
    M = tf.M if tf else 1
    net = run.network(build_model(cfg.model, cfg.mode, data.n_classes, M, cfg.width), methods=('forward', 'features'))
    forward = run.wrap(net)                               # under torchrun: gradients averaged in backward
    evaluate_kw = dict(device=dev, mode=cfg.mode, tf=tf, T=cfg.temperature, large_loss=cfg.with_large_loss)
    if cfg.eval_only:
        return evaluate_best(run, net, data, evaluate_kw)

    # ---- optimiser: SGD, the learning rate x0.1 at 1/2 and 3/4 of the iterations (imagenet, inat: every
    # third), stepped every iteration ----
    N = cfg.total_steps
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg.dataset, N)
    objects = dict(model=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects, iteration=0, total_steps=N)
    it = state['iteration']
    stream = data.sampled('train', cfg.batch_size * run.world, cfg.seed, start=it, stop=N)   # distinct images a step
    stream.restore(state)
    for group in optimizer.param_groups:    # --weight-decay / --momentum typed with --resume take effect (lr: the schedule)
        group['weight_decay'], group['momentum'] = cfg.weight_decay, cfg.momentum
    if state['total_steps'] != N:
        kept_schedule = (f'milestones stay those of the saved run ({sorted(scheduler.milestones)})'
                         if isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) else
                         f'step size stays that of the saved run ({scheduler.step_size} iterations)')
        log.print(f'note: training now runs to {N} iterations; the learning-rate {kept_schedule}')
    names = METRICS[cfg.mode]
    evaluated = ('test',) if large else ('val', 'test')
    sizes = {split: data.sizes[split] for split in ('train', *evaluated)}
    log.print(f'{cfg.mode} on {cfg.dataset}{" (synthetic)" if cfg.synthetic else ""}: {cfg.model} width {cfg.width} '
              f'({sum(p.numel() for p in net.parameters()):,} parameters), '
              f'{"no transformations" if tf is None else f"{cfg.aug} (M={M})"}, '
              f'{" / ".join(f"{n} {split}" for split, n in sizes.items())} images, {N} iterations of {cfg.batch_size}')
    # The best model: on val single_acc (CIFAR, as the original); the large datasets have no held-out
    # validation split (the original's 'val' there is the official validation set, also its 'test'), so
    # on test single_acc.
    score = f'{evaluated[0]}_single_acc'

    # ---- training: i.i.d. batches of distinct images, with replacement across iterations ----
    run.describe([net], sizes, N - it, unit='iterations')
    # a run stopped between two evaluations (Ctrl-C) continues its running metrics
    meters, first_it = run.meters(names[0], state.get('meters')), state.get('first_it', it + 1)
    bar = run.interval(it, cfg.eval_every, N, unit='iteration')
    net.train()
    run.timer.lap()
    while it < N:
        x, y = stream.next()                    # this process's share of the global batch
        meters.add(len(y), **train_step(forward, optimizer, x, y, cfg.mode, tf, cfg.temperature, cfg.with_large_loss))
        scheduler.step()
        it += 1
        bar.update()
        if it % cfg.eval_every and it != N:
            run.stop_if_asked(objects, it, iteration=it, **stream.state(), total_steps=N,
                              meters=meters, first_it=first_it)      # Ctrl-C / SIGTERM
            continue
        bar.close()

        # ---- every eval_every iterations: train/val/test metrics (large: train/test), the best, a checkpoint ----
        lr_now = optimizer.param_groups[0]['lr']
        run.check_finite(meters, first_it, lr_now, unit='iteration')
        seconds_per_iteration = run.timer.lap() / meters.counts[names[0]] * cfg.batch_size
        train_means = meters.means()
        run.sync_buffers(net)
        metrics = {'train': {k: train_means[k] for k in names},
                   **{split: evaluate(net, *data.evaluation(split, cfg.batch_size), **evaluate_kw) for split in evaluated}}
        eval_seconds = run.timer.lap()
        row = {'iteration': it, 'lr': lr_now, 'seconds_per_iteration': seconds_per_iteration,
               **{f'{s}_{k}': v for s, values in metrics.items() for k, v in values.items()}}
        bad = data.bad_images()                 # images of the large datasets that could not be decoded
        if large:
            row['bad_images'] = len(bad)
        improved = run.evaluate_and_save(objects, row, score, keep=[k for k in ('test_single_acc', 'test_agg_acc')
                                                                    if k in row and k != score],
                                         iteration=it, **stream.state(), total_steps=N)
        for split, values in metrics.items():
            log.print(line(it, split, values))
        if improved:
            log.print(f'[iteration {it}] [BEST] ' + ' '.join(f'[{s} {row[f"{s}_single_acc"]:.4f}]' for s in evaluated)
                      + (f' [test agg {row["test_agg_acc"]:.4f}]' if 'test_agg_acc' in row else ''))
        log.print(f'[iteration {it}] [lr {lr_now:g}] [{seconds_per_iteration:.3f} s/iteration] [eval {eval_seconds:.1f} s]')
        run.note_bad_images(bad, since='evaluation')
        meters, first_it = run.meters(names[0]), it + 1
        run.stop_if_asked()                   # Ctrl-C / SIGTERM at an evaluation: its checkpoint is written
        bar = run.interval(it, cfg.eval_every, N, unit='iteration')
        run.timer.lap()

    best = run.best
    if best is not None:
        log.print(f'done: best {score.replace("_", " ", 1)} {best[score]:.4f} at iteration {best["iteration"]}'
                  + (f', test single_acc {best["test_single_acc"]:.4f}' if score != 'test_single_acc' else '')
                  + (f', test agg_acc {best["test_agg_acc"]:.4f}' if 'test_agg_acc' in best else ''))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
