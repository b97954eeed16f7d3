"""Reliability: a diverging run stops (exit code 3) before anything is written from its weights;
checkpoints load with weights_only (a file that would run code is refused); a failed write (disk full)
leaves the previous file and no temporary file, and stops with exit code 2; a failed resume writes
nothing; flags are named in their errors; a corrupt dataset leaves no run folder."""
import errno
import glob
import hashlib
import os
import pickle

import pytest
import torch

import create_dataset
import model_vgg_human
import model_vgg_maxl
import model_vgg_single
import utils
from conftest import run_in_process
from options import UserError
from utils import run_main

TINY = ['--synthetic', '--width', '0.0625', '--batch_size', '100', '--device', 'cpu']


def one_epoch(tmp_path, data_root, *extra):
    model_vgg_single.main(TINY + ['--data_root', data_root, '--epochs', '1', '--logdir', str(tmp_path), *extra])
    (run_dir,) = glob.glob(str(tmp_path / 'model_vgg_single' / '*'))
    return run_dir


def digest(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def files_of(run_dir):
    return {f: digest(os.path.join(run_dir, f)) for f in sorted(os.listdir(run_dir))}


def test_a_non_finite_loss_stops_the_run_before_anything_is_written(tmp_path, data_root, monkeypatch, capsys):
    run_dir = one_epoch(tmp_path, data_root)
    before = files_of(run_dir)
    step, calls = model_vgg_single.train_step, []

    def poisoned(net, x, y, optimizer):          # the weights turn to NaN before the third step of epoch 1
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(net.net.parameters()).fill_(float('nan'))
        return step(net, x, y, optimizer)

    monkeypatch.setattr(model_vgg_single, 'train_step', poisoned)
    with pytest.raises(SystemExit) as e:
        run_main(model_vgg_single.main, ['--resume', run_dir, '--epochs', '3'])
    err = capsys.readouterr().err
    assert e.value.code == 3
    # 2,000 images of 100: epoch 0 ended at step 20, so the third step of epoch 1 is step 22
    assert 'became non-finite at step 22' in err and 'training loss' in err
    assert f'--resume {run_dir} --lr 0.001' in err and 'checkpoint.pt (epoch 0)' in err
    after = files_of(run_dir)
    for f in ('checkpoint.pt', 'best.pt', 'metrics.csv'):
        assert after[f] == before[f], f                     # nothing written from the NaN weights


def test_weights_that_turn_non_finite_with_finite_losses_are_refused_at_the_save(tmp_path, tiny_root, monkeypatch,
                                                                                 capsys):
    """Human with Random auxiliary labels tests its primary head only. Its auxiliary head turned NaN after
    the last step of epoch 1 leaves every loss of that epoch and every test number finite: the check of the
    weights before anything is saved is what stops the run (exit code 3), with nothing written."""
    model_vgg_human.main(TINY + ['--data_root', tiny_root, '--epochs', '1', '--aux_labels', 'random',
                                 '--run_dir', str(tmp_path / 'run')])
    run_dir = str(tmp_path / 'run')
    before = files_of(run_dir)
    step, calls = model_vgg_human.train_step, []

    def poisoned(net, x, y1, y2, optimizer):     # 500 images of 100: the 5th step of the resumed run ends epoch 1
        out = step(net, x, y1, y2, optimizer)
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                net.net.classifier2[2].weight.fill_(float('nan'))
        return out

    monkeypatch.setattr(model_vgg_human, 'train_step', poisoned)
    with pytest.raises(SystemExit) as e:
        run_main(model_vgg_human.main, ['--resume', run_dir, '--epochs', '2'])
    err = capsys.readouterr().err
    assert e.value.code == 3 and 'training diverged: at epoch 1 the weights became non-finite' in err, err
    after = files_of(run_dir)
    for f in ('checkpoint.pt', 'best.pt', 'metrics.csv'):
        assert after[f] == before[f], f


@pytest.mark.parametrize('script,args', [
    ('train_meta_semi.py', ['--data-path', '{root}', '--num-label', 100, '--total-steps', 20, '--warmup', 0,
                            '--test-freq', 10, '--batch-size', 16, '--width', 0.0625, '--lr', 1e6]),
    ('train_sla.py', ['--datadir', '{root}', '--num-iterations', 20, '--val-freq', 10, '--batchsize', 16,
                      '--model', 'cresnet20', '--width', 0.125, '--lr', 1e6]),
])
def test_a_huge_learning_rate_stops_with_exit_code_3(tmp_path, tiny_root, script, args):
    p = run_in_process(script, '--synthetic', *[str(a).replace('{root}', tiny_root) for a in args],
                       '--logdir', tmp_path)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'training diverged' in p.stderr and 'Traceback' not in p.stderr
    assert 'lower learning rate' in p.stderr
    for run_dir in glob.glob(str(tmp_path / '*' / '*')):
        assert not os.path.exists(os.path.join(run_dir, 'best.pt'))
        if os.path.exists(os.path.join(run_dir, 'metrics.csv')):
            assert 'nan' not in open(os.path.join(run_dir, 'metrics.csv')).read()


class Payload:
    def __reduce__(self):
        return (os.system, ('touch ' + Payload.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_root):
    run_dir = one_epoch(tmp_path, tiny_root)
    Payload.marker = str(tmp_path / 'ran')
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    ckpt['extra'] = Payload()
    with open(os.path.join(run_dir, 'checkpoint.pt'), 'wb') as f:
        pickle.dump(ckpt, f)                               # torch.load reads plain pickles too
    with pytest.raises(UserError, match='could run code'):
        model_vgg_single.main(['--resume', run_dir, '--epochs', '2'])
    assert not os.path.exists(tmp_path / 'ran')


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path, tiny_root):
    run_dir = one_epoch(tmp_path, tiny_root)
    for f in ('checkpoint.pt', 'best.pt'):
        torch.load(os.path.join(run_dir, f), weights_only=True)           # raises on anything else


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_why(tmp_path, tiny_root, monkeypatch, capsys):
    run_dir = one_epoch(tmp_path, tiny_root)
    before = files_of(run_dir)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(utils.torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        run_main(model_vgg_single.main, ['--resume', run_dir, '--epochs', '2'])
    monkeypatch.setattr(utils.torch, 'save', real_save)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'No space left on device' in err and f'errno {errno.ENOSPC}' in err
    assert 'checkpoint.pt' in err or 'best.pt' in err
    assert not glob.glob(os.path.join(run_dir, '*.tmp'))
    assert files_of(run_dir)['checkpoint.pt'] == before['checkpoint.pt']
    torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)   # still whole


def test_a_failed_resume_writes_nothing(tmp_path, tiny_root):
    run_dir = one_epoch(tmp_path, tiny_root)
    before = files_of(run_dir)
    with pytest.raises(UserError, match='does not fit the networks'):
        model_vgg_single.main(['--resume', run_dir, '--epochs', '2', '--width', '0.125'])
    assert files_of(run_dir) == before                   # log.txt and config.json untouched too


def test_resume_with_a_lower_learning_rate_takes_effect(tmp_path, tiny_root):
    run_dir = one_epoch(tmp_path, tiny_root)
    model_vgg_single.main(['--resume', run_dir, '--epochs', '2', '--lr', '0.001'])
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), weights_only=True)
    assert ckpt['state']['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.001)
    assert 'scales the saved learning rates by 0.1' in open(os.path.join(run_dir, 'log.txt')).read()


def test_resume_of_a_run_that_never_saved(tmp_path):
    run_dir = tmp_path / 'logs' / 'model_vgg_single' / 'early'
    run_dir.mkdir(parents=True)
    (run_dir / 'config.json').write_text('{}')
    with pytest.raises(UserError, match='never saved a checkpoint') as e:
        model_vgg_single.main(['--resume', str(run_dir)])
    assert str(e.value).count(str(run_dir)) == 1


def test_a_missing_run_is_named_once(tmp_path):
    with pytest.raises(UserError) as e:
        model_vgg_single.main(['--resume', str(tmp_path / 'nowhere'), '--logdir', str(tmp_path)])
    assert str(e.value).count(str(tmp_path / 'nowhere')) == 1


@pytest.mark.parametrize('script,args,needle', [
    (model_vgg_single, ['--width', '0'], '--width must be positive, got 0.0'),
    (model_vgg_single, ['--batch_size', '0'], '--batch_size must be positive, got 0'),
    (model_vgg_human, ['--epochs', '-3'], '--epochs must be positive, got -3'),
    (model_vgg_maxl, ['--cos_every', '-1'], '--cos_every must be at least 0, got -1'),
])
def test_bad_values_name_their_flag(tmp_path, script, args, needle):
    with pytest.raises(UserError) as e:
        script.main(['--synthetic', '--logdir', str(tmp_path), *args])
    assert needle in str(e.value)
    assert not os.listdir(tmp_path)


def test_a_bad_list_flag_says_what_a_list_is(tmp_path):
    p = run_in_process('model_vgg_maxl.py', '--psi', 'five', '--logdir', tmp_path)
    assert p.returncode == 2 and 'list of integers' in p.stderr and '_parse_int_list' not in p.stderr


def test_a_corrupt_dataset_leaves_no_run_folder(tmp_path):
    root = tmp_path / 'data'
    create_dataset.write_synthetic('cifar100', str(root), seed=0, sizes=(100, 100))     # real names, wrong md5
    p = run_in_process('model_vgg_single.py', '--data_root', root, '--logdir', tmp_path / 'logs')
    assert p.returncode == 2 and 'md5' in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'logs')


def test_metrics_are_brought_back_to_the_checkpoint_on_resume(tmp_path, tiny_root):
    """A run killed after writing a metrics row but before its checkpoint (or the reverse) resumes with
    metrics.csv as the checkpoint knows it: no repeated or missing row."""
    run_dir = one_epoch(tmp_path, tiny_root)
    model_vgg_single.main(['--resume', run_dir, '--epochs', '2'])
    path = os.path.join(run_dir, 'metrics.csv')
    complete = open(path).read()
    lines = complete.splitlines(keepends=True)
    with open(path, 'w') as f:                 # the row of epoch 1 lost (killed between checkpoint and row)
        f.writelines(lines[:-1])
    model_vgg_single.main(['--resume', run_dir, '--epochs', '2'])
    assert open(path).read() == complete
    with open(path, 'a') as f:                 # a row beyond the checkpoint (killed before the checkpoint)
        f.write(lines[-1].replace('1,', '2,', 1))
    model_vgg_single.main(['--resume', run_dir, '--epochs', '2'])
    assert open(path).read() == complete
