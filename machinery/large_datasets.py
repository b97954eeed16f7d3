"""The large datasets, streamed from their files: ImageNet and its class subsets (imagenetN), iNaturalist
2018, tiny-ImageNet, CUB-200, MIT-67 and Stanford Dogs, read where they lie as the training needs them,
never copied; and their synthetic stand-ins (small JPEG trees in the real layouts).

  LARGE_DATASETS, is_large, large_split   one ImageFiles record per dataset; the readers: ImageFolder trees
  large_data_path                         (torchvision's find_classes / make_dataset), the iNaturalist JSON,
                                          MXNet RecordIO (RecordFile, no MXNet needed)
  Batches, BatchPlan, Augment             the streaming pipeline: DataLoader workers read this process's
                                          share of each global batch; decoding (nvJPEG on CUDA, else in the
                                          workers) and augmentation; every draw a function of (seed, step,
                                          slot), so a resumed run continues exactly
  FileSplits, FileStream                  a run's splits as image files: the calls of streams.Splits
  choose_classes, class_subset            the images and classes a run uses (imagenetN: N classes)
  write_synthetic_folder                  the stand-ins (create_dataset.py --synthetic imagenet ...)

Used by train_sla.py (--dataset imagenet, inat, ...) and train_meta_semi.py (--dataset imagenet),
create_dataset.py's command line, reproduce.py (the stand-ins of --quick) and benchmarks/loader.py. A new large dataset is one ImageFiles record in LARGE_DATASETS (its folder, split
names, class count, where to get it), plus a reader if its layout is neither an ImageFolder tree nor
iNaturalist's JSON.
"""
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import struct

import numpy as np
import torch

from .files import dataset_root
from .splits import TRAIN_INDICES, draw_classes, read_names
from .splits import per_class as per_class_pool
from .options import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
RECORDIO_SPLITS = ('train_label', 'train_unlabel', 'val')      # the MetaSemi code's nine RecordIO files


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """A dataset of image files. `splits` = (train, test): sub-folders in the ImageFolder layout
    (<split>/<class>/<image>, classes in sorted order) or, for layout 'inat', the iNaturalist JSON files
    (images[].file_name relative to the dataset folder, annotations[].category_id). The data path is
    the dataset's own folder (the originals' --data / --dataroot), or a root holding it as `folder`."""
    name: str
    folder: str
    splits: tuple
    num_classes: int
    where: str                           # where the official data comes from (the missing-data message)
    layout: str = 'folder'
    jitter: bool = False                 # colour jitter in training (iNaturalist, as the SLA code)
    synthetic_classes: int = 10          # the stand-in: classes, images per class (train, test)
    synthetic_per_class: tuple = (20, 4)


LARGE_DATASETS = {d.name: d for d in [
    ImageFiles('imagenet', 'imagenet', ('train', 'val'), 1000,
               'ILSVRC-2012 from https://image-net.org, unpacked as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG '
               '(the validation images sorted into class folders, e.g. with pytorch/examples\' imagenet/extract_'
               'ILSVRC.sh); or the MetaSemi code\'s nine RecordIO files train_label/train_unlabel/val .rec/.idx'),
    ImageFiles('tiny-imagenet', 'tiny-imagenet-200', ('train', 'val2'), 200,
               'http://cs231n.stanford.edu/tiny-imagenet-200.zip, with its val images sorted into class folders '
               'under val2/ (the SLA code\'s layout)', synthetic_classes=8),
    ImageFiles('inat', 'inat2018', ('train2018.json', 'val2018.json'), 8142,
               'iNaturalist 2018 (https://github.com/visipedia/inat_comp/tree/master/2018): train_val2018/ and '
               'train2018.json / val2018.json in one folder', layout='inat', jitter=True, synthetic_classes=8),
    ImageFiles('cub200', 'cub200', ('train', 'test'), 200,
               'CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/) sorted into train/ and test/ '
               'class folders by its train_test_split.txt', synthetic_classes=6),
    ImageFiles('indoor', 'indoor', ('train', 'test'), 67,
               'MIT-67 (https://web.mit.edu/torralba/www/indoor.html) sorted into train/ and test/ class folders '
               'by TrainImages.txt / TestImages.txt', synthetic_classes=6),
    ImageFiles('dogs', 'dogs', ('train', 'test'), 120,
               'Stanford Dogs (http://vision.stanford.edu/aditya86/ImageNetDogs/) sorted into train/ and test/ '
               'class folders by its train_list.mat / test_list.mat', synthetic_classes=6),
]}


