"""ImageNet-scale data and MetaSemi on it: the folder, iNaturalist and RecordIO readers against files
written here (labels, order, multi-part records, a corrupt image); the 10% split; top-5; the streaming
pipeline (the decode-on-GPU assembly path gives the CPU path's batches; the GPU half runs with CUDA
only); MetaSemi meta and baseline with a torchvision ResNet on the synthetic ImageNet (under torchrun:
test_equivalence.py), and a run stopped mid-epoch and resumed ends as the uninterrupted one."""
import csv
import io
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import create_dataset as cd
from machinery import large_datasets as ld
from machinery import splits
from conftest import ROOT, run_in_process
from test_pinned_runs import TIMING_COLUMNS
from machinery.models import topk_count
from machinery.options import UserError

CPU = torch.device('cpu')


def jpeg(array, mode='RGB', fmt='JPEG'):
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, fmt)
    return out.getvalue()


def picture(seed, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """train/<wnid>/ with 3 classes of different sizes, one file not an image, one corrupt JPEG."""
    root = tmp_path_factory.mktemp('tree')
    for c, n in (('n02', 4), ('n01', 3), ('n03', 2)):
        os.makedirs(root / 'train' / c)
        for k in range(n):
            (root / 'train' / c / f'{c}_{k}.JPEG').write_bytes(jpeg(picture(k), 'L' if k == 1 else 'RGB'))
    (root / 'train' / 'n01' / 'notes.txt').write_text('not an image')
    (root / 'train' / 'n03' / 'n03_9.JPEG').write_bytes(jpeg(picture(9))[:300])     # truncated
    return root


def test_the_folder_reader_lists_classes_sorted_and_images_in_order(tree):
    files = ld.image_folder(str(tree / 'train'))
    assert files.classes == ['n01', 'n02', 'n03']
    assert files.paths == ['n01/n01_0.JPEG', 'n01/n01_1.JPEG', 'n01/n01_2.JPEG', 'n02/n02_0.JPEG', 'n02/n02_1.JPEG',
                           'n02/n02_2.JPEG', 'n02/n02_3.JPEG', 'n03/n03_0.JPEG', 'n03/n03_1.JPEG', 'n03/n03_9.JPEG']
    assert files.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    data, label = files.read(4)
    assert label == 1 and data == jpeg(picture(1), 'L')
    sub = ld.class_subset(files, [2, 0])                      # relabelled in list order
    assert sub.classes == ['n03', 'n01'] and sub.labels.tolist() == [1, 1, 1, 0, 0, 0]


def test_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match='one sub-folder per class'):
        ld.image_folder(str(tmp_path / 'nope'))


def test_a_corrupt_image_is_replaced_within_its_batch_and_named(tree):
    files = ld.image_folder(str(tree / 'train'))
    plan = ld.BatchPlan(np.arange(len(files)), 10, 0, 'ordered')
    batches = ld.Batches(files, plan, ld.Augment(False, 16), CPU, 0, 0, 1, workers=0)
    (x, y), = list(batches)
    assert x.shape == (10, 3, 16, 16) and torch.isfinite(x).all()
    assert len(batches.bad) == 1 and batches.bad[0][0].endswith('n03_9.JPEG')
    assert torch.equal(x[9], x[8]) and y[9] == 2              # the nearest decodable image of the batch


def test_the_inaturalist_reader(tmp_path):
    ld.write_synthetic_folder('inat', str(tmp_path))
    files = ld.large_split('inat', str(tmp_path / 'inat2018'), 'train')
    ds = ld.LARGE_DATASETS['inat']
    assert len(files) == ds.synthetic_classes * ds.synthetic_per_class[0]
    assert np.bincount(files.labels).tolist() == [ds.synthetic_per_class[0]] * ds.synthetic_classes
    assert files.paths[0].startswith('train_val2018/') and os.path.isfile(files.path(0))
    bad = tmp_path / 'bad.json'
    bad.write_text('{"images": 3}')
    with pytest.raises(UserError, match='iNaturalist annotations'):
        ld.inat_annotations(str(tmp_path), 'bad.json')


