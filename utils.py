"""The run skeleton every script shares: one training run from the command line to its last checkpoint.

  run_main                      every script's entry: a UserError (options.py) becomes a one-paragraph
                                message and exit code 2 (3: diverged; 128 + signal: stopped), no traceback
  Run                           every script: configuration (options.parse_config), processes and device
                                (distributed.Processes), run folder, log, metrics, best.pt / checkpoint.pt,
                                resume, Ctrl-C / SIGTERM, divergence checks, the start line
  Meters, Progress, Timer       the training loops: device-side sums, progress lines, epoch times
  stream_seed, device_generator the data streams (create_dataset, large_datasets, the scripts)
  atomic_write, RunLog,         the run folder's files, written atomically; checkpoints hold tensors and
  save/load_checkpoint          plain values only and load with weights_only=True
  python_command                the Python to name in a printed command (.venv/bin/python in this project)

The networks are in models.py, the fast paths in fast_paths.py, several processes in distributed.py.
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
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import Processes, all_reduce_sum, distributed
from fast_paths import set_tf32
from options import TRANSIENT, Diverged, Stopped, UserError, check_choices, parse_config


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


def python_command():
    """The Python to name in a command printed for the user: a virtual environment's interpreter by its
    path from the working directory (.venv/bin/python in this project), else `python`."""
    if sys.prefix == sys.base_prefix:
        return 'python'
    path = os.path.relpath(sys.executable)
    return sys.executable if path.startswith('..') else path


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


def write_error(path, e):
    return UserError(f'cannot write {path} ({e.strerror or e}, errno {e.errno}): the previous file, if any, is '
                     'unchanged. Free space or fix the permissions of that folder (or choose another with '
                     '--logdir / --run_dir), then continue with --resume.')


def atomic_write(path, write):
    """write(f) into a temporary file, flush and fsync it, rename it over `path` and fsync the folder:
    readers see the old or the new file, never half of one, also after a power cut. On an OSError (disk
    full, permissions, read-only filesystem) the temporary file is removed, the old file is untouched,
    and a UserError names the path and the cause."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:               # also Ctrl-C: never leave a half-written temporary file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        if isinstance(e, RuntimeError):      # torch.save reports a failed write as a RuntimeError
            raise write_error(path, OSError(getattr(e, 'errno', None), str(e).splitlines()[0])) from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


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


def rng_state():
    """The random states as tensors and plain values (so checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(state['python'][:1]) + (tuple(state['python'][1]),) + tuple(state['python'][2:]))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())       # a checkpoint loaded onto the device moved these
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def save_checkpoint(path, **state):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device='cpu'):
    """A checkpoint of this code: tensors and plain Python values only, loaded with weights_only=True,
    so a file from elsewhere cannot run code on load; anything else is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read checkpoint {path!r} as tensors and plain values only ({type(e).__name__}: '
                        f'{first}). A checkpoint written by this code always can; a file that holds other '
                        'Python objects is refused, since loading it could run code. Point --resume at a run '
                        'folder written by this code.') from None


def load_run_checkpoint(path, script, format):
    """The checkpoint of a run to resume: written by this code, in this layout, by this script."""
    ckpt = load_checkpoint(path)
    if ckpt.get('format') != format:
        raise UserError(f'{path} was written by an earlier version of this code (checkpoint format '
                        f'{ckpt.get("format", 1)}, now {format}): resume it with that version '
                        '(git checkout ff31508) or start a new run.')
    if ckpt.get('script') != script:
        raise UserError(f'{path} was written by {ckpt.get("script")}.py, not {script}.py: resume it '
                        f'with {python_command()} {ckpt.get("script")}.py --resume {os.path.dirname(path)}.')
    return ckpt


def scale_learning_rates(optimizer, scheduler, factor):
    """Every learning rate of `optimizer` (and the base rates of its `scheduler`) times `factor`."""
    for group in optimizer.param_groups:
        group['lr'] *= factor
        if 'initial_lr' in group:
            group['initial_lr'] *= factor
    if scheduler is not None:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        scheduler._last_lr = [group['lr'] for group in optimizer.param_groups]


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


