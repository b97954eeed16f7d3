import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import signal
import subprocess
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pytest.ini runs the suite in one worker process per core (pytest-xdist, at most 4): one thread each (and in
# the scripts they start), unless OMP_NUM_THREADS says otherwise; threads fighting over cores run 10x slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import create_dataset  # noqa: E402

SMALL = {'cifar100': (2000, 500), 'cifar10': (1000, 300), 'svhn': (1000, 300)}
# For the tests whose assertions do not depend on the amount of data (a resumed run equals the
# uninterrupted one, the files a run writes): 5 MAXL steps an epoch (not a multiple of anything a
# schedule counts in), a few evaluation batches.
TINY = {'cifar100': (500, 200), 'cifar10': (400, 200)}


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state (torch, numpy, random), whichever tests ran before
    it on its worker: a test's unseeded draws are then the same in every order pytest-xdist gives."""
    import random

    import numpy as np
    import torch
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_itemcollected(item):
    """A test that shares a module-scoped fixture (one torchrun job, one set of runs) goes to the worker of
    its module's other such tests (pytest-xdist's loadgroup), so the fixture is made once; every other test
    goes to whichever worker is free."""
    info = getattr(item, '_fixtureinfo', None)
    if info and any(d.scope == 'module' for defs in info.name2fixturedefs.values() for d in defs):
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A data root whose synthetic/ folder holds small stand-ins (real on-disk formats) for quick runs."""
    root = tmp_path_factory.mktemp('data')
    for name, sizes in SMALL.items():
        if create_dataset.DATASETS[name].missing_modules():
            continue             # SVHN needs scipy; its tests skip themselves without it
        create_dataset.write_synthetic(name, str(root / 'synthetic'), seed=0, sizes=sizes)
    return str(root)


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory):
    """Smaller stand-ins still (CIFAR-100 and CIFAR-10 only): for runs whose size no assertion reads."""
    root = tmp_path_factory.mktemp('tiny_data')
    for name, sizes in TINY.items():
        create_dataset.write_synthetic(name, str(root / 'synthetic'), seed=0, sizes=sizes)
    return str(root)


@pytest.fixture
def http_server(tmp_path):
    """An HTTP server on localhost serving tmp_path/server (what the downloader sees of a real site)."""
    import functools
    import http.server
    import threading
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / 'server'))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()


def run_script(script, *args, timeout=240):
    """Run a project script as a user would; returns the CompletedProcess (text output)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))   # no spin-wait fights
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_in_process(script, *args):
    """What run_script(script, *args) returns, run in this process: the script's own entry point (the
    scripts' run_main(main, argv); benchmarks/bench.py's main(), which reads sys.argv) with sys.argv, the
    working directory, OMP_NUM_THREADS and the torch threads as the child would have them (one unless
    OMP_NUM_THREADS says otherwise), stdout and stderr captured, the exit code of a SystemExit, and an
    uncaught exception printed as a traceback with exit code 1, as the interpreter does. Saves a new
    interpreter importing torch (2-3 s a run) where a test needs no process of its own (no signals, no
    torchrun)."""
    import torch
    from utils import run_main
    argv = [str(a) for a in args]
    name = os.path.splitext(script)[0].replace('/', '.')
    if name not in sys.modules and '/' in script:          # benchmarks/bench.py: not on sys.path
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    module = importlib.import_module(name)
    takes_argv = bool(inspect.signature(module.main).parameters)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    saved_omp = os.environ.get('OMP_NUM_THREADS')
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}     # a Run installs its own
    sys.argv = [os.path.join(ROOT, script), *argv]
    os.chdir(ROOT)
    os.environ['OMP_NUM_THREADS'] = saved_omp or '1'        # run_script's environment (bench.py's children)
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(module.main, argv) if takes_argv else module.main()
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if saved_omp is None:
            del os.environ['OMP_NUM_THREADS']
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess([sys.executable, script, *argv], code, out.getvalue(), err.getvalue())