# --dataset folder: a user's own image-classification dataset, an ImageFolder tree given as the data root itself
USER_FOLDER = ImageFiles('folder', '.', ('train', 'test'), 0,
                         'your own images as an ImageFolder tree: <data root>/train/<class>/<image> and '
                         '<data root>/test/<class>/<image>, the same class folders in both')


def is_large(name):
    """A large (file-based) dataset name: one of LARGE_DATASETS or imagenetN (N of ImageNet's classes)."""
    return name in LARGE_DATASETS or bool(re.fullmatch(r'imagenet[1-9]\d*', name))


def large_record(name):
    """(ImageFiles record, N) for `name`: N > 0 for imagenetN (that many classes of ImageNet), else 0."""
    if name in LARGE_DATASETS:
        return LARGE_DATASETS[name], 0
    if name == USER_FOLDER.name:
        return USER_FOLDER, 0
    m = re.fullmatch(r'imagenet([1-9]\d*)', name)
    if not m:
        raise UserError(f'unknown dataset {name!r}: choose one of {", ".join(LARGE_DATASETS)} or imagenetN '
                        '(N classes of ImageNet, e.g. imagenet100).')
    return LARGE_DATASETS['imagenet'], int(m.group(1))


class FileList:
    """Images as files: paths (relative to `root`) and integer labels. read(i) -> (file bytes, label)."""

    def __init__(self, root, paths, labels, classes):
        self.root, self.paths, self.classes = root, list(paths), list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.paths)

    def path(self, i):
        return os.path.join(self.root, self.paths[i])

    def read(self, i):
        with open(self.path(i), 'rb') as f:
            return f.read(), int(self.labels[i])

    def subset(self, indices, relabel=None):
        """The images `indices`, their labels mapped through `relabel` (old label -> new) if given."""
        labels = self.labels[indices] if relabel is None else np.asarray([relabel[y] for y in self.labels[indices]])
        classes = self.classes if relabel is None else [self.classes[c] for c in sorted(relabel, key=relabel.get)]
        return FileList(self.root, [self.paths[i] for i in indices], labels, classes)


def image_folder(folder):
    """The ImageFolder layout: classes = sorted sub-folders, images in each (sorted, recursively), as
    torchvision's ImageFolder lists them; nothing is opened."""
    from torchvision.datasets.folder import find_classes, make_dataset
    try:
        classes, class_to_idx = find_classes(folder)
        samples = make_dataset(folder, class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f'cannot list the image folder {folder} ({e}): it must hold one sub-folder per class with '
                        f'the images inside (<class>/<image>.JPEG).') from None
    return FileList(folder, [os.path.relpath(p, folder) for p, _ in samples], [y for _, y in samples], classes)


def inat_annotations(root, json_file):
    """iNaturalist 2018: images[k].file_name (relative to root) with annotations[k].category_id, in the
    order of the JSON file (the SLA code's reading)."""
    path = os.path.join(root, json_file)
    try:
        with open(path) as f:
            ann = json.load(f)
        paths = [im['file_name'] for im in ann['images']]
        by_image = {a['image_id']: a['category_id'] for a in ann.get('annotations', [])}
        labels = [by_image.get(im['id'], 0) for im in ann['images']]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'cannot read the iNaturalist annotations {path} ({type(e).__name__}: {e}): it must be '
                        'the 2018 JSON with images[{id, file_name}] and annotations[{image_id, category_id}].') from None
    classes = sorted({c['id'] for c in ann.get('categories', [])} | set(labels))
    return FileList(root, paths, labels, [str(c) for c in classes])


# ---- MXNet RecordIO (the MetaSemi code's im2rec files), read directly: no MXNet needed ----
# A record is: uint32 magic 0xced7230a, uint32 (continuation flag << 29 | length), the payload, zero-padded
# to 4 bytes. A payload holding the magic number at a 4-byte boundary is split there into parts with flags
# 1 (first), 2 (middle), 3 (last), and the reader puts the magic number back between them. An image
# payload starts with the header struct 'IfQQ' (flag, label, id, id2); flag > 0 means `flag` float32
# labels follow the header (im2rec --pack-label), then the image file's bytes unchanged (--pass-through).

RECORDIO_MAGIC = 0xced7230a
_MAGIC_BYTES = struct.pack('<I', RECORDIO_MAGIC)
_IR_HEADER = struct.Struct('<IfQQ')


def recordio_pack(label, image_bytes, key=0, pack_label=True):
    """A payload as im2rec writes it: the header (with the label packed as one float32 after it when
    pack_label), then the image bytes."""
    if pack_label:
        return _IR_HEADER.pack(1, 0.0, key, 0) + struct.pack('<f', label) + image_bytes
    return _IR_HEADER.pack(0, float(label), key, 0) + image_bytes


