"""The run skeleton every script shares: one training run from the command line to its last checkpoint.

  run_main                      every script's entry: a UserError (options.py) becomes a one-paragraph
                                message and exit code 2 (3: diverged; 128 + signal: stopped), no traceback
  Run                           every script: configuration (options.parse_config), processes and device
                                (distributed.Processes), run folder, log, checkpoints and resume
                                (checkpoints.Checkpoints), Ctrl-C / SIGTERM, divergence checks
                                (Divergence, here), the start line
  Meters, Progress, Timer       the training loops: device-side sums, progress lines, epoch times
  stream_seed, device_generator the data streams (create_dataset, large_datasets, the scripts)
  RunLog                        log.txt, metrics.csv (brought back in line with the checkpoint on resume),
                                config.json, TensorBoard scalars

Files and checkpoints (atomic writes, weights-only loading) are in checkpoints.py, the networks in models.py,
the fast paths in fast_paths.py, several processes in distributed.py, the command line in options.py.
"""
import argparse
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from machinery.checkpoints import Checkpoints, load_checkpoint, load_run_checkpoint, read_run_config
from machinery.files import atomic_write_text, write_error
from machinery.distributed import Processes, all_reduce_sum, distributed
from machinery.fast_paths import set_tf32
from machinery.options import (RUN_OPTIONS, TRANSIENT, Diverged, Stopped, UserError, check_choices, check_finite, parse_config,
                     python_command, torchrun_command)


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError becomes a one-paragraph message on stderr and exit code 2 (3 when
    training diverged)."""
    first = os.environ.get('RANK', '0') == '0'        # under torchrun, only the first process speaks
    code = 0
    try:
        main(argv)
        if distributed():
            dist.barrier()                # every process done: leave together
    except UserError as e:
        if first:
            print(e if isinstance(e, Stopped) else f'error: {e}', file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        if first:
            print('interrupted: the last checkpoint written is intact; continue with --resume RUN', file=sys.stderr)
        code = 130
    if dist.is_available() and dist.is_initialized():
        # Under torchrun, leave without tearing the process group down: a gloo group destroyed while a
        # peer is still closing its own sometimes aborts that peer ('terminate called without an active
        # exception', seen about once in ten 2-process runs here). Every file is written and closed.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Data streams
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# The run folder: config.json, log.txt, metrics.csv, checkpoint.pt, best.pt; atomic writes
# ----------------------------------------------------------------------------------------------------

def make_run_dir(logdir, script, run_name=''):
    """A new, never reused folder logs/<script>/<run>/; an unwritable place is a UserError."""
    base = os.path.join(logdir, script)
    stamp = run_name or datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    try:
        os.makedirs(base, exist_ok=True)
        for k in range(1000):
            path = os.path.join(base, stamp if k == 0 else f'{stamp}-{k}')
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f'cannot create the run folder under {base!r} ({e.strerror}); '
                        'choose a writable place with --logdir DIR.') from None
    raise UserError(f'too many runs named {stamp!r} under {base!r}; pick another --run_name.')


def open_run_dir(path):
    """A run folder named by the user (created if missing); one that already holds a run is refused."""
    if os.path.isfile(os.path.join(path, Run.CHECKPOINT)):
        raise UserError(f'{path!r} already holds a run (it has a {Run.CHECKPOINT}): continue it with '
                        f'--resume {path}, or choose another folder.')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the run folder {path!r} ({e.strerror}); choose a writable place.') from None
    return path


def resolve_run_dir(resume, logdir, script):
    """--resume takes a run folder path or a run name under logs/<script>/."""
    candidates = list(dict.fromkeys((resume, os.path.join(logdir, script, resume))))
    for path in candidates:
        if os.path.isfile(os.path.join(path, Run.CHECKPOINT)):
            return path
    for path in candidates:
        if os.path.isfile(os.path.join(path, 'config.json')):
            raise UserError(f'cannot resume {path!r}: that run never saved a checkpoint (it stopped before its '
                            'first epoch or evaluation ended), so there is nothing to continue: start it again '
                            'without --resume.')
    elsewhere = ''.join(f' nor in {c!r}' for c in candidates[1:])
    raise UserError(f'cannot resume {resume!r}: no {Run.CHECKPOINT} there{elsewhere}. Give the run folder printed '
                    'when the run started (logs/<script>/<run>).')


class RunLog:
    """Prints lines and appends them to log.txt; appends rows to metrics.csv (and TensorBoard scalars);
    writes config.json. Disabled (silent, writes nothing) in every process but the first of a torchrun job."""

    def __init__(self, run_dir, enabled=True, deferred=False):
        self.run_dir, self.enabled, self.tb = run_dir, enabled, None
        self.log_path = os.path.join(run_dir, 'log.txt')
        self.csv_path = os.path.join(run_dir, 'metrics.csv')
        self.pending = [] if deferred else None     # lines printed, kept from log.txt until commit()

    def commit(self):
        lines, self.pending = self.pending or [], None
        for line in lines:
            self._append(line)

    def print(self, line):
        if not self.enabled:
            return
        print(line, flush=True)
        if self.pending is not None:
            self.pending.append(line)
        else:
            self._append(line)

    def _append(self, line):
        try:
            with open(self.log_path, 'a') as f:
                f.write(line + '\n')
        except OSError as e:
            raise write_error(self.log_path, e) from None

    def metrics(self, row):
        """Append a row: the whole file is rewritten atomically (a row is never half written)."""
        if not self.enabled:
            return
        old = open(self.csv_path, newline='').read() if os.path.exists(self.csv_path) else ''
        out = io.StringIO(newline='')
        writer = csv.DictWriter(out, fieldnames=list(row))
        if not old:
            writer.writeheader()
        writer.writerow(row)
        atomic_write_text(self.csv_path, old + out.getvalue())

    def save_config(self, config):
        if self.enabled:
            atomic_write_text(os.path.join(self.run_dir, 'config.json'), json.dumps(config, indent=2, sort_keys=True))

    def reconcile(self, last_row):
        """metrics.csv as the checkpoint knows it (its last row `last_row`, best columns included): rows after
        its position (written by a run killed after them, before its next checkpoint) dropped, its own row
        added if the kill came before it. Returns whether the file changed."""
        if not self.enabled:
            return False
        position = next(iter(last_row))
        rows = list(csv.DictReader(open(self.csv_path, newline=''))) if os.path.exists(self.csv_path) else []
        keep = [r for r in rows if float(r[position]) <= float(last_row[position])]
        has_last = bool(keep) and float(keep[-1][position]) == float(last_row[position])
        if has_last and len(keep) == len(rows):
            return False
        full = keep + ([] if has_last else [last_row])
        out = io.StringIO(newline='')
        writer = csv.DictWriter(out, fieldnames=list(full[-1]))
        writer.writeheader()
        writer.writerows(full)
        atomic_write_text(self.csv_path, out.getvalue())
        return True

    def tensorboard(self, row):
        """Every number of a metrics row as a TensorBoard scalar in <run>/tensorboard (--tensorboard)."""
        if not self.enabled:
            return
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard '
                                '(or run without --tensorboard; metrics.csv has the same numbers).') from None
            self.tb = SummaryWriter(log_dir=os.path.join(self.run_dir, 'tensorboard'))
        position = next(iter(row))
        for k, v in row.items():
            if k != position and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, int(row[position]))
        self.tb.flush()


# ----------------------------------------------------------------------------------------------------
# Meters, progress, stops and the run itself
# ----------------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.device = device
        self.start = time.perf_counter()

    def lap(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


# A finite blow-up is a divergence too (exit code 3, before anything is written from the weights): a run
# stops when, at an evaluation, a network weight is beyond WEIGHT_BOUND in absolute value, or the training
# loss was above LOSS_FACTOR times its value at the run's first step in more than half of the steps since
# the previous evaluation (a sustained stretch: a one-step spike is not counted as one). Healthy runs stay
# far from both: weights of order 1, a training loss at or below its first value (the untrained network's,
# about log of the number of classes).
WEIGHT_BOUND = 1e6
LOSS_FACTOR = 10.0


class Meters:
    """Named running sums kept on the device (no host read inside a training loop). add(n, name=sum
    over n samples, ...); means() divides each by its sample count and reads them all at once. The
    first add that brought a non-finite value is noted on the device too (first_non_finite()).

    watch: the name of the training loss (Run.meters sets it): the adds whose mean of it is above
    LOSS_FACTOR x `reference` are counted on the device (loss_watch()); reference None: this Meters'
    first add's mean (the first step of a new run)."""

    NONE = 2 ** 62

    def __init__(self, watch=None, reference=None):
        self.sums, self.counts, self.adds, self.first_bad, self.names, self.index = {}, {}, 0, None, [], {}
        self.watch, self.reference, self.high, self.watched = watch, reference, None, 0

    def add(self, n, **sums):
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + n
            if k not in self.names:
                self.names.append(k)
        finite = torch.stack([torch.isfinite(torch.as_tensor(v)).all() for v in sums.values()])
        keys = tuple(sums)
        if keys not in self.index:                                   # made once: no host copy per step
            self.index[keys] = torch.tensor([self.names.index(k) for k in keys], device=finite.device)
        codes = self.index[keys] + self.adds * 1000
        here = torch.where(finite, self.NONE, codes).min()          # this add's first bad value, or NONE
        self.first_bad = here if self.first_bad is None else torch.minimum(self.first_bad, here)
        self.adds += 1
        if self.watch in sums:                                       # on the device too: no host read
            mean = sums[self.watch].detach().float() / n
            if self.reference is None:
                self.reference = mean.clone()
            above = (mean > LOSS_FACTOR * self.reference).long()
            self.high = above if self.high is None else self.high + above
            self.watched += 1

    def loss_watch(self):
        """(adds above LOSS_FACTOR x reference, adds watched, reference) of the watched loss (under torchrun:
        counts summed over the processes, the reference their mean); None when nothing was watched. One
        host read."""
        if self.high is None:            # (a process resumed mid-interval has high 0, watched 0: still reduces)
            return None
        both = torch.stack([self.high.float(), torch.as_tensor(float(self.watched), device=self.high.device),
                            self.reference.to(self.high.device).float()])
        if distributed():
            both = all_reduce_sum(both)
            both[2] /= dist.get_world_size()
        high, watched, reference = both.tolist()
        return int(high), int(watched), reference

    def first_non_finite(self):
        """None, or (k, name): the k-th add (from 0) brought a non-finite `name` first (under torchrun:
        the earliest over the processes). One host read."""
        if self.first_bad is None:
            return None
        code = self.first_bad.clone()
        if distributed():
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
        code = int(code)
        if code >= self.NONE:
            return None
        return code // 1000, self.names[code % 1000]

    def state_dict(self):
        """For a checkpoint. Under torchrun the sums and counts of every process together (a collective: every
        process calls it, as Run.stop_if_asked does), since the first process alone writes the checkpoint; so
        are the loss watch's counts (its reference: the processes' mean)."""
        sums, counts, first_bad = dict(self.sums), dict(self.counts), self.first_bad
        high, watched, reference = self.high, self.watched, self.reference
        if distributed() and sums:
            sums = {k: all_reduce_sum(v.clone()) for k, v in sums.items()}
            total = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=first_bad.device))
            counts = dict(zip(counts, (int(c) for c in total.tolist())))
            first_bad = first_bad.clone()
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            if high is not None:
                high = all_reduce_sum(high.clone())
                watched = int(all_reduce_sum(torch.tensor(float(watched), device=high.device)))
                reference = all_reduce_sum(reference.clone().float()) / dist.get_world_size()
        return {'sums': sums, 'counts': counts, 'adds': self.adds, 'first_bad': first_bad, 'names': list(self.names),
                'watch': self.watch, 'reference': reference, 'high': high, 'watched': watched}

    @classmethod
    def from_state(cls, state):
        """A Meters continued from state_dict() (a run stopped between two log lines), or a new one. Under
        torchrun the first process takes the saved sums (every process's, see state_dict), the others start
        from zero, so the sums over the processes are the saved ones, on any number of processes."""
        m = cls()
        if state:
            first = not distributed() or dist.get_rank() == 0
            m.sums = {k: v if first else torch.zeros_like(v) for k, v in state['sums'].items()}
            m.counts = {k: c if first else 0 for k, c in state['counts'].items()}
            m.adds, m.first_bad, m.names = state['adds'], state['first_bad'], list(state['names'])
            m.watch, m.reference = state.get('watch'), state.get('reference')
            high = state.get('high')
            m.high = high if first or high is None else torch.zeros_like(high)
            m.watched = state.get('watched', 0) if first else 0
        return m

    def means(self):
        """Under torchrun, over every process's samples (the same numbers on every process)."""
        if not self.sums:
            return {}
        if distributed():
            sums = all_reduce_sum(torch.stack([v.float() for v in self.sums.values()]))
            counts = all_reduce_sum(torch.tensor([float(c) for c in self.counts.values()], device=sums.device,
                                                 dtype=sums.dtype))
            return dict(zip(self.sums, (sums / counts).tolist()))
        return dict(zip(self.sums, torch.stack([v / self.counts[k] for k, v in self.sums.items()]).tolist()))


