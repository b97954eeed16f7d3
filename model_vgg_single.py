"""Single: the MAXL paper's single-task baseline, VGG-16 trained on the primary task of 4-level CIFAR-100
(or on the classes of another dataset: --dataset). Also the MAXL paper's data, training loop (fit), focal
loss and evaluation, which model_vgg_human.py and model_vgg_maxl.py use too.

    python model_vgg_single.py                                 # the paper's setting (real CIFAR-100)
    python model_vgg_single.py --dataset fashion-mnist --data_root /usr/share/datasets/fashion-mnist
    python model_vgg_single.py --synthetic --epochs 3 --width 0.125
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

import create_dataset
from machinery import splits
from machinery.distributed import all_reduce_sum
from machinery.models import VGG16, accuracy_count
from machinery.options import UserError, check_positive, hyperparameters, stand_in
from machinery.streams import DeviceData
from utils import Run, read_config, run_main

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
dataset = 'cifar100'       # cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, fashion-mnist
primary_level = 2          # cifar100: label level of the task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
num_samples_per_class = 0  # > 0: train on this many images of every primary class (drawn with the seed); 0: all
width = 1.0                # channel multiplier of the VGG-16 (1 = the paper's)
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3], 'dataset': list(create_dataset.DATASETS)}

MEAN, STD = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)     # the original normalisation (CIFAR-100; another dataset: its own)
HEADS = {'': 'PRI', 'aux_': 'AUX'}                # the metrics of head k are named with prefix k: loss, aux_loss
HIERARCHY = ('primary_level', 'aux_level')        # the options that pick levels of CIFAR-100's hierarchy


def check(cfg, typed):
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step', 'num_samples_per_class',
                   allow_zero=('num_samples_per_class',))
    check_hierarchy(cfg, typed)


# ---- the MAXL paper's data: a dataset's label columns, on the device ----------------------------------------

def has_hierarchy(dataset):
    return len(create_dataset.DATASETS[dataset].label_classes) > 1


def check_hierarchy(cfg, typed):
    """The hierarchy's options go with a dataset that has one (CIFAR-100)."""
    given = [name for name in HIERARCHY if name in typed]
    if given and not has_hierarchy(cfg.dataset):
        raise UserError(f'--{given[0]} picks a level of CIFAR-100\'s label hierarchy, and --dataset {cfg.dataset} has '
                        f'none (one label per image, {create_dataset.DATASETS[cfg.dataset].num_classes} classes, the '
                        f'primary task): drop --{given[0]}, or train on --dataset cifar100.')


def load_columns(cfg):
    """(train images, train label columns [N, k], test images, test label columns, the primary column): CIFAR-100's
    four hierarchy levels (the primary column is --primary_level), another dataset's one column; the training
    images cut to --num_samples_per_class of every primary class (a seeded draw, the same again on --resume)."""
    train_x, train_y = create_dataset.load(cfg.dataset, cfg.data_root, True, stand_in(cfg), cfg.download)
    test_x, test_y = create_dataset.load(cfg.dataset, cfg.data_root, False, stand_in(cfg), cfg.download)
    primary = cfg.primary_level if has_hierarchy(cfg.dataset) else 0
    if not has_hierarchy(cfg.dataset):
        train_y, test_y = train_y[:, None], test_y[:, None]
    if cfg.num_samples_per_class:
        keep = splits.samples_per_class(np.arange(len(train_y)), train_y[:, primary], cfg.num_samples_per_class, cfg.seed)
        train_x, train_y = train_x[keep], train_y[keep]
    return train_x, train_y, test_x, test_y, primary


def normalisation(dataset):
    """(mean, std) of the networks' inputs: the original's on CIFAR-100, the dataset's own otherwise."""
    return (MEAN, STD) if dataset == 'cifar100' else create_dataset.DATASETS[dataset].normalisation


def place(x, y, cfg, run):
    """Images and label columns whole on the run's device, cropped and flipped per batch as the dataset's record
    says, normalised (see normalisation)."""
    record = create_dataset.DATASETS[cfg.dataset]
    return DeviceData(x, y, run.device, *normalisation(cfg.dataset), pad=record.pad, flip=record.flip, shard=run.shard)