def write_recordio(rec_path, idx_path, payloads):
    """Write payloads (bytes, keys 0..n-1) as a .rec file and its .idx (key<TAB>offset lines), splitting a
    payload at every 4-byte-aligned magic number as dmlc's writer does."""
    with open(rec_path, 'wb') as rec, open(idx_path, 'w') as idx:
        for key, data in enumerate(payloads):
            idx.write(f'{key}\t{rec.tell()}\n')
            cuts = [i for i in range(0, len(data) - 3, 4) if data[i:i + 4] == _MAGIC_BYTES]
            parts = [data[a + (4 if a else 0) if k else 0:b] for k, (a, b) in
                     enumerate(zip([0] + cuts, cuts + [len(data)]))]
            for k, part in enumerate(parts):
                flag = 0 if len(parts) == 1 else (1 if k == 0 else (3 if k == len(parts) - 1 else 2))
                rec.write(_MAGIC_BYTES + struct.pack('<I', flag << 29 | len(part)) + part)
                rec.write(b'\0' * (-len(part) % 4))


class RecordFile:
    """One .rec/.idx pair. read(i) -> (image bytes, label); labels are in the records, so `labels` is None
    (the files are already split into labeled / unlabeled / val)."""
    labels = None

    def __init__(self, rec_path, idx_path):
        self.rec_path = rec_path
        try:
            with open(idx_path) as f:
                rows = [line.split('\t') for line in f if line.strip()]
            self.offsets = [int(r[1]) for r in rows]
        except (OSError, ValueError, IndexError) as e:
            raise UserError(f'cannot read the RecordIO index {idx_path} ({e}): it must have one '
                            '"key<TAB>offset" line per record, as im2rec writes it.') from None
        self._file = None

    def __len__(self):
        return len(self.offsets)

    def path(self, i):
        return f'{self.rec_path} (record {i}, offset {self.offsets[i]})'

    def __getstate__(self):                  # DataLoader workers open their own file handle
        return {**self.__dict__, '_file': None}

    def read(self, i):
        if self._file is None:
            self._file = open(self.rec_path, 'rb')
        f, parts = self._file, []
        f.seek(self.offsets[i])
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError('the record ends early (truncated .rec file)')
            magic, word = struct.unpack('<II', head)
            if magic != RECORDIO_MAGIC:
                raise ValueError(f'no RecordIO magic number at offset {f.tell() - 8} (wrong .idx for this .rec?)')
            flag, length = word >> 29, word & ((1 << 29) - 1)
            parts.append(f.read(length))
            f.seek(-length % 4, 1)
            if flag in (0, 3):
                break
        payload = _MAGIC_BYTES.join(parts)
        n_labels, label, _, _ = _IR_HEADER.unpack_from(payload)
        start = _IR_HEADER.size + 4 * n_labels
        if n_labels:
            label = struct.unpack_from('<f', payload, _IR_HEADER.size)[0]
        return payload[start:], int(label)


def recordio_present(path):
    return all(os.path.isfile(os.path.join(path, f'{s}.{e}')) for s in RECORDIO_SPLITS for e in ('rec', 'idx'))


def large_data_path(name, data_root, synthetic=False):
    """The dataset's own folder: data_root itself when it holds the dataset (its train split, or the
    RecordIO files), else data_root/<folder>; for the stand-in, <data_root>/synthetic/<folder> (written
    when missing)."""
    ds, _ = large_record(name)
    if ds is USER_FOLDER:
        if synthetic:
            raise UserError('--dataset folder trains on your own ImageFolder tree, which has no synthetic stand-in: '
                            'drop --synthetic and give the tree with --data_root.')
        if not all(os.path.isdir(os.path.join(data_root, split)) for split in ds.splits):
            raise UserError(f'--dataset folder reads {ds.where}; {data_root}/ has no train/ or no test/ folder: '
                            'give that tree\'s folder with --data_root.')
        return data_root
    if synthetic:
        root = dataset_root(data_root, True)
        ensure_synthetic_folder(ds.name, root)
        return os.path.join(root, ds.folder)
    for path in (data_root, os.path.join(data_root, ds.folder)):
        if os.path.exists(os.path.join(path, ds.splits[0])) or (ds.name == 'imagenet' and recordio_present(path)):
            return path
    raise UserError(f'{name} data not found: neither {data_root}/ nor {os.path.join(data_root, ds.folder)}/ holds '
                    f'{ds.splits[0]}{"/" if ds.layout == "folder" else ""}. Get {ds.where}, and give its folder with '
                    f'--data-path; or use --synthetic to train on the small synthetic stand-in.')


