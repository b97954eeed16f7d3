"""MetaSemi: Semi-Supervised Learning with Meta-Gradient (Zhang, Xiao, Jia, Cheng, Yang; AISTATS 2021).

The pseudo-labels of the unlabeled batch are chosen so that one SGD step on the unlabeled loss would
lower the labeled loss. To first order the gradient of that one-step-ahead labeled loss with respect
to the pseudo-labels is a Jacobian-vector product, taken by finite differences (in eval mode):
    d   = dL_labeled/dtheta,   eps = epsilon / ||d||
    G   = (softmax f(x_u; theta + eps d) - softmax f(x_u; theta - eps d)) / eps
    y_u = normalise(max(0, softmax f(x_u; theta) - lr * G))
Then one SGD step (train mode) on  L_labeled (or the mixup KL loss) + w * mean ||softmax f(x_u) - y_u||^2.
`--baseline` trains on the labeled data only (with --mix-up: mixup against plain, un-updated pseudo-labels).
Its step is timed by benchmarks/bench.py and benchmarks/loader.py, its finite differences checked by
benchmarks/numerics.py, its full run projected by benchmarks/project.py.

    python train_meta_semi.py --dataset svhn --num-label 1000 -a convlarge --mix-up --alpha 0.1 \\
        --save-path results/svhn --seed 7788 --weight-decay 5e-5 --gpu
    python train_meta_semi.py --synthetic --dataset cifar10 --num-label 1000 --total-steps 300 \\
        --warmup 50 --test-freq 100 --width 0.25
    torchrun --nproc_per_node 8 train_meta_semi.py --dataset imagenet -a resnet18 --data /path/to/imagenet \\
        --save-path results/imagenet-meta --batch-size 64 --alpha 1.0      # ImageNet, 10% labels (IMAGENET)
"""
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import create_dataset
from machinery import large_datasets, splits
from machinery.distributed import all_reduce_mean, all_reduce_sum
from machinery.experiments import METASEMI_ERROR, METASEMI_SOURCES
from machinery.fast_paths import float32_meta
from machinery.models import TORCHVISION_RESNETS, accuracy_count, forward_with, semi_network, topk_count, torchvision_resnet
from machinery.options import UserError, check_positive, hyperparameters, stand_in
from machinery.streams import Splits
from utils import Run, read_config, run_main

# ---- hyperparameters: the original's defaults; each is overridable, e.g. --total-steps 1000 --width 0.25 ----
dataset = 'cifar10'            # cifar10, cifar100, svhn or imagenet (its own defaults: IMAGENET below)
num_label = 4000               # labeled training images in all, the same number per class
label_fraction = 0.0           # > 0: instead, this fraction of every class's images is labeled (ImageNet: 0.1)
label_list = ''                # ImageNet: a file naming the labeled images, one <wnid>/<file> a line (the original's format)
architecture = 'convlarge'     # -a: convlarge, shakeshake (shake-shake-26 2x96d) or a torchvision ResNet (resnet18, ...)
mix_up = False                 # mix labeled with unlabeled images, one-hot labels with pseudo-labels (KL loss)
alpha = 1.0                    # mixup coefficient ~ Beta(alpha, alpha), one per sample
weight = 1.0                   # weight of the unlabeled loss after its linear ramp over `warmup` steps
total_steps = 400000           # training steps (one labeled + one unlabeled batch each)
batch_size = 128               # labeled batch; the unlabeled batch has the same size
epsilon = 1e-2                 # finite-difference radius before dividing by ||d||
lr = 0.1                       # peak learning rate (also the pseudo-labels' step size)
warmup = 4000                  # steps of linear lr warm-up from 0 (and of the unlabeled-weight ramp)
gamma = 0.1                    # lr factor at each milestone
milestones = [300000, 350000]  # steps after which the lr is multiplied by gamma
weight_decay = 1e-4            # the paper uses 5e-5 for SVHN
momentum = 0.9                 # SGD momentum (weight decay applies to every parameter)
baseline = False               # labeled data only (the original train_baseline.py)
print_freq = 100               # print a training line every N steps
eval_every = 400               # test, keep the best accuracy and save a checkpoint every N steps (--test-freq)
width = 1.0                    # channel multiplier (1 = the paper's network; < 1 for quick runs)
seed = 1234                    # seeds the label split, the data streams, the weights
global_meta_gradient = False   # torchrun: the meta step from the global labeled batch (default: per process, as the original)
lr_schedule = 'step'           # step: warm-up, then x gamma at the milestones; cosine: warm-up, then cosine to 0 (ImageNet)
epochs = 0                     # > 0: run this many epochs (passes over the unlabeled set; --baseline: the labeled set), warm-up and tests counted in epochs
warmup_epochs = 5              # with --epochs: epochs of linear warm-up
weight_ramp = True             # ramp the unlabeled weight up over the warm-up (the ImageNet code does not)
image_size = 224               # ImageNet: training crop size (evaluation: shorter side to size*256/224, centre crop)
workers = 4                    # ImageNet: DataLoader worker processes per process (file reading; decoding on the CPU path)
decode_on = 'auto'             # ImageNet: decode and augment JPEGs on the gpu (nvJPEG, when training on CUDA) or the cpu workers
test_batch_size = 100          # images per process per evaluation batch (the ImageNet code: 50)
num_classes = 1000             # ImageNet from RecordIO files: the number of classes (their labels are inside the records)
# ---- (run options: data_root (--data-path), run_dir (--save-path), device (--gpu), ...: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
RESNETS = TORCHVISION_RESNETS
CHOICES = {'dataset': sorted(create_dataset.DATASETS) + ['imagenet'], 'architecture': ['convlarge', 'shakeshake'] + RESNETS,
           'lr_schedule': ['step', 'cosine'], 'decode_on': ['auto', 'gpu', 'cpu']}

