"""Training data held on the device, and the batch streams the scripts' loops draw from it.

  DeviceData, random_crop_flip   a whole split as one uint8 tensor on the device; batches cropped, flipped and
                                 normalised as tensor ops (every script on CIFAR, SVHN, Fashion-MNIST)
  Splits                         the named splits of a run held on the device, its training streams and
                                 its evaluation batches: the interface a script's loop asks its data through
                                 (large_datasets.FileSplits is the same interface over image files)
  SampledBatches                 distinct images drawn afresh every step (i.i.d. across steps)
  CycledBatches, EndlessBatches  endless passes over pools of images, one permutation per pass
  stream_seed, device_generator  the seeded random streams of a run (epochs, passes, augmentation)

Every stream's state is plain tensors and integers (state() for the checkpoint, restore(state) on --resume),
so a resumed run continues it exactly; under torchrun every process draws the global batch and keeps its
share, so the stream does not depend on the number of processes.

Used by the scripts (DeviceData: the MAXL scripts and plot_features.py; Splits: train_sla.py and
train_meta_semi.py; model_vgg_human.py's K-means streams), utils.py (stream_seed, device_generator)
and benchmarks/bench.py.
"""
import torch

# Data streams: stream k of a run (epoch k, or pass k over a pool) draws from a generator seeded with
# seed * STREAM_STRIDE + k. The stride is a prime above any epoch or pass count a run reaches, so two
# (seed, k) pairs never share a stream; a resumed run rebuilds stream k from these two integers alone.
# Changing it changes every run's data order (tests/test_pinned_runs.py would say so).
STREAM_STRIDE = 1_000_003


def stream_seed(seed, k):
    return int(seed) * STREAM_STRIDE + int(k)


def device_generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g



def random_crop_flip(x, offsets, flips, pad=4):
    """Batched RandomCrop(32, padding=pad) + RandomHorizontalFlip on uint8/float images [B,C,H,W].

    offsets: int64 [B,2] (top, left) in [0, 2*pad]; flips: bool [B]. Zero padding, as torchvision's
    default fill. One gather for the whole batch, no per-image Python."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    j = torch.arange(w, device=x.device)
    j = torch.where(flips[:, None], w - 1 - j, j)                                      # flipped: read right to left
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]      # [B,1,H,1]
    cols = (offsets[:, 1:2] + j)[:, None, None, :]                                     # [B,1,1,W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


class DeviceData:
    """A whole split as one uint8 tensor on the training device, with its labels.

    batches() yields normalised float batches; with augment=True each batch gets random crop (`pad`
    pixels of zero padding) and, when `flip`, horizontal flip from `generator` (a torch.Generator on the
    device). pad and flip are the defaults of every call; a dataset's own are DATASETS[name].pad / .flip.

    Under torchrun, `shard=(rank, world size)`: every index batch given to get() is a global batch, the
    same on every process (drawn from the same seeded stream); its crops and flips are drawn for the whole
    global batch, and this process keeps rows [rank * n // world, (rank + 1) * n // world). So the
    processes together see exactly what one process would see with the global batch, and the stream
    does not depend on the number of processes. batches(batch_size) takes batch_size per process.
    """

    def __init__(self, images, labels, device, mean, std, pad=4, flip=True, shard=(0, 1)):
        self.pad, self.flip = pad, flip
        self.rank, self.world = shard
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels).to(device)
        self.device = device
        # batches come in torch's default float type (float32; the pinned-run test runs float64)
        self.mean = torch.tensor(mean, dtype=torch.get_default_dtype(), device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.get_default_dtype(), device=device).view(1, 3, 1, 1) * 255

    def __len__(self):
        return len(self.images)

    def share(self, rows):
        """This process's rows of a tensor holding one row per image of a global batch."""
        n = len(rows)
        return rows[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def normalise(self, x_uint8):
        return (x_uint8.to(self.mean.dtype) - self.mean) / self.std

    def augment(self, x_uint8, generator, pad=None, flip=None, draws=None):
        """Crop (and flip) x; the random draws are made for `draws` images (default len(x)), this
        process's share of them applied to x."""
        pad = self.pad if pad is None else pad
        flip = self.flip if flip is None else flip
        b = len(x_uint8) if draws is None else draws
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), device=self.device, generator=generator)
        flips = torch.rand(b, device=self.device, generator=generator) < 0.5     # drawn either way: same stream
        if not flip:
            flips = torch.zeros_like(flips)
        if draws is not None:
            offsets, flips = self.share(offsets), self.share(flips)
        return random_crop_flip(x_uint8, offsets, flips, pad)

    def get(self, index, generator=None, augment=False, flip=None):
        """This process's share of the images `index` (normalised float, augmented if asked), with labels."""
        mine = self.share(index)
        x = self.images[mine]
        if augment:
            x = self.augment(x, generator, flip=flip, draws=len(index) if self.world > 1 else None)
        return self.normalise(x), self.labels[mine]

    def num_batches(self, batch_size, drop_last=False):
        """How many batches batches(batch_size) yields."""
        step = batch_size * self.world
        full, rest = divmod(len(self), step)
        return full + (0 if drop_last or rest < self.world else 1)

    def batches(self, batch_size, generator=None, shuffle=False, augment=False, drop_last=False, flip=None):
        """One pass over the split (a fresh permutation from `generator` when shuffle=True), in global
        batches of batch_size * world images; a last global batch smaller than the number of processes is
        left out (on every process alike)."""
        n, step = len(self), batch_size * self.world
        order = (torch.randperm(n, device=self.device, generator=generator) if shuffle
                 else torch.arange(n, device=self.device))
        stop = n - n % step if drop_last else n
        for start in range(0, stop, step):
            if min(step, stop - start) < self.world:
                break
            yield self.get(order[start:start + step], generator, augment, flip)




