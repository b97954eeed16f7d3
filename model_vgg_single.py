"""Single: the MAXL paper's single-task baseline, VGG-16 trained on the primary task of 4-level CIFAR-100.

    python model_vgg_single.py                                 # the paper's setting (real CIFAR-100)
    python model_vgg_single.py --synthetic --epochs 3 --width 0.125
"""
import sys

import torch
import torch.nn.functional as F

import create_dataset
from machinery.models import VGG16, accuracy_count, evaluate_heads, focal_loss
from machinery.options import check_positive, hyperparameters, stand_in
from utils import Run, run_main

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
primary_level = 2          # label level of the task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
width = 1.0                # channel multiplier of the VGG-16 (1 = the paper's)
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see options.RUN_OPTIONS)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3]}

MEAN, STD = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)     # the original normalisation


def validate(cfg):
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step')
    create_dataset.check_data_present('cifar100', cfg.data_root, stand_in(cfg), cfg.download)


def train_step(net, x, y, optimizer):
    """One SGD step on the focal loss; returns sums over the batch (loss, correct)."""
    logits = net(x)
    loss = focal_loss(F.softmax(logits, dim=1), y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {'loss': loss.detach() * len(x), 'acc': accuracy_count(logits, y)}


def fit(run, net, train, test, levels, step, tested=None):
    """Train `net` as the MAXL code trains its baselines (Human reuses this with a second head): plain
    SGD, its learning rate multiplied by lr_gamma every lr_step epochs; each epoch one shuffled pass of
    augmented batches through step(forward, x, labels, optimizer) (forward: run.wrap(net)) -> sums over
    the batch (loss, acc and, for a second head, aux_loss, aux_acc), then one test of head k against
    label column tested[k] (default: levels; Random and K-means test their primary head only)."""
    cfg = run.cfg
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    objects = dict(net=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects, epoch=-1, step=0)
    forward = run.wrap(net)                               # under torchrun: gradients averaged in backward
    n_steps, heads = state['step'], [('PRI', ''), ('AUX', 'aux_')][:len(levels)]
    tested = levels if tested is None else tested
    test_heads = heads[:len(tested)]
    per_epoch = train.num_batches(cfg.batch_size)
    run.describe([net], {'train': len(train), 'test': len(test)}, cfg.epochs * per_epoch)

    for epoch, data_rng in run.epochs(state['epoch'], cfg.epochs):
        net.train()
        meters = run.meters('loss')            # the training loss watched for a blow-up (utils.LOSS_FACTOR)
        first_step = n_steps
        bar = run.progress(per_epoch, f'epoch {epoch}', epoch * per_epoch, cfg.epochs * per_epoch)
        for x, labels in train.batches(cfg.batch_size, data_rng, shuffle=True, augment=True):
            meters.add(len(x), **step(forward, x, labels, optimizer))
            n_steps += 1
            bar.update()
        bar.close()
        run.check_finite(meters, first_step, scheduler.get_last_lr()[0])     # stops before testing or saving
        run.sync_buffers(net)
        scores = evaluate_heads(net, test, tested, cfg.batch_size)     # [loss, acc] per tested head
        scheduler.step()
        seconds = run.timer.lap()

        tr = meters.means()
        row = dict(epoch=epoch, step=n_steps, **{f'train_{p}{k}': tr[p + k] for _, p in heads for k in ('loss', 'acc')},
                   **{f'test_{p}{k}': v for (_, p), pair in zip(test_heads, zip(scores[0::2], scores[1::2]))
                      for k, v in zip(('loss', 'acc'), pair)}, seconds=seconds)
        text = ' || '.join(f'{split} [LOSS|ACC.]: ' + ' '.join(
            f'{head} {row[f"{prefix}_{p}loss"]:.4f} {row[f"{prefix}_{p}acc"]:.4f}' for head, p in split_heads)
            for split, prefix, split_heads in (('TRAIN', 'train', heads), ('TEST', 'test', test_heads)))
        run.end_epoch(objects, row, text)
        run.stop_if_asked()                   # Ctrl-C / SIGTERM: after the epoch, whose checkpoint is written
    run.finish_epochs()


def main(argv=None):
    run = Run('model_vgg_single', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=validate, choices=CHOICES)
    cfg = run.cfg
    level = cfg.primary_level
    train, test = (create_dataset.DeviceData(*create_dataset.load('cifar100', cfg.data_root, split, stand_in(cfg),
                                                                           cfg.download), run.device, MEAN, STD,
                                             shard=run.shard)
                   for split in (True, False))
    net = run.network(VGG16({'classifier': create_dataset.LEVEL_CLASSES[level]}, cfg.width))
    fit(run, net, train, test, (level,), lambda net, x, labels, optimizer: train_step(net, x, labels[:, level],
                                                                                       optimizer))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
