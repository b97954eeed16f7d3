"""CIFAR-100 (with its 4-level label hierarchy), CIFAR-10, SVHN and Fashion-MNIST: the official files
(download, md5 checks, readers), their synthetic stand-ins, and the hierarchy's groups (MAXL's auxiliary
classes under each primary class). load() gives a split as uint8 images and labels; the scripts put them on
the device (machinery/streams.py) and split them (machinery/splits.py). Used by the five scripts,
plot_features.py, reproduce.py (the stand-ins of --quick) and the benchmarks; the file-streamed large
datasets (ImageNet, iNaturalist, ...) are in machinery/large_datasets.py. Also a dataset as the MAXL paper's
scripts train on it, any of these or a file-streamed one (load_columns: its images and label columns;
place: on the device, or streamed).

Each dataset is one `Dataset` record in `DATASETS`, and the download, the md5 checks, the missing-data
message, loading, the stand-ins and the command line all read it; to add a dataset, write a reader
`(folder, train) -> (uint8 images [N,3,32,32], int64 labels)` for its on-disk format (and a synthetic
writer if the format is new), then add one `Dataset(...)` to `DATASETS` with its folder, files and md5
sums, where to fetch them, label columns, normalisation and augmentation.

    .venv/bin/python create_dataset.py --synthetic                 # every stand-in, into dataset/synthetic/
    .venv/bin/python create_dataset.py --download cifar100         # the official files, md5-checked
"""
import argparse
import dataclasses
import gzip
import importlib.util
import json
import os
import pickle
import struct
import sys
import zlib
from typing import Callable, Mapping, Optional

import numpy as np

from machinery import large_datasets, splits
from machinery.files import SYNTHETIC_DIR, dataset_root, md5sum, safe_unpickle
from machinery.options import UserError, check_positive, python_command, spellings, stand_in
from utils import run_main

DATA_ROOT = 'dataset'

