"""MAXL: Meta AuXiliary Learning (Liu, Davison, Johns; NeurIPS 2019) on 4-level CIFAR-100 (or another dataset:
--dataset).

A label-generation network invents auxiliary labels (psi[i] auxiliary classes for primary class i,
through a masked softmax); a multi-task VGG-16 learns the primary task plus those labels; the
generator is trained by the meta-gradient of the primary loss through one SGD step of the multi-task
network: exact (second order, --meta_order 2) or by finite differences (first order, --meta_order 1).
Both networks are VGG-16s as the paper's, or the same ResNet (--model). Built on model_vgg_single.py (the
data, the loss, the evaluation); its steps (train_step, meta_step) are timed by benchmarks/bench.py, its
meta-gradients checked by benchmarks/numerics.py.

    python model_vgg_maxl.py                                   # the paper's setting (real CIFAR-100)
    python model_vgg_maxl.py --dataset cifar10 --psi 5         # another dataset: psi auxiliary classes per class
    python model_vgg_maxl.py --dataset cifar10 --model cresnet32        # both networks CIFAR ResNet-32s
    python model_vgg_maxl.py --synthetic --epochs 3 --width 0.125
"""
import sys
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F

import create_dataset
from create_dataset import hierarchy_psi
from machinery.distributed import all_reduce, all_reduce_mean, differentiable_sum, distributed
from machinery.fast_paths import eager, float32_meta
from machinery.models import MAXL_BACKBONES, accuracy_count, backbone, forward_with, head_parameter_names
from machinery.options import UserError, check_positive, hyperparameters
import model_vgg_single
from create_dataset import check_dataset, check_hierarchy, has_hierarchy, load_columns, n_classes, place, streamed
from model_vgg_single import (check_model, data_options_unused, epoch_line, evaluate, finish, focal_loss,
                              note_bad_images, psi_per_class)
from utils import Meters, Run, read_config, run_main

# ---- hyperparameters: the paper's setting; each is overridable, e.g. --epochs 10 --width 0.25 ----
epochs = 200
batch_size = 100
lr = 0.01                  # multi-task network: plain SGD
gen_lr = 1e-3              # label generator: SGD with weight decay
gen_weight_decay = 5e-4
lr_step = 50               # both learning rates are halved every lr_step epochs
lr_gamma = 0.5
dataset = 'cifar100'       # held on the device: cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, fashion-mnist; streamed from their files: tiny-imagenet, cub200, indoor, dogs, imagenet, imagenetN, inat; folder: your own ImageFolder tree (--data_root)
psi = [5] * 20             # auxiliary classes per primary class (one per primary class, or one value for all); another dataset: 5 per class unless given
primary_level = 2          # cifar100: label level of the primary task: 0, 1, 2, 3 -> 3, 10, 20, 100 classes
num_samples_per_class = 0  # > 0: train on this many images of every primary class (drawn with the seed); 0: all
aux_level = 0              # cifar100: 1, 2 or 3 (finer than primary_level): psi = the number of that level's classes under each primary class, as Human's head; 0: psi as given
entropy_weight = 0.2       # weight of the generator's entropy regulariser
meta_order = 2             # 2: exact second-order meta-gradient; 1: finite-difference first order
second_order = 'jvp'       # how the exact one is computed: 'jvp' (forward mode) or 'double_backward' (same value)
fd_eps = 0.01              # first order: the step is fd_eps / ||d||
cos_every = 10             # log the primary/auxiliary gradient cosine every N training steps (1: every step)
width = 1.0                # channel multiplier of both networks (1 = the paper's VGG-16s)
model = 'vgg16'            # the backbone of both networks: vgg16 (the paper's) or a CIFAR ResNet (cresnet20, 32, 44, 56, 110) on 32-pixel images; torchvision's resnet18, resnet50, ... on larger ones (the file datasets' default: resnet18)
image_size = 224           # the file datasets: training crop size (evaluation: shorter side to size*256/224, centre crop); 32: for vgg16 and the CIFAR ResNets
workers = 4                # the file datasets: DataLoader worker processes per process (reading, and decoding on the cpu path)
decode_on = 'auto'         # the file datasets: decode and augment on the gpu (nvJPEG, when training on CUDA) or in the cpu workers
# ---- (run options: data_root, seed, device, fast paths, synthetic, download, logdir, resume: see machinery/options.py)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'primary_level': [0, 1, 2, 3], 'aux_level': [0, 1, 2, 3], 'meta_order': [1, 2],
           'second_order': ['jvp', 'double_backward'], 'model': MAXL_BACKBONES, 'decode_on': ['auto', 'cpu', 'gpu']}



