"""Human, Random and K-means: the MAXL paper's auxiliary-label baselines. A multi-task VGG-16 (or a ResNet:
--model) learns the primary task (level 2, 20 classes) together with auxiliary labels (level 3's 100
classes: 5 under each primary class): the human-defined finer labels of 4-level CIFAR-100 (Human), or an
assignment of every training image to one of its primary class's auxiliary classes, drawn at random
(Random) or by k-means clusters of autoencoder features inside each primary class (K-means). On a dataset
without a hierarchy (--dataset), Random and K-means give each primary class --psi auxiliary classes.

Built on model_vgg_single.py (the data, fit(), the loss, the evaluation); the hierarchy's groups come from
create_dataset.py. Its step is timed by benchmarks/bench.py; results.py reads its runs through reported().

    python model_vgg_human.py                                  # the paper's setting (real CIFAR-100)
    python model_vgg_human.py --aux_labels kmeans              # the K-means baseline (random: Random)
    python model_vgg_human.py --dataset cifar10 --aux_labels random --psi 5
    python model_vgg_human.py --synthetic --epochs 3 --width 0.125
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from create_dataset import (check_dataset, check_hierarchy, check_levels, has_hierarchy, hierarchy_groups, load_columns,
                            n_classes, normalisation, place)
from machinery import large_datasets
from machinery.models import MAXL_BACKBONES, AutoEncoder, accuracy_count
from machinery.options import UserError, check_positive, hyperparameters
from machinery.streams import STREAM_STRIDE, DeviceData, device_generator, stream_seed
import model_vgg_single
from model_vgg_single import check_model, data_options_unused, fit, focal_loss, network, psi_per_class
from utils import Run, read_config, run_main

# ---- hyperparameters: the paper's setting (Single's, plus the auxiliary labels); each is overridable ----
dataset = 'cifar100'       # held on the device: cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, fashion-mnist; streamed from their files: tiny-imagenet, cub200, indoor, dogs, imagenet, imagenetN, inat; folder: your own ImageFolder tree (--data_root)
primary_level = 2          # cifar100: label levels 0, 1, 2, 3 -> 3, 10, 20, 100 classes
aux_level = 3              # cifar100: must refine primary_level; primary class i gets as many auxiliary classes as this level has under it
num_samples_per_class = 0  # > 0: train on this many images of every primary class (drawn with the seed); 0: all
psi = [5]                  # a dataset without a hierarchy: auxiliary classes per primary class (one value for all, or one per class)
aux_labels = 'human'       # human (cifar100): the hierarchy's level-aux_level labels; random: one class of the image's group drawn uniformly; kmeans: k-means clusters of autoencoder features inside each primary class
width = 1.0                # channel multiplier of the network (1 = the paper's VGG-16)
model = 'vgg16'            # the backbone: vgg16 (the paper's) or a CIFAR ResNet (cresnet20, 32, 44, 56, 110) on 32-pixel images; torchvision's resnet18, resnet50, ... on larger ones (the file datasets' default: resnet18)
image_size = 224           # the file datasets: training crop size (evaluation: shorter side to size*256/224, centre crop); 32: for vgg16 and the CIFAR ResNets
workers = 4                # the file datasets: DataLoader worker processes per process (reading, and decoding on the cpu path)
decode_on = 'auto'         # the file datasets: decode and augment on the gpu (nvJPEG, when training on CUDA) or in the cpu workers
epochs = 200
batch_size = 100
lr = 0.01                  # plain SGD
lr_step = 50               # the learning rate is halved every lr_step epochs
lr_gamma = 0.5
# K-means only: the convolutional autoencoder whose codes are clustered, trained once before the run
ae_width = 32              # kmeans: channels of the autoencoder's first conv (then 2x and 4x: 32x32 -> 16 -> 8 -> 4 pixels)
ae_code = 128              # kmeans: length of the code, the feature vector clustered
ae_epochs = 20             # kmeans: autoencoder passes over the training images (no augmentation)
ae_batch_size = 128        # kmeans: autoencoder batch
ae_lr = 1e-3               # kmeans: Adam learning rate, mean squared reconstruction error of the normalised pixels
kmeans_n_init = 10         # kmeans: k-means restarts per primary class (scikit-learn keeps the lowest inertia)
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
AUX_LABELS = ['human', 'random', 'kmeans']
CHOICES = {'primary_level': [0, 1, 2, 3], 'aux_level': [0, 1, 2, 3], 'aux_labels': AUX_LABELS,
           'model': MAXL_BACKBONES, 'decode_on': ['auto', 'cpu', 'gpu']}


def check(cfg, typed):
    check_dataset(cfg)
    check_hierarchy(cfg, typed)
    check_model(cfg, typed)
    if has_hierarchy(cfg.dataset):
        check_levels(cfg.primary_level, cfg.aux_level)
    elif cfg.aux_labels == 'human':
        raise UserError(f'--aux_labels human takes the finer labels of CIFAR-100\'s hierarchy, and --dataset '
                        f'{cfg.dataset} has none: use --aux_labels random or kmeans (with --psi auxiliary classes per '
                        'class), or --dataset cifar100.')
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'lr_step', 'num_samples_per_class',
                   allow_zero=('num_samples_per_class',))
    if cfg.aux_labels == 'kmeans':
        check_positive(cfg, 'ae_width', 'ae_code', 'ae_epochs', 'ae_batch_size', 'ae_lr', 'kmeans_n_init')
        if not cfg.resume:                         # a resumed run reads its labels back: no clustering
            require_sklearn()


# ---- Random and K-means: every training image gets one auxiliary class of its primary class's group ----

AUX_LABELS_FILE = 'aux_labels.txt'     # in the run folder, line k: the auxiliary class of training image k


def psi_groups(psi):
    """A dataset without a hierarchy: primary class i's auxiliary classes are the next psi[i] of sum(psi)."""
    start = np.cumsum([0] + list(psi))
    return [np.arange(start[i], start[i + 1]) for i in range(len(psi))]


