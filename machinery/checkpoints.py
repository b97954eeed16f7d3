"""What a run writes and reads back, and how it fails: the checkpoint half of the run skeleton.

  save_checkpoint, load_checkpoint  tensors and plain values only, serialised in memory, loaded with
                                    weights_only=True; a damaged or foreign file is named as such
                                    (Checkpoints, train_sla's --eval_only, plot_features.py)
  load_run_checkpoint,              --resume: the checkpoint of this script and layout, the configuration
  read_run_config                   (config.json, or the copy the checkpoint carries: --restore_config)
                                    (utils.read_config)
  rng_state, set_rng_state          every random state, as tensors and plain values
  scale_learning_rates              `--resume RUN --lr X`: the saved rates scaled (utils.Run.restore)
  Checkpoints                       a member of utils.Run: checkpoint.pt, best.pt, the best evaluation

Used by utils.py and by the files named above.
"""
import io
import json
import os
import pickle
import random
import re
import shlex

import numpy as np
import torch
import torch.nn as nn

from .files import BEST, CHECKPOINT, atomic_write
from .options import TRANSIENT, UserError, python_command

FORMAT = 2        # checkpoint layout; 1 (no 'format' key) is the layout before the shared skeleton


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
    def serialise():
        # In memory first, then written as bytes: a failed write is then the OS's own error (torch's file
        # writer turns one into '[enforce fail at inline_container.cc] unexpected pos', errno lost).
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getbuffer()
    atomic_write(path, serialise)


