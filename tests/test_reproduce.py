"""reproduce.py, the experiment runner, on the tiny synthetic stand-in: two settings of MAXL's Figure 3 run
through the scripts and give results.md and the figure, and a second call starts nothing; submitit's local
executor runs a setting; the command lines of new, stopped and several-GPU runs; a failed run is reported
with its log and does not stop the others; the table's arithmetic on hand-made run folders; every bad
input exits with code 2 before anything is started or written."""
import json
import os
import sys
import types

import pytest

import reproduce as reproduce_module
from conftest import run_in_process

PNG = b'\x89PNG\r\n\x1a\n'


def reproduce(*args):
    return run_in_process('reproduce.py', *args)


def started(out):
    return [ln for ln in out.splitlines() if ln.startswith('[start ')]


def test_two_settings_run_then_a_second_call_starts_nothing(tiny_root, tmp_path):
    pytest.importorskip('matplotlib', reason='the figure needs matplotlib (requirements.txt)')
    runs = str(tmp_path / 'fig3')
    args = ['maxl-fig3', '--quick', '--seeds', '0', '--only', 'single-p2', 'human-p2-a3', '--data_root', tiny_root,
            '--runs', runs, '--jobs', '2']
    first = reproduce(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = started(first.stdout)
    assert len(lines) == 2 and 'not the papers' in first.stdout
    # the commands are the scripts' own, one run folder per setting and seed
    assert any('model_vgg_single.py --primary_level 2 --synthetic' in ln and f'--run_dir {runs}/single-p2/seed0' in ln
               for ln in lines)
    assert any('model_vgg_human.py --primary_level 2 --aux_level 3 --aux_labels human' in ln for ln in lines)
    for setting in ('single-p2', 'human-p2-a3'):
        folder = os.path.join(runs, setting, 'seed0')
        assert {'config.json', 'metrics.csv', 'finished.json', 'output.txt'} <= set(os.listdir(folder))
    with open(os.path.join(runs, 'results.md')) as f:
        md = f.read()
    assert 'Synthetic stand-in' in md and 'No paper numbers beside synthetic results' in md
    row = next(ln for ln in md.splitlines() if ln.startswith('| 20 / 100 classes'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1].endswith('(1 seed)') and cells[4].endswith('(1 seed)')      # Single, Human
    assert cells[2] == cells[3] == cells[5] == '—'                               # Random, K-means, MAXL: not run
    with open(os.path.join(runs, 'figure3.png'), 'rb') as f:
        assert f.read(8) == PNG

    finished = os.path.getmtime(os.path.join(runs, 'single-p2', 'seed0', 'finished.json'))
    second = reproduce(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert started(second.stdout) == [] and '2 finished (skipped)' in second.stdout
    assert os.path.getmtime(os.path.join(runs, 'single-p2', 'seed0', 'finished.json')) == finished


def test_submitit_local_executor_runs_a_setting(tiny_root, tmp_path):
    pytest.importorskip('submitit', reason='--executor needs submitit (requirements.txt)')
    runs = str(tmp_path / 'local')
    out = reproduce('maxl-fig3', '--quick', '--seeds', '1', '--only', 'single-p1', '--data_root', tiny_root,
                    '--runs', runs, '--executor', 'local')
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(started(out.stdout)) == 1 and '[local job ' in out.stdout
    folder = os.path.join(runs, 'single-p1', 'seed1')
    with open(os.path.join(folder, 'submitted.json')) as f:
        assert json.load(f)['executor'] == 'local'
    assert os.path.isfile(os.path.join(folder, 'finished.json'))
    with open(os.path.join(runs, 'results.md')) as f:
        assert '(1 seed)' in f.read()


def test_commands_new_resumed_finished_and_torchrun(tmp_path):
    runs = str(tmp_path / 'runs')
    args = reproduce_module.parse(['maxl-fig3', '--seeds', '0,1', '--only', 'maxl-p1-a3', '--runs', runs, '--report'])
    os.makedirs(os.path.join(runs, 'maxl-p1-a3', 'seed0'))
    (tmp_path / 'runs' / 'experiment.json').write_text(json.dumps({'experiment': 'maxl-fig3', 'quick': False}))
    reproduce_module.check(args)
    open(os.path.join(runs, 'maxl-p1-a3', 'seed0', 'checkpoint.pt'), 'w').close()          # stopped after a checkpoint
    new, stopped = sorted(reproduce_module.plan(args), key=lambda r: -r['seed'])
    assert (new['state'], stopped['state']) == ('new', 'resume')
    assert reproduce_module.command(new)[1:] == [
        'model_vgg_maxl.py', '--primary_level', '1', '--aux_level', '3', '--seed', '1', '--run_dir',
        os.path.join(runs, 'maxl-p1-a3', 'seed1')]
    assert reproduce_module.command(stopped, 'cuda')[1:] == [
        'model_vgg_maxl.py', '--resume', os.path.join(runs, 'maxl-p1-a3', 'seed0'), '--device', 'cuda']
    open(os.path.join(runs, 'maxl-p1-a3', 'seed0', 'finished.json'), 'w').close()
    assert reproduce_module.run_state(os.path.join(runs, 'maxl-p1-a3', 'seed0')) == 'finished'
    # MetaSemi on ImageNet: 8 processes under torchrun, the setting's flags as the README's command
    args = reproduce_module.parse(['metasemi-imagenet', '--only', 'meta', '--runs', str(tmp_path / 'in'),
                                   '--data_root', '/data/imagenet'])
    reproduce_module.check(args)
    cmd = reproduce_module.command(reproduce_module.plan(args)[0])
    assert cmd[1:7] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '8', 'train_meta_semi.py']
    assert cmd[7:13] == ['--dataset', 'imagenet', '-a', 'resnet18', '--batch-size', '64']


def test_a_failed_run_is_reported_and_the_others_go_on(tiny_root, tmp_path, monkeypatch):
    # each run's command replaced by a Python that fails at once (no torch to import)
    def failing(run, device=None):
        code = {'single-p0': 3, 'single-p1': 4}[run['setting']]
        return [sys.executable, '-c', f'print("going wrong"); print("the reason {code}"); raise SystemExit({code})']
    monkeypatch.setattr(reproduce_module, 'command', failing)
    runs = str(tmp_path / 'runs')
    out = reproduce('maxl-fig3', '--quick', '--seeds', '0', '--only', 'single-p0', 'single-p1', '--runs', runs,
                    '--data_root', tiny_root)
    assert out.returncode == 1, out.stdout + out.stderr
    assert len(started(out.stdout)) == 2                                      # the first failure stopped nothing
    for setting, code in (('single-p0', 3), ('single-p1', 4)):
        log = os.path.join(runs, setting, 'seed0', 'output.txt')
        assert f'[FAILED] {setting} seed 0: exit code {code}; log: {log}\n    going wrong\n    the reason {code}' \
            in out.stdout
        assert not os.path.exists(os.path.join(runs, setting, 'seed0', 'finished.json'))
    assert '2 of 2 run(s) failed' in out.stdout


def test_the_table_from_finished_seeds(tmp_path):
    """--report on hand-made run folders: MetaSemi's error in %, mean ± std over the finished seeds, the
    paper's and the slides' numbers beside it with their sources, an unfinished seed counted apart; the best
    test error (as the original logs it) and, in a second table, the final one."""
    runs = tmp_path / 'runs'
    runs.mkdir()
    (runs / 'experiment.json').write_text(json.dumps({'experiment': 'metasemi-table', 'quick': False}))
    cfg = {'script': 'train_meta_semi', 'dataset': 'cifar10', 'num_label': 4000, 'architecture': 'convlarge',
           'width': 1.0, 'mix_up': True, 'alpha': 1.0, 'baseline': False}
    for seed, accs in ((0, [0.90, 0.92]), (1, [0.94, 0.93]), (2, [0.5])):
        folder = runs / 'cifar10-meta-mixup' / f'seed{seed}'
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(cfg | {'seed': seed}))
        (folder / 'metrics.csv').write_text('step,test_acc\n' + ''.join(f'{400 * (k + 1)},{a}\n' for k, a in enumerate(accs)))
        if seed < 2:
            (folder / 'finished.json').write_text('{}')
    out = reproduce('metasemi-table', '--report', '--runs', str(runs))
    assert out.returncode == 0, out.stdout + out.stderr
    md = (runs / 'results.md').read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith('| CIFAR-10, 4,000 labels'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1:5] == ['—', '—', '—', '7.00 ± 1.41 (2 of 3 seeds)']            # best errors 8 and 6 %
    assert cells[5] == ('Baseline: 15.43 % [slides]; Baseline + mixup: 11.10 % [slides]; MetaSemi: 11.63 % [slides]; '
                        'MetaSemi + mixup: 7.78 % [paper]')
    assert '[paper] the MetaSemi paper, arXiv 2007.03966' in md and 'github.com/Sakura03/SemiMeta' in md
    assert 'inference from the original\'s train_baseline.py' in md
    final = md[md.index('the test error of the last test'):]
    row = next(ln for ln in final.splitlines() if ln.startswith('| CIFAR-10, 4,000 labels'))
    assert [c.strip() for c in row.strip('|').split('|')][4] == '7.50 ± 0.71 (2 of 3 seeds)'   # final: 8 and 7 %
    assert 'Synthetic' not in md


def hand_made(runs, experiment, quick, setting, cfg, accs):
    """A finished run folder of `setting`, seed 0, with one metrics row per value of accs."""
    runs.mkdir(exist_ok=True)
    (runs / 'experiment.json').write_text(json.dumps({'experiment': experiment, 'quick': quick}))
    folder = runs / setting / 'seed0'
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps(cfg | {'seed': 0}))
    (folder / 'metrics.csv').write_text('epoch,step,test_acc,seconds\n' +
                                        ''.join(f'{k},{k + 1},{a},1.0\n' for k, a in enumerate(accs)))
    (folder / 'finished.json').write_text('{}')


