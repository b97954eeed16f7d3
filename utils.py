"""What the training scripts share. Map of the sections, and who uses them:

  errors          UserError, run_main                          every script (exit code 2, no traceback)
  hyperparameters RUN_OPTIONS, ALIASES, hyperparameters,      every script: the command line
                  parse_config, check_choices
  seeding         seed_everything, set_tf32, pick_device       every script (set_tf32 through Run; bench)
  backbones       VGG16                                        model_vgg_single / _human / _maxl
                  CifarResNet, cifar_resnet                    train_sla
                  ConvLarge, ShakeShake26, semi_network        train_meta_semi, plot_features
  losses          focal_loss, accuracy_count, evaluate_heads   the three MAXL-paper scripts (accuracy_count: all)
  meta-gradients  forward_with                                 model_vgg_maxl, train_meta_semi
  fast paths      fast_module, eager, float32_meta,            every script (through Run.network), bench;
                  strict_float32                               float32_meta: the meta steps
  runs            Run, Meters, stream_seed, device_generator,  every script: run folder, log, metrics,
                  checkpoints, Timer                           best.pt / checkpoint.pt, resume

Everything here is plain PyTorch (>= 2.11) and numpy; nothing imports torchvision.
"""
import argparse
import contextlib
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


# ----------------------------------------------------------------------------------------------------
# Errors a user can fix: printed as one paragraph, exit code 2, no traceback
# ----------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A bad input the user can fix (missing file, wrong md5, bad hyperparameter, ...): exit code 2."""
    exit_code = 2


class Diverged(UserError):
    """Training produced a non-finite loss or weights: exit code 3."""
    exit_code = 3


class Stopped(UserError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM after writing a checkpoint: exit code 130 or 143."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError becomes a one-paragraph message on stderr and exit code 2 (3 when
    training diverged)."""
    first = os.environ.get('RANK', '0') == '0'        # under torchrun, only the first process speaks
    code = 0
    try:
        main(argv)
        if distributed():
            dist.barrier()                # every process done: leave together
    except UserError as e:
        if first:
            print(e if isinstance(e, Stopped) else f'error: {e}', file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        if first:
            print('interrupted: the last checkpoint written is intact; continue with --resume RUN', file=sys.stderr)
        code = 130
    if dist.is_available() and dist.is_initialized():
        # Under torchrun, leave without tearing the process group down: a gloo group destroyed while a
        # peer is still closing its own sometimes aborts that peer ('terminate called without an active
        # exception', seen about once in ten 2-process runs here). Every file is written and closed.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


# ----------------------------------------------------------------------------------------------------
# Hyperparameters: plain values at the top of each script, and the run options every script shares
# ----------------------------------------------------------------------------------------------------

# The run options of every script, declared once: name -> (default, help). A script gives one another
# default by assigning it at its top with its hyperparameters (train_sla.py: `batch_size = 128`).
RUN_OPTIONS = {
    'data_root': ('dataset', 'data root: the official files (the synthetic stand-in lives in <data_root>/synthetic)'),
    'batch_size': (100, 'images per step'),
    'seed': (0, 'seeds the weights, the data splits and the data streams'),
    'device': ('auto', "auto, cpu, cuda, cuda:N or mps (the original's --gpu means cuda)"),
    'amp': (False, "fast path: bf16 autocast (off: the papers' float32)"),
    'channels_last': (False, 'fast path: channels-last memory format'),
    'compile': (False, 'fast path: torch.compile the forward passes'),
    'tf32': (True, "CUDA float32: true leaves PyTorch's default (cuDNN convolutions may use TF32 tensor cores, "
                   'matmuls stay float32); false: strict float32 (TF32 off for convolutions and matmuls)'),
    'synthetic': (False, 'train on the synthetic stand-in instead of the real dataset'),
    'synthetic_size': ('small', "small: the quick stand-in; full: the real datasets' sizes (CIFAR 50,000 / 10,000, "
                                'SVHN 73,257 / 26,032), in <data_root>/synthetic-full'),
    'download': (False, 'fetch the official files (md5-checked) if they are not in data_root'),
    'logdir': ('logs', 'runs go to <logdir>/<script>/<run_name>/'),
    'run_name': ('', 'name of the run folder (default: the date and time)'),
    'run_dir': ('', 'the run folder itself, instead of <logdir>/<script>/<run_name>'),
    'resume': ('', 'a run folder (or a run name under <logdir>/<script>/) to continue from its checkpoint'),
    'progress': (True, 'a progress line between log lines (a tqdm bar on a terminal, plain lines otherwise)'),
    'progress_every': (30.0, 'seconds between plain progress lines when the output is not a terminal'),
    'tensorboard': (False, 'also write every logged number as a TensorBoard scalar into the run folder'),
    'sync_bn': (False, 'under torchrun: batch norm over the global batch (SyncBatchNorm) instead of each process\'s'),
    'dist_backend': ('auto', 'under torchrun: auto (nccl on CUDA, gloo on CPU), nccl or gloo'),
    'dist_timeout': (30, 'under torchrun: minutes a collective may wait for the other processes before the job stops'),
    'local_rank': (-1, 'set by torch.distributed.launch (--local-rank=K); read from LOCAL_RANK otherwise'),
}

# The originals' spellings of one setting, accepted wherever a script has that setting, so their
# command lines run unchanged. `--name-with-dashes` is accepted for every name anyway.
ALIASES = {
    'data_root': ['--datadir', '--data-path', '--data_path', '--data'],
    'batch_size': ['--batchsize'],
    'weight_decay': ['--wd'],
    'total_steps': ['--num-iterations', '--num_iterations'],
    'eval_every': ['--val-freq', '--val_freq', '--test-freq', '--test_freq'],
    'run_dir': ['--save-path', '--save_path'],
    'architecture': ['-a'],
    'temperature': ['--T'],
}

# Options that act on one invocation only: never saved in config.json, so never inherited by --resume.
TRANSIENT = ('resume', 'eval_only', 'local_rank')


def _parse_int_list(text):
    """'5,5,5', '[2, 3, 4]' or '5x20' (twenty fives) -> list of ints."""
    clean = text.strip().strip('[]()').replace(' ', '')
    try:
        if 'x' in clean and ',' not in clean:
            value, count = clean.split('x')
            return [int(value)] * int(count)
        return [int(v) for v in clean.split(',') if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a list of integers such as 5,5,5 or [2,3,4] or 5x20 '
                                          f'(twenty fives), got {text!r}') from None


def _parse_bool(text):
    low = str(text).lower()
    if low in ('1', 'true', 'yes', 'on'):
        return True
    if low in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


class Hyperparameters(dict):
    """name -> default value, plus .helps: name -> the comment written after it in the script."""
    helps = {}


def _is_hyperparameter(name, value):
    return (name.islower() and not name.startswith('_') and type(value) in (bool, int, float, str, list)
            and all(type(v) is int for v in (value if type(value) is list else [])))


def hyperparameters(namespace):
    """A script's hyperparameters: every plain lowercase value (bool, int, float, str, list of ints)
    defined in `namespace` (the script's globals() right after its block of values), with the comment
    that follows each on its line as its --help text."""
    out = Hyperparameters((k, v) for k, v in namespace.items() if _is_hyperparameter(k, v))
    helps = {}
    try:
        with open(namespace['__file__']) as f:
            for line in f:
                m = re.match(r'^([A-Za-z_]\w*)\s*=.*?#\s*(.+)$', line.rstrip())
                if m and m.group(1) in out:
                    helps[m.group(1)] = m.group(2).replace('%', '%%')
    except (KeyError, OSError):
        pass
    out.helps = helps
    return out


def parse_config(hyper, argv=None, description='', choices=None):
    """The command line of a script: its hyperparameters (name -> default, from `hyperparameters()`)
    and the shared RUN_OPTIONS (a script's own value of one of those is its default there).

    Each name is `--name` and `--name-with-dashes`, plus its ALIASES. A boolean that defaults to False
    is a plain flag (`--synthetic`); every boolean also takes `--name true|false`. Lists of ints take
    '5,5,5', '[2,3,4]' or '5x20'. `choices`: name -> allowed values. Returns (namespace, the set of names
    given on this command line)."""
    choices = choices or {}
    helps = getattr(hyper, 'helps', {})
    parser = argparse.ArgumentParser(description=description)
    groups = {'method': parser.add_argument_group('hyperparameters'),
              'run': parser.add_argument_group('run options (shared by every script)')}
    values = {k: v for k, v in hyper.items() if k not in RUN_OPTIONS}
    values.update({k: hyper.get(k, default) for k, (default, _) in RUN_OPTIONS.items()})
    for name, default in values.items():
        flags = [f'--{name}'] + ([f'--{name.replace("_", "-")}'] if '_' in name else []) + ALIASES.get(name, [])
        text = helps.get(name) or RUN_OPTIONS.get(name, (None, ''))[1]
        kw = dict(dest=name, default=default, help=(text + ' ' if text else '') + '(default: %(default)s)')
        if name in choices:
            kw['choices'] = choices[name]
        if isinstance(default, bool):
            kw.update(type=_parse_bool, nargs='?', const=True, metavar='BOOL')
        elif isinstance(default, list):
            kw.update(type=_parse_int_list, metavar='LIST')
        else:
            kw.update(type=type(default))
        groups['run' if name in RUN_OPTIONS else 'method'].add_argument(*flags, **kw)
    groups['run'].add_argument('--gpu', dest='device', action='store_const', const='cuda',
                               help="the original's flag: the same as --device cuda")
    args = parser.parse_args(argv)
    # Which names did the user type? Parse again with every default suppressed.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    return args, given


def check_positive(cfg, *names, allow_zero=()):
    """Each named value > 0 (>= 0 for those in allow_zero); else a UserError naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and name not in allow_zero):
            need = 'at least 0' if name in allow_zero else 'positive'
            raise UserError(f'--{name} must be {need}, got {value}.')


def stand_in(cfg):
    """What the data calls take as `synthetic`: False, 'small' or 'full'."""
    return cfg.synthetic and cfg.synthetic_size


def check_choices(cfg, choices):
    """Every value in its allowed list (also for values a resumed run brings from its config.json)."""
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f'--{name} {getattr(cfg, name)!r} is not one of: {", ".join(map(str, allowed))}.')


