"""Results table and learning curves of run folders: one Markdown row per setting (runs that differ only by
seed grouped as mean ± std over the seeds), the papers' numbers beside ours where they are known offline,
and optionally one PNG of the learning curves (matplotlib, an optional extra).

    python results.py logs/*/*                                     # every run under logs/
    python results.py 'logs/model_vgg_*/*' --plot maxl_curves.png  # globs may be quoted
    python results.py results/svhn results/cifar10                 # MetaSemi runs made with --save-path

It reads only what the training scripts write (config.json and metrics.csv; log.txt for MetaSemi's
resume points), never a checkpoint, and trains nothing. How a script's runs are reported (its method
names, metrics columns, units, paper, settings shown, time) each script says itself: reported(),
unused_options(), UNIT, PAPER, HEADLINE, METHOD_OPTIONS, TIME_NOTE, run_seconds(); results.py imports
the script a run folder names. It also makes the table and figure of an experiment of reproduce.py
(experiment_report; the experiments are in machinery/experiments.py).

Used by you and by reproduce.py.
"""
import argparse
import glob
import json
import os
import importlib
import re
import statistics
import sys

from machinery.experiments import EXPERIMENTS, FINISHED, NOT_PUBLISHED, run_state
from machinery.files import read_metrics
from machinery.options import NOT_SETTING, UserError
from utils import run_main

ROOT = os.path.dirname(os.path.abspath(__file__))

DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN', 'fashion-mnist': 'Fashion-MNIST'}


# ----------------------------------------------------------------------------------------------------
# What each script says of its runs
# ----------------------------------------------------------------------------------------------------

def script_module(name):
    """The training script `name` (a file <name>.py beside this one that says how its runs are reported:
    reported(), unused_options(), UNIT, PAPER, HEADLINE, METHOD_OPTIONS, TIME_NOTE, run_seconds()), or None."""
    if not (isinstance(name, str) and name.isidentifier() and os.path.isfile(os.path.join(ROOT, name + '.py'))):
        return None
    module = importlib.import_module(name)
    return module if callable(getattr(module, 'reported', None)) else None


def scripts_here():
    """The training scripts beside this file, in the order their papers' tables list them."""
    names = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py') and f.startswith(('model_', 'train_')))
    return [n for n in names if script_module(n)]


# ----------------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------------

def not_a_run(path, why):
    hint = ''
    if os.path.isdir(path):
        below = sorted(glob.glob(os.path.join(path, '*', 'config.json')) +
                       glob.glob(os.path.join(path, '*', '*', 'config.json')))
        if below:
            depth = os.path.relpath(below[0], path).count(os.sep)
            hint = (f' It holds run folders itself: give {os.path.join(path, *["*"] * depth)!r} to take them '
                    'all.')
    return UserError(f'{path!r} is not a run folder: {why}. A run folder is what a training script writes, '
                     'logs/<script>/<run>/ (or the folder given by --run_dir / --save-path), holding config.json '
                     '(with the script that wrote it), log.txt and metrics.csv; give run folders or globs of '
                     f'them, e.g. logs/*/*.{hint}')


def expand(patterns):
    """Run folder arguments (paths or globs) -> folders, in order, each once."""
    out, seen = [], set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
            if not paths:
                raise UserError(f'no folder matches {pattern!r}: give run folders (logs/<script>/<run>) or globs '
                                'of them, e.g. logs/*/*.')
        else:
            paths = [pattern]
        for p in paths:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def read_runs(paths, damaged):
    """read_run of each path; one that cannot be read is left out, (path, its UserError) added to `damaged`."""
    runs = []
    for path in paths:
        try:
            runs.append(read_run(path))
        except UserError as e:
            damaged.append((path, e))
    return runs


def damaged_text(damaged):
    """The lines under a table naming the folders left out of it, and why."""
    return '\n'.join([f'Not in the table: {len(damaged)} folder(s) that could not be read:']
                     + [f'- {path}: {str(e).split(". A run folder is")[0]}.' for path, e in damaged])