def test_the_recordio_reader_reads_im2rec_records(tmp_path):
    magic = ld._MAGIC_BYTES
    images = [jpeg(picture(k)) for k in range(3)] + [b'\xff\xd8' + b'ab' + magic + b'cdef' + magic + magic + b'x']
    labels = [5, 0, 999, 7]
    payloads = [ld.recordio_pack(y, img, key=k, pack_label=k % 2 == 0) for k, (y, img) in enumerate(zip(labels, images))]
    ld.write_recordio(str(tmp_path / 'val.rec'), str(tmp_path / 'val.idx'), payloads)
    raw = (tmp_path / 'val.rec').read_bytes()
    assert raw.count(magic) > len(payloads)                    # the last one was split into parts
    rec = ld.RecordFile(str(tmp_path / 'val.rec'), str(tmp_path / 'val.idx'))
    assert len(rec) == 4
    for k in (3, 0, 2, 1):                                     # any order: each record found by its offset
        assert rec.read(k) == (images[k], labels[k])
    (tmp_path / 'bad.idx').write_text('0\t4\n')                # an offset inside a record
    with pytest.raises(ValueError, match='magic'):
        ld.RecordFile(str(tmp_path / 'val.rec'), str(tmp_path / 'bad.idx')).read(0)


def test_the_recordio_reader_on_hand_made_bytes(tmp_path):
    """dmlc's RecordIO as im2rec writes it, byte by byte: each record is the magic 0xced7230a, a word
    (continuation flag << 29 | length), the payload, zero padding to 4 bytes; a payload holding the magic
    at a 4-byte boundary is cut there into parts (flags 1 first, 2 middle, 3 last), the magic dropped. The
    payload: the header 'IfQQ' (flag = number of float labels packed after it, label, id, id2), then the
    image file's bytes. The .idx: key, tab, offset."""
    rec = bytes.fromhex(
        '0a23d7ce' '1c000000'                                   # offset 0: magic, flag 0 | 28 bytes
        '00000000' '00004040' '0000000000000000' '0000000000000000'   # flag 0, label 3.0, id 0, id2 0
        'ffd84142'                                              # the image: ff d8 'A' 'B'
        '0a23d7ce' '22000000'                                   # offset 36: flag 0 | 34 bytes
        '01000000' '00000000' '0100000000000000' '0000000000000000'   # one packed label follows, id 1
        '0000e040'                                              # the packed label: 7.0
        '89504e470d0a' '0000'                                   # the image: 89 'PNG' 0d 0a, 2 bytes of padding
        '0a23d7ce' '1c000020'                                   # offset 80: flag 1 (first part) | 28 bytes
        '00000000' '0000a040' '0200000000000000' '0000000000000000'   # label 5.0, id 2
        'ffd86162'                                              # ff d8 'a' 'b', then (cut out) the magic
        '0a23d7ce' '02000060'                                   # flag 3 (last part) | 2 bytes
        '6364' '0000')                                          # 'c' 'd', padding
    (tmp_path / 'val.rec').write_bytes(rec)
    (tmp_path / 'val.idx').write_text('0\t0\n1\t36\n2\t80\n')
    records = ld.RecordFile(str(tmp_path / 'val.rec'), str(tmp_path / 'val.idx'))
    assert len(records) == 3
    assert records.read(2) == (b'\xff\xd8ab\x0a\x23\xd7\xcecd', 5)    # the parts joined by the magic
    assert records.read(0) == (b'\xff\xd8AB', 3)
    assert records.read(1) == (b'\x89PNG\r\n', 7)                      # the packed label, not the header's 0


def test_the_inaturalist_reader_on_a_hand_written_json(tmp_path):
    """iNaturalist 2018's JSON: images [{id, file_name}] in file order, annotations [{image_id, category_id}]
    in their own order; a path relative to the dataset folder and its category id as the label."""
    (tmp_path / 'val2018.json').write_text('''{
      "images": [{"id": 17, "file_name": "train_val2018/Plantae/5/b.jpg", "width": 40, "height": 30},
                 {"id": 3, "file_name": "train_val2018/Aves/2/a.jpg", "width": 40, "height": 30},
                 {"id": 8, "file_name": "train_val2018/Aves/2/c.jpg", "width": 40, "height": 30}],
      "annotations": [{"id": 0, "image_id": 3, "category_id": 2}, {"id": 1, "image_id": 8, "category_id": 2},
                      {"id": 2, "image_id": 17, "category_id": 5}],
      "categories": [{"id": 2, "name": "two"}, {"id": 5, "name": "five"}]}''')
    files = ld.inat_annotations(str(tmp_path), 'val2018.json')
    assert files.paths == ['train_val2018/Plantae/5/b.jpg', 'train_val2018/Aves/2/a.jpg', 'train_val2018/Aves/2/c.jpg']
    assert files.labels.tolist() == [5, 2, 2]
    assert files.path(0) == os.path.join(str(tmp_path), 'train_val2018/Plantae/5/b.jpg')


