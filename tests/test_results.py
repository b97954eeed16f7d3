"""results.py (the table of run folders, seeds grouped; --plot) and plot_features.py's seed command line, on
tiny real runs made in this process on the synthetic stand-in."""
import csv
import glob
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import create_dataset
import model_vgg_single
import results
import train_meta_semi
from machinery import large_datasets
from conftest import run_in_process

PNG = b'\x89PNG\r\n\x1a\n'


def in_process(main, args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two Single runs of one setting (seeds 1, 2) under one logdir, one Single run of another width, one
    MetaSemi run (with mixup) in a --save-path folder."""
    tmp = tmp_path_factory.mktemp('results')
    root = str(tmp / 'data')
    for name in ('cifar100', 'cifar10'):
        create_dataset.write_synthetic(name, os.path.join(root, 'synthetic'), seed=0, sizes=(600, 200))
    single = ['--synthetic', '--data_root', root, '--epochs', '2', '--batch_size', '100', '--device', 'cpu']
    for seed in ('1', '2'):
        in_process(model_vgg_single.main, single + ['--width', '0.0625', '--logdir', str(tmp / 'logs'),
                                                    '--seed', seed])
    in_process(model_vgg_single.main, single + ['--width', '0.125', '--run_dir', str(tmp / 'other'), '--seed', '1'])
    in_process(train_meta_semi.main, ['--synthetic', '--dataset', 'cifar10', '--num-label', '100', '--total-steps',
                                      '6', '--warmup', '2', '--test-freq', '3', '--width', '0.0625', '--batch-size',
                                      '16', '--mix-up', '--data-path', root, '--device', 'cpu',
                                      '--save-path', str(tmp / 'semi')])
    seeds = sorted(glob.glob(str(tmp / 'logs' / 'model_vgg_single' / '*')))
    assert len(seeds) == 2
    return {'tmp': tmp, 'seeds': seeds, 'other': str(tmp / 'other'), 'semi': str(tmp / 'semi')}


def metrics(run):
    with open(os.path.join(run, 'metrics.csv')) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def table_rows(stdout):
    """The table's body rows as lists of cells."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith('| ') and not ln.startswith('| method')]
    return [[c.strip() for c in ln.strip('|').split(' | ')] for ln in lines]


def test_mean_std_and_grouping_on_known_numbers():
    mean, std, n = results.mean_std([0.5, 0.7])
    assert n == 2 and mean == pytest.approx(0.6) and std == pytest.approx(0.141421356, abs=1e-8)   # n - 1
    assert results.mean_std([0.3]) == (0.3, None, 1)
    assert results.fmt_acc([0.5, 0.7]) == '0.6000 ± 0.1414'
    assert results.fmt_acc([0.5, 0.7], error=True) == '0.6000 ± 0.1414 (error 40.00 ± 14.14 %)'
    cfg = {'script': 'model_vgg_single', 'width': 0.5, 'epochs': 2, 'seed': 1, 'run_dir': 'a', 'logdir': 'logs',
           'run_name': '', 'device': 'cpu', 'data_root': 'x', 'resume': ''}
    same = cfg | {'seed': 2, 'run_dir': 'b', 'logdir': 'elsewhere', 'run_name': 'r', 'device': 'cuda',
                  'data_root': 'y', 'resume': 'b'}
    assert results.group_key(cfg) == results.group_key(same)
    assert results.group_key(cfg) != results.group_key(cfg | {'width': 0.25})
    assert results.group_key(cfg) != results.group_key(cfg | {'epochs': 3})

    def fake(seed, accs, width=0.5):
        rows = [{'epoch': float(e), 'step': float(e + 1), 'test_acc': a, 'seconds': 2.0} for e, a in enumerate(accs)]
        return {'path': f'run{seed}', 'script': 'model_vgg_single', 'cfg': cfg | {'seed': seed, 'width': width},
                'rows': rows, 'resumed_at': []}
    one, two = fake(1, [0.1, 0.9, 0.4, 0.5, 0.5, 0.5, 0.6]), fake(2, [0.2, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7])
    rows = results.build_rows([one, two, fake(3, [0.2, 0.3], width=1.0)])
    assert [len(r['runs']) for r in rows] == [2, 1]
    text = results.table([one, two, fake(3, [0.2, 0.3], width=1.0)])
    (a, b) = table_rows(text)
    # MAXL's scripts report the mean of the last 5 epochs (0.5 and 0.7), the best test (0.9, 0.7) beside it
    assert a[3] == '2 (1, 2)' and a[4] == '0.6000 ± 0.1414' and a[5] == '0.8000 ± 0.1414'
    assert a[6] == '0.6500 ± 0.0707' and a[7] == '7 epochs' and a[8] == '14.0 s' and 'width 0.5' in a[2]
    assert b[3] == '1 (3)' and b[4] == '0.2500' and b[5] == '0.3000' and 'width 1' in b[2]       # 2 epochs: both
    assert 'the mean test accuracy of the last 5 evaluations' in text and 'selected on the test set' in text


def test_table_groups_the_seeds(runs):
    p = run_in_process('results.py', os.path.join(runs['tmp'], 'logs', '*', '*'), runs['other'], runs['semi'])
    assert p.returncode == 0, p.stderr
    rows = table_rows(p.stdout)
    single = [r for r in rows if r[0].startswith('Single')]
    assert len(single) == 2 and len(rows) == 3, p.stdout
    grouped = next(r for r in single if 'width 0.0625' in r[2])
    other = next(r for r in single if 'width 0.125' in r[2])
    # expected values from the runs' own metrics.csv
    ms = [metrics(run) for run in runs['seeds']]
    last5 = [statistics.fmean(r['test_acc'] for r in m[-5:]) for m in ms]
    best = [max(r['test_acc'] for r in m) for m in ms]
    final = [m[-1]['test_acc'] for m in ms]
    assert grouped[1] == 'CIFAR-100 (synthetic)'
    assert grouped[3] == '2 (1, 2)'
    assert grouped[4] == f'{statistics.fmean(last5):.4f} ± {statistics.stdev(last5):.4f}'
    assert grouped[5] == f'{statistics.fmean(best):.4f} ± {statistics.stdev(best):.4f}'
    assert grouped[6] == f'{statistics.fmean(final):.4f} ± {statistics.stdev(final):.4f}'
    assert grouped[7] == '2 epochs'
    assert grouped[8] == f'{statistics.fmean(sum(r["seconds"] for r in m) for m in ms):.1f} s'
    assert grouped[9] == '— (synthetic stand-in)'
    m = metrics(runs['other'])
    assert other[3] == '1 (1)' and other[5] == f'{max(r["test_acc"] for r in m):.4f}'
    assert other[6] == f'{m[-1]["test_acc"]:.4f}'
    (semi,) = [r for r in rows if r[0].startswith('MetaSemi + mixup')]
    m = metrics(runs['semi'])
    acc = max(r['test_acc'] for r in m)
    assert semi[4] == semi[5] == f'{acc:.4f} (error {100 * (1 - acc):.2f} %)' and semi[7] == '6 steps'
    assert 'num_label 100' in semi[2] and 'alpha 1' in semi[2]
    assert 'sample standard deviation' in p.stdout and 'Time per run' in p.stdout


def test_time_of_a_resumed_metasemi_run():
    # batch_time / data_time are means since the process started: 3 steps at 0.5 + 0.1, then resumed at step 3
    rows = [{'step': 3.0, 'batch_time': 0.5, 'data_time': 0.1, 'test_acc': 0.2},
            {'step': 9.0, 'batch_time': 1.0, 'data_time': 0.0, 'test_acc': 0.3}]
    run = {'script': 'train_meta_semi', 'rows': rows, 'log': 'run ...\nresumed at step 3, best accuracy so far 20\n'}
    assert results.run_seconds(run) == pytest.approx(3 * 0.6 + 6 * 1.0)
    assert results.run_seconds(run | {'log': ''}) == pytest.approx(9 * 1.0)
    sla = {'script': 'train_sla', 'rows': [{'iteration': 3.0, 'seconds_per_iteration': 2.0},
                                           {'iteration': 5.0, 'seconds_per_iteration': 1.0}], 'log': ''}
    assert results.run_seconds(sla) == pytest.approx(3 * 2.0 + 2 * 1.0)


def sla_run(folder, mode, rows, seed=0, dataset='cifar10'):
    """A run folder as train_sla.py writes it, with the metrics rows given."""
    os.makedirs(folder)
    cfg = {'script': 'train_sla', 'mode': mode, 'aug': 'rotation', 'dataset': dataset, 'synthetic': True,
           'model': 'cresnet20', 'width': 0.125, 'num_samples_per_class': 0, 'temperature': 1.0, 'seed': seed}
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, 'metrics.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(folder)


def test_sla_reports_the_test_accuracy_at_the_first_best_validation_in_two_rows(tmp_path):
    """SLA's number is the test accuracy at the best validation single_acc, the first such evaluation on a
    tie (not the best test accuracy): its sla mode gives two rows, SLA+SI (test_single_acc) and SLA+AG
    (test_agg_acc), chosen at the same evaluation; sla+sd one row; a large dataset (no validation split)
    is chosen on the test single_acc."""
    def row(it, val, single, agg):
        return {'iteration': it, 'lr': 0.1, 'seconds_per_iteration': 1.0, 'val_single_acc': val,
                'test_single_acc': single, 'test_agg_acc': agg}
    rows = [row(10, 0.5, 0.40, 0.45), row(20, 0.7, 0.42, 0.50), row(30, 0.7, 0.60, 0.65), row(40, 0.6, 0.70, 0.75)]
    sla = sla_run(tmp_path / 'sla', 'sla', rows)
    sd = sla_run(tmp_path / 'sd', 'sla+sd', rows)
    large = sla_run(tmp_path / 'large', 'sla', [{k: v for k, v in r.items() if not k.startswith('val_')}
                                                 for r in rows], dataset='imagenet')
    p = run_in_process('results.py', sla, sd, large)
    assert p.returncode == 0, p.stderr
    table = {(r[0], r[1]): r for r in table_rows(p.stdout)}
    assert sorted(table) == [('SLA+AG, rotation (`train_sla`)', 'CIFAR-10 (synthetic)'),
                             ('SLA+AG, rotation (`train_sla`)', 'imagenet (synthetic)'),
                             ('SLA+SD, rotation (`train_sla`)', 'CIFAR-10 (synthetic)'),
                             ('SLA+SI, rotation (`train_sla`)', 'CIFAR-10 (synthetic)'),
                             ('SLA+SI, rotation (`train_sla`)', 'imagenet (synthetic)')]
    best_final = {k: (r[4], r[6]) for k, r in table.items()}
    assert best_final[('SLA+SI, rotation (`train_sla`)', 'CIFAR-10 (synthetic)')] == ('0.4200', '0.7000')
    assert best_final[('SLA+AG, rotation (`train_sla`)', 'CIFAR-10 (synthetic)')] == ('0.5000', '0.7500')
    assert best_final[('SLA+SD, rotation (`train_sla`)', 'CIFAR-10 (synthetic)')] == ('0.4200', '0.7000')
    assert best_final[('SLA+SI, rotation (`train_sla`)', 'imagenet (synthetic)')] == ('0.7000', '0.7000')
    assert best_final[('SLA+AG, rotation (`train_sla`)', 'imagenet (synthetic)')] == ('0.7500', '0.7500')


def test_paper_numbers_only_for_the_real_datasets():
    cfg = {'script': 'train_meta_semi', 'dataset': 'cifar10', 'num_label': 4000, 'architecture': 'convlarge',
           'width': 1.0, 'mix_up': True, 'baseline': False, 'synthetic': False}
    assert results.paper_number(cfg, 'MetaSemi + mixup', 400000) == '7.78 % error (the MetaSemi paper, arXiv 2007.03966)'
    assert results.paper_number(cfg | {'dataset': 'svhn', 'num_label': 1000}, 'MetaSemi + mixup', 400000).startswith(
        '3.15 % error (')
    # the ablation's arms from the authors' slides, with that source and the inference named
    slides = results.paper_number(cfg | {'mix_up': False, 'baseline': True}, 'labeled only (baseline)', 400000)
    assert slides.startswith('15.43 % error (the MetaSemi authors\' slides') and 'inference' in slides
    assert results.paper_number(cfg, 'MetaSemi', 400000).startswith('11.63 % error (')
    assert results.paper_number(cfg, 'mixup baseline', 1000).startswith('11.10 % error (after 400,000 steps) (')
    imagenet = cfg | {'dataset': 'imagenet', 'num_label': 0, 'label_fraction': 0.1, 'architecture': 'resnet18'}
    assert results.paper_number(imagenet, 'labeled only (baseline)', 5).startswith('53.65 % top-1 / 31.01 % top-5 error (')
    assert results.paper_number(cfg | {'synthetic': True}, 'MetaSemi + mixup', 400000) == '— (synthetic stand-in)'
    assert 'not available offline' in results.paper_number(cfg | {'num_label': 250}, 'MetaSemi + mixup', 400000)
    assert 'not available offline' in results.paper_number({'script': 'model_vgg_maxl', 'synthetic': False},
                                                           'MAXL, first order', 200)
    assert 'not available offline' in results.paper_number({'script': 'train_sla', 'synthetic': False}, 'SLA+SI', 1)


def test_plot_without_matplotlib_says_how_to_get_it(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)            # as where it is not installed
    out = os.path.join(runs['tmp'], 'no.png')
    p = run_in_process('results.py', *runs['seeds'], '--plot', out)
    assert p.returncode == 2 and 'pip install matplotlib' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and p.stdout == '' and not os.path.exists(out)


MPL_MISSING = 'matplotlib is not installed (an optional extra, not in requirements.txt): the PNG half is not run'


def test_plot_writes_a_png(runs):
    pytest.importorskip('matplotlib', reason=MPL_MISSING)
    out = os.path.join(runs['tmp'], 'plots', 'curves.png')
    p = run_in_process('results.py', *runs['seeds'], runs['other'], runs['semi'], '--plot', out)
    assert p.returncode == 0, p.stderr
    with open(out, 'rb') as f:
        data = f.read()
    assert len(data) > 1000 and data[:8] == PNG


def test_a_folder_that_is_not_a_run(runs, tmp_path):
    """One folder that is not a run among runs: the table of the others, that folder named under it; only
    folders that are not runs: exit code 2."""
    p = run_in_process('results.py', runs['seeds'][0], str(tmp_path))
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr
    table, below = p.stdout.split('Not in the table: 1 folder(s) that could not be read:')
    assert '| Single (`model_vgg_single`) |' in table
    assert f"- {tmp_path}: '{tmp_path}' is not a run folder: it has no config.json." in below, p.stdout
    p = run_in_process('results.py', str(tmp_path))
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert f"'{tmp_path}' is not a run folder: it has no config.json" in p.stderr, p.stderr
    p = run_in_process('results.py', os.path.join(runs['tmp'], 'logs'))          # the logdir itself: a hint
    assert p.returncode == 2 and 'Traceback' not in p.stderr and "/logs/*/*'" in p.stderr, p.stderr
    p = run_in_process('results.py', str(tmp_path / '*'))                        # a glob that matches nothing
    assert p.returncode == 2 and 'no folder matches' in p.stderr and 'Traceback' not in p.stderr, p.stderr
    (tmp_path / 'config.json').write_text(json.dumps({'script': 'somebody_else'}))
    p = run_in_process('results.py', str(tmp_path))
    assert p.returncode == 2 and 'names no script of this project' in p.stderr and 'Traceback' not in p.stderr


def seed_line(run):
    return ['--dataset', 'cifar10', '--checkpoint-path', os.path.join(run, 'model_best.pth'),
            '--index-path', os.path.join(run, 'label_indices.txt'),
            '--save-path', os.path.join(run, 'visualization'), '--num-point', '5000']


def test_plot_features_checks_the_seed_command_line_and_says_how_to_get_matplotlib(runs, monkeypatch):
    wrong = run_in_process('plot_features.py', *seed_line(runs['semi'])[2:], '--dataset', 'svhn')
    assert wrong.returncode == 2 and 'does not agree with the run' in wrong.stderr and 'Traceback' not in wrong.stderr
    monkeypatch.setitem(sys.modules, 'matplotlib', None)            # as where it is not installed
    p = run_in_process('plot_features.py', *seed_line(runs['semi']))
    assert p.returncode == 2 and 'pip install matplotlib' in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(runs['semi'], 'visualization'))