def row_cells(md, start, after=''):
    text = md[md.index(after):] if after else md
    return [c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith(start)).strip('|').split('|')]


def test_maxl_cells_are_the_mean_of_the_last_5_epochs_and_the_test_selected_best_is_apart(tmp_path):
    runs = tmp_path / 'runs'
    hand_made(runs, 'maxl-fig3', False, 'maxl-p2-a3', {'script': 'model_vgg_maxl', 'primary_level': 2,
              'aux_level': 3, 'meta_order': 2}, [0.10, 0.90, 0.50, 0.40, 0.60, 0.50, 0.50])
    out = reproduce('maxl-fig3', '--report', '--runs', str(runs))
    assert out.returncode == 0, out.stdout + out.stderr
    md = (runs / 'results.md').read_text()
    assert row_cells(md, '| 20 / 100 classes')[5] == '50.00 (1 seed)'            # the last 5: 0.5, 0.4, 0.6, 0.5, 0.5
    assert 'the mean test accuracy of the last 5 evaluations' in md
    second = 'The same cells, the best test accuracy over all epochs: selected on the test set'
    assert row_cells(md, '| 20 / 100 classes', second)[5] == '90.00 (1 seed)'    # epoch 1's, chosen on the test set


def test_figure3_draws_each_method_in_its_own_colour_marker_and_line(tmp_path):
    """Every method of a panel in its own colour (kept in the PNG: no palette merges them), marker and line
    style, the colours also of distinct grey levels (grey print)."""
    pytest.importorskip('matplotlib', reason='the figure needs matplotlib (requirements.txt)')
    from PIL import Image
    import results
    runs = tmp_path / 'runs'
    for setting, script in (('single-p2', 'model_vgg_single'), ('random-p2-a3', 'model_vgg_human'),
                            ('kmeans-p2-a3', 'model_vgg_human'), ('human-p2-a3', 'model_vgg_human'),
                            ('maxl-p2-a3', 'model_vgg_maxl')):
        hand_made(runs, 'maxl-fig3', False, setting, {'script': script, 'primary_level': 2, 'aux_level': 3,
                  'aux_labels': setting.split('-')[0], 'meta_order': 2}, [0.1 * k for k in range(1, 9)])
    assert reproduce('maxl-fig3', '--report', '--runs', str(runs)).returncode == 0
    styles = results.METHOD_STYLES
    assert len({c for c, _, _ in styles.values()}) == len({str(ls) for _, ls, _ in styles.values()}) == \
        len({m for _, _, m in styles.values()}) == 5
    grey = sorted(sum(w * int(c[i:i + 2], 16) for w, i in ((0.299, 1), (0.587, 3), (0.114, 5))) for c, _, _ in styles.values())
    assert min(b - a for a, b in zip(grey, grey[1:])) > 15                   # of 255
    image = Image.open(runs / 'figure3.png').convert('RGB')
    present = {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}
    for color, _, _ in styles.values():
        assert tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)) in present, color