# CIFAR-100's 4-level hierarchy (MAXL, Appendix A): 20 coarse classes -> 10 -> 3.
COARSE20_TO_10 = [1, 2, 5, 6, 5, 6, 6, 3, 0, 7, 8, 0, 1, 3, 4, 0, 2, 5, 9, 9]
LEVEL10_TO_3 = [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
LEVEL_CLASSES = [3, 10, 20, 100]      # label level k = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# The record: what a dataset is, and the two ways its official files are fetched
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Archive:
    """The files come in one gzipped tarball that unpacks into the data root (holding the folder)."""
    url: str
    filename: str
    md5: str

    def downloads(self, ds, root):
        """(url, destination, md5) of everything to fetch."""
        return [(self.url, os.path.join(root, self.filename), self.md5)]

    def unpack(self, path, root):
        from torchvision.datasets.utils import extract_archive
        extract_archive(path, root)

    def instructions(self, ds, root):
        return (f'download {self.url} (md5 {self.md5}) into {root}/ and unpack it there '
                f'(tar xzf {os.path.join(root, self.filename)} -C {root})')


@dataclasses.dataclass(frozen=True)
class FileUrls:
    """Each file is fetched on its own, from base_url + its name + suffix ('.gz': a gzip-compressed copy),
    straight into the folder. debian = (package, folder): a Debian package that installs the files there."""
    base_url: str
    suffix: str = ''
    debian: Optional[tuple] = None

    def downloads(self, ds, root):
        return [(self.base_url + f + self.suffix, os.path.join(root, ds.folder, f + self.suffix), md5)
                for f, md5 in ds.files.items()]

    def unpack(self, path, root):
        pass

    def instructions(self, ds, root):
        fetch = (f'download {", ".join(self.base_url + f + self.suffix for f in ds.files)} into '
                 f'{os.path.join(root, ds.folder)}/')
        if self.debian is None:
            return fetch
        package, folder = self.debian
        return (f'install Debian\'s package {package} (sudo apt-get install {package}) and give --data_root {folder}, '
                f'or {fetch}')


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """How the stand-in is written: writer(folder, {'train': (images, labels), 'test': ...}) puts the
    generated uint8 images and class labels into the real on-disk format; sizes = (train, test) images
    of the small stand-in, full = those of the real dataset (--synthetic_size full); groups = how many
    colour/orientation groups the classes share (default: one per class); images(labels, classes, groups,
    seed) draws the uint8 images the writer takes (default: synthetic_images, colour [N, 3, 32, 32])."""
    writer: Callable
    sizes: tuple
    groups: Optional[int] = None
    full: Optional[tuple] = None
    images: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Everything about one dataset. `files` (name in the folder -> md5) may be empty for a dataset whose
    files are not checked one by one. Labels are [N] for one label column, [N, k] for k columns;
    `primary` is the column the single-label scripts (SLA, MetaSemi) train on. The official files lie in
    `folder` under the data root, or in one of `places` (more folders under it, '.' the root itself);
    `gzipped`: each file may lie gzip-compressed as NAME.gz or unpacked as NAME, and `files` holds the md5
    of its unpacked bytes (the same whichever archive they came in)."""
    name: str
    folder: str                          # under the data root (or its synthetic/ folder)
    reader: Callable                     # (folder, train) -> (uint8 images [N,3,32,32], int64 labels)
    source: object                       # Archive or FileUrls: how the official files are fetched
    label_classes: tuple                 # classes of each label column
    mean: tuple                          # per-channel mean and std of the training set, in [0, 1] units
    std: tuple
    files: Mapping = dataclasses.field(default_factory=dict)
    primary: int = 0
    pad: int = 4                         # training augmentation: random crop with this zero padding,
    flip: bool = True                    # and random horizontal flip
    synthetic: Optional[Synthetic] = None
    requires: tuple = ()                 # modules its reader and synthetic writer import
    places: tuple = ()                   # more folders that may hold the official files
    gzipped: bool = False                # files may be NAME.gz; md5 of the unpacked bytes

    @property
    def num_classes(self):
        return self.label_classes[self.primary]

    @property
    def normalisation(self):
        return self.mean, self.std

    def primary_labels(self, labels):
        """The primary column of `labels` as load() returns them (a single column as it is)."""
        return labels if len(self.label_classes) == 1 else labels[:, self.primary]

    def missing_modules(self):
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


# ----------------------------------------------------------------------------------------------------
# Readers: uint8 images [N, 3, 32, 32] and integer labels from a dataset's folder
# ----------------------------------------------------------------------------------------------------

def _unpickle(path):
    with open(path, 'rb') as f:
        return safe_unpickle(f, path)


def cifar100_hierarchy(coarse, fine):
    """[N, 4] labels, level k = 0, 1, 2, 3 -> 3, 10, 20, 100 classes."""
    coarse = np.asarray(coarse, dtype=np.int64)
    c10 = np.asarray(COARSE20_TO_10)[coarse]
    c3 = np.asarray(LEVEL10_TO_3)[c10]
    return np.stack([c3, c10, coarse, np.asarray(fine, dtype=np.int64)], axis=1)


def read_cifar100(folder, train):
    """The official python pickle; labels [N, 4] (the hierarchy levels)."""
    d = _unpickle(os.path.join(folder, 'train' if train else 'test'))
    images = np.asarray(d['data'], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, cifar100_hierarchy(d['coarse_labels'], d['fine_labels'])


# ---- the hierarchy's groups (MAXL's psi with --aux_level; the Human, Random and K-means groups) ----

def check_levels(primary_level, aux_level):
    if aux_level <= primary_level:
        raise UserError(f'aux_level {aux_level} does not refine primary_level {primary_level}: the auxiliary '
                        f'labels must be a finer level of the hierarchy (a larger level number), e.g. '
                        f'--primary_level 2 --aux_level 3.')


def hierarchy_table():
    """One row per fine class of CIFAR-100: its labels at levels 0..3 (cifar100_hierarchy).
    CIFAR-100 puts 5 of its 100 fine classes in each of its 20 coarse classes; which 5 differs between the
    real files and the stand-in (whose fine class f lies in coarse class f % 20), how many does not, and
    the group sizes depend only on how many."""
    fine = np.arange(LEVEL_CLASSES[3])
    return cifar100_hierarchy(fine % LEVEL_CLASSES[2], fine)


def hierarchy_psi(primary_level, aux_level):
    """psi[i]: how many level-`aux_level` classes the hierarchy puts under primary class i, in
    primary-class order (sum: the level's class count). (2, 3): [5] * 20; (0, 1): [5, 1, 4]."""
    check_levels(primary_level, aux_level)
    table = hierarchy_table()
    return [len(np.unique(table[table[:, primary_level] == i, aux_level]))
            for i in range(LEVEL_CLASSES[primary_level])]


def hierarchy_groups(labels, primary_level, aux_level):
    """groups[i]: the level-`aux_level` classes under primary class i in this data ([N, 4] labels), in
    increasing order; their sizes are checked against hierarchy_psi."""
    pairs = np.unique(labels[:, [aux_level, primary_level]], axis=0)
    if len(pairs) != len(np.unique(pairs[:, 0])):
        raise UserError(f'in this data, level {aux_level} does not refine level {primary_level} (some auxiliary '
                        f'class appears under two primary classes); pick levels of one hierarchy.')
    groups = [pairs[pairs[:, 1] == i, 0] for i in range(LEVEL_CLASSES[primary_level])]
    expected = hierarchy_psi(primary_level, aux_level)
    if [len(g) for g in groups] != expected:
        raise UserError(f'this training file has {[len(g) for g in groups]} level-{aux_level} classes under the '
                        f'level-{primary_level} classes, not the hierarchy\'s {expected}: some class has no '
                        'training image. Use the full training file (or a stand-in written with at least one '
                        'image of every fine class).')
    return groups


def read_cifar10(folder, train):
    """The official python pickles (five training batches); labels [N]."""
    names = [f'data_batch_{i}' for i in range(1, 6)] if train else ['test_batch']
    batches = [_unpickle(os.path.join(folder, n)) for n in names]
    images = np.concatenate([np.asarray(b['data'], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b['labels'], dtype=np.int64) for b in batches])
    return images, labels


def read_svhn(folder, train):
    """The official .mat files; labels [N] with digit 0 labelled 0 (the files label it 10)."""
    import scipy.io
    m = scipy.io.loadmat(os.path.join(folder, 'train_32x32.mat' if train else 'test_32x32.mat'))
    images = np.ascontiguousarray(np.transpose(m['X'], (3, 2, 0, 1))).astype(np.uint8)
    labels = m['y'].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels


# ---- Fashion-MNIST: idx files (the MNIST format), gzip-compressed or not ----

IDX_ADVICE = ('Replace it with the official file (--download fetches it and checks its md5), or, for a synthetic '
              'stand-in, delete its folder: it is written anew.')


def _is_gzip(path):
    """Whether the file starts with gzip's magic bytes (an idx file starts with two zero bytes)."""
    with open(path, 'rb') as f:
        return f.read(2) == b'\x1f\x8b'


def gz_or_plain(folder, name):
    """The path of `name` in `folder` as NAME.gz, else as the unpacked NAME; None when neither is there."""
    for path in (os.path.join(folder, name + '.gz'), os.path.join(folder, name)):
        if os.path.isfile(path):
            return path
    return None


def read_idx(path, ndim):
    """The uint8 array of an idx file (the MNIST format), gzip-compressed or not: a big-endian header (two
    zero bytes, type 0x08 = unsigned byte, the number of dimensions: 0x00000803 for images, 0x00000801
    for labels), each dimension's size as a big-endian uint32, then the bytes in row-major order. The
    magic number, the dimensions and the length are checked: a damaged, truncated or other file is a
    UserError naming it."""
    try:
        with (gzip.open if _is_gzip(path) else open)(path, 'rb') as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f'{path} cannot be decompressed ({e}): the gzip file is truncated or damaged. '
                        f'{IDX_ADVICE}') from None
    magic, head = struct.pack('>I', 0x800 + ndim), 4 + 4 * ndim
    if data[:4] != magic:
        other = (f' (that of an idx file with {data[3]} dimension(s): another file under this name?)'
                 if data[:3] == magic[:3] and len(data) >= 4 else '')
        raise UserError(f'{path} is not an idx file of unsigned bytes with {ndim} dimension(s): it starts with '
                        f'0x{data[:4].hex()}{other}, not the magic number 0x{magic.hex()}. {IDX_ADVICE}')
    dims = struct.unpack(f'>{ndim}I', data[4:head]) if len(data) >= head else None
    size = None if dims is None else head + int(np.prod(dims, dtype=np.int64))
    if len(data) != size:
        announced = ('ends inside its header' if dims is None else
                     f'announces {" x ".join(map(str, dims))} bytes, {size:,} with the header')
        raise UserError(f'{path} is {len(data):,} bytes long and {announced}: the file is truncated or damaged. '
                        f'{IDX_ADVICE}')
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


def read_fashion_mnist(folder, train):
    """Fashion-MNIST's idx files (each as NAME.gz or unpacked NAME): uint8 images [N, 3, 32, 32], each
    grey 28 x 28 image zero-padded by 2 pixels on every side (its background is 0) and repeated into the
    3 channels the networks take; labels [N] (10 classes)."""
    split = 'train' if train else 't10k'
    arrays = {}
    for kind, ndim in (('images-idx3', 3), ('labels-idx1', 1)):
        name = f'{split}-{kind}-ubyte'
        path = gz_or_plain(folder, name)
        if path is None:
            raise UserError(f'neither {name}.gz nor {name} is in {folder}/. {IDX_ADVICE}')
        arrays[kind] = path, read_idx(path, ndim)
    (images_path, grey), (labels_path, labels) = arrays.values()
    if grey.shape[1:] != (28, 28):
        raise UserError(f'{images_path} holds images of {grey.shape[1]} x {grey.shape[2]} pixels, not '
                        f'Fashion-MNIST\'s 28 x 28. {IDX_ADVICE}')
    if len(labels) != len(grey) or labels.max(initial=0) >= 10:
        raise UserError(f'{labels_path} holds {len(labels):,} labels from {labels.min(initial=0)} to '
                        f'{labels.max(initial=0)}, where the {len(grey):,} images of {images_path} need one of '
                        f'0..9 each. {IDX_ADVICE}')
    images = np.zeros((len(grey), 3, 32, 32), dtype=np.uint8)
    images[:, :, 2:30, 2:30] = grey[:, None]
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# The synthetic stand-in: same files, keys and dtypes as the real data, with learnable structure
# ----------------------------------------------------------------------------------------------------

def synthetic_images(fine, n_fine, n_coarse, seed):
    """uint8 [N,3,32,32] images whose class shows: the coarse class (fine % n_coarse) sets the colour of
    a background grating and its orientation; the fine class inside a coarse class sets the grating's
    frequency and a coloured square. Gaussian noise on top. Survives crop-with-padding and flips."""
    rng = np.random.default_rng(seed)
    fine = np.asarray(fine)
    coarse = fine % n_coarse
    sub = fine // n_coarse                     # index of the fine class inside its coarse class
    n_sub = max(1, n_fine // n_coarse)
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    hue = coarse / n_coarse * 2 * np.pi
    colour = np.stack([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)], 1) * 0.35 + 0.5   # [N,3]
    angle = (coarse % 4) * np.pi / 4
    freq = 0.25 + 0.45 * sub / max(1, n_sub - 1)
    phase = rng.uniform(0, 2 * np.pi, len(fine))
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    grating = 0.5 + 0.5 * np.sin(freq[:, None, None] * proj + phase[:, None, None])           # [N,32,32]
    img = colour[:, :, None, None] * (0.55 + 0.45 * grating[:, None])
    sq = 0.2 + 0.6 * (sub / max(1, n_sub - 1))
    cy, cx = rng.integers(6, 20, len(fine)), rng.integers(6, 20, len(fine))
    inside = (np.abs(yy - cy[:, None, None]) < 5) & (np.abs(xx - cx[:, None, None]) < 5)
    img = np.where(inside[:, None], np.stack([sq, 1 - sq, sq * 0.5], 1)[:, :, None, None], img)
    img = img + rng.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def synthetic_grey_images(labels, n_classes, groups, seed):
    """uint8 [N, 28, 28] grey images whose class shows, on a black background as Fashion-MNIST's: a centred
    object of random size and brightness filled with stripes, horizontal for even classes and vertical for
    odd ones, finer the higher the class (both survive flips and shifts), under noise. `groups` is
    synthetic_images' argument, unused here."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = len(labels)
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing='ij')
    freq = 0.35 + 0.8 * (labels // 2) / max(1, (n_classes + 1) // 2 - 1)             # radians per pixel
    across = np.where((labels % 2 == 0)[:, None, None], yy, xx)
    stripes = 0.5 + 0.5 * np.sin(freq[:, None, None] * across + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
    half, centre = rng.integers(7, 13, (n, 2, 1, 1)), 13.5 + rng.integers(-2, 3, (n, 2, 1, 1))
    inside = (np.abs(yy - centre[:, 0]) <= half[:, 0]) & (np.abs(xx - centre[:, 1]) <= half[:, 1])
    img = inside * (rng.uniform(0.6, 1, (n, 1, 1)) * (0.2 + 0.8 * stripes) + rng.normal(0, 0.06, (n, 28, 28)))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _balanced_labels(n, n_classes, rng):
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels


def _write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar100_files(folder, splits):
    """CIFAR-100's pickles; the coarse class of fine class f is f % 20 (as the images draw it)."""
    for split, (x, fine) in splits.items():
        _write_pickle(os.path.join(folder, split), {
            'filenames': [f'synthetic_{i}.png' for i in range(len(fine))], 'batch_label': f'synthetic {split}',
            'fine_labels': fine.tolist(), 'coarse_labels': (fine % 20).tolist(),
            'data': x.reshape(len(x), -1)})
    _write_pickle(os.path.join(folder, 'meta'), {
        'fine_label_names': [f'fine_{i}' for i in range(100)],
        'coarse_label_names': [f'coarse_{i}' for i in range(20)]})


def write_cifar10_files(folder, splits):
    """CIFAR-10's pickles: the training images in five batches, the test images in one."""
    x, y = splits['train']
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        _write_pickle(os.path.join(folder, f'data_batch_{i}'), {
            'batch_label': f'synthetic batch {i}', 'labels': y[part].tolist(),
            'data': x[part].reshape(len(part), -1), 'filenames': [f'synthetic_{j}.png' for j in part]})
    x, y = splits['test']
    _write_pickle(os.path.join(folder, 'test_batch'), {
        'batch_label': 'synthetic test', 'labels': y.tolist(), 'data': x.reshape(len(x), -1),
        'filenames': [f'synthetic_{j}.png' for j in range(len(y))]})
    _write_pickle(os.path.join(folder, 'batches.meta'), {
        'label_names': [f'class_{i}' for i in range(10)], 'num_cases_per_batch': len(y), 'num_vis': 3072})


def write_svhn_files(folder, splits):
    """SVHN's .mat files: images [32, 32, 3, N], labels [N, 1] with digit 0 as 10."""
    import scipy.io
    for split, (x, y) in splits.items():
        mat_y = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        scipy.io.savemat(os.path.join(folder, f'{split}_32x32.mat'),
                         {'X': np.transpose(x, (2, 3, 1, 0)), 'y': mat_y})


def write_idx(path, array):
    """A uint8 array as a gzip-compressed idx file (the header read_idx reads; no time in the gzip header)."""
    header = struct.pack(f'>I{array.ndim}I', 0x800 + array.ndim, *array.shape)
    with open(path, 'wb') as f:
        f.write(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), 6, mtime=0))


