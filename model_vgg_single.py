"""Single: the MAXL paper's single-task baseline, VGG-16 trained on the primary task of 4-level CIFAR-100.

    python model_vgg_single.py                                 # the paper's setting (real CIFAR-100)
    python model_vgg_single.py --synthetic --epochs 3 --width 0.125
"""
import sys

import torch
import torch.nn.functional as F

import create_dataset
from utils import (UserError, Run, Timer, VGG16, accuracy_count, evaluate_heads, fast_module, focal_loss,
                   hyperparameters, run_main)

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
primary_level = 2          # label level of the task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
width = 1.0                # channel multiplier of the VGG-16 (1 = the paper's)
seed = 0
device = 'auto'            # auto, cpu, cuda, cuda:N, mps
amp = False                # fast path: bf16 autocast (off: the papers' float32)
channels_last = False      # fast path: channels-last memory format
compile = False            # fast path: torch.compile the forward passes
synthetic = False          # train on the synthetic stand-in (dataset/synthetic) instead of CIFAR-100
download = False           # fetch CIFAR-100 (md5-checked) if it is not in data_root
data_root = 'dataset'
logdir = 'logs'
run_name = ''
resume = ''                # a run folder (logs/model_vgg_single/<run>) to continue
# ---------------------------------------------------------------------------------------------------
HYPERPARAMETERS = hyperparameters(globals(), first='epochs', last='resume')

MEAN, STD = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)     # the original normalisation


def validate(cfg):
    if cfg.primary_level not in range(4):
        raise UserError(f'primary_level must be 0, 1, 2 or 3 (3, 10, 20, 100 classes), got {cfg.primary_level}.')
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.width <= 0:
        raise UserError('epochs, batch_size and width must be positive.')
    create_dataset.check_data_present('cifar100', cfg.data_root, cfg.synthetic, cfg.download)


def train_step(net, x, y, optimizer):
    logits = net(x)
    loss = focal_loss(F.softmax(logits, dim=1), y).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), accuracy_count(logits, y)


def main(argv=None):
    run = Run('model_vgg_single', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=validate)
    cfg, dev, log = run.cfg, run.device, run.log
    level = cfg.primary_level

    train = create_dataset.DeviceData(*create_dataset.load_cifar100(cfg.data_root, True, cfg.synthetic, cfg.download),
                                      dev, MEAN, STD)
    test = create_dataset.DeviceData(*create_dataset.load_cifar100(cfg.data_root, False, cfg.synthetic, cfg.download),
                                     dev, MEAN, STD)

    net = VGG16({'classifier': create_dataset.LEVEL_CLASSES[level]}, cfg.width).to(dev)
    fast_module(net, dev, cfg.amp, cfg.channels_last, cfg.compile)      # opt-in; off: untouched
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    objects = dict(net=net, optimizer=optimizer, scheduler=scheduler)
    state = run.restore(objects) or {'epoch': -1, 'best_test_acc': 0.0, 'step': 0}
    step = state['step']

    for epoch in range(state['epoch'] + 1, cfg.epochs):
        timer = Timer(dev)
        data_rng = create_dataset.device_generator(dev, cfg.seed * 1_000_003 + epoch)   # the epoch's stream
        net.train()
        sums, n_seen = torch.zeros(2, device=dev), 0
        for x, labels in train.batches(cfg.batch_size, data_rng, shuffle=True, augment=True):
            loss, correct = train_step(net, x, labels[:, level], optimizer)
            sums += torch.stack([loss * len(x), correct])
            n_seen += len(x)
            step += 1
        test_loss, test_acc = evaluate_heads(net, test, (level,), cfg.batch_size)
        scheduler.step()
        seconds = timer.lap()

        train_loss, train_acc = (sums / n_seen).tolist()
        best = max(state['best_test_acc'], test_acc)
        log.print(f'EPOCH: {epoch:04d} ITER: {step:06d} | TRAIN [LOSS|ACC.]: PRI {train_loss:.4f} {train_acc:.4f} '
                  f'|| TEST [LOSS|ACC.]: PRI {test_loss:.4f} {test_acc:.4f} | {seconds:.1f}s')
        log.metrics(dict(epoch=epoch, step=step, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                         test_acc=test_acc, best_test_acc=best, seconds=seconds))
        state = {'epoch': epoch, 'best_test_acc': best, 'step': step, 'test_acc': test_acc}
        run.save(objects, **state)
    log.print(f'done after {state["epoch"] + 1} epochs: test accuracy {state.get("test_acc", float("nan")):.4f}, '
              f'best {state["best_test_acc"]:.4f}')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
