"""Several processes (torchrun, gloo on CPU): one step of every method on two processes, each with half
of the global batch, equals one process on the whole batch (float64, SyncBatchNorm, to 1e-10); the
processes' parameters stay bit-identical over steps; a 2-process run stopped and resumed ends as an
uninterrupted one; the seed's torch.distributed.launch line works; a bad setup is refused before anything
is written. (Whole scripts under torchrun against one process: test_equivalence.py.)"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import ddp_cases
from conftest import ROOT, run_in_process
from test_pinned_runs import TIMING_COLUMNS

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def torchrun(*args, launcher=TORCHRUN, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope='module')
def worker_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = {name: ddp_cases.run_case(name) for name in ddp_cases.CASES}     # one process, whole batch
    finally:
        torch.set_num_threads(threads)
    torch.save(reference, tmp / 'reference.pt')
    p = torchrun(os.path.join(ROOT, 'tests', 'ddp_worker.py'), tmp / 'reference.pt', tmp / 'out.json')
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((tmp / 'out.json').read_text())


@pytest.mark.parametrize('name', ddp_cases.CASES)
def test_two_processes_apply_the_global_batch_update(worker_result, name):
    r = worker_result['union'][name]
    assert r['compared'] > 10
    assert r['max_relative_error'] < 1e-10, r


@pytest.mark.parametrize('name', ddp_cases.CASES)
def test_parameters_stay_bit_identical_across_processes(worker_result, name):
    assert worker_result['identical'][name] is True


def test_the_reference_is_not_trivially_equal_to_one_process_on_half_the_batch():
    """The union test can fail: one process on its half of the batch gives another update."""
    whole = ddp_cases.run_case('maxl_meta_jvp')
    half = ddp_cases.run_case('maxl_meta_jvp', share=lambda t: t[:len(t) // 2])
    k = 'gen_grad.0'
    assert ((whole[k] - half[k]).norm() / whole[k].norm()).item() > 1e-3


SEMI = ['train_meta_semi.py', '--synthetic', '--num-label', 100, '--warmup', 2, '--test-freq', 3, '--print-freq', 2,
        '--width', 0.0625, '--batch-size', 8, '--mix-up']


def rows(run_dir):
    if not os.path.exists(os.path.join(run_dir, 'metrics.csv')):     # killed before its first row
        return []
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_root):
    """The uninterrupted 2-process MetaSemi run (9 steps, a metrics row every 3) that both the stopped and
    the killed run must end as: one torchrun job for the two tests."""
    run_dir = tmp_path_factory.mktemp('uninterrupted') / 'a'
    full = torchrun(*SEMI, '--data-path', data_root, '--total-steps', 9, '--save-path', run_dir)
    return full, run_dir


def test_stopped_and_resumed_two_process_run_ends_as_an_uninterrupted_one(tmp_path, data_root, uninterrupted):
    full, run_a = uninterrupted
    assert full.returncode == 0, full.stderr[-3000:]
    assert 'global batch' not in full.stderr and '2 processes (gloo), batch 8 per process = 16 in all' in full.stdout
    part = torchrun(*SEMI, '--data-path', data_root, '--total-steps', 3, '--save-path', tmp_path / 'b')
    assert part.returncode == 0, part.stderr[-3000:]
    rest = torchrun('train_meta_semi.py', '--resume', tmp_path / 'b', '--total-steps', 9)
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = rows(run_a), rows(tmp_path / 'b')
    assert len(a) == 3 and a == b
    ca = torch.load(run_a / 'checkpoint.pt', weights_only=False)
    cb = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=False)
    for k, v in ca['state']['model'].items():
        assert torch.equal(v, cb['state']['model'][k]), k


def test_the_seeds_torch_distributed_launch_line_works(tmp_path, data_root):
    import socket
    with socket.socket() as sock:             # a free port: the old launcher's default 29500 may be taken
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', f'--master_port={port}']
    p = torchrun(*SEMI, '--data-path', data_root, '--total-steps', 3, '--save-path', tmp_path / 'run',
                 launcher=launch)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(rows(tmp_path / 'run')) == 1 and ' * Accuracy' in p.stdout


def test_nccl_on_cpu_is_refused_before_anything_is_written(tmp_path, data_root):
    env = {'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0'}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        p = run_in_process(*SEMI, '--data-path', data_root, '--total-steps', 3, '--dist_backend', 'nccl',
                       '--device', 'cpu', '--save-path', tmp_path / 'run')
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert p.returncode == 2 and 'nccl needs CUDA' in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'run')


def test_a_process_that_dies_takes_the_job_down(tmp_path, data_root):
    import time
    start = time.monotonic()
    p = torchrun(os.path.join(ROOT, 'tests', 'ddp_die.py'), *SEMI[1:], '--data-path', data_root, '--total-steps', 50,
                 '--dist_timeout', 1, '--save-path', tmp_path / 'run', timeout=120)
    assert p.returncode != 0 and time.monotonic() - start < 90          # no hang until a timeout
    assert 'rank      : 1' in p.stderr and 'exitcode  : 3' in p.stderr    # torchrun names the rank that died


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_end(tmp_path, data_root, uninterrupted):
    """SIGKILL to the whole job (launcher and both processes) right after its first checkpoint."""
    import signal
    import time
    args = [*SEMI, '--data-path', data_root, '--total-steps', 9]
    full, run_a = uninterrupted                            # the same arguments, run once for two tests
    assert full.returncode == 0, full.stderr[-3000:]
    job = subprocess.Popen([*TORCHRUN, *map(str, args), '--save-path', str(tmp_path / 'b')], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, deadline = tmp_path / 'b' / 'checkpoint.pt', time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(rows(tmp_path / 'b')) < len(rows(run_a)) == 3   # it was stopped mid-way
    rest = torchrun('train_meta_semi.py', '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert rows(run_a) == rows(tmp_path / 'b')
