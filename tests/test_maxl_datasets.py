"""The MAXL paper's three scripts beyond CIFAR-100 and VGG-16: --dataset (CIFAR-10, SVHN, Fashion-MNIST, with
--psi auxiliary classes per class) and --model (the CIFAR ResNets for both networks); the bad inputs of both
refused with exit code 2, one paragraph naming what fits, nothing written."""
import json
import os

import pytest
import torch

from conftest import run_in_process

SCRIPTS = ['model_vgg_single.py', 'model_vgg_human.py', 'model_vgg_maxl.py']
TINY_RUN = ['--synthetic', '--epochs', 1, '--batch_size', 20, '--num_samples_per_class', 4, '--width', 0.125]


@pytest.mark.parametrize('script,args,message', [
    *[(s, ['--dataset', 'cifar10', '--primary_level', 1], '--primary_level picks a level of CIFAR-100\'s label '
       'hierarchy, and --dataset cifar10 has none') for s in SCRIPTS],
    ('model_vgg_human.py', ['--dataset', 'svhn', '--aux_level', 3, '--aux_labels', 'random'],
     '--aux_level picks a level of CIFAR-100\'s label hierarchy, and --dataset svhn has none'),
    ('model_vgg_maxl.py', ['--dataset', 'fashion-mnist', '--aux_level', 3], 'drop --aux_level'),
    ('model_vgg_human.py', ['--dataset', 'cifar10'], '--aux_labels human takes the finer labels of CIFAR-100'),
    ('model_vgg_human.py', ['--dataset', 'cifar10', '--aux_labels', 'random', '--psi', '2,3'],
     'one positive entry per primary class (10 here)'),
    ('model_vgg_maxl.py', ['--dataset', 'cifar10', '--psi', '2,3'], 'one positive entry per primary class (10 here)'),
    ('model_vgg_maxl.py', ['--dataset', 'cifar10', '--psi', 0], 'one positive entry per primary class'),
    ('model_vgg_human.py', ['--dataset', 'cifar10', '--aux_labels', 'kmeans', '--psi', 5, '--num_samples_per_class', 3],
     'fewer than its 5 auxiliary classes'),
    *[(s, ['--dataset', 'cifar10', '--model', 'resnet18'], '--model resnet18 is torchvision\'s ResNet for large '
       'images, and --dataset cifar10 has 32 x 32 images: use --model vgg16') for s in SCRIPTS],
])
def test_a_setting_that_does_not_fit_the_dataset_exits_2_naming_what_fits(tmp_path, data_root, script, args, message):
    p = run_in_process(script, '--synthetic', '--data_root', data_root, '--logdir', tmp_path, *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1                       # one paragraph
    assert not os.listdir(tmp_path)                                       # nothing written


def run_dir_of(logdir, script):
    (name,) = os.listdir(os.path.join(logdir, script[:-3]))
    return os.path.join(logdir, script[:-3], name)


@pytest.mark.parametrize('script,extra', [('model_vgg_single.py', []),
                                          ('model_vgg_human.py', ['--aux_labels', 'random', '--psi', 3]),
                                          ('model_vgg_maxl.py', ['--psi', 3, '--meta_order', 2])])
def test_every_script_trains_a_cifar_resnet_on_fashion_mnist(tmp_path, data_root, script, extra):
    """--model cresnet20: every network of the run is the CIFAR ResNet (its heads classifiers.k), on the grey
    stand-in; psi 3 per class gives 30 auxiliary classes."""
    import create_dataset
    create_dataset.write_synthetic('fashion-mnist', os.path.join(str(tmp_path), 'data', 'synthetic'), seed=0,
                                   sizes=(200, 40))
    p = run_in_process(script, *TINY_RUN, '--data_root', tmp_path / 'data', '--dataset', 'fashion-mnist',
                       '--model', 'cresnet20', '--logdir', tmp_path / 'logs', *extra)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('EPOCH: ') == 1
    run = run_dir_of(tmp_path / 'logs', script)
    assert json.load(open(os.path.join(run, 'config.json')))['model'] == 'cresnet20'
    state = torch.load(os.path.join(run, 'checkpoint.pt'), weights_only=True)['state']
    networks = [k for k in ('net', 'gen') if k in state]
    assert networks == (['net', 'gen'] if 'maxl' in script else ['net'])
    for k in networks:
        assert 'base_model.3.0.conv_a.weight' in state[k]                 # a CIFAR ResNet's first block
    heads = {k: v.shape[0] for k, v in state['net'].items() if k.startswith('classifiers.') and k.endswith('weight')}
    assert heads == ({'classifiers.0.weight': 10} if script == 'model_vgg_single.py' else
                     {'classifiers.0.weight': 10, 'classifiers.1.weight': 30})
    if 'gen' in state:
        assert state['gen']['classifiers.0.weight'].shape[0] == 30


# ---- the file datasets (tiny-ImageNet, CUB-200, ..., your own ImageFolder tree), streamed ----

def image_tree(root, classes=('cat', 'dog', 'fox'), per_class=(8, 3)):
    """A user's own dataset: root/train/<class>/*.png and root/test/<class>/*.jpg, pictures of 40 x 50 pixels."""
    import numpy as np
    from PIL import Image
    from machinery.large_datasets import synthetic_picture
    rng = np.random.default_rng(0)
    for split, n, ext in (('train', per_class[0], 'png'), ('test', per_class[1], 'jpg')):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for k in range(n):
                Image.fromarray(synthetic_picture(c, len(classes), 40, 50, rng)).save(
                    os.path.join(root, split, name, f'{k}.{ext}'))
    return str(root)


def test_a_shuffled_pass_over_files_shows_every_image_once_with_its_own_label_columns(tmp_path):
    """FileColumns, the file datasets as the MAXL scripts read them: a shuffled pass is a permutation (every
    image once, its label columns with it), a function of the generator; an evaluation pass goes in order."""
    import numpy as np
    from machinery import large_datasets as ld
    files = ld.image_folder(os.path.join(image_tree(tmp_path / 'tree'), 'train'))
    columns = np.stack([files.labels, 100 + np.arange(len(files))], 1)        # the class and the row
    data = ld.FileColumns(files, columns, torch.device('cpu'), (0, 1), 0, 'cpu', ld.Augment(True, 16),
                          ld.Augment(False, 16))
    assert len(data) == 24 and data.num_batches(5) == 5

    def one_pass(seed, **kw):
        got = list(data.batches(5, torch.Generator().manual_seed(seed), **kw))
        assert [len(x) for x, _ in got] == [5, 5, 5, 5, 4] and got[0][0].shape[1:] == (3, 16, 16)
        return torch.cat([y for _, y in got]), torch.cat([x for x, _ in got])

    rows, x = one_pass(0, shuffle=True, augment=True)
    assert sorted((rows[:, 1] - 100).tolist()) == list(range(24))                    # every image once
    assert torch.equal(rows[:, 0], torch.as_tensor(files.labels)[rows[:, 1] - 100])  # with its class
    again, x_again = one_pass(0, shuffle=True, augment=True)
    assert torch.equal(again, rows) and torch.equal(x_again, x)                      # the generator decides
    assert not torch.equal(one_pass(1, shuffle=True)[0], rows)
    assert (one_pass(0)[0][:, 1] - 100).tolist() == list(range(24))                  # evaluation: in order


def test_your_own_imagefolder_tree_trains_single_and_maxl_with_one_command(tmp_path):
    """--dataset folder --data_root TREE: TREE's class folders are the primary task; a ResNet-18 unless --model."""
    tree = image_tree(tmp_path / 'my_images')
    for script in ('model_vgg_single.py', 'model_vgg_maxl.py'):
        p = run_in_process(script, '--dataset', 'folder', '--data_root', tree, '--epochs', 1, '--batch_size', 8,
                           '--width', 0.0625, '--image_size', 32, '--model', 'cresnet20', '--workers', 0,
                           '--logdir', tmp_path / 'logs')
        assert p.returncode == 0, p.stderr
        assert 'images: train 24, test 9' in p.stdout and p.stdout.count('EPOCH: ') == 1
        state = torch.load(os.path.join(run_dir_of(tmp_path / 'logs', script), 'checkpoint.pt'), weights_only=True)
        assert state['state']['net']['classifiers.0.weight'].shape[0] == 3             # cat, dog, fox
    assert state['state']['gen']['classifiers.0.weight'].shape[0] == 15                # psi 5 per class
    p = run_in_process('model_vgg_single.py', '--dataset', 'folder', '--data_root', tree, '--epochs', 1,
                       '--batch_size', 8, '--width', 0.0625, '--image_size', 40, '--workers', 0, '--run_dir', tmp_path / 'r')
    assert p.returncode == 0, p.stderr
    assert json.load(open(tmp_path / 'r' / 'config.json'))['model'] == 'resnet18'      # the file datasets' default


@pytest.mark.parametrize('args,message', [
    (['--dataset', 'folder'], 'has no train/ or no test/ folder: give that tree\'s folder with --data_root'),
    (['--dataset', 'folder', '--synthetic'], 'has no synthetic stand-in'),
    (['--dataset', 'tiny-imagenet', '--synthetic', '--model', 'vgg16'], '--model vgg16 takes 32 x 32 images, and '
     'this run\'s are 224 x 224 (--dataset tiny-imagenet, --image_size 224): use torchvision\'s ResNet'),
    (['--dataset', 'tiny-imagenet', '--synthetic', '--image_size', 32], '--model resnet18 is torchvision\'s ResNet '
     'for large images, and --image_size 32 makes 32 x 32 images'),
    (['--dataset', 'tiny-imagenet', '--synthetic', '--aux_labels', 'human'], '--aux_labels human takes the finer'),
    (['--dataset', 'mnist'], '--dataset \'mnist\' is not one of'),
])
def test_a_file_dataset_that_does_not_fit_exits_2_naming_what_fits(tmp_path, args, message):
    (tmp_path / 'empty').mkdir()
    p = run_in_process('model_vgg_human.py', '--data_root', tmp_path / 'empty', '--logdir', tmp_path / 'logs',
                       '--aux_labels', 'random', *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / 'logs')