def test_the_image_folder_order_is_torchvisions(tmp_path):
    """ImageFolder's order (torchvision.datasets.ImageFolder): class folders sorted as strings (capitals before
    small letters, 'n10' before 'n9'), label k the k-th of them; in each, the images of the folder and its
    sub-folders, folders in sorted path order, names sorted as strings; the image extensions matched in any
    case; other files left out. Nothing is opened."""
    names = {'n9': ['img9.JPEG', 'img10.JPEG', 'IMG_1.jpeg', 'Y.PNG', 'notes.txt', 'sub/x.png', 'sub/0.txt'],
             'n10': ['b.jpg', 'a.jpg'], 'a': ['z.JPEG'], 'B': ['deep/er/q.webp', 'p.bmp']}
    for c, files in names.items():
        for f in files:
            (tmp_path / c / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / c / f).write_bytes(b'')
    files = ld.image_folder(str(tmp_path))
    assert files.classes == ['B', 'a', 'n10', 'n9']
    assert files.paths == ['B/p.bmp', 'B/deep/er/q.webp', 'a/z.JPEG', 'n10/a.jpg', 'n10/b.jpg', 'n9/IMG_1.jpeg',
                           'n9/Y.PNG', 'n9/img10.JPEG', 'n9/img9.JPEG', 'n9/sub/x.png']
    assert files.labels.tolist() == [0, 0, 1, 2, 2, 3, 3, 3, 3, 3]


def test_the_ten_percent_split_is_class_balanced_and_reproducible():
    labels = np.repeat(np.arange(4), [732, 1300, 1000, 20])
    lab, unl = splits.fraction_label_split(labels, 0.1, seed=3)
    assert np.bincount(labels[lab]).tolist() == [73, 130, 100, 2]
    assert len(np.intersect1d(lab, unl)) == 0 and len(lab) + len(unl) == len(labels)
    again, _ = splits.fraction_label_split(labels, 0.1, seed=3)
    other, _ = splits.fraction_label_split(labels, 0.1, seed=4)
    assert np.array_equal(lab, again) and not np.array_equal(np.sort(lab), np.sort(other))


def test_top5_against_a_hand_computed_case():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6],      # top-5: 6,5,4,3,2
                           [6.0, 5, 4, 3, 2, 1, 0],      # top-5: 0..4
                           [1.0, 0, 0, 0, 0, 0, 9]])
    assert topk_count(logits, torch.tensor([2, 5, 6]), 5).item() == 2     # 2 in; 5 out; 6 in
    assert topk_count(logits, torch.tensor([1, 4, 0]), 5).item() == 2     # 1 out; 4 in; 0 in (second largest)
    assert topk_count(logits, torch.tensor([6, 0, 6]), 1).item() == 3


def test_crop_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(20, 400, 2)
        u = torch.from_numpy(rng.random(ld.N_DRAWS))
        top, left, ch, cw = ld.crop_box(u, h, w, (0.1, 1.0), (0.8, 1.25))
        assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
    u = torch.full((ld.N_DRAWS,), 0.5)
    top, left, ch, cw = ld.crop_box(u, 100, 100, (0.1, 1.0), (0.8, 1.25))     # area 0.55, ratio 1
    assert (ch, cw) == (74, 74) and (top, left) == (13, 13)
    u[:20] = 1.0                                   # whole area at aspect 1.25 never fits a square: fall back
    assert ld.crop_box(u, 100, 100, (1.0, 1.0), (1.25, 1.25)) == (10, 0, 80, 100)


