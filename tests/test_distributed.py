"""Several processes (torchrun, gloo on CPU): one step of every method on two processes, each with half
of the global batch, equals one process on the whole batch (float64, SyncBatchNorm, to 1e-10); the
processes' parameters stay bit-identical over steps; a 2-process run stopped by SIGTERM mid-run (or
SIGKILLed) stops both processes at one step and resumes to the uninterrupted end; a signal to one process,
or a divergence on one process, stops every process at the same step; a dying process takes the job down
long before the collective timeout; the seed's torch.distributed.launch line works; a bad setup is refused
before anything is written. (Whole scripts under torchrun against one process, and a resume on another
number of processes: test_equivalence.py.)"""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import ddp_cases
from conftest import ROOT, run_in_process
from test_pinned_runs import TIMING_COLUMNS

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def torchrun(*args, launcher=TORCHRUN, timeout=300, env=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
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


SEMI = ['train_meta_semi.py', '--synthetic', '--num-label', 100, '--warmup', 2, '--test-freq', 6, '--print-freq', 2,
        '--width', 0.0625, '--batch-size', 8, '--mix-up']


def rows(run_dir):
    if not os.path.exists(os.path.join(run_dir, 'metrics.csv')):     # killed before its first row
        return []
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_root):
    """The uninterrupted 2-process MetaSemi run (30 steps, a metrics row every 6) that the signalled and the
    killed runs must end as: one torchrun job for both tests."""
    run_dir = tmp_path_factory.mktemp('uninterrupted') / 'a'
    full = torchrun(*SEMI, '--data-path', data_root, '--total-steps', 30, '--save-path', run_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    return full, run_dir


def same_rows(a, b):
    """The metrics rows of a run and of its stopped-and-resumed copy: equal, but for float32 rounding in the
    running means of the interval the stop fell into (its sums since the last row were summed over the
    processes into the checkpoint, then summed on: another order of the same additions)."""
    def near(x, y):
        try:
            return x == y or abs(float(x) - float(y)) <= 1e-6 * abs(float(y))
        except ValueError:
            return False
    return len(a) == len(b) and all(r.keys() == q.keys() and all(near(r[k], q[k]) for k in r) for r, q in zip(a, b))


def same_weights(run_a, run_b):
    ca, cb = (torch.load(os.path.join(r, 'checkpoint.pt'), weights_only=True)['state']['model'] for r in (run_a, run_b))
    return ca.keys() == cb.keys() and all(torch.equal(v, cb[k]) for k, v in ca.items())


def recorded_job(tmp_path, *args, env=None):
    """A 2-process job of tests/ddp_record.py (each process's exit code and steps), in a session of its own."""
    (tmp_path / 'rec').mkdir()
    return subprocess.Popen([*TORCHRUN, os.path.join(ROOT, 'tests', 'ddp_record.py'), str(tmp_path / 'rec'),
                             *map(str, args)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path, job, tmp_path, seconds=120):
    import time
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not os.path.exists(path):
        out, err = finish(job, tmp_path, timeout=1)
        raise AssertionError(f'{path} never appeared: {err[-3000:]}')


def finish(job, tmp_path, timeout=240):
    """The job's (stdout, stderr); one still running after `timeout` seconds (processes that no longer agree
    wait for each other) is killed, launcher and processes, and the test fails."""
    import signal
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [int(f.read_text()) for f in (tmp_path / 'rec').glob('pid*')] + [job.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.communicate()
        raise AssertionError(f'the job did not end within {timeout} s') from None


def records(tmp_path):
    """{rank: {'code', 'steps'}} of the processes that left through run_main."""
    out = {}
    for rank in (0, 1):
        path = tmp_path / 'rec' / f'rank{rank}.json'
        out[rank] = json.loads(path.read_text()) if path.exists() else None
    return out


def test_sigterm_to_a_torchrun_job_mid_run_stops_both_processes_at_one_step_and_resumes_to_the_end(
        tmp_path, data_root, uninterrupted):
    """SIGTERM to the torchrun launcher (a scheduler's stop) once the checkpoint of step 6 is written;
    torchrun passes it to both processes. Every 20 steps the processes compare what they were asked, so both
    stop at step 20, between two tests (6, 12, 18, 24, 30), with one checkpoint of that step holding the
    running sums of both processes since step 18; resumed, the run ends with the uninterrupted run's rows
    (the row of step 24 included: its running means to float32 rounding, see same_rows) and weights."""
    import signal
    full, run_a = uninterrupted
    assert '2 processes (gloo), batch 8 per process = 16 in all' in full.stdout
    job = recorded_job(tmp_path, *SEMI, '--data-path', data_root, '--total-steps', 30, '--save-path', tmp_path / 'b')
    wait_for(tmp_path / 'b' / 'checkpoint.pt', job, tmp_path)
    job.send_signal(signal.SIGTERM)
    out, err = finish(job, tmp_path)
    assert records(tmp_path) == {0: {'code': 143, 'steps': 20}, 1: {'code': 143, 'steps': 20}}, err[-3000:]
    ckpt = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 20 and ckpt['meters']['adds'] == 2 and ckpt['config']['processes'] == 2
    assert ckpt['meters']['counts']['label_loss'] == 2 * 16          # two steps of both processes' 8 + 8
    assert [r['step'] for r in rows(tmp_path / 'b')] == ['6', '12', '18']
    assert not [f for f in os.listdir(tmp_path / 'b') if f.endswith('.tmp')]
    found = re.search(rf'stopped by SIGTERM; the checkpoint is written\. Continue with: (\S+) --standalone '
                      rf'--nproc_per_node 2 train_meta_semi\.py --resume {re.escape(str(tmp_path / "b"))}', err)
    assert found, err[-3000:]               # the torchrun beside this Python (the project's .venv/bin/torchrun)
    launcher = found.group(1)
    assert os.path.samefile(os.path.join(ROOT, launcher), os.path.join(os.path.dirname(sys.executable), 'torchrun')) \
        if launcher != 'torchrun' else sys.prefix == sys.base_prefix
    rest = torchrun('train_meta_semi.py', '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert same_rows(rows(run_a), rows(tmp_path / 'b')), (rows(run_a), rows(tmp_path / 'b'))
    assert same_weights(run_a, tmp_path / 'b')


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, data_root):
    """SIGTERM to the second process alone (the first is never signalled) once the checkpoint of step 6 is
    written: at step 20 the processes agree to stop, and both do, with one checkpoint of step 20."""
    import signal
    job = recorded_job(tmp_path, *SEMI, '--data-path', data_root, '--total-steps', 30, '--dist_timeout', 1,
                       '--save-path', tmp_path / 'b')
    wait_for(tmp_path / 'b' / 'checkpoint.pt', job, tmp_path)
    wait_for(tmp_path / 'rec' / 'pid1', job, tmp_path)
    os.kill(int((tmp_path / 'rec' / 'pid1').read_text()), signal.SIGTERM)
    out, err = finish(job, tmp_path)
    assert records(tmp_path) == {0: {'code': 143, 'steps': 20}, 1: {'code': 143, 'steps': 20}}, err[-3000:]
    assert torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['step'] == 20


def test_a_divergence_on_one_process_stops_every_process_at_the_same_step(tmp_path, data_root):
    """The second process's loss turns NaN at its 8th step (step 7, counted from 0); the first process's
    stays finite. At the test of step 12 the processes take the earliest bad step over both: both stop
    there with exit code 3, before anything is written from those weights."""
    job = recorded_job(tmp_path, *SEMI, '--data-path', data_root, '--total-steps', 18, '--dist_timeout', 1,
                       '--save-path', tmp_path / 'b', env={'RECORD_POISON': '1:8'})
    out, err = finish(job, tmp_path)
    assert records(tmp_path) == {0: {'code': 3, 'steps': 12}, 1: {'code': 3, 'steps': 12}}, err[-3000:]
    assert 'training diverged: the training label_loss became non-finite at step 7' in err
    assert f'torchrun --standalone --nproc_per_node 2 train_meta_semi.py --resume {tmp_path / "b"} --lr' in err
    ckpt = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 6 and [r['step'] for r in rows(tmp_path / 'b')] == ['6']      # the last good one


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
    """The second process dies at its third step, while the first waits for it in a collective: torchrun
    stops the job within seconds, long before --dist_timeout 1 (60 s) would end that wait."""
    import time
    stamp = tmp_path / 'died'
    p = torchrun(os.path.join(ROOT, 'tests', 'ddp_die.py'), *SEMI[1:], '--data-path', data_root, '--total-steps', 50,
                 '--dist_timeout', 1, '--save-path', tmp_path / 'run', timeout=120, env={'DDP_DIE_STAMP': str(stamp)})
    took = time.time() - float(stamp.read_text())
    assert p.returncode != 0 and took < 30, took                        # no hang until the timeout
    assert 'rank      : 1' in p.stderr and 'exitcode  : 3' in p.stderr    # torchrun names the rank that died


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_end(tmp_path, data_root, uninterrupted):
    """SIGKILL to the whole job (launcher and both processes) right after its first checkpoint."""
    import signal
    import time
    args = [*SEMI, '--data-path', data_root, '--total-steps', 30]
    full, run_a = uninterrupted                            # the same arguments, run once for several tests
    job = subprocess.Popen([*TORCHRUN, *map(str, args), '--save-path', str(tmp_path / 'b')], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, deadline = tmp_path / 'b' / 'checkpoint.pt', time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(rows(tmp_path / 'b')) < len(rows(run_a)) == 5   # it was stopped mid-way
    rest = torchrun('train_meta_semi.py', '--resume', tmp_path / 'b')
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert rows(run_a) == rows(tmp_path / 'b')