def write_fashion_mnist_files(folder, splits):
    """Fashion-MNIST's four idx files under their official names, gzip-compressed: grey images [N, 28, 28]
    and labels [N]."""
    for split, (x, y) in splits.items():
        prefix = 'train' if split == 'train' else 't10k'
        write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), x)
        write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), np.asarray(y, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------
# The registry (files and md5 sums: the values torchvision checks; mean/std: the MetaSemi code's;
# Fashion-MNIST's: see its record)
# ----------------------------------------------------------------------------------------------------

DATASETS = {d.name: d for d in [
    Dataset(
        'cifar100', folder='cifar-100-python', reader=read_cifar100,
        source=Archive('https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz', 'cifar-100-python.tar.gz',
                       'eb9058c3a382ffc7106e4002c42a8d85'),
        files={'train': '16019d7e3df5f24257cddd939b257f8d', 'test': 'f0ef6b0ae62326f3e7ffdfab6717acfc',
               'meta': '7973b15100ade9c7d40fb424638fde48'},
        label_classes=tuple(LEVEL_CLASSES), primary=3,
        mean=(0.50707516, 0.48654887, 0.44091784), std=(0.26733429, 0.25643846, 0.27615047),
        synthetic=Synthetic(write_cifar100_files, sizes=(10000, 2000), groups=20, full=(50000, 10000))),
    Dataset(
        'cifar10', folder='cifar-10-batches-py', reader=read_cifar10,
        source=Archive('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz', 'cifar-10-python.tar.gz',
                       'c58f30108f718f92721af3b95e74349a'),
        files={'data_batch_1': 'c99cafc152244af753f735de768cd75f',
               'data_batch_2': 'd4bba439e000b95fd0a9bffe97cbabec',
               'data_batch_3': '54ebc095f3ab1f0389bbae665268c751',
               'data_batch_4': '634d18415352ddfa80567beed471001a',
               'data_batch_5': '482c414d41f54cd18b22e5b47cb7c3cb',
               'test_batch': '40351d587109b95175f43aff81a1287e',
               'batches.meta': '5ff9c542aee3614f3951f8cda6e48888'},
        label_classes=(10,),
        mean=(0.49139968, 0.48215841, 0.44653091), std=(0.24703223, 0.24348513, 0.26158784),
        synthetic=Synthetic(write_cifar10_files, sizes=(5000, 1000), full=(50000, 10000))),
    Dataset(
        'svhn', folder='svhn', reader=read_svhn, source=FileUrls('http://ufldl.stanford.edu/housenumbers/'),
        files={'train_32x32.mat': 'e26dedcc434d2e4c54c9b2d4a06d8373',
               'test_32x32.mat': 'eb5a983be6a315427106f1b164d9cef3'},
        label_classes=(10,),
        mean=(0.4376821, 0.4437697, 0.47280442), std=(0.19803012, 0.20101562, 0.19703614),
        flip=False,                      # digits: MetaSemi crops SVHN without flipping
        synthetic=Synthetic(write_svhn_files, sizes=(5000, 1000), full=(73257, 26032)), requires=('scipy',)),
    Dataset(
        'fashion-mnist', folder='fashion-mnist', reader=read_fashion_mnist,
        source=FileUrls('http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/', suffix='.gz',
                        debian=('dataset-fashion-mnist', '/usr/share/datasets/fashion-mnist')),
        places=('FashionMNIST/raw', '.'),  # torchvision's layout; the root itself (Debian's folder)
        gzipped=True,
        # The md5 of the unpacked idx bytes (`gunzip -c FILE | md5sum` of Debian's dataset-fashion-mnist
        # 0.0~git20200523.55506a9-1), not of an archive: Debian recompresses the .gz files (train images:
        # cf8536b0aa1a6ac5fa3f23001093305c), torchvision lists the official .gz (8d4fb7e6c68d591d4c3dfef9ec88bf0d).
        # Checked against the official archives' content: gzip -6 of these bytes, with the official archives'
        # names and times (1504176606, 1504176627) in the gzip header, gives exactly torchvision's four .gz
        # md5 (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...); the official label archives of
        # github.com/zalandoresearch/fashion-mnist unpack to these md5.
        files={'train-images-idx3-ubyte': 'f4a8712d7a061bf5bd6d2ca38dc4d50a',
               'train-labels-idx1-ubyte': '9018921c3c673c538a1fc5bad174d6f9',
               't10k-images-idx3-ubyte': '8181f5470baa50b63fa0f6fddb340f0a',
               't10k-labels-idx1-ubyte': '15d484375f8d13e6eb1aabb0c3f46965'},
        label_classes=(10,),
        # of the 60,000 training images as the networks see them: zero-padded to 32 x 32, in [0, 1], over
        # every pixel in float64 (population std); the three channels are one. The 28 x 28 images alone:
        # 0.2860, 0.3530, the values usually quoted.
        mean=(0.21899983,) * 3, std=(0.33181137,) * 3,
        synthetic=Synthetic(write_fashion_mnist_files, sizes=(5000, 1000), full=(60000, 10000),
                            images=synthetic_grey_images)),
]}


# ----------------------------------------------------------------------------------------------------
# What reads the records: lookup, download, md5 checks, missing-data messages, loading, the stand-ins
# ----------------------------------------------------------------------------------------------------

def record(name):
    """The Dataset record of `name`, or a UserError listing the known ones."""
    if name not in DATASETS:
        raise UserError(f'unknown dataset {name!r}: choose one of {", ".join(DATASETS)}.')
    return DATASETS[name]


def _require(ds, doing):
    missing = ds.missing_modules()
    if missing:
        raise UserError(f'{doing} {ds.name} needs {", ".join(missing)}: pip install {" ".join(missing)}')


def _missing_message(ds, root, folder, missing):
    how = (f'Either {ds.source.instructions(ds, root)}, or rerun with --download to fetch and check it '
           f'automatically, or use --synthetic to train on the small synthetic stand-in instead.')
    if not ds.places:
        return f'{ds.name} data not found: {", ".join(missing)} missing in {folder}/. {how}'
    places = [p + '/' for p in _places(ds, root)]
    partly = f'; {folder}/ lacks {", ".join(missing)}' if len(missing) < len(ds.files) else ''
    return (f'{ds.name} data not found: no folder holds all of {", ".join(ds.files)}'
            f'{" (each as NAME.gz or unpacked NAME)" if ds.gzipped else ""}: looked in {", ".join(places[:-1])} '
            f'and {places[-1]}{partly}. {how}')


def file_md5(ds, path):
    """The md5 `ds.files` records for the file at `path`: of its bytes, or, for a gzipped record's file in
    gzip format, of the bytes it decompresses to; None when that gzip file cannot be decompressed."""
    try:
        return md5sum(path, gunzip=ds.gzipped and _is_gzip(path))
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return None


def _md5_words(ds, path, got, md5):
    """What file_md5 found against the expected md5, for a message: 'has md5 ..., expected ...', 'unpacks
    to bytes with md5 ...' (a gzip file of a gzipped record) or that it cannot be decompressed (None)."""
    if got is None:
        return f'cannot be decompressed (a truncated or damaged gzip file; the official one unpacks to md5 {md5})'
    return f'{"unpacks to bytes with" if ds.gzipped and _is_gzip(path) else "has"} md5 {got}, expected {md5}'


def download(name, root=DATA_ROOT):
    """Fetch the official files of `name` into `root` (as its source says), check their md5, unpack.
    Nothing is fetched when they are all in one of the record's places with their md5."""
    ds = record(name)
    try:
        check_files(name, root)
        return
    except UserError:
        pass
    os.makedirs(root, exist_ok=True)
    for url, dest, md5 in ds.source.downloads(ds, root):
        if os.path.isfile(dest) and file_md5(ds, dest) == md5:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        part = dest + '.part'
        print(f'downloading {url} -> {dest}', flush=True)
        try:                                            # torchvision's downloader (redirects, progress)
            from torchvision.datasets.utils import download_url
            download_url(url, os.path.dirname(part), os.path.basename(part))
        except (OSError, RuntimeError, ValueError) as e:
            if os.path.exists(part):
                os.remove(part)
            raise UserError(f'could not download {url} ({e}). This machine may have no internet access: '
                            f'fetch the file elsewhere and place it at {dest}, or use --synthetic.') from None
        got = file_md5(ds, part)
        if got != md5:
            words = _md5_words(ds, part, got, md5)
            os.remove(part)
            raise UserError(f'the download of {url} {words}: the file is corrupt or not the official one. '
                            f'Try again, or place the official file at {dest}.')
        os.replace(part, dest)
        ds.source.unpack(dest, root)


def _file_path(ds, folder, name):
    """Where file `name` of `ds` lies in `folder` (a gzipped record's as NAME.gz, else NAME), or None."""
    if ds.gzipped:
        return gz_or_plain(folder, name)
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def _missing_files(ds, folder, names):
    return [f for f in names if _file_path(ds, folder, f) is None]


def _places(ds, root):
    """The folders that may hold the official files of `ds` under `root`: its folder, then its other places."""
    return [os.path.join(root, ds.folder)] + [os.path.normpath(os.path.join(root, p)) for p in ds.places]


def _wrong_file(ds, root, folder, path, got, md5):
    """The UserError message of an official file whose md5 is not the record's."""
    if not ds.gzipped:
        return (f'{path} has md5 {got}, expected {md5}: the file is corrupt or not the official one. Delete '
                f'{folder}/ and unpack the official archive again, or rerun with --download.')
    fix = (f'delete it and rerun with --download, which fetches the official file into '
           f'{os.path.join(root, ds.folder)}/ and checks it')
    if getattr(ds.source, 'debian', None):
        fix += (f', or, if it is the copy Debian\'s package installed, reinstall that (sudo apt-get install '
                f'--reinstall {ds.source.debian[0]})')
    return f'{path} {_md5_words(ds, path, got, md5)}: it is damaged or not the official one. Replace it: {fix}.'


def stand_in_damaged(ds, root, what):
    """The UserError of a damaged synthetic stand-in (in `root`, a synthetic folder): it is generated data,
    so deleting its folder has it written anew, where the real dataset would be fetched again."""
    folder = os.path.join(root, ds.folder)
    full = os.path.basename(os.path.normpath(root)) == SYNTHETIC_DIR + '-full'
    return UserError(f'the synthetic stand-in of {ds.name} in {folder}/ is damaged: {what}. It is generated data '
                     f'written by this code, not the real dataset: delete that folder (rm -r {folder}) and run '
                     f'again; --synthetic{" --synthetic_size full" if full else ""} writes it anew '
                     f'({"about a minute" if full else "a few seconds"}).')


def check_files(name, root, expected=None, synthetic=False):
    """Every file of `name` (or of `expected`: name -> md5) present with its md5; else a UserError
    naming the source and the folder (synthetic: the stand-in's own md5 list, and its own advice).
    Returns the folder that holds them: the official files are looked for in each of the record's places
    (the first that holds them all), the stand-in's in its folder."""
    ds = record(name)
    expected = ds.files if expected is None else expected
    if synthetic:
        folder = os.path.join(root, ds.folder)
        missing = _missing_files(ds, folder, expected)
        if missing:
            raise stand_in_damaged(ds, root, f'{", ".join(missing)} missing (its md5.json lists '
                                             f'{", ".join(expected)})')
    else:
        folder, missing = min(((p, _missing_files(ds, p, expected)) for p in _places(ds, root)),
                              key=lambda place: len(place[1]))        # the first of those that miss least
        if missing:
            raise UserError(_missing_message(ds, root, folder, missing))
    for f, md5 in expected.items():
        path = _file_path(ds, folder, f)
        got = md5sum(path) if synthetic else file_md5(ds, path)
        if got != md5 and synthetic:
            raise stand_in_damaged(ds, root, f'{f} has md5 {got}, not the {md5} its md5.json recorded when it was '
                                             'written')
        if got != md5:
            raise UserError(_wrong_file(ds, root, folder, path, got, md5))
    return folder


def check_data_present(name, root, synthetic, download_missing):
    """The check the scripts run in their validation, so that a missing or corrupt dataset stops a run
    before its folder is made: every file present with its md5 (remembered, so loading does not read
    the files twice). A stand-in already written is checked against its own md5 list (one still to write,
    and --download, are checked when they are written or fetched)."""
    if synthetic:
        synthetic_root = dataset_root(root, synthetic)
        if os.path.isfile(os.path.join(synthetic_root, record(name).folder, 'md5.json')):
            check_files(name, synthetic_root, _synthetic_md5(record(name), synthetic_root), synthetic=True)
        return
    if download_missing:
        return
    check_files(name, root)


def _synthetic_md5(ds, root):
    """The md5 sums the stand-in's writer recorded (its files' own, not the official ones)."""
    path = os.path.join(root, ds.folder, 'md5.json')
    if not os.path.isfile(path):
        raise UserError(f'the synthetic {ds.name} stand-in is not in {os.path.dirname(path)}/: '
                        f'write it with `{python_command()} create_dataset.py --synthetic` (the scripts do this '
                        f'themselves with --synthetic).')
    try:
        with open(path) as f:
            sums = json.load(f)
    except (OSError, ValueError) as e:
        raise stand_in_damaged(ds, root, f'its md5 list md5.json cannot be read ({e})') from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise stand_in_damaged(ds, root, 'its md5 list md5.json is not a list of file names and md5 sums')
    return sums


def load(name, root=DATA_ROOT, train=True, synthetic=False, download_missing=False):
    """(uint8 images [N,3,32,32], int64 labels [N] or [N, label columns]) of the training or test split,
    md5-checked; the stand-in is written first when missing, the official files fetched when asked."""
    ds = record(name)
    _require(ds, 'reading')
    root = dataset_root(root, synthetic)
    if synthetic:
        ensure_synthetic(root, [name], full=synthetic == 'full')
    elif download_missing:
        download(name, root)
    folder = check_files(name, root, _synthetic_md5(ds, root) if synthetic else None, synthetic=bool(synthetic))
    return ds.reader(folder, train)


def load_both(name, root=DATA_ROOT, synthetic=False, download_missing=False):
    """(train images, train labels, test images, test labels) with one label per image, the record's
    primary column (CIFAR-100: the 100 fine classes). SVHN is its `train` split only (73,257 images), as
    the MetaSemi code."""
    ds = record(name)
    out = []
    for train in (True, False):
        x, y = load(name, root, train, synthetic, download_missing)
        out += [x, ds.primary_labels(y)]
    return tuple(out)


def write_synthetic(name, root, seed=0, sizes=None):
    """Write the stand-in of `name` in its real on-disk format under `root` (a synthetic folder), with
    the md5 sums of its files in md5.json. sizes = (train, test) images, the record's by default."""
    ds = record(name)
    if ds.synthetic is None:
        raise UserError(f'{name} has no synthetic stand-in: train on the official files.')
    _require(ds, 'writing the synthetic')
    n_train, n_test = sizes or ds.synthetic.sizes
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, ds.folder)
    os.makedirs(folder, exist_ok=True)
    n_cls = ds.num_classes
    images = ds.synthetic.images or synthetic_images
    splits = {}
    chunk = 10000                           # images drawn at a time (a full-size set in bounded memory)
    for split, n in (('train', n_train), ('test', n_test)):
        fine = _balanced_labels(n, n_cls, rng)
        base = seed + (1 if split == 'train' else 2)
        splits[split] = (np.concatenate([images(fine[i:i + chunk], n_cls, ds.synthetic.groups or n_cls,
                                                base + 7919 * (i // chunk))
                                         for i in range(0, n, chunk)]), fine)
    ds.synthetic.writer(folder, splits)
    sums = {f: md5sum(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f != 'md5.json'}
    with open(os.path.join(folder, 'md5.json'), 'w') as f:
        json.dump(sums, f, indent=1)


def ensure_synthetic(synthetic_root, names, full=False):
    """Write any missing synthetic stand-in of `names` (the small one: a few seconds; full: the real
    dataset's sizes, a minute or so)."""
    for name in names:
        ds = record(name)
        if not os.path.isfile(os.path.join(synthetic_root, ds.folder, 'md5.json')):
            if full:
                print(f'writing the full-size synthetic {name} ({ds.synthetic.full[0]:,} + {ds.synthetic.full[1]:,} '
                      f'images) into {synthetic_root}/', flush=True)
            write_synthetic(name, synthetic_root, sizes=ds.synthetic.full if full else None)


# ----------------------------------------------------------------------------------------------------
# A dataset as the MAXL paper's scripts train on it: its images with label columns (CIFAR-100's four
# hierarchy levels, another dataset's one), held whole on the device or streamed from image files
# (model_vgg_single.py, model_vgg_human.py, model_vgg_maxl.py)
# ----------------------------------------------------------------------------------------------------

HIERARCHY_MEAN, HIERARCHY_STD = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)   # the MAXL code's normalisation of CIFAR-100
HIERARCHY = ('primary_level', 'aux_level')        # the options that pick levels of CIFAR-100's hierarchy


def streamed(dataset):
    """A dataset read from its image files as training goes (machinery/large_datasets.py), not held on the device."""
    return large_datasets.is_large(dataset) or dataset == large_datasets.USER_FOLDER.name


def check_dataset(cfg):
    if cfg.dataset not in DATASETS and not streamed(cfg.dataset):
        known = ', '.join([*DATASETS, *large_datasets.LARGE_DATASETS])
        raise UserError(f'--dataset {cfg.dataset!r} is not one of: {known}, imagenetN (N of ImageNet\'s classes, e.g. '
                        'imagenet100), or folder (your own images: --data_root holding train/<class>/ and '
                        'test/<class>/ folders).')
    check_positive(cfg, 'image_size', 'workers', allow_zero=('workers',))


def input_size(cfg):
    """The side of the images the networks see: 32 on the datasets held on the device (Fashion-MNIST's padded
    to it), --image_size on the file datasets."""
    return cfg.image_size if streamed(cfg.dataset) else 32


# ---- the MAXL paper's data: a dataset's label columns, on the device ----------------------------------------

def has_hierarchy(dataset):
    return dataset in DATASETS and len(DATASETS[dataset].label_classes) > 1


def check_hierarchy(cfg, typed):
    """The hierarchy's options go with a dataset that has one (CIFAR-100)."""
    given = [name for name in HIERARCHY if name in typed]
    if given and not has_hierarchy(cfg.dataset):
        raise UserError(f'--{given[0]} picks a level of CIFAR-100\'s label hierarchy, and --dataset {cfg.dataset} has '
                        f'none (one label per image, its classes the primary task): drop --{given[0]}, or train on '
                        '--dataset cifar100.')


def load_columns(cfg):
    """(train images, train label columns [N, k], test images, test label columns, the primary column): CIFAR-100's
    four hierarchy levels (the primary column is --primary_level), another dataset's one column; the training
    images cut to --num_samples_per_class of every primary class (a seeded draw, the same again on --resume).
    A file dataset: the images are FileLists (their paths), its training split and its test (or validation) split."""
    if streamed(cfg.dataset):
        chosen = large_datasets.choose(cfg.dataset, cfg.data_root, cfg.synthetic, cfg.seed,
                                       per_class=cfg.num_samples_per_class)
        train, test = chosen['files']['train'].subset(chosen['pools']['train']), chosen['files']['test']
        return train, train.labels[:, None], test, test.labels[:, None], 0
    train_x, train_y = load(cfg.dataset, cfg.data_root, True, stand_in(cfg), cfg.download)
    test_x, test_y = load(cfg.dataset, cfg.data_root, False, stand_in(cfg), cfg.download)
    primary = cfg.primary_level if has_hierarchy(cfg.dataset) else 0
    if not has_hierarchy(cfg.dataset):
        train_y, test_y = train_y[:, None], test_y[:, None]
    if cfg.num_samples_per_class:
        keep = splits.samples_per_class(np.arange(len(train_y)), train_y[:, primary], cfg.num_samples_per_class, cfg.seed)
        train_x, train_y = train_x[keep], train_y[keep]
    return train_x, train_y, test_x, test_y, primary


def normalisation(dataset):
    """(mean, std) of the networks' inputs: the original's on CIFAR-100, the dataset's own otherwise (ImageNet's
    on the file datasets)."""
    if streamed(dataset):
        return large_datasets.IMAGENET_MEAN, large_datasets.IMAGENET_STD
    return (HIERARCHY_MEAN, HIERARCHY_STD) if dataset == 'cifar100' else DATASETS[dataset].normalisation


def place(x, y, cfg, run):
    """Images and label columns whole on the run's device, cropped and flipped per batch as the dataset's record
    says, normalised (see normalisation). Image files (a FileList): streamed, random-resized crops of
    --image_size and flips in training, the centre crop in evaluation (large_datasets.FileColumns)."""
    if isinstance(x, large_datasets.FileList):
        jitter = large_datasets.large_record(cfg.dataset)[0].jitter
        return large_datasets.FileColumns(x, y, run.device, run.shard, cfg.workers, cfg.decode_on,
                                          large_datasets.Augment(True, cfg.image_size, jitter=jitter),
                                          large_datasets.Augment(False, cfg.image_size))
    record = DATASETS[cfg.dataset]
    from machinery.streams import DeviceData
    return DeviceData(x, y, run.device, *normalisation(cfg.dataset), pad=record.pad, flip=record.flip, shard=run.shard)


def n_classes(cfg, column, images):
    """The classes of a label column of cfg.dataset (CIFAR-100: of its level `column`; image files: their class
    folders)."""
    if isinstance(images, large_datasets.FileList):
        return len(images.classes)
    return DATASETS[cfg.dataset].label_classes[column]


# ----------------------------------------------------------------------------------------------------
# Command line: write the stand-ins, or download the real data
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    from machinery.large_datasets import LARGE_DATASETS, ensure_synthetic_folder, is_large, large_record
    p = argparse.ArgumentParser(description='Write the synthetic stand-ins, or download and md5-check the '
                                            'official files of a dataset.')
    p.add_argument(*spellings('data_root'), '--root', dest='root', default=DATA_ROOT,
                   help='data root, as the training scripts\' --data_root (default: %(default)s)')
    p.add_argument('--synthetic', nargs='*', metavar='NAME', default=None,
                   help='write the synthetic stand-ins of the NAMEs (default: of every dataset) into DATA_ROOT/synthetic/; '
                        f'the large datasets\' ({", ".join(LARGE_DATASETS)}) are small JPEG trees in their real layouts')
    p.add_argument(*spellings('synthetic_size'), choices=['small', 'full'], default='small',
                   help='full: CIFAR/SVHN at the real datasets\' sizes, into DATA_ROOT/synthetic-full/')
    p.add_argument('--download', choices=sorted(DATASETS), action='append', default=[],
                   help='download and check an official dataset into DATA_ROOT')
    args = p.parse_args(argv)
    if args.synthetic is None and not args.download:
        p.error('nothing to do: give --synthetic [NAME ...] and/or --download NAME')
    if args.synthetic is not None:
        names = args.synthetic or [n for n in DATASETS if DATASETS[n].synthetic] + list(LARGE_DATASETS)
        unknown = [n for n in names if n not in DATASETS and not is_large(n)]
        if unknown:
            raise UserError(f'no stand-in for {", ".join(unknown)}: choose among {", ".join(DATASETS)}, '
                            f'{", ".join(LARGE_DATASETS)}.')
        full = args.synthetic_size == 'full'
        root = dataset_root(args.root, 'full' if full else True)
        for name in names:
            if is_large(name):
                ds, _ = large_record(name)
                ensure_synthetic_folder(name, dataset_root(args.root, True))
                print(f'wrote synthetic {ds.name} into {os.path.join(dataset_root(args.root, True), ds.folder)}')
                continue
            ds = DATASETS[name]
            if ds.synthetic is None:
                continue
            if ds.missing_modules():
                print(f'skipping the synthetic {name} (needs {", ".join(ds.missing_modules())})')
                continue
            write_synthetic(name, root, sizes=ds.synthetic.full if full else None)
            print(f'wrote synthetic {name} into {os.path.join(root, ds.folder)}')
    for name in args.download:
        download(name, args.root)
        check_files(name, args.root)
        print(f'{name} is in {args.root} and its md5 sums check out')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