def test_plot_features_draws_the_seed_command_lines_picture(runs):
    pytest.importorskip('matplotlib', reason=MPL_MISSING)
    run = runs['semi']
    p = run_in_process('plot_features.py', *seed_line(run))          # t-SNE: scikit-learn is in requirements.txt
    assert p.returncode == 0, p.stderr
    assert 'using ' + os.path.join(run, 'best.pt') in p.stdout
    with open(os.path.join(run, 'visualization', 'features_tsne.png'), 'rb') as f:
        assert f.read(8) == PNG
        assert os.path.isfile(os.path.join(run, 'visualization', 'features_tsne.npz'))


# ---- the number of processes, same-seed curves, settings a dataset does not use ----------------------------

SINGLE_CFG = {'script': 'model_vgg_single', 'epochs': 2, 'batch_size': 50, 'lr': 0.01, 'lr_step': 50,
              'lr_gamma': 0.5, 'primary_level': 2, 'width': 0.0625, 'seed': 0, 'synthetic': True,
              'synthetic_size': 'small', 'amp': False, 'channels_last': False, 'compile': False, 'tf32': True,
              'sync_bn': False, 'device': 'cpu', 'logdir': 'logs', 'run_name': '', 'run_dir': ''}


def write_run(path, cfg, accs, log=''):
    """A run folder as a training script leaves it (config.json, metrics.csv, log.txt), written by hand."""
    os.makedirs(path)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(cfg, f)
    with open(os.path.join(path, 'metrics.csv'), 'w') as f:
        f.write('epoch,step,test_acc,seconds\n' + ''.join(f'{e},{e + 1},{a},1.0\n' for e, a in enumerate(accs)))
    with open(os.path.join(path, 'log.txt'), 'w') as f:
        f.write(log)
    return str(path)