def choose_psi(cfg, typed, n_primary=None):
    """The auxiliary classes of a new run: on CIFAR-100 with --aux_level L > 0, the hierarchy's (hierarchy_psi,
    the auxiliary sizes of the Human, Random and K-means runs of the same pair; a --psi typed with it must be
    that same list: one of the two says what psi is, and a different one is refused rather than silently
    dropped); on another dataset 5 per class unless --psi is given; a single value is every class's. n_primary:
    the primary classes (default: the dataset record's; a file dataset's come from its class folders)."""
    if cfg.aux_level and has_hierarchy(cfg.dataset):
        sizes = hierarchy_psi(cfg.primary_level, cfg.aux_level)
        if 'psi' in typed and cfg.psi != sizes:
            raise UserError(f'--psi {",".join(map(str, cfg.psi))} and --aux_level {cfg.aux_level} disagree: with '
                            f'--aux_level, psi is the hierarchy\'s {",".join(map(str, sizes))} (the level-{cfg.aux_level} '
                            f'classes under each level-{cfg.primary_level} class). Give one of the two: drop --psi, or '
                            'drop --aux_level to train with your psi.')
        cfg.psi = sizes
    primary = cfg.primary_level if has_hierarchy(cfg.dataset) else 0
    n_primary = n_primary or create_dataset.DATASETS[cfg.dataset].label_classes[primary]
    cfg.psi = psi_per_class(cfg.psi if has_hierarchy(cfg.dataset) or 'psi' in typed else [5], n_primary)


def check(cfg, typed):
    check_dataset(cfg)
    check_hierarchy(cfg, typed)
    check_model(cfg, typed)
    check_positive(cfg, 'epochs', 'batch_size', 'width', 'lr', 'gen_lr', 'lr_step', 'fd_eps', 'cos_every',
                   'gen_weight_decay', 'entropy_weight', 'num_samples_per_class',
                   allow_zero=('cos_every', 'gen_weight_decay', 'entropy_weight', 'num_samples_per_class'))


# ---- the two networks ------------------------------------------------------------------------------

def label_generator(psi, width, model='vgg16'):
    """The backbone (VGG-16: xavier-normal init, as the original) whose one head scores sum(psi) auxiliary
    classes; the psi mask (masked_softmax) turns its scores into each primary class's labels."""
    return backbone(model, {'classifier': int(sum(psi))}, width, init='xavier_normal')


def multi_task_network(psi, width, model='vgg16'):
    """The backbone (VGG-16: xavier-uniform init) with a primary head (len(psi) classes) and an auxiliary head
    (sum(psi) classes)."""
    return backbone(model, {'classifier1': len(psi), 'classifier2': int(sum(psi))}, width, init='xavier_uniform')


def multi_task_losses(pri_logits, aux_logits, y, aux_target):
    """Mean focal losses of the primary task (true labels) and the auxiliary task (generated soft labels)."""
    p1, p2 = F.softmax(pri_logits, dim=1), F.softmax(aux_logits, dim=1)
    return focal_loss(p1, y).mean(), focal_loss(p2, aux_target).mean()


# ---- MAXL's math: generated labels, the entropy regulariser, the virtual step, the gradient cosine ----

def psi_mask(psi, device=None, dtype=torch.float32):
    """[len(psi), sum(psi)] mask: 1 on each primary class's auxiliary group, 1e-8 elsewhere (as the original)."""
    mask = torch.full((len(psi), int(sum(psi))), 1e-8, dtype=dtype, device=device)
    start = 0
    for i, n in enumerate(psi):
        mask[i, start:start + n] = 1.0
        start += n
    return mask