def read_run(path):
    """A run folder -> {'path', 'cfg', 'script', 'rows' (metrics.csv as numbers, one row per position),
    'resumed_at' (MetaSemi: the steps its log says it resumed at)}. Anything else is a UserError."""
    if not os.path.isdir(path):
        raise not_a_run(path, 'no such folder' if not os.path.exists(path) else 'it is a file')
    config = os.path.join(path, 'config.json')
    if not os.path.isfile(config):
        raise not_a_run(path, 'it has no config.json')
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise not_a_run(path, f'its config.json cannot be read ({e})') from None
    script = cfg.get('script') if isinstance(cfg, dict) else None
    if script_module(script) is None:
        raise not_a_run(path, f'its config.json names no script of this project (script: {script!r}; one of '
                              f'{", ".join(scripts_here())} expected)')
    rows = {}
    _, raw_rows, skipped = read_metrics(os.path.join(path, 'metrics.csv'))
    for raw in raw_rows:
        row = {k: _number(v) for k, v in raw.items()}
        rows[next(iter(row.values()))] = row      # a position written twice (a resumed run): the later one
    log = ''
    if os.path.isfile(os.path.join(path, 'log.txt')):
        with open(os.path.join(path, 'log.txt'), errors='replace') as f:
            log = f.read()
    if 'processes' not in cfg:          # a run from before config.json kept it: its start line says it
        found = re.search(r'^(?:run|resuming) .* on \S+, (\d+) processes \(', log, re.M)
        cfg = cfg | {'processes': int(found.group(1)) if found else 1}
        cfg.setdefault('global_batch', cfg.get('batch_size', 0) * cfg['processes'])
    return {'path': path, 'cfg': cfg, 'script': script, 'rows': [rows[k] for k in sorted(rows)], 'log': log,
            'skipped': skipped}


# ----------------------------------------------------------------------------------------------------
# Settings, methods and measures
# ----------------------------------------------------------------------------------------------------

def setting(cfg):
    """The values of a configuration that decide what a run computes (not the seed, not where or how it
    ran), with the ones a method ignores dropped: name -> value."""
    module = script_module(cfg.get('script'))
    cfg = getattr(module, 'OLDER_RUNS', {}) | cfg          # a run from before an option existed ran as this
    unused = module.unused_options(cfg)                    # by its method, dataset and schedule
    out = {k: v for k, v in cfg.items() if k not in NOT_SETTING and k not in unused}
    out.setdefault('processes', 1)                         # read_run fills it in for runs from before it was kept
    return out


def group_key(cfg):
    """Runs with equal keys differ only in their seed (and where or how they ran): one row."""
    return (cfg.get('script'), json.dumps(setting(cfg), sort_keys=True))


def mean_std(values):
    """(mean, sample standard deviation (n - 1; None for one value), n)."""
    values = [float(v) for v in values]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def dataset_of(cfg):
    name = cfg.get('dataset', 'cifar100')                  # the MAXL scripts before --dataset: CIFAR-100
    return DATASET_NAMES.get(name, name) + (' (synthetic)' if cfg.get('synthetic') else '')


def methods_of(cfg):
    """[(method label, metrics column, selection)] a run reports (its script's reported())."""
    return script_module(cfg['script']).reported(cfg)


def run_seconds(run):
    """A run's time from its metrics.csv (its script's run_seconds, TIME_NOTE), or None without a time column."""
    try:
        return script_module(run['script']).run_seconds(run['rows'], run.get('log', ''))
    except (KeyError, TypeError):
        return None


# How a number is chosen from a run's evaluations (the scripts' reported() name one per method)
SELECTIONS = {
    'last 5': 'the mean test accuracy of the last 5 evaluations (fewer where a run has fewer), no evaluation chosen',
    'at best val': 'the test accuracy at the first best validation single_acc (on a dataset without a validation '
                   'split: at the best test single_acc, which is selected on the test set)',
    'best': 'the best test accuracy over all evaluations (selected on the test set)',
    'final': 'the test accuracy of the last evaluation',
}


def select(rows, column, selection):
    """The number a run reports from its metrics rows (SELECTIONS): 'last 5', the mean of `column` over the
    last 5 rows that have it (fewer where there are fewer); 'best', its highest value; 'final', its last;
    'at best val', its value at the first best validation single_acc (at the best test single_acc where there
    is no validation split)."""
    usable = [r for r in rows if isinstance(r.get(column), float)]
    if selection == 'at best val':
        chosen_on = 'val_single_acc' if 'val_single_acc' in usable[0] else 'test_single_acc'
        position = next(iter(usable[0]))
        return max(usable, key=lambda r: (r[chosen_on], -r[position]))[column]
    if selection == 'last 5':
        return statistics.fmean(r[column] for r in usable[-5:])
    if selection == 'final':
        return usable[-1][column]
    return max(r[column] for r in usable)


def measures(run):
    """[{'method', 'column', 'selection', 'reported', 'test_best', 'final', 'steps', 'seconds'}] of a run with
    metrics: the reported number (its script's selection, see select), the best test value (selected on the
    test set), the last one, the positions done and the time."""
    rows, module = run['rows'], script_module(run['script'])
    out = []
    for method, column, selection in module.reported(run['cfg']):
        usable = [r for r in rows if isinstance(r.get(column), float)]
        if not usable:
            continue
        position = next(iter(rows[-1]))
        steps = int(rows[-1][position]) + (1 if module.UNIT == 'epochs' else 0)   # epochs are numbered from 0
        out.append({'method': method, 'column': column, 'selection': selection,
                    'reported': select(rows, column, selection), 'test_best': select(rows, column, 'best'),
                    'final': usable[-1][column], 'steps': steps, 'seconds': run_seconds(run)})
    return out