# ----------------------------------------------------------------------------------------------------
# Seeding and devices
# ----------------------------------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_tf32(tf32):
    """The run option --tf32. True leaves PyTorch's settings as they are (its default: cuDNN convolutions
    may run float32 on TF32 tensor cores, about 10 mantissa bits, on CUDA GPUs since Ampere; matmuls stay
    float32). False: strict float32, TF32 off for cuDNN convolutions and matmuls. No effect on the CPU."""
    if not tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision('highest')


def pick_device(name='auto'):
    """'auto' -> cuda, else mps, else cpu. Anything torch.device accepts is allowed ('cuda:1')."""
    if name in (None, '', 'auto'):
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name!r} was asked for (--device cuda, or the original\'s --gpu) but this '
                        'PyTorch sees no CUDA GPU: drop --gpu, or use --device cpu (or auto).')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UserError(f'device {name!r} was asked for but MPS is not available here; use --device cpu.')
    return device


# ----------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------

def scaled(channels, width):
    return max(1, int(round(channels * width)))


class VGG16(nn.Module):
    """The VGG-16 with batch norm of the MAXL code: five blocks of 2-2-3-3-3 conv3x3-BN-ReLU, each
    closed by a 2x2 max-pool, then one Linear-ReLU-Linear head per task.

    `heads` maps head names to class counts, e.g. {'classifier': 20} (Single, the label generator) or
    {'classifier1': 20, 'classifier2': 100} (Human, MAXL's multi-task network). forward() returns the
    heads' logits in that order (a tensor if there is one head, else a tuple); the softmax of the
    original heads is applied by the caller. At width 1 the parameter names and shapes equal the
    original's (block1.0.weight, ..., classifier1.2.bias), so its state_dicts load.
    `init` is 'xavier_uniform' (the multi-task networks) or 'xavier_normal' (the label generator).
    """

    def __init__(self, heads, width=1.0, init='xavier_uniform'):
        super().__init__()
        filters = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
        convs = [2, 2, 3, 3, 3]
        in_ch = 3
        for b, (out_ch, n) in enumerate(zip(filters, convs), start=1):
            layers = []
            for i in range(n):
                layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, kernel_size=3, padding=1),
                           nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            setattr(self, f'block{b}', nn.Sequential(*layers))
            in_ch = out_ch
        self.head_names = list(heads)
        for name, n_classes in heads.items():
            setattr(self, name, nn.Sequential(nn.Linear(filters[-1], filters[-1]), nn.ReLU(inplace=True),
                                              nn.Linear(filters[-1], n_classes)))
        weight_init = {'xavier_uniform': nn.init.xavier_uniform_, 'xavier_normal': nn.init.xavier_normal_}[init]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                weight_init(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        for b in range(1, 6):
            x = getattr(self, f'block{b}')(x)
        return x.flatten(1)

    def forward(self, x):
        h = self.features(x)
        out = tuple(getattr(self, name)(h) for name in self.head_names)
        return out[0] if len(out) == 1 else out


# ---- CIFAR ResNets (SLA) ----

class DownsampleA(nn.Module):
    """Option-A shortcut (He et al. 2016): keep every second row and column, then append zero channels
    (after the real ones) up to the block's width. No parameters."""

    def __init__(self, extra_channels):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return torch.cat([x, x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])], dim=1)


class ResNetBasicBlock(nn.Module):
    """Post-activation basic block: relu(shortcut(x) + bn_b(conv_b(relu(bn_a(conv_a(x))))))."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv_a = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(channels)
        self.downsample = DownsampleA(channels - in_channels) if stride != 1 or in_channels != channels else None

    def forward(self, x):
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = self.bn_b(self.conv_b(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y, inplace=True)


CRESNET_DEPTHS = {f'cresnet{d}': d for d in (20, 32, 44, 56, 110)}


class HeadsOnTrunk(nn.Module):
    """A trunk `base_model` (images -> pooled features) with one linear head per output in `classifiers`:
    features() gives the features, forward() the heads' logits (a tensor for one head, else a tuple)."""

    def features(self, x):
        return self.base_model(x)

    def forward(self, x):
        h = self.features(x)
        out = tuple(head(h) for head in self.classifiers)
        return out[0] if len(out) == 1 else out


class CifarResNet(HeadsOnTrunk):
    """The CIFAR ResNet of the SLA code (ResNet-20/32/44/56/110): conv3x3(16)-BN-ReLU, three stages of
    (depth - 2) / 6 basic blocks with 16, 32, 64 channels (stages 2 and 3 start with stride 2 and the
    option-A shortcut), global average pooling, then one linear head per entry of `heads`.

    Convolutions ~ N(0, sqrt(2 / (9 * out_channels))), batch norm weight 1 / bias 0, heads with PyTorch's
    default Linear init, as the original. At width 1 the parameter names equal the original's without
    its DataParallel prefix (base_model.0.weight, base_model.3.0.conv_a.weight, ..., classifiers.0.weight),
    so its state_dicts load. features() gives the pooled features; forward() the heads' logits (a tensor
    if there is one head, else a tuple).
    """

    def __init__(self, depth, heads, width=1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f'a CIFAR ResNet needs depth 6k+2 (20, 32, 44, 56, 110), got {depth}.')
        k = (depth - 2) // 6
        c = scaled(16, width)                       # stages: c, 2c, 4c (exact doubling at any width)
        stages, in_ch = [], c
        for out_ch, stride in ((c, 1), (2 * c, 2), (4 * c, 2)):
            blocks = [ResNetBasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(k)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.base_model = nn.Sequential(nn.Conv2d(3, c, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * c
        for m in self.base_model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.classifiers = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in heads)



def cifar_resnet(name, heads, width=1.0):
    """'cresnet32' etc. with the given head sizes."""
    if name not in CRESNET_DEPTHS:
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(CRESNET_DEPTHS)}.')
    return CifarResNet(CRESNET_DEPTHS[name], heads, width)



# ---- torchvision's ImageNet ResNets (SLA and MetaSemi on the large datasets) ----

TORCHVISION_RESNETS = ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
                       'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2']