def test_quick_tables_say_the_labels_used_and_print_no_paper_number(tmp_path):
    runs = tmp_path / 'runs'
    hand_made(runs, 'metasemi-table', True, 'svhn-meta', {'script': 'train_meta_semi', 'dataset': 'svhn',
              'num_label': 100, 'synthetic': True, 'architecture': 'convlarge', 'width': 0.125}, [0.5, 0.6])
    out = reproduce('metasemi-table', '--quick', '--report', '--runs', str(runs))
    assert out.returncode == 0, out.stdout + out.stderr
    md = (runs / 'results.md').read_text()
    assert row_cells(md, '| SVHN, 100 labels (--quick)')[3] == '40.00 (1 seed)'
    assert '1,000 labels' not in md and '3.15' not in md and '3.68' not in md
    assert '| paper |' not in md[:md.index('## Every setting')]             # results.py's rows: '— (synthetic ...)'
    assert 'No paper numbers beside synthetic results' in md


def written_folder(tmp_path, marker):
    folder = tmp_path / 'other'
    folder.mkdir()
    (folder / 'experiment.json').write_text(json.dumps(marker))
    return str(folder)


@pytest.mark.parametrize('case', ['experiment', 'setting', 'gpus', 'no-submitit', 'no-sbatch', 'other-experiment',
                                  'other-flags', 'time-nan', 'time-inf', 'seed-negative', 'seed-twice',
                                  'damaged-marker'])
