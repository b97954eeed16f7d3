"""The opt-in fast paths (bf16 autocast, channels-last, torch.compile) and the sampled gradient cosine."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import model_vgg_maxl
import train_meta_semi
from conftest import run_in_process
from machinery.fast_paths import eager, fast_module, float32_meta
from machinery.models import VGG16, cifar_resnet, forward_with, semi_network

CPU = torch.device('cpu')


def tiny_nets():
    torch.manual_seed(0)
    return [('vgg', VGG16({'classifier1': 4, 'classifier2': 8}, width=0.0625)),
            ('resnet', cifar_resnet('cresnet20', [10], width=0.25)),
            ('convlarge', semi_network('convlarge', 10, width=0.0625))]


def as_tuple(out):
    return (out,) if torch.is_tensor(out) else tuple(out)


def loss_of(net, x):
    return sum(F.cross_entropy(o, torch.arange(len(x)) % o.shape[1]) for o in as_tuple(net(x)))


@pytest.mark.parametrize('name,net', tiny_nets())
def test_all_flags_off_leave_the_module_untouched(name, net):
    before = dict(net.__dict__)
    fast_module(net, CPU)
    assert net.__dict__.keys() == before.keys() and 'forward' not in net.__dict__


@pytest.mark.parametrize('name,net', tiny_nets())
def test_fast_paths_compute_the_float32_losses(name, net):
    net.eval()                                  # no dropout, fixed statistics: the same function both ways
    x = torch.randn(8, 3, 32, 32)
    ref_out, ref_loss = as_tuple(net(x)), loss_of(net, x)
    names = [k for k, _ in net.named_parameters()]

    cl = fast_module(copy.deepcopy(net), CPU, channels_last=True)
    assert next(p for p in cl.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(as_tuple(cl(x)), ref_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)           # a layout change only

    amp = fast_module(copy.deepcopy(net), CPU, amp=True, channels_last=True)
    outs = as_tuple(amp(x))
    assert all(o.dtype == torch.float32 for o in outs)                   # losses are taken in float32
    for a, b in zip(outs, ref_out):
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3       # bf16: ~3 significant digits
    assert abs(loss_of(amp, x).item() - ref_loss.item()) <= 0.02 * abs(ref_loss.item()) + 1e-3
    assert [k for k, _ in amp.named_parameters()] == names               # checkpoints unchanged
    assert amp.state_dict().keys() == net.state_dict().keys()


def test_fast_module_works_through_forward_with_and_keeps_gradients_close():
    """The meta-gradient code runs the network through functional_call: it gets the fast forward (the
    same outputs as calling the module), and its gradients stay close to float32's in direction."""
    torch.manual_seed(0)
    net = VGG16({'classifier1': 4, 'classifier2': 8}, width=0.0625).eval()
    amp = fast_module(copy.deepcopy(net), CPU, amp=True, channels_last=True)
    x = torch.randn(8, 3, 32, 32)
    for a, b in zip(forward_with(amp, dict(amp.named_parameters()), x), amp(x)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    grads = []
    for m in (net, amp):
        params = dict(m.named_parameters())
        out = forward_with(m, params, x)
        loss = sum(F.cross_entropy(o, torch.arange(8) % o.shape[1]) for o in out)
        g = torch.autograd.grad(loss, list(params.values()))
        grads.append(torch.cat([t.flatten() for t in g]))
    # bf16 keeps ~3 significant digits; through 15 layers of a 1/16-width network at init the gradient
    # direction agrees to ~0.96 (float32 vs float64 would be 1 - 1e-7)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.9


def test_eager_swaps_compiled_methods_back_and_forth():
    net = VGG16({'classifier': 4}, width=0.0625)
    fast_module(net, CPU, compile=True)
    compiled = net.__dict__['forward']
    plain = net.__dict__['_fast_paths']['variants']['forward'][False, False]
    assert compiled is not plain
    with eager(net):
        assert net.forward is plain
    assert net.forward is compiled
    other = VGG16({'classifier': 4}, width=0.0625)
    with eager(other):                                   # modules without compiled methods: nothing to do
        assert 'forward' not in other.__dict__


def test_sampled_cosine_equals_the_every_step_value_where_taken():
    """Training with the cosine every step and every third step: same cosines at steps 0 and 3, same
    weights (float64; taking the cosine does not change the update)."""
    torch.set_default_dtype(torch.float64)
    try:
        psi = [2, 2]
        torch.manual_seed(0)
        gen0 = model_vgg_maxl.label_generator(psi, 0.0625)
        net0 = model_vgg_maxl.multi_task_network(psi, 0.0625)
        xs = torch.randn(6, 8, 3, 32, 32)
        ys = torch.randint(0, 2, (6, 8))
        mask = model_vgg_maxl.psi_mask(psi, dtype=torch.float64)
        runs = {}
        for every in (1, 3):
            gen, net = copy.deepcopy(gen0), copy.deepcopy(net0)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            heads = model_vgg_maxl.head_parameter_names(net)
            cos = {}
            for step in range(6):
                _, _, c = model_vgg_maxl.train_step(net, gen, xs[step], ys[step], mask, optimizer, heads,
                                                    step % every == 0)
                if c is not None:
                    cos[step] = c.item()
            runs[every] = (cos, torch.cat([p.detach().flatten() for p in net.parameters()]))
        assert set(runs[3][0]) == {0, 3} and set(runs[1][0]) == set(range(6))
        for step in (0, 3):
            assert runs[3][0][step] == pytest.approx(runs[1][0][step], abs=1e-10)
        torch.testing.assert_close(runs[3][1], runs[1][1], rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_meta_semi_step_under_amp_matches_float32():
    """MetaSemi's whole step (finite-difference meta step + update) under bf16 autocast: same losses
    within bf16 tolerance."""
    torch.manual_seed(0)
    model = semi_network('convlarge', 10, width=0.0625)
    x_l, x_u = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    y_l, y_u = torch.arange(16) % 10, torch.arange(16) % 10
    lam = torch.full((16, 1), 0.7)
    stats = []
    for amp in (False, True):
        m = fast_module(copy.deepcopy(model), CPU, amp=amp)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)                                     # the same dropout masks
        stats.append(train_meta_semi.train_step(m, opt, x_l, y_l, x_u, y_u, lam, 0.1, 1.0, 1e-2, 10))
    for k in ('label_loss', 'unlabel_loss'):
        torch.testing.assert_close(stats[1][k], stats[0][k], rtol=0.05, atol=1e-3)


def test_a_script_runs_with_the_fast_paths(tmp_path, tiny_root):
    r = run_in_process('model_vgg_maxl.py', '--synthetic', '--data_root', tiny_root, '--epochs', 1, '--width', 0.0625,
                       '--amp', '--channels_last', '--logdir', tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'EPOCH: 0000' in r.stdout


def test_benchmark_runs_and_writes_its_table(tmp_path, data_root):
    """The benchmark's plumbing (not its timings): a row and its bare reference, one step each."""
    import json
    out = tmp_path / 'bench.json'
    r = run_in_process('benchmarks/bench.py', '--only', 'sla_baseline', '--warmup', 0, '--steps', 1,
                       '--data-root', data_root, '--json', out, '--width', 0.125)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.read_text())
    assert set(info['rows']) == {'sla_baseline', 'bare_resnet32'} and info['width'] == 0.125
    assert all(row['median_s'] > 0 for row in info['rows'].values())
    assert '| sla_baseline | 128 |' in r.stdout


def test_benchmark_runs_a_row_on_two_processes(tmp_path, data_root):
    """--processes 2: the rows run under torchrun (gloo) and count the images of both processes."""
    import json
    out = tmp_path / 'bench.json'
    r = run_in_process('benchmarks/bench.py', '--only', 'single', '--warmup', 0, '--steps', 1, '--processes', 2,
                       '--data-root', data_root, '--json', out, '--width', 0.0625)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.read_text())
    assert info['processes'] == 2 and set(info['rows']) == {'single', 'bare_vgg'}
    row = info['rows']['single']
    assert row['processes'] == 2 and abs(row['images_per_s'] - 2 * 100 / row['median_s']) < 1e-6