def paper_number(cfg, method, steps):
    """The paper's number for this row (its script's paper_number), or why there is none."""
    if cfg.get('synthetic'):
        return '— (synthetic stand-in)'
    module = script_module(cfg['script'])
    number = module.paper_number(cfg, method, steps) if hasattr(module, 'paper_number') else None
    return number or f'not available offline ({module.PAPER})'


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------

def _value(v):
    if isinstance(v, list):
        if v and all(x == v[0] for x in v):
            return f'{v[0]}x{len(v)}'
        return ','.join(map(str, v))
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    return str(v)


def history_text(history):
    """What a run's config.json history says was typed with --resume: 'resumed with lr 0.01 -> 0.001 after
    epoch 2'."""
    return 'resumed with ' + '; '.join(', '.join(f'{k} {_value(old)} -> {_value(new)}' for k, (old, new) in
                                                 entry['changed'].items()) + f' after {entry["after"]}'
                                       for entry in history)


def setting_text(keys, cfg):
    values = setting(cfg)                   # without the values this run's method ignores (alpha without mixup...)
    return ', '.join(history_text(values[k]) if k == 'history' else f'{k} {_value(values[k])}' for k in keys
                     if k in values and not (k == 'num_samples_per_class' and not values[k]))


def fmt_acc(values, error=False):
    mean, std, n = mean_std(values)
    text = f'{mean:.4f}' + (f' ± {std:.4f}' if std is not None else '')
    if error:
        e_mean, e_std, _ = mean_std([100 * (1 - v) for v in values])
        text += f' (error {e_mean:.2f}' + (f' ± {e_std:.2f}' if e_std is not None else '') + ' %)'
    return text


def fmt_seconds(s):
    if s < 120:
        return f'{s:.1f} s'
    if s < 7200:
        return f'{s / 60:.1f} min'
    return f'{s / 3600:.1f} h'


def environment_text(runs):
    """Where the runs of a row differ in what decides their numbers besides the options (config.json's
    environment, machinery/environment.py): 'threads 1 (seed 0), 2 (seed 1)'; a resumed run's value is each
    start's ('2 then 1'; commits by their first 12 digits). '' where they agree or none recorded it."""
    def value(run, key):
        starts = [run['cfg'].get('environment') or {}] + list(run['cfg'].get('environment_resumed', []))
        values = (str(s.get(key, 'not recorded')) for s in starts)
        return ' then '.join(dict.fromkeys(v[:12] if key == 'commit' else v for v in values))
    if not any(run['cfg'].get('environment') for run in runs):
        return ''
    keys = list(dict.fromkeys(k for run in runs for k in run['cfg'].get('environment') or {}))
    out = []
    for key in keys:
        values = [value(run, key) for run in runs]
        if len(set(values)) > 1 or any(' then ' in v for v in values):
            out.append(f'{key} ' + ', '.join(f'{v} (seed {run["cfg"].get("seed")})' for v, run in zip(values, runs)))
    return '; '.join(out)


def build_rows(runs):
    """Group the runs' measures: one dict per (setting, method), in script order then first appearance."""
    groups = {}
    for run in runs:
        for m in measures(run):
            key = (group_key(run['cfg']), m['method'])
            groups.setdefault(key, {'cfg': run['cfg'], 'script': run['script'], 'method': m['method'],
                                    'runs': []})['runs'].append((run, m))
    rows = list(groups.values())
    # the setting column: the headline keys, plus every key whose value differs between rows of a script
    for script in {r['script'] for r in rows}:
        mine = [r for r in rows if r['script'] == script]
        shown = {'dataset', 'synthetic', *script_module(script).METHOD_OPTIONS}     # in the other columns
        names = sorted({k for r in mine for k in setting(r['cfg'])} - shown)
        varying = [k for k in names if len({json.dumps(setting(r['cfg']).get(k)) for r in mine}) > 1]
        headline = script_module(script).HEADLINE
        keys = headline + [k for k in varying if k not in headline]
        keys += ['history'] if 'history' in names and 'history' not in keys else []     # a mixed run says so
        for r in mine:
            r['setting'] = setting_text(keys, r['cfg'])
            differ = environment_text([run for run, _ in r['runs']])
            if differ:
                r['setting'] += ('; ' if r['setting'] else '') + f'runs or their starts differ in {differ}'
    papers = list(dict.fromkeys(script_module(r['script']).PAPER for r in rows))
    scripts = list(dict.fromkeys(r['script'] for r in rows))
    return sorted(rows, key=lambda r: (papers.index(script_module(r['script']).PAPER), scripts.index(r['script'])))