def test_runs_on_other_numbers_of_processes_are_other_settings(tmp_path):
    """Two processes of 50 images each are a global batch of 100: another setting than one process of 50,
    never a seed of it. The number comes from config.json, or, for a run from before it was recorded there,
    from the start line of its log.txt."""
    one = write_run(tmp_path / 'one', SINGLE_CFG | {'processes': 1, 'global_batch': 50}, [0.2, 0.3])
    two = write_run(tmp_path / 'two', SINGLE_CFG | {'processes': 2, 'global_batch': 100}, [0.4, 0.5])
    old = write_run(tmp_path / 'old', SINGLE_CFG | {'seed': 1}, [0.6, 0.7],
                    log=f'run {tmp_path / "old"} on cpu, 2 processes (gloo), batch 50 per process = 100 in all\n')
    p = run_in_process('results.py', one, two, old)
    assert p.returncode == 0, p.stderr
    rows = table_rows(p.stdout)
    assert len(rows) == 2, p.stdout
    by_n = {r[3]: r for r in rows}
    assert set(by_n) == {'1 (0)', '2 (0, 1)'}, p.stdout
    assert 'processes 1' in by_n['1 (0)'][2] and 'processes 2' in by_n['2 (0, 1)'][2], p.stdout


def test_a_run_records_its_processes_and_global_batch(runs):
    for run in runs['seeds'] + [runs['semi']]:
        with open(os.path.join(run, 'config.json')) as f:
            cfg = json.load(f)
        assert cfg['processes'] == 1 and cfg['global_batch'] == cfg['batch_size'], run


