"""Reliability: a diverging run stops (exit code 3) before anything is written from its weights;
checkpoints load with weights_only (a file that would run code is refused); a failed write (disk full)
leaves the previous file and no temporary file, and stops with exit code 2; a failed resume writes
nothing; flags are named in their errors; a corrupt dataset leaves no run folder."""
import errno
import glob
import hashlib
import json
import os
import pickle

import pytest
import torch

from machinery import checkpoints, files
import create_dataset
import model_vgg_human
import model_vgg_maxl
import model_vgg_single
import utils
from conftest import run_in_process
from machinery.options import UserError
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



# ---- Reliability, second round -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def finished(tmp_path_factory, tiny_root):
    """One finished one-epoch Single run, made once for the tests below that damage a copy of it."""
    return one_epoch(tmp_path_factory.mktemp('finished'), tiny_root)


def a_run(tmp_path, finished):
    """A copy of the finished run (its own folder, to damage)."""
    import shutil
    shutil.copytree(finished, tmp_path / 'run')
    return str(tmp_path / 'run')


# A short run of each script on the tiny stand-in (what a bad option would start if it were let through).
SHORT = {
    'model_vgg_single': ['--width', '0.0625', '--epochs', '1'],
    'model_vgg_human': ['--width', '0.0625', '--epochs', '1'],
    'model_vgg_maxl': ['--width', '0.0625', '--epochs', '1'],
    'train_sla': ['--dataset', 'cifar10', '--model', 'cresnet20', '--width', '0.125', '--batchsize', '16',
                  '--num-iterations', '2', '--val-freq', '1'],
    'train_meta_semi': ['--dataset', 'cifar10', '--num-label', '100', '--total-steps', '2', '--warmup', '0',
                        '--test-freq', '1', '--width', '0.0625', '--batch-size', '16'],
}


def float_options():
    """(script, option) for every float option of every script: its hyperparameters and the run options."""
    import importlib
    from machinery.options import RUN_OPTIONS
    out = []
    for script in SHORT:
        hyper = importlib.import_module(script).HYPERPARAMETERS
        names = [k for k, v in hyper.items() if type(v) is float]
        names += [k for k, (v, _) in RUN_OPTIONS.items() if k not in hyper and type(v) is float]
        out += [(script, name) for name in names]
    return out


def test_every_float_option_is_checked():
    assert len(float_options()) >= 25          # every script's lr, width, ... and progress_every


@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
@pytest.mark.parametrize('script,name', float_options())
def test_a_non_finite_float_option_is_refused_before_anything_is_written(tmp_path, tiny_root, script, name, value):
    """`--lr nan` (and inf, for every float option of every script) stops at the command line: exit code 2,
    the option named, no run folder."""
    p = run_in_process(f'{script}.py', '--synthetic', '--data_root', tiny_root, '--device', 'cpu', *SHORT[script],
                       '--logdir', tmp_path / 'logs', f'--{name}={value}')
    assert p.returncode == 2, p.stderr[-1500:]
    assert f'--{name} must be a finite number, got {value}' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'logs')


def damage(path, kind):
    if kind == 'missing':
        os.remove(path)
    else:
        with open(path, 'w') as f:
            f.write('' if kind == 'empty' else '{"epochs": 1, "lr": 0.01,\n')      # cut off mid-file


def without_starts(config):
    """config.json less the record of the run's later starts (environment_resumed: each resume adds one)."""
    return {k: v for k, v in config.items() if k != 'environment_resumed'}


@pytest.mark.parametrize('kind', ['invalid', 'empty', 'missing'])
def test_a_damaged_config_json_is_named_and_restored_from_the_checkpoint(tmp_path, finished, kind):
    """--resume of a run whose config.json is invalid, empty or missing: one paragraph naming the file and the
    command that restores it from the checkpoint (which carries the configuration), exit 2, nothing written;
    that command keeps the damaged file, writes config.json back as it was and continues."""
    run_dir = a_run(tmp_path, finished)
    config = os.path.join(run_dir, 'config.json')
    original = json.load(open(config))
    damage(config, kind)
    before = files_of(run_dir)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', '2')
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert config in p.stderr and {'invalid': 'not valid JSON', 'empty': 'is empty', 'missing': 'is missing'}[kind] \
        in p.stderr, p.stderr
    assert f'--resume {run_dir} --epochs 2 --restore_config' in p.stderr and 'Nothing was written' in p.stderr
    assert files_of(run_dir) == before
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', '2', '--restore_config')
    assert p.returncode == 0, p.stderr
    assert without_starts(json.load(open(config))) == original | {'epochs': 2}
    assert 'restored from ' + os.path.join(run_dir, 'checkpoint.pt') in p.stdout
    if kind != 'missing':                                       # the damaged file is kept beside it
        assert open(config + '.damaged').read() == ('' if kind == 'empty' else '{"epochs": 1, "lr": 0.01,\n')
    assert 'EPOCH: 0001' in p.stdout