def masked_softmax(logits, primary, psi_mask_):
    """MAXL's masked softmax exp(x) m / sum(exp(x) m), m = psi_mask[primary], computed stably as
    softmax(x + log m): equal to the original formula, but without overflow for large logits."""
    log_mask = torch.log(psi_mask_.to(logits.dtype))[primary]
    return torch.softmax(logits + log_mask, dim=1)


def entropy_loss(probs):
    """Negative entropy of the batch-mean prediction, sum_c pbar_c log(pbar_c + 1e-20) (MAXL's regulariser;
    minimising it spreads the generated labels over all auxiliary classes)."""
    mean = probs.mean(dim=0)
    return torch.sum(mean * torch.log(mean + 1e-20))


def virtual_sgd_step(params, grads, optimizer):
    """theta' = theta - lr * (momentum * buf + g + weight_decay * theta): the step the (torch.optim.SGD)
    optimiser would take next, as new tensors (differentiable if the grads are). Nesterov and dampening
    are not supported, as in the original MAXL code."""
    group = optimizer.param_groups[0]
    lr, momentum, wd = group['lr'], group.get('momentum', 0.0), group.get('weight_decay', 0.0)
    if group.get('nesterov', False) or group.get('dampening', 0.0):
        raise UserError('the virtual step supports plain SGD with momentum only (no nesterov, no dampening).')
    new = {}
    for (name, p), g in zip(params.items(), grads):
        step = g if wd == 0 else g + wd * p
        if momentum:
            buf = optimizer.state.get(p, {}).get('momentum_buffer')
            if buf is not None:
                step = step + momentum * buf
        new[name] = p - lr * step
    return new


def flat_norm(tensors):
    """Euclidean norm of a list of tensors taken as one vector (summed in float64)."""
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).to(tensors[0].dtype)


def cosine_per_filter(grads_a, grads_b):
    """Mean over layers of the mean cosine similarity between two gradients, taken per output filter
    (each parameter viewed as [out, -1]), as MAXL's first-order script logs it."""
    total = 0.0
    for a, b in zip(grads_a, grads_b):
        total = total + F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=-1).mean()
    return total / len(grads_a)


# ---- training step: update the multi-task network on primary + generated auxiliary labels --------

def train_step(net, gen, x, y, mask, optimizer, heads, with_cosine, forward=None):
    """One SGD step of the multi-task network on the primary labels and the generated auxiliary labels.
    `forward`: the network's training forward (run.wrap: under torchrun it averages the gradients of the
    backward); with_cosine takes the two losses' gradients separately, averaged over processes by hand
    (torch.autograd.grad bypasses DistributedDataParallel). Returns (primary loss, correct, cosine)."""
    with torch.no_grad():
        aux_target = masked_softmax(gen(x), y, mask)         # generated labels (generator in train mode)
    pri_logits, aux_logits = net(x) if with_cosine or forward is None else forward(x)
    loss1, loss2 = multi_task_losses(pri_logits, aux_logits, y, aux_target)
    params = list(net.parameters())
    optimizer.zero_grad(set_to_none=True)
    cosine = None
    if with_cosine:
        # The two losses' gradients separately; their sum is the step's gradient, so this costs one
        # extra backward pass, not two.
        g1 = all_reduce_mean(torch.autograd.grad(loss1, params, retain_graph=True, materialize_grads=True))
        g2 = all_reduce_mean(torch.autograd.grad(loss2, params, materialize_grads=True))
        shared = [i for i, (n, _) in enumerate(net.named_parameters()) if n not in heads]   # the trunk
        cosine = cosine_per_filter([g1[i] for i in shared], [g2[i] for i in shared]).detach()
        for p, a, b in zip(params, g1, g2):
            p.grad = a + b
    else:
        (loss1 + loss2).backward()
    optimizer.step()
    return loss1.detach(), accuracy_count(pri_logits, y), cosine


# ---- meta step: the generator's gradient through one virtual SGD step of the multi-task network ----

# Under torchrun each process holds its share of the global batch. The meta-gradient is the global batch's:
# the virtual step uses the gradient averaged over processes (global_mean), the entropy is that of the
# global mean prediction (global_rows gathers the rows' sum differentiably), and each process's meta
# loss, a 1/world share of the global one, is differentiated in phi and summed over processes
# (generator_gradient). With SyncBatchNorm (--sync_bn) this equals one process on the global batch;
# in one process every step below is the plain single-device computation.