# ---- meta steps stay float32 under --amp, and strict float32 (no TF32) where they take finite differences ----

def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def relative_error(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def meta_gradients(amp, x, y, x_u):
    """The generator gradients of both MAXL orders and MetaSemi's G, through networks wrapped with the bf16
    fast path (amp=True) or plain float32 ones, from the same initial weights."""
    torch.manual_seed(0)
    psi = [2, 2, 2, 2]
    gen0, net0 = model_vgg_maxl.label_generator(psi, 0.125), model_vgg_maxl.multi_task_network(psi, 0.125)
    semi0 = semi_network('convlarge', 10, width=0.125)
    gen, net, semi = (fast_module(copy.deepcopy(m), CPU, amp=amp) for m in (gen0, net0, semi0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    mask = model_vgg_maxl.psi_mask(psi)
    first, _ = model_vgg_maxl.meta_gradient_first_order(net, gen, x, y, mask, optimizer, 0.2, 0.01)
    second, _ = model_vgg_maxl.meta_gradient_second_order(net, gen, x, y, mask, optimizer, 0.2)
    _, G, _, _ = train_meta_semi.pseudo_label_gradient(semi, x, y, x_u, 1e-2)
    return {'first_order': first, 'second_order': second, 'G': [G]}


def test_meta_gradients_through_the_bf16_fast_path_equal_the_float32_ones(monkeypatch):
    """The meta steps switch autocast off: through networks wrapped for --amp they compute what the plain
    float32 networks compute (the same operations: measured here equal to the last bit; the bound is
    float32 rounding). Control: with the switch removed, bf16 reaches the meta steps and they are far off."""
    torch.manual_seed(1)
    x, x_u, y = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    ref, amp = meta_gradients(False, x, y, x_u), meta_gradients(True, x, y, x_u)
    errors = {k: relative_error(amp[k], ref[k]) for k in ref}
    assert all(e <= 1e-5 for e in errors.values()), errors

    off = lambda *nets, strict=False: contextlib.nullcontext()                  # noqa: E731
    monkeypatch.setattr(model_vgg_maxl, 'float32_meta', off)
    monkeypatch.setattr(train_meta_semi, 'float32_meta', off)
    unguarded = meta_gradients(True, x, y, x_u)
    errors = {k: relative_error(unguarded[k], ref[k]) for k in ref}
    assert all(e > 1e-3 for e in errors.values()), errors


def tf32_switches():
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.mark.parametrize('method', ['maxl_first_order', 'semi_G'])
def test_finite_difference_steps_run_in_strict_float32_and_restore_the_switches(method):
    """Every forward of a finite-difference meta step (the perturbed ones, and the ones d is built from)
    reads TF32 off, whatever the run's settings; the settings are back after the step."""
    torch.manual_seed(0)
    saved = tf32_switches()
    seen = []
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        torch.set_float32_matmul_precision('high')
        before = tf32_switches()
        x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
        if method == 'maxl_first_order':
            psi = [2, 2]
            gen = model_vgg_maxl.label_generator(psi, 0.0625)
            net = fast_module(model_vgg_maxl.multi_task_network(psi, 0.0625), CPU, amp=True)
            net.register_forward_hook(lambda *_: seen.append(tf32_switches()))
            gen.register_forward_hook(lambda *_: seen.append(tf32_switches()))
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            model_vgg_maxl.meta_gradient_first_order(net, gen, x, y, model_vgg_maxl.psi_mask(psi), optimizer, 0.2, 0.01)
            expected_forwards = 5          # generator, net at theta and theta+, net at theta +/- eps d
        else:
            model = fast_module(semi_network('convlarge', 10, width=0.0625), CPU, amp=True)
            model.register_forward_hook(lambda *_: seen.append(tf32_switches()))
            train_meta_semi.pseudo_label_gradient(model, x, y, torch.randn(8, 3, 32, 32), 1e-2)
            expected_forwards = 4          # labeled (d), unlabeled, theta +/- eps d
        assert len(seen) == expected_forwards
        assert all(s == (False, False, 'highest') for s in seen), seen
        assert tf32_switches() == before == (True, True, 'high')
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_float32_meta_restores_the_amp_variant_after_an_error():
    net = fast_module(VGG16({'classifier': 4}, width=0.0625), CPU, amp=True)
    fast = net.forward
    with pytest.raises(ValueError):
        with float32_meta(net):
            assert net.forward is net.__dict__['_fast_paths']['variants']['forward'][False, False]
            raise ValueError
    assert net.forward is fast
