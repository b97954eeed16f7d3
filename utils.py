"""The run skeleton the five scripts share: a training run from its command line to its last checkpoint.
A script's main reads: read_config (the configuration), its own checks, its data, Run (the run), its
networks, its loop; nothing here calls back into a script.

  read_config               the configuration: the command line over a resumed run's saved one (the names
                            typed known), checked (finite floats, allowed values)
  Run                       one run, made of members with their own state: processes and device
                            (distributed.Processes), folder and log (RunLog), checkpoints and resume
                            (checkpoints.Checkpoints), the divergence watch (Divergence), stops (StopSignals)
  run_main                  the entry of every command (the five scripts, create_dataset.py, results.py,
                            reproduce.py, plot_features.py): a UserError becomes a one-paragraph message and
                            exit code 2 (3: diverged; 128 + signal: stopped), no traceback
  Meters, Progress, Timer   the training loops: device-side sums, progress lines, times

Used by the five scripts (read_config, Run, Meters) and, for run_main, by every command. The networks are
in machinery/models.py, the data streams in machinery/streams.py, the checkpoint files in
machinery/checkpoints.py, several processes in machinery/distributed.py, the command line in
machinery/options.py.
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
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from machinery.checkpoints import (FORMAT, Checkpoints, load_run_checkpoint, read_run_config,
                                   scale_learning_rates)
from machinery.distributed import Processes, all_reduce_sum, distributed
from machinery.environment import changed, environment
from machinery.fast_paths import set_tf32
from machinery.files import (CHECKPOINT, atomic_write_text, hold_folder, read_metrics, release_folders, write_error,
                             write_lines)
from machinery.options import (RUN_OPTIONS, SAME_RUN, TRANSIENT, Diverged, Stopped, UserError, check_choices,
                               check_finite, parse_config, python_command, torchrun_command)
from machinery.streams import device_generator, stream_seed


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
    release_folders()                     # the run folder's lock (Run): this process is done writing it
    if dist.is_available() and dist.is_initialized():
        # Under torchrun, leave without tearing the process group down: a gloo group destroyed while a
        # peer is still closing its own sometimes aborts that peer ('terminate called without an active
        # exception', seen about once in ten 2-process runs here). Every file is written and closed.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


# ----------------------------------------------------------------------------------------------------
# The configuration
# ----------------------------------------------------------------------------------------------------

class Resumed(NamedTuple):
    """The run a --resume continues: its folder, its checkpoint (loaded), its saved configuration and, when
    --restore_config took that from the checkpoint, where from and what was wrong with config.json; the values
    typed that change what the run computes (name -> (saved, typed)), kept in cfg.history."""
    dir: str
    checkpoint: dict
    saved: dict
    source: str = None
    problem: str = None
    changes: dict = None


class CommandLine(NamedTuple):
    """What this command line says beyond the values: the names typed on it, and the run it resumes."""
    typed: set
    resumed: Resumed = None


def read_config(script, hyper, argv=None, description='', choices=None):
    """The configuration of a run of `script` (hyperparameters `hyper`, allowed values `choices`): the
    command line; on --resume, the run's saved configuration with the values typed on this command line
    over it (so `--resume RUN --epochs 300` extends a run). Every float must be finite and every value
    allowed (also a value a resumed run brings from its config.json). Returns (cfg, CommandLine)."""
    cfg, typed = parse_config(hyper, argv, description, choices)
    if cfg.restore_config and not cfg.resume:
        raise UserError('--restore_config rewrites the config.json of a run to continue: give it with --resume RUN.')
    resumed = None
    if cfg.resume:
        folder = resolve_run_dir(cfg.resume, cfg.logdir, script)
        checkpoint = load_run_checkpoint(os.path.join(folder, CHECKPOINT), script, FORMAT)
        words = sys.argv[1:] if argv is None else argv
        command = shlex.join([python_command(), f'{script}.py'] + [str(a) for a in words])
        saved, source, problem = read_run_config(folder, checkpoint, cfg.restore_config, command)
        cfg = argparse.Namespace(**{k: saved.get(k, v) for k, v in vars(cfg).items()} | {k: getattr(cfg, k) for k in typed})
        changes = resume_changes(cfg, typed, saved, checkpoint, folder)
        resumed = Resumed(folder, checkpoint, saved, source, problem, changes)
    check_finite(cfg, {k: v for k, (v, _) in RUN_OPTIONS.items()} | dict(hyper), typed,
                 os.path.join(resumed.dir, 'config.json') if resumed else '')
    check_choices(cfg, (choices or {}) | {'synthetic_size': ['small', 'full']})
    if os.path.exists(cfg.data_root) and not os.path.isdir(cfg.data_root):
        raise UserError(f'--data_root {cfg.data_root} is a file, not a folder: give the folder that holds the '
                        'dataset\'s files (or where --download puts them; the synthetic stand-in is written into '
                        '<data_root>/synthetic). Nothing was written.')
    if cfg.synthetic and cfg.download and 'download' in typed:
        raise UserError('--download fetches the official files, and --synthetic trains on the stand-in instead, '
                        'which needs no download: give one of the two. Nothing was written.')
    if cfg.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or run without '
                        '--tensorboard; metrics.csv holds the same numbers).')
    return cfg, CommandLine(typed, resumed)


def resume_changes(cfg, typed, saved, checkpoint, folder):
    """The values typed with --resume that change what the run computes: {name: (saved, typed)}. Another seed is
    refused (a run is one seed's: its weights, splits and streams); the others take effect from the checkpoint on
    and are added to cfg.history (config.json keeps it: [{'after': 'epoch 2', 'changed': {name: [saved, typed]}}],
    so results.py reports the run as a setting of its own). With --eval_only (nothing trained) nothing is."""
    history = list(saved.get('history') or [])
    if history:
        cfg.history = history
    if getattr(cfg, 'eval_only', False):
        return {}
    changes = {k: (saved[k], getattr(cfg, k)) for k in sorted(typed)
               if k in saved and k not in SAME_RUN and saved[k] != getattr(cfg, k)}
    if 'seed' in changes:
        old, new = changes['seed']
        raise UserError(f'--seed {new} typed with --resume: {folder} is the run of seed {old} (its weights, data '
                        f'splits and data streams come from it), and a run keeps its seed. Drop --seed to continue '
                        f'it, or start a new run of seed {new} in another folder. Nothing was written.')
    if changes:
        last = checkpoint.get('last') or {}
        position = next(iter(last), None)
        after = f'{position} {checkpoint.get(position, last.get(position))}' if position else 'the start'
        cfg.history = history + [{'after': after, 'changed': {k: list(v) for k, v in changes.items()}}]
    return changes


def changes_text(changes):
    """'--width 0.125 (the run's: 0.0625), --lr 0.001 (the run's: 0.01)'."""
    return ', '.join(f'--{k} {new} (the run\'s: {old})' for k, (old, new) in changes.items())


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# The run folder: config.json, log.txt, metrics.csv, checkpoint.pt, best.pt
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
    if os.path.isfile(os.path.join(path, CHECKPOINT)):
        raise UserError(f'{path!r} already holds a run (it has a {CHECKPOINT}): continue it with '
                        f'--resume {shlex.quote(path)}, or choose another folder.')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the run folder {path!r} ({e.strerror}); choose a writable place.') from None
    return path


def resolve_run_dir(resume, logdir, script):
    """--resume takes a run folder path or a run name under logs/<script>/."""
    candidates = list(dict.fromkeys((resume, os.path.join(logdir, script, resume))))
    for path in candidates:
        if os.path.isfile(os.path.join(path, CHECKPOINT)):
            return path
    for path in candidates:
        if os.path.isfile(os.path.join(path, 'config.json')):
            raise UserError(f'cannot resume {path!r}: that run never saved a checkpoint (it stopped before its '
                            'first epoch or evaluation ended), so there is nothing to continue: start it again '
                            'without --resume.')
    elsewhere = ''.join(f' nor in {c!r}' for c in candidates[1:])
    raise UserError(f'cannot resume {resume!r}: no {CHECKPOINT} there{elsewhere}. Give the run folder printed '
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
        if old and not old.endswith('\n'):        # a line cut part way stays a line of its own (read_metrics skips it)
            old += '\r\n'
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
        """metrics.csv as the checkpoint knows it (its last row `last_row`, best columns included): lines that are
        not whole rows skipped (a row cut part way, garbage: see read_metrics), rows after its position
        (written by a run killed after them, before its next checkpoint) dropped, its own row added if the kill
        came before it. Returns the note saying what changed, or None when nothing did."""
        if not self.enabled:
            return None
        position = next(iter(last_row))
        at = float(last_row[position])
        _, rows, skipped = read_metrics(self.csv_path)
        keep = [r for r in rows if float(next(iter(r.values()))) <= at]
        has_last = bool(keep) and float(next(iter(keep[-1].values()))) == at
        if has_last and len(keep) == len(rows) and not skipped:
            return None
        full = keep + ([] if has_last else [last_row])
        out = io.StringIO(newline='')
        writer = csv.DictWriter(out, fieldnames=list(full[-1]))
        writer.writeheader()
        writer.writerows(full)
        atomic_write_text(self.csv_path, out.getvalue())
        done = [f'line {n} skipped ({why})' for n, why in skipped]
        if len(keep) < len(rows):
            done.append(f'{len(rows) - len(keep)} row(s) after it dropped')
        if not has_last:
            done.append(f'its row of {position} {last_row[position]} written again')
        return f'note: metrics.csv brought back to the checkpoint ({position} {last_row[position]}): ' + '; '.join(done)

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

    watch: the name of the training loss (Divergence.meters sets it): the adds whose mean of it is above
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


class Projection:
    """The projected time of the whole run, printed once (into the log) from the first steps of its first
    stretch of work (see Progress)."""

    def __init__(self, log):
        self.log, self.printed = log, False

    def print(self, done, rate, images, left):
        self.printed = True
        self.log.print(f'after {done} steps: {1 / rate:.3f} s/step, {rate * images:.0f} images/s: '
                       f'about {duration(left)} for the rest of the run')


class Progress:
    """One stretch of work between two log lines (an epoch, an evaluation interval): on a terminal a
    tqdm bar (steps done / total, images/s, time left here and in the whole run); otherwise (a log file,
    CI) a plain line every `every` seconds, no control characters; nothing when not `enabled`. The first
    stretch of a run also has `projection` print, once, the projected time of the whole run."""

    def __init__(self, total, desc, images_per_step, done_before, run_total, projection, enabled=True, every=30.0):
        self.total, self.desc, self.images, self.projection, self.every = total, desc, images_per_step, projection, every
        self.done_before, self.run_total, self.done = done_before, run_total, 0
        self.start = self.last_line = time.perf_counter()
        self.enabled = enabled and total > 0
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
        if not self.projection.printed and (self.done == self.total or now - self.start >= 20):
            self.projection.print(self.done, rate, self.images, left_run)   # the end of the first stretch, or 20 s
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate * self.images:.0f} img/s, run {duration(left_run)} left', refresh=False)
            self.bar.update(n)
        elif now - self.last_line >= self.every:
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
    """The divergence watch of a run (a member of Run): a run whose loss or weights become non-finite, or blow
    up while finite (the training loss above LOSS_FACTOR times its first value in most steps between two
    evaluations, a weight beyond WEIGHT_BOUND), stops with exit code 3 before anything is evaluated or written
    from those weights, quoting the learning rate typed and advising a tenth of it, from the last checkpoint
    (`checkpoints`, continued with `resume_command`) or from the start.

    State: the training loss at the run's first step (kept in every checkpoint), and the optimisers whose rates
    the options set (`rates`: option -> (optimiser, scheduler) among a script's objects; Run.restore sets it)."""

    def __init__(self, cfg, device, checkpoints, resume_command, watch_loss=True):
        self.cfg, self.device, self.checkpoints, self.resume_command = cfg, device, checkpoints, resume_command
        self.watch_loss = watch_loss            # a resumed run: only if its checkpoint has the reference (restore)
        self.loss_reference = None              # the training loss at the run's first step (see LOSS_FACTOR)
        self.rates = {'lr': ('optimizer', 'scheduler')}

    def restore(self, checkpoint):
        """A resumed run's reference, from its checkpoint (one written before the loss check has none: the
        weights are checked, the loss is not)."""
        self.watch_loss = 'loss_reference' in checkpoint
        self.loss_reference = checkpoint.get('loss_reference')

    def meters(self, loss, state=None):
        """The Meters of the steps up to the next evaluation (or continued from `state`, saved by a run stopped
        between two), watching the training loss named `loss` (see LOSS_FACTOR; None: a script that logs no
        loss it trains on)."""
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

    def check_evaluation(self, objects, row):
        """At an evaluation (`row`, its first column the position): the weights of the networks among
        `objects` finite and within WEIGHT_BOUND, the row's losses and accuracies finite."""
        position = next(iter(row))
        where = f'{position} {row[position]}'
        named = [(f'{k}.{n}', p) for k, v in objects.items() if isinstance(v, nn.Module)
                 for n, p in v.named_parameters()]
        biggest = float(torch.stack([p.detach().abs().max().float() for _, p in named]).max())
        if not (math.isfinite(biggest) and biggest <= WEIGHT_BOUND):
            name, param = max(named, key=lambda np_: (not bool(torch.isfinite(np_[1]).all()),
                                                      float(np_[1].detach().abs().max().nan_to_num(math.inf))))
            if not math.isfinite(biggest):
                self.diverged(f'at {where} the weights became non-finite (first in {name})',
                              *self.rate_of(objects, param))
            self.diverged(f'at {where} a weight grew beyond {WEIGHT_BOUND:g} in absolute value ({biggest:.3g} in '
                          f'{name}; healthy weights stay of order 1)', *self.rate_of(objects, param))
        bad = [k for k, v in row.items() if ('loss' in k or k.endswith('acc')) and isinstance(v, float)
               and not math.isfinite(v)]
        if bad:
            self.diverged(f'at {where} the {", ".join(bad)} became non-finite', *self.rate_of(objects))

    def rate_of(self, objects, param=None):
        """(the rate now, its option) of the optimiser that trains `param` (default: the first one)."""
        for option, (name, _) in self.rates.items():
            optimizer = objects.get(name)
            if optimizer is not None and (param is None or any(p is param for g in optimizer.param_groups
                                                                 for p in g['params'])):
                return optimizer.param_groups[0]['lr'], option
        return None, 'lr'

    def diverged(self, what, lr=None, option='lr'):
        """Stop with exit code 3, quoting the rate typed (--`option`; `lr`: its value now, after any schedule)
        and advising a tenth of it: from the last checkpoint, or from the start when there is none."""
        typed = getattr(self.cfg, option, None)
        if typed is None:
            typed, option = lr, 'lr'
        rate = f'--{option} {typed:g} as typed' + (f'; {lr:g} by its schedule at this check' if lr is not None and
                                                   not math.isclose(lr, typed, rel_tol=1e-6) else '')
        lower = f'--{option} {typed / 10:g}'
        position = self.checkpoints.last_position()
        if position is not None:
            advice = (f'The last good checkpoint is {self.checkpoints.path} ({position}); continue from it with a lower '
                      f'learning rate, e.g. {self.resume_command} {lower}')
        else:
            advice = (f'No checkpoint was written yet; start again with a lower learning rate, e.g. {lower} '
                      f'(the folder {self.checkpoints.folder} holds only the configuration and log of this attempt)')
        raise Diverged(f'training diverged: {what} (learning rate: {rate}). Nothing was saved from these weights: '
                       f'{advice}.')


class Run:
    """One training run. Its members, each with its own state: `processes` (rank, world, device; the
    networks across processes), `log` (the run folder's log.txt, metrics.csv, config.json), `checkpoints`
    (checkpoint.pt, best.pt, the best evaluation), `watch` (the divergence checks) and `stops` (Ctrl-C and
    SIGTERM). The methods below are what a script's loop calls; each says which members it uses.

    A new run gets a new folder <logdir>/<script>/<run>/ (or --run_dir) holding config.json, log.txt,
    metrics.csv, checkpoint.pt (the latest state) and best.pt (the networks at the best evaluation). A resumed
    run (cli.resumed) reopens its folder and writes nothing until restore() has loaded every state.
    """

    def __init__(self, script, cfg, cli):
        self.script, self.cfg, self.typed, self.resumed = script, cfg, cli.typed, cli.resumed
        self.resuming = self.resumed is not None
        set_tf32(cfg.tf32)
        self.processes = Processes(cfg)
        self.device, self.rank, self.world, self.shard = (self.processes.device, self.processes.rank,
                                                          self.processes.world, self.processes.shard)
        note = None
        if self.resuming:                       # refused on another global batch: nothing written
            note = self.processes.resumed_processes((self.resumed.checkpoint.get('config') or {}).get('processes'),
                                                    self.resumed.saved.get('batch_size'), cfg.batch_size)
            self.dir = self.resumed.dir
        else:
            self.dir = self._new_folder()
        taken = None
        if self.rank == 0:                      # one writer per run folder (under torchrun the first process writes)
            taken = hold_folder(self.dir, 'this run folder', f'continue it with {self.resume_command()}')
        self.log = RunLog(self.dir, enabled=self.rank == 0, deferred=self.resuming)
        self.environment = environment(self.device)      # what decides the numbers besides the options
        self.checkpoints = Checkpoints(self.dir, script, writes=self.rank == 0)
        self.watch = Divergence(cfg, self.device, self.checkpoints, self.resume_command(), watch_loss=not self.resuming)
        if not self.resuming:
            self.log.save_config(self.config_record())
        for line in (taken, note):
            if line:
                self.log.print(line)
        different = changed(self.saved_config.get('environment'), self.environment) if self.resuming else []
        if different:                           # said once, at the resume
            self.log.print('note: this run continues with ' + ', '.join(f'{k} {now} (it started with {then})'
                                                                    for k, then, now in different)
                           + ': the continuation is not bit-exact (a sum over threads or kernels adds in another '
                           'order)' + (f'; OMP_NUM_THREADS={different[0][1]} continues it exactly on this machine'
                                       if [k for k, _, _ in different] == ['threads'] else '') + '.')
        seed_everything(cfg.seed)               # the same on every process: the same weights, streams, draws
        self.projection = Projection(self.log)
        self.timer = Timer(self.device)
        where = f'{self.dir} on {self.device}'
        if self.world > 1:
            where += (f', {self.world} processes ({self.processes.backend}), batch {cfg.batch_size} per process = '
                      f'{cfg.batch_size * self.world} in all' + (', SyncBatchNorm' if cfg.sync_bn else ''))
        self.log.print(f'{"resuming" if self.resuming else "run"} {where}')
        self.stops = StopSignals(self.rank, self.world, self.device)

    def _new_folder(self):
        """The first process makes the folder and tells the others."""
        cfg = self.cfg
        folder = None
        if self.rank == 0:
            folder = open_run_dir(cfg.run_dir) if cfg.run_dir else make_run_dir(cfg.logdir, self.script, cfg.run_name)
        if self.world > 1:
            shared = [folder]
            dist.broadcast_object_list(shared, src=0)
            folder = shared[0]
        return folder

    @property
    def saved_config(self):
        """A resumed run's configuration as it was saved ({} for a new run)."""
        return self.resumed.saved if self.resuming else {}

    @property
    def best(self):
        return self.checkpoints.best

    # ---- the processes ----

    def network(self, net, methods=('forward',)):
        """`net` on the run's device, ready for its processes and fast paths (distributed.Processes.network)."""
        return self.processes.network(net, methods)

    def wrap(self, net):
        """The training forward of `net`: under torchrun its next backward averages the gradients."""
        return self.processes.wrap(net)

    def sync_buffers(self, *nets):
        self.processes.sync_buffers(*nets)

    def share(self, rows):
        return self.processes.share(rows)

    # ---- checkpoints and resume ----

    def restore(self, objects, rates=None, **defaults):
        """On --resume: load every state into `objects` (name -> network / optimiser / scheduler), the random
        states, the best evaluation and the loss reference, and return `defaults` updated with the saved
        extras (position, data-stream states). `rates`: option -> (optimiser, scheduler) among `objects`
        (default {'lr': ('optimizer', 'scheduler')}): a rate typed with --resume scales the saved ones, and a
        divergence names the option of the optimiser it concerns. On a new run: `defaults`."""
        if rates:
            self.watch.rates = rates
        if not self.resuming:
            return defaults
        checkpoint, self.resumed = self.resumed.checkpoint, self.resumed._replace(checkpoint=None)
        changes = self.resumed.changes or {}
        extras = self.checkpoints.restore(objects, checkpoint, changes_text(changes))
        self.watch.restore(checkpoint)
        extras.pop('loss_reference', None)
        for option, (optimizer, scheduler) in self.watch.rates.items():   # --resume RUN --lr X: saved rates x X / old
            old, new = self.saved_config.get(option), getattr(self.cfg, option, None)
            if option in self.typed and old and old != new and optimizer in objects:
                scale_learning_rates(objects[optimizer], objects.get(scheduler), new / old)
                self.log.print(f'note: --{option} {new:g} scales the saved learning rates by {new / old:g}')
        kept = ''
        if self.resumed.source:                   # --restore_config: the damaged file kept beside the new one
            path = os.path.join(self.dir, 'config.json')
            if os.path.exists(path):
                kept = next(f'{path}.damaged{f"-{k}" if k else ""}' for k in range(1000)
                            if not os.path.exists(f'{path}.damaged{f"-{k}" if k else ""}'))
                os.replace(path, kept)
        self.log.save_config(self.config_record())      # the state fits: now the resumed run may write
        self.log.commit()
        if self.resumed.source:
            self.log.print(f'note: config.json {self.resumed.problem}: restored from {self.resumed.source}'
                           + (f'; the damaged file is kept as {kept}' if kept else ''))
        last = self.checkpoints.last
        repaired = last is not None and self.log.reconcile(self.checkpoints.metrics_row(last))
        if repaired:
            self.log.print(repaired)
        if changes:
            self.log.print(f'note: typed with --resume, {changes_text(changes)}: in effect after '
                           f'{self.cfg.history[-1]["after"]}; config.json\'s history records it, and results.py '
                           'reports this run as a setting of its own')
        return defaults | extras

    def save(self, objects, **extra):
        """checkpoint.pt now: every state of `objects`, the random states, the best evaluation, `extra`."""
        self.checkpoints.save(objects, self.config_record(), loss_reference=self.watch.loss_reference, **extra)

    def evaluate_and_save(self, objects, row, score, keep=(), **extra):
        """The end of an epoch or evaluation interval. `row`: the metrics (plain numbers, accuracies as
        fractions), its first column the position (epoch, iteration or step). The weights and the row are
        checked (watch), the best evaluation is kept on row[score] (higher is better) with the columns `keep`,
        best.pt is written when it improved, checkpoint.pt always (every object, the random states, `extra`),
        and the row is appended to metrics.csv with best_<score> and best_<kept> columns. Returns whether
        the score improved (the script prints its lines after)."""
        self.watch.check_evaluation(objects, row)
        improved = self.checkpoints.keep(row, score, keep)
        # best.pt, then checkpoint.pt, then the metrics row: a run killed between two of these writes is
        # resumed from checkpoint.pt, and restore() brings metrics.csv back in line with it.
        if improved:
            self.checkpoints.save_best(objects, row, vars(self.cfg))
        self.save(objects, **extra)
        self.log.metrics(self.checkpoints.metrics_row(row))
        if self.cfg.tensorboard:
            self.log.tensorboard(self.checkpoints.metrics_row(row))
        return improved

    def config_record(self):
        """What config.json holds (the checkpoint carries it too): the options but the transient ones, the script,
        the number of processes, the global batch (batch_size per process times the processes) and what else
        decides the numbers (machinery.environment): `environment` of the first start, `environment_resumed`
        of each later one."""
        first = self.saved_config.get('environment') if self.resuming else None
        later = list(self.saved_config.get('environment_resumed', [])) + ([self.environment] if first else [])
        return {k: v for k, v in vars(self.cfg).items() if k not in TRANSIENT} | {
            'script': self.script, 'processes': self.world, 'global_batch': self.cfg.batch_size * self.world,
            'environment': first or self.environment} | ({'environment_resumed': later} if later else {})

    # ---- the divergence watch ----

    def meters(self, loss, state=None):
        """Divergence.meters: the Meters up to the next evaluation, watching the training loss named `loss`."""
        return self.watch.meters(loss, state)

    def check_finite(self, meters, first_step, lr, unit='step', option='lr'):
        """Divergence.check_finite: stop (exit code 3) before anything is evaluated or saved from diverged weights."""
        self.watch.check_finite(meters, first_step, lr, unit, option)

    # ---- stops ----

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
            return shlex.join([python_command(), f'{self.script}.py', '--resume', self.dir])
        per_node = int(os.environ.get('LOCAL_WORLD_SIZE', self.world))
        torchrun = shlex.quote(torchrun_command())
        launch = (f'{torchrun} --standalone --nproc_per_node {self.world}' if per_node == self.world else
                  f'{torchrun} --nnodes {self.world // per_node} --node_rank R --master_addr HOST '
                  f'--nproc_per_node {per_node}')
        return f'{launch} {self.script}.py --resume {shlex.quote(self.dir)}'

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
        return Progress(total, desc, images, done_before, run_total, self.projection,
                        enabled=self.cfg.progress and self.rank == 0, every=self.cfg.progress_every)

    def interval(self, position, every, total, unit='step', images_per_step=None):
        """A Progress for the steps from `position` to the next evaluation (every `every` steps and at `total`)."""
        end = min(total, (position // every + 1) * every)
        return self.progress(end - position, f'to {unit} {end}', position, total, images_per_step)

    # ---- the files a run keeps ----

    def keep_lists(self, lists):
        """The lists a new run keeps in its folder (file name -> values, one a line: its splits, classes, labels)
        so that --resume reads them back instead of drawing them again; written by the first process (every
        process drew the same). Returns where they are, for the log."""
        if self.rank == 0 and not self.resuming:
            for name, values in lists.items():
                write_lines(os.path.join(self.dir, name), values)
        return ', '.join(os.path.join(self.dir, name) for name in lists)

    def note_bad_images(self, bad, since):
        """The images a file-streamed dataset could not decode `since` the last note (each replaced by another
        image of its batch): how many, and the first."""
        if bad:
            self.log.print(f'note: {len(bad)} image(s) could not be decoded since the last {since} and were replaced '
                           f'by another image of their batch; first: {bad[0][0]} ({bad[0][1]})')

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