def torchvision_resnet(name, num_classes, width=1.0):
    """torchvision's ResNet / ResNeXt / Wide ResNet `name`, from scratch (no pretrained weights), as the
    originals build it. width < 1 scales every layer's channels (quick CPU runs and tests); width 1 is
    torchvision's network itself (its parameter names, init and state_dicts)."""
    from torchvision.models import resnet
    if name not in TORCHVISION_RESNETS:
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(TORCHVISION_RESNETS)}.')
    if width == 1:
        return resnet.__dict__[name](num_classes=num_classes)
    ref = resnet.__dict__[name](num_classes=1)          # its block type, depths, groups and group width

    class Scaled(resnet.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:                             # the first stage takes the (scaled) stem's channels
                self.inplanes = scaled(64, width)
            return super()._make_layer(block, scaled(planes, width), blocks, stride, dilate)

    block = type(ref.layer1[0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                  # a layer narrowed to nothing is refused below
        net = Scaled(block, [len(ref.layer1), len(ref.layer2), len(ref.layer3), len(ref.layer4)], num_classes,
                     groups=ref.groups, width_per_group=ref.base_width)
    if any(p.numel() == 0 for p in net.parameters()):
        raise UserError(f'--width {width} narrows some layer of {name} to no channels (its groups are '
                        f'{ref.groups} x {ref.base_width}): use a larger --width.')
    stem = scaled(64, width)
    net.conv1, net.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
    nn.init.kaiming_normal_(net.conv1.weight, mode='fan_out', nonlinearity='relu')
    net.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes)
    return net


class ImageNetResNet(HeadsOnTrunk):
    """A torchvision ResNet's trunk (conv1 .. layer4, global average pooling) with one linear head per entry
    of `heads`, as the SLA code re-wraps torchvision's networks; the interface of CifarResNet."""

    def __init__(self, name, heads, width=1.0):
        super().__init__()
        net = torchvision_resnet(name, 1, width)
        self.base_model = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                        net.layer4, net.avgpool, nn.Flatten())
        self.feature_dim = net.fc.in_features
        self.classifiers = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in heads)



# ---- ConvLarge (MetaSemi) ----