def group_class(groups, primary, slot):
    """The slot-th class of each image's primary-class group: groups[primary[k]][slot[k]]."""
    flat = np.concatenate(groups)
    start = np.cumsum([0] + [len(g) for g in groups[:-1]])
    return flat[start[primary] + slot].astype(np.int64)


def random_labels(primary, groups, seed):
    """Random: each image's class drawn uniformly from its primary class's group, independently, with
    the seed (its own stream: the weights and data streams of the run are those of the same seed's
    Human run)."""
    rng = np.random.default_rng([seed, 7])
    sizes = np.array([len(g) for g in groups])
    return group_class(groups, primary, rng.integers(0, sizes[primary]))


def require_sklearn():
    """scikit-learn's KMeans, or a UserError saying how to install it."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise UserError('--aux_labels kmeans clusters the autoencoder features with scikit-learn, which is not '
                        'installed in this Python: pip install scikit-learn (it is in requirements.txt), then run '
                        'the same command again; the other --aux_labels (human, random) do not need it.') from None
    return KMeans


def check_groups_fill(primary, groups):
    """K-means: every primary class has at least as many training images as auxiliary classes."""
    for i, group in enumerate(groups):
        n = int(np.sum(primary == i))
        if n < len(group):
            raise UserError(f'primary class {i} has {n} training images, fewer than its {len(group)} auxiliary '
                            'classes: k-means cannot fill them. Use more training images (--num_samples_per_class) '
                            'or fewer auxiliary classes (--psi).')


def kmeans_labels(features, primary, groups, seed, n_init):
    """K-means: inside each primary class i, the images' features ([N, d]) are clustered by k-means
    (scikit-learn, k = len(groups[i]), n_init restarts, seeded); cluster j becomes class groups[i][j]."""
    KMeans = require_sklearn()
    check_groups_fill(primary, groups)
    out = np.empty(len(primary), dtype=np.int64)
    for i, group in enumerate(groups):
        members = np.flatnonzero(primary == i)
        if len(group) == 1:
            out[members] = group[0]
            continue
        km = KMeans(n_clusters=len(group), n_init=n_init, random_state=seed % 2**32)
        out[members] = group[km.fit(features[members].astype(np.float64)).labels_]
    return out


# ---- kept in the run folder -------------------------------------------------------------------------------

def read_labels(path, primary, groups):
    """An assignment written by auxiliary_labels, checked against this training file: one class a line, each
    inside its image's primary-class group."""
    try:
        labels = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path} ({e}): this run keeps its auxiliary labels there; without them it '
                        'cannot continue with the same labels. Start a new run instead.') from None
    inside = len(labels) == len(primary) and all(np.isin(labels[primary == i], g).all() for i, g in enumerate(groups))
    if not inside:
        raise UserError(f'{path} does not fit this training file ({len(labels)} labels for {len(primary)} images, or '
                        'labels outside their primary class\'s group): was the data root changed? Resume with '
                        'the data the run started with, or start a new run.')
    return labels


def auxiliary_labels(run, train_x, primary, groups):
    """Random or K-means: each training image's auxiliary class, drawn once for the run and kept in its folder
    (AUX_LABELS_FILE); a resumed run reads them back (never drawn again). Under torchrun the first process
    reads or draws them and sends them to the others, so every process trains on the same labels (and only one
    trains the autoencoder)."""
    cfg, path = run.cfg, os.path.join(run.dir, AUX_LABELS_FILE)
    got = None
    if run.rank == 0:
        try:
            if run.resuming:
                got = read_labels(path, primary, groups)
            elif cfg.aux_labels == 'random':
                got = random_labels(primary, groups, cfg.seed)
            else:
                start = time.perf_counter()
                features = autoencoder_features(train_x, cfg, run.device, run.log)
                middle = time.perf_counter()
                got = kmeans_labels(features, primary, groups, cfg.seed, cfg.kmeans_n_init)
                run.log.print(f'k-means labels: autoencoder {middle - start:.1f} s, k-means '
                              f'{time.perf_counter() - middle:.1f} s')
            run.keep_lists({AUX_LABELS_FILE: got})            # a new run's, in its folder
        except UserError as e:
            got = e
    if run.world > 1:
        import torch.distributed as dist
        box = [got]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
    if isinstance(got, UserError):
        raise got
    return got


