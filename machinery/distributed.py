"""Devices and processes: pick_device, and torchrun (or torch.distributed.launch) with
DistributedDataParallel, one process per device.

  pick_device                         --device (Processes, plot_features.py, the benchmarks)
  dist_env, distributed               this process's rank, local rank and world size; whether several run
                                      (utils.Run, train_sla's batch check, model_vgg_maxl, benchmarks/bench.py)
  Processes                           a member of utils.Run: the process group, this process's share of a
                                      global batch, its networks (broadcast, SyncBatchNorm, DDP), buffer copies
  all_reduce, all_reduce_sum / _mean, the scripts' meta-gradients and sharded evaluations, utils (Meters, the
  differentiable_sum                  divergence watch): DDP averages only inside .backward(), so a gradient
                                      taken with torch.autograd.grad is reduced here by hand
  SyncBatchNorm, wrap_ddp, Wrapped    Processes (Wrapped: what run.wrap returns); Wrapped also train_sla.py
                                      (a plain network as a wrapped one) and benchmarks/bench.py

In a single process every function here is a no-op or the plain computation.
"""
import datetime
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .fast_paths import fast_module
from .options import UserError


def pick_device(name='auto'):
    """'auto' -> cuda, else mps, else cpu. Anything torch.device accepts is allowed ('cuda:1')."""
    if name in (None, '', 'auto'):
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name!r} was asked for (--device cuda, or the original\'s --gpu) but this '
                        'PyTorch sees no CUDA GPU: drop --gpu, or use --device cpu (or auto).')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UserError(f'device {name!r} was asked for but MPS is not available here; use --device cpu.')
    return device

# ----------------------------------------------------------------------------------------------------
# Processes and collectives
# ----------------------------------------------------------------------------------------------------

def dist_env():
    """(rank, local rank, world size) from the variables torchrun sets; (0, 0, 1) for a plain run."""
    return (int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0')),
            int(os.environ.get('WORLD_SIZE', '1')))


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t):
    """The sum over processes, in place (returned); a no-op in a single process."""
    if distributed():
        dist.all_reduce(t)
    return t


def all_reduce(tensors, mean=False):
    """Each tensor replaced in place by its sum (or mean) over processes, in one collective; returned.
    A no-op in a single process."""
    tensors = list(tensors)
    if distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        if mean:
            flat /= dist.get_world_size()
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors


def all_reduce_mean(tensors):
    return all_reduce(tensors, mean=True)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes, in both modes: the gradient with respect to one process's input
    is the sum of every process's output gradient, and a tangent is summed like a value. (Built on
    dist.all_reduce; used by SyncBatchNorm and MAXL's meta-gradient, which need double backward and
    forward-mode AD through it.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        tangent = tangent.clone()
        dist.all_reduce(tangent)
        return tangent


def differentiable_sum(x):
    """Sum of x over processes with gradients (and tangents) flowing back to every process."""
    return _AllReduceSum.apply(x) if distributed() else x


# ----------------------------------------------------------------------------------------------------
# Networks across processes: SyncBatchNorm, DistributedDataParallel over any computation
# ----------------------------------------------------------------------------------------------------

class SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training-mode statistics are those of the global batch (all processes): mean and
    biased variance from sums all-reduced with differentiable_sum, so it supports backward, double
    backward and forward-mode AD (torch.nn.SyncBatchNorm supports only a first backward, and MAXL's
    meta-gradient needs more). The same parameters, buffers and names as BatchNorm2d; in eval mode, or in
    a single process, it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = differentiable_sum(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = differentiable_sum(x.sum(dims)) / count
        centred = x - mean.view(1, -1, *[1] * (x.dim() - 2))
        var = differentiable_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_bn(net):
    """Every BatchNorm2d of `net` replaced by a SyncBatchNorm holding the same tensors (same names)."""
    for name, child in net.named_children():
        if type(child) is nn.BatchNorm2d:
            like = child.weight if child.affine else child.running_mean
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(net, name, sync)
        else:
            convert_sync_bn(child)
    return net


class Call(nn.Module):
    """Holds a network so that DistributedDataParallel sees one forward for any computation on it:
    Call(net)(*args, fn=f) is f(net, *args); without fn, net(*args)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, fn=None):
        return self.net(*args) if fn is None else fn(self.net, *args)


def wrap_ddp(net, device, sync_buffers=True):
    """Wrapped(net) through DistributedDataParallel over Call(net) (the process group must exist);
    sync_buffers: copy the first process's buffers at each forward."""
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == 'cuda' else None
    new_name = 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters   # torch >= 2.13
    buffers = {'forward_sync_buffers' if new_name else 'broadcast_buffers': sync_buffers}
    return Wrapped(net, DistributedDataParallel(Call(net), device_ids=ids, **buffers))


class Wrapped:
    """What run.wrap returns: w(x) is net(x), w.call(fn, *args) is fn(net, *args); under torchrun both go
    through DistributedDataParallel, so the next backward averages the gradients over processes."""

    def __init__(self, net, ddp=None):
        self.net, self.ddp = net, ddp

    def __call__(self, *args):
        return self.net(*args) if self.ddp is None else self.ddp(*args)

    def call(self, fn, *args):
        return fn(self.net, *args) if self.ddp is None else self.ddp(*args, fn=fn)


def broadcast(tensors, src=0):
    """Each tensor replaced in place by the first process's, in one collective (floating tensors only)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=src)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


class Processes:
    """This process's place among the processes of a run (a member of utils.Run): rank, local rank, world
    size, device and backend, started from the variables torchrun sets (the process group made here); and
    what several processes ask of the run's networks and batches. With one process every method is the
    single-device computation. `cfg`: the run options device, dist_backend, dist_timeout, local_rank,
    sync_bn and the fast paths (amp, channels_last, compile)."""

    def __init__(self, cfg):
        """A setup that cannot work is refused here, before anything is written."""
        self.rank, self.local_rank, self.world = dist_env()
        if cfg.local_rank >= 0 and 'LOCAL_RANK' not in os.environ:      # an old launcher's --local_rank=K
            self.local_rank = cfg.local_rank
        self.shard = (self.rank, self.world)
        self.sync_bn = cfg.sync_bn
        self.fast = dict(amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile)
        device = pick_device(cfg.device)
        self.backend = cfg.dist_backend if cfg.dist_backend != 'auto' else ('nccl' if device.type == 'cuda' else 'gloo')
        self.device = device
        if self.world == 1:
            return
        if self.backend == 'nccl' and device.type != 'cuda':
            raise UserError(f'--dist_backend nccl needs CUDA GPUs, but this process runs on {device}: use '
                            '--dist_backend gloo (or auto) on CPUs.')
        if device.type == 'cuda':
            visible = torch.cuda.device_count()
            if self.local_rank >= visible:
                raise UserError(f'this is local process {self.local_rank}, but only {visible} CUDA GPU(s) are '
                                f'visible: start at most --nproc_per_node {visible} processes per machine.')
            self.device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.dist_timeout <= 0:
            raise UserError(f'--dist_timeout must be a positive number of minutes, got {cfg.dist_timeout}.')
        dist.init_process_group(self.backend, timeout=datetime.timedelta(minutes=cfg.dist_timeout))

    def resumed_processes(self, saved_world, saved_batch, batch):
        """--resume on another number of processes than the run was saved on (saved_world; None: a checkpoint
        from before it was recorded, not checked). Every data stream, schedule and saved position counts
        steps of the global batch (processes x --batch_size), so the same global batch continues the run
        (with --sync_bn, and MetaSemi's --global_meta_gradient, as the processes before would have: one
        process of 2B computes what two of B do); another one is refused, naming the --batch_size that
        keeps it; so is another --batch_size on as many processes. Returns the note to log, or None."""
        if saved_world is None or (saved_world == self.world and batch == saved_batch):
            return None
        total = saved_world * saved_batch
        if saved_world == self.world:
            raise UserError(f'--batch_size {batch} typed with --resume: this run was trained on {saved_world} '
                            f'process(es) x --batch_size {saved_batch} = {total} images per step, and its data '
                            f'streams, schedule and saved positions count steps of {total}. Drop --batch_size to '
                            f'continue it, or start a new run with --batch_size {batch}. Nothing was written.')
        if self.world * batch != total:
            keep = (f'--batch_size {total // self.world} (per process) on {self.world} process(es)'
                    if total % self.world == 0 else f'a number of processes that divides {total}')
            raise UserError(f'this run was trained on {saved_world} process(es) x --batch_size {saved_batch} = '
                            f'{total} images per step; resumed on {self.world} process(es) x {batch} it would take '
                            f'{self.world * batch}, and its data streams, schedule and saved positions count steps of '
                            f'{total}. Resume with {keep}, or on {saved_world} process(es) as before. Nothing was '
                            'written.')
        return (f'note: resumed on {self.world} process(es) x batch {batch} (saved on {saved_world} x {saved_batch}): '
                f'the same {total} images per step')

    def share(self, rows):
        """This process's rows of a tensor holding one row per image of a global batch."""
        n = len(rows)
        return rows[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def network(self, net, methods=('forward',)):
        """`net` on the run's device (with --sync_bn its batch norms synchronised across processes), with
        the opt-in fast paths of the run (--amp, --channels_last, --compile) applied to `methods`; with all
        of them off it is only moved. Under torchrun every process starts from the first one's tensors."""
        net.to(self.device)
        if self.sync_bn:
            convert_sync_bn(net)
        if self.world > 1:
            for t in net.state_dict().values():
                dist.broadcast(t, src=0)
        return fast_module(net, self.device, methods=methods, **self.fast)

    def sync_buffers(self, *nets):
        """Under torchrun without --sync_bn, each process's batch-norm statistics follow its own batches
        between the forwards through DistributedDataParallel (which copies the first process's at each
        forward): copy the first process's to all before anything that uses them (an evaluation,
        MetaSemi's eval-mode meta step), so every process computes with the same ones and a resumed run
        (which has the first process's) continues exactly."""
        if self.world > 1 and not self.sync_bn:
            broadcast([b for net in nets for b in net.buffers()])

    def wrap(self, net):
        """The training forward of `net` (see Wrapped): under torchrun through DistributedDataParallel,
        which averages the gradients of the next backward over the processes. Buffers (batch-norm
        statistics) are broadcast from the first process at each forward, unless --sync_bn keeps them
        equal anyway."""
        return wrap_ddp(net, self.device, sync_buffers=not self.sync_bn) if self.world > 1 else Wrapped(net)
