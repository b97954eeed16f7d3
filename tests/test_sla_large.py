"""SLA on the large datasets, on their synthetic stand-ins (JPEG trees in the real layouts, written by the
script under <data_root>/synthetic/) with tiny networks and 32-pixel crops: sla+sd with a ResNet-18 end to
end, exact resume (the training batches are a function of the iteration), imagenetN class lists, per-class
samples, iNaturalist's JSON lists, the schedule by dataset, bad inputs (two processes: test_equivalence.py)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import create_dataset as cd
from machinery import large_datasets as ld
from machinery import splits
import train_sla as sla
from conftest import ROOT
from test_pinned_runs import TIMING_COLUMNS
from machinery.options import parse_config
from utils import run_main


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('large_data'))


def tiny(root, *args, workers=0):
    return ['--synthetic', '--datadir', root, '--image-size', '32', '--width', '0.125', '--batch-size', '8',
            '--workers', str(workers), '--device', 'cpu', '--progress', 'false', *map(str, args)]


def rows(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def lines(path):
    with open(path) as f:
        return f.read().split()


def config(cfg_args):
    cfg, given = parse_config(sla.HYPERPARAMETERS, cfg_args, choices=sla.CHOICES)
    sla.presets(cfg, given)
    return cfg


def choose(cfg):
    """The images a run of `cfg` trains and tests on, as train_sla's main chooses them (--resume RUN: its own)."""
    kept = cfg.resume or None
    path = ld.large_data_path(cfg.dataset, cfg.data_root, cfg.synthetic)
    train, test, classes = ld.choose_classes(cfg.dataset, path, cfg.seed, cfg.class_list, kept)
    pool = splits.per_class(train.labels, cfg.num_samples_per_class, cfg.seed, kept, classes)
    return {'train': train, 'test': test, 'classes': classes, 'pool': pool}


# ---- end to end, and exact resume ----

def test_sla_sd_resnet18_on_imagenet_and_an_exact_resume(tmp_path, root):
    """4 iterations evaluated every 2 equal (rows and final weights) 2 iterations resumed to 4; the
    uninterrupted run reads the files with one DataLoader worker, the other in the main process."""
    args = ['--dataset', 'imagenet', '--mode', 'sla+sd', '--val-freq', 2]
    sla.main(tiny(root, *args, '--num-iterations', 4, '--run-dir', tmp_path / 'a', workers=1))
    sla.main(tiny(root, *args, '--num-iterations', 2, '--run-dir', tmp_path / 'b'))
    assert len(rows(tmp_path / 'b')) == 1
    sla.main(['--resume', str(tmp_path / 'b'), '--num-iterations', '4'])
    a, b = rows(tmp_path / 'a'), rows(tmp_path / 'b')
    assert len(a) == 2 and a == b
    assert {'test_single_acc', 'test_agg_acc', 'best_test_single_acc', 'bad_images'} <= set(a[0])
    assert not any(k.startswith('val_') for k in a[0]) and a[-1]['bad_images'] == '0'   # no held-out split
    with open(tmp_path / 'a' / 'config.json') as f:
        assert json.load(f)['model'] == 'resnet18'                 # the large datasets' preset
    ca = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=False)['state']['model']
    cb = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=False)['state']['model']
    assert any(k.startswith('base_model.4.') for k in ca)          # torchvision's layer1 in the SLA trunk
    assert ca.keys() == cb.keys() and all(torch.equal(v, cb[k]) for k, v in ca.items())


def test_an_undecodable_image_is_replaced_counted_and_named(tmp_path, capsys):
    path = ld.large_data_path('imagenet', str(tmp_path / 'data'), synthetic=True)      # a tree of its own
    broken = os.path.join(path, 'val', 'n09000003', sorted(os.listdir(os.path.join(path, 'val', 'n09000003')))[0])
    with open(broken, 'wb') as f:
        f.write(b'\xff\xd8 not a JPEG after all')
    sla.main(tiny(str(tmp_path / 'data'), '--dataset', 'imagenet', '--num-iterations', 1, '--val-freq', 1,
                  '--run-dir', tmp_path / 'run'))
    assert 'note: 1 image(s) could not be decoded since the last evaluation' in capsys.readouterr().out
    assert broken in (tmp_path / 'run' / 'log.txt').read_text() and rows(tmp_path / 'run')[0]['bad_images'] == '1'


# ---- imagenetN, samples per class ----

def test_imagenet_n_class_list_samples_per_class_and_resume(tmp_path, root, capsys):
    """--class-list is written to classes.txt in its order and --num-samples-per-class K to
    train_indices.txt (K per class); a resumed run reads both back, whatever seed or list it is given."""
    chosen = ['n09000007', 'n09000002', 'n09000004']
    (tmp_path / 'list.txt').write_text('\n'.join(chosen) + '\n')
    (tmp_path / 'other.txt').write_text('n09000000\nn09000001\nn09000003\n')
    run = tmp_path / 'run'
    sla.main(tiny(root, '--dataset', 'imagenet3', '--class-list', tmp_path / 'list.txt', '--num-samples-per-class',
                  5, '--num-iterations', 2, '--val-freq', 2, '--run-dir', run))
    assert '15 train / 12 test images' in capsys.readouterr().out
    assert lines(run / 'classes.txt') == chosen
    files = choose(config(tiny(root, '--dataset', 'imagenet3', '--class-list', tmp_path / 'list.txt')))
    train = files['train']
    assert train.classes == chosen
    picked = np.loadtxt(run / 'train_indices.txt', dtype=np.int64)
    assert np.bincount(train.labels[picked]).tolist() == [5, 5, 5]
    # resumed (another seed, another list typed): the run folder's classes and images
    resumed = choose(config(['--resume', str(run), '--dataset', 'imagenet3', '--num-samples-per-class', '5',
                                      '--seed', '7', '--class-list', str(tmp_path / 'other.txt'),
                                      *tiny(root)]))
    assert resumed['classes'] == chosen and np.array_equal(resumed['pool'], picked)
    redrawn = splits.samples_per_class(np.arange(len(train)), train.labels, 5, 7)
    assert not np.array_equal(redrawn, picked)                   # a seed-7 draw would differ
    capsys.readouterr()
    sla.main(['--resume', str(run), '--eval-only', '--seed', '7', '--class-list', str(tmp_path / 'other.txt')])
    out = capsys.readouterr().out
    assert '(best checkpoint, eval-only)' in out and 'the same test metrics as logged' in out


