"""Around a run: progress lines (plain, no control characters, off with --progress false), the start
line and the projected time, TensorBoard (or its clear message), and the full-size synthetic stand-in."""
import os
import pickle
import sys

import numpy as np
import pytest

import create_dataset
from conftest import run_in_process
from machinery import splits

TINY = ['--synthetic', '--width', 0.0625, '--epochs', 1, '--batch_size', 100]


def test_progress_lines_when_the_output_is_not_a_terminal(tmp_path, data_root):
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', data_root, '--logdir', tmp_path,
                       '--progress_every', 0)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('  epoch 0: ')]
    assert len(lines) == 20                                   # one a step: 2,000 images in batches of 100
    assert lines[-1].startswith('  epoch 0: 20/20 steps, ') and 'images/s' in lines[-1] and 'left in the run' in lines[-1]
    assert '\r' not in p.stdout and '\x1b' not in p.stdout and '\r' not in p.stderr
    assert 'will run 20 steps on cpu (float32), 1 process(es)' in p.stdout
    assert 'after 20 steps: ' in p.stdout and 'for the rest of the run' in p.stdout      # the projected time
    (run_dir,) = [os.path.join(r, d) for r, ds, _ in os.walk(tmp_path) for d in ds if d[0].isdigit()]
    assert 'epoch 0: 1/20' not in open(os.path.join(run_dir, 'log.txt')).read()     # progress is not logged


def test_progress_false_prints_none(tmp_path, data_root):
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', data_root, '--logdir', tmp_path,
                       '--progress_every', 0, '--progress', 'false')
    assert p.returncode == 0, p.stderr
    assert '  epoch 0: ' not in p.stdout and 'for the rest of the run' not in p.stdout and 'EPOCH: 0000' in p.stdout


def test_tensorboard_missing_says_what_to_install(tmp_path, data_root, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)          # as where it is not installed
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', data_root, '--logdir', tmp_path, '--tensorboard')
    assert p.returncode == 2 and 'pip install tensorboard' in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'model_vgg_single')


def test_tensorboard_writes_events(tmp_path, data_root):
    pytest.importorskip('tensorboard', reason='tensorboard is not installed (an optional extra, not in '
                                              'requirements.txt): the events half of --tensorboard is not run')
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', data_root, '--logdir', tmp_path, '--tensorboard')
    assert p.returncode == 0, p.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (folder,) = [r for r, _, files in os.walk(tmp_path) if any(f.startswith('events.') for f in files)]
    events = EventAccumulator(folder)
    events.Reload()
    assert {'test_acc', 'train_loss', 'best_test_acc'} <= set(events.Tags()['scalars'])
    assert [e.step for e in events.Scalars('test_acc')] == [0]


def test_full_size_stand_in_has_the_real_sizes_and_formats(tmp_path):
    root = str(tmp_path)
    x, y = create_dataset.load('cifar10', root, True, 'full')
    assert x.shape == (50000, 3, 32, 32) and x.dtype == np.uint8 and np.bincount(y).tolist() == [5000] * 10
    assert create_dataset.load('cifar10', root, False, 'full')[0].shape == (10000, 3, 32, 32)
    folder = os.path.join(root, 'synthetic-full', 'cifar-10-batches-py')
    with open(os.path.join(folder, 'data_batch_3'), 'rb') as f:
        batch = pickle.load(f, encoding='latin1')                  # the official layout: 5 batches of 10,000
    assert batch['data'].shape == (10000, 3072) and len(batch['labels']) == 10000
    assert not os.path.exists(os.path.join(root, 'synthetic'))     # the small stand-in is apart
    sizes = {n: d.synthetic.full for n, d in create_dataset.DATASETS.items()}
    assert sizes == {'cifar100': (50000, 10000), 'cifar10': (50000, 10000), 'svhn': (73257, 26032),
                     'fashion-mnist': (60000, 10000)}


def test_the_seed_cifar100_line_is_accepted_on_the_full_stand_in(tmp_path):
    """--num-label 10000 needs 100 labeled images per class: the small stand-in has too few, the full one has 500."""
    small = run_in_process('train_meta_semi.py', '--synthetic', '--dataset', 'cifar100', '--num-label', 10000,
                       '--data-path', tmp_path / 'data', '--save-path', tmp_path / 'small')
    assert small.returncode == 2 and '--num-label 10000' in small.stderr
    x, y, _, _ = create_dataset.load_both('cifar100', str(tmp_path / 'data'), 'full')
    assert len(x) == 50000
    splits.check_label_budget(y, 10000, 100)                  # no error: the budget fits
