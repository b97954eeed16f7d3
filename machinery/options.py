"""The command line every script shares, and the errors a user can fix.

  errors          UserError (exit code 2), Diverged (3), Stopped (128 + signal)   every file: a bad input is a
                                                                                   UserError; utils.run_main prints it
  run options     RUN_OPTIONS, ALIASES, TRANSIENT, spellings                       utils.read_config and utils.Run: the
                                                                                   options of every script; every
                                                                                   tool's flags (spellings)
  hyperparameters hyperparameters, parse_config, parse_bool                        each script's plain values at its top;
                                                                                   utils.read_config, benchmarks/bench.py
  checks          check_positive, stand_in; check_finite, check_choices            the scripts (check, their data);
                                                                                   utils.read_config
  python_command  python_command, torchrun_command: the Python (and torchrun) to   every message that prints a command
                  name in a printed command

Plain Python (argparse); nothing here imports torch or another file of this project.
"""
import argparse
import math
import os
import re
import sys


def python_command():
    """The Python to name in a command printed for the user: a virtual environment's interpreter by its
    path from the working directory (.venv/bin/python in this project), else `python`."""
    if sys.prefix == sys.base_prefix:
        return 'python'
    path = os.path.relpath(sys.executable)
    return sys.executable if path.startswith('..') else path


def torchrun_command():
    """The torchrun to name in a printed command: the one beside python_command()'s interpreter
    (.venv/bin/torchrun in this project), else `torchrun`."""
    folder = os.path.dirname(python_command())
    return os.path.join(folder, 'torchrun') if folder else 'torchrun'


# ----------------------------------------------------------------------------------------------------
# Errors a user can fix: printed as one paragraph, exit code 2, no traceback
# ----------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A bad input the user can fix (missing file, wrong md5, bad hyperparameter, ...): exit code 2."""
    exit_code = 2


class Diverged(UserError):
    """Training produced a non-finite loss or weights: exit code 3."""
    exit_code = 3


