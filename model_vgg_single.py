"""Single: the MAXL paper's single-task baseline, VGG-16 (or a ResNet: --model) trained on the primary task
of 4-level CIFAR-100 (or on the classes of another dataset: --dataset, held on the device or streamed from
its image files, your own ImageFolder tree among them: create_dataset.py's load_columns and place). Also the
MAXL paper's training loop (fit), focal loss and evaluation, which model_vgg_human.py and model_vgg_maxl.py
use too, and what results.py asks
of the MAXL paper's runs (UNIT, PAPER, run_seconds, ...; the other two take theirs from here). Its step is
timed by benchmarks/bench.py.

    python model_vgg_single.py                                 # the paper's setting (real CIFAR-100)
    python model_vgg_single.py --dataset fashion-mnist --data_root /usr/share/datasets/fashion-mnist
    python model_vgg_single.py --dataset cifar10 --model cresnet32       # another backbone
    python model_vgg_single.py --dataset folder --data_root my_images      # my_images/{train,test}/<class>/*.jpg
    python model_vgg_single.py --synthetic --epochs 3 --width 0.125
"""
import sys

import torch
import torch.nn.functional as F

from create_dataset import (HIERARCHY, check_dataset, check_hierarchy, has_hierarchy, input_size, load_columns,
                            n_classes, place, streamed)
from machinery.distributed import all_reduce_sum
from machinery.models import CRESNET_DEPTHS, MAXL_BACKBONES, TORCHVISION_RESNETS, accuracy_count, backbone
from machinery.options import UserError, check_positive, hyperparameters
from utils import Run, read_config, run_main

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
dataset = 'cifar100'       # held on the device: cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, fashion-mnist; streamed from their files: tiny-imagenet, cub200, indoor, dogs, imagenet, imagenetN, inat; folder: your own ImageFolder tree (--data_root)
primary_level = 2          # cifar100: label level of the task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
num_samples_per_class = 0  # > 0: train on this many images of every primary class (drawn with the seed); 0: all
width = 1.0                # channel multiplier of the network (1 = the paper's VGG-16)
model = 'vgg16'            # the backbone: vgg16 (the paper's) or a CIFAR ResNet (cresnet20, 32, 44, 56, 110) on 32-pixel images; torchvision's resnet18, resnet50, ... on larger ones (the file datasets' default: resnet18)
image_size = 224           # the file datasets: training crop size (evaluation: shorter side to size*256/224, centre crop); 32: for vgg16 and the CIFAR ResNets
workers = 4                # the file datasets: DataLoader worker processes per process (reading, and decoding on the cpu path)
decode_on = 'auto'         # the file datasets: decode and augment on the gpu (nvJPEG, when training on CUDA) or in the cpu workers
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3], 'model': MAXL_BACKBONES, 'decode_on': ['auto', 'cpu', 'gpu']}

HEADS = {'': 'PRI', 'aux_': 'AUX'}                # the metrics of head k are named with prefix k: loss, aux_loss


def check(cfg, typed):
    check_dataset(cfg)
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step', 'num_samples_per_class',
                   allow_zero=('num_samples_per_class',))
    check_hierarchy(cfg, typed)
    check_model(cfg, typed)


def check_model(cfg, typed):
    """The backbone fits the images: VGG-16 and the CIFAR ResNets take 32 x 32 images, torchvision's ResNets
    larger ones. A new run on a file dataset trains a ResNet-18 unless --model is given."""
    if streamed(cfg.dataset) and 'model' not in typed and not cfg.resume:
        cfg.model = 'resnet18'
    size, large = input_size(cfg), cfg.model in TORCHVISION_RESNETS
    if large and size == 32:
        where = f'--dataset {cfg.dataset} has' if not streamed(cfg.dataset) else '--image_size 32 makes'
        raise UserError(f'--model {cfg.model} is torchvision\'s ResNet for large images, and {where} 32 x 32 images: '
                        f'use --model vgg16 (the paper\'s) or a CIFAR ResNet (--model {", ".join(CRESNET_DEPTHS)}).')
    if not large and size != 32:
        raise UserError(f'--model {cfg.model} takes 32 x 32 images, and this run\'s are {size} x {size} (--dataset '
                        f'{cfg.dataset}, --image_size {size}): use torchvision\'s ResNet (--model resnet18 or resnet50), '
                        'or --image_size 32.')


def network(cfg, heads, init='xavier_uniform'):
    """The run's backbone (--model, --width) with `heads` (head name -> classes, in order; see backbone)."""
    return backbone(cfg.model, heads, cfg.width, init)


def psi_per_class(psi, n_primary):
    """Auxiliary classes per primary class: psi as given (one entry per primary class), or one value for all."""
    psi = list(psi) * n_primary if len(psi) == 1 else list(psi)
    if len(psi) != n_primary or min(psi) < 1:
        raise UserError(f'bad psi {psi}: it needs one positive entry per primary class ({n_primary} here), or one '
                        f'value for all of them; sum(psi) is then the number of auxiliary classes. Example: --psi 5 '
                        f'(5 auxiliary classes per primary class), or --psi 5x{n_primary}.')
    return psi


def note_bad_images(run, *splits):
    """A file dataset's images that could not be decoded this epoch (see Run.note_bad_images)."""
    for data in splits:
        if hasattr(data, 'bad_images'):
            run.note_bad_images(data.bad_images(), 'epoch')


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
        note_bad_images(run, train, test)
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
OLDER_RUNS = {'model': 'vgg16'}                # a run from before --model trained VGG-16
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
    without one; the file datasets' options on the others (and the number of workers, always)."""
    return (data_options_unused(cfg) | (set() if has_hierarchy(cfg.get('dataset', 'cifar100')) else set(HIERARCHY))) & set(cfg)


def data_options_unused(cfg):
    """The file datasets' options that do not decide a run's numbers: all of them on the datasets held on the
    device, the number of workers always."""
    return {'workers'} | (set() if streamed(cfg.get('dataset', 'cifar100')) else {'image_size', 'decode_on'})


def run_seconds(rows, log=''):
    """A run's time from its metrics rows (TIME_NOTE)."""
    return sum(r['seconds'] for r in rows)


def main(argv=None):
    cfg, cli = read_config('model_vgg_single', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    check(cfg, cli.typed)
    train_x, train_y, test_x, test_y, primary = load_columns(cfg)

    run = Run('model_vgg_single', cfg, cli)
    train, test = place(train_x, train_y, cfg, run), place(test_x, test_y, cfg, run)     # on the device, whole
    net = run.network(network(cfg, {'classifier': n_classes(cfg, primary, train_x)}))
    fit(run, net, train, test, train_step, columns=(primary,))


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
