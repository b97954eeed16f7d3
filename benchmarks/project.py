"""Projects the wall-clock time of a full paper run of each method from a bench.py result file.

A run's time is its steps times their measured seconds per step, plus its evaluations times the measured
seconds of one evaluation batch:

  MAXL       200 epochs of CIFAR-100 (50,000 training images at batch 100): each epoch 500 training steps
             (maxl_train, the mean over whole cycles of its sampled gradient cosine), a pass of 500 meta
             steps on the label generator (maxl_meta2: second order, the default; maxl_meta1: first order)
             and a test pass of 100 batches of 100 (eval_maxl).
  SLA        80,000 iterations (sla_rotation: 128 images x 4 rotations) and an evaluation every 1,000:
             the 5,000 validation and 10,000 test images at batch 128, each under the 4 rotations
             (40 + 79 batches, eval_sla).
  MetaSemi   400,000 steps (semi_meta_mixup: 128 labeled + 128 unlabeled, ConvLarge, CIFAR-10) and a test
             every 400 steps: 10,000 images at batch 100 (100 batches, eval_semi).

The counts come from the scripts' own defaults (HYPERPARAMETERS) and the real datasets' sizes. The
evaluation is timed, not derived: the eval_* rows of bench.py run one batch of the scripts' evaluation
functions (eval mode, no gradients; a partial last batch is counted as a full one). Not included: process
start-up, loading the data onto the device, torch.compile's warm-up, checkpoint writes at each evaluation,
the log lines.

reproduce.py list asks projection() for an experiment's hours: the runs of every setting bench.py times
(counted from the scripts' defaults and the setting's script, dataset and mode), summed and times the
seeds; the other settings are named unknown.

    python benchmarks/project.py benchmarks/results/cuda-float32.json benchmarks/results/cuda-amp-channels_last.json
    python benchmarks/project.py RESULT.json --json projection.json
"""
import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the statistic of a row used for its seconds per step (bench.py uses the same)
STATISTIC = {'maxl_train': 'mean_s'}


def real_sizes():
    """(train, test) images of the real CIFAR-100, CIFAR-10 and SVHN (the stand-ins' full sizes)."""
    import create_dataset
    return {name: d.synthetic.full for name, d in create_dataset.DATASETS.items()}


def maxl_parts(train_row='maxl_train', meta_row=None, flags=()):
    """A full run of one of the MAXL paper's scripts (their defaults: CIFAR-100, 200 epochs; or the --dataset,
    --epochs and --num_samples_per_class of a setting's `flags`): [(bench row, count, what)]: the training steps
    (train_row: single, human or maxl_train), MAXL's meta steps (meta_row) and the tests. bench.py times the
    steps on CIFAR-100's 32-pixel images at batch 100, the time of a step on every dataset held on the device."""
    import create_dataset
    import model_vgg_maxl
    from machinery.experiments import flag_value
    M = model_vgg_maxl.HYPERPARAMETERS
    dataset = flag_value(list(flags), '--dataset', M['dataset'])
    n_train, n_test = real_sizes()[dataset]
    per_class = int(flag_value(list(flags), '--num_samples_per_class', M['num_samples_per_class']))
    if per_class:
        n_train = min(n_train, per_class * create_dataset.DATASETS[dataset].num_classes)
    epochs, B = int(flag_value(list(flags), '--epochs', M['epochs'])), M['batch_size']
    steps, test_batches = epochs * math.ceil(n_train / B), epochs * math.ceil(n_test / B)
    return ([(train_row, steps, 'training steps')] + ([(meta_row, steps, 'meta steps')] if meta_row else [])
            + [('eval_maxl', test_batches, 'test batches')])


