"""Run folders, third round: one writer per run folder (a lock held by the training process; a lock left by a
killed one taken over with a note; a second writer refused with exit code 2 naming the holder); a runner's
children end when the runner is killed; metrics.csv cut part way or with a garbage line read tolerantly and
repaired on resume; values typed with --resume refused (seed, batch, networks) or noted and kept in the run's
history; the smaller checks of the command line."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

import utils
from conftest import ROOT, run_in_process
from test_reliability import TINY, files_of, one_epoch


def holder(folder):
    """Another process holding `folder`'s lock (as a training run does) until it is killed."""
    proc = subprocess.Popen([sys.executable, '-c', 'import sys, time; from machinery.files import hold_folder; '
                             'hold_folder(sys.argv[1], "x", "y"); print("held", flush=True); time.sleep(120)',
                             str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == 'held\n'
    return proc


def gone(pid, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory, tiny_root):
    """One finished two-epoch Single run, made once; each test below damages a copy of it."""
    return one_epoch(tmp_path_factory.mktemp('two_epochs'), tiny_root, '--epochs', '2')


def a_run(tmp_path, two_epochs):
    shutil.copytree(two_epochs, tmp_path / 'run')
    return str(tmp_path / 'run')


# ---- one writer per run folder ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_one_is_taken_over(tmp_path, two_epochs,
                                                                                        tiny_root):
    run_dir, new = a_run(tmp_path, two_epochs), tmp_path / 'new'
    new.mkdir()
    other, another = holder(run_dir), holder(new)
    try:
        before = files_of(run_dir)
        p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 3)
        fresh = run_in_process('model_vgg_single.py', *TINY, '--data_root', tiny_root, '--epochs', 1, '--run_dir', new)
    finally:
        for proc in (other, another):
            proc.kill()
            proc.wait()
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert f'is being written by process {other.pid} on ' in p.stderr and f'kill {other.pid}' in p.stderr
    assert files_of(run_dir) == before                                       # nothing written
    assert fresh.returncode == 2 and f'process {another.pid}' in fresh.stderr, fresh.stderr
    assert os.listdir(new) == ['lock']                                       # a new run in a held folder: no file
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 3)
    assert p.returncode == 0, p.stderr
    assert f'from process {other.pid} on ' in p.stdout and 'ended without releasing it' in p.stdout
    assert open(os.path.join(run_dir, 'lock')).read() == ''                 # released: the next one takes no note


def test_a_second_runner_on_the_same_runs_folder_is_refused(tmp_path):
    runs = tmp_path / 'runs'
    runs.mkdir()
    other = holder(runs)
    try:
        p = run_in_process('reproduce.py', 'maxl-fig3', '--quick', '--seeds', '0', '--only', 'single-p2',
                           '--runs', runs)
    finally:
        other.kill()
        other.wait()
    assert p.returncode == 2 and f'process {other.pid}' in p.stderr and '--runs DIR' in p.stderr, p.stderr
    assert p.stdout == '' and sorted(os.listdir(runs)) == ['lock']          # nothing planned, no experiment.json


def test_a_killed_runner_ends_its_scripts(tmp_path):
    """A runner killed by SIGKILL (no handler runs) takes the script it started with it: the kernel sends the
    script SIGTERM (prctl PR_SET_PDEATHSIG, set in the child before it starts)."""
    pid_file = tmp_path / 'pid'
    script = f'import os, time; open({str(pid_file)!r}, "w").write(str(os.getpid())); time.sleep(120)'
    runner = subprocess.Popen([sys.executable, '-c', 'import sys, reproduce; reproduce.execute([sys.executable, '
                               f'"-c", {script!r}], {{}}, ".", {str(tmp_path / "run")!r})'], cwd=ROOT)
    end = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < end:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    runner.kill()
    runner.wait()
    alive = not gone(child, 20)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, 'the script outlived its killed runner'


# ---- metrics.csv cut part way -------------------------------------------------------------------------------

def cut_last_row(path):
    text = open(path, newline='').read()
    with open(path, 'w', newline='') as f:
        f.write(text[:len(text) - 40])                   # the last row cut in half, no end of line