def test_a_checkpoint_from_before_the_configuration_was_kept_uses_best_pt(tmp_path, finished):
    """A checkpoint written before checkpoints carried the configuration: --restore_config takes best.pt's
    (and says so); with neither, the message says what to do instead."""
    run_dir = a_run(tmp_path, finished)
    config = os.path.join(run_dir, 'config.json')
    original = json.load(open(config))
    ckpt_path = os.path.join(run_dir, 'checkpoint.pt')
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt.pop('config', None)
    torch.save(ckpt, ckpt_path)
    damage(config, 'invalid')
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', '2')
    assert p.returncode == 2 and 'best.pt' in p.stderr and '--restore_config' in p.stderr, p.stderr
    best = torch.load(os.path.join(run_dir, 'best.pt'), weights_only=True)
    best.pop('config')
    torch.save(best, os.path.join(run_dir, 'best.pt'))
    before = files_of(run_dir)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', '2', '--restore_config')
    assert p.returncode == 2 and 'by hand' in p.stderr and 'start a new run' in p.stderr, p.stderr
    assert files_of(run_dir) == before
    with open(config, 'w') as f:              # best.pt as it was: its configuration is taken
        f.write('')
    torch.save(best | {'config': original | {'resume': '', 'eval_only': False}}, os.path.join(run_dir, 'best.pt'))
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', '2', '--restore_config')
    assert p.returncode == 0, p.stderr
    assert without_starts(json.load(open(config))) == original | {'epochs': 2} and 'best.pt' in p.stdout


def test_restore_config_is_only_for_a_damaged_one(tmp_path, finished):
    run_dir = a_run(tmp_path, finished)
    before = files_of(run_dir)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--restore_config')
    assert p.returncode == 2 and 'reads fine' in p.stderr, p.stderr
    p = run_in_process('model_vgg_single.py', '--restore_config', '--logdir', tmp_path / 'new')
    assert p.returncode == 2 and 'with --resume' in p.stderr, p.stderr
    assert files_of(run_dir) == before and not os.path.exists(tmp_path / 'new')


def test_the_divergence_message_quotes_the_learning_rate_typed(tmp_path, tiny_root):
    """SLA's rate is stepped down by its schedule before the divergence is seen (x0.1 at half the iterations):
    the message quotes the rate typed and advises a tenth of it, not a tenth of the stepped-down one."""
    p = run_in_process('train_sla.py', '--synthetic', '--datadir', tiny_root, '--num-iterations', 20, '--val-freq',
                       10, '--batchsize', 16, '--model', 'cresnet20', '--width', 0.125, '--lr', 1e6, '--device', 'cpu',
                       '--logdir', tmp_path)
    assert p.returncode == 3, p.stderr[-2000:]
    assert '--lr 1e+06 as typed' in p.stderr and 'e.g. --lr 100000 ' in p.stderr, p.stderr


def test_a_finite_blow_up_of_the_loss_stops_maxl_with_exit_code_3(tmp_path, tiny_root):
    """MAXL with --lr 1e6 stays finite (weights ~1e22, the focal loss pinned at ~44, test accuracy at chance):
    the training loss above 10 times its first value for most of the epoch stops the run (exit 3) before
    anything is evaluated or written from those weights."""
    p = run_in_process('model_vgg_maxl.py', *TINY, '--data_root', tiny_root, '--epochs', 2, '--lr', 1e6,
                       '--run_dir', tmp_path / 'r')
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'training diverged: the training loss stayed above 10 times its value at the first step' in p.stderr
    assert 'Traceback' not in p.stderr and '--lr 100000 ' in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path / 'r')) == ['config.json', 'lock', 'log.txt']   # no best.pt, no checkpoint


