"""Results table and learning curves of run folders: one Markdown row per setting (runs that differ only by
seed grouped as mean ± std over the seeds), the papers' numbers beside ours where they are known offline,
and optionally one PNG of the learning curves (matplotlib, an optional extra).

    python results.py logs/*/*                                     # every run under logs/
    python results.py 'logs/model_vgg_*/*' --plot maxl_curves.png  # globs may be quoted
    python results.py results/svhn results/cifar10                 # MetaSemi runs made with --save-path

It reads only what the training scripts write (config.json and metrics.csv; log.txt for MetaSemi's
resume points), never a checkpoint, and trains nothing.
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys

from machinery.options import UserError, unused_options
from utils import run_main

MAXL_SCRIPTS = ('model_vgg_single', 'model_vgg_human', 'model_vgg_maxl')
SCRIPTS = MAXL_SCRIPTS + ('train_sla', 'train_meta_semi')

# What each script's metrics.csv counts in its first column, as the table says it.
UNITS = {'model_vgg_single': 'epochs', 'model_vgg_human': 'epochs', 'model_vgg_maxl': 'epochs',
         'train_sla': 'iterations', 'train_meta_semi': 'steps'}

# How each script's time column becomes a run's time (footnotes under the table).
TIME_NOTES = {
    'maxl': 'MAXL scripts: the sum of metrics.csv `seconds` (each epoch: training, meta pass for MAXL, test)',
    'train_sla': 'SLA: Σ `seconds_per_iteration` × the iterations of each evaluation interval (training only; '
                 'the evaluations are not counted)',
    'train_meta_semi': 'MetaSemi: the mean step time (`batch_time` + `data_time`, averaged since the process '
                       'started) × its steps, summed over the starts of a resumed run (training only; the tests '
                       'are not counted)',
}

# Options that say where or how a run ran, not what it computed: runs differing only in these (and the
# seed) are one setting. print_freq and cos_every change only what is printed.
NOT_SETTING = {'seed', 'script', 'run_name', 'run_dir', 'logdir', 'resume', 'device', 'data_root', 'download',
               'local_rank', 'dist_backend', 'dist_timeout', 'eval_only', 'print_freq', 'cos_every', 'workers',
               'decode_on', 'global_batch'}

# Keys the method or dataset columns already show.
METHOD_KEYS = {'meta_order', 'second_order', 'mode', 'aug', 'baseline', 'mix_up', 'dataset', 'synthetic', 'aux_labels'}

# Keys always shown in the setting column (besides any that differ between the rows of a script).
HEADLINE = {'model_vgg_single': ['primary_level', 'width'],
            'model_vgg_human': ['primary_level', 'aux_level', 'width'],
            'model_vgg_maxl': ['primary_level', 'psi', 'width'],
            'train_sla': ['model', 'width', 'num_samples_per_class'],
            'train_meta_semi': ['num_label', 'label_fraction', 'architecture', 'width', 'alpha']}

DATASET_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'svhn': 'SVHN'}

# The papers' headline numbers as README's "Results" section has them (MetaSemi: arXiv 2007.03966, test
# error in %, ConvLarge with mixup, the seed's run.sh commands). MAXL's and SLA's are not available offline.
METASEMI_ERROR = {('svhn', 1000): 3.15, ('cifar10', 4000): 7.78, ('cifar100', 10000): 30.74}
METASEMI_STEPS = 400000
NOT_OFFLINE = {'maxl': 'not available offline (MAXL paper, Figure 3 / Table 1)',
               'sla': "not available offline (SLA paper's CIFAR table)",
               'sla_limited': "not available offline (SLA paper's limited-data table)",
               'semi': 'not available offline (not in README)'}

PLOT_TITLES = {
    'maxl': 'MAXL (NeurIPS 2019), its Figure 3 setting: CIFAR-100, primary task 20 classes (level 2), '
            'psi = [5]*20, VGG-16',
    'train_sla': 'SLA (ICML 2020): CIFAR-10/100, ResNet-32, M transformations; single inference',
    'train_meta_semi': 'MetaSemi (AISTATS 2021): SVHN 1,000 / CIFAR-10 4,000 / CIFAR-100 10,000 labels, '
                       'ConvLarge, mixup',
}


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
    if script not in SCRIPTS:
        raise not_a_run(path, f'its config.json names no script of this project (script: {script!r}; one of '
                              f'{", ".join(SCRIPTS)} expected)')
    rows = {}
    metrics = os.path.join(path, 'metrics.csv')
    if os.path.isfile(metrics):
        with open(metrics, newline='') as f:
            for raw in csv.DictReader(f):
                row = {k: _number(v) for k, v in raw.items() if k is not None}
                position = row.get(next(iter(raw)))
                if isinstance(position, float):
                    rows[position] = row          # a position written twice (a resumed run): the later one
    resumed_at, log = [], ''
    if os.path.isfile(os.path.join(path, 'log.txt')):
        with open(os.path.join(path, 'log.txt'), errors='replace') as f:
            log = f.read()
    if script == 'train_meta_semi':
        resumed_at = [int(m.group(1)) for m in re.finditer(r'^resumed at step (\d+)', log, re.M)]
    if 'processes' not in cfg:          # a run from before config.json kept it: its start line says it
        found = re.search(r'^(?:run|resuming) .* on \S+, (\d+) processes \(', log, re.M)
        cfg = cfg | {'processes': int(found.group(1)) if found else 1}
        cfg.setdefault('global_batch', cfg.get('batch_size', 0) * cfg['processes'])
    return {'path': path, 'cfg': cfg, 'script': script, 'rows': [rows[k] for k in sorted(rows)],
            'resumed_at': resumed_at}


# ----------------------------------------------------------------------------------------------------
# Settings, methods and measures
# ----------------------------------------------------------------------------------------------------

def setting(cfg):
    """The values of a configuration that decide what a run computes (not the seed, not where or how it
    ran), with the ones a method ignores dropped: name -> value."""
    script = cfg.get('script')
    unused = unused_options(script, cfg)                   # by its method, dataset and schedule
    out = {k: v for k, v in cfg.items() if k not in NOT_SETTING and k not in unused}
    out.setdefault('processes', 1)                         # read_run fills it in for runs from before it was kept
    if script == 'model_vgg_maxl':
        out.pop('aux_level', None)                         # psi says what it computes (--aux_level only sets it)
    if script == 'model_vgg_human' and out.get('aux_labels') == 'human':
        out.pop('aux_labels')                              # as a run from before --aux_labels
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
    name = 'CIFAR-100' if cfg['script'] in MAXL_SCRIPTS else DATASET_NAMES.get(cfg.get('dataset'), cfg.get('dataset'))
    return name + (' (synthetic)' if cfg.get('synthetic') else '')


def methods_of(cfg):
    """[(method label, accuracy column the method reports)]: SLA's sla mode reports two (SLA+SI, SLA+AG)."""
    script = cfg['script']
    if script == 'model_vgg_single':
        return [('Single', 'test_acc')]
    if script == 'model_vgg_human':            # Human, or the Random / K-means auxiliary labels
        return [({'random': 'Random', 'kmeans': 'K-means'}.get(cfg.get('aux_labels'), 'Human'), 'test_acc')]
    if script == 'model_vgg_maxl':
        order = (f'second order ({cfg.get("second_order")})' if cfg.get('meta_order') == 2 else 'first order')
        return [(f'MAXL, {order}', 'test_acc')]
    if script == 'train_sla':
        mode, aug = cfg.get('mode'), cfg.get('aug')
        if mode == 'baseline':
            return [('Baseline', 'test_single_acc')]
        if mode == 'sla':
            return [(f'SLA+SI, {aug}', 'test_single_acc'), (f'SLA+AG, {aug}', 'test_agg_acc')]
        return [({'da': 'DA', 'mt': 'MT', 'sla+sd': 'SLA+SD'}.get(mode, mode) + f', {aug}', 'test_single_acc')]
    name = 'labeled only (baseline)' if cfg.get('baseline') else 'MetaSemi'
    if cfg.get('mix_up'):
        name = 'mixup baseline' if cfg.get('baseline') else 'MetaSemi + mixup'
    return [(name, 'test_acc')]