# ImageNet with 10% labels: the original train_meta_imagenet.py's settings (train_imagenet.py's for
# --baseline), taken for every value not typed on the command line.
IMAGENET = dict(architecture='resnet18', label_fraction=0.1, batch_size=64, epochs=600, warmup_epochs=5,
                lr_schedule='cosine', lr=0.1, momentum=0.9, weight_decay=1e-4, mix_up=True, alpha=1.0, weight=1.0,
                weight_ramp=False, epsilon=1e-2, test_batch_size=50, print_freq=50, sync_bn=True)
IMAGENET_BASELINE = IMAGENET | dict(batch_size=128, mix_up=False)


def presets(cfg, typed):
    """A new run on ImageNet: the original's settings for the values not typed."""
    if cfg.dataset == 'imagenet':
        for name, value in (IMAGENET_BASELINE if cfg.baseline else IMAGENET).items():
            if name not in typed:
                setattr(cfg, name, value)


def check(cfg):
    check_positive(cfg, 'total_steps', 'batch_size', 'print_freq', 'eval_every', 'warmup', 'lr', 'width', 'epsilon',
                   'weight', 'gamma', 'weight_decay', 'epochs', 'warmup_epochs', 'label_fraction', 'image_size',
                   'workers', 'test_batch_size',
                   allow_zero=('warmup', 'weight', 'weight_decay', 'epochs', 'warmup_epochs', 'label_fraction',
                               'workers'))
    large = large_datasets.is_large(cfg.dataset)
    if large != (cfg.architecture in RESNETS):
        raise UserError(f'-a {cfg.architecture} does not go with --dataset {cfg.dataset}: ImageNet trains a torchvision '
                        f'ResNet ({", ".join(RESNETS)}), CIFAR and SVHN convlarge or shakeshake.')
    if cfg.label_fraction >= 1:
        raise UserError(f'--label-fraction must be below 1 (some images stay unlabeled), got {cfg.label_fraction}.')
    if cfg.label_list and not os.path.isfile(cfg.label_list):
        raise UserError(f'--label-list {cfg.label_list!r} is not a file.')
    if cfg.epochs and cfg.warmup_epochs > cfg.epochs:
        raise UserError(f'--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}.')
    if cfg.mix_up and cfg.alpha <= 0:
        raise UserError(f'--alpha must be positive (mixup draws Beta(alpha, alpha)), got {cfg.alpha}.')
    if sorted(cfg.milestones) != list(cfg.milestones):
        raise UserError(f'--milestones must be increasing steps, got {cfg.milestones}.')