def psi_per_class(psi, n_primary):
    """Auxiliary classes per primary class: psi as given (one entry per primary class), or one value for all."""
    psi = list(psi) * n_primary if len(psi) == 1 else list(psi)
    if len(psi) != n_primary or min(psi) < 1:
        raise UserError(f'bad psi {psi}: it needs one positive entry per primary class ({n_primary} here), or one '
                        f'value for all of them; sum(psi) is then the number of auxiliary classes. Example: --psi 5 '
                        f'(5 auxiliary classes per primary class), or --psi 5x{n_primary}.')
    return psi


def n_classes(cfg, column):
    """The classes of a label column of cfg.dataset (CIFAR-100: of its level `column`)."""
    return create_dataset.DATASETS[cfg.dataset].label_classes[column]


# ---- the MAXL paper's loss, step and evaluation ---------------------------------------------------------

def focal_loss(probs, target):
    """Per-sample focal-style loss of MAXL: -sum_c t_c (1 - p_c)^2 log(p_c + 1e-20) (on probabilities, as
    the original). `target` is either class indices (one-hot targets) or a soft target shaped as probs."""
    if target.dtype in (torch.int64, torch.int32):
        logp = torch.log(probs.gather(1, target[:, None]) + 1e-20)
        p = probs.gather(1, target[:, None])
        return (-(1 - p) ** 2 * logp).squeeze(1)
    return torch.sum(-target * (1 - probs) ** 2 * torch.log(probs + 1e-20), dim=1)