def run_seconds(run):
    """A run's time from its metrics.csv (see TIME_NOTES), or None when it has no time column."""
    rows, script = run['rows'], run['script']
    try:
        if script in MAXL_SCRIPTS:
            return sum(r['seconds'] for r in rows)
        if script == 'train_sla':
            total, previous = 0.0, 0
            for r in rows:
                total += r['seconds_per_iteration'] * (r['iteration'] - previous)
                previous = r['iteration']
            return total
        # MetaSemi: batch_time and data_time are means since the process started (at step 0 or at a resume):
        # the last row of each start, times that start's steps.
        starts = sorted({0, *run['resumed_at']})
        total = 0.0
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else math.inf
            mine = [r for r in rows if start < r['step'] <= end]
            if mine:
                total += (mine[-1]['batch_time'] + mine[-1].get('data_time', 0.0)) * (mine[-1]['step'] - start)
        return total
    except (KeyError, TypeError):
        return None


def measures(run):
    """[{'method', 'column', 'best', 'final', 'steps', 'seconds', 'curve'}] of a run with metrics: the
    reported accuracy (best: at the best validation for SLA, its best test on the large datasets, the best test
    otherwise), the last one, the positions done and the time."""
    rows, script = run['rows'], run['script']
    out = []
    for method, column in methods_of(run['cfg']):
        usable = [r for r in rows if isinstance(r.get(column), float)]
        if not usable:
            continue
        if script == 'train_sla':           # the test accuracy at the first best validation single_acc
            chosen_on = 'val_single_acc' if 'val_single_acc' in usable[0] else 'test_single_acc'   # large: no val
            best_row = max(usable, key=lambda r: (r[chosen_on], -r['iteration']))
            best = best_row[column]
        else:
            best = max(r[column] for r in usable)
        position = next(iter(rows[-1]))
        steps = int(rows[-1][position]) + (1 if script in MAXL_SCRIPTS else 0)   # epochs are numbered from 0
        out.append({'method': method, 'column': column, 'best': best, 'final': usable[-1][column], 'steps': steps,
                    'seconds': run_seconds(run)})
    return out


