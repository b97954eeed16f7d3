"""The MAXL paper's other auxiliary-label baselines (Random and K-means beside Human) and MAXL's psi from the
hierarchy: the group sizes of every level pair, the assignments inside the groups and seeded, kept in the run
folder and read back (not drawn again) on --resume, the bad inputs refused with exit code 2."""
import csv
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

import create_dataset as cd
import model_vgg_human as human
import model_vgg_maxl as maxl
from conftest import run_in_process
from machinery.options import UserError, parse_config

# (primary level, auxiliary level) -> the auxiliary classes under each primary class, written out from
# create_dataset's COARSE20_TO_10 / LEVEL10_TO_3 and CIFAR-100's 5 fine classes per coarse class.
PAIRS = {(0, 1): [5, 1, 4],
         (0, 2): [10, 3, 7],
         (0, 3): [50, 15, 35],
         (1, 2): [3, 2, 2, 2, 1, 3, 3, 1, 1, 2],
         (1, 3): [15, 10, 10, 10, 5, 15, 15, 5, 5, 10],
         (2, 3): [5] * 20}


def train_labels(root):
    return cd.load('cifar100', root, True, 'small')[1]


# ---- the hierarchy ----

@pytest.mark.parametrize('pair', list(PAIRS))
def test_hierarchy_psi_of_every_pair(pair):
    psi = cd.hierarchy_psi(*pair)
    assert psi == PAIRS[pair]
    assert sum(psi) == cd.LEVEL_CLASSES[pair[1]] and len(psi) == cd.LEVEL_CLASSES[pair[0]]


def test_a_pair_that_does_not_refine_is_refused():
    for pair in ((2, 2), (3, 1), (1, 0)):
        with pytest.raises(UserError, match='does not refine'):
            cd.hierarchy_psi(*pair)


def test_the_stand_in_and_the_real_mapping_give_the_same_groups(tiny_root):
    labels = train_labels(tiny_root)
    real_like = cd.cifar100_hierarchy(np.arange(100) // 5, np.arange(100))   # another 5-per-coarse mapping
    for pair, sizes in PAIRS.items():
        groups = cd.hierarchy_groups(labels, *pair)
        assert [len(g) for g in groups] == sizes
        assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(cd.LEVEL_CLASSES[pair[1]]))
        for i, g in enumerate(groups):                                   # each group lies under its class
            assert set(labels[np.isin(labels[:, pair[1]], g), pair[0]]) == {i}
        assert [len(g) for g in cd.hierarchy_groups(real_like, *pair)] == sizes
    with pytest.raises(UserError, match='has no training image'):
        cd.hierarchy_groups(labels[labels[:, 3] != 7], 2, 3)              # a fine class missing


# ---- MAXL: psi from the hierarchy ----

def maxl_config(root, *args):
    cfg, typed = parse_config(maxl.HYPERPARAMETERS, ['--synthetic', '--data_root', root, *map(str, args)])
    maxl.check(cfg, typed)
    maxl.choose_psi(cfg, typed)
    return cfg


@pytest.mark.parametrize('pair', list(PAIRS))
def test_maxl_aux_level_gives_the_hierarchys_psi(tiny_root, pair):
    cfg = maxl_config(tiny_root, '--primary_level', pair[0], '--aux_level', pair[1])
    assert cfg.psi == PAIRS[pair]
    same = maxl_config(tiny_root, '--primary_level', pair[0], '--aux_level', pair[1],
                       '--psi', ','.join(map(str, PAIRS[pair])))                # the same list typed: accepted
    assert same.psi == PAIRS[pair]


def test_maxl_psi_precedence(tiny_root):
    assert maxl_config(tiny_root).psi == [5] * 20                               # the default is today's
    assert maxl_config(tiny_root).aux_level == 0
    assert maxl_config(tiny_root, '--primary_level', 0, '--psi', '2,3,4').psi == [2, 3, 4]   # --psi alone
    with pytest.raises(UserError, match='disagree'):
        maxl_config(tiny_root, '--primary_level', 0, '--aux_level', 1, '--psi', '2,3,4')
    with pytest.raises(UserError, match='bad psi'):
        maxl_config(tiny_root, '--primary_level', 1)                             # 5x20 for 10 classes
    with pytest.raises(UserError, match='does not refine'):
        maxl_config(tiny_root, '--primary_level', 2, '--aux_level', 1)