def test_the_decode_on_device_path_gives_the_cpu_paths_batches(tree):
    """decode_on 'gpu' reads bytes in the workers and decodes/augments in the main process (on CUDA with
    nvJPEG); run on the CPU device it must give exactly the batches of the CPU path."""
    files = ld.image_folder(str(tree / 'train'))
    plan = ld.BatchPlan(np.arange(9), 4, 1, 'cycle')            # the corrupt one left out
    aug = ld.Augment(True, 24, jitter=True)
    a = list(ld.Batches(files, plan, aug, CPU, 5, 0, 4, workers=0, decode_on='cpu'))
    b = list(ld.Batches(files, plan, aug, CPU, 5, 0, 4, workers=1, decode_on='gpu'))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = list(ld.Batches(files, plan, aug, CPU, 6, 0, 4, workers=0))
    assert not torch.equal(a[0][0], c[0][0])                    # the draws follow the seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_gpu_and_cpu_augmentation_give_the_same_crop():
    img = torch.from_numpy(picture(3, 200, 300)).permute(2, 0, 1).contiguous()
    u = ld.image_draws(0, 1, 2)
    aug = ld.Augment(True, 64, scale=(0.1, 1.0), ratio=(0.8, 1.25))
    cpu, gpu = aug(img, u), aug(img.cuda(), u).cpu()
    assert (cpu.int() - gpu.int()).abs().max() <= 1             # the same box; resampling may round apart
    data = jpeg(picture(3, 200, 300))
    from torchvision.io import decode_jpeg
    on_gpu = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device='cuda').cpu()
    assert (on_gpu.float() - ld.decode(data).float()).abs().mean() < 2       # nvJPEG vs libjpeg


def test_the_batch_plans_are_functions_of_the_step():
    plan = ld.BatchPlan(np.arange(10, 20), 4, 7, 'cycle')
    seen = np.concatenate([plan.batch(t) for t in range(5)])          # 20 = two passes
    assert sorted(seen[:10]) == list(range(10, 20)) and sorted(seen[10:]) == list(range(10, 20))
    assert np.array_equal(ld.BatchPlan(np.arange(10, 20), 4, 7, 'cycle').batch(3), plan.batch(3))
    s = ld.BatchPlan(np.arange(1000), 64, 7, 'sample')
    assert len(set(s.batch(5).tolist())) == 64 and not np.array_equal(s.batch(5), s.batch(6))


# ---- MetaSemi on the synthetic ImageNet ----

SEMI = ['--dataset', 'imagenet', '--synthetic', '--image-size', '32', '--width', '0.125', '--batch-size', '8',
        '--workers', '1', '--print-freq', '5', '--progress', 'false', '--warmup-epochs', '1']


def rows(run_dir):
    with open(run_dir / 'metrics.csv') as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def semi_imagenet(tmp_path_factory):
    """One uninterrupted 2-epoch MetaSemi run on the ImageNet stand-in (written once into data/): the run
    whose split the split test reads and whose end the stopped-and-resumed run must reach."""
    tmp = tmp_path_factory.mktemp('semi_imagenet')
    data = str(tmp / 'data')
    p = run_in_process('train_meta_semi.py', *SEMI, '--epochs', '2', '--data-path', data, '--run_dir', tmp / 'a')
    assert p.returncode == 0, p.stderr[-2000:]
    return p, data, tmp / 'a'


def test_meta_semi_on_imagenet_runs_and_writes_its_split(semi_imagenet, tmp_path):
    p, data, run = semi_imagenet
    assert ' * Prec@1 ' in p.stdout and 'top-5 error' in p.stdout
    row = rows(run)[0]
    ds = ld.LARGE_DATASETS['imagenet']
    n = ds.synthetic_classes * ds.synthetic_per_class[0]
    assert int(row['step']) == math.ceil(n * 0.9 / 8) and float(row['epoch']) == 1.0
    assert 0 <= float(row['test_acc']) <= float(row['test_acc5']) <= 1 and row['bad_images'] == '0'
    listed = (run / 'train_labeled.txt').read_text().split()
    assert len(listed) == n // 10 and all(line.count('/') == 1 for line in listed)
    # the list file is the original's format: a new run given it labels the same images
    q = run_in_process('train_meta_semi.py', *SEMI, '--total-steps', '1', '--epochs', '0', '--data-path', data,
                       '--label-list', run / 'train_labeled.txt', '--run_dir', tmp_path / 's')
    assert q.returncode == 0, q.stderr[-2000:]
    assert (tmp_path / 's' / 'train_labeled.txt').read_text().split() == listed


def test_meta_semi_imagenet_baseline_counts_epochs_over_the_labeled_set(tmp_path):
    p = run_in_process('train_meta_semi.py', *SEMI, '--baseline', '--epochs', '2', '--batch-size', '4', '--data-path',
                   tmp_path / 'data', '--run_dir', tmp_path / 'r')
    assert p.returncode == 0, p.stderr[-2000:]
    assert [int(r['step']) for r in rows(tmp_path / 'r')] == [5, 10]          # 20 labeled / 4
    assert 'Uloss' not in p.stdout and 'mix_up=False' in p.stdout and 'lr_schedule=\'cosine\'' in p.stdout


