"""Which images a run trains, validates and tests on: every split the scripts draw, in one place.

  held_out                              SLA's CIFAR-like splits in one call: a validation set held out of the
                                        training file (drawn with the seed, or given as an index file), the
                                        rest (or k images of every class, or a long tail) for training, and
                                        the lists to keep; on --resume the run folder's own (kept_held_out)
  validation_size, draw_validation,     its parts: the validation size, the drawn validation set, the
  held_out_split, read_indices          held-out split, an index file read
  long_tailed_counts, long_tailed_split a long-tailed training set (the exponential profile of Cui et al. over the
                                        whole training file), validation from the images it leaves unused
  samples_per_class, per_class          k images of every class (the MAXL scripts' --num_samples_per_class;
                                        the large datasets)
  check_batch                           a batch of distinct images fits in the training set (train_sla)
  check_label_budget,                   a class-balanced labeled / unlabeled split (a number of labels, or a
  balanced_label_split,                 fraction of every class), as the MetaSemi code draws it; read back
  fraction_label_split,                 from a run folder (train_meta_semi, plot_features)
  read_label_indices
  draw_classes, read_names,             a subset of the classes (ImageNet's imagenetN) and a list of labeled
  label_list_split                      images, named in a file (large_datasets, train_meta_semi)

A new run keeps its lists in its folder with utils.Run.keep_lists. Every draw is a pure function of the
seed and its own tag (the validation split 0, samples per class 1, the long tail 2, the classes 2 of
another stream), never of the global random state. Used by the five scripts' data (model_vgg_single.py,
train_sla.py, train_meta_semi.py), plot_features.py and machinery/large_datasets.py; the scripts name
their options, these functions take values.
"""
import math
import os

import numpy as np

from .options import UserError

VAL_INDICES, TRAIN_INDICES = 'val_indices.txt', 'train_indices.txt'   # a held-out split, kept in the run folder


# ---- a validation set held out of the training file, the rest (or k per class) for training ----

def validation_size(n_train, val_size, synthetic):
    """Images held out for validation: val_size (the SLA code: 5,000 of CIFAR's 50,000); the synthetic
    stand-ins are small, so there it is at most a tenth of the training file (the original's ratio)."""
    n_val = min(val_size, n_train // 10) if synthetic else val_size
    if not 1 <= n_val < n_train:
        raise UserError(f'cannot hold out {n_val} validation images from {n_train} training images: '
                        f'choose --val-size between 1 and {n_train - 1}.')
    return n_val


def draw_validation(n_train, n_val, seed):
    """n_val distinct indices of the training file, drawn uniformly with the seed, sorted."""
    return np.sort(np.random.default_rng([seed, 0]).permutation(n_train)[:n_val]).astype(np.int64)


def read_indices(path, n_train):
    """Indices from a text file (one integer a line, as write_indices writes) or a .npy file (the SLA
    code's splits/<dataset>_val_idx.npy); checked: integers, distinct, within the training file."""
    try:
        if path.endswith('.npy'):
            idx = np.load(path, allow_pickle=False)
        else:
            idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read the index file {path!r} ({e}): give a text file with one image index a '
                        'line (like val_indices.txt in a run folder) or a .npy array of integers.') from None
    idx = np.asarray(idx).reshape(-1)
    if not np.issubdtype(idx.dtype, np.integer) or len(idx) == 0:
        raise UserError(f'{path!r} must hold a non-empty list of integer image indices, got dtype {idx.dtype}.')
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= n_train or len(np.unique(idx)) != len(idx):
        raise UserError(f'{path!r} must hold distinct indices in 0..{n_train - 1} (the training file has '
                        f'{n_train} images); it has values {idx.min()}..{idx.max()} and '
                        f'{len(idx) - len(np.unique(idx))} repeats. Was it written for another dataset?')
    return np.sort(idx)


def samples_per_class(indices, labels, k, seed):
    """k images of every class, drawn with the seed from `indices` (the limited-data setting)."""
    rng = np.random.default_rng([seed, 1])
    picked = []
    for c in np.unique(labels):
        members = indices[labels[indices] == c]
        if len(members) < k:
            raise UserError(f'class {c} has only {len(members)} training images outside the validation split, '
                            f'fewer than --num-samples-per-class {k}.')
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def per_class(labels, k, seed, kept=None, classes=None):
    """The training images used (indices into the training list): all (k 0), or k of every class drawn with
    the seed; a resumed run (`kept`: its folder) reads its own back from train_indices.txt."""
    pool = np.arange(len(labels))
    if not k:
        return pool
    if kept:
        return read_indices(os.path.join(kept, TRAIN_INDICES), len(labels))
    counts = np.bincount(labels, minlength=len(classes) if classes is not None else 0)
    if counts.min() < k:
        name = classes[counts.argmin()] if classes is not None else counts.argmin()
        raise UserError(f'--num-samples-per-class {k}: class {name} has only {counts.min()} training images: use at '
                        f'most {counts.min()}.')
    return samples_per_class(pool, labels, k, seed)


