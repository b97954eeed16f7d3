"""Data: hierarchy maps, md5 and missing-file errors, the pickle reader, the batched augmentation, and
the dataset records (a dataset known only to a test works through its record alone)."""
import dataclasses
import hashlib
import json
import os
import pickle
import tarfile
import types

import numpy as np
import pytest
import torch

import create_dataset as cd
from conftest import run_in_process
from machinery.options import UserError
from machinery import streams

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


def mat5_uint8(name, dims, column_major):
    """One uint8 MATLAB array as a level-5 MAT-file data element, written byte by byte (MATLAB's published
    format: tag = type, byte count; array flags, dimensions, name, then the values in column-major order,
    the first index fastest; each part zero-padded to 8 bytes). No MAT writer involved."""
    import struct

    def element(kind, data):
        return struct.pack('<II', kind, len(data)) + data + b'\0' * (-len(data) % 8)
    mi_int8, mi_uint8, mi_int32, mi_uint32, mi_matrix, mx_uint8 = 1, 2, 5, 6, 14, 9
    return element(mi_matrix, element(mi_uint32, struct.pack('<II', mx_uint8, 0))
                   + element(mi_int32, struct.pack(f'<{len(dims)}i', *dims)) + element(mi_int8, name.encode())
                   + element(mi_uint8, bytes(column_major)))


def test_svhn_reader_on_hand_made_mat_bytes(tmp_path):
    """SVHN's train_32x32.mat holds X as height x width x channel x image (X(:,:,:,i) is image i, as MATLAB
    shows images) and y as image x 1, digit 0 labelled 10. A file written here byte by byte, pixel
    (h, w, c) of image n = h + 2w + 64c + 7n: the reader gives images [n, c, h, w] and label 0 for 10."""
    pytest.importorskip('scipy')
    pixel = lambda h, w, c, n: h + 2 * w + 64 * c + 7 * n          # noqa: E731 (< 256; h and w apart)
    values = [pixel(h, w, c, n) for n in range(2) for c in range(3) for w in range(32) for h in range(32)]
    header = b'MATLAB 5.0 MAT-file, written by hand'.ljust(116) + b'\0' * 8 + b'\x00\x01' + b'IM'   # v1, little-endian
    (tmp_path / 'train_32x32.mat').write_bytes(header + mat5_uint8('X', (32, 32, 3, 2), values)
                                               + mat5_uint8('y', (2, 1), [10, 3]))
    images, labels = cd.DATASETS['svhn'].reader(str(tmp_path), True)
    assert images.dtype == np.uint8 and images.shape == (2, 3, 32, 32)
    assert labels.tolist() == [0, 3]
    assert images[0, 0, 0, :4].tolist() == [0, 2, 4, 6]           # along the first row: the width, steps of 2
    assert images[0, 0, :4, 0].tolist() == [0, 1, 2, 3]           # down the first column: the height
    assert images[1, 2, 5, 9] == 5 + 18 + 128 + 7 and images[1, 2, 9, 5] == 9 + 10 + 128 + 7
    h, w = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    for n in range(2):
        for c in range(3):
            assert np.array_equal(images[n, c], h + 2 * w + 64 * c + 7 * n)


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
    p = run_in_process('model_vgg_single.py', '--data_root', tmp_path / 'none', '--logdir', tmp_path / 'logs')
    assert p.returncode == 2
    assert 'Traceback' not in p.stderr and 'cifar-100-python.tar.gz' in p.stderr
    assert not (tmp_path / 'logs').exists()              # stopped before a run folder was made


def test_unwritable_logdir_is_a_clear_error(tmp_path, data_root):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    p = run_in_process('model_vgg_single.py', '--synthetic', '--data_root', data_root, '--logdir', blocker)
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
    out = streams.random_crop_flip(x, offsets, flips, pad=4)
    for i in range(16):                                   # plain per-image reference: pad, crop, maybe flip
        padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
        padded[:, 4:36, 4:36] = x[i]
        top, left = offsets[i].tolist()
        ref = padded[:, top:top + 32, left:left + 32]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i
    centre = streams.random_crop_flip(x, torch.full((16, 2), 4), torch.zeros(16, dtype=torch.bool))
    assert torch.equal(centre, x)


