"""SLA: Self-supervised Label Augmentation (Lee, Hwang, Shin; ICML 2020) on CIFAR-10/100 with CIFAR ResNets,
and on the large datasets (ImageNet and its class subsets, tiny-ImageNet, iNaturalist 2018, CUB-200, MIT-67,
Stanford Dogs) with torchvision ResNets.

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
from machinery import large_datasets
from machinery.distributed import Wrapped, all_reduce_sum, dist_env
from machinery.models import CRESNET_DEPTHS, ImageNetResNet, TORCHVISION_RESNETS, accuracy_count, cifar_resnet
from machinery.options import UserError, check_positive, hyperparameters, stand_in
from machinery.checkpoints import load_checkpoint
from utils import Run, device_generator, resolve_run_dir, run_main

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
imbalance_ratio = 1.0        # CIFAR, R > 1: long-tailed training set (Cui et al. 2019), class i keeps floor(n_max * R^(-i/(C-1))) of the n_max images a class has after the validation split (drawn balanced then); 1: off
val_size = 5000              # CIFAR: validation images held out of the training file (synthetic: at most a tenth of it)
val_indices = ''             # CIFAR: a file of validation indices to use instead of drawing them (.txt or the original's .npy)
width = 1.0                  # channel multiplier of the ResNet (1 = the paper's)
eval_only = False            # with --resume RUN: print the test metrics of the run's best checkpoint, no training
class_list = ''              # imagenetN: a file naming its N classes, one class folder name (wnid) a line (default: drawn with the seed)
image_size = 224             # ImageNet: training crop size (evaluation: shorter side to size*256/224, centre crop)
workers = 4                  # ImageNet: DataLoader worker processes per process (file reading; decoding on the CPU path)
decode_on = 'auto'           # ImageNet: decode and augment JPEGs on the gpu (nvJPEG, when training on CUDA) or the cpu workers
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see options.RUN_OPTIONS)
HYPERPARAMETERS = hyperparameters(globals())

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)     # CIFAR: the original normalisation, pixels in [-1, 1] (large: ImageNet's)
MODES = ['baseline', 'da', 'mt', 'sla', 'sla+sd']
CIFAR = ['cifar10', 'cifar100']

# A large dataset's own defaults, taken for every value not typed on the command line: the original's
# default network (torchvision's ResNet-18) and, for ImageNet, its first public schedule (train.py's
# --num-iterations 900000 --val-freq 10000).
LARGE = dict(model='resnet18')
IMAGENET = dict(total_steps=900000, eval_every=10000)


def presets(cfg, given):
    if large_datasets.is_large(cfg.dataset):
        for name, value in (LARGE | (IMAGENET if cfg.dataset == 'imagenet' else {})).items():
            if name not in given:
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


# ---- the data: CIFAR on the device, the large datasets streamed from their files ---------------------------

TRAIN_INDICES, CLASSES = 'train_indices.txt', 'classes.txt'      # kept in the run folder, read back on resume


# ---- long-tailed CIFAR (--imbalance_ratio R): the exponential profile of Cui et al. (CVPR 2019) -------------

def long_tailed_counts(n_max, n_classes, ratio):
    """Images kept of class i = 0..C-1: floor(n_max * ratio^(-i / (C - 1))): n_max of class 0 down to
    n_max / ratio of the last (CIFAR-10, n_max 5,000, R 100: 5,000, 2,997, ..., 83, 50)."""
    return [math.floor(n_max * ratio ** (-i / (n_classes - 1))) for i in range(n_classes)]


def long_tailed_split(labels, n_val, ratio, seed):
    """(train, val) indices into a class-balanced training file, for --imbalance_ratio. Each class's
    images in an order drawn with the seed: the first n_val // C are validation images (the validation
    set stays balanced, as the test set; the best checkpoint is chosen on it as in the balanced runs), and
    of the n_max left to every class (the balanced pool), class i keeps the next long_tailed_counts[i]."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    n_classes = len(counts)
    if counts.min() != counts.max():
        raise UserError(f'--imbalance_ratio makes a long-tailed set out of a balanced training file, but this one '
                        f'has {counts.min()} to {counts.max()} images per class. Use the official files or the '
                        'stand-in as written (both balanced).')
    per_val = n_val // n_classes
    if per_val < 1:
        raise UserError(f'--imbalance_ratio draws the validation images class-balanced, but {n_val} validation '
                        f'images are fewer than one per class ({n_classes} classes): raise --val-size.')
    n_max = int(counts[0]) - per_val
    keep = long_tailed_counts(n_max, n_classes, ratio)
    if keep[-1] < 1:
        raise UserError(f'--imbalance_ratio {ratio:g} leaves class {n_classes - 1} no training image: each class has '
                        f'{n_max} after the validation split, so the ratio can be at most {n_max}.')
    rng = np.random.default_rng([seed, 2])
    train, val = [], []
    for c in range(n_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        val.append(order[:per_val])
        train.append(order[per_val:per_val + keep[c]])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


def long_tailed_draw(cfg):
    """A new long-tailed run's (train, val) indices, drawn and checked before anything is written."""
    labels = load_split(cfg, train=True)[1]
    train, val = long_tailed_split(labels, create_dataset.sla_val_size(len(labels), cfg.val_size, cfg.synthetic),
                                   cfg.imbalance_ratio, cfg.seed)
    world = dist_env()[2]
    if cfg.batch_size * world > len(train):
        raise UserError(f'--batch-size {cfg.batch_size} x {world} process(es) exceeds the {len(train)} images of the '
                        f'long-tailed training set (a batch holds distinct images): lower it.')
    return train, val


def load_split(cfg, train):
    images, labels = create_dataset.load(cfg.dataset, cfg.data_root, train, stand_in(cfg), cfg.download)
    return images, create_dataset.DATASETS[cfg.dataset].primary_labels(labels)     # CIFAR-100: the 100 fine classes


def split_indices(cfg, run_dir, labels, write=True, drawn=None):
    """Train / val indices into the training file. A new run draws the validation images with the seed
    (or loads --val-indices) and writes them to the run folder; a resumed run reads them back from there.
    drawn: a new long-tailed run's (train, val), drawn by long_tailed_draw, written here the same way."""
    n = len(labels)
    val_file, train_file = os.path.join(run_dir, 'val_indices.txt'), os.path.join(run_dir, TRAIN_INDICES)
    if drawn is not None:
        if write:
            create_dataset.write_indices(val_file, drawn[1])
            create_dataset.write_indices(train_file, drawn[0])
        return drawn
    if cfg.imbalance_ratio > 1 and not os.path.isfile(train_file):
        raise UserError(f'{train_file} is missing: a long-tailed run (--imbalance_ratio) keeps its training images '
                        'there and cannot continue without them. Start a new run instead.')
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


class DeviceSplits:
    """CIFAR: the whole training file and test set on the device; 45,000 train / 5,000 val drawn from the
    training file (split_indices), and the official test set. Training batches: distinct images drawn
    afresh each iteration (sample_batch), cropped and flipped on the device, all from one generator that
    is saved with the checkpoint."""
    evaluated = ('val', 'test')             # the best is kept on the first

    def __init__(self, cfg, run, drawn=None):
        dev = run.device
        self.n_classes = create_dataset.DATASETS[cfg.dataset].num_classes
        # batch_size per process, as the original's per GPU
        self.batch_size, self.global_batch = cfg.batch_size, cfg.batch_size * run.world
        test_x, test_y = load_split(cfg, train=False)
        self.splits = {'test': create_dataset.DeviceData(test_x, test_y, dev, MEAN, STD, shard=run.shard)}
        if cfg.eval_only:
            return
        train_x, train_y = load_split(cfg, train=True)
        train_idx, val_idx = split_indices(cfg, run.dir, train_y, write=run.rank == 0, drawn=drawn)
        if cfg.imbalance_ratio > 1:
            counts = np.bincount(train_y[train_idx], minlength=self.n_classes)
            run.log.print(f'long-tailed training set (--imbalance_ratio {cfg.imbalance_ratio:g}): {counts[0]:,} images '
                          f'of class 0 down to {counts[-1]:,} of class {self.n_classes - 1}, {len(train_idx):,} in all')
        self.train = create_dataset.DeviceData(train_x[train_idx], train_y[train_idx], dev, MEAN, STD, shard=run.shard)
        self.splits['val'] = create_dataset.DeviceData(train_x[val_idx], train_y[val_idx], dev, MEAN, STD,
                                                       shard=run.shard)
        if self.global_batch > len(self.train):
            raise UserError(f'--batch-size {cfg.batch_size} x {run.world} process(es) exceeds the {len(self.train)} '
                            'training images (a batch holds distinct images): lower it.')
        self.sizes = {'train': len(self.train), 'val': len(self.splits['val']), 'test': len(self.splits['test'])}
        self.rng = device_generator(dev, cfg.seed)        # batch indices, crops and flips

    def start(self, iteration, state):
        if 'data_rng' in state:
            self.rng.set_state(state['data_rng'].cpu())

    def next(self):
        return sample_batch(self.train, self.global_batch, self.rng)

    def eval_batches(self, split):
        data = self.splits[split]
        return data.batches(self.batch_size), len(data)

    def state(self):
        return {'data_rng': self.rng.get_state()}


def large_files(cfg):
    """A large dataset's images, chosen before anything is written (a bad input stops here): the training
    list (None with --eval-only), the test list (the official validation set), the class names in label
    order and the pool of training images (indices into the training list).
    imagenetN: N classes of ImageNet named by --class-list or drawn with the seed (a resumed run: its
    classes.txt), relabelled 0..N-1 in list order, in train and test alike (the original's labels.index(y)).
    --num-samples-per-class K: K images of every class drawn with the seed (a resumed run: its
    train_indices.txt). The original reads both from split files that are not public."""
    path = large_datasets.large_data_path(cfg.dataset, cfg.data_root, cfg.synthetic)
    ds, n_subset = large_datasets.large_record(cfg.dataset)
    run_dir = resolve_run_dir(cfg.resume, cfg.logdir, 'train_sla') if cfg.resume else None
    test = large_datasets.large_split(cfg.dataset, path, 'test')
    train = None if cfg.eval_only else large_datasets.large_split(cfg.dataset, path, 'train')
    classes = (test if train is None else train).classes
    if n_subset:
        known, what = {name: k for k, name in enumerate(classes)}, 'classes (class folder names)'
        given = os.path.join(run_dir, CLASSES) if run_dir else cfg.class_list
        if given:
            picked = large_datasets.read_names(given, known, what)
            if len(picked) != n_subset:
                raise UserError(f'{given!r} names {len(picked)} classes, but --dataset {cfg.dataset} asks for '
                                f'{n_subset}: use --dataset imagenet{len(picked)}, or a list of {n_subset} classes.')
        else:
            picked = large_datasets.draw_classes(len(classes), n_subset, cfg.seed)
        classes = [classes[k] for k in picked]
        in_test = {name: k for k, name in enumerate(test.classes)}
        missing = [name for name in classes if name not in in_test]
        if missing:
            raise UserError(f'the test split in {path} has no folder for {len(missing)} of the chosen classes '
                            f'(first: {missing[:3]}): its class folders must be those of the training split.')
        test = large_datasets.class_subset(test, [in_test[name] for name in classes])
        if train is not None:
            train = large_datasets.class_subset(train, picked)
    elif ds.layout == 'folder' and test.classes != classes:
        raise UserError(f'the test split in {path} has other class folders than the training split '
                        f'({len(test.classes)} and {len(classes)}): the labels would not match. Give both splits '
                        'the same class folders.')
    for split in (train, test):
        if split is not None and len(split) and split.labels.max() >= len(classes):
            raise UserError(f'labels up to {split.labels.max()} in {path}, but {len(classes)} classes: the class '
                            'ids must be 0..C-1.')
    pool = None
    if train is not None:
        pool = np.arange(len(train))
        k = cfg.num_samples_per_class
        index_file = run_dir and os.path.join(run_dir, TRAIN_INDICES)
        if k and index_file and os.path.isfile(index_file):
            pool = create_dataset.sla_load_indices(index_file, len(train))
        elif k:
            counts = np.bincount(train.labels, minlength=len(classes))
            if counts.min() < k:
                raise UserError(f'--num-samples-per-class {k}: class {classes[counts.argmin()]} has only '
                                f'{counts.min()} training images: use at most {counts.min()}.')
            pool = create_dataset.sla_samples_per_class(pool, train.labels, k, cfg.seed)
        world = dist_env()[2]
        if cfg.batch_size * world > len(pool):
            raise UserError(f'--batch-size {cfg.batch_size} x {world} process(es) exceeds the {len(pool)} training '
                            'images (a batch holds distinct images): lower it.')
    return dict(path=path, train=train, test=test, classes=classes, subset=bool(n_subset), pool=pool)


class FileSplits:
    """The large datasets: the images read from their files where they lie (ImageFolder trees, or the
    iNaturalist JSON lists) by DataLoader workers, decoded and augmented as the original's torchvision
    transforms (training: random-resized crop of area 0.08-1 and aspect 3/4-4/3 to image_size, flip, for
    iNaturalist colour jitter; evaluation: shorter side to image_size * 256/224, centre crop), on the GPU
    when training on CUDA, normalised with ImageNet's mean and std. Training batches: distinct images
    drawn afresh each iteration (the original's random.sample), global batch t a pure function of t, so a
    resumed run continues the stream exactly.
    No held-out validation split, as in the original: its 'val' loader of a large dataset is the official
    validation set, the same images as its 'test' loader. They are evaluated once, as test."""
    evaluated = ('test',)                   # the best is kept on test single_acc

    def __init__(self, cfg, run, files):
        self.cfg, self.run = cfg, run
        self.train, self.test, self.pool = files['train'], files['test'], files['pool']
        self.n_classes = len(files['classes'])
        self.decode_on = cfg.decode_on if cfg.decode_on != 'auto' else ('gpu' if run.device.type == 'cuda' else 'cpu')
        size = cfg.image_size
        self.augment = large_datasets.Augment(True, size, jitter=large_datasets.large_record(cfg.dataset)[0].jitter)
        self.test_augment = large_datasets.Augment(False, size)
        self.stream, self.done = None, []          # the training stream; the evaluation streams since bad_images()
        self.sizes = {'train': 0 if self.pool is None else len(self.pool), 'test': len(self.test)}
        kept = []
        if files['subset']:
            kept.append(f'classes in {os.path.join(run.dir, CLASSES)}')
        if cfg.num_samples_per_class:
            kept.append(f'training images in {os.path.join(run.dir, TRAIN_INDICES)}')
        self.where = f'image files in {files["path"]}' + (f'; {", ".join(kept)}' if kept else '')
        if run.rank == 0 and not run.resuming:       # under torchrun every process chose the same
            if files['subset']:
                large_datasets.write_lines(os.path.join(run.dir, CLASSES), files['classes'])
            if cfg.num_samples_per_class:
                create_dataset.write_indices(os.path.join(run.dir, TRAIN_INDICES), self.pool)

    def _batches(self, source, plan, augment, seed, start, stop):
        return large_datasets.Batches(source, plan, augment, self.run.device, seed, start, stop, self.run.shard,
                                      self.cfg.workers, self.decode_on)

    def start(self, iteration, state):
        """The training stream from global batch `iteration` on (batch_size images per process)."""
        seed = self.cfg.seed
        plan = large_datasets.BatchPlan(self.pool, self.cfg.batch_size * self.run.world, 2 * seed, 'sample')
        self.stream = self._batches(self.train, plan, self.augment, 2 * seed + 1, iteration, self.cfg.total_steps)
        self.batches = iter(self.stream)

    def next(self):
        return next(self.batches)

    def eval_batches(self, split):
        n, B = len(self.test), self.cfg.batch_size * self.run.world
        plan = large_datasets.BatchPlan(np.arange(n), B, 0, 'ordered')
        batches = self._batches(self.test, plan, self.test_augment, 0, 0, -(-n // B))
        self.done.append(batches)
        return batches, n

    def state(self):
        return {}

    def bad_images(self):
        """The images that could not be decoded since the last call (each replaced by another of its batch)."""
        streams = [b for b in [self.stream, *self.done] if b is not None]
        out = [bad for b in streams for bad in b.bad]
        for b in streams:
            b.bad.clear()
        self.done = []
        return out


# ---- the run ---------------------------------------------------------------------------------------------

def validate(cfg):
    large = large_datasets.is_large(cfg.dataset)
    if not large and cfg.dataset not in CIFAR:
        known = ', '.join(CIFAR + list(large_datasets.LARGE_DATASETS))
        raise UserError(f'--dataset {cfg.dataset!r} is not one of: {known}, or imagenetN (N of ImageNet\'s classes, '
                        'e.g. imagenet100).')
    if large != (cfg.model in TORCHVISION_RESNETS):
        fix = (f'a torchvision ResNet: --model resnet18 (or {", ".join(TORCHVISION_RESNETS[1:])})' if large else
               f'a CIFAR ResNet: --model cresnet32 (or {", ".join(m for m in CRESNET_DEPTHS if m != "cresnet32")})')
        raise UserError(f'--model {cfg.model} does not go with --dataset {cfg.dataset}: '
                        f'{"the large datasets train" if large else "CIFAR trains"} {fix}.')
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
            raise UserError('--imbalance_ratio draws the validation images itself, class-balanced, so that every '
                            'class keeps the same pool for its long-tailed share: drop --val-indices.')
    if cfg.eval_only and not cfg.resume:
        raise UserError('--eval-only evaluates a trained run: give it with --resume logs/train_sla/<run>.')
    if cfg.class_list and not (large and large_datasets.large_record(cfg.dataset)[1]):
        raise UserError(f'--class-list names the classes of an ImageNet subset (--dataset imagenetN, e.g. '
                        f'imagenet100); --dataset {cfg.dataset} has no class list: drop --class-list.')
    if cfg.class_list and not cfg.resume and not os.path.isfile(cfg.class_list):
        raise UserError(f'--class-list {cfg.class_list!r} is not a file (one class folder name a line).')
    if large:
        if cfg.val_indices:
            raise UserError('--val-indices picks CIFAR\'s validation images; the large datasets have no held-out '
                            'validation split (their official validation set is the test split, as in the '
                            'original): drop --val-indices.')
        return                                  # the files: large_files
    n_classes = create_dataset.DATASETS[cfg.dataset].num_classes
    if cfg.num_samples_per_class and cfg.num_samples_per_class * n_classes < cfg.batch_size:
        raise UserError(f'--num-samples-per-class {cfg.num_samples_per_class} leaves '
                        f'{cfg.num_samples_per_class * n_classes} training images, fewer than --batch-size '
                        f'{cfg.batch_size} (a batch holds distinct images): lower --batch-size.')
    if cfg.val_indices and not os.path.isfile(cfg.val_indices):
        raise UserError(f'--val-indices {cfg.val_indices!r} is not a file.')
    create_dataset.check_data_present(cfg.dataset, cfg.data_root, stand_in(cfg), cfg.download)


def main(argv=None):
    files = {}

    def check(cfg):                 # the values, then a large dataset's files, classes and samples: before any writing
        validate(cfg)
        if large_datasets.is_large(cfg.dataset):
            files.update(large_files(cfg))
        elif cfg.imbalance_ratio > 1 and not cfg.resume:      # a resumed run reads its indices back
            files['drawn'] = long_tailed_draw(cfg)

    run = Run('train_sla', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=check, choices=CHOICES,
              presets=presets)
    cfg, dev, log = run.cfg, run.device, run.log
    large = large_datasets.is_large(cfg.dataset)
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # ---- data: CIFAR 45,000 train / 5,000 val from the training file and the official test set, on the
    # device; a large dataset's training images and its official validation set (test) streamed from files ----
    if run.resuming and cfg.imbalance_ratio != run.saved_config.get('imbalance_ratio', 1.0):
        raise UserError(f'--imbalance_ratio cannot change on --resume (the run was started with '
                        f'{run.saved_config.get("imbalance_ratio", 1.0):g}): start a new run for another ratio.')
    data = FileSplits(cfg, run, files) if large else DeviceSplits(cfg, run, files.get('drawn'))
    tf = None if cfg.mode == 'baseline' else Transformations(cfg.aug, dev)
    M = tf.M if tf else 1
    net = run.network(build_model(cfg.model, cfg.mode, data.n_classes, M, cfg.width), methods=('forward', 'features'))
    forward = run.wrap(net)                               # under torchrun: gradients averaged in backward
    evaluate_kw = dict(device=dev, mode=cfg.mode, tf=tf, T=cfg.temperature, large_loss=cfg.with_large_loss)

    # ---- evaluation only: the role of the original test.py ----
    if cfg.eval_only:
        path = os.path.join(run.dir, run.BEST)
        if not os.path.isfile(path):
            raise UserError(f'{path} does not exist: the run has not evaluated a checkpoint yet '
                            '(it is written at the first validation, after --val-freq iterations).')
        best = load_checkpoint(path, dev)
        net.load_state_dict(best['state']['model'])
        metrics = evaluate(net, *data.eval_batches('test'), **evaluate_kw)
        log.print(line(best['best']['iteration'], 'test', metrics) + ' (best checkpoint, eval-only)')
        then = {k: best['row'][f'test_{k}'] for k in metrics}
        differ = {k: (v, then[k]) for k, v in metrics.items() if abs(v - then[k]) > 1e-4}
        log.print('the same test metrics as logged at that iteration' if not differ else
                  f'differs from the metrics logged at that iteration (now, then): {differ}')
        return

    # ---- optimiser: SGD, the learning rate x0.1 at 1/2 and 3/4 of the iterations (imagenet, inat: every
    # third), stepped every iteration ----
    N = cfg.total_steps
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg.dataset, N)
    objects = dict(model=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects, iteration=0, total_steps=N)
    it = state['iteration']
    data.start(it, state)                   # the training batches from iteration `it` on
    for group in optimizer.param_groups:    # --weight-decay / --momentum typed with --resume take effect (lr: the schedule)
        group['weight_decay'], group['momentum'] = cfg.weight_decay, cfg.momentum
    if state['total_steps'] != N:
        kept = (f'milestones stay those of the saved run ({sorted(scheduler.milestones)})'
                if isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) else
                f'step size stays that of the saved run ({scheduler.step_size} iterations)')
        log.print(f'note: training now runs to {N} iterations; the learning-rate {kept}')
    names = METRICS[cfg.mode]
    n_params = sum(p.numel() for p in net.parameters())
    log.print(f'{cfg.mode} on {cfg.dataset}{" (synthetic)" if cfg.synthetic else ""}: {cfg.model} width {cfg.width} '
              f'({n_params:,} parameters), {"no transformations" if tf is None else f"{cfg.aug} (M={M})"}, '
              f'{" / ".join(f"{n} {split}" for split, n in data.sizes.items())} images, {N} iterations of '
              f'{cfg.batch_size}')
    if large:
        log.print(data.where)
    # The best model: on val single_acc (CIFAR, as the original); the large datasets have no held-out
    # validation split (the original's 'val' there is the official validation set, also its 'test'), so
    # on test single_acc.
    score = f'{data.evaluated[0]}_single_acc'

    # ---- training: i.i.d. batches of distinct images, with replacement across iterations ----
    run.describe([net], data.sizes, N - it, unit='iterations')
    # a run stopped between two evaluations (Ctrl-C) continues its running metrics
    meters, first_it = run.meters(names[0], state.get('meters')), state.get('first_it', it + 1)

    def stretch(it):                            # the iterations from it to the next evaluation
        end = min(N, (it // cfg.eval_every + 1) * cfg.eval_every)
        return run.progress(end - it, f'to iteration {end}', it, N)
    bar = stretch(it)
    net.train()
    run.timer.lap()
    while it < N:
        x, y = data.next()                      # this process's share of the global batch
        meters.add(len(y), **train_step(forward, optimizer, x, y, cfg.mode, tf, cfg.temperature, cfg.with_large_loss))
        scheduler.step()
        it += 1
        bar.update()
        if it % cfg.eval_every and it != N:
            run.stop_if_asked(objects, it, iteration=it, **data.state(), total_steps=N,
                              meters=meters, first_it=first_it)      # Ctrl-C / SIGTERM
            continue
        bar.close()

        # ---- every eval_every iterations: train/val/test metrics (large: train/test), the best, a checkpoint ----
        run.check_finite(meters, first_it, scheduler.get_last_lr()[0], unit='iteration')
        seconds_per_iteration = run.timer.lap() / meters.counts[names[0]] * cfg.batch_size
        lr_now = scheduler.get_last_lr()[0]
        train_means = meters.means()
        run.sync_buffers(net)
        metrics = {'train': {k: train_means[k] for k in names},
                   **{split: evaluate(net, *data.eval_batches(split), **evaluate_kw) for split in data.evaluated}}
        eval_seconds = run.timer.lap()
        row = {'iteration': it, 'lr': lr_now, 'seconds_per_iteration': seconds_per_iteration,
               **{f'{s}_{k}': v for s, values in metrics.items() for k, v in values.items()}}
        if large:                               # images that could not be decoded
            bad = data.bad_images()
            row['bad_images'] = len(bad)
            if bad:
                log.print(f'note: {len(bad)} image(s) could not be decoded since the last evaluation and were '
                          f'replaced by another image of their batch; first: {bad[0][0]} ({bad[0][1]})')

        def lines(improved):
            out = [line(it, split, values) for split, values in metrics.items()]
            if improved:
                out.append(f'[iteration {it}] [BEST] '
                           + ' '.join(f'[{s} {row[f"{s}_single_acc"]:.4f}]' for s in data.evaluated)
                           + (f' [test agg {row["test_agg_acc"]:.4f}]' if 'test_agg_acc' in row else ''))
            return out + [f'[iteration {it}] [lr {lr_now:g}] [{seconds_per_iteration:.3f} s/iteration] '
                          f'[eval {eval_seconds:.1f} s]']

        run.evaluate_and_save(objects, row, score, keep=[k for k in ('test_single_acc', 'test_agg_acc')
                                                         if k in row and k != score],
                              lines=lines, iteration=it, **data.state(), total_steps=N)
        meters, first_it = run.meters(names[0]), it + 1
        run.stop_if_asked()                   # Ctrl-C / SIGTERM at an evaluation: its checkpoint is written
        bar = stretch(it)
        run.timer.lap()

    best = run.best
    if best is not None:
        log.print(f'done: best {score.replace("_", " ", 1)} {best[score]:.4f} at iteration {best["iteration"]}'
                  + (f', test single_acc {best["test_single_acc"]:.4f}' if score != 'test_single_acc' else '')
                  + (f', test agg_acc {best["test_agg_acc"]:.4f}' if 'test_agg_acc' in best else ''))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