def duration(seconds):
    """'1:02:03' or '2:03' (h:mm:ss or m:ss)."""
    seconds = int(max(0, seconds) + 0.5)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """One stretch of work between two log lines (an epoch, an evaluation interval): on a terminal a
    tqdm bar (steps done / total, images/s, time left here and in the whole run); otherwise (a log file,
    CI) a plain line every `every` seconds, no control characters. Silent with --progress false and in
    every process but the first. The first stretch of a run also prints, once, the projected time of
    the whole run from its first steps."""

    def __init__(self, run, total, desc, images_per_step, done_before, run_total):
        self.run, self.total, self.desc, self.images = run, total, desc, images_per_step
        self.done_before, self.run_total, self.done = done_before, run_total, 0
        self.start = self.last_line = time.perf_counter()
        self.enabled = run.cfg.progress and run.rank == 0 and total > 0
        self.bar = None
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit='step', leave=False, dynamic_ncols=True)

    def update(self, n=1):
        if not self.enabled:
            return
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)                       # steps per second
        left_here = (self.total - self.done) / rate
        left_run = (self.run_total - self.done_before - self.done) / rate
        if not self.run.projected and (self.done == self.total or now - self.start >= 20):
            self.run.projected = True            # once: at the end of the first stretch, or after 20 s
            self.run.log.print(f'after {self.done} steps: {1 / rate:.3f} s/step, {rate * self.images:.0f} images/s: '
                               f'about {duration(left_run)} for the rest of the run')
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate * self.images:.0f} img/s, run {duration(left_run)} left', refresh=False)
            self.bar.update(n)
        elif now - self.last_line >= self.run.cfg.progress_every:
            self.last_line = now
            print(f'  {self.desc}: {self.done}/{self.total} steps, {rate * self.images:.0f} images/s, '
                  f'{duration(left_here)} left here, {duration(left_run)} left in the run', flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class StopSignals:
    """Ctrl-C and SIGTERM: the first SIGINT or SIGTERM asks the run to stop at its next consistent point
    (Run.stop_if_asked); a second one quits at once, the last checkpoint written intact (every write is
    atomic). Under torchrun the processes agree on the stop, comparing every 20 steps (a host read)."""

    def __init__(self, rank, world, device):
        import signal
        import threading
        self.rank, self.world, self.device, self.signum = rank, world, device, None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._ask)

    def _ask(self, signum, frame):
        import signal
        if self.signum is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum
        if self.rank == 0:
            print(f'\n{signal.Signals(signum).name}: stopping at the next consistent point with a checkpoint '
                  '(press Ctrl-C again to quit at once, keeping the last checkpoint)', file=sys.stderr, flush=True)

    def requested(self, step=0):
        """Whether to stop here (the same answer on every process)."""
        if self.world == 1:
            return self.signum is not None
        if step % 20:
            return False
        flag = torch.tensor([float(self.signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    @property
    def name(self):
        import signal
        return signal.Signals(self.signum).name


class Divergence:
    """The divergence half of Run: a run whose loss or weights become non-finite, or blow up while finite
    (the training loss above LOSS_FACTOR times its first value in most steps between two evaluations, a
    weight beyond WEIGHT_BOUND), stops with exit code 3 before anything is evaluated or written from those
    weights, quoting the learning rate typed and advising a tenth of it."""


    def meters(self, loss, state=None):
        """The Meters of the steps up to the next evaluation (or continued from `state`, saved by a run stopped
        between two), watching the training loss named `loss` (see LOSS_FACTOR; None: a script that logs no
        loss it trains on; not on a run resumed from a checkpoint written before the loss check, which lacks
        the reference)."""
        m = Meters.from_state(state)
        for k in ('reference', 'high', 'first_bad'):            # a checkpoint's tensors come back on the CPU
            if getattr(m, k) is not None:
                setattr(m, k, getattr(m, k).to(self.device))
        if self.watch_loss and loss and m.watch is None:
            m.watch = loss
            if self.loss_reference is not None:
                m.reference = torch.tensor(self.loss_reference, device=self.device)
        return m

    def check_finite(self, meters, first_step, lr, unit='step', option='lr'):
        """Stop the run (exit code 3) if `meters` saw a non-finite value, or its watched training loss stayed
        above LOSS_FACTOR times its first value in most of its steps: before anything is evaluated or
        written from these weights. first_step: the step of the meters' first add; lr: the rate of --`option`
        now."""
        found = meters.first_non_finite()
        if found:
            k, name = found
            self.diverged(f'the training {name} became non-finite at {unit} {first_step + k}', lr, option)
        watched = meters.loss_watch() if meters.watch else None
        if watched:
            high, steps, reference = watched
            if self.loss_reference is None:
                self.loss_reference = reference         # the run's first step: kept in every checkpoint
            if 2 * high > steps:
                self.diverged(f'the training {meters.watch} stayed above {LOSS_FACTOR:g} times its value at the first '
                              f'step of the run ({self.loss_reference:.4g}) in {high} of the {steps} {unit}s from '
                              f'{unit} {first_step} on, mean {meters.means()[meters.watch]:.4g}', lr, option)

    def rate_of(self, objects, param=None):
        """(the rate now, its option) of the optimiser that trains `param` (default: the first one)."""
        for option, (name, _) in self.RATES.items():
            optimizer = objects.get(name)
            if optimizer is not None and (param is None or any(p is param for g in optimizer.param_groups
                                                                 for p in g['params'])):
                return optimizer.param_groups[0]['lr'], option
        return None, 'lr'

    def check_weights(self, objects, where):
        """Stop the run (exit code 3) if a weight of the networks among `objects` is non-finite or beyond
        WEIGHT_BOUND. One host read."""
        named = [(f'{k}.{n}', p) for k, v in objects.items() if isinstance(v, nn.Module)
                 for n, p in v.named_parameters()]
        biggest = float(torch.stack([p.detach().abs().max().float() for _, p in named]).max())
        if math.isfinite(biggest) and biggest <= WEIGHT_BOUND:
            return
        name, param = max(named, key=lambda np_: (not bool(torch.isfinite(np_[1]).all()),
                                                  float(np_[1].detach().abs().max().nan_to_num(math.inf))))
        if not math.isfinite(biggest):
            self.diverged(f'at {where} the weights became non-finite (first in {name})', *self.rate_of(objects, param))
        self.diverged(f'at {where} a weight grew beyond {WEIGHT_BOUND:g} in absolute value ({biggest:.3g} in {name}; '
                      'healthy weights stay of order 1)', *self.rate_of(objects, param))

    def diverged(self, what, lr=None, option='lr'):
        """Stop with exit code 3, quoting the rate typed (--`option`; `lr`: its value now, after any schedule)
        and advising a tenth of it: from the last checkpoint, or from the start when there is none."""
        typed = getattr(self.cfg, option, None)
        if typed is None:
            typed, option = lr, 'lr'
        rate = f'--{option} {typed:g} as typed' + (f'; {lr:g} by its schedule at this check' if lr is not None and
                                                   not math.isclose(lr, typed, rel_tol=1e-6) else '')
        lower = f'--{option} {typed / 10:g}'
        ckpt = self.checkpoint_path
        if os.path.isfile(ckpt):
            saved = load_checkpoint(ckpt)['last'] or {}
            where = ', '.join(f'{k} {v}' for k, v in list(saved.items())[:1])
            advice = (f'The last good checkpoint is {ckpt} ({where}); continue from it with a lower learning rate, '
                      f'e.g. {self.resume_command()} {lower}')
        else:
            advice = (f'No checkpoint was written yet; start again with a lower learning rate, e.g. {lower} '
                      f'(the folder {self.dir} holds only the configuration and log of this attempt)')
        raise Diverged(f'training diverged: {what} (learning rate: {rate}). Nothing was saved from these weights: '
                       f'{advice}.')


class Run(Checkpoints, Divergence, Processes):
    """One training run: its configuration, processes and device (Processes), folder, log, checkpoints,
    resume, stops and divergence checks.

    A new run gets a new folder <logdir>/<script>/<run>/ (or --run_dir) holding config.json, log.txt,
    metrics.csv, checkpoint.pt (the latest state) and best.pt (the networks at the best evaluation).
    `--resume RUN` reopens a folder: the saved configuration is used, except the values typed on this
    command line (so `--resume RUN --epochs 300` extends a run), and restore() brings back every state.
    """

    def __init__(self, script, hyper, argv=None, description='', validate=None, choices=None, presets=None):
        self.script = script
        cfg, given = parse_config(hyper, argv, description, choices)
        self.resuming = bool(cfg.resume)
        self.saved_config, self.config_source, self.config_problem = {}, None, None
        if cfg.restore_config and not self.resuming:
            raise UserError('--restore_config rewrites the config.json of a run to continue: give it with --resume '
                            'RUN.')
        if presets is not None and not self.resuming:
            presets(cfg, given)                 # a dataset's own defaults, for the values not typed
        if self.resuming:
            self.dir = resolve_run_dir(cfg.resume, cfg.logdir, script)
            self._resumed = load_run_checkpoint(os.path.join(self.dir, self.CHECKPOINT), script, self.FORMAT)
            typed = sys.argv[1:] if argv is None else argv
            command = ' '.join([python_command(), f'{script}.py'] + [shlex.quote(str(a)) for a in typed])
            self.saved_config, self.config_source, self.config_problem = read_run_config(
                self.dir, self._resumed, cfg.restore_config, command)
            merged = {k: self.saved_config.get(k, v) for k, v in vars(cfg).items()}
            cfg = argparse.Namespace(**merged | {k: getattr(cfg, k) for k in given})
        check_finite(cfg, {k: v for k, (v, _) in RUN_OPTIONS.items()} | dict(hyper), given,
                     os.path.join(self.dir, 'config.json') if self.resuming else '')
        check_choices(cfg, (choices or {}) | {'synthetic_size': ['small', 'full']})
        if validate is not None:
            validate(cfg)                       # bad values stop here, before anything is written
        if cfg.tensorboard and importlib.util.find_spec('tensorboard') is None:
            raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or run '
                            'without --tensorboard; metrics.csv holds the same numbers).')
        self.cfg, self.given = cfg, given
        set_tf32(cfg.tf32)
        self.device = self.start_processes(cfg)
        note = (self.resumed_processes((self._resumed.get('config') or {}).get('processes'),
                                       self.saved_config.get('batch_size'),
                                       cfg.batch_size) if self.resuming else None)     # refused: nothing written
        if not self.resuming:                   # the first process makes the folder and tells the others
            if self.rank == 0:
                self.dir = open_run_dir(cfg.run_dir) if cfg.run_dir else make_run_dir(cfg.logdir, script,
                                                                                       cfg.run_name)
            if self.world > 1:
                shared = [getattr(self, 'dir', None)]
                dist.broadcast_object_list(shared, src=0)
                self.dir = shared[0]
        # A resumed run writes nothing (log line, config) until restore() has loaded every state.
        self.log = RunLog(self.dir, enabled=self.rank == 0, deferred=self.resuming)
        if not self.resuming:
            self.save_config()
        if note:
            self.log.print(note)
        seed_everything(cfg.seed)               # the same on every process: the same weights, streams, draws
        self.projected = False                  # the projected run time was printed (Progress)
        self.best = None                        # the best evaluation so far: {position, score, kept columns}
        self.last = None                        # the latest metrics row
        self.best_keys = ()                     # the columns kept with the best: (score, *keep)
        self.loss_reference = None              # the training loss at the run's first step (see LOSS_FACTOR)
        self.watch_loss = not self.resuming     # resumed: if its checkpoint has the reference (restore)
        self.timer = Timer(self.device)
        where = f'{self.dir} on {self.device}'
        if self.world > 1:
            where += (f', {self.world} processes ({self.backend}), batch {cfg.batch_size} per process = '
                      f'{cfg.batch_size * self.world} in all' + (', SyncBatchNorm' if cfg.sync_bn else ''))
        self.log.print(f'{"resuming" if self.resuming else "run"} {where}')
        self.stops = StopSignals(self.rank, self.world, self.device)

    def stop_if_asked(self, objects=None, at=0, **extra):
        """At a consistent point (a step boundary): if a stop was asked, save the checkpoint (objects and
        `extra`: position, streams, running Meters, passed as they are) unless objects is None (one was just
        written), and stop with the exact command that continues the run."""
        if not self.stops.requested(at):
            return
        if objects is not None:        # running sums (Meters): every process's, saved by the first
            self.save(objects, **{k: v.state_dict() if isinstance(v, Meters) else v for k, v in extra.items()})
        raise Stopped(f'stopped by {self.stops.name}; the checkpoint is written. Continue with: '
                      f'{self.resume_command()}', self.stops.signum)

    def resume_command(self):
        """The command that continues this run: under torchrun, on as many processes (see resumed_processes)."""
        if self.world == 1:
            return f'{python_command()} {self.script}.py --resume {self.dir}'
        per_node = int(os.environ.get('LOCAL_WORLD_SIZE', self.world))
        torchrun = torchrun_command()
        launch = (f'{torchrun} --standalone --nproc_per_node {self.world}' if per_node == self.world else
                  f'{torchrun} --nnodes {self.world // per_node} --node_rank R --master_addr HOST '
                  f'--nproc_per_node {per_node}')
        return f'{launch} {self.script}.py --resume {self.dir}'

    def config_record(self):
        """What config.json holds (the checkpoint carries it too): the options but the transient ones, the script,
        the number of processes and the global batch (batch_size per process times the processes)."""
        return {k: v for k, v in vars(self.cfg).items() if k not in TRANSIENT} | {
            'script': self.script, 'processes': self.world, 'global_batch': self.cfg.batch_size * self.world}

    def save_config(self):
        self.log.save_config(self.config_record())

    # ---- data streams and time ----

    def stream(self, k):
        """A device generator for stream k of this run (epoch k's shuffles, crops and flips)."""
        return device_generator(self.device, stream_seed(self.cfg.seed, k))

    def epochs(self, last_done, total):
        """Epochs last_done + 1 .. total - 1, each with its data stream; the timer restarts at each."""
        for epoch in range(last_done + 1, total):
            self.timer = Timer(self.device)
            yield epoch, self.stream(epoch)

    def progress(self, total, desc, done_before, run_total, images_per_step=None):
        """A Progress for the next `total` steps (see Progress); images_per_step defaults to the global batch."""
        images = images_per_step or self.cfg.batch_size * self.world
        return Progress(self, total, desc, images, done_before, run_total)

    def describe(self, nets, data, total_steps, unit='steps'):
        """The start line: what will run, where, on how much."""
        dtype = 'bf16 autocast' if self.cfg.amp else 'float32'
        if self.device.type == 'cuda' and not self.cfg.amp:
            dtype += (' (cuDNN convolutions may use TF32; --tf32 false: strict)' if torch.backends.cudnn.allow_tf32
                      else ' (strict: TF32 off)')
        params = sum(p.numel() for net in nets for p in net.parameters())
        sizes = ', '.join(f'{k} {v:,}' for k, v in data.items())
        self.log.print(f'will run {total_steps:,} {unit} on {self.device} ({dtype}), {self.world} process(es), '
                       f'{params:,} parameters; images: {sizes}')

    # ---- the epoch-based scripts (the MAXL paper's three) ----

    def end_epoch(self, objects, row, text):
        """evaluate_and_save with the best kept on test_acc, the printed line the original's
        'EPOCH: e ITER: s | <text> | <seconds>s', and the position (epoch, step) saved with the checkpoint."""
        return self.evaluate_and_save(objects, row, 'test_acc', lines=lambda improved: [
            f'EPOCH: {row["epoch"]:04d} ITER: {row["step"]:06d} | {text} | {row["seconds"]:.1f}s'],
            epoch=row['epoch'], step=row['step'])

    def finish_epochs(self, score='test_acc'):
        """The closing line of an epoch-based run."""
        if self.last is not None:
            self.log.print(f'done after {self.last["epoch"] + 1} epochs: test accuracy {self.last[score]:.4f}, '
                           f'best {self.best[score]:.4f}')