def test_bad_input_exits_2_and_starts_nothing(case, tmp_path, monkeypatch):
    runs = str(tmp_path / 'runs')
    args = {'experiment': ['maxl-fig4', '--quick'],
            'setting': ['maxl-fig3', '--quick', '--only', 'single-p2', 'single-p9'],
            'gpus': ['maxl-fig3', '--quick', '--gpus', '0,99'],
            'no-submitit': ['maxl-fig3', '--quick', '--executor', 'slurm', '--partition', 'gpu'],
            'no-sbatch': ['maxl-fig3', '--quick', '--executor', 'slurm', '--partition', 'gpu'],
            'other-experiment': ['maxl-fig3', '--quick'],
            'other-flags': ['maxl-fig3', '--quick', '--only', 'single-p2'],
            'time-nan': ['maxl-fig3', '--quick', '--executor', 'local', '--time', 'nan'],
            'time-inf': ['maxl-fig3', '--quick', '--executor', 'local', '--time', 'inf'],
            'seed-negative': ['maxl-fig3', '--quick', '--seeds', '-1'],
            'seed-twice': ['maxl-fig3', '--quick', '--seeds', '0,0', '--jobs', '2'],
            'damaged-marker': ['maxl-fig3', '--quick']}[case]
    if case == 'no-submitit':
        monkeypatch.setitem(sys.modules, 'submitit', None)              # `import submitit` raises ImportError
    if case == 'no-sbatch':
        monkeypatch.setitem(sys.modules, 'submitit', types.ModuleType('submitit'))
        monkeypatch.setenv('PATH', str(tmp_path))                         # no sbatch there
    if case == 'other-experiment':
        runs = written_folder(tmp_path, {'experiment': 'sla-cifar', 'quick': True})
    if case == 'other-flags':                  # made when --quick trained 99 epochs
        runs = written_folder(tmp_path, {'experiment': 'maxl-fig3', 'quick': True, 'settings': {
            'single-p2': ['model_vgg_single.py', '--primary_level', '2', '--synthetic', '--epochs', '99']}})
    if case == 'damaged-marker':
        runs = written_folder(tmp_path, {})
        with open(os.path.join(runs, 'experiment.json'), 'w') as f:
            f.write('{"experiment": "maxl-fig3", "qu')                     # cut part way
    before = sorted(os.listdir(runs)) if os.path.isdir(runs) else None
    out = reproduce(*args, '--runs', runs)
    assert out.returncode == 2, out.stdout + out.stderr
    message = out.stderr.strip()
    assert message.startswith('error: ') and '\n' not in message               # one paragraph
    assert {'experiment': 'maxl-fig4', 'setting': 'single-p9', 'gpus': '--gpus', 'no-submitit': 'pip install submitit',
            'no-sbatch': 'sbatch', 'other-experiment': 'sla-cifar --quick', 'other-flags': '--epochs 99',
            'time-nan': '--time nan', 'time-inf': '--time inf', 'seed-negative': '--seeds -1: give each seed once',
            'seed-twice': '--seeds 0,0: give each seed once',
            'damaged-marker': f'{runs}/experiment.json cannot be read'}[case] in message
    assert 'None' not in message
    assert out.stdout == ''                                                     # nothing started
    assert (sorted(os.listdir(runs)) if os.path.isdir(runs) else None) == before    # nothing written