def test_a_weight_beyond_the_bound_stops_the_run_before_anything_is_written(tmp_path, finished, monkeypatch,
                                                                             capsys):
    """A weight grown beyond 1e6 (here in a convolution followed by batch norm, so the loss does not show it)
    stops the run at the evaluation (exit 3): nothing written from those weights, the last checkpoint named."""
    run_dir = a_run(tmp_path, finished)
    before = files_of(run_dir)
    step, calls = model_vgg_single.train_step, []

    def blown(net, x, y, optimizer):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(net.net.parameters()).mul_(1e9)
        return step(net, x, y, optimizer)

    monkeypatch.setattr(model_vgg_single, 'train_step', blown)
    with pytest.raises(SystemExit) as e:
        run_main(model_vgg_single.main, ['--resume', run_dir, '--epochs', '3'])
    err = capsys.readouterr().err
    assert e.value.code == 3, err
    assert 'a weight grew beyond 1e+06' in err and 'net.' in err and 'checkpoint.pt (epoch 0)' in err, err
    after = files_of(run_dir)
    for f in ('checkpoint.pt', 'best.pt', 'metrics.csv'):
        assert after[f] == before[f], f


def test_the_loss_watch_counts_a_sustained_stretch_not_a_spike():
    """The on-device count behind the loss check: a one-step spike is not a divergence, most steps high is."""
    for losses, high in (([2.0, 100.0, 2.0, 2.0, 1.5], 1), ([2.0, 50.0, 40.0, 30.0, 1.0], 3)):
        m = utils.Meters(watch='loss')
        for v in losses:
            m.add(4, loss=torch.tensor(v * 4), acc=torch.tensor(1.0))
        assert m.loss_watch() == (high, len(losses), 2.0)
    m = utils.Meters(watch='loss', reference=torch.tensor(0.5))        # a later interval: the run's reference
    m.add(2, loss=torch.tensor(12.0))
    assert m.loss_watch() == (1, 1, 0.5)
    state = m.state_dict()                   # a run stopped between two evaluations keeps the count
    again = utils.Meters.from_state(state)
    again.add(2, loss=torch.tensor(1.0))
    assert again.loss_watch() == (1, 2, 0.5)


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_a_full_disk_says_no_space_and_fits_the_advice_to_the_state(tmp_path, tiny_root, finished):
    """A write that meets a full disk (the temporary file is a link to /dev/full, which fails every write with
    ENOSPC as a full filesystem does): the message says "No space left on device", names the file and the
    bytes it needed, and advises --resume only when a checkpoint exists; torch's internal text never shows."""
    fresh = tmp_path / 'fresh'
    fresh.mkdir()
    os.symlink('/dev/full', fresh / 'best.pt.tmp')
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', tiny_root, '--epochs', 1, '--run_dir', fresh)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert f'cannot write {fresh / "best.pt"}: No space left on device (errno {errno.ENOSPC}' in p.stderr, p.stderr
    assert 'bytes to write' in p.stderr and 'enforce fail' not in p.stderr
    assert 'no checkpoint was written yet' in p.stderr and '--resume' not in p.stderr, p.stderr
    assert sorted(os.listdir(fresh)) == ['config.json', 'lock', 'log.txt']  # the link to /dev/full removed too

    run_dir = a_run(tmp_path, finished)
    before = files_of(run_dir)
    import resource                           # a file that fills up part way (torch's writer hid this errno)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))         # SIGXFSZ: ignored by Python
    try:
        p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert p.returncode == 2 and f'File too large (errno {errno.EFBIG}' in p.stderr, p.stderr
    assert 'enforce fail' not in p.stderr and 'bytes to write' in p.stderr, p.stderr
    assert all(files_of(run_dir)[f] == before[f] for f in ('best.pt', 'checkpoint.pt', 'metrics.csv'))
    for f in ('best.pt', 'checkpoint.pt'):
        os.symlink('/dev/full', os.path.join(run_dir, f + '.tmp'))
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 2)
    assert p.returncode == 2 and 'No space left on device' in p.stderr and 'enforce fail' not in p.stderr, p.stderr
    assert f'model_vgg_single.py --resume {run_dir}' in p.stderr and 'free space' in p.stderr.lower(), p.stderr
    links = [f for f in ('best.pt.tmp', 'checkpoint.pt.tmp') if os.path.lexists(os.path.join(run_dir, f))]
    assert len(links) == 1                    # the one the failed write met was removed; the other is ours
    os.remove(os.path.join(run_dir, links[0]))
    after = files_of(run_dir)
    assert all(after[f] == before[f] for f in ('best.pt', 'checkpoint.pt'))


