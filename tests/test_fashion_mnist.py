"""Fashion-MNIST: the idx reader on bytes written here by hand, the md5 of the unpacked bytes (either
archive, or none), the three places a data root may hold the files, the download, the stand-in and its
command line. Never the real files: the record's md5 sums are patched to those of the bytes made here."""
import dataclasses
import gzip
import hashlib
import json
import os
import struct

import numpy as np
import pytest

import create_dataset as cd
from conftest import run_in_process
from machinery.options import UserError

NAMES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def pixel(i, y, x):
    """Pixel (y, x) of image i of the hand-written files: no two of an image's 784 pixels alike in (y, x)."""
    return (40 * i + 3 * y + x + 1) % 256


def idx_files():
    """The four files' unpacked bytes, written out literally: big-endian magic (2051 = 0x803 images,
    2049 = 0x801 labels), the sizes, then the bytes; 3 training images labelled 9, 0, 4; 2 test ones 7, 1."""
    def images(n):
        return struct.pack('>IIII', 2051, n, 28, 28) + bytes(pixel(i, y, x) for i in range(n)
                                                           for y in range(28) for x in range(28))
    return {'train-images-idx3-ubyte': images(3),
            'train-labels-idx1-ubyte': struct.pack('>II', 2049, 3) + bytes([9, 0, 4]),
            't10k-images-idx3-ubyte': images(2),
            't10k-labels-idx1-ubyte': struct.pack('>II', 2049, 2) + bytes([7, 1])}


def write(folder, files, gz=True, level=9, mtime=0):
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        path = os.path.join(folder, name + ('.gz' if gz else ''))
        with open(path, 'wb') as f:
            f.write(gzip.compress(data, level, mtime=mtime) if gz else data)


@pytest.fixture
def hand_made(monkeypatch):
    """The record with the md5 sums of the hand-written files' unpacked bytes in place of the official ones."""
    files = idx_files()
    sums = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    monkeypatch.setitem(cd.DATASETS, 'fashion-mnist', dataclasses.replace(cd.DATASETS['fashion-mnist'], files=sums))
    return files


def test_reader_pads_and_repeats_the_hand_written_images(tmp_path):
    files = idx_files()
    write(tmp_path / 'gz', files)
    write(tmp_path / 'plain', files, gz=False)
    for folder in ('gz', 'plain'):
        for train, labels, n in ((True, [9, 0, 4], 3), (False, [7, 1], 2)):
            images, got = cd.read_fashion_mnist(str(tmp_path / folder), train)
            assert images.dtype == np.uint8 and images.shape == (n, 3, 32, 32)
            assert got.dtype == np.int64 and got.tolist() == labels
            assert images[1, 0, 2, 2] == pixel(1, 0, 0) and images[1, 2, 29, 5] == pixel(1, 27, 3)
            for i in range(n):
                grey = np.array([[pixel(i, y, x) for x in range(28)] for y in range(28)], dtype=np.uint8)
                framed = np.zeros((32, 32), dtype=np.uint8)          # 2 zero pixels on every side
                framed[2:30, 2:30] = grey
                for c in range(3):                                  # the grey image in each channel
                    assert np.array_equal(images[i, c], framed), (folder, train, i, c)


def test_damaged_idx_files_are_refused_with_their_name(tmp_path):
    files = idx_files()
    images = files['train-images-idx3-ubyte']
    cases = {'truncated': (images[:-1], r'is 2,367 bytes long and announces 3 x 28 x 28 bytes, 2,368 with the '
                                        r'header: the file is truncated or damaged'),
             'short header': (images[:10], 'ends inside its header'),
             'labels as images': (files['train-labels-idx1-ubyte'],
                                  r'starts with 0x00000801 \(that of an idx file with 1 dimension\(s\): another file '
                                  r'under this name\?\), not the magic number 0x00000803'),
             'not idx': (b'<html>', 'is not an idx file of unsigned bytes with 3 dimension')}
    for case, (data, message) in cases.items():
        folder = tmp_path / case.replace(' ', '_')
        write(folder, {**files, 'train-images-idx3-ubyte': data}, gz=False)
        with pytest.raises(UserError, match=message) as e:
            cd.read_fashion_mnist(str(folder), True)
        assert str(folder / 'train-images-idx3-ubyte') in str(e.value) and '--download' in str(e.value), case
    folder = tmp_path / 'cut_gz'
    write(folder, files)
    path = folder / 'train-images-idx3-ubyte.gz'
    path.write_bytes(path.read_bytes()[:-30])                         # the gzip stream cut short
    with pytest.raises(UserError, match='cannot be decompressed .*the gzip file is truncated or damaged'):
        cd.read_fashion_mnist(str(folder), True)