def test_list_projects_from_a_bench_result(tmp_path):
    """`list` with a bench.py result: benchmarks/project.py's arithmetic per setting, times the seeds;
    settings bench.py does not time are said to be unknown."""
    rows = ['single', 'human', 'maxl_train', 'maxl_meta2', 'sla_baseline', 'sla_rotation', 'semi_baseline_mixup',
            'semi_meta_mixup', 'eval_maxl', 'eval_sla', 'eval_semi']
    bench = tmp_path / 'cpu.json'
    bench.write_text(json.dumps({'device': 'cpu', 'torch': 'x', 'rows': {r: {'median_s': 1.0, 'mean_s': 1.0} for r in rows}}))
    out = reproduce('list', '--bench', str(bench))
    assert out.returncode == 0, out.stdout + out.stderr
    table = {ln.split(' | ')[0][2:]: ln.split(' | ') for ln in out.stdout.splitlines() if ln.startswith('| ')}
    # maxl-psi (CIFAR-10): Single 200 x (500 steps + 100 test batches) s, each of the 12 MAXL runs 200 x (2 x 500
    # + 100) s; 3 seeds
    assert table['maxl-psi'][1] == '39 (13 x 3)'
    assert table['maxl-psi'][2] == f'{(120000 + 12 * 220000) * 3 / 3600:,.0f} h on cpu, float32, torch x'
    # maxl-datasets: each dataset's own sizes (SVHN 733 training steps and 261 test batches an epoch, Fashion-MNIST
    # 600 and 100, CIFAR 500 and 100); Single, Random (and Human) time as Single, MAXL with its meta pass; the four
    # K-means settings and the 20 of the file-streamed datasets (ResNet-18s, larger images) unknown
    epoch = {'cifar100': (500, 100), 'cifar10': (500, 100), 'svhn': (733, 261), 'fashion-mnist': (600, 100)}
    hours = sum(200 * ((2 + (d == 'cifar100')) * (n + t) + (2 * n + t)) for d, (n, t) in epoch.items()) * 3 / 3600
    assert table['maxl-datasets'][1] == '111 (37 x 3)'
    assert table['maxl-datasets'][2] == (f'{hours:,.0f} h on cpu, float32, torch x + 24 of 37 settings unknown '
                                         '(not timed by bench.py)')
    # maxl-fig3: K-means (6 settings) has an autoencoder bench.py does not time
    assert table['maxl-fig3'][2].endswith('+ 6 of 27 settings unknown (not timed by bench.py)')
    assert table['metasemi-imagenet'][2] == 'unknown on cpu, float32, torch x'
    out = reproduce('list', 'sla-cifar')
    assert out.returncode == 0 and 'cifar100-sla+sd-color_perm' in out.stdout
    assert 'train_sla.py --dataset cifar100 --model cresnet32 --mode sla+sd --aug color_perm' in out.stdout