class Stopped(UserError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint: exit code 130 or 143."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


# ----------------------------------------------------------------------------------------------------
# Hyperparameters: plain values at the top of each script, and the run options every script shares
# ----------------------------------------------------------------------------------------------------

# The run options of every script, declared once: name -> (default, help). A script gives one another
# default by assigning it at its top with its hyperparameters (train_sla.py: `batch_size = 128`).
RUN_OPTIONS = {
    'data_root': ('dataset', 'data root: the official files (the synthetic stand-in lives in <data_root>/synthetic)'),
    'batch_size': (100, 'images per step'),
    'seed': (0, 'seeds the weights, the data splits and the data streams'),
    'device': ('auto', "auto, cpu, cuda, cuda:N or mps (the original's --gpu means cuda)"),
    'amp': (False, "fast path: bf16 autocast (off: the papers' float32)"),
    'channels_last': (False, 'fast path: channels-last memory format'),
    'compile': (False, 'fast path: torch.compile the forward passes'),
    'tf32': (True, "CUDA float32: true leaves PyTorch's default (cuDNN convolutions may use TF32 tensor cores, "
                   'matmuls stay float32); false: strict float32 (TF32 off for convolutions and matmuls)'),
    'synthetic': (False, 'train on the synthetic stand-in instead of the real dataset'),
    'synthetic_size': ('small', "small: the quick stand-in; full: the real datasets' sizes (CIFAR 50,000 / 10,000, "
                                'SVHN 73,257 / 26,032), in <data_root>/synthetic-full'),
    'download': (False, 'fetch the official files (md5-checked) if they are not in data_root'),
    'logdir': ('logs', 'runs go to <logdir>/<script>/<run_name>/'),
    'run_name': ('', 'name of the run folder (default: the date and time)'),
    'run_dir': ('', 'the run folder itself, instead of <logdir>/<script>/<run_name>'),
    'resume': ('', 'a run folder (or a run name under <logdir>/<script>/) to continue from its checkpoint'),
    'restore_config': (False, "with --resume: when the run's config.json is missing or damaged, take its "
                              'configuration from checkpoint.pt (the damaged file kept as config.json.damaged)'),
    'progress': (True, 'a progress line between log lines (a tqdm bar on a terminal, plain lines otherwise)'),
    'progress_every': (30.0, 'seconds between plain progress lines when the output is not a terminal'),
    'tensorboard': (False, 'also write every logged number as a TensorBoard scalar into the run folder'),
    'sync_bn': (False, 'under torchrun: batch norm over the global batch (SyncBatchNorm) instead of each process\'s'),
    'dist_backend': ('auto', 'under torchrun: auto (nccl on CUDA, gloo on CPU), nccl or gloo'),
    'dist_timeout': (30, 'under torchrun: minutes a collective may wait for the other processes before the job stops'),
    'local_rank': (-1, 'set by torch.distributed.launch (--local-rank=K); read from LOCAL_RANK otherwise'),
}


# The originals' spellings of one setting, accepted wherever a script has that setting, so their
# command lines run unchanged. `--name-with-dashes` is accepted for every name anyway.
ALIASES = {
    'data_root': ['--datadir', '--data-path', '--data_path', '--data'],
    'batch_size': ['--batchsize'],
    'weight_decay': ['--wd'],
    'total_steps': ['--num-iterations', '--num_iterations'],
    'eval_every': ['--val-freq', '--val_freq', '--test-freq', '--test_freq'],
    'run_dir': ['--save-path', '--save_path'],
    'architecture': ['-a'],
    'temperature': ['--T'],
}


# The run options that say where or how a run ran, not what it computed: runs differing only in these (and
# the seed, and what each script's unused_options() names) are one setting (results.py).
NOT_SETTING = {'seed', 'script', 'run_name', 'run_dir', 'logdir', 'resume', 'device', 'data_root', 'download',
               'local_rank', 'dist_backend', 'dist_timeout', 'global_batch', 'progress', 'progress_every',
               'tensorboard', 'environment', 'environment_resumed'}


# Typed with --resume, these leave a run one setting (read_config): where and how it runs, its budget
# (--epochs, --total_steps extend it, as each script says), the lists a resumed run reads back from its folder,
# the batch per process (another global batch is refused: distributed.Processes.resumed_processes). Another
# value typed is noted and kept in config.json's history; another seed is refused.
SAME_RUN = (NOT_SETTING - {'seed'}) | {'epochs', 'total_steps', 'class_list', 'val_indices', 'label_list',
                                      'restore_config', 'eval_only', 'batch_size'}

# Options that act on one invocation only: never saved in config.json, so never inherited by --resume.
TRANSIENT = ('resume', 'eval_only', 'local_rank', 'restore_config')


def spellings(name):
    """Every spelling of a setting on a command line of this repository: --name, --name-with-dashes and
    the originals' (ALIASES). The scripts, create_dataset.py, results/plot tools and the benchmarks all
    take their flags through this, so one setting has the same names everywhere."""
    return [f'--{name}'] + ([f'--{name.replace("_", "-")}'] if '_' in name else []) + ALIASES.get(name, [])


def _parse_int_list(text):
    """'5,5,5', '[2, 3, 4]' or '5x20' (twenty fives) -> list of ints."""
    clean = text.strip().strip('[]()').replace(' ', '')
    try:
        if 'x' in clean and ',' not in clean:
            value, count = clean.split('x')
            return [int(value)] * int(count)
        return [int(v) for v in clean.split(',') if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a list of integers such as 5,5,5 or [2,3,4] or 5x20 '
                                          f'(twenty fives), got {text!r}') from None


def parse_bool(text):
    low = str(text).lower()
    if low in ('1', 'true', 'yes', 'on'):
        return True
    if low in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


class Hyperparameters(dict):
    """name -> default value, plus .helps: name -> the comment written after it in the script."""
    helps = {}


def _is_hyperparameter(name, value):
    return (name.islower() and not name.startswith('_') and type(value) in (bool, int, float, str, list)
            and all(type(v) is int for v in (value if type(value) is list else [])))


def hyperparameters(namespace):
    """A script's hyperparameters: every plain lowercase value (bool, int, float, str, list of ints)
    defined in `namespace` (the script's globals() right after its block of values), with the comment
    that follows each on its line as its --help text."""
    out = Hyperparameters((k, v) for k, v in namespace.items() if _is_hyperparameter(k, v))
    helps = {}
    try:
        with open(namespace['__file__']) as f:
            for line in f:
                m = re.match(r'^([A-Za-z_]\w*)\s*=.*?#\s*(.+)$', line.rstrip())
                if m and m.group(1) in out:
                    helps[m.group(1)] = m.group(2).replace('%', '%%')
    except (KeyError, OSError):
        pass
    out.helps = helps
    return out


def _parser(hyper, description, choices, typed_only=False):
    """The argparse parser of a script (see parse_config). typed_only: every default is SUPPRESS, so that
    parsing leaves out the names not typed (which names a command line gives)."""
    helps = getattr(hyper, 'helps', {})
    parser = argparse.ArgumentParser(description=description)
    groups = {'method': parser.add_argument_group('hyperparameters'),
              'run': parser.add_argument_group('run options (shared by every script)')}
    values = {k: v for k, v in hyper.items() if k not in RUN_OPTIONS}
    values.update({k: hyper.get(k, default) for k, (default, _) in RUN_OPTIONS.items()})
    for name, default in values.items():
        text = helps.get(name) or RUN_OPTIONS.get(name, (None, ''))[1]
        kw = dict(dest=name, default=argparse.SUPPRESS if typed_only else default,
                  help=(text + ' ' if text else '') + f'(default: {default})'.replace('%', '%%'))
        if name in choices:
            kw['choices'] = choices[name]
        if isinstance(default, bool):
            kw.update(type=parse_bool, nargs='?', const=True, metavar='BOOL')
        elif isinstance(default, list):
            kw.update(type=_parse_int_list, metavar='LIST')
        else:
            kw.update(type=type(default))
        groups['run' if name in RUN_OPTIONS else 'method'].add_argument(*spellings(name), **kw)
    groups['run'].add_argument('--gpu', dest='device', action='store_const', const='cuda',
                               default=argparse.SUPPRESS if typed_only else RUN_OPTIONS['device'][0],
                               help="the original's flag: the same as --device cuda")
    return parser


def parse_config(hyper, argv=None, description='', choices=None):
    """The command line of a script: its hyperparameters (name -> default, from `hyperparameters()`)
    and the shared RUN_OPTIONS (a script's own value of one of those is its default there).

    Each name is `--name` and `--name-with-dashes`, plus its ALIASES. A boolean that defaults to False
    is a plain flag (`--synthetic`); every boolean also takes `--name true|false`. Lists of ints take
    '5,5,5', '[2,3,4]' or '5x20'. `choices`: name -> allowed values. Returns (namespace, the set of names
    given on this command line)."""
    choices = choices or {}
    args = _parser(hyper, description, choices).parse_args(argv)
    typed = set(vars(_parser(hyper, description, choices, typed_only=True).parse_args(argv)))
    return args, typed


# ----------------------------------------------------------------------------------------------------
# Checks of the values (each script's validate(), before anything is written)
# ----------------------------------------------------------------------------------------------------

def check_positive(cfg, *names, allow_zero=()):
    """Each named value > 0 (>= 0 for those in allow_zero); else a UserError naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and name not in allow_zero):
            need = 'at least 0' if name in allow_zero else 'positive'
            raise UserError(f'--{name} must be {need}, got {value}.')


def stand_in(cfg):
    """What the data calls take as `synthetic`: False, 'small' or 'full'."""
    return cfg.synthetic and cfg.synthetic_size


def check_finite(cfg, defaults, given=(), source=''):
    """Every float value finite: `--lr nan` or `--lr inf` is refused before anything is written (a NaN rate
    would only stop the run later as diverged). `defaults`: name -> the script's default, for the example;
    `given`: the names typed on this command line; a value not typed came from `source` (a resumed run's
    config.json)."""
    for name, value in vars(cfg).items():
        if type(value) is float and not math.isfinite(value):
            where = (f' (the value in {source}; type --{name} VALUE to replace it)' if source and name not in given
                     else '')
            example = defaults.get(name, RUN_OPTIONS.get(name, (None,))[0])
            raise UserError(f'--{name} must be a finite number, got {value}{where}. Every float option takes a '
                            f'finite value' + (f', e.g. --{name} {example:g} (its default).' if
                                               isinstance(example, float) else '.'))


def check_choices(cfg, choices):
    """Every value in its allowed list (also for values a resumed run brings from its config.json)."""
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f'--{name} {getattr(cfg, name)!r} is not one of: {", ".join(map(str, allowed))}.')