def sla_parts(row, dataset):
    """A full SLA run on a CIFAR dataset (train_sla's defaults): its iterations (bench row `row`) and the
    evaluation batches (validation + test)."""
    import train_sla
    S = train_sla.HYPERPARAMETERS
    n_test = real_sizes()[dataset][1]
    N, B = S['total_steps'], S['batch_size']
    per_evaluation = math.ceil(S['val_size'] / B) + math.ceil(n_test / B)
    return [(row, N, 'iterations'),
            ('eval_sla', math.ceil(N / S['eval_every']) * per_evaluation, 'evaluation batches (validation + test)')]


def semi_parts(row, dataset):
    """A full MetaSemi run on CIFAR or SVHN (train_meta_semi's defaults): its steps (bench row `row`) and
    the test batches."""
    import train_meta_semi
    T = train_meta_semi.HYPERPARAMETERS
    n_test = real_sizes()[dataset][1]
    N = T['total_steps']
    tests = math.ceil(N / T['eval_every']) * math.ceil(n_test / T['test_batch_size'])
    return [(row, N, 'steps'), ('eval_semi', tests, 'test batches')]


def paper_runs():
    """The full runs of the papers: a list of dict(method, parts=[(bench row, count, what is counted)])."""
    import model_vgg_maxl
    import train_meta_semi
    import train_sla
    M, S, T = model_vgg_maxl.HYPERPARAMETERS, train_sla.HYPERPARAMETERS, train_meta_semi.HYPERPARAMETERS
    runs = [dict(method=f'MAXL, {"second order (jvp)" if order == 2 else "first order"}, {M["epochs"]} epochs',
                 parts=maxl_parts(meta_row=row)) for order, row in ((2, 'maxl_meta2'), (1, 'maxl_meta1'))]
    runs.append(dict(method=f'SLA, rotation, {S["model"]}, {S["total_steps"]:,} iterations',
                     parts=sla_parts('sla_rotation', S['dataset'])))
    runs.append(dict(method=f'MetaSemi, meta + mixup, {T["architecture"]}, {T["total_steps"]:,} steps',
                     parts=semi_parts('semi_meta_mixup', T['dataset'])))
    return runs


def project(result, runs):
    """Each run of `runs` projected from `result` (a bench.py JSON, loaded): seconds of each part, the
    total and the evaluation's share in hours, and the rows the result lacks (then no total)."""
    rows = result.get('rows', {})
    out = []
    for run in runs:
        missing = [row for row, _, _ in run['parts'] if row not in rows]
        parts = []
        for row, count, what in run['parts']:
            if row in rows:
                s = rows[row][STATISTIC.get(row, 'median_s')]
                parts.append(dict(row=row, count=count, what=what, seconds_each=s, seconds=count * s))
        total = None if missing else sum(p['seconds'] for p in parts)
        evaluation = sum(p['seconds'] for p in parts if p['row'].startswith('eval_'))
        out.append(dict(method=run['method'], parts=parts, missing=missing,
                        hours=None if total is None else total / 3600,
                        evaluation_hours=None if missing else evaluation / 3600))
    return out


def where(result):
    """The device and flags a result was measured with, in words."""
    device = result.get('gpu') or result.get('device', '?')
    precision = result.get('precision') or ('+'.join(result.get('flags', [])) or 'float32')
    return f'{device}, {precision}, torch {result.get("torch", "?")}' + (f', {result["date"]}' if result.get('date') else '')


def table(projections):
    lines = ['| method | measured s/step | evaluation s/batch | projected hours (evaluation) | device, flags |',
             '|---|---|---|---|---|']
    for source, rows in projections:
        for p in rows:
            steps = ', '.join(f'{q["row"]} {q["seconds_each"]:.4f}' for q in p['parts'] if not q['row'].startswith('eval_'))
            evals = ', '.join(f'{q["row"]} {q["seconds_each"]:.4f}' for q in p['parts'] if q['row'].startswith('eval_'))
            hours = (f'missing rows: {", ".join(p["missing"])}' if p['missing']
                     else f'{p["hours"]:.2f} ({p["evaluation_hours"]:.2f})')
            lines.append(f'| {p["method"]} | {steps} | {evals} | {hours} | {source} |')
    return '\n'.join(lines)