SEMI_RUN = ['--synthetic', '--num-label', '100', '--total-steps', '30', '--warmup', '5', '--test-freq', '10',
            '--batch-size', '16', '--width', '0.0625', '--mix-up', '--data-path']


def metrics_rows(run_dir, skip=('seconds', 'batch_time', 'data_time')):
    import csv
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in skip} for r in csv.DictReader(f)]


def test_a_job_signalled_before_its_time_limit_requeues_itself_and_ends_as_the_uninterrupted_run(tiny_root, tmp_path):
    """submitit's local executor: the job gets the signal that precedes its time limit (the one the local
    controller sends signal_delay_s before it, sent here once the run's first checkpoint exists, so that the
    test does not hang on timing), its run stops at its next checkpoint, the job requeues itself
    (Job.checkpoint) and the requeued job continues the run with --resume, to the rows of the same run left
    alone."""
    import signal
    submitit = pytest.importorskip('submitit', reason='--executor needs submitit (requirements.txt)')
    import time
    from conftest import ROOT
    args = [*SEMI_RUN, tiny_root]
    full = run_in_process('train_meta_semi.py', *args, '--run_dir', tmp_path / 'a')
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = str(tmp_path / 'b')
    script = os.path.join(ROOT, 'train_meta_semi.py')
    job = reproduce_module.Job([sys.executable, script, *args, '--run_dir', run_dir],
                               [sys.executable, script, '--resume', run_dir], {'OMP_NUM_THREADS': '1'}, ROOT, run_dir, 60)
    executor = submitit.LocalExecutor(tmp_path / 'submitit', max_num_timeout=3)
    # a limit of 5 minutes: submitit takes any signal for the time limit's (has_timed_out), as at a real limit
    executor.update_parameters(timeout_min=5, signal_delay_s=60)
    submitted = executor.submit(job)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(run_dir, 'checkpoint.pt')) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not submitted.done(), 'the run ended before the signal could be sent'
    controller = submitted._process.pid
    with open(f'/proc/{controller}/task/{controller}/children') as f:
        (task,) = [int(pid) for pid in f.read().split()]
    os.kill(task, signal.SIGUSR2)   # what the controller sends its task signal_delay_s before the time limit
    code, _ = submitted.result()
    assert code == 0
    assert os.path.isfile(os.path.join(run_dir, 'finished.json'))
    with open(os.path.join(run_dir, 'output.txt')) as f:
        output = f.read()
    attempts = [ln for ln in output.splitlines() if ln.startswith('# 20') and '.py' in ln]
    assert len(attempts) == 2 and '--resume' not in attempts[0] and attempts[1].endswith(f'--resume {run_dir}')
    assert "the job's time limit is near" in output and 'stopped by SIGINT' in output
    assert metrics_rows(tmp_path / 'a') == metrics_rows(run_dir)