def test_a_run_records_what_decides_its_numbers_and_a_resume_on_other_threads_says_so(runs, tmp_path):
    """config.json's environment: the threads the run computed with, torch's kernels and versions, the device,
    the commit and whether the tree was modified; --resume with another thread count says once that the
    continuation is not bit-exact and keeps both starts."""
    import importlib.metadata
    with open(os.path.join(runs['seeds'][0], 'config.json')) as f:
        env = json.load(f)['environment']
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, cwd=results.ROOT).stdout.strip()
    assert env['threads'] == 1 and env['torch'] == torch.__version__ and env['torchvision'] == importlib.metadata.version('torchvision')
    assert env['device'].startswith('cpu') and env['commit'] == commit and isinstance(env['modified'], bool)
    assert env['cpu_kernels'] == torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model_vgg_single.main(['--resume', runs['other'], '--epochs', '3'])
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(runs['other'], 'config.json')) as f:
        cfg = json.load(f)
    assert cfg['environment']['threads'] == 1 and [e['threads'] for e in cfg['environment_resumed']] == [2]
    with open(os.path.join(runs['other'], 'log.txt')) as f:
        notes = [ln for ln in f if 'not bit-exact' in ln]
    assert len(notes) == 1 and 'threads 2 (it started with 1)' in notes[0] and 'OMP_NUM_THREADS=1' in notes[0]