def global_mean(tensors, differentiable=False):
    """The gradients of the global batch's mean loss: the mean over processes of each process's."""
    if not distributed():
        return tensors
    if differentiable:
        world = dist.get_world_size()
        return tuple(differentiable_sum(t) / world for t in tensors)
    return tuple(all_reduce_mean([t.clone() for t in tensors]))


class _GlobalRows:
    """Stands for the global batch's rows where only their mean is used (entropy_loss)."""

    def __init__(self, rows):
        self.rows = rows

    def mean(self, dim):
        return differentiable_sum(self.rows.sum(dim)) / differentiable_sum(self.rows.new_tensor(float(len(self.rows))))


def global_rows(rows):
    return _GlobalRows(rows) if distributed() else rows


def generator_gradient(meta_loss, gen):
    """d meta_loss / d phi; under torchrun the global meta loss's: this process's 1/world share of it,
    differentiated, then summed over processes."""
    if not distributed():
        return torch.autograd.grad(meta_loss, list(gen.parameters()))
    grads = torch.autograd.grad(meta_loss / dist.get_world_size(), list(gen.parameters()))
    return tuple(all_reduce(list(grads)))


class Lookahead(NamedTuple):
    """What the meta-gradients need from one virtual step theta -> theta+ (see lookahead)."""
    params: dict               # theta: the multi-task network's own parameters, by name
    aux_target: torch.Tensor   # generated labels t(phi), differentiable in the generator's parameters phi
    loss_fast: torch.Tensor    # L_pri(theta+), the primary loss after the virtual step
    v: tuple                   # dL_pri(theta+)/dtheta+, one tensor per parameter (None with create_graph)
    stats: dict                # detached sums over the batch: pre_loss, pre_acc (at theta), post_loss, post_acc (theta+)


def lookahead(net, gen, x, y, mask, optimizer, create_graph=False):
    """theta+ = the optimiser's next step from theta on L_mt(theta, phi) = L_pri + L_aux(generated labels),
    and the primary loss there. Batch norm uses batch statistics; the running statistics are never touched.

    create_graph=True: theta+ keeps the graph back to phi (through dL_mt/dtheta, with the generated
        labels not detached), so L_pri(theta+) can be differentiated in phi directly; v is not computed.
    create_graph=False: theta+ is built without a graph from detached generated labels, as fresh leaves,
        and v = dL_pri(theta+)/dtheta+ is returned."""
    params = dict(net.named_parameters())
    aux_target = masked_softmax(forward_with(gen, dict(gen.named_parameters()), x), y, mask)
    pri_logits, aux_logits = forward_with(net, params, x)
    loss1, loss2 = multi_task_losses(pri_logits, aux_logits, y, aux_target if create_graph else aux_target.detach())
    grads = torch.autograd.grad(loss1 + loss2, list(params.values()), create_graph=create_graph)
    grads = global_mean(grads, differentiable=create_graph)          # under torchrun: the global batch's
    if create_graph:
        fast = virtual_sgd_step(params, grads, optimizer)              # theta+ (keeps the graph)
    else:
        with torch.no_grad():
            fast = virtual_sgd_step(params, grads, optimizer)          # theta+
        fast = {k: p.requires_grad_() for k, p in fast.items()}
    pri_fast, _ = forward_with(net, fast, x)
    loss_fast = focal_loss(F.softmax(pri_fast, dim=1), y).mean()
    v = None if create_graph else global_mean(torch.autograd.grad(loss_fast, list(fast.values()), allow_unused=True,
                                                                  materialize_grads=True))
    stats = {'pre_loss': loss1.detach() * len(x), 'pre_acc': accuracy_count(pri_logits, y),
             'post_loss': loss_fast.detach() * len(x), 'post_acc': accuracy_count(pri_fast, y)}
    return Lookahead(params, aux_target, loss_fast, v, stats)


