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
