"""Pinned runs: a short fixed-seed run of each of the five scripts (each MAXL meta order, each SLA mode,
each MetaSemi mode) on the synthetic stand-in, on CPU in float32 with one thread, must reproduce the
numbers recorded in tests/pinned_runs.json: every metrics.csv value and every printed metric line
exactly, and the final weights bit for bit. The numbers were recorded before the training-skeleton
refactor; any later change to what the scripts compute fails here.

Float32 results depend on the processor's kernels (AVX-512 against AVX2, one vendor's against another's),
so the file holds one recording per machine it was made on: a run passes when it equals, in every
pinned value, the recording of some machine (a change of what a script computes matches none). The first
recording comes from the machine of the skeleton refactor; others were added on other processors at a
commit whose recording on the first machine still passed, so they pin the same code.

Add this machine's recording (only at a commit that computes what the recorded ones computed, said in
the commit), or re-record all (only after a deliberate change of what a script computes):
    .venv/bin/python tests/test_pinned_runs.py --add
    .venv/bin/python tests/test_pinned_runs.py --record
"""
import csv
import glob
import hashlib
import json
import os
import re
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import create_dataset  # noqa: E402

PINNED = os.path.join(HERE, 'pinned_runs.json')
SIZES = {'cifar100': (600, 200), 'cifar10': (400, 200)}

MAXL = ['--synthetic', '--width', '0.0625', '--epochs', '2', '--batch_size', '100']
SLA = ['--synthetic', '--dataset', 'cifar10', '--model', 'cresnet20', '--width', '0.125', '--batchsize', '16',
       '--num-iterations', '6', '--val-freq', '3']
SEMI = ['--synthetic', '--dataset', 'cifar10', '--num-label', '100', '--total-steps', '6', '--warmup', '2',
        '--test-freq', '3', '--print-freq', '2', '--width', '0.0625', '--batch-size', '16', '--milestones', '4,5']

RUNS = {       # name: (module, data flag, arguments)
    'single': ('model_vgg_single', '--data_root', MAXL),
    'human': ('model_vgg_human', '--data_root', MAXL),
    'maxl2_jvp': ('model_vgg_maxl', '--data_root', MAXL + ['--meta_order', '2', '--second_order', 'jvp', '--cos_every', '3']),
    'maxl2_double_backward': ('model_vgg_maxl', '--data_root',
                              MAXL + ['--meta_order', '2', '--second_order', 'double_backward']),
    'maxl1': ('model_vgg_maxl', '--data_root', MAXL + ['--meta_order', '1', '--cos_every', '3']),
    'sla_baseline': ('train_sla', '--datadir', SLA + ['--mode', 'baseline', '--aug', 'none']),
    'sla_da': ('train_sla', '--datadir', SLA + ['--mode', 'da', '--aug', 'rotation']),
    'sla_mt': ('train_sla', '--datadir', SLA + ['--mode', 'mt', '--aug', 'rotation']),
    'sla_sla': ('train_sla', '--datadir', SLA + ['--mode', 'sla', '--aug', 'rot_color_perm6']),
    'sla_sla+sd': ('train_sla', '--datadir', SLA + ['--mode', 'sla+sd', '--aug', 'rotation']),
    'semi_meta': ('train_meta_semi', '--data-path', SEMI),
    'semi_meta_mixup': ('train_meta_semi', '--data-path', SEMI + ['--mix-up']),
    'semi_baseline': ('train_meta_semi', '--data-path', SEMI + ['--baseline']),
    'semi_baseline_mixup': ('train_meta_semi', '--data-path', SEMI + ['--baseline', '--mix-up']),
}

TIMING_COLUMNS = {'seconds', 'seconds_per_iteration', 'data_time', 'batch_time'}
# Printed lines that carry metrics; their timings are masked.
METRIC_LINE = re.compile(r'^(EPOCH: |\[iteration |Step|  ?\* Accuracy|Best Accuracy)')
TIMINGS = [re.compile(p) for p in (r'\| [0-9.]+s$', r'\[[0-9.]+ s/iteration\]', r'\[eval [0-9.]+ s\]',
                                    r'Dtime: [0-9.]+ Btime: [0-9.]+')]


def masked(line):
    for t in TIMINGS:
        line = t.sub('<time>', line)
    return line