def check_batch(batch_size, processes, n_train):
    """A batch holds distinct images: batch_size x processes within the n_train training images (None: no
    training set)."""
    if n_train is not None and batch_size * processes > n_train:
        raise UserError(f'--batch-size {batch_size} x {processes} process(es) exceeds the {n_train} training images '
                        '(a batch holds distinct images): lower it.')


def held_out_split(labels, n_val, seed, per_class=0, val_indices=None):
    """(train indices, val indices) into the training file: the validation images (given, or n_val drawn
    with the seed), the rest for training, optionally cut to `per_class` images of every class."""
    n = len(labels)
    val = draw_validation(n, n_val, seed) if val_indices is None else np.asarray(val_indices, dtype=np.int64)
    if len(val) >= n:
        raise UserError(f'the validation indices cover all {n} training images: nothing is left to train on.')
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    train = np.flatnonzero(keep).astype(np.int64)
    if per_class:
        train = samples_per_class(train, np.asarray(labels), per_class, seed)
    return train, val


# ---- a long-tailed training set: the exponential profile of Cui et al. (CVPR 2019) ----

def long_tailed_counts(n_max, n_classes, ratio):
    """Images kept of class i = 0..C-1: floor(n_max * ratio^(-i / (C - 1))): n_max of class 0 down to
    n_max / ratio of the last (CIFAR-10, n_max 5,000, R 100: 5,000, 2,997, ..., 83, 50)."""
    return [math.floor(n_max * ratio ** (-i / (n_classes - 1))) for i in range(n_classes)]


def long_tailed_split(labels, n_val, ratio, seed):
    """(train, val) indices into a class-balanced training file, for an imbalance ratio R: the common CIFAR-LT.
    Each class's images in an order drawn with the seed: class i trains on the first long_tailed_counts[i] of
    them, the profile over all n_max images a class has (CIFAR-10: 5,000, so R 100 keeps 12,406 of the 50,000
    images, R 10 20,431). The validation images are drawn from the images the tail leaves unused: the next
    n_val // C of every class, or as many as that class has left (the first class, which keeps all its images,
    has none; at R 10 and 100 on CIFAR-10/100 at most the first 5 classes have fewer than n_val // C left), so
    the tail is never shrunk for them."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    n_classes = len(counts)
    if counts.min() != counts.max():
        raise UserError(f'--imbalance_ratio makes a long-tailed set out of a balanced training file, but this one '
                        f'has {counts.min()} to {counts.max()} images per class. Use the official files or the '
                        'stand-in as written (both balanced).')
    per_val = n_val // n_classes
    if per_val < 1:
        raise UserError(f'--imbalance_ratio draws up to n_val // C validation images of every class, but {n_val} '
                        f'validation images are fewer than one per class ({n_classes} classes): raise --val-size.')
    n_max = int(counts[0])
    keep = long_tailed_counts(n_max, n_classes, ratio)
    if keep[-1] < 1:
        raise UserError(f'--imbalance_ratio {ratio:g} leaves class {n_classes - 1} no training image: each class has '
                        f'{n_max}, so the ratio can be at most {n_max}.')
    rng = np.random.default_rng([seed, 2])
    train, val = [], []
    for c in range(n_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        train.append(order[:keep[c]])
        val.append(order[keep[c]:keep[c] + per_val])
    if not sum(map(len, val)):
        raise UserError(f'--imbalance_ratio {ratio:g} uses every training image, so none is left for validation: '
                        'choose a larger ratio.')
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


# ---- a held-out split: drawn by a new run, kept in its folder, read back on resume ----

def held_out(labels, seed, n_val, val_indices='', per_class=0, ratio=1.0, kept=None):
    """(train, val, the lists to keep in the run folder) of a training file: a resumed run's own (`kept`: its
    folder); else n_val images held out (drawn with the seed, or named by the file `val_indices`), the rest for
    training, or `per_class` images of every class, or a long tail of imbalance `ratio`."""
    if kept:
        train, val = kept_held_out(kept, len(labels), needs_train_list=ratio > 1)
    elif ratio > 1:
        train, val = long_tailed_split(labels, n_val, ratio, seed)
    else:
        given = read_indices(val_indices, len(labels)) if val_indices else None
        train, val = held_out_split(labels, n_val, seed, per_class, given)
    return train, val, {VAL_INDICES: val} | ({TRAIN_INDICES: train} if per_class or ratio > 1 else {})



def kept_held_out(folder, n_train, needs_train_list=False):
    """The (train, val) indices a run wrote into its folder (write_held_out): val_indices.txt, and
    train_indices.txt where the training images are not simply the rest (k per class, a long tail)."""
    val_file, train_file = os.path.join(folder, VAL_INDICES), os.path.join(folder, TRAIN_INDICES)
    if needs_train_list and not os.path.isfile(train_file):
        raise UserError(f'{train_file} is missing: a run with a long-tailed or per-class training set keeps its '
                        'training images there and cannot continue without them. Start a new run instead.')
    val = read_indices(val_file, n_train)
    if os.path.isfile(train_file):
        return read_indices(train_file, n_train), val
    keep = np.ones(n_train, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep).astype(np.int64), val


# ---- class-balanced labeled / unlabeled splits ----

def check_label_budget(labels, num_label, num_classes):
    """A UserError unless num_label is a positive multiple of num_classes that leaves every class with at
    least one unlabeled image."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if num_label < num_classes or num_label % num_classes:
        raise UserError(f'--num-label {num_label} must be a positive multiple of the number of classes '
                        f'({num_classes}), so that every class gets the same number of labeled images.')
    per_class = num_label // num_classes
    if per_class >= counts.min():
        raise UserError(f'--num-label {num_label} asks for {per_class} labeled images per class, but the '
                        f'smallest class of this training set has only {counts.min()} images ({len(labels)} in '
                        f'all) and some must stay unlabeled: use at most {num_classes * (counts.min() - 1)}.')