# ---- schedules: functions of the step t (counted from 0), as the original sets them every step ----

def learning_rate(t, lr, warmup, milestones, gamma):
    """Linear warm-up from 0 over `warmup` steps, then lr * gamma^(number of milestones m with t > m)."""
    if t < warmup:
        return lr * t / warmup
    return lr * gamma ** sum(t > m for m in milestones)


def cosine_learning_rate(t, lr, warmup, total):
    """The ImageNet code's per-iteration schedule, with i = t + 1 (it steps before each iteration): lr * i / W
    for i <= W, then lr * (1 + cos(pi * (i - W) / (T - W))) / 2, down to 0 at the last step."""
    i = t + 1
    if i <= warmup:
        return lr * i / warmup
    return lr * (1 + math.cos(math.pi * (i - warmup) / max(total - warmup, 1))) / 2


def unlabeled_weight(t, weight, warmup, ramp=True):
    """Linear ramp from 0 to `weight` over the warm-up (t <= warmup), then constant; ramp=False: constant."""
    return weight * t / warmup if ramp and 0 < warmup and t <= warmup else weight


# ---- the meta step: pseudo-labels by the meta-gradient (first order, finite differences) ----

def pseudo_label_gradient(model, x_l, y_l, x_u, epsilon, global_d=False):
    """In eval mode: the unlabeled softmax P = softmax f(x_u; theta) and G = (P(theta + eps d) -
    P(theta - eps d)) / eps, d = dL_labeled/dtheta over all parameters, eps = epsilon / ||d||.

    G approximates 2 J d (J = dP/dtheta): the divisor is eps, not 2 eps, which folds in the factor 2
    of the squared-distance loss, so lr * G is the gradient of the labeled loss after a virtual SGD step
    of size lr on the unlabeled loss sum_b ||P_b - y_b||^2, taken with respect to the pseudo-labels y.
    The perturbed networks are new tensors run through forward_with, so the model's weights and
    batch-norm buffers are never modified. Also returns the eval-mode labeled logits and loss.

    Under torchrun d is this process's labeled batch's, as the original computes it per GPU (its norm
    too); with global_d it is averaged over the processes first (the global labeled batch's), and the
    weights are never perturbed in place, so the processes' weights stay identical either way.
    The whole step runs in strict float32 whatever --amp and --tf32 say (float32_meta): the perturbation
    is a few millionths of each weight, which bf16 or TF32 rounding would swallow."""
    with float32_meta(model, strict=True):
        model.eval()
        params = dict(model.named_parameters())
        logits_l = model(x_l)
        loss_l = F.cross_entropy(logits_l, y_l)
        d = torch.autograd.grad(loss_l, list(params.values()))
        if global_d:
            d = all_reduce_mean(d)
        with torch.no_grad():
            probs_u = F.softmax(model(x_u), dim=1)
            eps = epsilon / torch.stack([g.norm() for g in d]).norm().clamp_min(1e-12)
            shifted = []
            for sign in (1.0, -1.0):
                theta = {k: p + (sign * eps) * g for (k, p), g in zip(params.items(), d)}
                shifted.append(F.softmax(forward_with(model, theta, x_u), dim=1))
            grad_u = (shifted[0] - shifted[1]) / eps
        return probs_u, grad_u, logits_l.detach(), loss_l.detach()


def update_pseudo_labels(probs_u, grad_u, lr_now):
    """One gradient step of size lr on the pseudo-labels, clipped at 0, rows renormalised to sum 1
    (a row that sums to 0 stays 0, as the original)."""
    y = (probs_u - lr_now * grad_u).clamp_min(0)
    total = y.sum(1, keepdim=True)
    return y / torch.where(total > 0, total, torch.ones_like(total))


# ---- the model update ----

