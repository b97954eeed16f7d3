"""Single: the MAXL paper's single-task baseline, VGG-16 trained on the primary task of 4-level CIFAR-100.
Also the MAXL paper's training loop (fit), its focal loss and its evaluation, which model_vgg_human.py and
model_vgg_maxl.py use too.

    python model_vgg_single.py                                 # the paper's setting (real CIFAR-100)
    python model_vgg_single.py --synthetic --epochs 3 --width 0.125
"""
import sys

import torch
import torch.nn.functional as F

import create_dataset
from machinery.distributed import all_reduce_sum
from machinery.models import VGG16, accuracy_count
from machinery.options import check_positive, hyperparameters, stand_in
from machinery.streams import DeviceData
from utils import Run, read_config, run_main

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
primary_level = 2          # label level of the task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
width = 1.0                # channel multiplier of the VGG-16 (1 = the paper's)
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3]}

MEAN, STD = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)     # the original normalisation
HEADS = {'': 'PRI', 'aux_': 'AUX'}                # the metrics of head k are named with prefix k: loss, aux_loss


def check(cfg):
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step')
    create_dataset.check_data_present('cifar100', cfg.data_root, stand_in(cfg), cfg.download)


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
HEADLINE = ['primary_level', 'width']          # the settings a results row always shows
METHOD_OPTIONS = []                            # the settings the method's name says
TIME_NOTE = 'the sum of metrics.csv `seconds` (each epoch: training, the meta pass for MAXL, test)'


def reported(cfg):
    """[(method, metrics column, selection)]: a Single run reports the best test accuracy of the primary task."""
    return [('Single', 'test_acc', 'best')]


def unused_options(cfg):
    """The options of `cfg` (config.json's dict) that do not decide a run's numbers: none."""
    return set()


def run_seconds(rows, log=''):
    """A run's time from its metrics rows (TIME_NOTE)."""
    return sum(r['seconds'] for r in rows)


def main(argv=None):
    cfg, cli = read_config('model_vgg_single', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    check(cfg)
    train_x, train_y = create_dataset.load('cifar100', cfg.data_root, True, stand_in(cfg), cfg.download)
    test_x, test_y = create_dataset.load('cifar100', cfg.data_root, False, stand_in(cfg), cfg.download)

    run = Run('model_vgg_single', cfg, cli)
    train = DeviceData(train_x, train_y, run.device, MEAN, STD, shard=run.shard)   # on the device, whole
    test = DeviceData(test_x, test_y, run.device, MEAN, STD, shard=run.shard)
    level = cfg.primary_level
    net = run.network(VGG16({'classifier': create_dataset.LEVEL_CLASSES[level]}, cfg.width))
    fit(run, net, train, test, train_step, columns=(level,))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
