"""The experiment runner: every setting of a paper's table or figure, run through the scripts themselves
(the command lines a user would type), one run folder per setting and seed, then the paper's table (and
figure) made from those folders.

    .venv/bin/python reproduce.py list                       # the experiments, their runs, projected times
    .venv/bin/python reproduce.py list maxl-fig3             # its settings and their command lines
    .venv/bin/python reproduce.py maxl-fig3 --seeds 0,1,2    # run the grid here, one run at a time
    .venv/bin/python reproduce.py maxl-fig3 --quick --jobs 2 # the grid on the synthetic stand-in (CPU, minutes)
    .venv/bin/python reproduce.py sla-cifar --gpus 0,1,2,3   # one run per GPU at a time
    .venv/bin/python reproduce.py metasemi-imagenet --data_root /data/imagenet --executor slurm --partition gpu
    .venv/bin/python reproduce.py maxl-fig3 --report         # the table (and figure) of what has finished
    .venv/bin/python reproduce.py fashion-mnist --report --export docs/fashion-mnist/runs   # ... with its files copied

Runs go to runs/<experiment>/<setting>/seed<k>/ (runs/<experiment>-quick/ with --quick; --runs DIR names the
folder). Running the same command again skips the finished runs and continues the interrupted ones with
the scripts' --resume. At the end, <runs>/results.md holds the paper's table (mean ± std over the finished
seeds, the paper's number beside it where it is known) and, for MAXL's Figure 3, <runs>/figure3.png; both
are read from the run folders with results.py's functions.

Used by people reproducing the papers (docs/reproduce.md) and by tests/test_reproduce.py. The experiments
are the one table EXPERIMENTS in machinery/experiments.py, each setting the script's own command line; the
table and figure are made by results.py (experiment_report), the projected hours of `list` by
benchmarks/project.py from a benchmarks/bench.py result.
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import fnmatch
import glob
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from machinery.experiments import (EXPERIMENTS, FINISHED, QUICK_DATA_ROOT, QUICK_SIZES, ROOT, dataset_of, flag_value,
                                   gpus_of, run_state, setting_flags)
from machinery.files import LOCK, hold_folder
from machinery.options import UserError, spellings     # (utils, results, the scripts and torch are imported where they are used:
                                  # a submitit job imports this file to run `Job` and needs none of them)

OUTPUT = 'output.txt'            # in each run folder: the run's stdout and stderr, every attempt appended
SUBMITTED = 'submitted.json'     # in each run folder: the submitit job that runs it (--executor)
MARKER = 'experiment.json'       # in the runs folder: the experiment (and --quick or not) that wrote it

# ----------------------------------------------------------------------------------------------------
# The runs of an experiment: their folders, states and command lines
# ----------------------------------------------------------------------------------------------------

def plan(args):
    """One dict per (setting, seed): setting, seed, dir (its run folder), state, flags ([script, its
    flags...] of a new run), processes (one per GPU under torchrun)."""
    runs = []
    for setting in args.settings:
        flags = setting_flags(args.experiment, setting, args.quick)
        if args.gpus_per_run is not None:
            processes = max(1, args.gpus_per_run)             # 0: a CPU job on Slurm, one process
        else:
            processes = 1 if args.quick else gpus_of(args.experiment, setting)
        for seed in args.seed_list:
            run_dir = os.path.join(args.runs, setting, f'seed{seed}')
            runs.append(dict(setting=setting, seed=seed, dir=run_dir, state=run_state(run_dir),
                             processes=processes,
                             flags=flags + (['--data_root', args.data_root] if args.data_root else [])
                             + ['--seed', str(seed), '--run_dir', run_dir]))
    return runs


def command(run, device=None):
    """A run's command line: the script with its flags, or `--resume <run folder>` when it has a
    checkpoint; through torchrun (python -m torch.distributed.run) when it has several processes."""
    script = os.path.relpath(os.path.join(ROOT, run['flags'][0]))
    flags = ['--resume', run['dir']] if run['state'] == 'resume' else run['flags'][1:]
    launcher = [sys.executable]
    if run['processes'] > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(run['processes'])]
    return launcher + [script, *flags] + (['--device', device] if device else [])


def shown(cmd, env=None):
    """A command as a user would type it (the virtual environment's python by its path)."""
    from machinery.options import python_command
    words = [python_command() if w == sys.executable else w for w in cmd]
    return ' '.join([f'{k}={v}' for k, v in (env or {}).items()] + [shlex.join(words)])


# The scripts this process runs now (no --executor): the interrupt handler passes Ctrl-C on to them.
LIVE = set()
LIVE_LOCK = threading.Lock()


def end_with(parent):
    """Linux: a function for Popen's preexec_fn that has the kernel send the child SIGTERM when the thread that
    started it (this process's, which waits on it) ends: a runner killed, even by SIGKILL, leaves no script
    training on in its run folder. None elsewhere (the child then outlives a killed runner; the run folder's
    lock still refuses a second writer)."""
    if not sys.platform.startswith('linux'):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl        # looked up here: the child only calls it
    PR_SET_PDEATHSIG = 1

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:                        # the runner died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def execute(cmd, env, cwd, run_dir):
    """Run one command to its end, its output appended to <run_dir>/output.txt; on exit code 0 write
    <run_dir>/finished.json. Returns (exit code, seconds). Every executor runs this (a submitit job through Job)."""
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(run_dir, OUTPUT), 'a') as out:
        out.write(f'# {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {shlex.join(cmd)}\n')
        out.flush()
        # a session of its own: a Ctrl-C in the terminal reaches this process only, which passes one on; on
        # Linux the script gets SIGTERM (checkpoint, stop) when this process dies, also by SIGKILL
        proc = subprocess.Popen(cmd, cwd=cwd, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=end_with(os.getpid()))
        with LIVE_LOCK:
            LIVE.add(proc)
        try:
            while True:
                try:        # with a timeout: a signal handler (Job.checkpoint) may poll the process meanwhile
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                except KeyboardInterrupt:         # a submitit job asked to stop: the script checkpoints, stops
                    proc.send_signal(signal.SIGINT)
        finally:
            with LIVE_LOCK:
                LIVE.discard(proc)
    seconds = time.time() - start
    if code == 0:
        mark_finished(run_dir, cmd, seconds)
    return code, seconds