def meta_gradient_second_order(net, gen, x, y, mask, optimizer, entropy_weight, method='jvp'):
    """Exact: d/dphi [ L_pri(theta+) + w * entropy(phi) ], theta+ = the optimiser's next step from theta
    on L_mt(theta, phi) = L_pri + L_aux(generated labels) (see lookahead). Batch norm uses batch
    statistics; the running statistics are never touched. Two ways to the same number (tests check both
    against an explicit unrolled step differentiated by autograd):

    'double_backward': build theta+ with create_graph=True and differentiate L_pri(theta+) back through it.
    'jvp' (default, ~1.2x faster, less memory): theta+ depends on phi only through g = dL_mt/dtheta
        (times -lr), so by the chain rule
            dL_pri(theta+)/dphi = -lr * d/dphi [ v . dL_mt(theta, phi)/dtheta ],  v = dL_pri/dtheta at theta+,
        with v held fixed. v . dL_mt/dtheta is the directional derivative of L_mt along v: one forward-mode
        pass (torch.autograd.forward_ad), still differentiable in the generated labels. No double backward."""
    if method not in ('jvp', 'double_backward'):
        raise UserError(f"second_order must be 'jvp' or 'double_backward', got {method!r}.")
    with float32_meta(net, gen):                       # float32 whatever --amp says
        ahead = lookahead(net, gen, x, y, mask, optimizer, create_graph=method == 'double_backward')
        entropy = entropy_weight * entropy_loss(global_rows(ahead.aux_target))
        if method == 'double_backward':
            meta_loss = ahead.loss_fast + entropy
        else:
            with fwAD.dual_level():
                dual = {k: fwAD.make_dual(p.detach(), vk) for (k, p), vk in zip(ahead.params.items(), ahead.v)}
                pri_d, aux_d = forward_with(net, dual, x)
                directional = fwAD.unpack_dual(sum(multi_task_losses(pri_d, aux_d, y, ahead.aux_target))).tangent
            lr_now = optimizer.param_groups[0]['lr']
            meta_loss = -lr_now * directional + entropy
        return generator_gradient(meta_loss, gen), ahead.stats


def focal_loss_target_grad(probs):
    """d/dt of mean_i focal_loss(probs_i, t_i) for a soft target t: the auxiliary loss's gradient in the
    generated labels, -(1 - p)^2 log(p + 1e-20) / B (B = len(probs)), taken by autograd of focal_loss itself."""
    # Bit for bit the closed form above (the pinned runs were recorded with it). Autograd of .mean()
    # would scale by fl(1/B), giving fl(fl(1/B) * X), which can differ in the last bit from fl(X / B).
    # Autograd of .sum() hands every element a gradient of exactly 1, so it returns X itself:
    # focal_loss computes ((-t) * (1 - p)^2) * log(p + 1e-20), whose t-gradient autograd forms as
    # -(log(p + 1e-20) * (1 - p)^2); negation is exact and IEEE multiplication commutes, so that is
    # -(1 - p)^2 * log(p + 1e-20) to the bit, and dividing by B afterwards is the closed form's one
    # rounding. focal_loss is linear in t, so where the gradient is taken does not matter: at t = 0.
    t = torch.zeros_like(probs).requires_grad_()
    with torch.enable_grad():                                # callers may be under no_grad
        (grad,) = torch.autograd.grad(focal_loss(probs, t).sum(), t)
    return grad / len(probs)