def test_the_seeds_of_a_row_that_ran_on_other_threads_are_one_row_that_says_so(tmp_path):
    env = {'threads': 1, 'torch': '2.14.1', 'device': 'cpu (x)', 'commit': 'abc', 'modified': False}
    one = write_run(tmp_path / 'one', SINGLE_CFG | {'environment': env}, [0.5, 0.6])
    two = write_run(tmp_path / 'two', SINGLE_CFG | {'seed': 1, 'environment': env | {'threads': 2}}, [0.5, 0.7])
    same = write_run(tmp_path / 'same', SINGLE_CFG | {'seed': 1, 'width': 0.125, 'environment': env}, [0.5, 0.7])
    p = run_in_process('results.py', one, two, same)
    assert p.returncode == 0, p.stderr
    rows = {r[3]: r for r in table_rows(p.stdout)}
    assert set(rows) == {'2 (0, 1)', '1 (1)'}, p.stdout
    assert rows['2 (0, 1)'][2].endswith('runs or their starts differ in threads 1 (seed 0), 2 (seed 1)'), p.stdout
    assert 'differ' not in rows['1 (1)'][2]


class FakePyplot:
    """Records the labels plot() gives its curves (no matplotlib needed)."""

    def __init__(self):
        self.labels = []
        outer = self

        class Axes:
            def plot(self, *args, label=None, **kw):
                outer.labels.append(label)

            def __getattr__(self, name):
                return lambda *a, **k: None

        class Figure:
            def __getattr__(self, name):
                return lambda *a, **k: None

        self.Axes, self.Figure = Axes, Figure

    def subplots(self, rows, cols, **kw):
        return self.Figure(), [[self.Axes() for _ in range(cols)]]

    def close(self, fig):
        pass