def mark_finished(run_dir, cmd, seconds):
    with open(os.path.join(run_dir, FINISHED), 'w') as f:
        json.dump(dict(command=cmd, seconds=round(seconds, 1), at=f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S}'),
                  f, indent=1)


class Job:
    """What a submitit job runs: a run to its end (execute), with the command its folder's state asks for then
    (new: its flags; a checkpoint: --resume; finished: nothing). Checkpointable: on the signal Slurm sends
    `--signal-delay` seconds before the time limit (or on a preemption) submitit calls checkpoint(), which
    stops the script at its next checkpoint (at once when the limit is a minute away, keeping the last one) and
    hands submitit this same Job to requeue; the requeued job continues the run exactly (--resume)."""

    def __init__(self, new, resume, env, cwd, run_dir, signal_delay):
        self.new, self.resume, self.env, self.cwd, self.run_dir = new, resume, env, cwd, run_dir
        self.signal_delay = signal_delay          # seconds from the signal to the time limit

    def __call__(self):
        state = run_state(self.run_dir)
        if state == 'finished':                # it ended while the time limit came
            return 0, 0.0
        return execute(self.resume if state == 'resume' else self.new, self.env, self.cwd, self.run_dir)

    def checkpoint(self, *args, **kwargs):
        import submitit
        with LIVE_LOCK:
            live = list(LIVE)
        with open(os.path.join(self.run_dir, OUTPUT), 'a') as out:
            out.write(f'# {datetime.datetime.now():%Y-%m-%d %H:%M:%S} the job\'s time limit is near: the run stops '
                      'at its next checkpoint and the job requeues itself to continue it\n')
        for proc in live:
            proc.send_signal(signal.SIGINT)    # stop at the next checkpoint
        grace = self.signal_delay - min(60.0, self.signal_delay / 2)
        for limit, again in ((grace, True), (min(30.0, (self.signal_delay - grace) / 2), False)):
            end = time.time() + limit
            while any(p.poll() is None for p in live) and time.time() < end:
                time.sleep(0.2)
            for proc in [p for p in live if p.poll() is None and again]:
                proc.send_signal(signal.SIGINT)    # a second Ctrl-C: at once, the last checkpoint kept
        if live and all(p.poll() == 0 for p in live):
            mark_finished(self.run_dir, self.new, 0.0)     # it ended meanwhile: the requeued job returns at once
        return submitit.helpers.DelayedSubmission(self)


# ----------------------------------------------------------------------------------------------------
# Where the runs go: subprocesses of this process (--jobs N, --gpus LIST) or submitit jobs (--executor)
# ----------------------------------------------------------------------------------------------------

STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)      # a script stopped by Ctrl-C or SIGTERM exits so


class Reporter:
    """Prints each run's start (its command line) and end; keeps the failures and the runs stopped on request."""

    def __init__(self, total):
        self.total, self.started, self.failed, self.stopped, self.lock = total, 0, [], [], threading.Lock()

    def start(self, run, text):
        with self.lock:
            self.started += 1
            print(f'[start {self.started}/{self.total}] {text}', flush=True)

    def end(self, run, code, seconds, log=None, asked=False):
        """`asked`: a stop was asked (Ctrl-C): a script that stopped so is reported as stopped, not failed."""
        name = f'{run["setting"]} seed {run["seed"]}'
        with self.lock:
            if code == 0:
                print(f'[done] {name} in {seconds / 60:.1f} min', flush=True)
                return
            if asked and code in STOPPED:
                self.stopped.append(run)
                print(f'[stopped] {name}: stopped as asked after {seconds / 60:.1f} min, its checkpoint written; the '
                      'same command continues it', flush=True)
                return
            log = log or os.path.join(run['dir'], OUTPUT)
            self.failed.append((run, log))
            why = 'the job failed before its script ended' if code is None else f'exit code {code}'
            print(f'[FAILED] {name}: {why}; log: {log}' + ''.join(f'\n    {ln}' for ln in last_lines(log)), flush=True)