def meta_gradient_first_order(net, gen, x, y, mask, optimizer, entropy_weight, fd_eps):
    """Finite differences (DARTS-style), as the original first-order script:
        d   = dL_pri(theta^+)/dtheta^+,  eps = fd_eps / ||d||
        g   = -lr * [dL_mt(theta + eps d, phi)/dphi - dL_mt(theta - eps d, phi)/dphi] / (2 eps)
              + w * d entropy / dphi            (the original drops this entropy term)
    theta^+ and d come from lookahead. The perturbed weights are new tensors, so the network's weights
    and buffers are never modified. L_mt depends on phi only through the generated labels t, so the
    difference is taken on dL_mt/dt (two forward passes of the network, and focal_loss_target_grad, no
    backward through the network) and sent through the generator in a single backward pass.
    The whole step runs in strict float32 whatever --amp and --tf32 say (float32_meta): the perturbation
    is a few millionths of each weight, which bf16 or TF32 rounding would swallow."""
    with float32_meta(net, gen, strict=True):
        ahead = lookahead(net, gen, x, y, mask, optimizer)
        d = ahead.v
        eps = fd_eps / flat_norm(d)
        with torch.no_grad():
            dldt = []                                            # dL_mt/dt at theta +/- eps d
            for sign in (1.0, -1.0):
                shifted = {k: p + sign * eps * dk for (k, p), dk in zip(ahead.params.items(), d)}
                p2 = F.softmax(forward_with(net, shifted, x)[1], dim=1)
                dldt.append(focal_loss_target_grad(p2))
            lr_now = optimizer.param_groups[0]['lr']
            target_grad = -lr_now * (dldt[0] - dldt[1]) / (2 * eps)
        aux_target = ahead.aux_target
        surrogate = (aux_target * target_grad).sum() + entropy_weight * entropy_loss(global_rows(aux_target))
        return generator_gradient(surrogate, gen), ahead.stats


# ---- the run -----------------------------------------------------------------------------------------

RATES = {'lr': ('optimizer', 'scheduler'), 'gen_lr': ('gen_optimizer', 'gen_scheduler')}   # --resume RUN --lr / --gen_lr


def meta_step(net, gen, x, y, mask, optimizer, gen_optimizer, cfg):
    """One SGD step of the label generator on its meta-gradient (--meta_order); returns the meta batch's
    primary loss and accuracy before and after the virtual step (sums over the batch)."""
    if cfg.meta_order == 2:
        with eager(net, gen):                          # double backward / forward mode: never compiled
            gen_grads, stats = meta_gradient_second_order(net, gen, x, y, mask, optimizer, cfg.entropy_weight,
                                                          cfg.second_order)
    else:
        gen_grads, stats = meta_gradient_first_order(net, gen, x, y, mask, optimizer, cfg.entropy_weight, cfg.fd_eps)
    for p, g in zip(gen.parameters(), gen_grads):
        p.grad = g
    gen_optimizer.step()
    return stats


# ---- how results.py tables this script's runs (as Single's, but for the method and its settings) ----

UNIT, PAPER, TIME_NOTE, run_seconds, SELECTION = (model_vgg_single.UNIT, model_vgg_single.PAPER, model_vgg_single.TIME_NOTE,
                                                   model_vgg_single.run_seconds, model_vgg_single.SELECTION)
HEADLINE = ['primary_level', 'psi', 'num_samples_per_class', 'width']
METHOD_OPTIONS = ['meta_order', 'second_order']
OLDER_RUNS = {'model': 'vgg16'}                # a run from before --model trained VGG-16s


def reported(cfg):
    """MAXL with its meta-gradient: the primary task's mean test accuracy over the last 5 epochs (SELECTION)."""
    order = f'second order ({cfg.get("second_order")})' if cfg.get('meta_order') == 2 else 'first order'
    return [(f'MAXL, {order}', 'test_acc', SELECTION)]


def unused_options(cfg):
    """The options that do not decide a run's numbers: only the exact meta-gradient has two forms
    (second_order), only the first order a step (fd_eps); psi says what a run computes (--aux_level only sets
    it); cos_every changes what is logged."""
    hierarchy = set() if has_hierarchy(cfg.get('dataset', 'cifar100')) else {'primary_level'}
    return ({'second_order' if cfg.get('meta_order') == 1 else 'fd_eps', 'aux_level', 'cos_every'} | hierarchy
            | data_options_unused(cfg)) & set(cfg)


