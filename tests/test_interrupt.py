"""Ctrl-C (SIGINT) and SIGTERM: a run stops at a consistent point with a checkpoint, prints the exact
--resume command and exits 128 + the signal; resumed, it ends as the uninterrupted run. A second Ctrl-C
quits at once, mid-epoch, the last checkpoint intact."""
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_in_process
from test_pinned_runs import TIMING_COLUMNS

RUNS = {
    'train_sla.py': ['--synthetic', '--model', 'cresnet20', '--width', '0.125', '--batchsize', '16', '--mode', 'sla+sd',
                     '--num-iterations', '30', '--val-freq', '10', '--datadir'],
    'train_meta_semi.py': ['--synthetic', '--num-label', '100', '--total-steps', '30', '--warmup', '5', '--test-freq',
                           '10', '--batch-size', '16', '--width', '0.0625', '--mix-up', '--data-path'],
    'model_vgg_single.py': ['--synthetic', '--width', '0.0625', '--epochs', '4', '--data_root'],
}


def interrupted(script, args, run_dir, signum=signal.SIGINT, times=1):
    """Start the script, send `signum` (`times` times) once its first checkpoint is written."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args, '--run_dir', str(run_dir)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (run_dir / 'checkpoint.pt').exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(times):
        p.send_signal(signum)
        time.sleep(0.05)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def assert_resume_hint(err, script, run_dir):
    """The printed command continues the run with this very Python (the project's .venv/bin/python)."""
    m = re.search(rf'Continue with: (\S+) {script[:-3]}\.py --resume {re.escape(str(run_dir))}', err)
    assert m, err[-2000:]
    python = m.group(1)
    assert os.path.samefile(os.path.join(ROOT, python), sys.executable) if python != 'python' else \
        sys.prefix == sys.base_prefix


def rows(run_dir):
    with open(run_dir / 'metrics.csv') as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.mark.parametrize('script,signum', [('train_sla.py', signal.SIGTERM), ('train_meta_semi.py', signal.SIGINT),
                                           ('model_vgg_single.py', signal.SIGINT)])
def test_an_interrupted_run_resumes_to_the_uninterrupted_end(tmp_path, tiny_root, script, signum):
    """Ctrl-C (SIGINT) or SIGTERM (SLA's run: SIGTERM stops the same way, with its own exit code)."""
    # The interrupted run needs a process of its own (it gets the signal); the uninterrupted run and the
    # resumed one run in this process. The amount of data changes nothing asserted here: the small stand-in.
    args = RUNS[script] + [tiny_root]
    full = run_in_process(script, *args, '--run_dir', tmp_path / 'a')
    assert full.returncode == 0, full.stderr[-2000:]
    code, out, err = interrupted(script, args, tmp_path / 'b', signum)
    assert code == 128 + signum, err[-2000:]
    assert f'stopped by {signal.Signals(signum).name}; the checkpoint is written' in err and 'Traceback' not in err
    assert_resume_hint(err, script, tmp_path / 'b')
    assert len(rows(tmp_path / 'b')) < len(rows(tmp_path / 'a'))          # it stopped before the end
    rest = run_in_process(script, '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert rows(tmp_path / 'a') == rows(tmp_path / 'b')
    a, b = (torch.load(tmp_path / r / 'checkpoint.pt', weights_only=True)['state'] for r in 'ab')
    net = 'net' if 'net' in a else 'model'
    for k, v in a[net].items():
        assert torch.equal(v, b[net][k]), k


def test_a_second_ctrl_c_quits_at_once_keeping_the_checkpoint(tmp_path, tiny_root):
    """Two Ctrl-C in epoch 1 (sent once its progress lines begin): the run quits there, without finishing
    the epoch (the first Ctrl-C alone stops at its end, after writing epoch 1's checkpoint), keeping epoch
    0's checkpoint whole."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'model_vgg_single.py'), *RUNS['model_vgg_single.py'],
                          tiny_root, '--batch_size', '25', '--progress_every', '0', '--run_dir', str(tmp_path / 'b')],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:                       # 500 images of 25: 20 steps an epoch, a line each
        if line.startswith('  epoch 1: '):
            p.send_signal(signal.SIGINT)
            time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert 'interrupted: the last checkpoint written is intact' in err and 'Traceback' not in err
    assert 'stopped by SIGINT' not in err and 'EPOCH: 0001' not in out
    assert not [f for f in os.listdir(tmp_path / 'b') if f.endswith('.tmp')]
    assert torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['epoch'] == 0      # whole, epoch 0
    assert len(rows(tmp_path / 'b')) == 1