def test_a_resnet_on_cifar_is_refused(tmp_path, data_root):
    p = run_in_process('train_meta_semi.py', '--synthetic', '--data-path', data_root, '-a', 'resnet18', '--run_dir',
                   tmp_path / 'r')
    assert p.returncode == 2 and 'does not go with' in p.stderr and 'Traceback' not in p.stderr
    assert not (tmp_path / 'r').exists()


def test_meta_semi_imagenet_stopped_mid_epoch_resumes_exactly(semi_imagenet, tmp_path):
    _, data, full = semi_imagenet
    args = SEMI + ['--epochs', '2', '--data-path', data]
    # SIGTERM once step 25 is printed (epoch 2 is steps 23-45): a stop mid-epoch, not racing the epoch's end
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_meta_semi.py'), *args, '--run_dir',
                          str(tmp_path / 'b')], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    for line in p.stdout:
        if line.startswith('Step 00025'):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['step']
    assert stopped % 23 != 0                                    # mid-epoch (23 steps an epoch)
    rest = run_in_process('train_meta_semi.py', '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert rows(full) == rows(tmp_path / 'b')
    a, b = (torch.load(r / 'checkpoint.pt', weights_only=True)['state']['model'] for r in (full, tmp_path / 'b'))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_meta_semi_reads_the_originals_recordio_files(tmp_path):
    """The nine files of the original's im2rec step (here the .rec/.idx pairs), made from the stand-in."""
    ld.write_synthetic_folder('imagenet', str(tmp_path))
    train, test = (ld.large_split('imagenet', str(tmp_path / 'imagenet'), s) for s in ('train', 'test'))
    labeled, unlabeled = splits.fraction_label_split(train.labels, 0.1, 0)
    rec = tmp_path / 'rec'
    rec.mkdir()
    for name, files, index in (('train_label', train, labeled), ('train_unlabel', train, unlabeled),
                               ('val', test, range(len(test)))):
        ld.write_recordio(str(rec / f'{name}.rec'), str(rec / f'{name}.idx'),
                          [ld.recordio_pack(int(files.labels[i]), files.read(i)[0], key=k) for k, i in enumerate(index)])
    p = run_in_process('train_meta_semi.py', *[a for a in SEMI if a != '--synthetic'], '--num-classes', '10', '--data', rec,
                   '--epochs', '1', '--run_dir', tmp_path / 'r')
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'20 labeled, 180 unlabeled, 40 test images; RecordIO files in {rec}' in p.stdout
    (row,) = rows(tmp_path / 'r')
    assert int(row['step']) == 23 and row['bad_images'] == '0'


def test_the_synthetic_tree_is_in_the_real_layout_with_imagenets_odd_files(tmp_path):
    from PIL import Image
    cd.main(['--data_root', str(tmp_path), '--synthetic', 'imagenet', 'dogs'])
    root = tmp_path / 'synthetic' / 'imagenet'
    files = ld.large_split('imagenet', str(root), 'train')
    assert len(files.classes) == 10 and all(p.endswith('.JPEG') for p in files.paths)
    assert sorted(os.listdir(root)) == ['train', 'val'] and (tmp_path / 'synthetic' / 'dogs' / 'test').is_dir()
    kinds, sizes = set(), set()
    for k in range(len(files)):
        with Image.open(files.path(k)) as im:
            kinds.add((im.format, im.mode))
            sizes.add(im.size)
    assert {('JPEG', 'RGB'), ('JPEG', 'L'), ('JPEG', 'CMYK'), ('PNG', 'RGB')} <= kinds
    assert len({w / h for w, h in sizes}) > 20
    x = ld.decode(files.read(0)[0])
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    with pytest.raises(UserError, match='no stand-in for bogus'):
        cd.main(['--root', str(tmp_path), '--synthetic', 'bogus'])


def test_processes_share_an_evaluation_pass_exactly_once(tree):
    """Two processes' shares of an ordered pass cover every image once, also when the last global batch
    has fewer images than processes (that process skips it)."""
    files = ld.image_folder(str(tree / 'train'))
    n = len(files)
    plan = ld.BatchPlan(np.arange(n - 1), 4, 0, 'ordered')      # 9 images: 4, 4, 1 (the last: rank 1's alone)
    seen = []
    for rank in (0, 1):
        b = ld.Batches(files, plan, ld.Augment(False, 8), CPU, 0, 0, 3, shard=(rank, 2), workers=0)
        seen += [len(y) for _, y in b]
    assert sorted(seen) == [1, 2, 2, 2, 2] and sum(seen) == n - 1