@pytest.mark.parametrize('keep', [0, 2, 'half', 'all but the last byte'])
def test_a_truncated_checkpoint_is_called_damaged_and_never_advises_weights_only_false(tmp_path, finished, keep):
    """checkpoint.pt cut short (a copy interrupted, a disk error): the message says it is damaged and what to
    do, never repeats torch's advice to load it with weights_only=False; nothing is written."""
    run_dir = a_run(tmp_path, finished)
    path = os.path.join(run_dir, 'checkpoint.pt')
    data = open(path, 'rb').read()
    n = {'half': len(data) // 2, 'all but the last byte': len(data) - 1}.get(keep, keep)
    with open(path, 'wb') as f:
        f.write(data[:n])
    before = files_of(run_dir)
    p = run_in_process('model_vgg_single.py', '--resume', run_dir, '--epochs', 2)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert f'{path} is damaged' in p.stderr and 'weights_only' not in p.stderr, p.stderr
    assert 'could run code' not in p.stderr and 'start a new run' in p.stderr and 'Nothing was written' in p.stderr
    assert 'best.pt' in p.stderr                             # still whole: what it holds, and what it lacks
    assert files_of(run_dir) == before


@pytest.mark.parametrize('fault', ['corrupt', 'missing', 'bad md5 list'])
def test_a_damaged_stand_in_says_it_is_the_stand_in_and_how_to_rewrite_it(tmp_path, tiny_root, fault):
    """A file of the synthetic stand-in that fails the md5 list written beside it, a missing one, or an
    unreadable list: the message says it is the stand-in and that deleting its folder rewrites it, not the
    real dataset's advice (download or unpack the official archive); no run folder."""
    import shutil
    folder = tmp_path / 'data' / 'synthetic' / 'cifar-100-python'
    shutil.copytree(os.path.join(tiny_root, 'synthetic', 'cifar-100-python'), folder)
    if fault == 'corrupt':
        with open(folder / 'test', 'r+b') as f:
            f.seek(100)
            f.write(b'\x00\x01\x02')
    elif fault == 'missing':
        os.remove(folder / 'test')
    else:
        (folder / 'md5.json').write_text('{"train": ')
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', tmp_path / 'data', '--epochs', 1,
                       '--logdir', tmp_path / 'logs')
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert 'synthetic stand-in' in p.stderr and f'rm -r {folder}' in p.stderr, p.stderr
    assert 'official' not in p.stderr and 'download' not in p.stderr.lower(), p.stderr
    assert not os.path.exists(tmp_path / 'logs')


def test_a_cifar_pickle_that_would_run_code_is_refused_even_with_a_matching_md5_list(tmp_path, tiny_root):
    """A stand-in file replaced by a pickle that calls os.system, its md5.json rewritten to match: read with
    a restricted unpickler (dicts, lists, strings, bytes, numbers, numpy arrays only), it is refused (exit 2)
    and the command never runs."""
    import shutil
    folder = tmp_path / 'data' / 'synthetic' / 'cifar-100-python'
    shutil.copytree(os.path.join(tiny_root, 'synthetic', 'cifar-100-python'), folder)
    Payload.marker = str(tmp_path / 'ran')
    d = create_dataset._unpickle(str(folder / 'test'))
    d['batch_label'] = Payload()
    with open(folder / 'test', 'wb') as f:
        pickle.dump(d, f, protocol=2)
    (folder / 'md5.json').write_text(json.dumps({f: create_dataset.md5sum(str(folder / f))
                                                 for f in ('meta', 'test', 'train')}))
    p = run_in_process('model_vgg_single.py', *TINY, '--data_root', tmp_path / 'data', '--epochs', 1,
                       '--logdir', tmp_path / 'logs')
    assert not os.path.exists(tmp_path / 'ran')
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert str(folder / 'test') in p.stderr and 'could run code' in p.stderr and 'system' in p.stderr, p.stderr


def test_the_restricted_reader_reads_the_official_pickle_layout():
    """What the official CIFAR files hold (Python 2 pickles of numpy arrays, numpy.core.multiarray) and what
    the stand-in writer writes (Python 3, numpy._core, bytes via _codecs) both read back."""
    import io
    import numpy as np
    data = {'data': np.arange(12, dtype=np.uint8).reshape(2, 6), 'labels': [3, 4], 'batch_label': 'b',
            'raw': b'\x00\xff', 'x': 1.5}
    py3 = pickle.dumps(data, protocol=2)
    py2 = py3.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert b'numpy.core.multiarray' in py2 and b'_codecs' in py3
    for blob in (py3, py2):
        got = files.safe_unpickle(io.BytesIO(blob), 'the file')
        assert got['labels'] == [3, 4] and got['raw'] == b'\x00\xff' and got['x'] == 1.5
        assert got['data'].dtype == np.uint8 and got['data'].tolist() == data['data'].tolist()
