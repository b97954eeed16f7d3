"""Several processes see what one process sees, end to end: each script under torchrun with 2 processes of
batch B against the same script in one process with batch 2B, same seed, augmentation on, SyncBatchNorm
(--sync_bn), a few steps. The metrics rows (training losses and accuracies, every evaluation) agree to
float32 reduction noise, so the splitting the scripts do themselves (DeviceData's share of each global
batch and of its crops and flips, MetaSemi's mixup lambda through Run.share, the large datasets'
file-stream shares) and the all-reduced evaluations are what make the two runs one.

The 2-process runs are one torchrun job (tests/ddp_scripts.py runs each script's main() in turn); the
one-process runs are made in this process.

What cannot be equal by design, and what the test does about it:
- MetaSemi's meta step is per process by default, as the original (d and its norm from that process's
  labeled share): the runs here use --global_meta_gradient, the one-process computation.
- ConvLarge's channel dropout draws its masks per process, from a random state that is the same on every
  process (ddp_scripts.convlarge_without_dropout says why no seed can fix it): MetaSemi on CIFAR runs here
  without dropout in both runs. (The torchvision ResNet of MetaSemi on ImageNet has none.)
- The VGG-16 of the MAXL scripts at initialisation amplifies float32 noise: one process's CPU batch-norm
  backward (PyTorch's kernel) is off from float64 by up to 1.5% in the first block's gradients (the
  2-process SyncBatchNorm's formula: 1e-5), and train-mode batch norm on the narrow network turns that
  into loss differences of 1e-3 after five steps of --lr 0.01. Single, Human and MAXL run at --lr 0.0001,
  where their losses agree to 2e-5.
- SLA on the ImageNet stand-in (torchvision's ResNet-18 at width 0.125, 4 images a process, train-mode batch
  norm): its losses agree to 1e-5 with AVX2 kernels and to 5.2e-5 with an Intel processor's AVX-512 ones
  (test_single_loss, iteration 2), so its tolerance is 5e-4.
- MAXL's gradient cosine is not compared: it averages per-filter cosines over the shared layers, 13 of
  whose 39 tensors are the biases of convolutions followed by batch norm. Their true gradient is zero;
  in float32 it is rounding noise, whose per-filter cosine is about +1 or -1, differently in any two
  reductions (measured on one batch: 0.0138 in float64, 0.0173 in one process, -0.0073 with the
  2-process formula). The all-reduce it takes is checked by test_distributed.py (float64)."""
import contextlib
import csv
import hashlib
import json
import os
import shutil

import pytest

import ddp_scripts
from machinery import large_datasets as ld
from conftest import ROOT, run_in_process
from test_distributed import torchrun
from test_pinned_runs import TIMING_COLUMNS

COMMON = ['--device', 'cpu', '--progress', 'false', '--sync_bn']


def jobs(tiny, large):
    """name -> (script, arguments without the batch, batch flag, per-process batch B, patch, relative tolerance of
    every number but the accuracies). Accuracies are equal (one image would be 0.005 of 200 test images)."""
    return {
        'sla_cifar': ('train_sla', ['--synthetic', '--datadir', tiny, '--model', 'cresnet20', '--width', 0.125,
                                    '--mode', 'sla+sd', '--num-iterations', 4, '--val-freq', 2],
                      '--batchsize', 8, None, 1e-5),
        'semi_cifar_mixup': ('train_meta_semi', ['--synthetic', '--dataset', 'cifar10', '--data-path', tiny,
                                                 '--num-label', 100, '--width', 0.0625, '--mix-up', '--total-steps', 4,
                                                 '--test-freq', 2, '--warmup', 0, '--global_meta_gradient'],
                             '--batch-size', 8, 'convlarge_without_dropout', 1e-5),
        'single': ('model_vgg_single', ['--synthetic', '--data_root', tiny, '--width', 0.0625, '--epochs', 1,
                                        '--lr', 0.0001],
                   '--batch_size', 50, None, 1e-4),
        'human': ('model_vgg_human', ['--synthetic', '--data_root', tiny, '--width', 0.0625, '--epochs', 1,
                                      '--lr', 0.0001],
                  '--batch_size', 50, None, 1e-4),
        'maxl': ('model_vgg_maxl', ['--synthetic', '--data_root', tiny, '--width', 0.0625, '--epochs', 1,
                                    '--cos_every', 2, '--lr', 0.0001],
                 '--batch_size', 50, None, 1e-4),
        'sla_imagenet': ('train_sla', ['--dataset', 'imagenet', '--synthetic', '--datadir', large, '--image-size', 32,
                                       '--width', 0.125, '--workers', 0, '--mode', 'sla+sd', '--num-iterations', 2,
                                       '--val-freq', 2],
                         '--batch-size', 4, None, 5e-4),     # test_single_loss: 5.2e-5 apart on an AVX-512 processor
        'semi_imagenet_mixup': ('train_meta_semi', ['--dataset', 'imagenet', '--synthetic', '--data-path', large,
                                                    '--image-size', 32, '--width', 0.125, '--workers', 0,
                                                    '--total-steps', 3, '--epochs', 0, '--test-freq', 3,
                                                    '--global_meta_gradient', '--test-batch-size', 20],
                                '--batch-size', 4, None, 1e-5),
    }


