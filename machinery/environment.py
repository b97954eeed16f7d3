"""What decides a run's numbers besides its options: recorded in config.json (`environment`: the first start;
`environment_resumed`: each later start), compared by results.py between the seeds of a row, and checked on
--resume (utils.Run).

  environment(device)     the CPU threads, torch's CPU kernels, the torch and torchvision versions, the device,
                          Python, the repository's commit and whether its tracked files were modified
  changed(before, now)    the entries that decide the numbers and differ: a continuation is not bit-exact

On a CPU the numbers depend on the thread count (a sum split over threads is added in another order), so
the same command with 1 and 2 threads gives other accuracies; on a GPU on the device and the library versions.
"""
import importlib.metadata
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository
EXACT = ('threads', 'cpu_kernels', 'torch', 'torchvision', 'device')     # a change of these changes the numbers


def _git(*args):
    try:
        out = subprocess.run(['git', '-C', ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'cpu':
        try:
            with open('/proc/cpuinfo') as f:
                model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), '')
        except OSError:
            model = ''
        return f'cpu ({model or platform.processor() or platform.machine()})'
    return str(device)


def environment(device):
    """{threads, cpu_kernels, torch, torchvision, device, python, commit, modified} of this process now;
    commit and modified are None outside a git checkout."""
    try:                                  # the installed version, without importing torchvision (seconds)
        vision = importlib.metadata.version('torchvision')
    except importlib.metadata.PackageNotFoundError:
        vision = None
    commit = _git('rev-parse', 'HEAD')
    status = _git('status', '--porcelain', '--untracked-files=no') if commit else None
    return {'threads': torch.get_num_threads(), 'cpu_kernels': torch.backends.cpu.get_cpu_capability(),
            'torch': str(torch.__version__), 'torchvision': None if vision is None else str(vision),
            'device': device_name(device), 'python': platform.python_version(), 'commit': commit, 'modified': None if status is None else bool(status)}


def changed(before, now):
    """[(name, before, now)] of the EXACT entries that differ (none when `before` was not recorded)."""
    if not before:
        return []
    return [(k, before.get(k), now.get(k)) for k in EXACT if before.get(k) != now.get(k)]