def test_a_cut_last_row_is_skipped_and_named_by_results(tmp_path, two_epochs):
    run_dir = a_run(tmp_path, two_epochs)
    metrics = os.path.join(run_dir, 'metrics.csv')
    first = open(metrics).read().splitlines()[1].split(',')
    cut_last_row(metrics)
    p = run_in_process('results.py', run_dir)
    assert p.returncode == 0, p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith('| Single'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    # columns: method, dataset, setting, n, reported (MAXL's scripts: the mean of the last 5 epochs), best test, final, done
    assert cells[7] == '1 epoch' and cells[4] == cells[6] == f'{float(first[5]):.4f}'   # epoch 0's row, counted once
    assert f'{metrics}: not whole rows, skipped: line 3 (cut part way: the file ends inside it).' in p.stdout


@pytest.mark.parametrize('damage', ['cut', 'garbage'])
def test_resume_repairs_metrics_to_the_checkpoint_before_writing(tmp_path, two_epochs, damage):
    run_dir = a_run(tmp_path, two_epochs)
    metrics = os.path.join(run_dir, 'metrics.csv')
    whole = open(metrics).read().splitlines()
    if damage == 'cut':
        cut_last_row(metrics)
    else:
        with open(metrics, 'a') as f:
            f.write('garbage,not,a,row\n')
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 3)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr
    why = {'cut': 'line 3 skipped (cut part way: the file ends inside it); its row of epoch 1 written again',
           'garbage': 'line 4 skipped (4 fields, not the header\'s 8)'}[damage]
    assert f'note: metrics.csv brought back to the checkpoint (epoch 1): {why}' in p.stdout, p.stdout
    lines = open(metrics).read().splitlines()
    assert lines[:3] == whole and [ln.split(',')[0] for ln in lines[1:]] == ['0', '1', '2']


# ---- values typed with --resume -----------------------------------------------------------------------------

@pytest.mark.parametrize('typed,needle', [
    (['--seed', '5'], '--seed 5 typed with --resume: {run} is the run of seed 0'),
    (['--batch_size', '50'], '--batch_size 50 typed with --resume: this run was trained on 1 process(es) x '
                             '--batch_size 100'),
    (['--width', '0.125'], "--width 0.125 (the run's: 0.0625) typed with --resume: {run}/checkpoint.pt does not "
                           'fit the networks made with it'),
])
def test_a_typed_value_that_would_change_the_run_is_refused(tmp_path, two_epochs, typed, needle):
    run_dir = a_run(tmp_path, two_epochs)
    before = files_of(run_dir)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 3, *typed)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert needle.format(run=run_dir) in p.stderr and 'config.json' not in p.stderr, p.stderr
    assert files_of(run_dir) == before


def test_a_typed_rate_is_noted_kept_in_the_history_and_reported_as_its_own_setting(tmp_path, two_epochs):
    run_dir = a_run(tmp_path, two_epochs)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 3, '--lr', 0.001)
    assert p.returncode == 0, p.stderr
    assert "note: typed with --resume, --lr 0.001 (the run's: 0.01): in effect after epoch 1" in p.stdout
    cfg = json.load(open(os.path.join(run_dir, 'config.json')))
    assert cfg['history'] == [{'after': 'epoch 1', 'changed': {'lr': [0.01, 0.001]}}] and cfg['lr'] == 0.001
    q = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 4)         # kept by a later resume
    assert q.returncode == 0 and json.load(open(os.path.join(run_dir, 'config.json')))['history'] == cfg['history']
    table = run_in_process('results.py', run_dir, two_epochs).stdout
    rows = [ln for ln in table.splitlines() if ln.startswith('| Single')]
    assert len(rows) == 2 and sum('resumed with lr 0.01 -> 0.001 after epoch 1' in r for r in rows) == 1, table


# ---- the smaller checks -------------------------------------------------------------------------------------

@pytest.mark.parametrize('args,needle', [
    (['--synthetic', '--data_root', '{file}'], '--data_root {file} is a file, not a folder'),
    (['--data_root', '{file}'], '--data_root {file} is a file, not a folder'),
    (['--synthetic', '--download'], '--download fetches the official files, and --synthetic trains on the stand-in'),
])
def test_a_data_root_that_is_a_file_and_synthetic_with_download_are_refused(tmp_path, args, needle):
    (tmp_path / 'file').write_text('')
    args = [a.format(file=tmp_path / 'file') for a in args]
    p = run_in_process('model_vgg_single.py', *args, '--logdir', tmp_path / 'logs')
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert needle.format(file=tmp_path / 'file') in p.stderr and not os.path.exists(tmp_path / 'logs')


def test_the_printed_commands_quote_their_paths():
    run = types.SimpleNamespace(world=1, script='model_vgg_single', dir='/runs/my run')
    assert shlex.split(utils.Run.resume_command(run))[-2:] == ['--resume', '/runs/my run']