def main(argv=None):
    cfg, cli = read_config('model_vgg_maxl', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], CHOICES)
    check(cfg, cli.typed)
    if not cli.resumed and not streamed(cfg.dataset):
        choose_psi(cfg, cli.typed)                 # the auxiliary classes per primary class
    train_x, train_y, test_x, test_y, level = load_columns(cfg)
    if not cli.resumed and streamed(cfg.dataset):  # a file dataset's classes: its class folders
        choose_psi(cfg, cli.typed, n_classes(cfg, level, train_x))

    run = Run('model_vgg_maxl', cfg, cli)
    dev = run.device
    train, test = place(train_x, train_y, cfg, run), place(test_x, test_y, cfg, run)   # on the device, whole
    gen = run.network(label_generator(cfg.psi, cfg.width, cfg.model))
    net = run.network(multi_task_network(cfg.psi, cfg.width, cfg.model))
    forward = run.wrap(net)                               # under torchrun: gradients averaged in backward
    gen_optimizer = torch.optim.SGD(gen.parameters(), lr=cfg.gen_lr, weight_decay=cfg.gen_weight_decay)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    gen_scheduler = torch.optim.lr_scheduler.StepLR(gen_optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    mask = psi_mask(cfg.psi, dev)
    heads = head_parameter_names(net)
    objects = dict(net=net, gen=gen, optimizer=optimizer, gen_optimizer=gen_optimizer,
                   scheduler=scheduler, gen_scheduler=gen_scheduler)
    state = run.restore(objects, rates=RATES, epoch=-1, step=0)
    step = state['step']
    per_epoch = 2 * train.num_batches(cfg.batch_size)      # a pass of training steps, a pass of meta steps
    run.describe([net, gen], {'train': len(train), 'test': len(test)}, cfg.epochs * per_epoch,
                 unit='steps (training and meta)')

    for epoch, data_rng in run.epochs(state['epoch'], cfg.epochs):
        net.train(), gen.train()

        # 1) a pass of training steps on the multi-task network
        train_meters, first_step = run.meters('loss'), step    # summed on the device: no host sync in the loop
        bar = run.progress(per_epoch, f'epoch {epoch}', epoch * per_epoch, cfg.epochs * per_epoch)
        cos_sum, cos_n = torch.zeros((), device=dev), 0
        for x, labels in train.batches(cfg.batch_size, data_rng, shuffle=True, augment=True):
            y = labels[:, level]
            with_cos = cfg.cos_every > 0 and step % cfg.cos_every == 0
            loss1, correct, cosine = train_step(net, gen, x, y, mask, optimizer, heads, with_cos, forward)
            train_meters.add(len(x), loss=loss1 * len(x), acc=correct)
            if cosine is not None:
                cos_sum, cos_n = cos_sum + cosine, cos_n + 1
            step += 1
            bar.update()
        run.check_finite(train_meters, first_step, optimizer.param_groups[0]['lr'])  # stops before anything is saved

        # 2) a pass of meta steps on the label generator
        meta_meters = Meters()
        for x, labels in train.batches(cfg.batch_size, data_rng, shuffle=True, augment=True):
            meta_meters.add(len(x), **meta_step(net, gen, x, labels[:, level], mask, optimizer, gen_optimizer, cfg))
            bar.update()
        bar.close()
        run.check_finite(meta_meters, 0, gen_optimizer.param_groups[0]['lr'], unit=f'epoch {epoch}, meta step',
                         option='gen_lr')

        # 3) test
        run.sync_buffers(net)
        tests = evaluate(net, test, (level,), cfg.batch_size)
        note_bad_images(run, train, test)
        scheduler.step(), gen_scheduler.step()
        tr, meta = train_meters.means(), meta_meters.means()
        row = dict(epoch=epoch, step=step, train_loss=tr['loss'], train_acc=tr['acc'],
                   cosine=float(cos_sum) / cos_n if cos_n else float('nan'), **{f'meta_{k}': v for k, v in meta.items()},
                   test_loss=tests['loss'], test_acc=tests['acc'], seconds=run.timer.lap())
        run.evaluate_and_save(objects, row, 'test_acc', epoch=epoch, step=step)
        run.log.print(epoch_line(row, f'TRAIN [LOSS|ACC.]: PRI {tr["loss"]:.4f} {tr["acc"]:.4f} COSSIM {row["cosine"]:.4f} '
                                      f'|| META [LOSS|ACC.]: PRE {meta["pre_loss"]:.4f} {meta["pre_acc"]:.4f} '
                                      f'AFTER {meta["post_loss"]:.4f} {meta["post_acc"]:.4f} '
                                      f'|| TEST: {tests["loss"]:.4f} {tests["acc"]:.4f}'))
        run.stop_if_asked()                   # Ctrl-C / SIGTERM: after the epoch, whose checkpoint is written
    finish(run)


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