def test_curves_of_the_same_setting_and_seed_are_labelled_by_run_name(tmp_path):
    runs = [results.read_run(write_run(tmp_path / name, SINGLE_CFG | {'processes': 1}, accs))
            for name, accs in (('first-try', [0.2, 0.3]), ('second-try', [0.4, 0.5]))]
    runs.append(results.read_run(write_run(tmp_path / 'other', SINGLE_CFG | {'processes': 1, 'seed': 5}, [0.1])))
    plt = FakePyplot()
    results.plot(runs, str(tmp_path / 'curves.png'), plt)
    assert len(plt.labels) == 3 and len(set(plt.labels)) == 3, plt.labels
    assert 'first-try' in plt.labels[0] and 'second-try' in plt.labels[1] and 'seed 5' in plt.labels[2], plt.labels


SEMI_IMAGENET = {'script': 'train_meta_semi', 'dataset': 'imagenet', 'num_label': 4000, 'label_fraction': 0.1,
                 'label_list': '', 'architecture': 'resnet18', 'mix_up': True, 'alpha': 1.0, 'weight': 1.0,
                 'total_steps': 400000, 'batch_size': 64, 'epsilon': 0.01, 'lr': 0.1, 'warmup': 4000, 'gamma': 0.1,
                 'milestones': [300000, 350000], 'weight_decay': 1e-4, 'momentum': 0.9, 'baseline': False,
                 'eval_every': 400, 'width': 1.0, 'seed': 1234, 'global_meta_gradient': False,
                 'lr_schedule': 'cosine', 'epochs': 600, 'warmup_epochs': 5, 'weight_ramp': False,
                 'image_size': 224, 'test_batch_size': 50, 'num_classes': 1000, 'synthetic': False, 'processes': 8}


