"""The shared training skeleton (utils.Run): one name per setting with the originals' spellings as
aliases, hyperparameters read from the scripts' tops, choices checked once (resumed configs too),
named meters, one run-folder convention, checkpoints of another script or of the old layout refused."""
import json
import os

import pytest
import torch

import model_vgg_human
import model_vgg_maxl
import model_vgg_single
import train_meta_semi
import train_sla
from machinery import options
from machinery import streams
import utils
from machinery.options import UserError, hyperparameters, parse_config
from utils import Meters

SCRIPTS = [model_vgg_single, model_vgg_human, model_vgg_maxl, train_sla, train_meta_semi]


def test_hyperparameters_are_the_plain_lowercase_values_of_the_top():
    namespace = {'__file__': train_sla.__file__, 'lr': 0.1, 'psi': [5, 5], 'mode': 'sla', 'flag': False,
                 'MEAN': (0.5,), 'torch': torch, 'helper': len, '_private': 1, 'floats': [0.5]}
    got = hyperparameters(namespace)
    assert dict(got) == {'lr': 0.1, 'psi': [5, 5], 'mode': 'sla', 'flag': False}
    assert 'self-distillation temperature' in train_sla.HYPERPARAMETERS.helps['temperature']   # its comment


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda m: m.__name__)
def test_every_script_has_the_shared_run_options_under_one_name(script):
    cfg, _ = parse_config(script.HYPERPARAMETERS, [])
    for name in options.RUN_OPTIONS:
        assert hasattr(cfg, name), name
    for old in ('datadir', 'data_path', 'batchsize', 'wd', 'num_iterations', 'val_freq', 'test_freq', 'save_path',
                'gpu', 'T'):
        assert not hasattr(cfg, old), old            # one canonical name each; the old spelling is an alias


def test_script_defaults_override_the_shared_ones():
    assert parse_config(train_sla.HYPERPARAMETERS, [])[0].batch_size == 128
    assert parse_config(train_meta_semi.HYPERPARAMETERS, [])[0].seed == 1234
    assert parse_config(model_vgg_maxl.HYPERPARAMETERS, [])[0].batch_size == 100


def test_the_originals_spellings_are_aliases():
    sla, given = parse_config(train_sla.HYPERPARAMETERS, [
        '--dataset', 'cifar100', '--datadir', 'data/', '--batchsize', '64', '--num-iterations', '80000',
        '--val-freq', '1000', '--model', 'cresnet32', '--mode', 'sla', '--aug', 'rotation', '--wd', '5e-4',
        '--T', '4', '--with-large-loss'])
    assert (sla.data_root, sla.batch_size, sla.total_steps, sla.eval_every, sla.weight_decay, sla.temperature,
            sla.with_large_loss) == ('data/', 64, 80000, 1000, 5e-4, 4.0, True)
    assert {'data_root', 'batch_size', 'total_steps', 'eval_every', 'weight_decay', 'temperature'} <= given
    semi, given = parse_config(train_meta_semi.HYPERPARAMETERS, [
        '--dataset', 'svhn', '--num-label', '1000', '-a', 'convlarge', '--mix-up', '--alpha', '0.1',
        '--save-path', 'results/svhn', '--seed', '7788', '--weight-decay', '5e-5', '--gpu', '--data-path', 'd',
        '--test-freq', '7'])
    assert (semi.run_dir, semi.seed, semi.weight_decay, semi.device, semi.data_root, semi.eval_every,
            semi.mix_up) == ('results/svhn', 7788, 5e-5, 'cuda', 'd', 7, True)
    assert 'device' in given and 'seed' in given and 'lr' not in given


def test_choices_are_checked_once_for_typed_and_for_resumed_values(tmp_path):
    with pytest.raises(SystemExit) as e:          # argparse's own error: exit code 2, no traceback
        parse_config(train_sla.HYPERPARAMETERS, ['--mode', 'nope'], choices=train_sla.CHOICES)
    assert e.value.code == 2
    cfg, _ = parse_config(train_sla.HYPERPARAMETERS, [])
    cfg.mode = 'nope'                             # as a hand-edited config.json would bring it back
    with pytest.raises(UserError, match="--mode 'nope' is not one of"):
        options.check_choices(cfg, train_sla.CHOICES)