def last_lines(path, n=2):
    try:
        with open(path, errors='replace') as f:
            lines = [ln.rstrip()[:300] for ln in f if ln.strip() and not ln.startswith('# ')]
    except OSError:
        return []
    return lines[-n:]


def threads_per_run(at_once):
    """CPU threads for each of `at_once` runs: the CPUs split between them (at most OMP_NUM_THREADS if
    that is set here)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    threads = max(1, cpus // at_once)
    if os.environ.get('OMP_NUM_THREADS', '').isdigit():
        threads = min(threads, max(1, int(os.environ['OMP_NUM_THREADS'])))
    return threads


def run_here(runs, args, reporter):
    """The runs as subprocesses of this process: --jobs at a time, or one per group of --gpus. Returns
    False when stopped by Ctrl-C (or SIGTERM)."""
    free = list(args.gpu_ids)
    at_once = len(free) // max(r['processes'] for r in runs) if free else args.jobs
    at_once = max(1, min(at_once, len(runs)))
    threads = threads_per_run(at_once)
    lock, stop = threading.Condition(), threading.Event()
    print(f'{at_once} run(s) at a time, {threads} CPU thread(s) each'
          + (f', on GPUs {",".join(args.gpu_ids)}' if free else ''), flush=True)

    def one(run):
        need = run['processes'] if args.gpu_ids else 0           # GPUs: one per process
        with lock:
            lock.wait_for(lambda: stop.is_set() or len(free) >= need)
            if stop.is_set():
                return
            taken, free[:] = free[:need], free[need:]
        env = {'OMP_NUM_THREADS': str(threads)} | ({'CUDA_VISIBLE_DEVICES': ','.join(taken)} if taken else {})
        cmd = command(run, 'cuda' if taken else None)
        reporter.start(run, shown(cmd, env))
        try:
            code, seconds = execute(cmd, env, os.getcwd(), run['dir'])
        finally:
            with lock:
                free.extend(taken)
                lock.notify_all()
        reporter.end(run, code, seconds, asked=stop.is_set())

    with concurrent.futures.ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(one, run) for run in runs]
        asked = 0
        while not all(f.done() for f in futures):
            try:
                concurrent.futures.wait(futures, timeout=1.0)
            except KeyboardInterrupt:
                asked += 1
                stop.set()
                with lock:
                    lock.notify_all()
                with LIVE_LOCK:
                    live = list(LIVE)
                print(f'\nstopping: {len(live)} running run(s) asked to stop ' +
                      ('at once (their last checkpoint kept)' if asked > 1 else
                       'at their next checkpoint (Ctrl-C again: at once)') +
                      '; the same command continues them.', flush=True)
                for proc in live:
                    proc.send_signal(signal.SIGINT)
        for f in futures:
            f.result()                                 # a bug in `one` surfaces here
    return not stop.is_set()


LIVE_SLURM = ('PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'SUSPENDED', 'RESIZING')


def run_submitit(runs, args, reporter):
    saved = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = os.pathsep.join([ROOT] + ([saved] if saved else []))   # the jobs import reproduce
    try:
        return submit_and_wait(runs, args, reporter)
    finally:
        if saved is None:
            del os.environ['PYTHONPATH']
        else:
            os.environ['PYTHONPATH'] = saved


def submit_and_wait(runs, args, reporter):
    """The runs as submitit jobs: on Slurm (one job array per kind of job: the runs of one experiment that
    ask for the same resources; torchrun inside a job for several GPUs) or with submitit's local executor
    (--jobs at a time). Every job is a Job, which requeues itself before its time limit and continues its run.
    A run whose Slurm job is still queued or running (from an earlier call) is waited for, not submitted
    again. Returns False when stopped by Ctrl-C."""
    import submitit

    folder = os.path.join(args.runs, 'submitit')
    executor = (submitit.AutoExecutor(folder=folder, cluster='slurm', slurm_max_num_timeout=args.max_requeues)
                if args.executor == 'slurm' else submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues))
    window = len(runs) if args.executor == 'slurm' else args.jobs
    threads = threads_per_run(window) if args.executor == 'local' else None
    active, waiting = {}, list(runs)
    for run in list(waiting):                          # Slurm: reattach to the jobs of an earlier call
        job = args.executor == 'slurm' and submitted_job(run, submitit)
        if job and job.state.split(' ')[0] in LIVE_SLURM:
            print(f'[waiting] {run["setting"]} seed {run["seed"]}: Slurm job {job.job_id} ({job.state}) from an '
                  'earlier call', flush=True)
            active[job] = run
            waiting.remove(run)
    try:
        while waiting or active:
            batch, waiting = waiting[:window - len(active)], waiting[window - len(active):]
            for job, run in submit(executor, batch, args, threads, folder, reporter):
                active[job] = run
            for job in [j for j in active if j.done()]:
                run = active.pop(job)
                try:
                    code, seconds = job.result()
                except Exception:                      # the job died (requeued too often, node failure, ...)
                    code, seconds = None, 0.0
                reporter.end(run, code, seconds, log=None if code is not None else str(job.paths.stderr))
            time.sleep(1.0 if args.executor == 'local' else 30.0)
    except KeyboardInterrupt:
        print(f'\nstopping: cancelling {len(active)} job(s); their scripts write a checkpoint and stop; the same '
              'command continues them.', flush=True)
        for job in active:
            job.cancel(check=False)
        return False
    return True


def job_parameters(args, run, name):
    """submitit's parameters of a run's job: its resources, time limit and signal; on Slurm the account,
    QoS, memory, constraint, set-up commands and the sbatch options passed through."""
    gpus = 0 if args.executor == 'local' or args.gpus_per_run == 0 else run['processes']
    params = dict(nodes=1, tasks_per_node=1, timeout_min=max(1, round(args.time * 60)))
    if args.executor == 'local':                  # submitit.LocalExecutor's own names
        params.update(signal_delay_s=args.signal_delay)
    else:
        params.update(name=name, slurm_signal_delay_s=args.signal_delay, slurm_partition=args.partition,
                      gpus_per_node=gpus, cpus_per_task=args.cpus_per_run or 8 * max(1, gpus))
        params.update({f'slurm_{k}': v for k, v in (('account', args.account), ('qos', args.qos),
                                                    ('constraint', args.constraint)) if v})
        if args.mem:
            params['mem_gb'] = args.mem
        if args.setup:
            params['slurm_setup'] = list(args.setup)
        if args.sbatch:
            params['slurm_additional_parameters'] = dict(option.split('=', 1) for option in args.sbatch)
    return params


def submit(executor, runs, args, threads, folder, reporter):
    """Submit `runs`: on Slurm one job array per set of equal job parameters (submitit's batch), locally one
    job each. Writes each run's submitted.json and prints its start. Returns [(job, run)]."""
    import reproduce              # as a module, also when this file runs as __main__: the jobs import Job
    groups = {}
    for run in runs:
        params = job_parameters(args, run, args.experiment)        # on Slurm: the array's name
        env = {'OMP_NUM_THREADS': str(threads or max(1, params['cpus_per_task'] // run['processes']))}
        key = json.dumps(params, sort_keys=True) + json.dumps(env)
        groups.setdefault(key, (params, env, []))[2].append(run)
    out = []
    for params, env, group in groups.values():
        executor.update_parameters(**params)
        device = 'cuda' if params.get('gpus_per_node') else None
        jobs = {}
        with executor.batch() if args.executor == 'slurm' else contextlib.nullcontext():
            for run in group:
                new = command(dict(run, state='new'), device)
                jobs[id(run)] = executor.submit(reproduce.Job(new, command(dict(run, state='resume'), device), env,
                                                              os.getcwd(), run['dir'], args.signal_delay))
        for run in group:
            job, cmd = jobs[id(run)], command(run, device)
            os.makedirs(run['dir'], exist_ok=True)
            with open(os.path.join(run['dir'], SUBMITTED), 'w') as f:
                json.dump(dict(executor=args.executor, job_id=job.job_id, folder=folder, command=cmd), f, indent=1)
            reporter.start(run, shown(cmd, env) + f'   [{args.executor} job {job.job_id}]')
            out.append((job, run))
    return out


def submitted_job(run, submitit):
    """The Slurm job an earlier call submitted for this run, or None."""
    try:
        with open(os.path.join(run['dir'], SUBMITTED)) as f:
            sub = json.load(f)
    except (OSError, ValueError):
        return None
    return submitit.SlurmJob(sub['folder'], sub['job_id']) if sub.get('executor') == 'slurm' else None


# ----------------------------------------------------------------------------------------------------
# `list`: the experiments, their settings and the projected time of their runs
# ----------------------------------------------------------------------------------------------------

def list_experiments(which, bench_paths):
    project = load_project()
    files = bench_results(bench_paths)
    if which:
        exp = EXPERIMENTS[which]
        print(f'{which}: {exp["title"]}\n')
        for setting in exp['settings']:
            flags = setting_flags(which, setting, False)
            gpus = gpus_of(which, setting)
            print(f'  {setting:<24} {shown([sys.executable, *flags])}' + (f'   [{gpus} GPUs]' if gpus > 1 else ''))
        print('\n--quick adds: ' + '; '.join(f'{k}: {" ".join(v)}' for k, v in exp['quick'].items()))
        return
    print('| experiment | runs (settings x default seeds) | projected time of the full runs, one device | what |')
    print('|---|---|---|---|')
    for name, exp in EXPERIMENTS.items():
        n, seeds = len(exp['settings']), len(exp['seeds'])
        print(f'| {name} | {n * seeds} ({n} x {seeds}) | {project.projection(name, seeds, files)} | {exp["title"]} |')
    print('\nProjections: benchmarks/project.py\'s arithmetic on the bench.py result files '
          '(benchmarks/results/*.json, or --bench FILE); run `.venv/bin/python benchmarks/bench.py --device cuda` '
          'on the GPU to make one. `reproduce.py list EXPERIMENT` shows its settings\' command lines.')


def load_project():
    spec = importlib.util.spec_from_file_location('project', os.path.join(ROOT, 'benchmarks', 'project.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_results(paths):
    """[(where it was measured, bench.py result)] of the files given, else of benchmarks/results/*.json."""
    out = []
    for path in paths or sorted(glob.glob(os.path.join(ROOT, 'benchmarks', 'results', '*.json'))):
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f'--bench {path}: cannot read it as a bench.py result ({e}).') from None
        if not result.get('concurrent'):
            out.append((path, result))
    return out


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='experiments: ' + ', '.join(EXPERIMENTS))
    p.add_argument('experiment', help='an experiment, or `list` (then optionally an experiment)')
    p.add_argument('which', nargs='?', default='', help=argparse.SUPPRESS)
    p.add_argument('--seeds', default='', help='comma-separated seeds (default: the experiment\'s, e.g. 0,1,2)')
    p.add_argument('--only', nargs='+', default=[], metavar='SETTING',
                   help='only these settings (names as `list EXPERIMENT` shows them; shell patterns allowed)')
    p.add_argument('--quick', action='store_true',
                   help='the whole grid on the synthetic stand-in with small widths and budgets (CPU, minutes); '
                        'its numbers are not the papers\'')
    p.add_argument('--report', action='store_true', help='only write the table (and figure) of the finished runs')
    p.add_argument('--runs', default='', help='the runs folder (default: runs/<experiment>, runs/<experiment>-quick)')
    p.add_argument('--export', default='', metavar='DIR',
                   help='with --report: copy what the tables need into DIR (experiment.json and each finished run\'s '
                        'config.json, metrics.csv, log.txt and finished.json, an unfinished run\'s config.json; no '
                        'checkpoint) and write the report there')
    p.add_argument(*spellings('data_root'), default='',
                   help=f'the data root given to every script (default: theirs, dataset; with --quick {QUICK_DATA_ROOT})')
    p.add_argument('--jobs', type=int, default=1, help='runs at once on this machine (CPU threads split between them)')
    p.add_argument('--gpus', default='', help='GPU ids, e.g. 0,1,2,3: one run per GPU (group) at a time')
    p.add_argument('--executor', choices=['local', 'slurm'], default=None,
                   help='submit the runs through submitit: slurm (Slurm job arrays, requeued at their time limit) or '
                        'local (this machine)')
    p.add_argument('--partition', default='', help='--executor slurm: the Slurm partition')
    p.add_argument(*spellings('gpus_per_run'), dest='gpus_per_run', type=int, default=None,
                   help='GPUs (processes, under torchrun when more than one) per run (default: the experiment\'s)')
    p.add_argument(*spellings('cpus_per_run'), dest='cpus_per_run', type=int, default=0,
                   help='--executor slurm: CPUs per job (default 8 per GPU)')
    p.add_argument('--time', type=float, default=24.0,
                   help='--executor: the time limit of each job, hours; a run that needs longer requeues itself')
    p.add_argument(*spellings('signal_delay'), dest='signal_delay', type=int, default=300,
                   help='--executor: seconds before the time limit at which the job is signalled: its run stops at its '
                        'next checkpoint (at once a minute before the limit) and the job requeues itself (default 300)')
    p.add_argument(*spellings('max_requeues'), dest='max_requeues', type=int, default=10,
                   help='--executor: how many times a job may requeue itself at its time limit (default 10)')
    p.add_argument('--account', default='', help='--executor slurm: the Slurm account (sbatch --account)')
    p.add_argument('--qos', default='', help='--executor slurm: the quality of service (sbatch --qos)')
    p.add_argument('--mem', type=float, default=0, help='--executor slurm: memory per job, GB (sbatch --mem)')
    p.add_argument('--constraint', default='', help='--executor slurm: node features (sbatch --constraint)')
    p.add_argument('--setup', action='append', default=[], metavar='COMMAND',
                   help='--executor slurm: a shell command each job runs first, e.g. "module load cuda" (repeatable)')
    p.add_argument('--sbatch', action='append', default=[], metavar='KEY=VALUE',
                   help='--executor slurm: any other sbatch option, e.g. --sbatch mail-type=END (repeatable)')
    p.add_argument('--bench', nargs='+', default=[], metavar='FILE',
                   help='list: bench.py result files to project from (default: benchmarks/results/*.json)')
    return p.parse_args(argv)


def check(args):
    """Every input checked before anything is started or written: a UserError (exit code 2) otherwise."""
    if args.experiment not in EXPERIMENTS:
        raise UserError(f'unknown experiment {args.experiment!r}: choose one of {", ".join(EXPERIMENTS)} '
                        '(`reproduce.py list` describes them).')
    exp = EXPERIMENTS[args.experiment]
    try:
        args.seed_list = [int(s) for s in args.seeds.split(',')] if args.seeds else list(exp['seeds'])
    except ValueError:
        raise UserError(f'--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2.') from None
    if min(args.seed_list) < 0 or len(set(args.seed_list)) < len(args.seed_list):
        raise UserError(f'--seeds {args.seeds}: give each seed once, as a number of 0 or more (a seed is the run '
                        'folder seed<k> of each setting), e.g. --seeds 0,1,2. Nothing was started.')
    unknown = [pattern for pattern in args.only if not fnmatch.filter(exp['settings'], pattern)]
    if unknown:
        raise UserError(f'unknown setting(s) of {args.experiment}: {", ".join(unknown)}. Its settings: '
                        f'{", ".join(exp["settings"])} (`reproduce.py list {args.experiment}` shows their commands).')
    args.settings = [s for s in exp['settings'] if not args.only or any(fnmatch.fnmatch(s, p) for p in args.only)]
    bad = [f'--jobs {args.jobs}'] * (args.jobs < 1) + [f'--gpus-per-run {args.gpus_per_run}'] * (
        args.gpus_per_run is not None and args.gpus_per_run < 0) + [f'--time {args.time:g}'] * (
        not 0 < args.time < math.inf)
    if bad:
        raise UserError(f'{", ".join(bad)}: --jobs must be at least 1, --gpus-per-run at least 0 and --time a positive, '
                        'finite number of hours (the time limit of each job). Nothing was started.')
    args.runs = args.runs or os.path.join('runs', args.experiment + ('-quick' if args.quick else ''))
    args.gpu_ids = check_gpus(args) if args.gpus else []
    slurm_only = [f'--{name}' for name in ('account', 'qos', 'mem', 'constraint', 'setup', 'sbatch') if getattr(args, name)]
    if slurm_only and args.executor != 'slurm':
        raise UserError(f'{", ".join(slurm_only)} {"is" if len(slurm_only) == 1 else "are"} for Slurm jobs: give '
                        '--executor slurm --partition P as well, or leave them out.')
    bad = [option for option in args.sbatch if '=' not in option or not option.split('=', 1)[0].strip('-')]
    if bad or args.mem < 0:
        raise UserError(f'--sbatch takes KEY=VALUE, an sbatch option without its dashes (e.g. --sbatch mail-type=END), '
                        f'and --mem a positive number of GB; got {", ".join(bad) or f"--mem {args.mem:g}"}.')
    args.sbatch = [option.lstrip('-') for option in args.sbatch]
    if args.executor:
        check_executor(args)
    check_runs_folder(args)
    if args.export:
        check_export(args)
    if not args.report and not args.quick:
        check_data(args)


def check_gpus(args):
    """--gpus as CUDA_VISIBLE_DEVICES values for the runs (mapped through this process's own
    CUDA_VISIBLE_DEVICES, if set)."""
    if args.executor:
        raise UserError(f'--gpus is for runs started here; with --executor {args.executor} the '
                        + ('Slurm jobs get their GPUs from Slurm (--gpus-per-run K).' if args.executor == 'slurm' else
                           'local executor runs on the CPU: drop --executor to run on --gpus.'))
    try:
        ids = [int(g) for g in args.gpus.split(',')]
    except ValueError:
        raise UserError(f'--gpus {args.gpus!r}: give comma-separated GPU numbers, e.g. --gpus 0,1,2,3.') from None
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise UserError(f'--gpus {args.gpus}: PyTorch sees no CUDA GPU on this machine; leave --gpus out to run on the '
                        'CPU (--jobs N). Nothing was started.')
    missing = [g for g in ids if not 0 <= g < count]
    if missing or len(set(ids)) < len(ids):
        raise UserError(f'--gpus {args.gpus}: this machine has {count} GPU(s), numbered 0 to {count - 1}'
                        + (f'; there is no GPU {", ".join(map(str, missing))}' if missing else '; a GPU is named twice')
                        + '. Nothing was started.')
    visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
    mapping = visible.split(',') if visible else [str(g) for g in range(count)]
    need = max(args.gpus_per_run or 0, max(1 if args.quick else gpus_of(args.experiment, s) for s in args.settings))
    if need > len(ids):
        raise UserError(f'a run of {args.experiment} needs {need} GPUs but --gpus names {len(ids)}: name more, or '
                        'give --gpus-per-run (the batch flags are per process, so fewer GPUs is a smaller global batch).')
    return [mapping[g] for g in ids]


def check_executor(args):
    try:
        importlib.import_module('submitit')
    except ImportError:
        raise UserError(f'--executor {args.executor} needs submitit: pip install submitit (it is in requirements.txt); '
                        'or leave --executor out to run here (--jobs N, --gpus LIST).') from None
    if args.signal_delay < 10 or args.signal_delay >= args.time * 3600 or args.max_requeues < 0:
        raise UserError(f'--signal-delay {args.signal_delay} must be at least 10 seconds and below the time limit '
                        f'(--time {args.time:g} hours), and --max-requeues ({args.max_requeues}) at least 0.')
    if args.executor == 'slurm':
        if shutil.which('sbatch') is None:
            raise UserError('--executor slurm needs Slurm\'s sbatch on the PATH, and this machine has none: run it on '
                            'the cluster\'s login node, or leave --executor out to run here (--jobs N, --gpus LIST).')
        if not args.partition:
            raise UserError('--executor slurm needs --partition P (the Slurm partition to submit to).')


def check_runs_folder(args):
    """The runs folder is this experiment's (same --quick), or new or empty."""
    path = args.runs
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'--runs {path!r} is a file, not a folder.')
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        this = f'{args.experiment}{" --quick" if args.quick else ""}'
        try:
            with open(marker) as f:
                mine = json.load(f)
            if not isinstance(mine, dict) or not isinstance(mine.get('experiment'), str):
                raise ValueError('it names no experiment')
        except (OSError, ValueError) as e:
            raise UserError(f'{marker} cannot be read ({e}): it says which experiment\'s runs {path} holds. If they '
                            f'are the runs of `reproduce.py {this}`, write that file again as {{"experiment": '
                            f'"{args.experiment}", "quick": {json.dumps(args.quick)}}} and run the same command (each '
                            'run folder is checked by its own files); otherwise give another folder with --runs DIR. '
                            'Nothing was started or changed.') from None
        wrote = f'{mine.get("experiment")}{" --quick" if mine.get("quick") else ""}'
        if (mine.get('experiment'), bool(mine.get('quick'))) != (args.experiment, args.quick):
            raise UserError(f'{path} holds the runs of `reproduce.py {wrote}`, not of `reproduce.py {args.experiment}'
                            f'{" --quick" if args.quick else ""}`: nothing was started or changed. Give another '
                            f'folder with --runs DIR (by default each experiment has its own: runs/<experiment>, '
                            'runs/<experiment>-quick).')
        for setting in args.settings:            # the runs there were made with the flags this code gives
            then, now = mine.get('settings', {}).get(setting), setting_flags(args.experiment, setting, args.quick)
            if then is not None and then != now and not args.report:
                raise UserError(f'the runs of {setting} in {path} were made with other flags ({shlex.join(then)}) '
                                f'than this code gives it ({shlex.join(now)}): nothing was started or changed. '
                                'Give another folder with --runs DIR, or move those runs away.')
    elif os.path.isdir(path) and set(os.listdir(path)) - {LOCK}:
        raise UserError(f'{path} already holds files that reproduce.py did not write (no {MARKER}): nothing was '
                        'started or changed. Give an empty or new folder with --runs DIR.')
    elif args.report:
        raise UserError(f'nothing to report: {path} holds no runs of {args.experiment} yet (start them with '
                        f'`reproduce.py {args.experiment}{" --quick" if args.quick else ""}`, or give --runs DIR).')


def check_export(args):
    """--export DIR: with --report, into a new or empty folder or an earlier export of the same experiment."""
    if not args.report:
        raise UserError(f'--export {args.export} copies the finished runs\' files for a report: give --report as '
                        'well (nothing is run with --export).')
    if os.path.abspath(args.export) == os.path.abspath(args.runs):
        raise UserError(f'--export {args.export} is the runs folder itself: give another folder.')
    if os.path.exists(args.export) and not os.path.isdir(args.export):
        raise UserError(f'--export {args.export!r} is a file, not a folder.')
    if os.path.isdir(args.export) and os.listdir(args.export):
        try:
            with open(os.path.join(args.export, MARKER)) as f:
                mine = json.load(f)
            same = (mine.get('experiment'), bool(mine.get('quick'))) == (args.experiment, args.quick)
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            raise UserError(f'--export {args.export} already holds files that are not an export of '
                            f'`reproduce.py {args.experiment}{" --quick" if args.quick else ""}`: nothing was copied. '
                            'Give a new or empty folder.')


EXPORTED = ('config.json', 'metrics.csv', 'log.txt', FINISHED)      # what a report reads of a finished run


def export_runs(args):
    """Copy experiment.json and the files of each finished run that the report reads into --export; of a run
    started but not finished, only its config.json, so that the report counts it as not finished."""
    copied, started = 0, 0
    os.makedirs(args.export, exist_ok=True)
    shutil.copy2(os.path.join(args.runs, MARKER), os.path.join(args.export, MARKER))
    for setting in args.settings:
        for seed in args.seed_list:
            source = os.path.join(args.runs, setting, f'seed{seed}')
            finished = run_state(source) == 'finished'
            if not os.path.isfile(os.path.join(source, 'config.json')):
                continue
            target = os.path.join(args.export, setting, f'seed{seed}')
            os.makedirs(target, exist_ok=True)
            for name in EXPORTED:
                if os.path.isfile(os.path.join(source, name)) and (finished or name == 'config.json'):
                    shutil.copy2(os.path.join(source, name), os.path.join(target, name))
                elif os.path.isfile(os.path.join(target, name)):      # an earlier export's, now out of date
                    os.remove(os.path.join(target, name))
            copied, started = copied + finished, started + (not finished)
    print(f'copied the files of {copied} finished run(s) from {args.runs} into {args.export}'
          + (f', and the config.json of {started} started but not finished' if started else ''))
    args.runs = args.export


def check_data(args):
    """The real CIFAR/SVHN files are there (ImageNet's the scripts check themselves)."""
    import create_dataset
    root = args.data_root or create_dataset.DATA_ROOT
    for name in sorted({dataset_of(EXPERIMENTS[args.experiment]['settings'][s]) for s in args.settings}):
        if name in create_dataset.DATASETS:
            try:
                create_dataset.check_data_present(name, root, False, False)
            except UserError as e:
                raise UserError(f'{e} Nothing was started. (`reproduce.py {args.experiment} --quick` runs on the '
                                'synthetic stand-in instead.)') from None


def write_marker(args):
    """<runs>/experiment.json: the experiment, --quick or not, and the flags of each setting run there."""
    path = os.path.join(args.runs, MARKER)
    marker = dict(experiment=args.experiment, quick=args.quick, created=f'{datetime.datetime.now():%Y-%m-%d %H:%M}',
                  settings={})
    if os.path.isfile(path):
        with open(path) as f:
            marker |= json.load(f)
    marker['settings'] |= {s: setting_flags(args.experiment, s, args.quick) for s in args.settings}
    os.makedirs(args.runs, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(marker, f, indent=1)
    os.replace(path + '.tmp', path)


def prepare_stand_ins(args, runs):
    """--quick: write the stand-ins the runs need before any starts (runs started together would each
    write it). In --quick's own data root (dataset/quick) the small ones have QUICK_SIZES; in a --data_root
    given, the scripts' own sizes, as their --synthetic would write them there."""
    import create_dataset
    from machinery import large_datasets
    for name, size in sorted({(dataset_of(r['flags']), flag_value(r['flags'], '--synthetic_size', 'small'))
                              for r in runs if r['state'] == 'new'}):
        folder = create_dataset.dataset_root(args.data_root, 'full' if size == 'full' else True)
        if large_datasets.is_large(name):
            large_datasets.ensure_synthetic_folder(name, folder)
        elif size == 'full' or args.data_root != QUICK_DATA_ROOT:
            create_dataset.ensure_synthetic(folder, [name], full=size == 'full')
        elif not os.path.isfile(os.path.join(folder, create_dataset.record(name).folder, 'md5.json')):
            print(f'writing the synthetic {name} stand-in ({QUICK_SIZES[name][0]:,} + {QUICK_SIZES[name][1]:,} '
                  f'images) into {folder}/', flush=True)
            create_dataset.write_synthetic(name, folder, sizes=QUICK_SIZES[name])


def main(argv=None):
    from results import experiment_report          # (torch and the scripts: here, not in a submitit job)
    args = parse(argv)
    if args.experiment == 'list':
        if args.which and args.which not in EXPERIMENTS:
            raise UserError(f'unknown experiment {args.which!r}: choose one of {", ".join(EXPERIMENTS)}.')
        return list_experiments(args.which, args.bench)
    if args.which:
        raise UserError(f'unexpected argument {args.which!r} (settings are chosen with --only SETTING ...).')
    check(args)
    if args.report:
        if args.export:
            export_runs(args)
        print(experiment_report(args.experiment, args.runs, args.quick))
        print(f'\nwrote {os.path.join(args.runs, "results.md")}')
        return
    os.makedirs(args.runs, exist_ok=True)            # one runner per runs folder, before its runs' states are read
    taken = hold_folder(args.runs, 'this runs folder', 'run the same command again (it skips the finished runs '
                        'and continues the others), or give another folder with --runs DIR')
    if taken:
        print(taken, flush=True)
    if args.quick and not args.data_root:
        args.data_root = QUICK_DATA_ROOT
    runs = plan(args)
    todo = [r for r in runs if r['state'] != 'finished']
    counts = {s: sum(r['state'] == s for r in runs) for s in ('finished', 'resume', 'new')}
    print(f'{args.experiment}: {len(runs)} run(s) ({len(args.settings)} setting(s) x seeds '
          f'{",".join(map(str, args.seed_list))}) in {args.runs}/: {counts["finished"]} finished (skipped), '
          f'{counts["resume"]} to resume, {counts["new"]} to start; each run\'s output in <run folder>/{OUTPUT}')
    if args.quick:
        print('--quick: the synthetic stand-in, small networks, short budgets: a check of the pipeline; its numbers '
              'are not the papers\'.')
    write_marker(args)
    reporter = Reporter(len(todo))
    completed = True
    if todo:
        if args.quick:
            prepare_stand_ins(args, todo)
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)    # SIGTERM stops as Ctrl-C does
        try:
            completed = (run_submitit if args.executor else run_here)(todo, args, reporter)
        finally:
            signal.signal(signal.SIGTERM, previous)
    table = experiment_report(args.experiment, args.runs, args.quick)
    print('\n' + table + f'\n\nwrote {os.path.join(args.runs, "results.md")}'
          + (f' and {os.path.join(args.runs, EXPERIMENTS[args.experiment]["figure"])}'
             if EXPERIMENTS[args.experiment].get('figure') and os.path.isfile(
                 os.path.join(args.runs, EXPERIMENTS[args.experiment]['figure'])) else ''))
    if reporter.failed:
        print(f'\n{len(reporter.failed)} of {len(todo)} run(s) failed:')
        for run, log in reporter.failed:
            print(f'  {run["setting"]} seed {run["seed"]}: {log}')
        print('The same command runs them again (the others are skipped).')
    if reporter.stopped:
        print(f'\n{len(reporter.stopped)} run(s) stopped as asked, each at a checkpoint: the same command continues them.')
    if not completed:
        sys.exit(130)
    if reporter.failed:
        sys.exit(1)


if __name__ == '__main__':
    from utils import run_main
    run_main(main, sys.argv[1:])
