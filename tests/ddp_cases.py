"""One training step of each method, built the same way in one process (the reference, on the global
batch) and under torchrun (each process on its share): used by test_distributed.py and ddp_worker.py.

A case is built from a fixed seed in float64 with augmentation off (the batch is given) and dropout off;
`run_case(name, share, forward_of)` returns what the step changed: every parameter and buffer of the
trained networks, and for MAXL's meta steps the generator's gradient."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import model_vgg_maxl as maxl  # noqa: E402
import model_vgg_single  # noqa: E402
import train_meta_semi as semi  # noqa: E402
import train_sla as sla  # noqa: E402
from machinery.models import ConvLarge, VGG16  # noqa: E402

GLOBAL_BATCH = 8
PSI = [2, 3]
CASES = ['single', 'maxl_train', 'maxl_train_cosine', 'maxl_meta_jvp', 'maxl_meta_double_backward', 'maxl_meta1',
         'maxl_meta_jvp_cresnet', 'maxl_meta1_cresnet', 'sla_sd', 'semi_meta_mixup_global_d']
RESNET = '_cresnet'        # a MAXL case's suffix: both networks CIFAR ResNet-20s (--model cresnet20) instead of VGG-16s


def batch(seed, classes, n=GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return x, y


def state(*nets):
    return {f'{i}.{k}': v.detach().clone() for i, net in enumerate(nets) for k, v in net.state_dict().items()}


def run_case(name, share=lambda t: t, prepare=lambda net: net, forward_of=None, dtype=torch.float64,
             global_d=True, steps=1, seed=0):
    """share: this process's rows of a global-batch tensor; prepare(net): SyncBatchNorm conversion etc.;
    forward_of(net): the training forward (run.wrap in the scripts; the network itself by default)."""
    torch.manual_seed(0)
    forward_of = forward_of or (lambda net: net)
    out = {}
    if name == 'single':
        net = prepare(VGG16({'classifier': 5}, width=1 / 16).to(dtype))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        forward = forward_of(net)
        for k in range(steps):
            x, y = batch(seed + k, 5)
            model_vgg_single.train_step(forward, share(x).to(dtype), share(y), opt)
        return state(net)
    if name.startswith('maxl'):
        model, width = ('cresnet20', 1 / 8) if name.endswith(RESNET) else ('vgg16', 1 / 16)
        name = name.removesuffix(RESNET)
        net = prepare(maxl.multi_task_network(PSI, width, model).to(dtype))
        gen = prepare(maxl.label_generator(PSI, width, model).to(dtype))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        gen_opt = torch.optim.SGD(gen.parameters(), lr=0.01)
        mask, heads = maxl.psi_mask(PSI, dtype=dtype), maxl.head_parameter_names(net)
        forward = forward_of(net)
        for k in range(steps):
            x, y = batch(seed + k, len(PSI))
            x, y = share(x).to(dtype), share(y)
            if name.startswith('maxl_train'):
                _, _, cosine = maxl.train_step(net, gen, x, y, mask, opt, heads, name.endswith('cosine'), forward)
                if cosine is not None:
                    out['cosine'] = cosine.reshape(1)
                continue
            if k == 0 and steps == 1:        # a momentum buffer, so the virtual step's momentum term counts
                for p in net.parameters():
                    opt.state[p]['momentum_buffer'] = torch.full_like(p, 0.01)
            if name == 'maxl_meta1':
                grads, _ = maxl.meta_gradient_first_order(net, gen, x, y, mask, opt, 0.2, 1e-3)
            else:
                grads, _ = maxl.meta_gradient_second_order(net, gen, x, y, mask, opt, 0.2, name[len('maxl_meta_'):])
            for i, g in enumerate(grads):
                out[f'gen_grad.{i}'] = g.detach().clone()
            for p, g in zip(gen.parameters(), grads):
                p.grad = g
            gen_opt.step()
        return out | state(net, gen)
    if name == 'sla_sd':
        tf = sla.Transformations('rotation', torch.device('cpu'))
        net = prepare(sla.build_model('cresnet20', 'sla+sd', 5, tf.M, 0.125).to(dtype))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        forward = forward_of(net)
        for k in range(steps):
            x, y = batch(seed + k, 5)
            sla.train_step(forward, opt, share(x).to(dtype), share(y), 'sla+sd', tf, 1.0, False)
        return state(net)
    if name.startswith('semi'):
        model = prepare(ConvLarge(5, width=1 / 16, stochastic=False).to(dtype))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        forward = forward_of(model)
        for k in range(steps):
            x_l, y_l = batch(seed + 2 * k, 5)
            x_u, y_u = batch(seed + 2 * k + 1, 5)
            lam = torch.linspace(0.2, 0.9, GLOBAL_BATCH, dtype=dtype)[:, None]
            semi.train_step(model, opt, share(x_l).to(dtype), share(y_l), share(x_u).to(dtype), share(y_u),
                            share(lam), 0.1, 1.0, 1e-2, 5, baseline=False, forward=forward, global_d=global_d)
        return state(model)
    raise ValueError(name)