def test_imagenet_n_classes_are_a_seeded_draw_relabelled_in_list_order(root):
    draw = lambda seed: choose(config(tiny(root, '--dataset', 'imagenet4', '--seed', seed)))  # noqa: E731
    a, b = draw(0), draw(1)
    names = sorted(os.listdir(os.path.join(root, 'synthetic', 'imagenet', 'train')))
    assert a['classes'] == [names[k] for k in splits.draw_classes(10, 4, 0)] and len(set(a['classes'])) == 4
    assert a['classes'] != b['classes']
    for split in (a['train'], a['test']):
        folders = [p.split(os.sep)[0] for p in split.paths]
        assert [a['classes'][y] for y in split.labels] == folders      # label k: the k-th listed class
    assert len(a['train']) == 4 * 20 and len(a['test']) == 4 * 4


# ---- iNaturalist ----

def test_inat_reads_its_json_lists_and_steps_the_rate_every_third(tmp_path, root, capsys):
    sla.main(tiny(root, '--dataset', 'inat', '--mode', 'sla', '--num-iterations', 3, '--val-freq', 3,
                  '--run-dir', tmp_path / 'run', workers=1))
    assert '160 train / 32 test images' in capsys.readouterr().out         # 8 species x (20, 4) in the JSON files
    (row,) = rows(tmp_path / 'run')
    assert float(row['lr']) == pytest.approx(1e-4) and 'test_agg_acc' in row      # StepLR, step 1: 0.1 x 0.1^3
    files = choose(config(tiny(root, '--dataset', 'inat')))
    assert files['train'].paths[0].startswith('train_val2018/') and ld.large_record('inat')[0].jitter


# ---- schedule and presets ----

@pytest.mark.parametrize('dataset,step', [('imagenet', True), ('inat', True), ('imagenet100', False),
                                          ('tiny-imagenet', False), ('cub200', False), ('indoor', False),
                                          ('dogs', False), ('cifar10', False)])
def test_the_schedule_by_dataset(dataset, step):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = sla.lr_scheduler(optimizer, dataset, 12)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    expected = [0.1] * 4 + [0.01] * 4 + [0.001] * 4 if step else [0.1] * 6 + [0.01] * 3 + [0.001] * 3
    assert seen == pytest.approx(expected)


def test_presets_of_the_large_datasets():
    assert (config([]).model, config([]).total_steps) == ('cresnet32', 80000)
    imagenet = config(['--dataset', 'imagenet'])
    assert (imagenet.model, imagenet.total_steps, imagenet.eval_every) == ('resnet18', 900000, 10000)
    inat = config(['--dataset', 'inat', '--model', 'resnet50'])
    assert (inat.model, inat.total_steps, inat.eval_every) == ('resnet50', 80000, 1000)   # typed values win


# ---- bad inputs ----

def test_a_mismatched_model_exits_2_naming_the_fix_and_writes_nothing(tmp_path, root):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train_sla.py'),
                        *tiny(root, '--dataset', 'imagenet', '--model', 'cresnet32', '--logdir', tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert '--model cresnet32 does not go with --dataset imagenet' in p.stderr and '--model resnet18' in p.stderr
    assert not os.path.exists(tmp_path / 'train_sla')


@pytest.mark.parametrize('args,message', [
    (['--dataset', 'cifar10', '--model', 'resnet18'], 'the 32-pixel datasets train a CIFAR ResNet: --model cresnet32'),
    (['--dataset', 'imagenet', '--model', 'resnet18', '--val-indices', 'v.txt'], 'drop --val-indices'),
    (['--dataset', 'imagenet50'], 'imagenet50 asks for 50 classes, but the data has 10'),
    (['--dataset', 'imagenet', '--class-list', 'LIST'], 'drop --class-list'),
    (['--dataset', 'imagenet2', '--class-list', 'LIST'], "list.txt' names 3 classes, but --dataset imagenet2 asks"),
    (['--dataset', 'imagenet', '--num-samples-per-class', 21], 'has only 20 training images: use at most 20'),
    (['--dataset', 'imagenet', '--batch-size', 201], 'exceeds the 200 training images'),
    (['--dataset', 'imagenet', '--image-size', 0], '--image_size must be positive'),
])
def test_bad_inputs_are_refused_with_exit_2_before_anything_is_written(tmp_path, root, capsys, args, message):
    (tmp_path / 'list.txt').write_text('n09000007\nn09000002\nn09000004\n')
    args = [str(tmp_path / 'list.txt') if a == 'LIST' else a for a in args]
    argv = tiny(root, '--num-iterations', 1, '--val-freq', 1, *args, '--logdir', tmp_path / 'logs')
    with pytest.raises(SystemExit) as e:
        run_main(sla.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'logs')