def test_maxl_trains_a_pair_at_the_hierarchys_sizes(tmp_path, tiny_root):
    p = run_in_process('model_vgg_maxl.py', '--synthetic', '--data_root', tiny_root, '--width', 0.0625, '--epochs', 1,
                       '--meta_order', 1, '--primary_level', 0, '--aux_level', 1, '--logdir', tmp_path)
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(str(tmp_path / 'model_vgg_maxl' / '*'))
    with open(os.path.join(run_dir, 'config.json')) as f:
        assert json.load(f)['psi'] == [5, 1, 4]
    state = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=False)['state']
    assert state['net']['classifier1.2.weight'].shape[0] == 3
    assert state['net']['classifier2.2.weight'].shape[0] == 10 == state['gen']['classifier.2.weight'].shape[0]


# ---- Random and K-means ----

def inside_and_complete(assigned, primary, groups):
    """Every label inside its image's group, and every class of every group used."""
    for i, g in enumerate(groups):
        mine = assigned[primary == i]
        assert np.isin(mine, g).all(), i
        assert set(mine.tolist()) == set(g.tolist()), i


@pytest.mark.parametrize('pair', list(PAIRS))
def test_random_labels_lie_in_their_groups_and_follow_the_seed(data_root, pair):
    labels = train_labels(data_root)
    groups = cd.hierarchy_groups(labels, *pair)
    primary = labels[:, pair[0]]
    state = np.random.get_state()[1].copy()
    drawn = human.random_labels(primary, groups, seed=0)
    assert np.array_equal(np.random.get_state()[1], state)                # its own stream
    inside_and_complete(drawn, primary, groups)
    assert np.array_equal(drawn, human.random_labels(primary, groups, seed=0))
    assert not np.array_equal(drawn, human.random_labels(primary, groups, seed=1))
    assert not np.array_equal(drawn, labels[:, pair[1]])                   # not the human labels


def test_kmeans_labels_cluster_inside_each_group(tiny_root):
    pytest.importorskip('sklearn')
    labels = train_labels(tiny_root)
    rng = np.random.default_rng(0)
    for pair in ((2, 3), (0, 1)):                                          # (0, 1) has a group of one class
        groups = cd.hierarchy_groups(labels, *pair)
        primary, truth = labels[:, pair[0]], labels[:, pair[1]]
        centres = rng.normal(0, 10, (cd.LEVEL_CLASSES[pair[1]], 6))
        features = centres[truth] + rng.normal(0, 0.1, (len(truth), 6))   # one tight blob per auxiliary class
        got = human.kmeans_labels(features, primary, groups, seed=0, n_init=2)
        inside_and_complete(got, primary, groups)
        for c in np.unique(truth):                                         # each blob is one cluster
            assert len(np.unique(got[truth == c])) == 1, c
        assert np.array_equal(got, human.kmeans_labels(features, primary, groups, seed=0, n_init=2))


def test_autoencoder_features_are_seeded_and_leave_the_global_random_state(tiny_root):
    images = cd.load('cifar100', tiny_root, True, 'small')[0][:64]
    cfg, _ = parse_config(human.HYPERPARAMETERS, ['--ae_epochs', '1', '--ae_width', '4', '--ae_code', '8',
                                                 '--ae_batch_size', '32'])

    class Log:
        lines = []

        def print(self, line):
            self.lines.append(line)

    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = human.autoencoder_features(images, cfg, torch.device('cpu'), Log())
    assert torch.equal(torch.get_rng_state(), before)
    b = human.autoencoder_features(images, cfg, torch.device('cpu'), Log())
    assert a.shape == (64, 8) and np.isfinite(a).all() and np.array_equal(a, b)
    assert 'autoencoder epoch 1/1: reconstruction error' in Log.lines[0]


AE = ['--ae_epochs', 1, '--ae_width', 4, '--ae_code', 8, '--kmeans_n_init', 2]


def human_run(root, logdir, method, *args):
    p = run_in_process('model_vgg_human.py', '--synthetic', '--data_root', root, '--width', 0.0625,
                       '--aux_labels', method, *AE, '--logdir', logdir, *args)
    assert p.returncode == 0, p.stderr
    (run_dir,) = glob.glob(os.path.join(str(logdir), 'model_vgg_human', '*'))
    return run_dir, p