def test_meters_sum_on_the_device_and_divide_by_their_counts():
    m = Meters()
    m.add(4, loss=torch.tensor(2.0), acc=torch.tensor(3.0))
    m.add(6, loss=torch.tensor(4.0), acc=torch.tensor(6.0))
    m.add(10, cos=torch.tensor(0.5))
    assert m.means() == pytest.approx({'loss': 0.6, 'acc': 0.9, 'cos': 0.05}, rel=1e-6)      # float32 sums
    assert Meters().means() == {}


def tiny_single_run(tmp_path, data_root, *extra):
    model_vgg_single.main(['--synthetic', '--data_root', data_root, '--epochs', '1', '--width', '0.0625',
                           '--logdir', str(tmp_path), *extra])
    (name,) = os.listdir(tmp_path / 'model_vgg_single')
    return tmp_path / 'model_vgg_single' / name


def test_run_folder_convention_and_best_file(tmp_path, tiny_root):
    run_dir = tiny_single_run(tmp_path, tiny_root)
    assert {'config.json', 'log.txt', 'metrics.csv', 'checkpoint.pt', 'best.pt'} <= set(os.listdir(run_dir))
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['script'] == 'model_vgg_single' and 'resume' not in config
    best = torch.load(run_dir / 'best.pt', weights_only=False)
    ckpt = torch.load(run_dir / 'checkpoint.pt', weights_only=False)
    assert best['best'] == ckpt['best'] == {'epoch': 0, 'test_acc': best['row']['test_acc']}
    assert 0 <= best['row']['test_acc'] <= 1                    # accuracies are fractions in files
    assert set(best['state']) == {'net'}                        # the networks only
    for k, v in best['state']['net'].items():
        assert torch.equal(v, ckpt['state']['net'][k])


def test_resume_of_another_scripts_run_names_that_script(tmp_path, tiny_root):
    run_dir = tiny_single_run(tmp_path, tiny_root)
    with pytest.raises(UserError, match=r'written by model_vgg_single\.py.*python model_vgg_single\.py --resume'):
        model_vgg_human.main(['--resume', str(run_dir)])


def test_checkpoint_of_the_old_layout_is_refused_clearly(tmp_path, tiny_root):
    run_dir = tiny_single_run(tmp_path, tiny_root)
    old = torch.load(run_dir / 'checkpoint.pt', weights_only=False)
    for k in ('format', 'script', 'best', 'last'):             # the layout before the shared skeleton
        old.pop(k)
    torch.save(old, run_dir / 'checkpoint.pt')
    with pytest.raises(UserError, match='earlier version of this code'):
        model_vgg_single.main(['--resume', str(run_dir), '--epochs', '2'])


def test_resume_keeps_the_best_and_extends_the_run(tmp_path, tiny_root):
    run_dir = tiny_single_run(tmp_path, tiny_root)
    first = torch.load(run_dir / 'checkpoint.pt', weights_only=False)['best']
    model_vgg_single.main(['--resume', str(run_dir), '--epochs', '2'])
    ckpt = torch.load(run_dir / 'checkpoint.pt', weights_only=False)
    assert ckpt['last']['epoch'] == 1
    assert ckpt['best']['test_acc'] == max(first['test_acc'], ckpt['last']['test_acc'])


def test_run_options_and_stream_seed_are_declared_once():
    for script in SCRIPTS:
        source = open(script.__file__).read()
        for name in ('data_root', 'device', 'logdir', 'resume', 'synthetic', 'download', 'amp'):
            assert f'\n{name} = ' not in source, (script.__name__, name)
        assert '1_000_003' not in source
    assert streams.stream_seed(2, 5) == 2 * streams.STREAM_STRIDE + 5
