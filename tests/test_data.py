"""Data: hierarchy maps, md5 and missing-file errors, the pickle reader, the batched augmentation."""
import dataclasses
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

import create_dataset as cd
from conftest import run_script
from utils import UserError

# The original's maps, written out independently: 20 coarse -> 10 classes, 10 -> 3 classes.
CLASS_10 = {0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7,
            10: 8, 11: 0, 12: 1, 13: 3, 14: 4, 15: 0, 16: 2, 17: 5, 18: 9, 19: 9}
CLASS_3 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2}


def test_hierarchy_maps_match_the_original():
    coarse = np.arange(20).repeat(5)
    fine = np.arange(100)
    labels = cd.cifar100_hierarchy(coarse, fine)
    assert labels.shape == (100, 4)
    for row in labels:
        c3, c10, c20, c100 = row
        assert c10 == CLASS_10[c20] and c3 == CLASS_3[c10]
    assert [len(np.unique(labels[:, k])) for k in range(4)] == cd.LEVEL_CLASSES


def _write_cifar100(folder, n=7):
    """Tiny CIFAR-100 files in the real format with known pixels: pixel (c, y, x) of image i = (i+c*7+y+x) % 256."""
    os.makedirs(folder, exist_ok=True)
    i, c, y, x = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing='ij')
    data = ((i + c * 7 + y + x) % 256).astype(np.uint8).reshape(n, 3072)
    fine = list(range(n))
    coarse = [f % 20 for f in fine]
    for split in ('train', 'test'):
        with open(os.path.join(folder, split), 'wb') as f:
            pickle.dump({'data': data, 'fine_labels': fine, 'coarse_labels': coarse, 'filenames': [''] * n,
                         'batch_label': split}, f)
    with open(os.path.join(folder, 'meta'), 'wb') as f:
        pickle.dump({'fine_label_names': [], 'coarse_label_names': []}, f)
    return {name: hashlib.md5(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in ('train', 'test', 'meta')}


def test_pickle_reader_on_generated_files(tmp_path, monkeypatch):
    sums = _write_cifar100(tmp_path / 'cifar-100-python')
    official = dataclasses.replace(cd.DATASETS['cifar100'], files=sums)   # our files stand in for the official
    monkeypatch.setitem(cd.DATASETS, 'cifar100', official)
    images, labels = cd.load('cifar100', str(tmp_path), train=True)
    assert images.dtype == np.uint8 and images.shape == (7, 3, 32, 32)
    assert images[3, 2, 5, 9] == (3 + 14 + 5 + 9) % 256                 # channel-major rows, as CIFAR stores them
    assert labels[:, 3].tolist() == list(range(7)) and labels[:, 2].tolist() == [f % 20 for f in range(7)]


def test_md5_mismatch_names_the_file_and_the_fix(tmp_path):
    _write_cifar100(tmp_path / 'cifar-100-python')          # right names, wrong content for the official md5
    with pytest.raises(UserError) as e:
        cd.load('cifar100', str(tmp_path))
    msg = str(e.value)
    assert 'md5' in msg and '16019d7e3df5f24257cddd939b257f8d' in msg and '--download' in msg


def test_missing_data_names_archive_and_folder(tmp_path):
    with pytest.raises(UserError) as e:
        cd.load('cifar100', str(tmp_path))
    msg = str(e.value)
    assert 'cifar-100-python.tar.gz' in msg and str(tmp_path) in msg and '--synthetic' in msg


def test_script_without_data_exits_2_without_traceback(tmp_path):
    p = run_script('model_vgg_single.py', '--data_root', tmp_path / 'none', '--logdir', tmp_path / 'logs')
    assert p.returncode == 2
    assert 'Traceback' not in p.stderr and 'cifar-100-python.tar.gz' in p.stderr
    assert not (tmp_path / 'logs').exists()              # stopped before a run folder was made


def test_unwritable_logdir_is_a_clear_error(tmp_path, data_root):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    p = run_script('model_vgg_single.py', '--synthetic', '--data_root', data_root, '--logdir', blocker)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and '--logdir' in p.stderr


def test_synthetic_standin_has_the_real_format(data_root):
    images, labels = cd.load('cifar100', data_root, train=True, synthetic=True)
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32)
    assert sorted(np.unique(labels[:, 3])) == list(range(100)) and sorted(np.unique(labels[:, 2])) == list(range(20))
    # fine classes inside a coarse class share it: every fine class maps to one coarse class
    pairs = np.unique(labels[:, [3, 2]], axis=0)
    assert len(pairs) == 100
    x10, y10 = cd.load('cifar10', data_root, train=False, synthetic=True)
    assert x10.shape[1:] == (3, 32, 32) and sorted(np.unique(y10)) == list(range(10))


def test_batched_crop_flip_equals_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    out = cd.random_crop_flip(x, offsets, flips, pad=4)
    for i in range(16):                                   # plain per-image reference: pad, crop, maybe flip
        padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
        padded[:, 4:36, 4:36] = x[i]
        top, left = offsets[i].tolist()
        ref = padded[:, top:top + 32, left:left + 32]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i
    centre = cd.random_crop_flip(x, torch.full((16, 2), 4), torch.zeros(16, dtype=torch.bool))
    assert torch.equal(centre, x)


def test_device_data_normalises_like_totensor_normalize():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data = cd.DeviceData(x, torch.zeros(4, dtype=torch.long), torch.device('cpu'), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    got, _ = data.get(torch.arange(4))
    assert torch.allclose(got, (x.float() / 255 - 0.5) / 0.2, atol=1e-5)


def test_device_data_takes_its_augmentation_defaults_at_construction():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    args = (x, torch.arange(16), torch.device('cpu'), (0.5,) * 3, (0.2,) * 3)

    def draw(data, **kw):                                # the same generator state for every draw
        return data.get(torch.arange(16), torch.Generator().manual_seed(5), augment=True, **kw)[0]
    no_flip = cd.DeviceData(*args, flip=False)
    assert torch.equal(draw(no_flip), draw(cd.DeviceData(*args), flip=False))
    assert not torch.equal(draw(no_flip), draw(cd.DeviceData(*args)))           # the default flips some images
    assert torch.equal(draw(no_flip, flip=True), draw(cd.DeviceData(*args)))    # a call's flip wins