def supervised_loss(model, x_l, y_l, x_u, targets_u, lam, num_classes):
    """Train mode. Cross-entropy on the labeled batch, or with mixup (lam: [B,1] ~ Beta(alpha, alpha))
    KL(lam onehot + (1-lam) y_u || softmax f(lam x_l + (1-lam) x_u)), summed over classes, mean over B."""
    if lam is None:
        logits = model(x_l)
        return F.cross_entropy(logits, y_l), logits
    x_mix = lam[:, :, None, None] * x_l + (1 - lam[:, :, None, None]) * x_u
    t_mix = lam * F.one_hot(y_l, num_classes).to(x_l.dtype) + (1 - lam) * targets_u
    logits = model(x_mix)
    return F.kl_div(F.log_softmax(logits, dim=1), t_mix, reduction='batchmean'), logits


def consistency_loss(logits_u, targets_u):
    """mean over the batch of sum over classes (softmax(z_u) - y_u)^2."""
    return ((F.softmax(logits_u, dim=1) - targets_u) ** 2).sum(1).mean()


def sgd_step(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, lr_now, w, epsilon, num_classes, baseline=False,
               forward=None, global_d=False):
    """One training step. Returns sums over the batch on the device: label_loss, unlabel_loss, label_acc
    (hits), unlabel_acc (hits).
    x_u / y_u: the unlabeled batch (its labels only count Uacc), None for the labeled-only baseline;
    lam: per-sample mixup coefficients [B, 1], None without mixup; forward: the training forward
    (run.wrap(model); under torchrun the update's gradients are averaged over processes); global_d: see
    pseudo_label_gradient."""
    forward = forward or model
    if not baseline:
        # 1) meta step (eval mode): pseudo-labels moved by the finite-difference meta-gradient
        probs_u, grad_u, logits_l_eval, loss_l_eval = pseudo_label_gradient(model, x_l, y_l, x_u, epsilon, global_d)
        targets_u = update_pseudo_labels(probs_u, grad_u, lr_now)
        # 2) model update (train mode): labeled or mixup loss + w * consistency with the pseudo-labels
        model.train()
        loss_sup, logits_sup = supervised_loss(forward, x_l, y_l, x_u, targets_u, lam, num_classes)
        logits_u = forward(x_u)
        loss_u = consistency_loss(logits_u, targets_u)
        sgd_step(optimizer, loss_sup + w * loss_u)
        # logged as the original: with mixup the labeled loss/accuracy are the eval-mode ones of step 1
        loss_l, logits_l = (loss_l_eval, logits_l_eval) if lam is not None else (loss_sup.detach(), logits_sup)
        return sums(loss_l, loss_u.detach(), accuracy_count(logits_l, y_l), accuracy_count(logits_u, y_u), len(x_l))
    if lam is not None:
        # mixup baseline: plain eval-mode pseudo-labels, no meta update, no consistency term
        with torch.no_grad():
            model.eval()
            logits_l, logits_u = model(x_l), model(x_u)
            targets_u = F.softmax(logits_u, dim=1)
        model.train()
        loss, _ = supervised_loss(forward, x_l, y_l, x_u, targets_u, lam, num_classes)
        sgd_step(optimizer, loss)
        return sums(loss.detach(), torch.zeros_like(loss), accuracy_count(logits_l, y_l), accuracy_count(logits_u, y_u),
                    len(x_l))
    model.train()
    loss, logits_l = supervised_loss(forward, x_l, y_l, None, None, None, num_classes)
    sgd_step(optimizer, loss)
    return sums(loss.detach(), torch.zeros_like(loss), accuracy_count(logits_l.detach(), y_l), torch.zeros_like(loss),
                len(x_l))


def sums(label_loss, unlabel_loss, label_hits, unlabel_hits, batch):
    return {'label_loss': label_loss * batch, 'unlabel_loss': unlabel_loss * batch, 'label_acc': label_hits,
            'unlabel_acc': unlabel_hits}


@torch.no_grad()
def evaluate(model, batches, n, device):
    """Eval mode over a whole split (`batches`: this process's share of it, n images in all): the mean
    cross-entropy and the top-1 and top-5 accuracies as fractions, over every process's share:
    {'test_loss', 'test_acc', 'test_acc5'}."""
    model.eval()
    sums = torch.zeros(3, device=device)
    for x, y in batches:
        logits = model(x)
        sums += torch.stack([F.cross_entropy(logits, y, reduction='sum'), accuracy_count(logits, y),
                             topk_count(logits, y, 5)])
    return dict(zip(('test_loss', 'test_acc', 'test_acc5'), (all_reduce_sum(sums) / n).tolist()))