def test_device_data_normalises_like_totensor_normalize():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data = streams.DeviceData(x, torch.zeros(4, dtype=torch.long), torch.device('cpu'), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    got, _ = data.get(torch.arange(4))
    assert torch.allclose(got, (x.float() / 255 - 0.5) / 0.2, atol=1e-5)


def test_device_data_takes_its_augmentation_defaults_at_construction():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    args = (x, torch.arange(16), torch.device('cpu'), (0.5,) * 3, (0.2,) * 3)

    def draw(data, **kw):                                # the same generator state for every draw
        return data.get(torch.arange(16), torch.Generator().manual_seed(5), augment=True, **kw)[0]
    no_flip = streams.DeviceData(*args, flip=False)
    assert torch.equal(draw(no_flip), draw(streams.DeviceData(*args), flip=False))
    assert not torch.equal(draw(no_flip), draw(streams.DeviceData(*args)))           # the default flips some images
    assert torch.equal(draw(no_flip, flip=True), draw(streams.DeviceData(*args)))    # a call's flip wins


# ---- the records ----

def test_records_hold_what_the_scripts_read():
    c100, c10, svhn = cd.DATASETS['cifar100'], cd.DATASETS['cifar10'], cd.DATASETS['svhn']
    assert c100.label_classes == tuple(cd.LEVEL_CLASSES) and c100.num_classes == 100
    assert c10.num_classes == svhn.num_classes == 10
    hierarchy = cd.cifar100_hierarchy(np.arange(20).repeat(5), np.arange(100))
    assert np.array_equal(c100.primary_labels(hierarchy), np.arange(100))        # SLA / MetaSemi: the fine level
    assert np.array_equal(c10.primary_labels(np.arange(10) % 7), np.arange(10) % 7)
    assert c100.flip and c10.flip and not svhn.flip                              # MetaSemi: no flips for digits
    assert c100.pad == c10.pad == svhn.pad == 4
    assert svhn.normalisation == ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614))


def test_per_file_source_message_names_every_url_and_unknown_names_are_refused(tmp_path):
    with pytest.raises(UserError) as e:
        cd.check_data_present('svhn', str(tmp_path), synthetic=False, download_missing=False)
    msg = str(e.value)
    assert f'train_32x32.mat, test_32x32.mat missing in {tmp_path / "svhn"}/' in msg
    assert ('download http://ufldl.stanford.edu/housenumbers/train_32x32.mat, '
            'http://ufldl.stanford.edu/housenumbers/test_32x32.mat into') in msg
    cd.check_data_present('svhn', str(tmp_path), synthetic=True, download_missing=False)      # nothing to check
    with pytest.raises(UserError, match="unknown dataset 'imagenet': choose one of cifar100, cifar10, svhn"):
        cd.load('imagenet', str(tmp_path))


def _read_tiny(folder, train):
    split = 'train' if train else 'test'
    return np.load(os.path.join(folder, f'{split}_x.npy')), np.load(os.path.join(folder, f'{split}_y.npy'))


def _write_tiny(folder, splits):
    for split, (x, y) in splits.items():
        np.save(os.path.join(folder, f'{split}_x.npy'), x)
        np.save(os.path.join(folder, f'{split}_y.npy'), np.asarray(y, dtype=np.int64))


@pytest.fixture(params=['file_urls', 'archive'])
def tiny(request, tmp_path, monkeypatch, http_server):
    """A dataset known only to this test: one record (with its reader and writer above) registered in
    DATASETS, nothing else touched. Its 'official' files are served over HTTP from localhost, one by one
    or as a tarball."""
    rng = np.random.default_rng(0)
    arrays = {'train': (rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), np.arange(6) % 3),
              'test': (rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), np.arange(3))}
    served = tmp_path / 'server' / 'tiny-data'
    served.mkdir(parents=True)
    _write_tiny(str(served), arrays)
    sums = {f: cd.md5sum(str(served / f)) for f in sorted(os.listdir(served))}
    if request.param == 'file_urls':
        source = cd.FileUrls(http_server + 'tiny-data/')
        url = ', '.join(source.base_url + f for f in sums)        # each file from its own url
    else:
        tarball = tmp_path / 'server' / 'tiny.tar.gz'
        with tarfile.open(tarball, 'w:gz') as tar:
            tar.add(served, arcname='tiny-data')
        source = cd.Archive(http_server + 'tiny.tar.gz', 'tiny.tar.gz', cd.md5sum(str(tarball)))
        url = f'{source.url} (md5 {source.md5})'
    ds = cd.Dataset('tiny', folder='tiny-data', reader=_read_tiny, source=source, files=sums, label_classes=(3,),
                    mean=(0.5,) * 3, std=(0.25,) * 3, flip=False, synthetic=cd.Synthetic(_write_tiny, sizes=(12, 6)))
    monkeypatch.setitem(cd.DATASETS, 'tiny', ds)
    return types.SimpleNamespace(ds=ds, arrays=arrays, url=url, root=str(tmp_path / 'root'))