class Meters:
    """Named running sums kept on the device (no host read inside a training loop). add(n, name=sum
    over n samples, ...); means() divides each by its sample count and reads them all at once. The
    first add that brought a non-finite value is noted on the device too (first_non_finite())."""

    NONE = 2 ** 62

    def __init__(self):
        self.sums, self.counts, self.adds, self.first_bad, self.names, self.index = {}, {}, 0, None, [], {}

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
        process calls it, as Run.stop_if_asked does), since the first process alone writes the checkpoint."""
        sums, counts, first_bad = dict(self.sums), dict(self.counts), self.first_bad
        if distributed() and sums:
            sums = {k: all_reduce_sum(v.clone()) for k, v in sums.items()}
            total = all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64, device=first_bad.device))
            counts = dict(zip(counts, (int(c) for c in total.tolist())))
            first_bad = first_bad.clone()
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        return {'sums': sums, 'counts': counts, 'adds': self.adds, 'first_bad': first_bad, 'names': list(self.names)}

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


class Run(Processes):
    """One training run: its configuration, processes and device (Processes), folder, log, checkpoints,
    resume, stops and divergence checks.

    A new run gets a new folder <logdir>/<script>/<run>/ (or --run_dir) holding config.json, log.txt,
    metrics.csv, checkpoint.pt (the latest state) and best.pt (the networks at the best evaluation).
    `--resume RUN` reopens a folder: the saved configuration is used, except the values typed on this
    command line (so `--resume RUN --epochs 300` extends a run), and restore() brings back every state.
    """

    CHECKPOINT, BEST = 'checkpoint.pt', 'best.pt'
    FORMAT = 2        # checkpoint layout; 1 (no 'format' key) is the layout before the shared skeleton

    def __init__(self, script, hyper, argv=None, description='', validate=None, choices=None, presets=None):
        self.script = script
        cfg, given = parse_config(hyper, argv, description, choices)
        self.resuming = bool(cfg.resume)
        if presets is not None and not self.resuming:
            presets(cfg, given)                 # a dataset's own defaults, for the values not typed
        if self.resuming:
            self.dir = resolve_run_dir(cfg.resume, cfg.logdir, script)
            self._resumed = load_run_checkpoint(os.path.join(self.dir, self.CHECKPOINT), script, self.FORMAT)
            with open(os.path.join(self.dir, 'config.json')) as f:
                self.saved_config = json.load(f)
            merged = {k: self.saved_config.get(k, v) for k, v in vars(cfg).items()}
            cfg = argparse.Namespace(**merged | {k: getattr(cfg, k) for k in given})
        check_choices(cfg, (choices or {}) | {'synthetic_size': ['small', 'full']})
        if validate is not None:
            validate(cfg)                       # bad values stop here, before anything is written
        if cfg.tensorboard and importlib.util.find_spec('tensorboard') is None:
            raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or run '
                            'without --tensorboard; metrics.csv holds the same numbers).')
        self.cfg, self.given = cfg, given
        set_tf32(cfg.tf32)
        self.device = self.start_processes(cfg)
        note = (self.resumed_processes(self._resumed.get('processes'), self.saved_config.get('batch_size'),
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
        launch = (f'torchrun --standalone --nproc_per_node {self.world}' if per_node == self.world else
                  f'torchrun --nnodes {self.world // per_node} --node_rank R --master_addr HOST '
                  f'--nproc_per_node {per_node}')
        return f'{launch} {self.script}.py --resume {self.dir}'

    def save_config(self):
        self.log.save_config({k: v for k, v in vars(self.cfg).items() if k not in TRANSIENT} | {'script': self.script})

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

    # ---- checkpoints ----

    @property
    def checkpoint_path(self):
        return os.path.join(self.dir, self.CHECKPOINT)

    def save(self, objects, **extra):
        """Atomically save the state_dicts of `objects` (name -> network/optimiser/scheduler), the RNG
        states, the best evaluation and `extra` (position, data-stream state, ...). Only the first process
        writes (every process holds the same state)."""
        if self.rank != 0:
            return
        save_checkpoint(self.checkpoint_path, format=self.FORMAT, script=self.script,
                        state={k: v.state_dict() for k, v in objects.items()}, rng=rng_state(), best=self.best,
                        last=self.last, best_keys=list(self.best_keys), processes=self.world, **extra)

    def restore(self, objects, **defaults):
        """On --resume: load the state_dicts into `objects`, the RNG states and the best evaluation, and
        return `defaults` updated with the saved extras. On a new run: return `defaults`."""
        if not self.resuming:
            return defaults
        ckpt, self._resumed = self._resumed, None
        try:
            for k, obj in objects.items():
                obj.load_state_dict(ckpt['state'][k])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise UserError(f'{self.checkpoint_path} does not fit the networks of this run ({type(e).__name__}: '
                            f'{first}); it was written with other settings (width, psi, mode, model, ...) than '
                            'the ones in its config.json. Nothing was written; start a new run instead.') from None
        set_rng_state(ckpt['rng'])
        self.best, self.last, self.best_keys = ckpt['best'], ckpt['last'], tuple(ckpt.get('best_keys', ()))
        old_lr = self.saved_config.get('lr')          # --resume RUN --lr X: the saved rates times X / old
        if 'lr' in self.given and old_lr and old_lr != self.cfg.lr and 'optimizer' in objects:
            scale_learning_rates(objects['optimizer'], objects.get('scheduler'), self.cfg.lr / old_lr)
            self.log.print(f'note: --lr {self.cfg.lr:g} scales the saved learning rates by {self.cfg.lr / old_lr:g}')
        self.save_config()                       # the state fits: now the resumed run may write
        self.log.commit()
        if self.last is not None and self.log.reconcile(self.metrics_row(self.last)):
            position = next(iter(self.last))
            self.log.print(f'note: metrics.csv brought back to the checkpoint ({position} {self.last[position]})')
        skip = ('format', 'script', 'state', 'rng', 'best', 'last', 'best_keys', 'processes')
        return defaults | {k: v for k, v in ckpt.items() if k not in skip}

    def evaluate_and_save(self, objects, row, score, keep=(), lines=None, **extra):
        """The end of an epoch or evaluation interval. `row`: the metrics (plain numbers, accuracies as
        fractions), its first column the position (epoch, iteration or step). The best evaluation is
        kept on row[score] (higher is better) with the columns `keep`; then the lines of
        `lines(improved)` are printed, the row is appended to metrics.csv with best_<score> and
        best_<kept> columns, best.pt is written when the score improved (the networks among `objects`),
        and checkpoint.pt always (every object, RNG states, the best, `extra`). Returns `improved`."""
        position = next(iter(row))
        nets = [v for v in objects.values() if isinstance(v, nn.Module)]
        finite = torch.stack([torch.isfinite(p).all() for net in nets for p in net.parameters()]).all()
        bad = [k for k, v in row.items() if ('loss' in k or k.endswith('acc')) and isinstance(v, float)
               and not math.isfinite(v)]
        if not bool(finite) or bad:
            lr = next((g['lr'] for v in objects.values() if isinstance(v, torch.optim.Optimizer)
                       for g in v.param_groups), float('nan'))
            self.diverged(f'at {position} {row[position]} the ' + ('weights' if not bool(finite) else ', '.join(bad))
                          + ' became non-finite', lr)
        self.last = row
        improved = self.best is None or row[score] > self.best[score]
        if improved:
            self.best = {k: row[k] for k in (position, score, *keep)}
        for line in (lines(improved) if lines else ()):
            self.log.print(line)
        self.best_keys = (score, *keep)
        # best.pt, then checkpoint.pt, then the metrics row: a run killed between two of these writes is
        # resumed from checkpoint.pt, and restore() brings metrics.csv back in line with it.
        if improved and self.rank == 0:
            nets = {k: v.state_dict() for k, v in objects.items() if isinstance(v, nn.Module)}
            save_checkpoint(os.path.join(self.dir, self.BEST), format=self.FORMAT, script=self.script, state=nets,
                            best=self.best, row=row, config=vars(self.cfg))
        self.save(objects, **extra)
        self.log.metrics(self.metrics_row(row))
        if self.cfg.tensorboard:
            self.log.tensorboard(self.metrics_row(row))
        return improved

    def metrics_row(self, row):
        return row | {f'best_{k}': self.best[k] for k in self.best_keys}

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

    # ---- divergence ----

    def check_finite(self, meters, first_step, lr, unit='step'):
        """Stop the run (exit code 3) if `meters` saw a non-finite value: before anything is evaluated or
        written from these weights. first_step: the step of the meters' first add."""
        found = meters.first_non_finite()
        if found:
            k, name = found
            self.diverged(f'the training {name} became non-finite at {unit} {first_step + k}', lr)

    def diverged(self, what, lr):
        ckpt = self.checkpoint_path
        if os.path.isfile(ckpt):
            saved = load_checkpoint(ckpt)['last'] or {}
            where = ', '.join(f'{k} {v}' for k, v in list(saved.items())[:1])
            advice = (f'The last good checkpoint is {ckpt} ({where}); continue from it with a lower learning rate, '
                      f'e.g. {self.resume_command()} --lr {lr / 10:g}')
        else:
            advice = (f'No checkpoint was written yet; start again with a lower learning rate, e.g. --lr {lr / 10:g} '
                      f'(the folder {self.dir} holds only the configuration and log of this attempt)')
        raise Diverged(f'training diverged: {what} (learning rate {lr:g}). Nothing was saved from these weights: '
                       f'{advice}.')

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