def paper_number(cfg, method, steps):
    """The paper's number for this row (README's Results section), or why there is none."""
    if cfg.get('synthetic'):
        return '— (synthetic stand-in)'
    script = cfg['script']
    if script in MAXL_SCRIPTS:
        return NOT_OFFLINE['maxl']
    if script == 'train_sla':
        return NOT_OFFLINE['sla_limited' if cfg.get('num_samples_per_class', 0) > 0 else 'sla']
    error = METASEMI_ERROR.get((cfg.get('dataset'), cfg.get('num_label')))
    if (error is None or method != 'MetaSemi + mixup' or cfg.get('architecture') != 'convlarge'
            or cfg.get('width') != 1.0):
        return NOT_OFFLINE['semi']
    return f'{error:.2f} % error' + (f' (after {METASEMI_STEPS:,} steps)' if steps < METASEMI_STEPS else '')


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


def setting_text(keys, cfg):
    values = setting(cfg)                   # without the values this run's method ignores (alpha without mixup...)
    return ', '.join(f'{k} {_value(values[k])}' for k in keys
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
    for script in SCRIPTS:
        mine = [r for r in rows if r['script'] == script]
        names = sorted({k for r in mine for k in setting(r['cfg'])} - METHOD_KEYS)
        varying = [k for k in names if len({json.dumps(setting(r['cfg']).get(k)) for r in mine}) > 1]
        keys = HEADLINE[script] + [k for k in varying if k not in HEADLINE[script]]
        for r in mine:
            r['setting'] = setting_text(keys, r['cfg'])
    order = {s: i for i, s in enumerate(SCRIPTS)}
    return sorted(rows, key=lambda r: order[r['script']])          # stable: first appearance within a script


def table(runs):
    """The Markdown table of `runs` (from read_run) and its notes, as text."""
    rows = build_rows(runs)
    lines = ['| method | dataset | setting | n (seeds) | best accuracy | final accuracy | done | time per run (≈) '
             '| paper |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ms = [m for _, m in r['runs']]
        seeds = ', '.join(str(run['cfg'].get('seed')) for run, _ in r['runs'])
        steps = sorted({m['steps'] for m in ms})
        unit = UNITS[r['script']] if steps != [1] else UNITS[r['script']][:-1]      # 1 epoch, 2 epochs
        done = (f'{steps[0]:,}' if len(steps) == 1 else f'{steps[0]:,}–{steps[-1]:,}') + f' {unit}'
        seconds = [m['seconds'] for m in ms if m['seconds'] is not None]
        error = r['script'] == 'train_meta_semi'
        lines.append('| ' + ' | '.join([
            f'{r["method"]} (`{r["script"]}`)', dataset_of(r['cfg']), r['setting'] or '—', f'{len(ms)} ({seeds})',
            fmt_acc([m['best'] for m in ms], error), fmt_acc([m['final'] for m in ms], error), done,
            fmt_seconds(statistics.fmean(seconds)) if seconds else '—',
            paper_number(r['cfg'], r['method'], max(steps))]) + ' |')
    notes = ['', 'Accuracies are fractions, mean ± sample standard deviation (n - 1) over the n runs of a row '
             '(runs that differ only in seed, run folder, device or logging options); one run: its value. '
             'Best: the best test accuracy (SLA: the test accuracy at the best validation single_acc, the '
             'number the paper reports; on the large datasets, which have no validation split, at the best test '
             'single_acc); final: the last evaluation. MetaSemi also as test error in %, as its '
             'paper reports it.']
    kinds = {'maxl' if r['script'] in MAXL_SCRIPTS else r['script'] for r in rows}
    notes.append('Time per run: ' + '; '.join(TIME_NOTES[k] for k in TIME_NOTES if k in kinds) + '.')
    empty = [run['path'] for run in runs if not measures(run)]
    if empty:
        notes.append('Not in the table (no evaluation in metrics.csv yet): ' + ', '.join(empty) + '.')
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
    """One PNG: a subplot per kind of run (the three MAXL scripts together, SLA, MetaSemi), one line per run."""
    settings = {}
    for r in build_rows(runs):
        for run, _ in r['runs']:
            settings.setdefault(id(run), r['setting'])
    kinds = [k for k in ('maxl', 'train_sla', 'train_meta_semi')
             if any((run['script'] in MAXL_SCRIPTS) == (k == 'maxl') and (k == 'maxl' or run['script'] == k)
                    for run in runs if run['rows'])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(8 * len(kinds), 5.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = sorted((run for run in runs if run['rows'] and
                       (run['script'] in MAXL_SCRIPTS if kind == 'maxl' else run['script'] == kind)),
                      key=lambda run: SCRIPTS.index(run['script']))     # Single, Human, MAXL as in the paper
        for k, (run, label) in enumerate(zip(mine, curve_labels(mine, settings))):
            colour = f'C{k % 10}'
            rows = run['rows']
            if kind == 'maxl':
                ax.plot([r['epoch'] + 1 for r in rows], [r['test_acc'] for r in rows], color=colour, label=label)
                ax.set_xlabel('epoch'), ax.set_ylabel('test accuracy (primary task)')
            elif kind == 'train_sla':
                x = [r['iteration'] for r in rows]
                ax.plot(x, [r['test_single_acc'] for r in rows], color=colour, label=label + ': test')
                if 'val_single_acc' in rows[0]:          # the large datasets have no validation split
                    ax.plot(x, [r['val_single_acc'] for r in rows], color=colour, linestyle='--',
                            label=label + ': val')
                ax.set_xlabel('iteration'), ax.set_ylabel('single_acc (val dashed, test solid)')
            else:
                ax.plot([r['step'] for r in rows], [100 * (1 - r['test_acc']) for r in rows], color=colour,
                        label=label)
                ax.set_xlabel('step'), ax.set_ylabel('test error (%)')
        datasets = ', '.join(sorted({dataset_of(run['cfg']) for run in mine}))
        ax.set_title(f'{PLOT_TITLES[kind]}\nthese runs: {datasets}', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=90, format='png')
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', metavar='RUN', help='run folders or globs of them (e.g. logs/*/*)')
    p.add_argument('--plot', metavar='FILE.png', default='',
                   help='also draw the learning curves into this PNG (needs matplotlib)')
    args = p.parse_args(argv)
    plt = import_pyplot() if args.plot else None        # a missing optional extra stops before any output
    runs = [read_run(path) for path in expand(args.runs)]
    print(table(runs))
    if args.plot:
        if not any(run['rows'] for run in runs):
            raise UserError('nothing to plot: none of the runs has an evaluation in its metrics.csv yet.')
        plot(runs, args.plot, plt)
        print(f'\nwrote {args.plot}')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