class EndlessBatches:
    """Batches of the dataset indices in `pool` (a device tensor) for ever: each pass over the pool is a
    fresh permutation and a batch runs across the pass boundary, as the MetaSemi code's pre-allocated
    index lists, without pre-allocating them. Pass k's permutation comes from (seed, k), so the state is
    two integers (state_dict / load_state_dict continue the stream exactly)."""

    def __init__(self, pool, batch_size, seed):
        self.pool, self.batch_size, self.seed = pool, batch_size, int(seed)
        self.load_state_dict({'passes': 0, 'position': 0})

    def _permutation(self):
        g = device_generator(self.pool.device, stream_seed(self.seed, self.passes))
        return self.pool[torch.randperm(len(self.pool), generator=g, device=self.pool.device)]

    def next(self):
        parts, need = [], self.batch_size
        while need:
            take = min(need, len(self.pool) - self.position)
            parts.append(self.order[self.position:self.position + take])
            self.position, need = self.position + take, need - take
            if self.position == len(self.pool):
                self.passes, self.position = self.passes + 1, 0
                self.order = self._permutation()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self):
        return {'passes': self.passes, 'position': self.position}

    def load_state_dict(self, state):
        self.passes, self.position = state['passes'], state['position']
        self.order = self._permutation()


class SampledBatches:
    """Training batches of `batch_size` distinct images of `data` (the global batch under torchrun, this
    process's share returned), drawn afresh every step, cropped and flipped: indices, crops and flips all
    from one device generator seeded with `seed`, whose state is the stream's state ('data_rng')."""

    def __init__(self, data, batch_size, seed):
        self.data, self.batch_size = data, batch_size
        self.rng = device_generator(data.device, seed)

    def next(self):
        index = torch.randperm(len(self.data), device=self.data.device, generator=self.rng)[:self.batch_size]
        return self.data.get(index, self.rng, augment=True)

    def state(self):
        return {'data_rng': self.rng.get_state()}

    def restore(self, state):
        if 'data_rng' in state:
            self.rng.set_state(state['data_rng'].cpu())


class CycledBatches:
    """Endless batches of `batch_size` images from each of several pools of `data` (name -> index tensor),
    each pool an EndlessBatches whose passes are seeded with `seeds[name]`; the crops and flips of every pool
    from one device generator seeded with `augment_seed`. next(names) gives one (images, labels) batch of
    each named pool, in that order."""

    def __init__(self, data, pools, batch_size, seeds, augment_seed):
        self.data = data
        self.cycles = {name: EndlessBatches(pool, batch_size, seeds[name]) for name, pool in pools.items()}
        self.rng = device_generator(data.device, augment_seed)

    def next(self, names):
        return [self.data.get(self.cycles[name].next(), self.rng, augment=True) for name in names]

    def state(self):
        return {name: cycle.state_dict() for name, cycle in self.cycles.items()} | {'augment_rng': self.rng.get_state()}

    def restore(self, state):
        if 'augment_rng' in state:
            for name, cycle in self.cycles.items():
                cycle.load_state_dict(state[name])
            self.rng.set_state(state['augment_rng'].cpu())


class Splits:
    """A run's splits held whole on the device (name -> DeviceData: train / val / test, or train / test with
    pools of labeled and unlabeled training images), and what a training loop asks of them: a training
    stream (sampled: distinct images every step; cycled: endless passes over pools), the batches of a split
    to evaluate, in order, and the images that could not be read (none: they were read whole up front).
    large_datasets.FileSplits answers the same calls from image files.

    The streams' seeds, from the run's seed s: sampled draws everything from s; cycled seeds the passes over
    its k-th pool with 2s + k and the crops and flips with s. `start`/`stop`: the steps the stream serves (a
    resumed run's saved stream state already knows where it is)."""

    def __init__(self, splits, n_classes, where=''):
        self.splits, self.n_classes, self.where = splits, n_classes, where
        self.sizes = {name: len(data) for name, data in splits.items()}

    @classmethod
    def on_device(cls, arrays, n_classes, device, mean, std, flip=True, shard=(0, 1)):
        """Splits of `arrays` (name -> (uint8 images, labels)) moved whole to `device` (see DeviceData)."""
        return cls({name: DeviceData(x, y, device, mean, std, flip=flip, shard=shard) for name, (x, y) in arrays.items()},
                   n_classes)

    def sampled(self, split, batch_size, seed, start=0, stop=None):
        return SampledBatches(self.splits[split], batch_size, seed)

    def cycled(self, pools, batch_size, seed, start=0, stop=None):
        """pools: name -> (split, indices); all of one split here (they share its crops and flips)."""
        (split,) = {split for split, _ in pools.values()}
        data = self.splits[split]
        indices = {name: torch.as_tensor(pool, device=data.device) for name, (_, pool) in pools.items()}
        seeds = {name: 2 * seed + k for k, name in enumerate(pools)}
        return CycledBatches(data, indices, batch_size, seeds, seed)

    def evaluation(self, split, batch_size):
        """(this process's batches of `split` in order, the number of images in the whole split)."""
        data = self.splits[split]
        return data.batches(batch_size), len(data)

    def bad_images(self):
        return []