# ---- the run -----------------------------------------------------------------------------------------

LABEL_INDICES, LABEL_LIST = 'label_indices.txt', 'train_labeled.txt'    # the labeled images, kept in the run folder


def choose_images(cfg, kept):
    """Which training images are labeled, chosen before anything is written (a bad input stops here): a resumed
    run's own (`kept`: its folder, read back), else drawn with the seed, class-balanced: --num-label in all or
    --label-fraction of every class (CIFAR, SVHN), or a --label-list file (ImageNet); the original's ImageNet
    RecordIO files come split already. Returns the splits, the labeled and unlabeled pools, the class count and
    the list the run keeps in its folder."""
    if large_datasets.is_large(cfg.dataset):
        path = large_datasets.large_data_path(cfg.dataset, cfg.data_root, cfg.synthetic)
        if large_datasets.recordio_present(path) and not os.path.isdir(os.path.join(path, 'train')):
            files = {name: large_datasets.RecordFile(os.path.join(path, f'{split}.rec'), os.path.join(path, f'{split}.idx'))
                     for name, split in zip(('labeled', 'unlabeled', 'test'), large_datasets.RECORDIO_SPLITS)}
            pools = {name: (name, np.arange(len(files[name]))) for name in ('labeled', 'unlabeled')}
            return dict(files=files, pools=pools, n_classes=cfg.num_classes, lists={}, where=f'RecordIO files in {path}')
        train = large_datasets.large_split(cfg.dataset, path, 'train')
        if kept or cfg.label_list:
            labeled, unlabeled = splits.label_list_split(train.paths, os.path.join(kept, LABEL_LIST) if kept else cfg.label_list)
        else:
            labeled, unlabeled = splits.fraction_label_split(train.labels, cfg.label_fraction, cfg.seed)
        return dict(files={'train': train, 'test': large_datasets.large_split(cfg.dataset, path, 'test')},
                    pools={'labeled': ('train', labeled), 'unlabeled': ('train', unlabeled)}, n_classes=len(train.classes),
                    lists={LABEL_LIST: [train.paths[i].replace(os.sep, '/') for i in labeled]}, where=f'image folders in {path}')
    train_x, train_y, test_x, test_y = create_dataset.load_both(cfg.dataset, cfg.data_root, stand_in(cfg), cfg.download)
    if kept:
        labeled, unlabeled = splits.read_label_indices(os.path.join(kept, LABEL_INDICES), len(train_y))
    elif cfg.label_fraction:
        labeled, unlabeled = splits.fraction_label_split(train_y, cfg.label_fraction, cfg.seed)
    else:
        splits.check_label_budget(train_y, cfg.num_label, create_dataset.DATASETS[cfg.dataset].num_classes)
        labeled, unlabeled = splits.balanced_label_split(train_y, cfg.num_label, cfg.seed)
    return dict(arrays={'train': (train_x, train_y), 'test': (test_x, test_y)}, lists={LABEL_INDICES: labeled},
                pools={'labeled': ('train', labeled), 'unlabeled': ('train', unlabeled)},
                n_classes=create_dataset.DATASETS[cfg.dataset].num_classes)


def place_images(chosen, cfg, run):
    """The chosen images where the run reads them: CIFAR / SVHN whole on the device, cropped (and flipped) per
    batch; ImageNet streamed from its files, decoded and augmented as the original's DALI pipeline. A new run
    writes the list of its labeled images into its folder."""
    where = run.keep_lists(chosen['lists'])
    sizes = {name: len(pool) for name, (_, pool) in chosen['pools'].items()}
    if 'files' in chosen:
        data = large_datasets.FileSplits(
            chosen['files'], chosen['n_classes'], run.device, run.shard, cfg.workers, cfg.decode_on,
            large_datasets.Augment(True, cfg.image_size, scale=(0.1, 1.0), ratio=(0.8, 1.25)),
            large_datasets.Augment(False, cfg.image_size))
        where = chosen['where'] + (f'; labeled images listed in {where}' if where else '')
    else:
        record = create_dataset.DATASETS[cfg.dataset]
        data = Splits.on_device(chosen['arrays'], chosen['n_classes'], run.device, *record.normalisation,
                                flip=record.flip, shard=run.shard)
        where = f'labeled indices in {where}'
    run.log.print(f'{cfg.dataset}: {sizes["labeled"]} labeled, {sizes["unlabeled"]} unlabeled, {data.sizes["test"]} '
                  f'test images; {where}')
    return data