@pytest.mark.parametrize('method', ['random', 'kmeans'])
def test_labels_are_kept_in_the_run_folder_and_read_back_on_resume(tmp_path, tiny_root, monkeypatch, method):
    if method == 'kmeans':
        pytest.importorskip('sklearn')
    run_a, p = human_run(tiny_root, tmp_path / 'a', method, '--epochs', 2)
    run_b, _ = human_run(tiny_root, tmp_path / 'b', method, '--epochs', 1)
    kept = np.loadtxt(os.path.join(run_a, human.AUX_LABELS_FILE), dtype=np.int64)
    labels = train_labels(tiny_root)
    primary, groups = labels[:, 2], cd.hierarchy_groups(labels, 2, 3)
    assert len(kept) == len(labels)
    inside_and_complete(kept, primary, groups)
    assert np.array_equal(kept, np.loadtxt(os.path.join(run_b, human.AUX_LABELS_FILE), dtype=np.int64))   # same seed
    if method == 'random':
        assert np.array_equal(kept, human.random_labels(primary, groups, seed=0))
    else:
        assert 'k-means labels: autoencoder' in p.stdout
    with open(os.path.join(run_a, 'metrics.csv')) as f:
        row = next(csv.DictReader(f))
    assert 'train_aux_acc' in row and 'test_acc' in row and 'test_aux_acc' not in row   # the primary head is tested

    def no_new_draw(*a, **kw):
        raise AssertionError('a resumed run drew its auxiliary labels again')
    monkeypatch.setattr(human, 'random_labels', no_new_draw)
    monkeypatch.setattr(human, 'autoencoder_features', no_new_draw)
    monkeypatch.setattr(human, 'kmeans_labels', no_new_draw)
    q = run_in_process('model_vgg_human.py', '--resume', run_b, '--epochs', 2)
    assert q.returncode == 0, q.stderr
    a = torch.load(os.path.join(run_a, 'checkpoint.pt'), weights_only=False)['state']['net']
    b = torch.load(os.path.join(run_b, 'checkpoint.pt'), weights_only=False)['state']['net']
    for k in a:                                    # trained on the same labels as the uninterrupted run
        assert torch.equal(a[k], b[k]), k
    os.remove(os.path.join(run_b, human.AUX_LABELS_FILE))
    r = run_in_process('model_vgg_human.py', '--resume', run_b, '--epochs', 3)
    assert r.returncode == 2 and 'aux_labels.txt' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('levels', [(2, 1), (3, 3)])
def test_human_refuses_an_auxiliary_level_that_does_not_refine_the_primary(tmp_path, tiny_root, levels):
    p = run_in_process('model_vgg_human.py', '--synthetic', '--data_root', tiny_root, '--primary_level', levels[0],
                       '--aux_level', levels[1], '--logdir', tmp_path)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert f'aux_level {levels[1]} does not refine primary_level {levels[0]}' in p.stderr
    assert not os.listdir(tmp_path)


def test_bad_inputs_exit_2_before_anything_is_written(tmp_path, tiny_root, monkeypatch):
    p = run_in_process('model_vgg_human.py', '--synthetic', '--data_root', tiny_root, '--aux_labels', 'clusters',
                       '--logdir', tmp_path)
    assert p.returncode == 2 and 'clusters' in p.stderr
    p = run_in_process('model_vgg_maxl.py', '--synthetic', '--data_root', tiny_root, '--aux_level', 1,
                       '--logdir', tmp_path)
    assert p.returncode == 2 and 'does not refine' in p.stderr and 'Traceback' not in p.stderr
    monkeypatch.setitem(sys.modules, 'sklearn', None)                     # scikit-learn not installed
    monkeypatch.setitem(sys.modules, 'sklearn.cluster', None)
    p = run_in_process('model_vgg_human.py', '--synthetic', '--data_root', tiny_root, '--aux_labels', 'kmeans',
                       '--logdir', tmp_path)
    assert p.returncode == 2 and 'pip install scikit-learn' in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1                        # one paragraph
    assert not os.listdir(tmp_path)