def conv_bn_lrelu(in_ch, out_ch, kernel, padding):
    """Conv (no bias) -> BatchNorm -> LeakyReLU(0.1): one ConvLarge block."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, 1, padding, bias=False), nn.BatchNorm2d(out_ch),
                         nn.LeakyReLU(0.1, inplace=True))


class ConvLarge(nn.Module):
    """The 13-layer ConvLarge of the MetaSemi code: 3x(3x3, 128) - pool - 3x(3x3, 256) - pool - 3x3 512
    (no padding) - 1x1 256 - 1x1 128 - global average pool - linear. Each block is conv-BN-LeakyReLU(0.1);
    with `stochastic`, channel dropout (Dropout2d, p=0.5) follows each max-pool. PyTorch default init.
    At width 1 the parameter names and shapes are the original's (block1.0.weight, ..., classifier.0.bias),
    so its state_dicts load; `width` scales every channel count for quick runs."""

    def __init__(self, num_classes=10, width=1.0, stochastic=True):
        super().__init__()
        c1, c2, c3 = scaled(128, width), scaled(256, width), scaled(512, width)
        specs = [(3, c1, 3, 1), (c1, c1, 3, 1), (c1, c1, 3, 1),
                 (c1, c2, 3, 1), (c2, c2, 3, 1), (c2, c2, 3, 1),
                 (c2, c3, 3, 0), (c3, c2, 1, 0), (c2, c1, 1, 0)]
        for i, spec in enumerate(specs, start=1):
            setattr(self, f'block{i}', conv_bn_lrelu(*spec))
        pool = [nn.MaxPool2d(2, 2)] + ([nn.Dropout2d(0.5)] if stochastic else [])
        self.maxpool = nn.Sequential(*pool)              # one module, used after block 3 and block 6
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c1, num_classes))
        self.feature_dim = c1

    def features(self, x):
        """The globally averaged 128-d feature before the classifier (the paper's Figure 3 embeds it)."""
        for i in range(1, 10):
            x = getattr(self, f'block{i}')(x)
            if i in (3, 6):
                x = self.maxpool(x)
        return self.avg_pool(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


class _Shake(torch.autograd.Function):
    """Shake-shake mixing: forward a*g + b*(1-g) with a per-sample gate g ~ U(0,1) in training (0.5 in
    eval); backward with a fresh, independent U(0,1) gate, in eval mode too (as the original)."""

    @staticmethod
    def forward(ctx, a, b, training):
        shape = (a.shape[0],) + (1,) * (a.dim() - 1)
        gate = torch.rand(shape, dtype=a.dtype, device=a.device) if training else a.new_full(shape, 0.5)
        return a * gate + b * (1 - gate)

    @staticmethod
    def backward(ctx, grad):
        gate = torch.rand((grad.shape[0],) + (1,) * (grad.dim() - 1), dtype=grad.dtype, device=grad.device)
        return grad * gate, grad * (1 - gate), None


class ShiftConvDownsample(nn.Module):
    """Stride-2 shortcut: the two diagonal pixel sub-grids side by side, ReLU, grouped 1x1 conv, BN."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(2 * in_ch, out_ch, kernel_size=1, groups=2)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        x = torch.cat((x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]), dim=1)
        return self.bn(self.conv(self.relu(x)))


class ShakeShakeBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1, downsample=None):
        super().__init__()
        for branch in 'ab':
            setattr(self, f'conv_{branch}1', nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False))
            setattr(self, f'bn_{branch}1', nn.BatchNorm2d(out_ch))
            setattr(self, f'conv_{branch}2', nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False))
            setattr(self, f'bn_{branch}2', nn.BatchNorm2d(out_ch))
        self.downsample = downsample

    def branch(self, x, name):
        h = getattr(self, f'bn_{name}1')(getattr(self, f'conv_{name}1')(F.relu(x)))
        return getattr(self, f'bn_{name}2')(getattr(self, f'conv_{name}2')(F.relu(h)))

    def forward(self, x):
        mixed = _Shake.apply(self.branch(x, 'a'), self.branch(x, 'b'), self.training)
        return (x if self.downsample is None else self.downsample(x)) + mixed


class ShakeShake26(nn.Module):
    """Shake-shake-26 2x96d with shift-conv downsampling (the MetaSemi code's second architecture):
    conv3x3 stem (16), three stages of 4 shake-shake blocks (96, 192, 384 channels; stride 2 at stages
    2 and 3), 8x8 average pool, linear. Conv init N(0, sqrt(2 / (k*k*out))). Names match the original's."""

    def __init__(self, num_classes=10, width=1.0):
        super().__init__()
        stem, ch = scaled(16, width), scaled(96, width)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        in_ch = stem
        for i, (out_ch, stride) in enumerate(((ch, 1), (2 * ch, 2), (4 * ch, 2)), start=1):
            if stride == 1 and in_ch != out_ch:
                down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            else:
                down = ShiftConvDownsample(in_ch, out_ch) if stride == 2 else None
            blocks = [ShakeShakeBlock(in_ch, out_ch, stride, down)] + [ShakeShakeBlock(out_ch, out_ch) for _ in range(3)]
            setattr(self, f'layer{i}', nn.Sequential(*blocks))
            in_ch = out_ch
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def semi_network(architecture, num_classes, width=1.0):
    """'convlarge' or 'shakeshake' (shake-shake-26), as the MetaSemi code's -a."""
    if architecture == 'convlarge':
        return ConvLarge(num_classes, width)
    if architecture == 'shakeshake':
        return ShakeShake26(num_classes, width)
    raise UserError(f'unknown architecture {architecture!r}: use convlarge or shakeshake.')



# ----------------------------------------------------------------------------------------------------
# Losses of the MAXL code (all on probabilities, as the original)
# ----------------------------------------------------------------------------------------------------

def focal_loss(probs, target):
    """Per-sample focal-style loss of MAXL: -sum_c t_c (1 - p_c)^2 log(p_c + 1e-20).

    `target` is either class indices (one-hot targets) or a soft target of the same shape as probs.
    """
    if target.dtype in (torch.int64, torch.int32):
        logp = torch.log(probs.gather(1, target[:, None]) + 1e-20)
        p = probs.gather(1, target[:, None])
        return (-(1 - p) ** 2 * logp).squeeze(1)
    return torch.sum(-target * (1 - probs) ** 2 * torch.log(probs + 1e-20), dim=1)


def accuracy_count(logits_or_probs, target):
    """Number of rows whose argmax is the target, as a float32 tensor (summed on the device)."""
    return (logits_or_probs.argmax(1) == target).sum().float()


def topk_count(logits, target, k=5):
    """Number of rows whose target is among the k largest scores (top-k accuracy x rows), float32 on the
    device; ties are broken as torch.topk breaks them."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == target[:, None]).any(1).sum().float()


@torch.no_grad()
def evaluate_heads(net, data, levels, batch_size):
    """Eval-mode pass over `data`: [mean focal loss, accuracy] for each of the first len(levels) heads,
    head k scored against label column levels[k]."""
    net.eval()
    sums = torch.zeros(2 * len(levels), device=data.device)
    for x, labels in data.batches(batch_size):
        outs = net(x)
        outs = (outs,) if torch.is_tensor(outs) else outs
        for k, level in enumerate(levels):
            y = labels[:, level]
            sums[2 * k] += focal_loss(F.softmax(outs[k], dim=1), y).sum()
            sums[2 * k + 1] += accuracy_count(outs[k], y)
    net.train()
    return (all_reduce_sum(sums) / len(data)).tolist()          # under torchrun: over every process's share


# ----------------------------------------------------------------------------------------------------
# Meta-gradient helpers
# ----------------------------------------------------------------------------------------------------

def forward_with(model, params, x, buffers=None):
    """Run `model` with the given parameter tensors (a dict name -> tensor) without touching its own.

    Batch-norm running statistics are written into *clones* of the model's buffers, so a virtual
    forward never moves the real statistics (torch.func.functional_call writes into what it is given).
    """
    if buffers is None:
        buffers = {k: v.clone() for k, v in model.named_buffers()}
    return functional_call(model, (params, buffers), (x,))


# ----------------------------------------------------------------------------------------------------
# Fast paths (opt-in; all off by default, so a default run is the papers' plain float32 eager run)
# ----------------------------------------------------------------------------------------------------

def _float32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    return out


def _fast_method(inner, device, amp, channels_last):
    def method(x, *args, **kwargs):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = inner(x, *args, **kwargs)
        return _float32(out) if amp else out
    return method


def fast_module(net, device, amp=False, channels_last=False, compile=False, methods=('forward',)):
    """Apply the opt-in fast paths to `net` in place; its parameters, names, state_dict and the
    meta-gradient code (forward_with) are unchanged. Each of `methods` (a batch of images first) gets
    channels-last inputs and runs under bf16 autocast with its floating outputs cast back to float32,
    so every loss is computed in float32; with `compile` it is torch.compile'd. Each method is built in
    its variants (with and without autocast, compiled or not): `float32_meta(net)` runs the ones without
    autocast (the meta steps), `eager(net)` the uncompiled ones (a double backward). With every flag
    off, `net` is untouched."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if not (amp or channels_last or compile):
        return net
    variants = {}
    for name in methods:
        inner = getattr(net, name)
        variants[name] = {}
        for use_amp in {amp, False}:
            method = _fast_method(inner, device, use_amp, channels_last) if use_amp or channels_last else inner
            for compiled in {compile, False}:
                variants[name][use_amp, compiled] = torch.compile(method) if compiled else method
    net.__dict__['_fast_paths'] = {'variants': variants, 'mode': (amp, compile)}
    _use_variant(net, amp, compile)
    return net


def _use_variant(net, amp, compiled):
    paths = net.__dict__['_fast_paths']
    paths['mode'] = (amp, compiled)
    for name, variants in paths['variants'].items():
        net.__dict__[name] = variants[amp, compiled]


@contextlib.contextmanager
def _variant(nets, amp=None, compiled=None):
    """Inside: the fast-path modules among `nets` run their methods with autocast and/or compilation
    switched as given (None: as they are); the previous variant is back after."""
    held = [n for n in nets if '_fast_paths' in n.__dict__]
    saved = [n.__dict__['_fast_paths']['mode'] for n in held]
    try:
        for n, (a, c) in zip(held, saved):
            _use_variant(n, a if amp is None else amp, c if compiled is None else compiled)
        yield
    finally:
        for n, (a, c) in zip(held, saved):
            _use_variant(n, a, c)


def eager(*nets):
    """Context manager: inside it the given modules run their uncompiled methods (second-order MAXL
    differentiates through a gradient, which torch.compile cannot do)."""
    return _variant(nets, compiled=False)


@contextlib.contextmanager
def strict_float32():
    """Inside: strict float32 on CUDA (TF32 off for cuDNN convolutions and matmuls, as --tf32 false),
    whatever the run's --tf32 says; the previous settings are back after. No effect on the CPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def float32_meta(*nets, strict=False):
    """Context manager for a meta step: inside it `nets` compute in float32 whatever --amp says (their
    methods without autocast, and any autocast region around switched off), and with `strict` in strict
    float32 whatever --tf32 says (strict_float32). A meta-gradient taken by finite differences perturbs
    each weight by a few millionths of itself: bf16 (8 mantissa bits) or TF32 (10) rounding of the
    perturbed weights would swallow the difference it measures."""
    device_types = {p.device.type for n in nets for p in n.parameters()} or {'cpu'}
    with contextlib.ExitStack() as stack:
        for kind in device_types:
            stack.enter_context(torch.autocast(kind, enabled=False))
        stack.enter_context(_variant(nets, amp=False))
        if strict:
            stack.enter_context(strict_float32())
        yield


# ----------------------------------------------------------------------------------------------------
# Several processes: torchrun (or torch.distributed.launch) with DistributedDataParallel
# ----------------------------------------------------------------------------------------------------

def dist_env():
    """(rank, local rank, world size) from the variables torchrun sets; (0, 0, 1) for a plain run."""
    return (int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0')),
            int(os.environ.get('WORLD_SIZE', '1')))


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t):
    """The sum over processes, in place (returned); a no-op in a single process."""
    if distributed():
        dist.all_reduce(t)
    return t


def all_reduce(tensors, mean=False):
    """Each tensor replaced in place by its sum (or mean) over processes, in one collective; returned.
    A no-op in a single process."""
    tensors = list(tensors)
    if distributed() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        if mean:
            flat /= dist.get_world_size()
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors


def all_reduce_mean(tensors):
    return all_reduce(tensors, mean=True)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes, in both modes: the gradient with respect to one process's input
    is the sum of every process's output gradient, and a tangent is summed like a value. (Built on
    dist.all_reduce; used by SyncBatchNorm and MAXL's meta-gradient, which need double backward and
    forward-mode AD through it.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        tangent = tangent.clone()
        dist.all_reduce(tangent)
        return tangent


def differentiable_sum(x):
    """Sum of x over processes with gradients (and tangents) flowing back to every process."""
    return _AllReduceSum.apply(x) if distributed() else x


class SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training-mode statistics are those of the global batch (all processes): mean and
    biased variance from sums all-reduced with differentiable_sum, so it supports backward, double
    backward and forward-mode AD (torch.nn.SyncBatchNorm supports only a first backward, and MAXL's
    meta-gradient needs more). The same parameters, buffers and names as BatchNorm2d; in eval mode, or in
    a single process, it is BatchNorm2d."""

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = differentiable_sum(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = differentiable_sum(x.sum(dims)) / count
        centred = x - mean.view(1, -1, *[1] * (x.dim() - 2))
        var = differentiable_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_bn(net):
    """Every BatchNorm2d of `net` replaced by a SyncBatchNorm holding the same tensors (same names)."""
    for name, child in net.named_children():
        if type(child) is nn.BatchNorm2d:
            like = child.weight if child.affine else child.running_mean
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=like.device, dtype=like.dtype)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(net, name, sync)
        else:
            convert_sync_bn(child)
    return net


class Call(nn.Module):
    """Holds a network so that DistributedDataParallel sees one forward for any computation on it:
    Call(net)(*args, fn=f) is f(net, *args); without fn, net(*args)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, fn=None):
        return self.net(*args) if fn is None else fn(self.net, *args)


def wrap_ddp(net, device, sync_buffers=True):
    """Wrapped(net) through DistributedDataParallel over Call(net) (the process group must exist);
    sync_buffers: copy the first process's buffers at each forward."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == 'cuda' else None
    new_name = 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters   # torch >= 2.13
    buffers = {'forward_sync_buffers' if new_name else 'broadcast_buffers': sync_buffers}
    return Wrapped(net, DistributedDataParallel(Call(net), device_ids=ids, **buffers))


class Wrapped:
    """What run.wrap returns: w(x) is net(x), w.call(fn, *args) is fn(net, *args); under torchrun both go
    through DistributedDataParallel, so the next backward averages the gradients over processes."""

    def __init__(self, net, ddp=None):
        self.net, self.ddp = net, ddp

    def __call__(self, *args):
        return self.net(*args) if self.ddp is None else self.ddp(*args)

    def call(self, fn, *args):
        return fn(self.net, *args) if self.ddp is None else self.ddp(*args, fn=fn)


# ----------------------------------------------------------------------------------------------------
# Runs: folder, log, metrics, best and latest checkpoints, resume
# ----------------------------------------------------------------------------------------------------

# Data streams: stream k of a run (epoch k, or pass k over a pool) draws from a generator seeded with
# seed * STREAM_STRIDE + k. The stride is a prime above any epoch or pass count a run reaches, so two
# (seed, k) pairs never share a stream; a resumed run rebuilds stream k from these two integers alone.
# Changing it changes every run's data order (tests/test_pinned_runs.py would say so).
STREAM_STRIDE = 1_000_003


def stream_seed(seed, k):
    return int(seed) * STREAM_STRIDE + int(k)


def device_generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def make_run_dir(logdir, script, run_name=''):
    """A new, never reused folder logs/<script>/<run>/; an unwritable place is a UserError."""
    base = os.path.join(logdir, script)
    stamp = run_name or datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    try:
        os.makedirs(base, exist_ok=True)
        for k in range(1000):
            path = os.path.join(base, stamp if k == 0 else f'{stamp}-{k}')
            try:
                os.makedirs(path)
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f'cannot create the run folder under {base!r} ({e.strerror}); '
                        'choose a writable place with --logdir DIR.') from None
    raise UserError(f'too many runs named {stamp!r} under {base!r}; pick another --run_name.')


def open_run_dir(path):
    """A run folder named by the user (created if missing); one that already holds a run is refused."""
    if os.path.isfile(os.path.join(path, Run.CHECKPOINT)):
        raise UserError(f'{path!r} already holds a run (it has a {Run.CHECKPOINT}): continue it with '
                        f'--resume {path}, or choose another folder.')
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the run folder {path!r} ({e.strerror}); choose a writable place.') from None
    return path


def resolve_run_dir(resume, logdir, script):
    """--resume takes a run folder path or a run name under logs/<script>/."""
    candidates = list(dict.fromkeys((resume, os.path.join(logdir, script, resume))))
    for path in candidates:
        if os.path.isfile(os.path.join(path, Run.CHECKPOINT)):
            return path
    for path in candidates:
        if os.path.isfile(os.path.join(path, 'config.json')):
            raise UserError(f'cannot resume {path!r}: that run never saved a checkpoint (it stopped before its '
                            'first epoch or evaluation ended), so there is nothing to continue: start it again '
                            'without --resume.')
    elsewhere = ''.join(f' nor in {c!r}' for c in candidates[1:])
    raise UserError(f'cannot resume {resume!r}: no {Run.CHECKPOINT} there{elsewhere}. Give the run folder printed '
                    'when the run started (logs/<script>/<run>).')


def write_error(path, e):
    return UserError(f'cannot write {path} ({e.strerror or e}, errno {e.errno}): the previous file, if any, is '
                     'unchanged. Free space or fix the permissions of that folder (or choose another with '
                     '--logdir / --run_dir), then continue with --resume.')


def atomic_write(path, write):
    """write(f) into a temporary file, flush and fsync it, rename it over `path` and fsync the folder:
    readers see the old or the new file, never half of one, also after a power cut. On an OSError (disk
    full, permissions, read-only filesystem) the temporary file is removed, the old file is untouched,
    and a UserError names the path and the cause."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:               # also Ctrl-C: never leave a half-written temporary file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        if isinstance(e, RuntimeError):      # torch.save reports a failed write as a RuntimeError
            raise write_error(path, OSError(getattr(e, 'errno', None), str(e).splitlines()[0])) from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


class RunLog:
    """Prints lines and appends them to log.txt; appends rows to metrics.csv. Disabled (silent, writes
    nothing) in every process but the first of a torchrun job."""

    def __init__(self, run_dir, enabled=True, deferred=False):
        self.run_dir, self.enabled = run_dir, enabled
        self.log_path = os.path.join(run_dir, 'log.txt')
        self.csv_path = os.path.join(run_dir, 'metrics.csv')
        self.pending = [] if deferred else None     # lines printed, kept from log.txt until commit()

    def commit(self):
        lines, self.pending = self.pending or [], None
        for line in lines:
            self._append(line)

    def print(self, line):
        if not self.enabled:
            return
        print(line, flush=True)
        if self.pending is not None:
            self.pending.append(line)
        else:
            self._append(line)

    def _append(self, line):
        try:
            with open(self.log_path, 'a') as f:
                f.write(line + '\n')
        except OSError as e:
            raise write_error(self.log_path, e) from None

    def metrics(self, row):
        """Append a row: the whole file is rewritten atomically (a row is never half written)."""
        if not self.enabled:
            return
        old = open(self.csv_path, newline='').read() if os.path.exists(self.csv_path) else ''
        out = io.StringIO(newline='')
        writer = csv.DictWriter(out, fieldnames=list(row))
        if not old:
            writer.writeheader()
        writer.writerow(row)
        atomic_write_text(self.csv_path, old + out.getvalue())

    def save_config(self, config):
        if self.enabled:
            atomic_write_text(os.path.join(self.run_dir, 'config.json'), json.dumps(config, indent=2, sort_keys=True))


def rng_state():
    """The random states as tensors and plain values (so checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(state['python'][:1]) + (tuple(state['python'][1]),) + tuple(state['python'][2:]))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())       # a checkpoint loaded onto the device moved these
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def save_checkpoint(path, **state):
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device='cpu'):
    """A checkpoint of this code: tensors and plain Python values only, loaded with weights_only=True,
    so a file from elsewhere cannot run code on load; anything else is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read checkpoint {path!r} as tensors and plain values only ({type(e).__name__}: '
                        f'{first}). A checkpoint written by this code always can; a file that holds other '
                        'Python objects is refused, since loading it could run code. Point --resume at a run '
                        'folder written by this code.') from None


class Timer:
    def __init__(self, device):
        self.device = device
        self.start = time.perf_counter()

    def lap(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


class Meters:
    """Named running sums kept on the device (no host read inside a training loop). add(n, name=sum
    over n samples, ...); means() divides each by its sample count and reads them all at once. The
    first add that brought a non-finite value is noted on the device too (first_non_finite())."""

    NONE = 2 ** 62

    def __init__(self):
        self.sums, self.counts, self.adds, self.first_bad, self.names, self.index = {}, {}, 0, None, [], {}

    def add(self, n, **sums):
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + n
            if k not in self.names:
                self.names.append(k)
        finite = torch.stack([torch.isfinite(torch.as_tensor(v)).all() for v in sums.values()])
        keys = tuple(sums)
        if keys not in self.index:                                   # made once: no host copy per step
            self.index[keys] = torch.tensor([self.names.index(k) for k in keys], device=finite.device)
        codes = self.index[keys] + self.adds * 1000
        here = torch.where(finite, self.NONE, codes).min()          # this add's first bad value, or NONE
        self.first_bad = here if self.first_bad is None else torch.minimum(self.first_bad, here)
        self.adds += 1

    def first_non_finite(self):
        """None, or (k, name): the k-th add (from 0) brought a non-finite `name` first (under torchrun:
        the earliest over the processes). One host read."""
        if self.first_bad is None:
            return None
        code = self.first_bad.clone()
        if distributed():
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
        code = int(code)
        if code >= self.NONE:
            return None
        return code // 1000, self.names[code % 1000]

    def state_dict(self):
        return {'sums': dict(self.sums), 'counts': dict(self.counts), 'adds': self.adds,
                'first_bad': self.first_bad, 'names': list(self.names)}

    @classmethod
    def from_state(cls, state):
        """A Meters continued from state_dict() (a run stopped between two log lines), or a new one."""
        m = cls()
        if state:
            m.sums, m.counts, m.adds = dict(state['sums']), dict(state['counts']), state['adds']
            m.first_bad, m.names = state['first_bad'], list(state['names'])
        return m

    def means(self):
        """Under torchrun, over every process's samples (the same numbers on every process)."""
        if not self.sums:
            return {}
        if distributed():
            sums = all_reduce_sum(torch.stack([v.float() for v in self.sums.values()]))
            counts = all_reduce_sum(torch.tensor([float(c) for c in self.counts.values()], device=sums.device,
                                                 dtype=sums.dtype))
            return dict(zip(self.sums, (sums / counts).tolist()))
        return dict(zip(self.sums, torch.stack([v / self.counts[k] for k, v in self.sums.items()]).tolist()))