def large_split(name, path, split):
    """The FileList of split 'train' or 'test' (the official validation set of ImageNet and iNaturalist)."""
    ds, _ = large_record(name)
    sub = ds.splits[0 if split == 'train' else 1]
    if ds.layout == 'inat':
        return inat_annotations(path, sub)
    return image_folder(os.path.join(path, sub))


def class_subset(files, classes):
    """The images of `classes` (indices into files.classes), relabelled 0..len(classes)-1 in that order
    (the SLA code's labels.index(y))."""
    relabel = {int(c): k for k, c in enumerate(classes)}
    keep = np.flatnonzero(np.isin(files.labels, list(relabel)))
    return files.subset(keep, relabel)


# ---- the streaming pipeline: file bytes in DataLoader workers, decoding and augmentation in the workers
# (CPU) or in batches on the GPU; every random draw is a function of (seed, step, slot), so the stream
# does not depend on the number of workers or processes and resumes exactly at a step ----

def crop_box(u, h, w, scale, ratio):
    """RandomResizedCrop's box (top, left, height, width) for an h x w image from 4 x 10 + 2 uniforms u:
    up to ten tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, the first
    box that fits placed uniformly; else the whole image cut to the nearest allowed ratio, centred
    (torchvision's rule, with the draws given instead of made)."""
    area, log_lo, log_hi = h * w, math.log(ratio[0]), math.log(ratio[1])
    for k in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u[2 * k]))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[2 * k + 1]))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return (min(int(float(u[20 + 2 * k]) * (h - ch + 1)), h - ch),
                    min(int(float(u[21 + 2 * k]) * (w - cw + 1)), w - cw), ch, cw)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


N_DRAWS = 46        # uniforms per image: 40 for the crop, the flip, 4 jitter factors, the jitter order
JITTER_ORDERS = list(itertools.permutations(range(4)))


class Augment:
    """One split's transform of a decoded uint8 image [3, H, W] (any device) from its draws u (N_DRAWS
    uniforms). Training: random-resized crop (area `scale`, aspect `ratio`) to size x size, horizontal
    flip with p 0.5, optionally colour jitter (brightness, contrast, saturation 0.4, hue 0.25, random
    order); evaluation: resize the shorter side to size * 256 / 224, centre crop size x size. Output uint8."""

    def __init__(self, train, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter=False):
        self.train, self.size, self.scale, self.ratio, self.jitter = train, size, scale, ratio, jitter

    def __call__(self, img, u):
        from torchvision.transforms.v2 import functional as TF
        if not self.train:
            img = TF.resize(img, [int(round(self.size * 256 / 224))], antialias=True)
            return TF.center_crop(img, [self.size, self.size])
        top, left, h, w = crop_box(u, img.shape[-2], img.shape[-1], self.scale, self.ratio)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if u[40] < 0.5:
            img = img.flip(-1)
        if self.jitter:
            ops = [lambda x, f=0.6 + 0.8 * float(u[41]): TF.adjust_brightness(x, f),
                   lambda x, f=0.6 + 0.8 * float(u[42]): TF.adjust_contrast(x, f),
                   lambda x, f=0.6 + 0.8 * float(u[43]): TF.adjust_saturation(x, f),
                   lambda x, f=-0.25 + 0.5 * float(u[44]): TF.adjust_hue(x, f)]
            for k in JITTER_ORDERS[min(int(float(u[45]) * 24), 23)]:         # the four in a random order
                img = ops[k](img)
        return img


def image_draws(seed, step, slot):
    """The N_DRAWS uniforms of the image in `slot` of global batch `step` (float64, CPU). Every seeded draw
    of this file has its own tag after the seed (SLA's validation split 0, samples per class 1, imagenetN's
    classes 2, passes 3, samples 4, the synthetic trees 5, images 6, FileColumns' passes 7), so no two of them
    share a stream."""
    return torch.from_numpy(np.random.default_rng([int(seed), 6, int(step), int(slot)]).random(N_DRAWS))


def decode(data):
    """File bytes -> uint8 RGB [3, H, W] (JPEG, grayscale and CMYK JPEGs, PNG, ...) with torchvision.io."""
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class ImageStream(torch.utils.data.Dataset):
    """What a DataLoader worker does with one (index, step, slot): read the file's bytes; on the CPU path
    also decode and augment. An image that cannot be decoded comes back as None with its path and the
    error (the batch assembly replaces it, see Batches)."""

    def __init__(self, source, augment, seed, decode_here=True):
        self.source, self.augment, self.seed, self.decode_here = source, augment, seed, decode_here

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, step, slot = item
        u = image_draws(self.seed, step, slot)
        try:
            data, label = self.source.read(index)
            if not self.decode_here:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, u, self.source.path(index)
            return self.augment(decode(data), u), label, None, self.source.path(index)
        except (OSError, ValueError, RuntimeError, struct.error) as e:      # unreadable or undecodable
            return None, -1, (str(e).strip().splitlines() or [type(e).__name__])[-1][:200], self.source.path(index)