def table(runs):
    """The Markdown table of `runs` (from read_run) and its notes, as text."""
    rows = build_rows(runs)
    lines = ['| method | dataset | setting | n (seeds) | reported accuracy | best test accuracy (selected on test) '
             '| final accuracy | done | time per run (≈) | paper |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ms = [m for _, m in r['runs']]
        seeds = ', '.join(str(run['cfg'].get('seed')) for run, _ in r['runs'])
        steps = sorted({m['steps'] for m in ms})
        unit = script_module(r['script']).UNIT
        unit = unit if steps != [1] else unit[:-1]                                   # 1 epoch, 2 epochs
        done = (f'{steps[0]:,}' if len(steps) == 1 else f'{steps[0]:,}–{steps[-1]:,}') + f' {unit}'
        seconds = [m['seconds'] for m in ms if m['seconds'] is not None]
        error = getattr(script_module(r['script']), 'ERROR', False)
        lines.append('| ' + ' | '.join([
            f'{r["method"]} (`{r["script"]}`)', dataset_of(r['cfg']), r['setting'] or '—', f'{len(ms)} ({seeds})',
            fmt_acc([m['reported'] for m in ms], error), fmt_acc([m['test_best'] for m in ms], error),
            fmt_acc([m['final'] for m in ms], error), done,
            fmt_seconds(statistics.fmean(seconds)) if seconds else '—',
            paper_number(r['cfg'], r['method'], max(steps))]) + ' |')
    used = {script_module(r['script']).PAPER: {m['selection'] for _, m in r['runs']} for r in rows}
    notes = ['', 'Rows: the run folders given, grouped by paper and script in the order they came. Accuracies are '
             'fractions, mean ± sample standard deviation (n - 1) over the n runs of a row (runs that differ only in '
             'seed, run folder, device or logging options); one run: its value. Reported (each paper\'s protocol): '
             + '; '.join(f'{paper}: ' + ', or '.join(SELECTIONS[s] for s in sorted(chosen))
                                           for paper, chosen in used.items())
             + '. Best test: the highest test accuracy over all evaluations, selected on the test set itself (an '
             'optimistic number, for comparison only); final: the last evaluation. MetaSemi also as test error in '
             '%, as its paper reports it.']
    timed = {script_module(r['script']).PAPER: script_module(r['script']).TIME_NOTE for r in rows}
    notes.append('Time per run: ' + '; '.join(f'{paper}: {note}' for paper, note in timed.items()) + '.')
    empty = [run['path'] for run in runs if not measures(run)]
    if empty:
        notes.append('Not in the table (no evaluation in metrics.csv yet): ' + ', '.join(empty) + '.')
    for run in runs:
        if run.get('skipped'):
            notes.append(f'{os.path.join(run["path"], "metrics.csv")}: not whole rows, skipped: '
                         + '; '.join(f'line {n} ({why})' for n, why in run['skipped']) + '.')
    return '\n'.join(lines + notes)


# ----------------------------------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------------------------------

def import_pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib: pip install matplotlib (an optional extra; training and the '
                        'table do not need it). Without --plot, the table needs nothing more.') from None
    return plt


def curve_labels(runs, settings):
    """A legend label per run: method, setting, seed; runs whose labels coincide (the same setting and seed,
    run twice) also get their run folder's name (its whole path where the names coincide too)."""
    labels = [f'{methods_of(run["cfg"])[0][0].replace("SLA+SI", "SLA")}, {settings.get(id(run), "")}, '
              f'seed {run["cfg"].get("seed")}' for run in runs]
    names = [os.path.basename(os.path.normpath(run['path'])) for run in runs]
    out = []
    for label, name, run in zip(labels, names, runs):
        if labels.count(label) > 1:
            same = [n for lab, n in zip(labels, names) if lab == label]
            label += f', run {name if same.count(name) == 1 else run["path"]}'
        out.append(label)
    return out


def plot(runs, out, plt):
    """One PNG: a subplot per paper (its scripts' runs together), one line per run: the first number its script
    reports (as an error in % where the paper reports errors), against the positions of metrics.csv; with the
    validation curve dashed where the number is chosen on a validation split."""
    settings = {}
    for r in build_rows(runs):
        for run, _ in r['runs']:
            settings.setdefault(id(run), r['setting'])
    drawn = [run for run in runs if run['rows']]
    papers = list(dict.fromkeys(script_module(run['script']).PAPER for run in drawn))
    fig, axes = plt.subplots(1, len(papers), figsize=(8 * len(papers), 5.5), squeeze=False)
    for ax, paper in zip(axes[0], papers):
        mine = [run for run in drawn if script_module(run['script']).PAPER == paper]
        for k, (run, label) in enumerate(zip(mine, curve_labels(mine, settings))):
            module, rows = script_module(run['script']), run['rows']
            _, column, selection = module.reported(run['cfg'])[0]
            error = getattr(module, 'ERROR', False)
            position = next(iter(rows[0]))
            x = [r[position] + (1 if module.UNIT == 'epochs' else 0) for r in rows]
            values = {'test': column} | ({'val': column.replace('test_', 'val_')} if selection == 'at best val' and
                                         column.replace('test_', 'val_') in rows[0] else {})
            for split, name in values.items():
                y = [100 * (1 - r[name]) if error else r[name] for r in rows]
                ax.plot(x, y, color=f'C{k % 10}', linestyle='--' if split == 'val' else '-',
                        label=label + (f': {split}' if len(values) > 1 else ''))
            ax.set_xlabel(module.UNIT[:-1])
            ax.set_ylabel(('test error (%)' if error else column.replace('_', ' '))
                          + (' (val dashed, test solid)' if len(values) > 1 else ''))
        datasets = ', '.join(sorted({dataset_of(run['cfg']) for run in mine}))
        ax.set_title(f'{paper}\nthese runs: {datasets}', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=90, format='png')
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# An experiment's table and figure (reproduce.py), from its finished run folders
# ----------------------------------------------------------------------------------------------------

def finished_runs(experiment, runs_dir, damaged=None):
    """{setting: [read_run(...) of each finished seed, in seed order]} and the count of seed
    folders that are not finished, per setting. A finished folder that cannot be read counts as not finished,
    its error added to the list `damaged`."""
    done, unfinished = {}, {}
    for setting in EXPERIMENTS[experiment]['settings']:
        folders = [os.path.join(runs_dir, setting, name) for name in sorted(
            (n for n in os.listdir(os.path.join(runs_dir, setting)) if n[4:].isdigit() and n.startswith('seed')),
            key=lambda n: int(n[4:]))] if os.path.isdir(os.path.join(runs_dir, setting)) else []
        done[setting] = read_runs([p for p in folders if run_state(p) == 'finished'], damaged)
        unfinished[setting] = len(folders) - len(done[setting])
        for run in done[setting]:           # when the run ended and its seconds, as the runner recorded them
            try:
                with open(os.path.join(run['path'], FINISHED)) as f:
                    record = json.load(f)
                run['finished'] = {k: record[k] for k in ('at', 'seconds') if k in record}
            except (OSError, ValueError, TypeError):
                run['finished'] = {}
    return done, unfinished


def value_of(run, column, selection=None):
    """The number a cell reports from one run: the method's reported number (its script's selection, see
    measures; MAXL's scripts: the mean test accuracy of the last 5 epochs), or the number chosen by `selection`
    (SELECTIONS); for the top-5 accuracy, its value at the run's best top-1 (selection 'final': at the last
    evaluation)."""
    if column == 'test_acc5':
        rows = [r for r in run['rows'] if isinstance(r.get('test_acc'), float)]
        if not rows:
            return None
        return (rows[-1] if selection == 'final' else max(rows, key=lambda r: r['test_acc']))['test_acc5']
    m = next((m for m in measures(run) if m['column'] == column), None)
    if m is None:
        return None
    return m['reported'] if selection is None else select(run['rows'], column, selection)


def cell_text(values, measure, unfinished):
    n = len(values)
    seeds = f'{n} seed{"s" * (n != 1)}' if not unfinished else f'{n} of {n + unfinished} seeds'
    if not values:
        return f'— (0 of {unfinished} seeds finished)' if unfinished else '—'
    mean, std, _ = mean_std([100 * (1 - v) if measure == 'error' else 100 * v for v in values])
    return f'{mean:.2f}' + (f' ± {std:.2f}' if std is not None else '') + f' ({seeds})'


def paper_text(exp, row, columns):
    """The paper column of a row: each known number with its source's key ([paper], [slides], ...; the
    table's `sources` say what they are), also one under a name that is none of the table's columns (a number
    quoted elsewhere whose method is not said exactly)."""
    known = [(c, v) for (r, c), v in exp['paper'].items() if r == row]
    if not known:
        return NOT_PUBLISHED
    rest = [c for c in columns if (row, c) not in exp['paper']]
    texts = [f'{c}: {v[0]} [{v[1]}]' if isinstance(v, tuple) else f'{c}: {v}' for c, v in known]
    return '; '.join(texts) + (f'; {", ".join(rest)}: {NOT_PUBLISHED}' if rest else '')


def tables_of(exp):
    """An experiment's tables: its `tables` (each with title, table, measure, paper and optionally selection,
    also, sources, quick_rows), or its one `table` with those keys of the experiment."""
    if exp.get('tables'):
        return exp['tables']
    return [dict(title='', **{k: exp[k] for k in ('table', 'measure', 'paper', 'selection', 'also', 'sources',
                                                  'quick_rows') if k in exp})]


def table_text(part, done, unfinished, quick=False, selection=None, heading=''):
    """One table of an experiment (rows x methods, the paper's numbers beside with their sources) from its
    finished runs: each cell the scripts' reported number, or `selection`'s (SELECTIONS). With --quick (the
    synthetic stand-in) no paper column, and the rows named by the budgets the runs used (quick_rows)."""
    columns = list(dict.fromkeys(c for row in part['table'].values() for c in row))
    unit = 'test error, %' if part['measure'] == 'error' else 'test accuracy, %'
    lines = [f'| {unit} | ' + ' | '.join(columns) + (' |' if quick else ' | paper |'),
             '|---' * (len(columns) + (1 if quick else 2)) + '|']
    for row, cells in part['table'].items():
        texts = []
        for c in columns:
            if c not in cells:
                texts.append('')
                continue
            setting, column = cells[c]
            values = [v for v in (value_of(run, column, selection) for run in done[setting]) if v is not None]
            texts.append(cell_text(values, part['measure'], unfinished[setting]))
        name = part.get('quick_rows', {}).get(row, row) if quick else row
        lines.append(f'| {name} | ' + ' | '.join(texts) + (' |' if quick else f' | {paper_text(part, row, list(cells))} |'))
    head = [f'**{heading or part["title"]}**', ''] if heading or part['title'] else []
    chosen = {selection} if selection else {m['selection'] for cells in part['table'].values()
                                            for setting, column in cells.values() for run in done[setting]
                                            for m in measures(run) if m['column'] == column}
    notes = [f'Each cell: {"; or ".join(SELECTIONS[s] for s in sorted(chosen))}'
             + (', as the error 100 − that accuracy.' if part['measure'] == 'error' else '.')] if chosen else []
    if selection is None and part.get('selection'):
        notes.append(f'Selection: {part["selection"]}')
    elif selection is not None and part['paper'] and not quick:
        notes.append('The paper column repeats the first table\'s numbers, selected as said there.')
    if not quick:
        used = sorted({v[1] for v in part['paper'].values() if isinstance(v, tuple)})
        if used:
            notes.append('Sources of the paper column: ' + '; '.join(f'[{k}] {part["sources"][k]}' for k in used) + '.')
    else:
        notes.append('No paper numbers beside synthetic results: they would not be comparable.')
    return '\n'.join(head + lines + ([''] + notes if notes else []))


def part_tables(part, done, unfinished, quick):
    """A table of an experiment and its `also` tables (the same cells chosen otherwise, e.g. MAXL's best test
    accuracy, which is selected on the test set)."""
    texts = [table_text(part, done, unfinished, quick)]
    if part.get('claims'):
        texts.append(claims_text(part, done, quick))
    for selection, heading in part.get('also', []):
        texts.append(table_text(part, done, unfinished, quick, selection, heading))
    return '\n\n'.join(texts)


def claims_text(part, done, quick):
    """Each claim of a table's paper (a method against another) as our runs show it: the gain in points of
    the table's headline number, as the mean ± sample std of the per-seed differences (the two methods' runs
    of the same seed paired), its sign turned so that a positive gain is the paper's direction (for errors, an
    error reduction); and on how many seeds it points the paper's way."""
    row, cells = next(iter(part['table'].items()))
    error = part['measure'] == 'error'
    lines = [f'| {row}: the paper\'s claim | gain, points{" (error reduction)" if error else ""} '
             '| seeds in the paper\'s direction | the mean agrees in direction |', '|---|---|---|---|']
    for method, versus, claim in part['claims']:
        per_seed = []
        for name in (method, versus):
            setting, column = cells[name]
            per_seed.append({run['cfg'].get('seed'): value_of(run, column) for run in done[setting]})
        seeds = sorted(s for s in per_seed[0] if s in per_seed[1] and None not in (per_seed[0][s], per_seed[1][s]))
        gains = [100 * (per_seed[0][s] - per_seed[1][s]) for s in seeds]  # accuracies; an error's sign is the same
        text = f'| {method} {claim} {versus} |'
        if not gains:
            lines.append(text + ' — (no seed finished for both) | — | — |')
            continue
        mean, std, n = mean_std(gains)
        lines.append(text + f' {mean:+.2f}' + (f' ± {std:.2f}' if std is not None else '') + f' | '
                     f'{sum(g > 0 for g in gains)} of {n} | {"yes" if mean > 0 else "no"} |')
    notes = ['The gains: the headline numbers of the table above, paired by seed (the same seed gives both '
             'methods the same training subset and split), mean ± sample standard deviation of the differences'
             + (', as the accuracy gained, which is the error lost.' if error else '.')]
    if quick:
        notes.append('Synthetic stand-in: these gains say nothing about the methods.')
    return '\n'.join(lines + [''] + notes)


def experiment_report(experiment, runs_dir, quick):
    """Write <runs_dir>/results.md (and the figure, where the paper has one); return the tables' text."""
    exp = EXPERIMENTS[experiment]
    damaged = []
    done, unfinished = finished_runs(experiment, runs_dir, damaged)
    paper_table = '\n\n'.join(part_tables(part, done, unfinished, quick) for part in tables_of(exp))
    if damaged:
        paper_table += '\n\n' + damaged_text(damaged)
    all_runs = [run for setting in exp['settings'] for run in done[setting]]
    n_done = len(all_runs)
    n_open = sum(unfinished.values())
    text = [f'# {experiment}{" --quick" if quick else ""}', '', exp['title'] + '.', '']
    if quick:
        text += ['**Synthetic stand-in (`--quick`): small networks trained briefly on synthetic images. These numbers '
                 'check that the runs, the table and the figure work end to end; they are not the paper\'s and say '
                 'nothing about the methods.**', '']
    last = max((run.get('finished', {}).get('at', '') for run in all_runs), default='')
    seconds = sum(run.get('finished', {}).get('seconds', 0) for run in all_runs)
    text += [f'Made by `reproduce.py {experiment}{" --quick" if quick else ""}` from {n_done} finished run(s) in '
             f'{runs_dir}' + (f' ({n_open} started but not finished, not counted)' if n_open else '')
             + (f'; the last finished at {last[:16]}' if last else '')
             + (f'; their own times, summed: {seconds / 3600:.2f} hours (the runner\'s clock of each, in finished.json)'
                if seconds else '') + '. Each cell: mean ± sample standard deviation over the '
             'finished seeds (one seed: its value), in %, and the number of seeds; — where none has finished. '
             'Which evaluation each number comes from is said under each table. '
             + ('The paper column: the paper\'s number where it could be read here, with its source, '
                f'"{NOT_PUBLISHED}" where it could not.' if not quick else ''), '', paper_table, '']
    if all_runs:
        text += ['## Every setting (results.py)', '', table(all_runs), '']
    pictures = [('figure', draw_figure3, 'MAXL Figure 3 setting: test accuracy of the primary task per epoch'),
                ('curves', draw_curves, 'Test curves of each table\'s methods, mean ± std over the seeds')]
    for key, draw, caption in pictures:
        name = exp.get(key)
        if not name:
            continue
        try:
            plt = import_pyplot()
        except UserError as e:
            text += [f'No {key}: {e}', '']
            print(f'note: no {key} ({e})')
        else:
            if draw(plt, experiment, done, os.path.join(runs_dir, name), quick):
                text += [f'![{caption}]({name})', '']
    with open(os.path.join(runs_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(text))
    return paper_table


# Figure 3's methods: a colour (from Tol's and Okabe and Ito's colour-blind-safe palettes), a line style and a
# marker each, so that the curves stay apart in grey print too; the colours' grey levels (0.299 R + 0.587 G +
# 0.114 B) are 0, 187, 137, 70 and 119 of 255
METHOD_STYLES = {'Single': ('#000000', '-', 'o'), 'Random': ('#88CCEE', '--', 's'), 'K-means': ('#44AA99', ':', '^'),
                 'Human': ('#882255', '-.', 'D'), 'MAXL': ('#D55E00', (0, (5, 1, 1, 1, 1, 1)), 'v')}


def plot_band(ax, xs, values, style, label, markersize, linewidth):
    """One method's curve: the mean of `values` (a list of the seeds' values per x) with a ±std band (sample
    std; none for one seed), in `style` (colour, line style, marker)."""
    color, line, marker = style
    mean = [statistics.fmean(v) for v in values]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    ax.plot(xs, mean, color=color, linestyle=line, marker=marker, markersize=markersize, linewidth=linewidth,
            markevery=max(1, len(mean) // 8), label=label)
    ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=color, alpha=0.12, linewidth=0)


def draw_figure3(plt, experiment, done, path, quick):
    """MAXL's Figure 3: one panel per level pair, the primary task's test accuracy per epoch of the five
    methods, mean over the finished seeds with a ±std band. False when nothing has finished."""
    exp = EXPERIMENTS[experiment]
    if not any(done.values()):
        return False
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.2), sharex=True)
    for ax, (row, cells) in zip(axes.flat, exp['table'].items()):
        drawn = 0
        for k, (method, (setting, column)) in enumerate(cells.items()):
            curves = [[r[column] for r in run['rows'] if isinstance(r.get(column), float)] for run in done[setting]]
            length = min((len(c) for c in curves), default=0)
            if not length:
                continue
            plot_band(ax, range(1, length + 1), [[100 * c[e] for c in curves] for e in range(length)],
                      METHOD_STYLES.get(method, (f'C{k}', '-', 'x')), f'{method}, n={len(curves)}', 5, 1.6)
            drawn += 1
        ax.set_title(row, fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if drawn:
            ax.legend(fontsize=7, loc='lower right')
        else:
            ax.text(0.5, 0.5, 'no finished runs', ha='center', va='center', transform=ax.transAxes, color='grey')
    for ax in axes[1]:
        ax.set_xlabel('epoch')
    for ax in axes[:, 0]:
        ax.set_ylabel('primary test accuracy (%)')
    fig.suptitle('MAXL Figure 3 setting: primary-task test accuracy per epoch, mean ± std over n seeds'
                 + ('\nSYNTHETIC STAND-IN (--quick): not the paper\'s numbers' if quick else ''), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72, format='png')         # full colour: a palette would merge the methods' colours
    plt.close(fig)
    return True


# The curves of an experiment's tables: colours from Okabe and Ito's colour-blind-safe palette, with a line style
# and a marker each, so that six methods stay apart in grey print too
CURVE_STYLES = [('#000000', '-', 'o'), ('#E69F00', '--', 's'), ('#56B4E9', ':', '^'), ('#009E73', '-.', 'D'),
                ('#D55E00', (0, (5, 1, 1, 1, 1, 1)), 'v'), ('#CC79A7', (0, (1, 1)), 'P')]


def draw_curves(plt, experiment, done, path, quick):
    """One panel per table of an experiment (its first row): each method's test number against the positions
    of metrics.csv (epochs, iterations, steps), as a test error where the table reports errors, the mean over
    the finished seeds with a ±std band; positions not reached by every seed are left out. False when nothing
    has finished."""
    parts = tables_of(EXPERIMENTS[experiment])
    if not any(done.values()):
        return False
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        row, cells = next(iter(part['table'].items()))
        error, drawn, unit = part['measure'] == 'error', 0, ''
        for k, (method, (setting, column)) in enumerate(cells.items()):
            runs = [run for run in done[setting] if run['rows']]
            if not runs:
                continue
            position = next(iter(runs[0]['rows'][0]))
            module = script_module(runs[0]['script'])
            unit = module.UNIT[:-1] if module else position
            curves = [{r[position]: r[column] for r in run['rows'] if isinstance(r.get(column), float)} for run in runs]
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            if not xs:
                continue
            plot_band(ax, [x + 1 if position == 'epoch' else x for x in xs],       # epochs count from 0 in metrics.csv
                      [[100 * (1 - c[x]) if error else 100 * c[x] for c in curves] for x in xs],
                      CURVE_STYLES[k % len(CURVE_STYLES)], f'{method}, n={len(curves)}', 4, 1.5)
            drawn += 1
        ax.set_title(f'{part["title"]}\n{row}', fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylabel('test error (%)' if error else 'test accuracy (%)')
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc='upper right' if error else 'lower right')
        else:
            ax.text(0.5, 0.5, 'no finished runs', ha='center', va='center', transform=ax.transAxes, color='grey')
    fig.suptitle(f'{experiment}: test curves, mean ± std over n seeds'
                 + ('\nSYNTHETIC STAND-IN (--quick): not the papers\' numbers' if quick else ''), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72, format='png')
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', metavar='RUN', help='run folders or globs of them (e.g. logs/*/*)')
    p.add_argument('--plot', metavar='FILE.png', default='',
                   help='also draw the learning curves into this PNG (needs matplotlib)')
    args = p.parse_args(argv)
    plt = import_pyplot() if args.plot else None        # a missing optional extra stops before any output
    damaged = []
    runs = read_runs(expand(args.runs), damaged)
    if not runs:
        raise damaged[0][1] if len(damaged) == 1 else UserError(
            f'none of the {len(damaged)} folders given can be read as a run folder: '
            + '; '.join(str(e).split('. A run folder is')[0] for _, e in damaged)
            + '. A run folder is what a training script writes (config.json, log.txt, metrics.csv).')
    print(table(runs) + (f'\n\n{damaged_text(damaged)}' if damaged else ''))
    if args.plot:
        if not any(run['rows'] for run in runs):
            raise UserError('nothing to plot: none of the runs has an evaluation in its metrics.csv yet.')
        plot(runs, args.plot, plt)
        print(f'\nwrote {args.plot}')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