def duration(seconds):
    """'1:02:03' or '2:03' (h:mm:ss or m:ss)."""
    seconds = int(max(0, seconds) + 0.5)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """One stretch of work between two log lines (an epoch, an evaluation interval): on a terminal a
    tqdm bar (steps done / total, images/s, time left here and in the whole run); otherwise (a log file,
    CI) a plain line every `every` seconds, no control characters. Silent with --progress false and in
    every process but the first. The first stretch of a run also prints, once, the projected time of
    the whole run from its first steps."""

    def __init__(self, run, total, desc, images_per_step, done_before, run_total):
        self.run, self.total, self.desc, self.images = run, total, desc, images_per_step
        self.done_before, self.run_total, self.done = done_before, run_total, 0
        self.start = self.last_line = time.perf_counter()
        self.enabled = run.cfg.progress and run.rank == 0 and total > 0
        self.bar = None
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit='step', leave=False, dynamic_ncols=True)

    def update(self, n=1):
        if not self.enabled:
            return
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)                       # steps per second
        left_here = (self.total - self.done) / rate
        left_run = (self.run_total - self.done_before - self.done) / rate
        if not self.run.projected and (self.done == self.total or now - self.start >= 20):
            self.run.projected = True            # once: at the end of the first stretch, or after 20 s
            self.run.log.print(f'after {self.done} steps: {1 / rate:.3f} s/step, {rate * self.images:.0f} images/s: '
                               f'about {duration(left_run)} for the rest of the run')
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate * self.images:.0f} img/s, run {duration(left_run)} left', refresh=False)
            self.bar.update(n)
        elif now - self.last_line >= self.run.cfg.progress_every:
            self.last_line = now
            print(f'  {self.desc}: {self.done}/{self.total} steps, {rate * self.images:.0f} images/s, '
                  f'{duration(left_here)} left here, {duration(left_run)} left in the run', flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Run:
    """One training run: its configuration, device, folder, log, checkpoints and resume.

    A new run gets a new folder <logdir>/<script>/<run>/ (or --run_dir) holding config.json, log.txt,
    metrics.csv, checkpoint.pt (the latest state) and best.pt (the networks at the best evaluation).
    `--resume RUN` reopens a folder: the saved configuration is used, except the values typed on this
    command line (so `--resume RUN --epochs 300` extends a run), and restore() brings back every state.
    """

    CHECKPOINT, BEST = 'checkpoint.pt', 'best.pt'
    FORMAT = 2        # checkpoint layout; 1 (no 'format' key) is the layout before the shared skeleton

    def __init__(self, script, hyper, argv=None, description='', validate=None, choices=None, presets=None):
        self.script = script
        cfg, given = parse_config(hyper, argv, description, choices)
        self.resuming = bool(cfg.resume)
        if presets is not None and not self.resuming:
            presets(cfg, given)                 # a dataset's own defaults, for the values not typed
        if self.resuming:
            self.dir = resolve_run_dir(cfg.resume, cfg.logdir, script)
            self._check_written_by_us(os.path.join(self.dir, self.CHECKPOINT))
            with open(os.path.join(self.dir, 'config.json')) as f:
                saved = json.load(f)
            self.saved_config = saved
            merged = {k: saved.get(k, v) for k, v in vars(cfg).items()}
            merged.update({k: getattr(cfg, k) for k in given})
            cfg = argparse.Namespace(**merged)
        check_choices(cfg, (choices or {}) | {'synthetic_size': ['small', 'full']})
        if validate is not None:
            validate(cfg)                       # bad values stop here, before anything is written
        if cfg.tensorboard and importlib.util.find_spec('tensorboard') is None:
            raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or run '
                            'without --tensorboard; metrics.csv holds the same numbers).')
        self.cfg = cfg
        set_tf32(cfg.tf32)
        self.device = self._start_processes(cfg)
        if not self.resuming:                   # the first process makes the folder and tells the others
            if self.rank == 0:
                self.dir = open_run_dir(cfg.run_dir) if cfg.run_dir else make_run_dir(cfg.logdir, script,
                                                                                       cfg.run_name)
            if self.world > 1:
                shared = [getattr(self, 'dir', None)]
                dist.broadcast_object_list(shared, src=0)
                self.dir = shared[0]
        # A resumed run writes nothing (log line, config) until restore() has loaded every state.
        self.log = RunLog(self.dir, enabled=self.rank == 0, deferred=self.resuming)
        self.given = given
        if not self.resuming:
            self.save_config()
        seed_everything(cfg.seed)               # the same on every process: the same weights, streams, draws
        self.projected = False                  # the projected run time was printed (Progress)
        self.tb = None                          # TensorBoard writer (--tensorboard)
        self.best = None                        # the best evaluation so far: {position, score, kept columns}
        self.last = None                        # the latest metrics row
        self.timer = Timer(self.device)
        where = f'{self.dir} on {self.device}'
        if self.world > 1:
            where += (f', {self.world} processes ({self.backend}), batch {cfg.batch_size} per process = '
                      f'{cfg.batch_size * self.world} in all' + (', SyncBatchNorm' if cfg.sync_bn else ''))
        self.log.print(f'{"resuming" if self.resuming else "run"} {where}')
        self.stop_signal = None
        self._catch_signals()

    # ---- Ctrl-C and SIGTERM: stop at a consistent point, with a checkpoint ----

    def _catch_signals(self):
        """The first SIGINT or SIGTERM asks the run to stop at its next consistent point (see stop_if_asked);
        a second one quits at once, the last checkpoint written intact (every write is atomic)."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def ask(signum, frame):
            if self.stop_signal is not None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.rank == 0:
                print(f'\n{signal.Signals(signum).name}: stopping at the next consistent point with a checkpoint '
                      '(press Ctrl-C again to quit at once, keeping the last checkpoint)', file=sys.stderr, flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, ask)

    def stop_requested(self, step=0):
        """Whether to stop here. Under torchrun the processes agree, comparing every 20 steps (a host read)."""
        if self.world == 1:
            return self.stop_signal is not None
        if step % 20:
            return False
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.stop_signal is None:
            self.stop_signal = int(flag.item())
        return bool(flag.item())

    def stop_if_asked(self, objects=None, at=0, **extra):
        """At a consistent point (a step boundary): if a stop was asked, save the checkpoint (objects and
        `extra`: position, streams, running meters) unless objects is None (one was just written), and
        stop with the exact command that continues the run."""
        if not self.stop_requested(at):
            return
        if objects is not None:
            self.save(objects, best_keys=list(getattr(self, 'best_keys', ())), **extra)
        import signal
        name = signal.Signals(self.stop_signal).name
        raise Stopped(f'stopped by {name}; the checkpoint is written. Continue with: '
                      f'python {self.script}.py --resume {self.dir}', self.stop_signal)

    def _start_processes(self, cfg):
        """The device of this process; under torchrun also the process group (one process per device,
        nccl on CUDA, gloo on CPU). A setup that cannot work is refused here, before anything is written."""
        self.rank, self.local_rank, self.world = dist_env()
        if cfg.local_rank >= 0 and 'LOCAL_RANK' not in os.environ:      # an old launcher's --local_rank=K
            self.local_rank = cfg.local_rank
        self.shard = (self.rank, self.world)
        device = pick_device(cfg.device)
        self.backend = cfg.dist_backend if cfg.dist_backend != 'auto' else ('nccl' if device.type == 'cuda' else 'gloo')
        if self.world == 1:
            return device
        if self.backend == 'nccl' and device.type != 'cuda':
            raise UserError(f'--dist_backend nccl needs CUDA GPUs, but this process runs on {device}: use '
                            '--dist_backend gloo (or auto) on CPUs.')
        if device.type == 'cuda':
            visible = torch.cuda.device_count()
            if self.local_rank >= visible:
                raise UserError(f'this is local process {self.local_rank}, but only {visible} CUDA GPU(s) are '
                                f'visible: start at most --nproc_per_node {visible} processes per machine.')
            device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(device)
        if cfg.dist_timeout <= 0:
            raise UserError(f'--dist_timeout must be a positive number of minutes, got {cfg.dist_timeout}.')
        dist.init_process_group(self.backend, timeout=datetime.timedelta(minutes=cfg.dist_timeout))
        return device

    def share(self, rows):
        """This process's rows of a tensor holding one row per image of a global batch."""
        n = len(rows)
        return rows[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    # ---- networks under several processes ----

    def network(self, net, methods=('forward',)):
        """`net` on the run's device (with --sync_bn its batch norms synchronised across processes), with
        the opt-in fast paths of the run (--amp, --channels_last, --compile) applied to `methods`; with all
        of them off it is only moved. Under torchrun every process starts from the first one's tensors."""
        net.to(self.device)
        if self.cfg.sync_bn:
            convert_sync_bn(net)
        if self.world > 1:
            for t in net.state_dict().values():
                dist.broadcast(t, src=0)
        return fast_module(net, self.device, self.cfg.amp, self.cfg.channels_last, self.cfg.compile, methods)

    def sync_buffers(self, *nets):
        """Under torchrun without --sync_bn, each process's batch-norm statistics follow its own batches
        between the forwards through DistributedDataParallel (which copies the first process's at each
        forward): copy the first process's to all before anything that uses them (an evaluation,
        MetaSemi's eval-mode meta step), so every process computes with the same ones and a resumed run
        (which has the first process's) continues exactly."""
        if self.world > 1 and not self.cfg.sync_bn:
            buffers = [b for net in nets for b in net.buffers() if b.is_floating_point()]
            if buffers:
                flat = torch.cat([b.reshape(-1) for b in buffers])
                dist.broadcast(flat, src=0)
                for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                    b.copy_(part.view_as(b))

    def wrap(self, net):
        """The training forward of `net` (see Wrapped): under torchrun through DistributedDataParallel,
        which averages the gradients of the next backward over the processes. Buffers (batch-norm
        statistics) are broadcast from the first process at each forward, unless --sync_bn keeps them
        equal anyway."""
        return wrap_ddp(net, self.device, sync_buffers=not self.cfg.sync_bn) if self.world > 1 else Wrapped(net)

    def save_config(self):
        self.log.save_config({k: v for k, v in vars(self.cfg).items() if k not in TRANSIENT} | {'script': self.script})

    def _check_written_by_us(self, path):
        self._resumed = ckpt = load_checkpoint(path)       # kept: restore() uses it, the file is read once
        if ckpt.get('format') != self.FORMAT:
            raise UserError(f'{path} was written by an earlier version of this code (checkpoint format '
                            f'{ckpt.get("format", 1)}, now {self.FORMAT}): resume it with that version '
                            '(git checkout ff31508) or start a new run.')
        if ckpt.get('script') != self.script:
            raise UserError(f'{path} was written by {ckpt.get("script")}.py, not {self.script}.py: resume it '
                            f'with python {ckpt.get("script")}.py --resume {os.path.dirname(path)}.')

    # ---- data streams and time ----

    def stream(self, k):
        """A device generator for stream k of this run (epoch k's shuffles, crops and flips)."""
        return device_generator(self.device, stream_seed(self.cfg.seed, k))

    def epochs(self, last_done, total):
        """Epochs last_done + 1 .. total - 1, each with its data stream; the timer restarts at each."""
        for epoch in range(last_done + 1, total):
            self.timer = Timer(self.device)
            yield epoch, self.stream(epoch)

    # ---- checkpoints ----

    @property
    def checkpoint_path(self):
        return os.path.join(self.dir, self.CHECKPOINT)

    def save(self, objects, **extra):
        """Atomically save the state_dicts of `objects` (name -> network/optimiser/scheduler), the RNG
        states, the best evaluation and `extra` (position, data-stream state, ...). Only the first process
        writes (every process holds the same state)."""
        if self.rank != 0:
            return
        save_checkpoint(self.checkpoint_path, format=self.FORMAT, script=self.script,
                        state={k: v.state_dict() for k, v in objects.items()}, rng=rng_state(), best=self.best,
                        last=self.last, **extra)

    def restore(self, objects, **defaults):
        """On --resume: load the state_dicts into `objects`, the RNG states and the best evaluation, and
        return `defaults` updated with the saved extras. On a new run: return `defaults`."""
        if not self.resuming:
            return defaults
        ckpt, self._resumed = self._resumed, None
        try:
            for k, obj in objects.items():
                obj.load_state_dict(ckpt['state'][k])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise UserError(f'{self.checkpoint_path} does not fit the networks of this run ({type(e).__name__}: '
                            f'{first}); it was written with other settings (width, psi, mode, model, ...) than '
                            'the ones in its config.json. Nothing was written; start a new run instead.') from None
        set_rng_state(ckpt['rng'])
        self.best, self.last = ckpt['best'], ckpt['last']
        self._apply_typed_lr(objects)
        self.save_config()                       # the state fits: now the resumed run may write
        self.log.commit()
        self._reconcile_metrics(tuple(ckpt.get('best_keys', ())))
        skip = ('format', 'script', 'state', 'rng', 'best', 'last', 'best_keys')
        return defaults | {k: v for k, v in ckpt.items() if k not in skip}

    def _apply_typed_lr(self, objects):
        """`--resume RUN --lr X`: the saved learning rates of the main optimiser (and its schedule) are
        scaled by X / the saved --lr (the way to continue a diverged run with a lower rate)."""
        old = self.saved_config.get('lr')
        if 'lr' not in self.given or not old or old == self.cfg.lr or 'optimizer' not in objects:
            return
        factor = self.cfg.lr / old
        for group in objects['optimizer'].param_groups:
            group['lr'] *= factor
            if 'initial_lr' in group:
                group['initial_lr'] *= factor
        scheduler = objects.get('scheduler')
        if scheduler is not None:
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            scheduler._last_lr = [group['lr'] for group in objects['optimizer'].param_groups]
        self.log.print(f'note: --lr {self.cfg.lr:g} scales the saved learning rates by {factor:g}')

    def evaluate_and_save(self, objects, row, score, keep=(), lines=None, **extra):
        """The end of an epoch or evaluation interval. `row`: the metrics (plain numbers, accuracies as
        fractions), its first column the position (epoch, iteration or step). The best evaluation is
        kept on row[score] (higher is better) with the columns `keep`; then the lines of
        `lines(improved)` are printed, the row is appended to metrics.csv with best_<score> and
        best_<kept> columns, best.pt is written when the score improved (the networks among `objects`),
        and checkpoint.pt always (every object, RNG states, the best, `extra`). Returns `improved`."""
        position = next(iter(row))
        nets = [v for v in objects.values() if isinstance(v, nn.Module)]
        finite = torch.stack([torch.isfinite(p).all() for net in nets for p in net.parameters()]).all()
        bad = [k for k, v in row.items() if ('loss' in k or k.endswith('acc')) and isinstance(v, float)
               and not math.isfinite(v)]
        if not bool(finite) or bad:
            lr = next((g['lr'] for v in objects.values() if isinstance(v, torch.optim.Optimizer)
                       for g in v.param_groups), float('nan'))
            self.diverged(f'at {position} {row[position]} the ' + ('weights' if not bool(finite) else ', '.join(bad))
                          + ' became non-finite', lr)
        self.last = row
        improved = self.best is None or row[score] > self.best[score]
        if improved:
            self.best = {k: row[k] for k in (position, score, *keep)}
        for line in (lines(improved) if lines else ()):
            self.log.print(line)
        self.best_keys = (score, *keep)
        # best.pt, then checkpoint.pt, then the metrics row: a run killed between two of these writes is
        # resumed from checkpoint.pt, and restore() brings metrics.csv back in line with it.
        if improved and self.rank == 0:
            nets = {k: v.state_dict() for k, v in objects.items() if isinstance(v, nn.Module)}
            save_checkpoint(os.path.join(self.dir, self.BEST), format=self.FORMAT, script=self.script, state=nets,
                            best=self.best, row=row, config=vars(self.cfg))
        self.save(objects, best_keys=list(self.best_keys), **extra)
        self.log.metrics(self.metrics_row(row))
        self._tensorboard(self.metrics_row(row))
        return improved

    def metrics_row(self, row):
        return row | {f'best_{k}': self.best[k] for k in self.best_keys}

    def _reconcile_metrics(self, keys):
        """metrics.csv as the checkpoint knows it: rows after its position (written by a run killed after
        them, before its next checkpoint) dropped, its own row added if the kill came before it."""
        path = self.log.csv_path
        if self.rank != 0 or self.last is None:
            return
        position = next(iter(self.last))
        rows = list(csv.DictReader(open(path, newline=''))) if os.path.exists(path) else []
        keep = [r for r in rows if float(r[position]) <= float(self.last[position])]
        if keep and float(keep[-1][position]) == float(self.last[position]) and len(keep) == len(rows):
            return
        self.best_keys = keys
        full = keep + ([] if keep and float(keep[-1][position]) == float(self.last[position])
                       else [self.metrics_row(self.last)])
        out = io.StringIO(newline='')
        writer = csv.DictWriter(out, fieldnames=list(full[-1]))
        writer.writeheader()
        writer.writerows(full)
        atomic_write_text(path, out.getvalue())
        self.log.print(f'note: metrics.csv brought back to the checkpoint ({position} {self.last[position]})')

    def progress(self, total, desc, done_before, run_total, images_per_step=None):
        """A Progress for the next `total` steps (see Progress); images_per_step defaults to the global batch."""
        images = images_per_step or self.cfg.batch_size * self.world
        return Progress(self, total, desc, images, done_before, run_total)

    def describe(self, nets, data, total_steps, unit='steps'):
        """The start line: what will run, where, on how much."""
        dtype = 'bf16 autocast' if self.cfg.amp else 'float32'
        if self.device.type == 'cuda' and not self.cfg.amp:
            dtype += (' (cuDNN convolutions may use TF32; --tf32 false: strict)' if torch.backends.cudnn.allow_tf32
                      else ' (strict: TF32 off)')
        params = sum(p.numel() for net in nets for p in net.parameters())
        sizes = ', '.join(f'{k} {v:,}' for k, v in data.items())
        self.log.print(f'will run {total_steps:,} {unit} on {self.device} ({dtype}), {self.world} process(es), '
                       f'{params:,} parameters; images: {sizes}')

    def _tensorboard(self, row):
        if not self.cfg.tensorboard or self.rank != 0:
            return
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard '
                                '(or run without --tensorboard; metrics.csv has the same numbers).') from None
            self.tb = SummaryWriter(log_dir=os.path.join(self.dir, 'tensorboard'))
        position = next(iter(row))
        for k, v in row.items():
            if k != position and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, int(row[position]))
        self.tb.flush()

    def check_finite(self, meters, first_step, lr, unit='step'):
        """Stop the run (exit code 3) if `meters` saw a non-finite value: before anything is evaluated or
        written from these weights. first_step: the step of the meters' first add."""
        found = meters.first_non_finite()
        if found:
            k, name = found
            self.diverged(f'the training {name} became non-finite at {unit} {first_step + k}', lr)

    def diverged(self, what, lr):
        ckpt = self.checkpoint_path
        if os.path.isfile(ckpt):
            saved = load_checkpoint(ckpt)['last'] or {}
            where = ', '.join(f'{k} {v}' for k, v in list(saved.items())[:1])
            advice = (f'The last good checkpoint is {ckpt} ({where}); continue from it with a lower learning rate, '
                      f'e.g. python {self.script}.py --resume {self.dir} --lr {lr / 10:g}')
        else:
            advice = (f'No checkpoint was written yet; start again with a lower learning rate, e.g. --lr {lr / 10:g} '
                      f'(the folder {self.dir} holds only the configuration and log of this attempt)')
        raise Diverged(f'training diverged: {what} (learning rate {lr:g}). Nothing was saved from these weights: '
                       f'{advice}.')

    def end_epoch(self, objects, row, text):
        """evaluate_and_save for the epoch-based scripts (the MAXL paper's three): the best is kept on
        test_acc, the printed line is the original's 'EPOCH: e ITER: s | <text> | <seconds>s', and the
        position (epoch, step) is saved with the checkpoint."""
        return self.evaluate_and_save(objects, row, 'test_acc', lines=lambda improved: [
            f'EPOCH: {row["epoch"]:04d} ITER: {row["step"]:06d} | {text} | {row["seconds"]:.1f}s'],
            epoch=row['epoch'], step=row['step'])

    def finish_epochs(self, score='test_acc'):
        """The closing line of an epoch-based run."""
        if self.last is not None:
            self.log.print(f'done after {self.last["epoch"] + 1} epochs: test accuracy {self.last[score]:.4f}, '
                           f'best {self.best[score]:.4f}')
