import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import create_dataset  # noqa: E402

SMALL = {'cifar100': (2000, 500), 'cifar10': (1000, 300), 'svhn': (1000, 300)}


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A data root whose synthetic/ folder holds small stand-ins (real on-disk formats) for quick runs."""
    root = tmp_path_factory.mktemp('data')
    for name, sizes in SMALL.items():
        if create_dataset.DATASETS[name].missing_modules():
            continue             # SVHN needs scipy; its tests skip themselves without it
        create_dataset.write_synthetic(name, str(root / 'synthetic'), seed=0, sizes=sizes)
    return str(root)


def run_script(script, *args, timeout=240):
    """Run a project script as a user would; returns the CompletedProcess (text output)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))   # no spin-wait fights
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
