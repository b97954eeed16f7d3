"""MetaSemi: Semi-Supervised Learning with Meta-Gradient (Zhang, Xiao, Jia, Cheng, Yang; AISTATS 2021).

The pseudo-labels of the unlabeled batch are chosen so that one SGD step on the unlabeled loss would
lower the labeled loss. To first order the gradient of that one-step-ahead labeled loss with respect
to the pseudo-labels is a Jacobian-vector product, taken by finite differences (in eval mode):
    d   = dL_labeled/dtheta,   eps = epsilon / ||d||
    G   = (softmax f(x_u; theta + eps d) - softmax f(x_u; theta - eps d)) / eps
    y_u = normalise(max(0, softmax f(x_u; theta) - lr * G))
Then one SGD step (train mode) on  L_labeled (or the mixup KL loss) + w * mean ||softmax f(x_u) - y_u||^2.
`--baseline` trains on the labeled data only (with --mix-up: mixup against plain, un-updated pseudo-labels).

    python train_meta_semi.py --dataset svhn --num-label 1000 -a convlarge --mix-up --alpha 0.1 \\
        --save-path results/svhn --seed 7788 --weight-decay 5e-5 --gpu
    python train_meta_semi.py --synthetic --dataset cifar10 --num-label 1000 --total-steps 300 \\
        --warmup 50 --test-freq 100 --width 0.25
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

import create_dataset
from utils import Meters, Run, UserError, accuracy_count, all_reduce_mean, all_reduce_sum, check_positive, \
    device_generator, forward_with, hyperparameters, run_main, semi_network, stand_in

# ---- hyperparameters: the original's defaults; each is overridable, e.g. --total-steps 1000 --width 0.25 ----
dataset = 'cifar10'            # cifar10, cifar100 or svhn
num_label = 4000               # labeled training images in all, the same number per class
architecture = 'convlarge'     # -a: convlarge or shakeshake (shake-shake-26 2x96d)
mix_up = False                 # mix labeled with unlabeled images, one-hot labels with pseudo-labels (KL loss)
alpha = 1.0                    # mixup coefficient ~ Beta(alpha, alpha), one per sample
weight = 1.0                   # weight of the unlabeled loss after its linear ramp over `warmup` steps
total_steps = 400000           # training steps (one labeled + one unlabeled batch each)
batch_size = 128               # labeled batch; the unlabeled batch has the same size
epsilon = 1e-2                 # finite-difference radius before dividing by ||d||
lr = 0.1                       # peak learning rate (also the pseudo-labels' step size)
warmup = 4000                  # steps of linear lr warm-up from 0 (and of the unlabeled-weight ramp)
gamma = 0.1                    # lr factor at each milestone
milestones = [300000, 350000]  # steps after which the lr is multiplied by gamma
weight_decay = 1e-4            # the paper uses 5e-5 for SVHN
momentum = 0.9                 # SGD momentum (weight decay applies to every parameter)
baseline = False               # labeled data only (the original train_baseline.py)
print_freq = 100               # print a training line every N steps
eval_every = 400               # test, keep the best accuracy and save a checkpoint every N steps (--test-freq)
width = 1.0                    # channel multiplier (1 = the paper's network)
seed = 1234                    # seeds the label split, the data streams, the weights
global_meta_gradient = False   # torchrun: the meta step from the global labeled batch (default: per process, as the original)
# ---- (run options: data_root (--data-path), run_dir (--save-path), device (--gpu), ...: see utils.RUN_OPTIONS)
HYPERPARAMETERS = hyperparameters(globals())
CHOICES = {'dataset': sorted(create_dataset.DATASETS), 'architecture': ['convlarge', 'shakeshake']}

TEST_BATCH = 100


def validate(cfg):
    check_positive(cfg, 'total_steps', 'batch_size', 'print_freq', 'eval_every', 'warmup', 'lr', 'width', 'epsilon',
                   'weight', 'gamma', 'weight_decay', allow_zero=('warmup', 'weight', 'weight_decay'))
    if cfg.mix_up and cfg.alpha <= 0:
        raise UserError(f'--alpha must be positive (mixup draws Beta(alpha, alpha)), got {cfg.alpha}.')
    if sorted(cfg.milestones) != list(cfg.milestones):
        raise UserError(f'--milestones must be increasing steps, got {cfg.milestones}.')


# ---- schedules: functions of the step t (counted from 0), as the original sets them every step ----

def learning_rate(t, lr, warmup, milestones, gamma):
    """Linear warm-up from 0 over `warmup` steps, then lr * gamma^(number of milestones m with t > m)."""
    if t < warmup:
        return lr * t / warmup
    return lr * gamma ** sum(t > m for m in milestones)


def unlabeled_weight(t, weight, warmup):
    """Linear ramp from 0 to `weight` over the warm-up (t <= warmup), then constant."""
    return weight * t / warmup if 0 < warmup and t <= warmup else weight


# ---- the meta step: pseudo-labels by the meta-gradient (first order, finite differences) ----

def pseudo_label_gradient(model, x_l, y_l, x_u, epsilon, global_d=False):
    """In eval mode: the unlabeled softmax P = softmax f(x_u; theta) and G = (P(theta + eps d) -
    P(theta - eps d)) / eps, d = dL_labeled/dtheta over all parameters, eps = epsilon / ||d||.

    G approximates 2 J d (J = dP/dtheta): the divisor is eps, not 2 eps, which folds in the factor 2
    of the squared-distance loss, so lr * G is the gradient of the labeled loss after a virtual SGD step
    of size lr on the unlabeled loss sum_b ||P_b - y_b||^2, taken with respect to the pseudo-labels y.
    The perturbed networks are new tensors run through forward_with, so the model's weights and
    batch-norm buffers are never modified. Also returns the eval-mode labeled logits and loss.

    Under torchrun d is this process's labeled batch's, as the original computes it per GPU (its norm
    too); with global_d it is averaged over the processes first (the global labeled batch's), and the
    weights are never perturbed in place, so the processes' weights stay identical either way."""
    model.eval()
    params = dict(model.named_parameters())
    logits_l = model(x_l)
    loss_l = F.cross_entropy(logits_l, y_l)
    d = torch.autograd.grad(loss_l, list(params.values()))
    if global_d:
        d = all_reduce_mean(d)
    with torch.no_grad():
        probs_u = F.softmax(model(x_u), dim=1)
        eps = epsilon / torch.stack([g.norm() for g in d]).norm().clamp_min(1e-12)
        shifted = []
        for sign in (1.0, -1.0):
            theta = {k: p + (sign * eps) * g for (k, p), g in zip(params.items(), d)}
            shifted.append(F.softmax(forward_with(model, theta, x_u), dim=1))
        grad_u = (shifted[0] - shifted[1]) / eps
    return probs_u, grad_u, logits_l.detach(), loss_l.detach()


def update_pseudo_labels(probs_u, grad_u, lr_now):
    """One gradient step of size lr on the pseudo-labels, clipped at 0, rows renormalised to sum 1
    (a row that sums to 0 stays 0, as the original)."""
    y = (probs_u - lr_now * grad_u).clamp_min(0)
    total = y.sum(1, keepdim=True)
    return y / torch.where(total > 0, total, torch.ones_like(total))


# ---- the model update ----

def supervised_loss(model, x_l, y_l, x_u, targets_u, lam, num_classes):
    """Train mode. Cross-entropy on the labeled batch, or with mixup (lam: [B,1] ~ Beta(alpha, alpha))
    KL(lam onehot + (1-lam) y_u || softmax f(lam x_l + (1-lam) x_u)), summed over classes, mean over B."""
    if lam is None:
        logits = model(x_l)
        return F.cross_entropy(logits, y_l), logits
    x_mix = lam[:, :, None, None] * x_l + (1 - lam[:, :, None, None]) * x_u
    t_mix = lam * F.one_hot(y_l, num_classes).to(x_l.dtype) + (1 - lam) * targets_u
    logits = model(x_mix)
    return F.kl_div(F.log_softmax(logits, dim=1), t_mix, reduction='batchmean'), logits


def consistency_loss(logits_u, targets_u):
    """mean over the batch of sum over classes (softmax(z_u) - y_u)^2."""
    return ((F.softmax(logits_u, dim=1) - targets_u) ** 2).sum(1).mean()


def sgd_step(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, lr_now, w, epsilon, num_classes, baseline=False,
               forward=None, global_d=False):
    """One training step. Returns sums over the batch on the device: label_loss, unlabel_loss, label_acc
    (hits), unlabel_acc (hits).
    x_u / y_u: the unlabeled batch (its labels only count Uacc), None for the labeled-only baseline;
    lam: per-sample mixup coefficients [B, 1], None without mixup; forward: the training forward
    (run.wrap(model); under torchrun the update's gradients are averaged over processes); global_d: see
    pseudo_label_gradient."""
    forward = forward or model
    if not baseline:
        # 1) meta step (eval mode): pseudo-labels moved by the finite-difference meta-gradient
        probs_u, grad_u, logits_l_eval, loss_l_eval = pseudo_label_gradient(model, x_l, y_l, x_u, epsilon, global_d)
        targets_u = update_pseudo_labels(probs_u, grad_u, lr_now)
        # 2) model update (train mode): labeled or mixup loss + w * consistency with the pseudo-labels
        model.train()
        loss_sup, logits_sup = supervised_loss(forward, x_l, y_l, x_u, targets_u, lam, num_classes)
        logits_u = forward(x_u)
        loss_u = consistency_loss(logits_u, targets_u)
        sgd_step(optimizer, loss_sup + w * loss_u)
        # logged as the original: with mixup the labeled loss/accuracy are the eval-mode ones of step 1
        loss_l, logits_l = (loss_l_eval, logits_l_eval) if lam is not None else (loss_sup.detach(), logits_sup)
        return sums(loss_l, loss_u.detach(), accuracy_count(logits_l, y_l), accuracy_count(logits_u, y_u), len(x_l))
    if lam is not None:
        # mixup baseline: plain eval-mode pseudo-labels, no meta update, no consistency term
        with torch.no_grad():
            model.eval()
            logits_l, logits_u = model(x_l), model(x_u)
            targets_u = F.softmax(logits_u, dim=1)
        model.train()
        loss, _ = supervised_loss(forward, x_l, y_l, x_u, targets_u, lam, num_classes)
        sgd_step(optimizer, loss)
        return sums(loss.detach(), torch.zeros_like(loss), accuracy_count(logits_l, y_l), accuracy_count(logits_u, y_u),
                    len(x_l))
    model.train()
    loss, logits_l = supervised_loss(forward, x_l, y_l, None, None, None, num_classes)
    sgd_step(optimizer, loss)
    return sums(loss.detach(), torch.zeros_like(loss), accuracy_count(logits_l.detach(), y_l), torch.zeros_like(loss),
                len(x_l))


def sums(label_loss, unlabel_loss, label_hits, unlabel_hits, batch):
    return {'label_loss': label_loss * batch, 'unlabel_loss': unlabel_loss * batch, 'label_acc': label_hits,
            'unlabel_acc': unlabel_hits}


@torch.no_grad()
def evaluate(model, test):
    """Eval mode over the whole test set: (mean cross-entropy, accuracy as a fraction)."""
    model.eval()
    sums = torch.zeros(2, device=test.device)
    for x, y in test.batches(TEST_BATCH):
        logits = model(x)
        sums += torch.stack([F.cross_entropy(logits, y, reduction='sum'), accuracy_count(logits, y)])
    loss, acc = (all_reduce_sum(sums) / len(test)).tolist()          # over every process's share
    return loss, acc


# ---- the run -----------------------------------------------------------------------------------------

def main(argv=None):
    data = {}

    def check(cfg):                       # values, then the data files and the label budget: before any writing
        validate(cfg)
        data['arrays'] = create_dataset.load_semi(cfg.dataset, cfg.data_root, stand_in(cfg), cfg.download)
        create_dataset.check_label_budget(data['arrays'][1], cfg.num_label,
                                          create_dataset.DATASETS[cfg.dataset].num_classes)

    run = Run('train_meta_semi', HYPERPARAMETERS, argv, __doc__.split('\n\n')[0], validate=check, choices=CHOICES)
    cfg, dev, log = run.cfg, run.device, run.log
    mode = ('baseline' if cfg.baseline else 'meta') + (' + mixup' if cfg.mix_up else '')
    log.print(f'MetaSemi ({mode}) with {cfg}')

    # Data: the whole uint8 training and test sets on the device; crop (and flip, not for SVHN) per batch.
    train_x, train_y, test_x, test_y = data.pop('arrays')
    record = create_dataset.DATASETS[cfg.dataset]
    num_classes, (mean, std), flip = record.num_classes, record.normalisation, record.flip
    train = create_dataset.DeviceData(train_x, train_y, dev, mean, std, shard=run.shard)
    test = create_dataset.DeviceData(test_x, test_y, dev, mean, std, shard=run.shard)
    index_file = os.path.join(run.dir, 'label_indices.txt')
    if run.resuming:
        labeled_idx, unlabeled_idx = create_dataset.read_label_indices(index_file, len(train))
    else:
        labeled_idx, unlabeled_idx = create_dataset.balanced_label_split(train_y, cfg.num_label, cfg.seed)
        if run.rank == 0:                         # under torchrun every process drew the same split
            create_dataset.write_indices(index_file, labeled_idx)
    log.print(f'{cfg.dataset}: {len(labeled_idx)} labeled, {len(unlabeled_idx)} unlabeled, {len(test)} test '
              f'images; labeled indices in {index_file}')
    # Two independent endless streams (the labeled one cycles its small set many times more often), of
    # global batches: under torchrun each process takes its share of each (batch_size per process).
    B, W = cfg.batch_size, run.world
    labeled = create_dataset.EndlessBatches(torch.as_tensor(labeled_idx, device=dev), B * W, 2 * cfg.seed)
    unlabeled = create_dataset.EndlessBatches(torch.as_tensor(unlabeled_idx, device=dev), B * W, 2 * cfg.seed + 1)
    augment_rng = device_generator(dev, cfg.seed)
    use_unlabeled = not cfg.baseline or cfg.mix_up

    model = run.network(semi_network(cfg.architecture, num_classes, cfg.width))
    forward = run.wrap(model)                             # under torchrun: gradients averaged in backward
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    alpha = torch.tensor(float(cfg.alpha), device=dev)
    beta = torch.distributions.Beta(alpha, alpha)
    log.print(f'{cfg.architecture} (width {cfg.width}): {sum(p.numel() for p in model.parameters()):,} parameters')

    objects = dict(model=model, optimizer=optimizer)
    state = run.restore(objects, step=0)
    start = state['step']
    if run.resuming:
        labeled.load_state_dict(state['labeled'])
        unlabeled.load_state_dict(state['unlabeled'])
        augment_rng.set_state(state['augment_rng'].cpu())
        log.print(f'resumed at step {start}, best accuracy so far {100 * run.best["test_acc"]:.5f}')

    # sums since the last test, on the device (a run stopped between two tests continues its own)
    meters, first_t = Meters.from_state(state.get('meters')), state.get('first_t', start)
    run.describe([model], {'labeled': len(labeled_idx), 'unlabeled': len(unlabeled_idx), 'test': len(test)},
                 cfg.total_steps - start)

    def stretch(t):                           # the steps from t to the next test
        end = min(cfg.total_steps, (t // cfg.eval_every + 1) * cfg.eval_every)
        return run.progress(end - t, f'to step {end}', t, cfg.total_steps, images_per_step=2 * B * W)
    bar = stretch(start)
    data_time, batch_time, timed = 0.0, 0.0, 0
    for t in range(start, cfg.total_steps):
        lr_now = learning_rate(t, cfg.lr, cfg.warmup, cfg.milestones, cfg.gamma)
        for group in optimizer.param_groups:
            group['lr'] = lr_now
        w = unlabeled_weight(t, cfg.weight, cfg.warmup)

        tic = time.perf_counter()
        x_l, y_l = train.get(labeled.next(), augment_rng, augment=True, flip=flip)
        x_u, y_u = (train.get(unlabeled.next(), augment_rng, augment=True, flip=flip)   # y_u: for Uacc only
                    if use_unlabeled else (None, None))
        lam = train.share(beta.sample((B * W, 1))) if cfg.mix_up else None      # drawn for the global batch
        toc = time.perf_counter()

        run.sync_buffers(model)                   # the eval-mode meta step reads the statistics
        step_sums = train_step(model, optimizer, x_l, y_l, x_u, y_u, lam, lr_now, w, cfg.epsilon, num_classes,
                               cfg.baseline, forward, cfg.global_meta_gradient)
        meters.add(B, **step_sums)
        bar.update()
        data_time, batch_time, timed = data_time + toc - tic, batch_time + time.perf_counter() - toc, timed + 1

        if t % cfg.print_freq == 0:          # the only host reads of the loop, besides testing
            val = {k: v / B for k, v in zip(step_sums, torch.stack(list(step_sums.values())).tolist())}
            avg = meters.means()
            pct = lambda d, k: 100 * d[k] if k.endswith('acc') else d[k]        # noqa: E731 (printed in percent)
            val, avg = ({k: pct(d, k) for k in d} for d in (val, avg))
            times = f'Dtime: {data_time / timed:.3f} Btime: {batch_time / timed:.3f}'
            if cfg.baseline:
                line = (f'Step: [{t:05d}/{cfg.total_steps:05d}] {times} loss: {val["label_loss"]:.3f} '
                        f'(avg {avg["label_loss"]:.3f}) Lacc: {val["label_acc"]:.3f} (avg {avg["label_acc"]:.3f})')
            else:
                line = (f'Step {t:05d} {times} Lloss: {val["label_loss"]:.3f} (avg {avg["label_loss"]:.3f}) '
                        f'Uloss: {val["unlabel_loss"]:.3f} (avg {avg["unlabel_loss"]:.3f}) Lacc: {val["label_acc"]:.3f} '
                        f'(avg {avg["label_acc"]:.3f}) Uacc: {val["unlabel_acc"]:.3f} (avg {avg["unlabel_acc"]:.3f})')
            log.print(f'{line} LR: {lr_now:.4f}')

        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.total_steps:
            bar.close()
            run.check_finite(meters, first_t, lr_now)        # stops before testing or saving
            run.sync_buffers(model)
            test_loss, acc = evaluate(model, test)
            row = dict(step=t + 1, lr=lr_now, weight=w, **meters.means(), test_loss=test_loss, test_acc=acc,
                       data_time=data_time / timed, batch_time=batch_time / timed)
            run.evaluate_and_save(objects, row, 'test_acc', lines=lambda improved: [
                f' * Accuracy {100 * acc:.5f}', f'Best Accuracy: {100 * run.best["test_acc"]:.5f}'],
                step=t + 1, labeled=labeled.state_dict(), unlabeled=unlabeled.state_dict(),
                augment_rng=augment_rng.get_state())
            meters, first_t = Meters(), t + 1
            bar = stretch(t + 1)
        run.stop_if_asked(objects, t + 1, step=t + 1, labeled=labeled.state_dict(), unlabeled=unlabeled.state_dict(),
                          augment_rng=augment_rng.get_state(), meters=meters.state_dict(), first_t=first_t)
    best = 100 * run.best['test_acc']
    log.print(f'done: {cfg.total_steps} steps, best test accuracy {best:.5f} (error {100 - best:.2f}%)')


if __name__ == '__main__':
    run_main(main, sys.argv[1:])