def test_either_archive_of_the_same_bytes_passes_the_md5_check(tmp_path, hand_made):
    """The record holds the md5 of the unpacked bytes: two .gz files of them that differ (compression level,
    time in the header) both pass, as do the unpacked files."""
    write(tmp_path / 'a' / 'fashion-mnist', hand_made, level=1, mtime=0)
    write(tmp_path / 'b' / 'fashion-mnist', hand_made, level=9, mtime=1504176606)
    write(tmp_path / 'c' / 'fashion-mnist', hand_made, gz=False)
    archives = [cd.md5sum(str(tmp_path / r / 'fashion-mnist' / 'train-images-idx3-ubyte.gz')) for r in 'ab']
    assert archives[0] != archives[1]
    loaded = [cd.load('fashion-mnist', str(tmp_path / r), train=True) for r in 'abc']
    for images, labels in loaded:
        assert np.array_equal(images, loaded[0][0]) and labels.tolist() == [9, 0, 4]


def test_a_wrong_file_is_refused_naming_it_the_md5_and_the_fix(tmp_path, hand_made):
    folder = tmp_path / 'fashion-mnist'
    write(folder, hand_made)
    expected = cd.DATASETS['fashion-mnist'].files['t10k-labels-idx1-ubyte']
    write(folder, {'t10k-labels-idx1-ubyte': struct.pack('>II', 2049, 2) + bytes([7, 2])})   # one label differs
    with pytest.raises(UserError) as e:
        cd.check_files('fashion-mnist', str(tmp_path))
    msg = str(e.value)
    got = hashlib.md5(struct.pack('>II', 2049, 2) + bytes([7, 2])).hexdigest()
    assert msg.startswith(f'{folder / "t10k-labels-idx1-ubyte.gz"} unpacks to bytes with md5 {got}, expected '
                          f'{expected}')
    assert '--download' in msg and 'sudo apt-get install --reinstall dataset-fashion-mnist' in msg
    (folder / 't10k-labels-idx1-ubyte.gz').write_bytes(b'\x1f\x8b' + b'\0' * 20)     # not a gzip stream at all
    with pytest.raises(UserError, match=r't10k-labels-idx1-ubyte.gz cannot be decompressed \(a truncated or damaged '
                                        rf'gzip file; the official one unpacks to md5 {expected}\): it is damaged'):
        cd.load('fashion-mnist', str(tmp_path), train=False)


def test_the_three_layouts_of_a_data_root_are_found(tmp_path, hand_made):
    """The root of fashion-mnist/ (this repository's folder), torchvision's FashionMNIST/raw/ (.gz and
    unpacked side by side) and a folder holding the files itself (Debian's /usr/share/datasets/fashion-mnist)."""
    write(tmp_path / 'ours' / 'fashion-mnist', hand_made)
    write(tmp_path / 'torchvision' / 'FashionMNIST' / 'raw', hand_made)
    write(tmp_path / 'torchvision' / 'FashionMNIST' / 'raw', hand_made, gz=False)
    write(tmp_path / 'debian', hand_made)
    for root, folder in (('ours', 'ours/fashion-mnist'), ('torchvision', 'torchvision/FashionMNIST/raw'),
                         ('debian', 'debian')):
        assert cd.check_files('fashion-mnist', str(tmp_path / root)) == str(tmp_path / folder)
        images, labels = cd.load('fashion-mnist', str(tmp_path / root), train=False)
        assert images.shape == (2, 3, 32, 32) and labels.tolist() == [7, 1]


def test_missing_data_names_the_three_places_and_how_to_get_the_files(tmp_path, hand_made):
    with pytest.raises(UserError) as e:
        cd.check_data_present('fashion-mnist', str(tmp_path), synthetic=False, download_missing=False)
    msg = str(e.value)
    assert msg.startswith(f'fashion-mnist data not found: no folder holds all of {", ".join(NAMES)} (each as '
                          f'NAME.gz or unpacked NAME): looked in {tmp_path}/fashion-mnist/, '
                          f'{tmp_path}/FashionMNIST/raw/ and {tmp_path}/. Either install Debian\'s package')
    assert ('sudo apt-get install dataset-fashion-mnist) and give --data_root /usr/share/datasets/fashion-mnist'
            in msg)
    assert ('http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz, ' in msg
            and f'into {tmp_path}/fashion-mnist/' in msg and '--download' in msg and '--synthetic' in msg)
    write(tmp_path / 'FashionMNIST' / 'raw', {n: d for n, d in hand_made.items() if not n.startswith('t10k-l')})
    with pytest.raises(UserError, match=f'; {tmp_path}/FashionMNIST/raw/ lacks t10k-labels-idx1-ubyte. Either'):
        cd.load('fashion-mnist', str(tmp_path))


def test_a_script_without_the_data_exits_2_before_its_run_folder(tmp_path):
    p = run_in_process('train_meta_semi.py', '--dataset', 'fashion-mnist', '--data-path', tmp_path / 'none',
                       '--save-path', tmp_path / 'run')
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert 'fashion-mnist data not found' in p.stderr and 'apt-get install dataset-fashion-mnist' in p.stderr
    assert not (tmp_path / 'run').exists()


