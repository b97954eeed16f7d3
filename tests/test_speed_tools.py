"""The speed tools: the strict-float32 switch (--tf32), the FLOP count of bench.py, its
--concurrent aggregate, and benchmarks/project.py's arithmetic. The tests marked 'needs CUDA' are the GPU
part (benchmarks/gpu_check.sh runs them on a GPU machine); they skip here."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_vgg_single
from machinery import fast_paths
from machinery import options
import utils
from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench  # noqa: E402
import project  # noqa: E402

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
    cfg, _ = options.parse_config(model_vgg_single.HYPERPARAMETERS, [])
    assert cfg.tf32 is True
    utils.Run('model_vgg_single', *utils.read_config('model_vgg_single', model_vgg_single.HYPERPARAMETERS,
                                                   ['--logdir', str(tmp_path), '--device', 'cpu']))
    assert flags() == backend_flags                           # untouched


def test_tf32_false_is_strict_float32(tmp_path, backend_flags, capsys):
    run = utils.Run('model_vgg_single', *utils.read_config('model_vgg_single', model_vgg_single.HYPERPARAMETERS,
                                                         ['--logdir', str(tmp_path), '--device', 'cpu', '--tf32', 'false']))
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


# ---- FLOP counts ----------------------------------------------------------------------------------------

def conv_linear_step(B=4, cin=3, cout=8, size=8, k=3, classes=5, input_grad=False, device=CPU):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(cout * size * size, classes)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(B, cin, size, size, device=device, requires_grad=input_grad)
    y = torch.arange(B, device=device) % classes

    def step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    conv = 2 * cout * cin * k * k * size * size * B          # forward: a multiply-add per weight per output pixel
    linear = 2 * B * cout * size * size * classes
    return step, conv, linear


def test_flop_count_of_a_conv_and_linear_step_is_the_analytic_one():
    step, conv, linear = conv_linear_step(input_grad=True)
    assert bench.count_flops(step) == 3 * (conv + linear)     # backward: gradients of weights and inputs, 2x forward
    step, conv, linear = conv_linear_step(input_grad=False)
    assert bench.count_flops(step) == 2 * conv + 3 * linear   # the images need no gradient: the first layer's is skipped


def vgg16_forward_flops(batch, classes, size=32):
    """Multiply-adds x 2 of VGG-16's 13 convolutions (3x3, same padding, 2x2 pooling after each block) and
    its head (512 -> 512 -> classes), from the architecture alone."""
    flops, cin = 0, 3
    for cout, n in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(n):
            flops += 2 * cout * cin * 9 * size * size
            cin = cout
        size //= 2
    return batch * (flops + 2 * (512 * 512 + 512 * classes))


def test_bench_counts_the_bare_vgg16_step_as_the_hand_count(data_root):
    torch.manual_seed(0)
    step = bench.build('bare_vgg', CPU, dict(amp=False, channels_last=False, compile=False), data_root)
    counted = bench.count_flops(step)
    forward = vgg16_forward_flops(100, 20)                   # batch 100, the primary level's 20 classes
    first_input_grad = 2 * 64 * 3 * 9 * 32 * 32 * 100
    assert counted == 3 * forward - first_input_grad          # exact: forward + weight and input gradients
    assert abs(counted - 3 * forward) / (3 * forward) < 0.01  # "backward = 2x forward" within 1%
    assert 185e9 < counted < 190e9                            # issue 14: "about 190 GFLOP" at batch 100


# ---- bench.py --concurrent ---------------------------------------------------------------------------

def test_aggregate_of_copies_counts_every_timed_step_over_the_span():
    copies = [dict(window=[100.0, 102.0], times_s=[0.5] * 4, median_s=0.5, flops_per_step=1e12),
              dict(window=[100.5, 103.0], times_s=[0.5] * 5, median_s=0.5, flops_per_step=1e12)]
    a = bench.aggregate(copies, images=100)
    assert a['copies'] == 2 and a['timed_steps'] == 9
    assert a['span_s'] == pytest.approx(3.0) and a['overlap_s'] == pytest.approx(1.5)
    assert a['aggregate_images_per_s'] == pytest.approx(9 * 100 / 3.0)
    assert a['aggregate_tflops_per_s'] == pytest.approx(9 * 1e12 / 3.0 / 1e12)
    assert a['per_copy_images_per_s'] == [200.0, 200.0]


def test_bench_concurrent_runs_copies_at_once_and_reports_the_aggregate(tmp_path, data_root):
    """Two copies of the cheapest row at once (one timed step each), strict float32 passed to each copy."""
    out = tmp_path / 'concurrent.json'
    r = run_script('benchmarks/bench.py', '--only', 'eval_sla', '--warmup', 0, '--steps', 1, '--concurrent', 2,
                   '--tf32', 'false', '--data-root', data_root, '--json', out, '--width', 0.0625, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.read_text())
    assert info['complete'] and info['concurrent'] == [2] and info['flags'] == ['no_tf32']
    a = info['rows']['eval_sla']['2']
    assert a['copies'] == 2 and a['timed_steps'] == 2 and len(a['copy_results']) == 2
    assert a['aggregate_images_per_s'] == pytest.approx(2 * 128 / a['span_s'])
    for c in a['copy_results']:
        assert c['flops_per_step'] > 0 and c['window'][0] <= c['window'][1]
        assert (c['cudnn_allow_tf32'], c['matmul_allow_tf32'], c['float32_matmul_precision']) == (False, False, 'highest')
    assert '| eval_sla | 2 |' in r.stdout


# ---- benchmarks/project.py ---------------------------------------------------------------------------

def hand_result():
    rows = {'maxl_train': dict(mean_s=0.010, median_s=0.009), 'maxl_meta2': dict(median_s=0.040, mean_s=0.041),
            'maxl_meta1': dict(median_s=0.030, mean_s=0.03), 'eval_maxl': dict(median_s=0.002, mean_s=0.002),
            'sla_rotation': dict(median_s=0.020, mean_s=0.02), 'eval_sla': dict(median_s=0.004, mean_s=0.004),
            'semi_meta_mixup': dict(median_s=0.025, mean_s=0.03), 'eval_semi': dict(median_s=0.001, mean_s=0.001)}
    return dict(device='cuda', gpu='NVIDIA H200', precision='float32', torch='2.11.0', rows=rows)


def test_project_arithmetic_on_a_hand_made_result(tmp_path, capsys):
    runs = {p['method'].split(',')[0] + (' 1' if 'first' in p['method'] else ''): p
            for p in project.project(hand_result(), project.paper_runs())}
    # MAXL: 200 epochs x (500 training steps at the mean + 500 meta steps + 100 test batches of 100)
    assert runs['MAXL']['hours'] == pytest.approx(200 * (500 * 0.010 + 500 * 0.040 + 100 * 0.002) / 3600)
    assert runs['MAXL']['evaluation_hours'] == pytest.approx(200 * 100 * 0.002 / 3600)
    assert runs['MAXL 1']['hours'] == pytest.approx(200 * (500 * 0.010 + 500 * 0.030 + 100 * 0.002) / 3600)
    # SLA: 80,000 iterations + 80 evaluations of 40 validation + 79 test batches of 128
    assert runs['SLA']['hours'] == pytest.approx((80000 * 0.020 + 80 * (40 + 79) * 0.004) / 3600)
    # MetaSemi: 400,000 steps + 1,000 tests of 100 batches of 100
    assert runs['MetaSemi']['hours'] == pytest.approx((400000 * 0.025 + 1000 * 100 * 0.001) / 3600)

    partial = hand_result()
    del partial['rows']['eval_sla']
    sla = [p for p in project.project(partial, project.paper_runs()) if p['method'].startswith('SLA')][0]
    assert sla['hours'] is None and sla['missing'] == ['eval_sla']

    path = tmp_path / 'result.json'
    path.write_text(json.dumps(hand_result()))
    project.main([str(path), '--json', str(tmp_path / 'projection.json')])
    out = capsys.readouterr().out
    assert f'| {200 * (500 * 0.010 + 500 * 0.040 + 100 * 0.002) / 3600:.2f} (0.01) | NVIDIA H200, float32' in out
    saved = json.loads((tmp_path / 'projection.json').read_text())
    assert math.isclose(saved['projections'][0]['runs'][0]['hours'], runs['MAXL']['hours'])


# ---- on a GPU (benchmarks/gpu_check.sh runs these) ----------------------------------------------------

@CUDA
def test_strict_float32_convolutions_on_cuda_match_float64(backend_flags):
    torch.manual_seed(0)
    x, w = torch.randn(32, 64, 32, 32), torch.randn(128, 64, 3, 3)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    fast_paths.set_tf32(False)
    strict = F.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
    assert ((strict - ref).abs().max() / ref.abs().max()).item() < 1e-5      # float32 arithmetic: ~1e-7
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    product = (a.cuda() @ b.cuda()).cpu().double()
    exact = a.double() @ b.double()
    assert ((product - exact).abs().max() / exact.abs().max()).item() < 1e-5


@CUDA
def test_flop_count_on_cuda_equals_the_cpu_count():
    """The backward runs on the autograd engine's device thread on CUDA; it must be counted there too."""
    counts = [bench.count_flops(conv_linear_step(input_grad=True, device=d)[0]) for d in (CPU, torch.device('cuda'))]
    assert counts[0] == counts[1]


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
