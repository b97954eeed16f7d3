"""Pinned runs: a short fixed-seed run of each of the five scripts (each MAXL meta order, each SLA mode,
each MetaSemi mode) on the synthetic stand-in, on CPU with one thread, in float64, must reproduce the
numbers recorded in tests/pinned_runs.json: every metrics.csv value, every printed metric line and two
statistics of every weight tensor (its sum and its sum of squares) at the end.

Why float64 with a tolerance, not float32 bit for bit: float32 results depend on the processor's kernels
(AVX-512 against AVX2, one vendor's against another's, ARM), and a float32 tolerance wide enough for them
(another kernel moves Single's first training loss by 0.26 % after 6 steps) would also pass real changes.
In float64 the kernels differ by about 1e-16 per operation; after these short runs the values of two
processors' kernels differ by far less than TOLERANCE (measured below), while a change of what a script
computes (a loss, a schedule, a data split) moves them by far more. The scripts compute in
torch's default float type, which this test sets to float64 around each run.

Re-record (only after a deliberate change of what a script computes, said in the commit):
    .venv/bin/python tests/test_pinned_runs.py --record
"""
import csv
import glob
import json
import math
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
# Relative tolerances, far above float64 kernel noise and far below any change of the method. Measured on one
# Intel AVX-512 processor, its AVX-512 kernels against AVX2 and against the plain (default) ones: metrics and
# printed values differ by at most 5.9e-11 (MAXL's gradient cosine), weights by 4.5e-9 (the label generator's
# batch-norm biases, 1e-5 from their zero start after two epochs at the generator's small rate).
TOLERANCE = 1e-8                # metrics.csv values
WEIGHT_TOLERANCE = 1e-7         # the weight statistics, relative to each tensor's norm
# Weight statistics below this count as zero: the biases of convolutions followed by batch norm have a true
# gradient of zero, so they hold float64 rounding noise (1e-16 and less), different on every processor.
NOISE_FLOOR = 1e-12

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
    """sha256 of a state dict's bytes (the torchrun tests compare two processes' weights bit for bit)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def weight_statistics(state_dict):
    """name -> {'sum', 'sum_of_squares'} of every floating tensor (in float64), the integer ones as they are."""
    out = {}
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu()
        if v.is_floating_point():
            v = v.double()
            out[k] = {'sum': float(v.sum()), 'sum_of_squares': float((v * v).sum())}
        else:
            out[k] = v.tolist()
    return out


def network_states(checkpoint):
    """name -> state_dict of each network in a checkpoint (the multi-task / single network as 'net',
    MAXL's label generator as 'gen')."""
    state = checkpoint['state']
    out = {'net': state['net'] if 'net' in state else state['model']}
    if 'gen' in state:
        out['gen'] = state['gen']
    return out


def run_pinned(name, data_root, logdir, dtype=torch.float64):
    """Run one pinned configuration in this process with one thread, computing in `dtype`; return what is
    pinned."""
    import importlib
    module_name, data_flag, args = RUNS[name]
    module = importlib.import_module(module_name)
    threads, default = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)
    try:
        module.main(args + [data_flag, data_root, '--device', 'cpu', '--logdir', logdir])
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)
    (run_dir,) = glob.glob(os.path.join(logdir, module_name, '*'))
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]
    with open(os.path.join(run_dir, 'log.txt')) as f:
        lines = [masked(ln.rstrip('\n')) for ln in f if METRIC_LINE.match(ln)]
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), map_location='cpu', weights_only=True)
    nets = network_states(ckpt)
    assert all(v.dtype == dtype for s in nets.values() for v in s.values() if v.is_floating_point()), \
        f'{name}: a network did not compute in {dtype}'
    return {'metrics': rows, 'lines': lines, 'weights': {k: weight_statistics(v) for k, v in nets.items()}}


def write_data(root):
    for name, sizes in SIZES.items():
        create_dataset.write_synthetic(name, os.path.join(root, 'synthetic'), seed=0, sizes=sizes)


@pytest.fixture(scope='module')
def pinned_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('pinned_data'))
    write_data(root)
    return root


NUMBER = re.compile(r'-?\d+(?:\.\d+)?(?:e[-+]?\d+)?')