def test_download_fetches_the_gz_files_and_checks_their_unpacked_bytes(tmp_path, hand_made, monkeypatch,
                                                                      http_server):
    served = tmp_path / 'server' / 'fm'
    write(served, hand_made, level=3, mtime=12345)                  # another archive than the record's source
    ds = cd.DATASETS['fashion-mnist']
    monkeypatch.setitem(cd.DATASETS, 'fashion-mnist', dataclasses.replace(
        ds, source=dataclasses.replace(ds.source, base_url=http_server + 'fm/')))
    root = tmp_path / 'root'
    write(root / 'FashionMNIST' / 'raw', hand_made)
    cd.download('fashion-mnist', str(root))                        # all there and right: nothing fetched
    assert not (root / 'fashion-mnist').exists()
    cd.main(['--data_root', str(root / 'new'), '--download', 'fashion-mnist'])
    assert sorted(os.listdir(root / 'new' / 'fashion-mnist')) == sorted(n + '.gz' for n in NAMES)
    assert cd.load('fashion-mnist', str(root / 'new'), train=True)[1].tolist() == [9, 0, 4]
    write(served, {'train-labels-idx1-ubyte': struct.pack('>II', 2049, 3) + bytes([9, 0, 5])})
    with pytest.raises(UserError, match=r'fm/train-labels-idx1-ubyte.gz unpacks to bytes with md5 \w{32}, expected '
                                        + ds.files['train-labels-idx1-ubyte']):
        cd.download('fashion-mnist', str(root / 'other'))
    assert not (root / 'other' / 'fashion-mnist' / 'train-labels-idx1-ubyte.gz').exists()


def test_the_stand_in_has_the_real_format_and_its_classes_show(tmp_path):
    root = str(tmp_path / 'synthetic')
    cd.write_synthetic('fashion-mnist', root, sizes=(400, 200))
    folder = os.path.join(root, 'fashion-mnist')
    with open(os.path.join(folder, 'md5.json')) as f:
        assert sorted(json.load(f)) == sorted(n + '.gz' for n in NAMES)
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz')) as f:
        assert struct.unpack('>IIII', f.read(16)) == (2051, 400, 28, 28)
    x, y = cd.load('fashion-mnist', str(tmp_path), train=True, synthetic=True)
    assert x.shape == (400, 3, 32, 32) and x.dtype == np.uint8 and np.bincount(y).tolist() == [40] * 10
    assert x[:, :, :2].max() == x[:, :, 30:].max() == x[:, :, :, :2].max() == x[:, :, :, 30:].max() == 0
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
    test_x, test_y = cd.load('fashion-mnist', str(tmp_path), train=False, synthetic=True)
    assert test_x.shape == (200, 3, 32, 32)

    def spectrum(images):                               # shift-invariant: where the stripes lie does not matter
        return np.abs(np.fft.fft2(images[:, 0].astype(float))).reshape(len(images), -1)
    centres = np.stack([spectrum(x)[y == c].mean(0) for c in range(10)])
    guess = ((spectrum(test_x)[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (guess == test_y).mean() > 0.5                           # nearest class mean; chance: 0.1


def test_the_command_line_writes_the_stand_in(tmp_path):
    p = run_in_process('create_dataset.py', '--data_root', tmp_path, '--synthetic', 'fashion-mnist')
    folder = tmp_path / 'synthetic' / 'fashion-mnist'
    assert p.returncode == 0 and f'wrote synthetic fashion-mnist into {folder}' in p.stdout
    assert sorted(os.listdir(folder)) == sorted([n + '.gz' for n in NAMES] + ['md5.json'])
    x, y = cd.load('fashion-mnist', str(tmp_path), train=False, synthetic=True)
    assert x.shape == (1000, 3, 32, 32) and np.bincount(y).tolist() == [100] * 10


def test_the_record_holds_what_the_scripts_read():
    ds = cd.DATASETS['fashion-mnist']
    assert ds.num_classes == 10 and ds.label_classes == (10,) and ds.pad == 4 and ds.flip
    assert ds.normalisation == ((0.21899983,) * 3, (0.33181137,) * 3)
    assert ds.synthetic.sizes == (5000, 1000) and ds.synthetic.full == (60000, 10000)
    assert ds.files == {'train-images-idx3-ubyte': 'f4a8712d7a061bf5bd6d2ca38dc4d50a',
                        'train-labels-idx1-ubyte': '9018921c3c673c538a1fc5bad174d6f9',
                        't10k-images-idx3-ubyte': '8181f5470baa50b63fa0f6fddb340f0a',
                        't10k-labels-idx1-ubyte': '15d484375f8d13e6eb1aabb0c3f46965'}