def weights_digest(state_dict):
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def network_states(checkpoint):
    """name -> state_dict of each network in a checkpoint (the multi-task / single network as 'net',
    MAXL's label generator as 'gen')."""
    state = checkpoint['state']
    out = {'net': state['net'] if 'net' in state else state['model']}
    if 'gen' in state:
        out['gen'] = state['gen']
    return out


def run_pinned(name, data_root, logdir):
    """Run one pinned configuration in this process with one thread; return what is pinned."""
    import importlib
    module_name, data_flag, args = RUNS[name]
    module = importlib.import_module(module_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(args + [data_flag, data_root, '--device', 'cpu', '--logdir', logdir])
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = glob.glob(os.path.join(logdir, module_name, '*'))
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]
    with open(os.path.join(run_dir, 'log.txt')) as f:
        lines = [masked(ln.rstrip('\n')) for ln in f if METRIC_LINE.match(ln)]
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), map_location='cpu', weights_only=False)
    weights = {k: weights_digest(v) for k, v in network_states(ckpt).items()}
    return {'metrics': rows, 'lines': lines, 'weights': weights}


def write_data(root):
    for name, sizes in SIZES.items():
        create_dataset.write_synthetic(name, os.path.join(root, 'synthetic'), seed=0, sizes=sizes)


@pytest.fixture(scope='module')
def pinned_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('pinned_data'))
    write_data(root)
    return root


# Columns whose file representation changed on purpose in the skeleton refactor: (old name, factor),
# the file value now being old / factor (MetaSemi's accuracies: percent in the old files, fractions now).
RENAMED = {'label_acc': ('label_acc', 100), 'unlabel_acc': ('unlabel_acc', 100), 'test_acc': ('test_acc', 100),
           'best_acc': ('best_test_acc', 100)}


def compare_rows(expected_rows, got_rows, semi):
    assert len(got_rows) == len(expected_rows)
    for old, new in zip(expected_rows, got_rows):
        for col, value in old.items():
            new_col, factor = RENAMED.get(col, (col, None)) if semi else (col, None)
            assert new_col in new, f'column {col} (now {new_col}) missing'
            if factor is None:
                assert new[new_col] == value, (col, value, new[new_col])
            else:
                assert factor * float(new[new_col]) == float(value), (col, value, new[new_col])


def machine():
    """What float32 kernels a run here gets: the processor, torch's CPU capability, the torch version."""
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), model)
    except OSError:
        pass
    return f'{model}; {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__.split("+")[0]}'


def recordings():
    """The recordings [{'machine', 'runs': {name: pinned values}, 'old_columns'}], this machine's first if
    any. old_columns: made before the skeleton refactor (MetaSemi's accuracies in percent, see RENAMED)."""
    with open(PINNED) as f:
        return sorted(json.load(f)['recordings'], key=lambda r: r['machine'] != machine())


def check(expected, got, name, old_columns):
    compare_rows(expected['metrics'], got['metrics'], old_columns and name.startswith('semi'))
    assert got['lines'] == expected['lines']
    assert got['weights'] == expected['weights']


@pytest.mark.parametrize('name', list(RUNS))
def test_pinned_run(name, pinned_data, tmp_path):
    got = run_pinned(name, pinned_data, str(tmp_path))
    failures = []
    for r in recordings():
        try:
            check(r['runs'][name], got, name, r['old_columns'])
            return                                   # equal to what this code computed on that machine
        except AssertionError as e:
            failures.append(f'against the recording made on {r["machine"]}: {e}')
    pytest.fail(f'{name} on {machine()} equals no recording:\n' + '\n'.join(failures))


if __name__ == '__main__':
    import tempfile
    if sys.argv[1:] not in (['--record'], ['--add']):
        sys.exit(__doc__)
    os.chdir(os.path.dirname(HERE))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(os.path.join(tmp, 'data'))
        for name in RUNS:
            out[name] = run_pinned(name, os.path.join(tmp, 'data'), os.path.join(tmp, 'logs', name))
            print(name, out[name]['metrics'][-1])
    kept = [] if sys.argv[1] == '--record' else [r for r in recordings() if r['machine'] != machine()]
    with open(PINNED, 'w') as f:
        json.dump({'recordings': kept + [{'machine': machine(), 'old_columns': False, 'runs': out}]}, f, indent=1)
        f.write('\n')
