"""Ctrl-C (SIGINT) and SIGTERM: a run stops at a consistent point with a checkpoint, prints the exact
--resume command and exits non-zero; resumed, it ends as the uninterrupted run. A second Ctrl-C quits at
once, the last checkpoint intact."""
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


@pytest.mark.parametrize('script', list(RUNS))
def test_an_interrupted_run_resumes_to_the_uninterrupted_end(tmp_path, tiny_root, script):
    # The interrupted run needs a process of its own (it gets the signal); the uninterrupted run and the
    # resumed one run in this process. The amount of data changes nothing asserted here: the small stand-in.
    args = RUNS[script] + [tiny_root]
    full = run_in_process(script, *args, '--run_dir', tmp_path / 'a')
    assert full.returncode == 0, full.stderr[-2000:]
    code, out, err = interrupted(script, args, tmp_path / 'b')
    assert code == 130, err[-2000:]
    assert 'Traceback' not in err
    assert_resume_hint(err, script, tmp_path / 'b')
    assert len(rows(tmp_path / 'b')) < len(rows(tmp_path / 'a'))          # it stopped before the end
    rest = run_in_process(script, '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert rows(tmp_path / 'a') == rows(tmp_path / 'b')
    a, b = (torch.load(tmp_path / r / 'checkpoint.pt', weights_only=True)['state'] for r in 'ab')
    net = 'net' if 'net' in a else 'model'
    for k, v in a[net].items():
        assert torch.equal(v, b[net][k]), k


def test_sigterm_stops_the_same_way(tmp_path, tiny_root):
    code, out, err = interrupted('train_sla.py', RUNS['train_sla.py'] + [tiny_root], tmp_path / 'b', signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and 'stopped by SIGTERM' in err


def test_a_second_ctrl_c_quits_at_once_keeping_the_checkpoint(tmp_path, tiny_root):
    code, out, err = interrupted('model_vgg_single.py', RUNS['model_vgg_single.py'] + [tiny_root], tmp_path / 'b',
                                 times=2)
    # 130: our KeyboardInterrupt path; -SIGINT: the second signal came while Python was already exiting
    # (after the first stop), when the default handler is back: either way it quit at once
    assert code in (130, -signal.SIGINT) and 'Traceback' not in err
    assert not [f for f in os.listdir(tmp_path / 'b') if f.endswith('.tmp')]
    torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)       # whole