def test_slurm_runs_of_an_experiment_go_as_one_job_array_with_the_cluster_options(tmp_path, monkeypatch):
    """A stand-in sbatch keeps the script it is given: one array for the runs of one kind, the account,
    QoS, memory, constraint, set-up commands and passed-through options in it, and the signal before the time
    limit that makes each job checkpoint and requeue itself."""
    pytest.importorskip('submitit', reason='--executor needs submitit (requirements.txt)')
    import submitit
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch-$$.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / 'sbatch').chmod(0o755)
    (bin_dir / 'srun').write_text('#!/bin/sh\nexit 1\n')                   # submitit looks for it, never runs it here
    (bin_dir / 'srun').chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    runs = str(tmp_path / 'runs')
    args = reproduce_module.parse(['maxl-fig3', '--quick', '--seeds', '0,1', '--only', 'single-p2', '--runs', runs,
                                   '--executor', 'slurm', '--partition', 'gpu', '--account', 'proj7', '--qos', 'high',
                                   '--mem', '16', '--constraint', 'a100', '--setup', 'module load cuda',
                                   '--sbatch', 'mail-type=END', '--time', '4'])
    reproduce_module.check(args)
    plan = reproduce_module.plan(args)
    executor = submitit.AutoExecutor(folder=os.path.join(runs, 'submitit'), cluster='slurm', slurm_max_num_timeout=10)
    submitted = reproduce_module.submit(executor, plan, args, None, os.path.join(runs, 'submitit'),
                                        reproduce_module.Reporter(len(plan)))
    (script,) = [p.read_text() for p in tmp_path.glob('sbatch-*.sh')]            # one sbatch: the array
    for line in ('#SBATCH --array=0-1%2', '#SBATCH --account=proj7', '#SBATCH --qos=high', '#SBATCH --mem=16GB',
                 '#SBATCH --constraint=a100', '#SBATCH --mail-type=END', '#SBATCH --partition=gpu',
                 '#SBATCH --signal=USR2@300', '#SBATCH --time=240', 'module load cuda'):
        assert line in script.splitlines(), (line, script)
    assert sorted(job.job_id for job, _ in submitted) == ['4242_0', '4242_1']
    for job, run in submitted:
        with open(os.path.join(run['dir'], 'submitted.json')) as f:
            assert json.load(f)['job_id'] == job.job_id
        assert callable(getattr(submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle).function,
                                'checkpoint', None))


@pytest.mark.parametrize('bad,needle', [(['--account', 'x'], 'for Slurm jobs'), (['--executor', 'slurm', '--partition', 'gpu', '--sbatch', 'novalue'], 'KEY=VALUE'),
                                        (['--executor', 'local', '--signal-delay', '5'], 'at least 10 seconds')])
def test_bad_cluster_options_exit_2_and_start_nothing(bad, needle, tmp_path):
    runs = str(tmp_path / 'runs')
    out = reproduce('maxl-fig3', '--quick', '--only', 'single-p2', '--runs', runs, *bad)
    assert out.returncode == 2 and needle in out.stderr and out.stdout == '', out.stdout + out.stderr
    assert not os.path.exists(runs)


def test_a_run_stopped_by_ctrl_c_is_reported_as_stopped_not_failed(tiny_root, tmp_path):
    import signal
    import subprocess
    import time
    from conftest import ROOT
    runs = tmp_path / 'runs'
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'reproduce.py'), 'maxl-fig3', '--quick', '--seeds', '0',
                          '--only', 'single-p2', '--data_root', tiny_root, '--runs', str(runs)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.monotonic() + 300
    while not (runs / 'single-p2' / 'seed0' / 'checkpoint.pt').exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, out + err
    assert '[stopped] single-p2 seed 0: stopped as asked' in out and '[FAILED]' not in out, out
    assert '1 run(s) stopped as asked' in out and 'failed' not in out.split('[stopped]')[1], out