def test_a_new_record_is_checked_fetched_and_loaded(tiny):
    with pytest.raises(UserError) as e:
        cd.check_data_present('tiny', tiny.root, synthetic=False, download_missing=False)
    msg = str(e.value)
    assert msg.startswith('tiny data not found: test_x.npy, test_y.npy, train_x.npy, train_y.npy missing in '
                          f'{os.path.join(tiny.root, "tiny-data")}/. Either download {tiny.url}')
    assert '--download' in msg and '--synthetic' in msg
    with pytest.raises(UserError, match='tiny data not found'):
        cd.load('tiny', tiny.root)
    cd.main(['--root', tiny.root, '--download', 'tiny'])       # the download code, its md5 checks, the unpacking
    cd.check_data_present('tiny', tiny.root, synthetic=False, download_missing=False)
    for train, split in ((True, 'train'), (False, 'test')):
        x, y = cd.load('tiny', tiny.root, train=train)
        assert np.array_equal(x, tiny.arrays[split][0]) and np.array_equal(y, tiny.arrays[split][1])
    np.save(os.path.join(tiny.root, 'tiny-data', 'test_y.npy'), np.zeros(3, dtype=np.int64))   # not the official file
    with pytest.raises(UserError, match=r'test_y.npy has md5 \w+, expected ' + tiny.ds.files['test_y.npy']):
        cd.load('tiny', tiny.root, train=False)


def test_a_new_record_gets_a_synthetic_standin_and_one_label_column(tiny):
    x, y = cd.load('tiny', tiny.root, train=True, synthetic=True)           # written on first use, record's sizes
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8 and np.bincount(y).tolist() == [4, 4, 4]
    with open(os.path.join(tiny.root, 'synthetic', 'tiny-data', 'md5.json')) as f:
        assert sorted(json.load(f)) == sorted(tiny.ds.files)                 # the writer wrote the real file names
    train_x, train_y, test_x, test_y = cd.load_both('tiny', tiny.root, synthetic=True)
    assert np.array_equal(train_x, x) and test_x.shape == (6, 3, 32, 32) and test_y.shape == (6,)
    assert not os.path.exists(os.path.join(tiny.root, 'tiny-data'))         # never beside the real data


def test_a_failed_or_corrupt_download_leaves_nothing_behind(tiny, monkeypatch):
    """torchvision's downloader fetches; a missing file on the server and a file with another md5 both stop
    with one paragraph, and no partial or wrong file stays in the data root."""
    folder = os.path.join(tiny.root, 'tiny-data')
    if isinstance(tiny.ds.source, cd.Archive):
        wrong = dataclasses.replace(tiny.ds.source, md5='0' * 32)
    else:
        wrong = dataclasses.replace(tiny.ds, files={**tiny.ds.files, 'train_x.npy': '0' * 32})
    monkeypatch.setitem(cd.DATASETS, 'tiny', dataclasses.replace(tiny.ds, source=wrong)
                        if isinstance(wrong, cd.Archive) else wrong)
    with pytest.raises(UserError, match=r'has md5 \w+, expected 0{32}: the file is corrupt'):
        cd.download('tiny', tiny.root)
    left = [f for f in (os.listdir(folder) if os.path.isdir(folder) else []) + os.listdir(tiny.root)
            if f.endswith('.part') or f in ('train_x.npy', 'tiny.tar.gz')]
    assert left == []
    gone = dataclasses.replace(tiny.ds, source=cd.FileUrls(tiny.ds.source.url.rsplit('/', 1)[0] + '/nothing/')
                               if isinstance(tiny.ds.source, cd.Archive) else cd.FileUrls('http://127.0.0.1:9/x/'))
    monkeypatch.setitem(cd.DATASETS, 'tiny', gone)
    with pytest.raises(UserError, match='could not download'):
        cd.download('tiny', tiny.root)