# ---- how results.py tables and plots this script's runs ----

UNIT = 'steps'                 # what the first column of metrics.csv counts
PAPER = 'MetaSemi (AISTATS 2021)'                # the runs of one paper share a panel of results.py's plot
HEADLINE = ['num_label', 'label_fraction', 'architecture', 'width', 'alpha']    # shown in every results row
METHOD_OPTIONS = ['baseline', 'mix_up']        # the settings the method's name says
ERROR = True                   # reported as test error, in %, as the paper does
TIME_NOTE = ('the mean step time (`batch_time` + `data_time`, averaged since the process started) × its steps, '
             'summed over the starts of a resumed run (training only; the tests are not counted)')
# The papers' test errors and their sources (the paper, the authors' slides): experiments.METASEMI_ERROR


def reported(cfg):
    """[(method, metrics column, selection)]: the best test accuracy, as the original logs it."""
    name = 'labeled only (baseline)' if cfg.get('baseline') else 'MetaSemi'
    if cfg.get('mix_up'):
        name = 'mixup baseline' if cfg.get('baseline') else 'MetaSemi + mixup'
    return [(name, 'test_acc', 'best')]


def paper_number(cfg, method, steps):
    """The paper's number for a results row (with its source), or None where it has none."""
    imagenet = cfg.get('dataset') == 'imagenet'
    key = (cfg.get('dataset'), cfg.get('label_fraction') if imagenet else cfg.get('num_label'))
    known = METASEMI_ERROR.get(method, {}).get(key)
    if known is None or cfg.get('architecture') != ('resnet18' if imagenet else 'convlarge') or cfg.get('width') != 1.0:
        return None
    (error, source), budget = known, (None if imagenet else 400000)
    text = (f'{error[0]:.2f} % top-1 / {error[1]:.2f} % top-5 error' if imagenet else f'{error:.2f} % error')
    return text + (f' (after {budget:,} steps)' if budget and steps < budget else '') + f' ({METASEMI_SOURCES[source]})'


def run_seconds(rows, log=''):
    """A run's training time (TIME_NOTE): batch_time and data_time are means since the process started (at step
    0 or at a resume, which the log names): the last row of each start, times that start's steps."""
    starts = sorted({0, *(int(m.group(1)) for m in re.finditer(r'^resumed at step (\d+)', log, re.M))})
    total = 0.0
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else math.inf
        mine = [r for r in rows if start < r['step'] <= end]
        if mine:
            total += (mine[-1]['batch_time'] + mine[-1].get('data_time', 0.0)) * (mine[-1]['step'] - start)
    return total


def unused_options(cfg):
    """The options of `cfg` (config.json's dict, or vars() of a parsed command line) that do not decide a run's
    numbers, given its method, dataset and schedule (results.py leaves them out of a row's setting; the start
    line leaves out the ones the run never reads)."""
    get, out = cfg.get, {'print_freq', 'workers', 'decode_on'}
    if not get('mix_up'):
        out.add('alpha')
    if get('baseline'):                     # no meta step, no unlabeled loss
        out |= {'epsilon', 'weight', 'weight_ramp', 'global_meta_gradient'}
    if get('dataset') == 'imagenet':        # a fraction of every class (or a list) is labeled
        out.add('num_label')
        out.add('label_fraction' if get('label_list') else 'label_list')
    else:
        out |= {'label_list', 'image_size', 'num_classes'}
        out.add('num_label' if get('label_fraction') else 'label_fraction')
    if get('epochs'):                       # the schedule in epochs
        out |= {'total_steps', 'warmup', 'eval_every'}
    else:
        out |= {'epochs', 'warmup_epochs'}
    if get('lr_schedule') == 'cosine':
        out |= {'milestones', 'gamma'}
    return out & set(cfg)