def close(a, b, scale=0.0, floor=0.0, tolerance=TOLERANCE):
    """Two pinned floats agree: `tolerance` relative to the larger (or to `scale` where values can be near 0),
    or both within `floor` of zero."""
    return abs(a - b) <= tolerance * max(abs(a), abs(b), scale) or max(abs(a), abs(b)) <= floor


def same_value(expected, got):
    """A metrics.csv or printed value: integers and text exactly, floats within TOLERANCE."""
    if expected == got:
        return True
    try:
        a, b = float(expected), float(got)
    except ValueError:
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return '.' in expected + got + 'e' and close(a, b)


def same_line(expected, got):
    """A printed line: its text exactly; each number to its last printed digit (kernel noise can move a
    rounded digit by one where the value lies on a rounding boundary)."""
    if NUMBER.sub('#', expected) != NUMBER.sub('#', got):
        return False
    for a, b in zip(NUMBER.findall(expected), NUMBER.findall(got)):
        if a != b:
            digits = len(a.split('.')[1].split('e')[0]) if '.' in a else 0
            if abs(float(a) - float(b)) > 1.01 * 10 ** -digits * max(1.0, abs(float(a)) if 'e' in a else 1.0):
                return False
    return True


def check(expected, got):
    """Every difference between a recording and a run, as a list of texts (empty: they agree)."""
    diffs = []
    if len(got['metrics']) != len(expected['metrics']):
        diffs.append(f'{len(got["metrics"])} metrics rows, recorded {len(expected["metrics"])}')
    for i, (old, new) in enumerate(zip(expected['metrics'], got['metrics'])):
        for col, value in old.items():
            if col not in new:
                diffs.append(f'row {i}: column {col} missing')
            elif not same_value(value, new[col]):
                diffs.append(f'row {i}: {col} {new[col]}, recorded {value}')
    if len(got['lines']) != len(expected['lines']):
        diffs.append(f'{len(got["lines"])} metric lines printed, recorded {len(expected["lines"])}')
    diffs += [f'printed {new!r}, recorded {old!r}' for old, new in zip(expected['lines'], got['lines'])
              if not same_line(old, new)]
    for net, tensors in expected['weights'].items():
        mine = got['weights'].get(net, {})
        if sorted(mine) != sorted(tensors):
            diffs.append(f'{net}: tensors {sorted(set(mine) ^ set(tensors))} differ')
            continue
        for k, old in tensors.items():
            new = mine[k]
            if isinstance(old, dict):                  # a sum near 0: relative to the tensor's norm
                norm = math.sqrt(old['sum_of_squares'])
                ok = (close(old['sum_of_squares'], new['sum_of_squares'], floor=NOISE_FLOOR ** 2,
                            tolerance=WEIGHT_TOLERANCE)
                      and close(old['sum'], new['sum'], norm, floor=NOISE_FLOOR, tolerance=WEIGHT_TOLERANCE))
            else:
                ok = old == new
            if not ok:
                diffs.append(f'{net}.{k}: {new}, recorded {old}')
    return diffs


def machine():
    """The processor and torch version a recording was made with (for the record: a float64 recording holds
    on any processor)."""
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), model)
    except OSError:
        pass
    return f'{model}; {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__.split("+")[0]}'


def recording():
    with open(PINNED) as f:
        return json.load(f)


@pytest.mark.parametrize('name', list(RUNS))
def test_pinned_run(name, pinned_data, tmp_path):
    got = run_pinned(name, pinned_data, str(tmp_path))
    rec = recording()
    diffs = check(rec['runs'][name], got)
    assert not diffs, (f'{name} on {machine()} differs from the float64 recording made on {rec["machine"]} '
                       f'(tolerance {TOLERANCE:g}, weights {WEIGHT_TOLERANCE:g}):\n' + '\n'.join(diffs[:20]))


if __name__ == '__main__':
    import tempfile
    if sys.argv[1:] != ['--record']:
        sys.exit(__doc__)
    os.chdir(os.path.dirname(HERE))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_data(os.path.join(tmp, 'data'))
        for name in RUNS:
            out[name] = run_pinned(name, os.path.join(tmp, 'data'), os.path.join(tmp, 'logs', name))
            print(name, out[name]['metrics'][-1])
    with open(PINNED, 'w') as f:
        json.dump({'machine': machine(), 'dtype': 'float64', 'runs': out}, f, indent=1)
        f.write('\n')
