"""Human: the MAXL paper's human-labelled auxiliary baseline. A multi-task VGG-16 learns the primary task
(level 2, 20 classes) together with the human-defined finer labels (level 3, 100 classes) of 4-level CIFAR-100.

    python model_vgg_human.py                                  # the paper's setting (real CIFAR-100)
    python model_vgg_human.py --synthetic --epochs 3 --width 0.125
"""
import sys

import numpy as np
import torch.nn.functional as F

import create_dataset
from model_vgg_single import MEAN, STD, fit
from models import VGG16, accuracy_count, focal_loss
from options import UserError, check_positive, hyperparameters, stand_in
from utils import Run, run_main

# ---- hyperparameters: the paper's setting (Single's, plus the auxiliary labels); each is overridable ----
primary_level = 2          # label levels: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
aux_level = 3              # must refine primary_level (every auxiliary class inside one primary class)
width = 1.0                # channel multiplier of the VGG-16 (1 = the paper's)
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see options.RUN_OPTIONS)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3], 'aux_level': [0, 1, 2, 3]}

def validate(cfg):
    if cfg.aux_level <= cfg.primary_level:
        raise UserError(f'aux_level {cfg.aux_level} does not refine primary_level {cfg.primary_level}: the auxiliary '
                        f'labels must be a finer level of the hierarchy (a larger level number), e.g. '
                        f'--primary_level 2 --aux_level 3.')
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step')
    create_dataset.check_data_present('cifar100', cfg.data_root, cfg.synthetic, cfg.download)


def check_refines(labels, primary_level, aux_level):
    """Every auxiliary class lies inside a single primary class (checked on the data itself)."""
    pairs = np.unique(labels[:, [aux_level, primary_level]], axis=0)
    if len(pairs) != len(np.unique(pairs[:, 0])):
        raise UserError(f'in this data, level {aux_level} does not refine level {primary_level} (some auxiliary '
                        f'class appears under two primary classes); pick levels of one hierarchy.')


def train_step(net, x, y1, y2, optimizer):
    """One SGD step on the sum of the two focal losses; returns sums over the batch."""
    logits1, logits2 = net(x)
    loss1 = focal_loss(F.softmax(logits1, dim=1), y1).mean()
    loss2 = focal_loss(F.softmax(logits2, dim=1), y2).mean()
    optimizer.zero_grad(set_to_none=True)
    (loss1 + loss2).backward()
    optimizer.step()
    return {'loss': loss1.detach() * len(x), 'acc': accuracy_count(logits1, y1),
            'aux_loss': loss2.detach() * len(x), 'aux_acc': accuracy_count(logits2, y2)}


def main(argv=None):
    run = Run('model_vgg_human', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=validate, choices=CHOICES)
    cfg = run.cfg
    pri, aux = cfg.primary_level, cfg.aux_level
    train_x, train_y = create_dataset.load('cifar100', cfg.data_root, True, stand_in(cfg), cfg.download)
    check_refines(train_y, pri, aux)
    train = create_dataset.DeviceData(train_x, train_y, run.device, MEAN, STD, shard=run.shard)
    test_x, test_y = create_dataset.load('cifar100', cfg.data_root, False, stand_in(cfg), cfg.download)
    test = create_dataset.DeviceData(test_x, test_y, run.device, MEAN, STD, shard=run.shard)
    net = run.network(VGG16({'classifier1': create_dataset.LEVEL_CLASSES[pri],
                             'classifier2': create_dataset.LEVEL_CLASSES[aux]}, cfg.width))
    # trained exactly as Single, with the second head's loss added to every step
    fit(run, net, train, test, (pri, aux), lambda net, x, labels, optimizer: train_step(net, x, labels[:, pri],
                                                                                         labels[:, aux], optimizer))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