def percents(values):
    """Accuracies in percent, as the original prints them."""
    return {k: 100 * v if k.endswith('acc') else v for k, v in values.items()}


def main(argv=None):
    cfg, cli = read_config('train_meta_semi', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    if not cli.resumed:
        presets(cfg, cli.typed)
    check(cfg)
    chosen = choose_images(cfg, cli.resumed and cli.resumed.dir)     # which training images are labeled

    run = Run('train_meta_semi', cfg, cli)
    dev, log, large = run.device, run.log, large_datasets.is_large(cfg.dataset)
    mode = ('baseline' if cfg.baseline else 'meta') + (' + mixup' if cfg.mix_up else '')
    unused = unused_options(vars(cfg))        # not this dataset's or schedule's
    log.print(f'MetaSemi ({mode}) with ' + ', '.join(f'{k}={v!r}' for k, v in vars(cfg).items() if k not in unused))
    if large and dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    data = place_images(chosen, cfg, run)        # on the device (CIFAR, SVHN), or streamed from their files
    pools, num_classes = chosen['pools'], data.n_classes
    sizes = {'labeled': len(pools['labeled'][1]), 'unlabeled': len(pools['unlabeled'][1]), 'test': data.sizes['test']}
    B, W = cfg.batch_size, run.world
    use_unlabeled = not cfg.baseline or cfg.mix_up
    if not use_unlabeled:
        pools.pop('unlabeled')

    # The schedule in steps; with --epochs an epoch is one pass over the unlabeled set (the labeled set for
    # the labeled-only baseline) in global batches, and the warm-up and the tests are counted in epochs.
    if cfg.epochs:
        per_epoch = -(-sizes['labeled' if cfg.baseline else 'unlabeled'] // (B * W))
        total_steps, warmup, eval_every = cfg.epochs * per_epoch, cfg.warmup_epochs * per_epoch, per_epoch
    else:
        per_epoch, total_steps, warmup, eval_every = 0, cfg.total_steps, cfg.warmup, cfg.eval_every
    milestones = cfg.milestones if not cfg.epochs else [m * per_epoch for m in cfg.milestones]

    if large:                                           # torchvision's, from scratch (width 1: exactly)
        model = run.network(torchvision_resnet(cfg.architecture, num_classes, cfg.width))
    else:
        model = run.network(semi_network(cfg.architecture, num_classes, cfg.width))
    forward = run.wrap(model)                             # under torchrun: gradients averaged in backward
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    alpha = torch.tensor(float(cfg.alpha), device=dev)
    beta = torch.distributions.Beta(alpha, alpha)
    log.print(f'{cfg.architecture} (width {cfg.width}): {sum(p.numel() for p in model.parameters()):,} parameters')

    objects = dict(model=model, optimizer=optimizer)
    state = run.restore(objects, step=0)
    start = state['step']
    stream = data.cycled(pools, B * W, cfg.seed, start=start, stop=total_steps)   # endless passes over each pool
    stream.restore(state)
    if run.resuming:
        log.print(f'resumed at step {start}, best accuracy so far {100 * run.best["test_acc"]:.5f}')

    # sums since the last test, on the device (a run stopped between two tests continues its own)
    # The loss watched for a blow-up (utils.LOSS_FACTOR): the labeled loss trained on. With mixup the logged
    # labeled loss is the eval-mode one of the meta step (as the original logs it), which batch statistics
    # that are still settling can put far above its first value in a healthy run: none then (the weights are
    # checked either way).
    watched = None if cfg.mix_up else 'label_loss'
    meters, first_t = run.meters(watched, state.get('meters')), state.get('first_t', start)
    run.describe([model], sizes, total_steps - start)

    bar = run.interval(start, eval_every, total_steps, images_per_step=2 * B * W)
    data_time, batch_time, timed = 0.0, 0.0, 0
    for t in range(start, total_steps):
        lr_now = (cosine_learning_rate(t, cfg.lr, warmup, total_steps) if cfg.lr_schedule == 'cosine' else
                  learning_rate(t, cfg.lr, warmup, milestones, cfg.gamma))
        for group in optimizer.param_groups:
            group['lr'] = lr_now
        w = unlabeled_weight(t, cfg.weight, warmup, cfg.weight_ramp)

        tic = time.perf_counter()
        batches = stream.next(pools)              # this process's share of each pool's global batch
        (x_l, y_l), (x_u, y_u) = batches[0], (batches[1] if use_unlabeled else (None, None))   # y_u: for Uacc only
        lam = run.share(beta.sample((B * W, 1))) if cfg.mix_up else None      # drawn for the global batch
        toc = time.perf_counter()

        run.sync_buffers(model)                   # the eval-mode meta step reads the statistics
        step_sums = train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, lr_now, w, cfg.epsilon, num_classes,
                               cfg.baseline, forward, cfg.global_meta_gradient)
        meters.add(B, **step_sums)
        bar.update()
        data_time, batch_time, timed = data_time + toc - tic, batch_time + time.perf_counter() - toc, timed + 1

        if t % cfg.print_freq == 0:          # the only host reads of the loop, besides testing
            val = percents({k: v / B for k, v in zip(step_sums, torch.stack(list(step_sums.values())).tolist())})
            avg = percents(meters.means())
            times = f'Dtime: {data_time / timed:.3f} Btime: {batch_time / timed:.3f}'
            if cfg.baseline:
                line = (f'Step: [{t:05d}/{total_steps:05d}] {times} loss: {val["label_loss"]:.3f} '
                        f'(avg {avg["label_loss"]:.3f}) Lacc: {val["label_acc"]:.3f} (avg {avg["label_acc"]:.3f})')
            else:
                line = (f'Step {t:05d} {times} Lloss: {val["label_loss"]:.3f} (avg {avg["label_loss"]:.3f}) '
                        f'Uloss: {val["unlabel_loss"]:.3f} (avg {avg["unlabel_loss"]:.3f}) Lacc: {val["label_acc"]:.3f} '
                        f'(avg {avg["label_acc"]:.3f}) Uacc: {val["unlabel_acc"]:.3f} (avg {avg["unlabel_acc"]:.3f})')
            log.print(f'{line} LR: {lr_now:.4f}')

        if (t + 1) % eval_every == 0 or t + 1 == total_steps:
            bar.close()
            run.check_finite(meters, first_t, lr_now)        # stops before testing or saving
            run.sync_buffers(model)
            tests = evaluate(model, *data.evaluation('test', cfg.test_batch_size), dev)
            row = dict(step=t + 1, lr=lr_now, weight=w, **meters.means(), test_loss=tests['test_loss'],
                       test_acc=tests['test_acc'], data_time=data_time / timed, batch_time=batch_time / timed)
            bad = data.bad_images()             # ImageNet's images that could not be decoded
            if large:                           # top-5 and undecodable images, ImageNet only
                row = dict(step=t + 1, epoch=(t + 1) / per_epoch if per_epoch else 0) | row | dict(
                    test_acc5=tests['test_acc5'], bad_images=len(bad))
            run.evaluate_and_save(objects, row, 'test_acc', keep=['test_acc5'] if large else [], step=t + 1,
                                  **stream.state())
            if large:
                log.print(f' * Prec@1 {100 * tests["test_acc"]:.5f} Prec@5 {100 * tests["test_acc5"]:.5f}')
                log.print(f'Best acc1={100 * run.best["test_acc"]:.5f}')
            else:
                log.print(f' * Accuracy {100 * tests["test_acc"]:.5f}')
                log.print(f'Best Accuracy: {100 * run.best["test_acc"]:.5f}')
            run.note_bad_images(bad, since='test')
            meters, first_t = run.meters(watched), t + 1
            bar = run.interval(t + 1, eval_every, total_steps, images_per_step=2 * B * W)
        run.stop_if_asked(objects, t + 1, step=t + 1, meters=meters, first_t=first_t, **stream.state())
    best = 100 * run.best['test_acc']
    top5 = f', top-5 error {100 - 100 * run.best["test_acc5"]:.2f}%' if large else ''
    log.print(f'done: {total_steps} steps, best test accuracy {best:.5f} (error {100 - best:.2f}%{top5})')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