def train_step(net, x, y, optimizer):
    """One SGD step on the focal loss; returns sums over the batch (loss, correct)."""
    logits = net(x)
    loss = focal_loss(F.softmax(logits, dim=1), y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {'loss': loss.detach() * len(x), 'acc': accuracy_count(logits, y)}


@torch.no_grad()
def evaluate(net, data, columns, batch_size):
    """Eval mode over `data`: the mean focal loss and accuracy of head k against label column columns[k], for
    the first len(columns) heads: {'loss', 'acc', 'aux_loss', 'aux_acc'} (under torchrun over every process's
    share)."""
    net.eval()
    sums = torch.zeros(2 * len(columns), device=data.device)
    for x, labels in data.batches(batch_size):
        outs = net(x)
        outs = (outs,) if torch.is_tensor(outs) else outs
        for k, column in enumerate(columns):
            y = labels[:, column]
            sums[2 * k] += focal_loss(F.softmax(outs[k], dim=1), y).sum()
            sums[2 * k + 1] += accuracy_count(outs[k], y)
    net.train()
    names = [prefix + k for prefix in list(HEADS)[:len(columns)] for k in ('loss', 'acc')]
    return dict(zip(names, (all_reduce_sum(sums) / len(data)).tolist()))


# ---- the training loop (Single and Human) -----------------------------------------------------------------

def fit(run, net, train, test, step, columns, tested=None):
    """Train `net` as the MAXL code trains its baselines: plain SGD, its learning rate times lr_gamma every
    lr_step epochs; each epoch one shuffled pass of augmented batches, step(forward, x, *label columns
    `columns`, optimizer) -> sums over the batch (loss, acc and, for a second head, aux_loss, aux_acc), then
    one test of head k against label column tested[k] (default: columns; Random and K-means test their
    primary head only). forward: run.wrap(net), which under torchrun averages the gradients in backward."""
    cfg = run.cfg
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    objects = dict(net=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects, epoch=-1, step=0)
    forward = run.wrap(net)
    n_steps, per_epoch = state['step'], train.num_batches(cfg.batch_size)
    run.describe([net], {'train': len(train), 'test': len(test)}, cfg.epochs * per_epoch)

    for epoch, data_rng in run.epochs(state['epoch'], cfg.epochs):
        net.train()
        meters, first_step = run.meters('loss'), n_steps        # the training loss watched for a blow-up
        bar = run.progress(per_epoch, f'epoch {epoch}', epoch * per_epoch, cfg.epochs * per_epoch)
        for x, labels in train.batches(cfg.batch_size, data_rng, shuffle=True, augment=True):
            meters.add(len(x), **step(forward, x, *(labels[:, c] for c in columns), optimizer))
            n_steps += 1
            bar.update()
        bar.close()
        run.check_finite(meters, first_step, optimizer.param_groups[0]['lr'])   # stops before testing or saving
        run.sync_buffers(net)
        tests = evaluate(net, test, columns if tested is None else tested, cfg.batch_size)
        scheduler.step()
        row = dict(epoch=epoch, step=n_steps, **prefixed('train_', meters.means()), **prefixed('test_', tests),
                   seconds=run.timer.lap())
        run.evaluate_and_save(objects, row, 'test_acc', epoch=epoch, step=n_steps)
        run.log.print(epoch_line(row, ' || '.join(heads_text(row, split) for split in ('train', 'test'))))
        run.stop_if_asked()                   # Ctrl-C / SIGTERM: after the epoch, whose checkpoint is written
    finish(run)


def prefixed(prefix, values):
    return {prefix + k: v for k, v in values.items()}


def heads_text(row, split):
    """'TRAIN [LOSS|ACC.]: PRI 0.1234 0.5678 AUX ...', the original's text of a split's heads."""
    return f'{split.upper()} [LOSS|ACC.]: ' + ' '.join(f'{name} {row[f"{split}_{p}loss"]:.4f} {row[f"{split}_{p}acc"]:.4f}'
                                                     for p, name in HEADS.items() if f'{split}_{p}loss' in row)


def epoch_line(row, text):
    """The original's line of an epoch: 'EPOCH: e ITER: s | <text> | <seconds>s'."""
    return f'EPOCH: {row["epoch"]:04d} ITER: {row["step"]:06d} | {text} | {row["seconds"]:.1f}s'


def finish(run):
    """The closing line of an epoch-based run."""
    last, best = run.checkpoints.last, run.best
    if last is not None:
        run.log.print(f'done after {last["epoch"] + 1} epochs: test accuracy {last["test_acc"]:.4f}, '
                      f'best {best["test_acc"]:.4f}')


# ---- how results.py tables and plots the runs of the MAXL paper's three scripts ----------------------------

UNIT = 'epochs'                # what the first column of metrics.csv counts (numbered from 0)
PAPER = 'MAXL (NeurIPS 2019)'  # the runs of one paper share a panel of results.py's plot
HEADLINE = ['primary_level', 'num_samples_per_class', 'width']          # the settings a results row always shows (with the dataset)
METHOD_OPTIONS = []                            # the settings the method's name says
TIME_NOTE = 'the sum of metrics.csv `seconds` (each epoch: training, the meta pass for MAXL, test)'
# The number a MAXL run reports: the mean test accuracy of its last 5 epochs (fewer if it has fewer), as the
# paper's first version reports each point (the last 5 of 200 epochs); no epoch is chosen on the test set.
SELECTION = 'last 5'


def reported(cfg):
    """[(method, metrics column, selection)]: a Single run reports the primary task's mean test accuracy over its
    last 5 epochs (SELECTION)."""
    return [('Single', 'test_acc', SELECTION)]


def unused_options(cfg):
    """The options of `cfg` (config.json's dict) that do not decide a run's numbers: the hierarchy's, on a dataset
    without one."""
    return set() if has_hierarchy(cfg.get('dataset', 'cifar100')) else set(HIERARCHY) & set(cfg)


def run_seconds(rows, log=''):
    """A run's time from its metrics rows (TIME_NOTE)."""
    return sum(r['seconds'] for r in rows)


def main(argv=None):
    cfg, cli = read_config('model_vgg_single', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    check(cfg, cli.typed)
    train_x, train_y, test_x, test_y, primary = load_columns(cfg)

    run = Run('model_vgg_single', cfg, cli)
    train, test = place(train_x, train_y, cfg, run), place(test_x, test_y, cfg, run)     # on the device, whole
    net = run.network(VGG16({'classifier': n_classes(cfg, primary)}, cfg.width))
    fit(run, net, train, test, train_step, columns=(primary,))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