def load_checkpoint(path, device='cpu'):
    """A checkpoint of this code: tensors and plain Python values only, loaded with weights_only=True,
    so a file from elsewhere cannot run code on load; anything else is refused (checkpoint_error)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file
        raise checkpoint_error(path, e) from None


ZIP_MAGIC = b'PK\x03\x04'          # torch.save's file format is a zip archive


def checkpoint_damage(path):
    """Why the file at `path` is not a whole checkpoint (empty, cut short, a part failing its checksum), or
    None when it is a complete file (of some other content)."""
    import pickletools
    import zipfile
    size = os.path.getsize(path)
    if size == 0:
        return 'it is empty (0 bytes)'
    with open(path, 'rb') as f:
        head = f.read(4)
    if head == ZIP_MAGIC or (len(head) < 4 and ZIP_MAGIC.startswith(head)):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return f'it ends part way ({size:,} bytes, without the end of its archive): cut short or overwritten'
        return f'its part {bad} fails its checksum' if bad else None
    try:                                       # not an archive: is it at least one whole pickle?
        with open(path, 'rb') as f:
            for _ in pickletools.genops(f):
                pass
    except Exception:
        return f'it ends part way ({size:,} bytes)'
    return None


def checkpoint_error(path, e):
    """The UserError for a checkpoint torch.load(weights_only=True) refused with `e`: damaged (say so, and
    what to do), or holding other Python objects (refused: loading it could run code). torch's own text,
    which advises weights_only=False, is never shown."""
    damage = checkpoint_damage(path) if os.path.isfile(path) else None
    folder, name = os.path.split(path)
    if damage:
        other = ''
        if name == CHECKPOINT:
            best = os.path.join(folder, BEST)
            try:
                kept = torch.load(best, map_location='cpu', weights_only=True) if os.path.isfile(best) else None
            except Exception:
                kept = None
            if kept is not None:
                at = ', '.join(f'{k} {v}' for k, v in list((kept.get('best') or {}).items())[:1])
                other = (f' {best} is whole: it holds the networks of the best evaluation ({at}) to evaluate or '
                         'start from, but not the optimiser and data-stream states needed to continue.')
        return UserError(f'{path} is damaged: {damage}. This code writes checkpoints whole (atomically), so it was '
                         'cut or changed afterwards (a copy interrupted, a disk error). Restore it from a copy of the '
                         f'run folder if you have one, or start a new run.{other} Nothing was written.')
    text = str(e)
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', text)
    what = f' (it names {found.group(1)})' if found else ''
    if found or isinstance(e, pickle.UnpicklingError):
        return UserError(f'{path} holds Python objects other than tensors and plain values{what}: refused, since '
                         'loading it could run code. A checkpoint written by this code never does: point --resume at '
                         'a run folder written by this code.')
    return UserError(f'cannot read {path} as a checkpoint of this code ({type(e).__name__}): it is a whole file, but '
                     'not one this code wrote. Point --resume at a run folder written by this code. Nothing was '
                     'written.')


def load_run_checkpoint(path, script, format):
    """The checkpoint of a run to resume: written by this code, in this layout, by this script."""
    ckpt = load_checkpoint(path)
    if ckpt.get('format') != format:
        raise UserError(f'{path} was written by an earlier version of this code (checkpoint format '
                        f'{ckpt.get("format", 1)}, now {format}): resume it with that version '
                        '(git checkout ff31508) or start a new run.')
    if ckpt.get('script') != script:
        raise UserError(f'{path} was written by {ckpt.get("script")}.py, not {script}.py: resume it '
                        f'with {shlex.join([python_command(), str(ckpt.get("script")) + ".py", "--resume", os.path.dirname(path)])}.')
    return ckpt


def read_run_config(run_dir, ckpt, restore, command):
    """The configuration of a run to resume: its config.json, or, when that is missing or damaged and
    `restore` (--restore_config) is given, the copy its checkpoint carries (a checkpoint from before that:
    best.pt's). Returns (config, where it came from or None, the problem with config.json or None); a
    damaged file without --restore_config is a UserError naming `command` (the one typed, plus the flag)."""
    path = os.path.join(run_dir, 'config.json')
    problem, config = None, None
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        problem = 'is missing'
    except (OSError, UnicodeDecodeError) as e:
        problem = f'cannot be read ({getattr(e, "strerror", None) or e})'
    else:
        try:
            config = json.loads(text) if text.strip() else None
        except ValueError as e:
            problem = f'is not valid JSON ({e})'
        if problem is None and not isinstance(config, dict):
            problem = 'is empty' if not text.strip() else 'does not hold a configuration (a JSON object)'
    if problem is None:
        if restore:
            raise UserError(f'--restore_config replaces a missing or damaged config.json, but {path} reads fine: '
                            'drop --restore_config.')
        return config, None, None
    kept, source = ckpt.get('config'), os.path.join(run_dir, CHECKPOINT)
    if not isinstance(kept, dict):                      # a checkpoint from before it carried the configuration
        kept, source = None, os.path.join(run_dir, BEST)
        try:
            best = load_checkpoint(source) if os.path.isfile(source) else {}
        except UserError:
            best = {}
        if isinstance(best.get('config'), dict):
            position = ', '.join(f'{k} {v}' for k, v in list((best.get('best') or {}).items())[:1])
            kept = {k: v for k, v in best['config'].items() if k not in TRANSIENT} | {'script': ckpt.get('script')}
            source += (f' (the configuration of its best evaluation{", " + position if position else ""}; '
                       'a value typed on a later --resume is not in it: check it)')
    if kept is None:
        raise UserError(f'cannot resume {run_dir}: its config.json {problem}, and no copy of the configuration is '
                        f'left: {CHECKPOINT} was written before checkpoints carried it, and {BEST} has '
                        'none either. Write config.json again by hand (a JSON object of the run\'s options, as in '
                        'the config.json of another run of this script, with this run\'s values), or start a new '
                        'run. Nothing was written.')
    if not restore:
        raise UserError(f'cannot resume {run_dir}: its config.json ({path}) {problem}. The run\'s configuration is '
                        f'also kept in {source}: continue with {command} --restore_config, which keeps the '
                        'damaged file as config.json.damaged and writes config.json again from that copy; or '
                        'start a new run. Nothing was written.')
    return kept, source, problem


def scale_learning_rates(optimizer, scheduler, factor):
    """Every learning rate of `optimizer` (and the base rates of its `scheduler`) times `factor`. The
    scheduler's own record of its last rate (get_last_lr) is left as it is: the scripts read the rate from
    the optimiser, and the scheduler sets both again at its next step."""
    for group in optimizer.param_groups:
        group['lr'] *= factor
        if 'initial_lr' in group:
            group['initial_lr'] *= factor
    if scheduler is not None:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


class Checkpoints:
    """The checkpoints of a run folder (a member of utils.Run): checkpoint.pt, every state, written at each
    evaluation and at a stop; best.pt, the networks at the best evaluation; and the best evaluation and the
    latest metrics row so far. Only the process that `writes` (the first under torchrun, where every process
    holds the same state) writes files."""

    def __init__(self, folder, script, writes=True):
        self.folder, self.script, self.writes = folder, script, writes
        self.best = None          # the best evaluation so far: {position, score, kept columns}
        self.last = None          # the latest metrics row
        self.best_keys = ()       # the columns kept with the best: (score, *keep)

    @property
    def path(self):
        return os.path.join(self.folder, CHECKPOINT)

    def save(self, objects, config, **extra):
        """Atomically save the state_dicts of `objects` (name -> network / optimiser / scheduler), the random
        states, the best evaluation, the configuration and `extra` (position, data-stream states, ...)."""
        if self.writes:
            save_checkpoint(self.path, format=FORMAT, script=self.script,
                            state={k: v.state_dict() for k, v in objects.items()}, rng=rng_state(), best=self.best,
                            last=self.last, best_keys=list(self.best_keys), config=config, **extra)

    def keep(self, row, score, keep=()):
        """Note an evaluation (`row`: its first column the position): the best is kept on row[score] (higher
        is better) with the columns `keep`. Returns whether it improved."""
        position = next(iter(row))
        self.last = row
        improved = self.best is None or row[score] > self.best[score]
        if improved:
            self.best = {k: row[k] for k in (position, score, *keep)}
        self.best_keys = (score, *keep)
        return improved

    def save_best(self, objects, row, config):
        """best.pt: the networks among `objects`, the best evaluation and its row."""
        if self.writes:
            nets = {k: v.state_dict() for k, v in objects.items() if isinstance(v, nn.Module)}
            save_checkpoint(os.path.join(self.folder, BEST), format=FORMAT, script=self.script, state=nets,
                            best=self.best, row=row, config=config)

    def restore(self, objects, checkpoint, typed=''):
        """Load `checkpoint` (a resumed run's, from load_run_checkpoint) into `objects`, the random states and the
        best evaluation; return its other entries (position, data-stream states, ...). `typed`: the values typed
        with --resume that differ from the run's (utils.changes_text), named when the networks do not fit."""
        try:
            for k, obj in objects.items():
                obj.load_state_dict(checkpoint['state'][k])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            if typed:
                raise UserError(f'{typed} typed with --resume: {self.path} does not fit the networks made with it '
                                f'({type(e).__name__}: {first}), and a resumed run keeps its networks. Drop it to '
                                'continue the run, or start a new run with it. Nothing was written.') from None
            raise UserError(f'{self.path} does not fit the networks of this run ({type(e).__name__}: {first}); it was '
                            'written with other settings (width, psi, mode, model, ...) than the ones in its '
                            'config.json. Nothing was written; start a new run instead.') from None
        set_rng_state(checkpoint['rng'])
        self.best, self.last = checkpoint['best'], checkpoint['last']
        self.best_keys = tuple(checkpoint.get('best_keys', ()))
        skip = ('format', 'script', 'state', 'rng', 'best', 'last', 'best_keys', 'config')
        return {k: v for k, v in checkpoint.items() if k not in skip}

    def metrics_row(self, row):
        """`row` with the best so far: best_<score> and best_<kept> columns."""
        return row | {f'best_{k}': self.best[k] for k in self.best_keys}

    def last_position(self):
        """'epoch 3' (the position of the last checkpoint written), or None when there is none yet."""
        if not os.path.isfile(self.path):
            return None
        saved = load_checkpoint(self.path)['last'] or {}
        return ', '.join(f'{k} {v}' for k, v in list(saved.items())[:1])