class _Steps:
    """The DataLoader's batch sampler: this process's share of global batches start..stop-1, made lazily."""

    def __init__(self, batches, start, stop):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):        # a process whose share of a last, small evaluation batch is empty skips it
        return (items for items in map(self.batches.share, range(self.start, self.stop)) if items)


def _collate(items):
    return items                         # assembled in the main process (Batches.assemble)


class BatchPlan:
    """Which images make global batch `step`, a pure function of the step (so a run resumes exactly at a
    step): 'cycle' walks passes over the pool, pass k a permutation drawn from (seed, k), a batch running
    across the pass boundary (MetaSemi's endless streams); 'sample' draws `size` distinct images afresh
    each step (the SLA code's random.sample); 'ordered' goes through the pool in order (evaluation)."""

    def __init__(self, pool, size, seed, kind):
        self.pool, self.size, self.seed, self.kind = np.asarray(pool, dtype=np.int64), size, int(seed), kind
        self._perm = {}

    def _pass(self, k):
        if k not in self._perm:
            self._perm = {k: np.random.default_rng([self.seed, 3, k]).permutation(len(self.pool))}
        return self._perm[k]

    def batch(self, step):
        n = len(self.pool)
        if self.kind == 'sample':
            return self.pool[np.random.default_rng([self.seed, 4, step]).choice(n, self.size, replace=False)]
        if self.kind == 'ordered':
            return self.pool[step * self.size:(step + 1) * self.size]
        first, out = step * self.size, []
        while len(out) < self.size:
            k, at = divmod(first + len(out), n)
            out.extend(self._pass(k)[at:at + self.size - len(out)].tolist())
        return self.pool[out]