def test_settings_a_run_does_not_use_are_left_out_of_its_row():
    """MetaSemi on ImageNet labels a fraction of every class: num_label (4,000, CIFAR's budget) is not its
    setting, nor are the step schedule's values of an epoch-based cosine run; on CIFAR the reverse."""
    imagenet = results.setting(SEMI_IMAGENET)
    assert 'num_label' not in imagenet and imagenet['label_fraction'] == 0.1
    assert not {'total_steps', 'warmup', 'eval_every', 'milestones', 'gamma'} & set(imagenet)
    cifar = results.setting(SEMI_IMAGENET | {'dataset': 'cifar10', 'label_fraction': 0.0, 'epochs': 0,
                                             'lr_schedule': 'step', 'architecture': 'convlarge'})
    assert cifar['num_label'] == 4000 and not {'label_fraction', 'image_size', 'epochs', 'warmup_epochs',
                                               'num_classes', 'label_list'} & set(cifar)
    def fake(cfg, path):
        return {'path': path, 'script': cfg['script'], 'cfg': cfg, 'resumed_at': [],
                'rows': [{'step': 10.0, 'test_acc': 0.5, 'batch_time': 0.1, 'data_time': 0.0}]}
    text = results.table([fake(SEMI_IMAGENET, 'a'), fake(SEMI_IMAGENET | {'dataset': 'cifar10', 'label_fraction': 0.0,
                                                                         'architecture': 'convlarge'}, 'b')])
    imagenet_row, cifar_row = table_rows(text)
    assert 'num_label' not in imagenet_row[2] and 'label_fraction 0.1' in imagenet_row[2], imagenet_row
    assert 'num_label 4000' in cifar_row[2] and 'label_fraction' not in cifar_row[2], cifar_row


def test_the_metasemi_imagenet_start_line_lists_only_what_the_run_uses(tmp_path, monkeypatch):
    """The start line lists the configuration the run uses, not the whole namespace: no CIFAR label budget
    (num_label) on ImageNet."""
    from machinery.options import UserError

    def stop(*a, **k):
        raise UserError('stopped after the start line')
    monkeypatch.setattr(large_datasets, 'FileSplits', stop)
    p = run_in_process('train_meta_semi.py', '--dataset', 'imagenet', '--synthetic', '--data-path', tmp_path / 'data',
                       '--device', 'cpu', '--run_dir', tmp_path / 'r')
    assert p.returncode == 2 and 'stopped after the start line' in p.stderr, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith('MetaSemi (')]
    assert 'Namespace' not in line and 'num_label' not in line and 'label_fraction=0.1' in line, line
    assert 'architecture=' in line and 'resnet18' in line, line


def test_a_maxl_cell_is_the_mean_of_the_last_five_epochs_and_says_so():
    """MAXL's first version (Figure 4, the maxl-psi experiment) reports the mean test accuracy of the last 5
    epochs: not the best, not the last."""
    accs = [0.1, 0.9, 0.2, 0.3, 0.4, 0.5, 0.6]
    run = {'script': 'model_vgg_maxl', 'cfg': {}, 'rows': [{'epoch': float(k), 'test_acc': a} for k, a in enumerate(accs)]}
    assert results.value_of(run, 'test_acc') == pytest.approx(statistics.mean(accs[-5:]))
    assert results.value_of({**run, 'rows': run['rows'][:2]}, 'test_acc') == pytest.approx(0.5)   # fewer: all of them
    part = dict(title='', measure='accuracy', paper={}, table={'psi 2': {'MAXL': ('a', 'test_acc')}})
    text = results.table_text(part, {'a': [run]}, {'a': 0}, quick=False)
    assert '| psi 2 | 40.00 (1 seed) |' in text and 'the mean test accuracy of the last 5 evaluations' in text