# ---- K-means: an autoencoder trained on the training images; its codes are clustered -----------------------

def autoencoder_features(images, cfg, device, log):
    """Train the autoencoder on the training images (normalised as the VGG sees them, not augmented) for
    ae_epochs with Adam on the mean squared reconstruction error; return the codes of all of them, in
    order ([N, ae_code], float64). Seeded with its own streams: the global random state is left as it
    was, so the multi-task network starts from the same weights as the same seed's Human run."""
    if isinstance(images, large_datasets.FileList):         # image files: as 32-pixel thumbnails
        images = large_datasets.thumbnails(images, 32, cfg.workers)
    data = DeviceData(images, np.zeros(len(images), dtype=np.int64), device, *normalisation(cfg.dataset))
    seed = stream_seed(cfg.seed, STREAM_STRIDE - 1)           # a stream no epoch uses
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        ae = AutoEncoder(cfg.ae_width, cfg.ae_code).to(device)
        optimizer = torch.optim.Adam(ae.parameters(), lr=cfg.ae_lr)
        order = device_generator(device, seed)
        for epoch in range(cfg.ae_epochs):
            total = torch.zeros((), device=device)
            for x, _ in data.batches(cfg.ae_batch_size, order, shuffle=True):
                loss = F.mse_loss(ae(x), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(x)
            log.print(f'autoencoder epoch {epoch + 1}/{cfg.ae_epochs}: reconstruction error {float(total) / len(data):.4f}')
        ae.eval()
        with torch.no_grad():
            codes = torch.cat([ae.encoder(x) for x, _ in data.batches(500)])
    return codes.double().cpu().numpy()


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


# ---- how results.py tables this script's runs (as Single's, but for the method and its settings) ----

UNIT, PAPER, TIME_NOTE, run_seconds, SELECTION = (model_vgg_single.UNIT, model_vgg_single.PAPER, model_vgg_single.TIME_NOTE,
                                                   model_vgg_single.run_seconds, model_vgg_single.SELECTION)
HEADLINE = ['primary_level', 'aux_level', 'psi', 'num_samples_per_class', 'width']
METHOD_OPTIONS = ['aux_labels']
OLDER_RUNS = {'aux_labels': 'human', 'model': 'vgg16'}     # a run from before --aux_labels trained Human (--model: VGG-16)


def reported(cfg):
    """Human, Random or K-means: the primary task's mean test accuracy over the last 5 epochs (SELECTION)."""
    return [({'random': 'Random', 'kmeans': 'K-means'}.get(cfg.get('aux_labels'), 'Human'), 'test_acc', SELECTION)]


def unused_options(cfg):
    """The autoencoder's options: K-means only; the hierarchy's levels or psi, whichever the dataset does not use."""
    out = set() if cfg.get('aux_labels') == 'kmeans' else {k for k in cfg if k.startswith('ae_') or k == 'kmeans_n_init'}
    out |= {'psi'} if has_hierarchy(cfg.get('dataset', 'cifar100')) else {'primary_level', 'aux_level'}
    out |= data_options_unused(cfg)
    return out & set(cfg)


def main(argv=None):
    cfg, cli = read_config('model_vgg_human', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    check(cfg, cli.typed)
    train_x, train_y, test_x, test_y, pri = load_columns(cfg)
    if has_hierarchy(cfg.dataset):                        # primary class i -> its auxiliary classes
        aux, groups = cfg.aux_level, hierarchy_groups(train_y, pri, cfg.aux_level)
    else:
        aux, groups = None, psi_groups(psi_per_class(cfg.psi, n_classes(cfg, pri, train_x)))
    if cfg.aux_labels == 'kmeans':
        check_groups_fill(train_y[:, pri], groups)        # before the run folder is written

    run = Run('model_vgg_human', cfg, cli)
    # Human: the hierarchy's labels, scored on the test set too. Random / K-means: the run's assignment as
    # an extra column; the test set has no such labels (no rule gives an unseen image a Random class, and
    # the comparison is on the primary task), so only the primary head is tested.
    columns, tested = (pri, aux), (pri, aux)
    if cfg.aux_labels != 'human':
        assigned = auxiliary_labels(run, train_x, train_y[:, pri], groups)
        columns, tested = (pri, train_y.shape[1]), (pri,)
        train_y = np.concatenate([train_y, assigned[:, None]], axis=1)
    train, test = place(train_x, train_y, cfg, run), place(test_x, test_y, cfg, run)
    net = run.network(network(cfg, {'classifier1': n_classes(cfg, pri, train_x), 'classifier2': sum(len(g) for g in groups)}))
    fit(run, net, train, test, train_step, columns, tested)      # as Single, with the second head's loss added


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