def balanced_label_split(labels, num_label, seed):
    """Class-balanced labeled / unlabeled split, drawn as the MetaSemi code draws it: shuffle the indices
    0..N-1 with Python's random seeded by `seed`, walk the shuffled list, and take an index as labeled
    while its class has fewer than num_label // C labeled images. Returns (labeled, unlabeled) int64
    arrays, disjoint, together all of 0..N-1; labeled in the order drawn (the order of label_indices.txt),
    unlabeled in increasing order."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    return _label_split(labels, np.full(num_classes, num_label // num_classes), seed)


def fraction_label_split(labels, fraction, seed):
    """As balanced_label_split, but each class gets round(fraction x its images) labeled (at least one, and
    at least one left unlabeled): ImageNet's 10%, whose classes hold 732 to 1,300 images."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise UserError('every class needs at least two training images (one labeled, one unlabeled).')
    return _label_split(labels, np.clip(np.round(fraction * counts).astype(np.int64), 1, counts - 1), seed)


def _label_split(labels, per_class, seed):
    import random
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    order = np.asarray(order, dtype=np.int64)
    shuffled = labels[order]
    take = np.zeros(len(order), dtype=bool)
    for c, k in enumerate(per_class):
        take[np.flatnonzero(shuffled == c)[:k]] = True
    return order[take], np.sort(order[~take])       # unlabeled in index order, as read_label_indices gives it


def read_label_indices(path, n_train):
    """The labeled indices of a run's label_indices.txt and the unlabeled rest of 0..n_train-1."""
    try:
        labeled = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except OSError:
        raise UserError(f'cannot read {path!r}: the run folder has no label_indices.txt.') from None
    unlabeled = np.setdiff1d(np.arange(n_train), labeled)
    return labeled, unlabeled


# ---- subsets of the classes, and lists of labeled images, named in files ----

def draw_classes(num_classes, n, seed):
    """n of num_classes classes, drawn with the seed, sorted (an imagenetN subset)."""
    if not 1 <= n <= num_classes:
        raise UserError(f'imagenet{n} asks for {n} classes, but the data has {num_classes}.')
    return np.sort(np.random.default_rng([seed, 2]).permutation(num_classes)[:n])


def read_names(path, known, what):
    """The names in a list file (first field of each line; `<wnid>/<file>` lines give the folder name for
    classes), checked against `known` (name -> index); returns their indices in file order."""
    try:
        with open(path) as f:
            names = [line.split()[0] for line in f if line.strip()]
    except OSError as e:
        raise UserError(f'cannot read the {what} list {path!r} ({e}).') from None
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f'{path!r} must list distinct {what} of this dataset, one a line; '
                        f'{len(unknown)} of {len(names)} are not in it (first: {unknown[:3]}), '
                        f'{len(names) - len(set(names))} repeat.')
    return np.asarray([known[n] for n in names], dtype=np.int64)


def label_list_split(paths, label_list):
    """A labeled split from a list file in the MetaSemi code's format (one `<wnid>/<file>` a line, first
    field used): (labeled, unlabeled) indices into `paths` (the image files, relative to the split's folder)."""
    known = {p.replace(os.sep, '/'): i for i, p in enumerate(paths)}
    labeled = read_names(label_list, known, 'images (<class folder>/<file>)')
    return labeled, np.setdiff1d(np.arange(len(paths)), labeled)