def argv(job, world, run_dir):
    script, args, flag, batch, patch, _ = job
    args = list(args)
    if '--test-batch-size' in args:            # per process too: the same global evaluation batch
        k = args.index('--test-batch-size') + 1
        args[k] = args[k] * 2 // world
    return [str(a) for a in [*args, flag, batch * 2 // world, *COMMON, '--run_dir', run_dir]]


def rows(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: float(v) for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp('equivalence')
    large = tmp / 'large'
    ld.write_synthetic_folder('imagenet', str(large / 'synthetic'))     # before the two processes read it
    todo = jobs(tiny_root, str(large))
    two = [[job[0], argv(job, 2, str(tmp / 'two' / name)), job[4]] for name, job in todo.items()]
    half = todo['semi_cifar_mixup']                # its first half, to be resumed on one process
    two.append([half[0], argv(half, 2, str(tmp / 'two' / 'semi_half')) + ['--total-steps', '2'], half[4]])
    (tmp / 'jobs.json').write_text(json.dumps(two))
    p = torchrun(os.path.join(ROOT, 'tests', 'ddp_scripts.py'), tmp / 'jobs.json', timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one = {}
    for name, job in todo.items():
        with ddp_scripts.PATCHES[job[4]]() if job[4] else contextlib.nullcontext():
            one[name] = run_in_process(f'{job[0]}.py', *argv(job, 1, str(tmp / 'one' / name)))
    return tmp, todo, one


@pytest.mark.parametrize('name', ['sla_cifar', 'semi_cifar_mixup', 'single', 'human', 'maxl', 'sla_imagenet',
                                  'semi_imagenet_mixup'])
def test_two_processes_of_b_give_the_rows_of_one_process_of_2b(runs, name):
    tmp, todo, one = runs
    assert one[name].returncode == 0, one[name].stderr[-2000:]
    exit_two = json.loads((tmp / 'two' / name / 'exit.json').read_text())
    assert exit_two['code'] == 0, exit_two['message']
    log = (tmp / 'two' / name / 'log.txt').read_text()
    batch = todo[name][3]
    assert (f'2 processes (gloo), batch {batch} per process = {2 * batch} in all, SyncBatchNorm' in log
            and log.count('\nrun ') + log.startswith('run ') == 1)                   # one writer
    a, b = rows(tmp / 'two' / name), rows(tmp / 'one' / name)
    assert len(a) == len(b) >= 1 and a[0].keys() == b[0].keys()
    rtol = todo[name][5]
    for ra, rb in zip(a, b):
        for k, vb in rb.items():
            va, what = ra[k], f'{name}: {k} at {next(iter(rb))} {rb[next(iter(rb))]}: 2 processes {ra[k]}, one {vb}'
            if k == 'cosine':                    # MAXL's: rounding noise by construction (see above)
                continue
            if k.split('_')[-1] in ('acc', 'acc5'):
                assert abs(va - vb) <= 1e-6, what
            else:
                assert abs(va - vb) <= rtol * abs(vb) + 1e-7, what


def digests(run_dir):
    return {f: hashlib.sha256((run_dir / f).read_bytes()).hexdigest() for f in sorted(os.listdir(run_dir))}


def test_a_resume_on_another_number_of_processes_that_changes_the_global_batch_is_refused(runs):
    """The 2-process run of batch 8 (16 images a step) resumed on one process with its saved --batch_size 8
    would take 8 images a step: refused (exit code 2), naming the batch that keeps 16, nothing written."""
    tmp, todo, _ = runs
    run_dir = tmp / 'refused'
    shutil.copytree(tmp / 'two' / 'semi_half', run_dir)
    before = digests(run_dir)
    with ddp_scripts.convlarge_without_dropout():
        p = run_in_process('train_meta_semi.py', '--resume', run_dir, '--total-steps', 4)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert ('this run was trained on 2 process(es) x --batch_size 8 = 16 images per step; resumed on 1 process(es) '
            'x 8 it would take 8' in p.stderr and 'Resume with --batch_size 16 (per process) on 1 process(es), or on '
            '2 process(es) as before' in p.stderr), p.stderr
    assert digests(run_dir) == before


def test_a_resume_on_one_process_with_the_same_global_batch_ends_as_the_two_process_run(runs):
    """The 2-process run of batch 8, stopped after step 2 of 4, resumed on one process with --batch-size 16:
    the same 16 images a step, so the rows of steps 2 and 4 are the uninterrupted 2-process run's, to
    float32 reduction noise (--sync_bn and --global_meta_gradient, as the other tests here)."""
    tmp, todo, _ = runs
    run_dir = tmp / 'one_more'
    shutil.copytree(tmp / 'two' / 'semi_half', run_dir)
    with ddp_scripts.convlarge_without_dropout():
        p = run_in_process('train_meta_semi.py', '--resume', run_dir, '--batch-size', 16, '--total-steps', 4)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'note: resumed on 1 process(es) x batch 16 (saved on 2 x 8): the same 16 images per step' in p.stdout
    a, b = rows(tmp / 'two' / 'semi_cifar_mixup'), rows(run_dir)
    assert [r['step'] for r in a] == [r['step'] for r in b] == [2.0, 4.0]
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            assert abs(va - rb[k]) <= 1e-5 * abs(va) + 1e-7, (k, va, rb[k])