# ---- `reproduce.py list`: an experiment's settings projected ----

def bench_parts(flags):
    """A full run of a setting as benchmarks/py counts it (its maxl_parts, sla_parts, semi_parts):
    [(bench.py row, count, what)], or None where bench.py times no step of its kind (K-means' autoencoder,
    SLA's da / mt / sla+sd / colour permutations, the labeled-only MetaSemi baseline, ImageNet)."""
    import train_sla
    from machinery.experiments import dataset_of, flag_value
    script = flags[0]
    if script.startswith('model_vgg') and (flag_value(flags, '--model', 'vgg16') != 'vgg16'
                                           or dataset_of(flags) not in real_sizes()):
        return None                                  # bench.py times the VGG-16s on the 32-pixel datasets only
    if script == 'model_vgg_single.py':
        return maxl_parts('single', flags=flags)
    if script == 'model_vgg_human.py':
        return None if flag_value(flags, '--aux_labels') == 'kmeans' else maxl_parts('human', flags=flags)
    if script == 'model_vgg_maxl.py':
        return maxl_parts(meta_row='maxl_meta2' if flag_value(flags, '--meta_order', '2') == '2' else 'maxl_meta1',
                          flags=flags)
    dataset = dataset_of(flags)
    if dataset not in real_sizes():
        return None
    if script == 'train_sla.py':
        S = train_sla.HYPERPARAMETERS
        mode, aug = flag_value(flags, '--mode', S['mode']), flag_value(flags, '--aug', S['aug'])
        row = 'sla_baseline' if mode == 'baseline' else 'sla_rotation' if (mode, aug) == ('sla', 'rotation') else None
        return row and sla_parts(row, dataset)
    baseline, mixup = '--baseline' in flags, '--mix-up' in flags
    row = {(False, True): 'semi_meta_mixup', (True, True): 'semi_baseline_mixup'}.get((baseline, mixup))
    return row and semi_parts(row, dataset)


def projection(experiment, seeds, results_files):
    """Text: the projected device time of the experiment's full runs (all its settings, `seeds` seeds each),
    per bench.py result; 'unknown' where no result times a setting."""
    from machinery.experiments import EXPERIMENTS
    settings = EXPERIMENTS[experiment]['settings']
    parts = {name: bench_parts(flags) for name, flags in settings.items()}
    known = [n for n, p in parts.items() if p]
    if not results_files:
        return 'unknown (no bench.py result in benchmarks/results/)'
    texts = []
    for path, result in results_files:
        runs = [dict(method=n, parts=parts[n]) for n in known]
        hours = [p['hours'] for p in project(result, runs)]
        place = where(result)
        if not known or any(h is None for h in hours):
            texts.append(f'unknown on {place}')
            continue
        total = sum(hours) * seeds
        missing = len(settings) - len(known)
        texts.append(f'{total:,.0f} h on {place}' + (f' + {missing} of {len(settings)} settings unknown '
                                                     '(not timed by bench.py)' if missing else ''))
    return '; '.join(texts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('results', nargs='+', help='bench.py JSON files (each with the method and eval_* rows)')
    p.add_argument('--json', default='', help='also write the projection here')
    args = p.parse_args(argv)
    runs = paper_runs()
    projections, dump = [], []
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        if result.get('concurrent'):
            print(f'{path}: a --concurrent result (aggregates of copies), not a table of rows: skipped')
            continue
        rows = project(result, runs)
        projections.append((where(result), rows))
        dump.append(dict(source=path, measured_on=where(result), runs=rows))
    text = table(projections)
    print(text)
    needed = sorted({row for run in runs for row, _, _ in run['parts']})
    if any(p['missing'] for _, rows in projections for p in rows):
        print(f'\nA full projection needs the rows: python benchmarks/bench.py --only {",".join(needed)} ...')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(runs=runs, projections=dump, table=text), f, indent=1)
    return projections


if __name__ == '__main__':
    main()