class Batches:
    """The streaming input of one split for one process: a DataLoader over this process's share of each
    global batch of a BatchPlan, for steps start..stop-1. Yields (normalised float images [b, 3, S, S] on
    `device`, int64 labels). decode_on 'gpu': the workers read bytes only and the batch is decoded with
    nvJPEG (torchvision.io.decode_jpeg on the device) and augmented there; 'cpu': the workers decode and
    augment. Images that cannot be decoded are replaced by another image of the same batch, and counted
    with their paths in `bad` (the first few printed by the scripts)."""

    def __init__(self, source, plan, augment, device, seed, start, stop, shard=(0, 1), workers=4,
                 decode_on='cpu', mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.source, self.plan, self.augment, self.device = source, plan, augment, device
        self.rank, self.world = shard
        self.gpu = decode_on == 'gpu'
        self.bad = []
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        dataset = ImageStream(source, augment, seed, decode_here=not self.gpu)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Steps(self, start, stop), num_workers=workers,
            collate_fn=_collate, pin_memory=device.type == 'cuda', persistent_workers=False,
            prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(0))     # its worker seeds: never drawn from the global RNG

    def share(self, step):
        """This process's (index, step, slot) items of global batch `step`."""
        idx = self.plan.batch(step)
        n = len(idx)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return [(int(idx[s]), step, s) for s in range(lo, hi)]

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield self.assemble(items)

    def assemble(self, items):
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        if self.gpu:
            images = self._decode_on_device(items)
        else:
            images = [it[0] for it in items]
        bad = [k for k, img in enumerate(images) if img is None]
        for k in bad:
            self.bad.append((items[k][3], items[k][2] if isinstance(items[k][2], str) else 'cannot be decoded'))
        good = [k for k in range(len(images)) if images[k] is not None]
        if not good:
            raise UserError(f'no image of a batch could be decoded (first: {items[0][3]}): is this an image '
                            'dataset?')
        for k in bad:                         # the nearest decodable image of the batch takes its place
            sub = min(good, key=lambda g: (abs(g - k), g))
            images[k], labels[k] = images[sub], labels[sub]
        x = torch.stack(images).to(self.device, non_blocking=True)
        return (x.to(self.mean.dtype) - self.mean) / self.std, labels.to(self.device, non_blocking=True)

    def _decode_on_device(self, items):
        """nvJPEG over the batch's JPEGs; anything else (PNG, CMYK, a failed decode) on the CPU."""
        from torchvision.io import ImageReadMode, decode_jpeg
        out = [None] * len(items)
        jpeg = [k for k, it in enumerate(items) if it[0] is not None and bytes(it[0][:2].tolist()) == b'\xff\xd8']
        try:
            decoded = decode_jpeg([items[k][0] for k in jpeg], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded, jpeg = [], []
        for k, img in zip(jpeg, decoded):
            out[k] = img
        for k, it in enumerate(items):
            if it[0] is None:                               # the worker could not read the file
                continue
            try:
                img = out[k] if out[k] is not None else decode(it[0].numpy().tobytes()).to(self.device)
                out[k] = self.augment(img, it[2])
            except RuntimeError:
                out[k] = None
        return out


# ---- a run's splits as image files: the interface of streams.Splits ----

class FileStream:
    """A training stream of image files: the Batches of global steps start..stop-1, in order. Each batch is
    a function of its step, so the stream has no state of its own to save (the saved step restarts it)."""

    def __init__(self, batches):
        self.batches, self.iterator = batches, iter(batches)

    def next(self):
        return next(self.iterator)

    def state(self):
        return {}

    def restore(self, state):
        pass


class FileCycles:
    """Several FileStreams drawn together (the labeled and unlabeled pools): next(names) gives one batch of
    each named stream, in that order."""

    def __init__(self, streams):
        self.streams = streams

    def next(self, names):
        return [self.streams[name].next() for name in names]

    def state(self):
        return {}

    def restore(self, state):
        pass


class FileSplits:
    """A run's splits as image files (name -> FileList or RecordFile), read where they lie by DataLoader
    workers, decoded and augmented as `augment` (training) and `test_augment` (evaluation) say, on the GPU
    when decode_on is 'gpu', normalised with ImageNet's mean and std. The calls of streams.Splits:

      sampled(split, B, seed, start, stop)  distinct images of the split's pool every global step (BatchPlan
                                            'sample', seeded 2 * seed; the crops 2 * seed + 1)
      cycled(pools, B, seed, start, stop)   endless passes over pools (name -> (split, indices)); pool k's
                                            passes and crops seeded 2 * seed + k
      evaluation(split, b)                  the split in order, b images per process a batch
      bad_images()                          the images that could not be decoded since the last call (each
                                            replaced by another image of its batch)

    Global step t of every stream is a function of t alone, so a resumed run continues the streams exactly."""

    def __init__(self, splits, n_classes, device, shard, workers, decode_on, augment, test_augment, pools=None,
                 where=''):
        self.splits, self.n_classes, self.device, self.shard, self.workers = splits, n_classes, device, shard, workers
        self.decode_on = decode_on if decode_on != 'auto' else ('gpu' if device.type == 'cuda' else 'cpu')
        self.augment, self.test_augment, self.where = augment, test_augment, where
        self.pools = {name: np.arange(len(split)) for name, split in splits.items()} | (pools or {})
        self.sizes = {name: len(pool) for name, pool in self.pools.items()}
        self.training, self.evaluations = [], []          # the streams made, for bad_images()

    def _batches(self, split, plan, augment, seed, start, stop):
        return Batches(self.splits[split], plan, augment, self.device, seed, start, stop, self.shard, self.workers,
                       self.decode_on)

    def sampled(self, split, batch_size, seed, start=0, stop=None):
        plan = BatchPlan(self.pools[split], batch_size, 2 * seed, 'sample')
        batches = self._batches(split, plan, self.augment, 2 * seed + 1, start, stop)
        self.training.append(batches)
        return FileStream(batches)

    def cycled(self, pools, batch_size, seed, start=0, stop=None):
        streams = {}
        for k, (name, (split, pool)) in enumerate(pools.items()):
            plan = BatchPlan(pool, batch_size, 2 * seed + k, 'cycle')
            streams[name] = FileStream(self._batches(split, plan, self.augment, 2 * seed + k, start, stop))
            self.training.append(streams[name].batches)
        return FileCycles(streams)

    def evaluation(self, split, batch_size):
        n, B = len(self.splits[split]), batch_size * self.shard[1]
        batches = self._batches(split, BatchPlan(np.arange(n), B, 0, 'ordered'), self.test_augment, 0, 0, -(-n // B))
        self.evaluations.append(batches)
        return batches, n

    def bad_images(self):
        streams = self.training + self.evaluations
        out = [bad for b in streams for bad in b.bad]
        for b in streams:
            b.bad.clear()
        self.evaluations = []
        return out


class FileColumns:
    """One split of image files with label columns ([N, k] integers: the class, and a MAXL script's auxiliary
    assignment beside it), read as streams.DeviceData is read: len(), num_batches(B), batches(B, generator,
    shuffle, augment) -> (normalised float images [b, 3, S, S], int64 label columns [b, k]) on the device, in
    global batches of B * world images with this process's share of each. Through the streaming pipeline
    (Batches: DataLoader workers read and decode, `augment` in training, `test_augment` otherwise). A shuffled
    pass is a permutation seeded by one draw from `generator` (the run's stream of that epoch; its crops and
    flips seeded by the same draw), so an epoch's passes follow from the epoch and a resumed run repeats them."""

    def __init__(self, files, columns, device, shard, workers, decode_on, augment, test_augment):
        self.files = FileList(files.root, files.paths, np.arange(len(files)), files.classes)   # labels: the rows
        self.columns = torch.as_tensor(np.asarray(columns, dtype=np.int64)).to(device)
        self.device, self.shard, self.workers = device, shard, workers
        self.augment, self.test_augment = augment, test_augment
        self.decode_on = decode_on if decode_on != 'auto' else ('gpu' if device.type == 'cuda' else 'cpu')
        self.bad = []

    def __len__(self):
        return len(self.files)

    def num_batches(self, batch_size, drop_last=False):
        """How many batches batches(batch_size) yields (as DeviceData.num_batches)."""
        full, rest = divmod(len(self), batch_size * self.shard[1])
        return full + (0 if drop_last or rest < self.shard[1] else 1)

    def batches(self, batch_size, generator=None, shuffle=False, augment=False, drop_last=False):
        seed, order = 0, np.arange(len(self))
        if shuffle:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
            order = np.random.default_rng([seed, 7]).permutation(len(self))
        plan = BatchPlan(order, batch_size * self.shard[1], 0, 'ordered')
        batches = Batches(self.files, plan, self.augment if augment else self.test_augment, self.device, seed, 0,
                          self.num_batches(batch_size, drop_last), self.shard, self.workers, self.decode_on)
        for x, rows in batches:
            yield x, self.columns[rows]
        self.bad += batches.bad

    def bad_images(self):
        """The images that could not be decoded since the last call (each replaced by another of its batch)."""
        out, self.bad = self.bad, []
        return out


def thumbnails(files, size, workers=0):
    """Every image of `files` (a FileList) as the evaluation transform makes it at `size` pixels (shorter side
    to size * 256 / 224, centre crop), uint8 [N, 3, size, size] in file order: the 32-pixel images the K-means
    baseline's autoencoder is trained on."""
    n, cpu = len(files), torch.device('cpu')
    batches = Batches(files, BatchPlan(np.arange(n), 256, 0, 'ordered'), Augment(False, size), cpu, 0, 0, -(-n // 256),
                      workers=workers, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    return torch.cat([x.round().to(torch.uint8) for x, _ in batches]).numpy()


def choose_classes(name, path, seed, class_list='', kept=None, with_train=True):
    """A large dataset's images, chosen before anything is written (a bad input stops here): the training
    list (None when not with_train), the test list (the official validation set) and the class names in label
    order. imagenetN: N classes of ImageNet named by `class_list`, or drawn with the seed, or (a resumed run,
    `kept` its folder) read back from its classes.txt; relabelled 0..N-1 in list order, in train and test
    alike (the SLA code's labels.index(y))."""
    ds, n_subset = large_record(name)
    test = large_split(name, path, 'test')
    train = large_split(name, path, 'train') if with_train else None
    classes = (test if train is None else train).classes
    if n_subset:
        known, what = {c: k for k, c in enumerate(classes)}, 'classes (class folder names)'
        given = os.path.join(kept, CLASSES) if kept else class_list
        if given:
            picked = read_names(given, known, what)
            if len(picked) != n_subset:
                raise UserError(f'{given!r} names {len(picked)} classes, but --dataset {name} asks for {n_subset}: '
                                f'use --dataset imagenet{len(picked)}, or a list of {n_subset} classes.')
        else:
            picked = draw_classes(len(classes), n_subset, seed)
        classes = [classes[k] for k in picked]
        in_test = {c: k for k, c in enumerate(test.classes)}
        missing = [c for c in classes if c not in in_test]
        if missing:
            raise UserError(f'the test split in {path} has no folder for {len(missing)} of the chosen classes '
                            f'(first: {missing[:3]}): its class folders must be those of the training split.')
        test = class_subset(test, [in_test[c] for c in classes])
        if train is not None:
            train = class_subset(train, picked)
    elif ds.layout == 'folder' and test.classes != classes:
        raise UserError(f'the test split in {path} has other class folders than the training split '
                        f'({len(test.classes)} and {len(classes)}): the labels would not match. Give both splits '
                        'the same class folders.')
    for split in (train, test):
        if split is not None and len(split) and split.labels.max() >= len(classes):
            raise UserError(f'labels up to {split.labels.max()} in {path}, but {len(classes)} classes: the class '
                            'ids must be 0..C-1.')
    return train, test, classes


CLASSES = 'classes.txt'          # an imagenetN run's classes, kept in its folder and read back on resume


def choose(name, data_root, synthetic, seed, class_list='', per_class=0, kept=None, with_train=True):
    """The images a run of the large dataset `name` uses, before anything is written: its training images (or
    `per_class` of every class) and its official validation set as the test split (imagenetN: N classes, see
    choose_classes). A resumed run (`kept`: its folder) reads its own back. Returns dict(files: split ->
    FileList, pools: split -> indices, n_classes, lists: the files a new run keeps, path)."""
    path = large_data_path(name, data_root, synthetic)
    train, test, classes = choose_classes(name, path, seed, class_list, kept, with_train)
    lists = {CLASSES: classes} if large_record(name)[1] else {}
    chosen = dict(files={'test': test}, pools={}, n_classes=len(classes), lists=lists, path=path)
    if with_train:
        pool = per_class_pool(train.labels, per_class, seed, kept, classes)
        chosen['files']['train'], chosen['pools']['train'] = train, pool
        if per_class:
            lists[TRAIN_INDICES] = pool
    return chosen


# ---- the synthetic stand-ins of the large datasets: small JPEG trees in the real layouts ----

def synthetic_picture(label, n_classes, h, w, rng):
    """uint8 [h, w, 3] showing its class: the class's colour, modulated by stripes at the class's angle,
    with noise."""
    hue = 2 * math.pi * label / n_classes
    colour = 128 + 100 * np.array([math.cos(hue), math.cos(hue - 2.094), math.cos(hue + 2.094)])
    angle = math.pi * (label % 4) / 4 + rng.uniform(-0.2, 0.2)
    yy, xx = np.mgrid[0:h, 0:w] / 8.0
    stripes = 0.75 + 0.25 * np.sin(xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, 6.3))
    img = colour[None, None, :] * stripes[:, :, None] + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_picture(path, array, kind):
    from PIL import Image
    img = Image.fromarray(array)
    if kind == 'gray':
        img = img.convert('L')
    elif kind == 'cmyk':
        img = img.convert('CMYK')
    img.save(path, 'PNG' if kind == 'png' else 'JPEG', quality=90)


def write_synthetic_folder(name, root, seed=0):
    """The stand-in of a large dataset under root/<folder>, in its real layout: JPEGs of mixed sizes
    (32-96 pixels a side) and aspect ratios, every 13th grayscale and every 17th CMYK (ImageNet has both),
    one PNG named .JPEG (ImageNet has one too); iNaturalist gets its JSON files. Written to a temporary
    folder first, then renamed into place."""
    ds, _ = large_record(name)
    final = os.path.join(root, ds.folder)
    tmp = f'{final}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng([seed, 5])
    n_cls = ds.synthetic_classes
    count = 0
    for s, (split, per_class) in enumerate(zip(ds.splits, ds.synthetic_per_class)):
        entries = []
        for c in range(n_cls):
            wnid = f'n{9000000 + c:08d}'
            for k in range(per_class):
                if ds.layout == 'inat':
                    rel = f'train_val2018/Plantae/{c}/{split[:3]}_{k:04d}.jpg'
                elif split == 'train':
                    rel = f'{split}/{wnid}/{wnid}_{k}.JPEG'
                else:
                    rel = f'{split}/{wnid}/ILSVRC2012_val_{s * 100000 + c * 1000 + k:08d}.JPEG'
                h = int(rng.integers(32, 97))
                w = int(np.clip(h * math.exp(rng.uniform(-0.5, 0.5)), 32, 128))
                count += 1
                kind = ('png' if count == 5 else 'gray' if count % 13 == 0 else 'cmyk' if count % 17 == 0
                        else 'rgb')
                path = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _save_picture(path, synthetic_picture(c, n_cls, h, w, rng), kind)
                entries.append((rel, c))
        if ds.layout == 'inat':
            images = [{'id': i, 'file_name': rel} for i, (rel, _) in enumerate(entries)]
            annotations = [{'id': i, 'image_id': i, 'category_id': c} for i, (_, c) in enumerate(entries)]
            with open(os.path.join(tmp, split), 'w') as f:
                json.dump({'images': images, 'annotations': annotations,
                           'categories': [{'id': c, 'name': f'species {c}'} for c in range(n_cls)]}, f)
    try:
        os.rename(tmp, final)
    except OSError:                          # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic_folder(name, root):
    ds, _ = large_record(name)
    if not os.path.isdir(os.path.join(root, ds.folder)):
        write_synthetic_folder(name, root)


