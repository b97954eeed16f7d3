"""The speed tools of issue 14: the strict-float32 switch (--tf32), the FLOP count of bench.py, its
--concurrent aggregate, and benchmarks/project.py's arithmetic. The tests marked 'needs CUDA' are the GPU
part (benchmarks/gpu_check.sh runs them on a GPU machine); they skip here."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_vgg_single
import utils
from conftest import run_script


CPU = torch.device('cpu')
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.fixture
def backend_flags():
    """PyTorch's TF32 settings as they were, put back after the test (they are process-wide)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    yield saved
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def flags():
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


# ---- the strict-float32 switch ------------------------------------------------------------------------

def test_pytorch_default_is_what_the_default_run_leaves(tmp_path, backend_flags):
    assert backend_flags == (True, False, 'highest')         # PyTorch's own default: TF32 for cuDNN convolutions only
    cfg, _ = utils.parse_config(model_vgg_single.HYPERPARAMETERS, [])
    assert cfg.tf32 is True
    utils.Run('model_vgg_single', model_vgg_single.HYPERPARAMETERS, ['--logdir', str(tmp_path), '--device', 'cpu'])
    assert flags() == backend_flags                           # untouched


def test_tf32_false_is_strict_float32(tmp_path, backend_flags, capsys):
    run = utils.Run('model_vgg_single', model_vgg_single.HYPERPARAMETERS,
                    ['--logdir', str(tmp_path), '--device', 'cpu', '--tf32', 'false'])
    assert run.cfg.tf32 is False
    assert flags() == (False, False, 'highest')
    assert json.loads(open(os.path.join(run.dir, 'config.json')).read())['tf32'] is False   # kept for --resume
    net = nn.Linear(2, 2)
    run.device = torch.device('cuda')                         # the start line as a CUDA run prints it
    run.describe([net], {'train': 10}, 5)
    assert 'on cuda (float32 (strict: TF32 off))' in capsys.readouterr().out
    torch.backends.cudnn.allow_tf32 = True
    run.describe([net], {'train': 10}, 5)
    assert 'on cuda (float32 (cuDNN convolutions may use TF32; --tf32 false: strict))' in capsys.readouterr().out
    run.device = CPU
    run.describe([net], {'train': 10}, 5)
    assert 'on cpu (float32)' in capsys.readouterr().out


# ---- on a GPU (benchmarks/gpu_check.sh runs these) ----------------------------------------------------

@CUDA
def test_strict_float32_convolutions_on_cuda_match_float64(backend_flags):
    torch.manual_seed(0)
    x, w = torch.randn(32, 64, 32, 32), torch.randn(128, 64, 3, 3)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    utils.set_tf32(False)
    strict = F.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
    assert ((strict - ref).abs().max() / ref.abs().max()).item() < 1e-5      # float32 arithmetic: ~1e-7
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    product = (a.cuda() @ b.cuda()).cpu().double()
    exact = a.double() @ b.double()
    assert ((product - exact).abs().max() / exact.abs().max()).item() < 1e-5


@CUDA
def test_a_cuda_run_says_its_float32_precision(tmp_path, data_root):
    tiny = ['--synthetic', '--data_root', data_root, '--epochs', 1, '--width', 0.0625, '--device', 'cuda',
            '--logdir', tmp_path]
    strict = run_script('model_vgg_single.py', *tiny, '--tf32', 'false')
    assert strict.returncode == 0, strict.stderr[-2000:]
    assert 'float32 (strict: TF32 off)' in strict.stdout and 'EPOCH: 0000' in strict.stdout
    default = run_script('model_vgg_single.py', *tiny)
    assert default.returncode == 0, default.stderr[-2000:]
    assert 'float32 (cuDNN convolutions may use TF32' in default.stdout
